"""Shared maths and argument checks used by every samtx transform.

Everything that more than one optimizer needs lives here exactly once: the
global norm, the statistics dtype rule, hyper-parameter validation, schedule
evaluation, and the single place that calls a user's ``grad_fn``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = Any  # float | jax.Array | optax.Schedule


# ----------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------


def stat_dtype(dtype) -> jnp.dtype:
  """The dtype first moments and perturbations are kept in for ``dtype`` leaves.

  Low-precision leaves (bfloat16, float16) get float32 statistics: float16
  cannot even represent ``eps**2 = 1e-16`` and rounds it to zero. float32,
  float64 and complex leaves keep their own precision.
  """
  return jnp.promote_types(dtype, jnp.float32)


def real_stat_dtype(dtype) -> jnp.dtype:
  """The real dtype of second moments and norms for ``dtype`` leaves.

  ``|z|^2`` of a complex number is real, so a complex64 leaf's variances and
  norms are float32 (optax's convention); real leaves get :func:`stat_dtype`.
  """
  return jnp.finfo(stat_dtype(dtype)).dtype


def tree_stat_dtype(tree) -> jnp.dtype:
  """The (real) dtype of a scalar that summarises a whole tree, e.g. a norm."""
  dtype = jnp.dtype(jnp.float32)
  for leaf in jax.tree.leaves(tree):
    dtype = jnp.promote_types(dtype, real_stat_dtype(leaf.dtype))
  return dtype


def check_float_leaves(tree, who: str) -> None:
  """Rejects integer / boolean leaves, whose gradient has no meaning."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      # optax.masked / set_to_zero would not help: the leaf still reaches
      # this check. Replacing it by None (an empty subtree) does.
      raise TypeError(
          f"{who}: leaf {jax.tree_util.keystr(path)} has dtype {leaf.dtype};"
          " samtx optimizers need floating-point parameters and gradients."
          " Keep integer leaves out of the tree you optimize: optimize"
          " jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.inexact)"
          " else None, params) and put the integer leaves back inside the"
          " loss (docs: guides/optax_chains, 'Integer leaves').")


# ----------------------------------------------------------------------------
# tree maths
# ----------------------------------------------------------------------------


def abs_sq(x: jax.Array) -> jax.Array:
  """``|x|^2`` elementwise, real for complex ``x`` (``x * conj(x)``)."""
  if jnp.iscomplexobj(x):
    return jnp.real(x * jnp.conj(x))
  return jnp.square(x)


def sq_stat(x: jax.Array) -> jax.Array:
  """``|x|^2`` in the real statistics dtype of ``x`` (never overflows f16)."""
  return abs_sq(x.astype(stat_dtype(x.dtype)))


def _sharded_axes(leaf, norm_axis_name) -> tuple:
  """The axes of ``norm_axis_name`` that ``leaf`` is sharded (varies) over.

  Inside ``jax.shard_map`` every value carries the set of mesh axes it varies
  over (``jax.typeof(x).vma``). A leaf that is replicated over an axis holds
  the same block on every device there, so its partial sum is counted once
  (no psum); outside ``shard_map`` the set is empty and nothing is summed.
  """
  if norm_axis_name is None:
    return ()
  names = ((norm_axis_name,) if isinstance(norm_axis_name, str)
           else tuple(norm_axis_name))
  return tuple(name for name in names if name in varying_axes(leaf))


def varying_axes(leaf) -> frozenset:
  """The mesh axes ``leaf`` varies over inside ``shard_map`` (else empty).

  jax < 0.10 calls this set ``aval.vma``; jax 0.10 keeps it in
  ``aval.mat.varying`` (``ManualAxisType``) and has no ``vma`` attribute,
  which silently made every leaf look replicated (no psum at all).
  """
  aval = jax.typeof(leaf)
  varying: Any = getattr(aval, "vma", None)
  if varying is None:
    varying = getattr(getattr(aval, "mat", None), "varying", ())
  return frozenset(varying)


# Mapped axes over which the values a transform is traced with are declared
# the same on every device (see ``replicated_inputs``).
_REPLICATED_AXES: contextvars.ContextVar[frozenset] = contextvars.ContextVar(
    "samtx_replicated_axes", default=frozenset())


@contextlib.contextmanager
def replicated_inputs(axis_name: str) -> Iterator[None]:
  """Declares, while tracing, that updates see replicated values over an axis.

  Under ``jax.pmap`` (and a named ``jax.vmap``) values carry no record of
  which mapped axes they vary over. samtx's data-parallel steps with one
  global perturbation average the gradient *and* the perturbed gradient
  before the rule sees them, so every value an update is traced with is the
  same on all devices of ``axis_name``; inside this context the transforms
  skip their own averaging over it (a second parameter-sized all-reduce that
  would change nothing). Inside a vma-checked ``jax.shard_map`` the types say
  what varies and take precedence.
  """
  token = _REPLICATED_AXES.set(_REPLICATED_AXES.get() | {axis_name})
  try:
    yield
  finally:
    _REPLICATED_AXES.reset(token)


def _typed_over(axis_name: str) -> bool:
  """Whether values record if they vary over ``axis_name`` (shard_map)."""
  return axis_name in varying_axes(jax.lax.axis_index(axis_name))


def _may_vary(axis_name: str):
  """``leaf -> bool``: whether a leaf may differ between the axis' devices."""
  if _typed_over(axis_name):
    return lambda leaf: axis_name in varying_axes(leaf)
  replicated = axis_name in _REPLICATED_AXES.get()
  return lambda leaf: not replicated


def is_replicated(tree, axis_name: str) -> bool:
  """Whether every leaf of ``tree`` is known to be the same on all devices.

  Known from the leaf's type inside a vma-checked ``shard_map``, or declared
  by :func:`replicated_inputs` where values are untyped (``pmap``).
  """
  may_vary = _may_vary(axis_name)
  return not any(may_vary(leaf) for leaf in jax.tree.leaves(tree))


def pmean_varying(tree, axis_name: str):
  """``jax.lax.pmean`` over ``axis_name`` of the leaves that may vary.

  A leaf known to be the same on every device (:func:`is_replicated`) is its
  own mean and is returned as it is, with no all-reduce.
  """
  may_vary = _may_vary(axis_name)
  return jax.tree.map(
      lambda x: jax.lax.pmean(x, axis_name) if may_vary(x) else x, tree)


def tree_sum(partials, norm_axis_name=None, dtype=None) -> jax.Array:
  """Sums per-leaf partial results into one global scalar.

  ``partials`` pairs each leaf (whose sharding decides the psum axes) with
  its local scalar. Partials that vary over the same model axes are added
  first, so there is one ``psum`` per distinct set of axes, not per leaf.
  """
  groups: dict = {}
  for leaf, partial in partials:
    axes = _sharded_axes(leaf, norm_axis_name)
    groups[axes] = groups.get(axes, 0) + partial.astype(dtype)
  total = jnp.zeros((), dtype)
  for axes, partial in groups.items():
    total = total + (jax.lax.psum(partial, axes) if axes else partial)
  return total


def global_sq_norm(tree, dtype=None, norm_axis_name=None) -> jax.Array:
  """Squared global L2 norm of a tree, accumulated in the statistics dtype.

  Complex leaves contribute ``|z|^2``. With ``norm_axis_name`` (inside
  ``jax.shard_map``) the per-block sums of leaves sharded over those mesh
  axes are ``psum``-ed, so the result is the norm of the whole model.
  """
  dtype = tree_stat_dtype(tree) if dtype is None else dtype
  return tree_sum(
      [(leaf, jnp.sum(abs_sq(leaf.astype(_promote_real(leaf.dtype, dtype)))))
       for leaf in jax.tree.leaves(tree)], norm_axis_name, dtype)


def global_norm(tree, dtype=None, norm_axis_name=None) -> jax.Array:
  """Global L2 norm of a tree (see :func:`global_sq_norm`)."""
  return jnp.sqrt(global_sq_norm(tree, dtype, norm_axis_name))


def global_real_vdot(a, b, dtype=None, norm_axis_name=None) -> jax.Array:
  """``Re <a, b>`` over whole trees (``sum(conj(a) * b)``), like the norm."""
  dtype = tree_stat_dtype(a) if dtype is None else dtype
  return tree_sum(
      [(x, jnp.sum(jnp.real(jnp.conj(x.astype(_promote_real(x.dtype, dtype)))
                            * y.astype(_promote_real(y.dtype, dtype)))))
       for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))],
      norm_axis_name, dtype)


def _promote_real(leaf_dtype, real_dtype):
  """``real_dtype``, made complex when the leaf is complex."""
  return jnp.promote_types(leaf_dtype, real_dtype)


def ema(old, new, decay):
  """``decay * old + (1 - decay) * new`` leafwise, kept in ``old``'s dtype."""
  return jax.tree.map(
      lambda o, n: (decay * o + (1 - decay) * n.astype(o.dtype)).astype(
          o.dtype), old, new)


def to_stat(tree):
  """Casts every leaf to its statistics dtype."""
  return jax.tree.map(lambda x: x.astype(stat_dtype(x.dtype)), tree)


def full_like_stat(tree, value, *, real: bool = False):
  """A tree like ``tree`` filled with ``value`` in its statistics dtype.

  ``jnp.full_like`` keeps each leaf's sharding, so optimizer state lands on
  the devices of its parameter (``jnp.full(x.shape, ...)`` would not).
  ``real=True`` gives the real dtype second moments need for complex leaves.
  """
  dtype_of = real_stat_dtype if real else stat_dtype
  return jax.tree.map(
      lambda x: jnp.full_like(x, value, dtype=dtype_of(x.dtype)), tree)


def initial_second_moment(eps, dtype):
  """``eps**2`` in ``dtype``: the start of every samtx accumulator.

  Computed one way everywhere, so code can compare a statistic with its
  initial value exactly (AdaSAM's delayed form does).
  """
  return jnp.square(jnp.asarray(eps, dtype))


def second_moments_like(tree, eps):
  """Per-coordinate accumulators for ``tree``, all at ``eps**2`` (real)."""
  return jax.tree.map(
      lambda x: jnp.full_like(
          x, initial_second_moment(eps, real_stat_dtype(x.dtype)),
          dtype=real_stat_dtype(x.dtype)), tree)


def cast_like(tree, like):
  """Casts ``tree`` leafwise to the dtypes of ``like``."""
  return jax.tree.map(lambda x, ref: x.astype(ref.dtype), tree, like)


# ----------------------------------------------------------------------------
# hyper-parameters
# ----------------------------------------------------------------------------


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def check_scalar(
    name: str,
    value,
    *,
    low: Optional[float] = None,
    low_open: bool = False,
    high: Optional[float] = None,
    high_open: bool = False,
    allow_schedule: bool = False,
    who: str = "samtx",
) -> None:
  """Validates a numeric hyper-parameter at construction time.

  Accepts Python numbers and concrete scalar arrays (what
  ``optax.inject_hyperparams`` passes), and, when ``allow_schedule``, any
  callable. Traced values are accepted unchecked: branching in Python on a
  tracer is impossible. That leaves ``rho`` injected under ``jax.jit`` (and
  any schedule's values) unchecked, so transforms read it through
  :func:`rho_at`, which clamps it at 0.

  Raises:
    TypeError: the value is not a real scalar (or a schedule when allowed).
    ValueError: the value is outside its valid range or not finite.
  """
  if callable(value):
    if allow_schedule:
      return
    raise TypeError(f"{who}: {name} must be a number, got a callable {value!r}.")
  if _is_traced(value):
    return
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{who}: {name} must be a number, got the bool {value!r}.")
  try:
    arr = np.asarray(value)
  except Exception as err:  # pragma: no cover - exotic array types
    raise TypeError(f"{who}: {name} must be a real scalar, got {value!r}.") from err
  if arr.ndim != 0 or not (jnp.issubdtype(arr.dtype, jnp.floating)
                           or np.issubdtype(arr.dtype, np.integer)):
    kind = "a real scalar or an optax schedule" if allow_schedule else "a real scalar"
    raise TypeError(f"{who}: {name} must be {kind}, got {value!r}.")
  x = float(arr)
  lo = "(" if low_open else "["
  hi = ")" if high_open else "]"
  valid = (f"{lo}{low if low is not None else '-inf'}, "
           f"{high if high is not None else 'inf'}{hi}")
  bad = not np.isfinite(x)
  if low is not None:
    bad |= x <= low if low_open else x < low
  if high is not None:
    bad |= x >= high if high_open else x > high
  if bad:
    hint = ""
    if jnp.issubdtype(arr.dtype, jnp.floating) and arr.dtype.itemsize < 4:
      # optax.inject_hyperparams casts hyper-parameters to the params' dtype
      # by default: b2 = 0.999 becomes bfloat16 1.0.
      hint = (f" A {arr.dtype} value rounds (e.g. 0.999 -> 1.0):"
              " optax.inject_hyperparams casts hyper-parameters to the params'"
              " dtype unless given hyperparam_dtype=jnp.float32.")
    raise ValueError(
        f"{who}: {name} must lie in {valid}, got {value!r}.{hint}")


def check_axis_names(name: str, value, who: str) -> None:
  """Accepts ``None``, a mesh axis name, or a tuple of mesh axis names."""
  ok = value is None or isinstance(value, str) or (
      isinstance(value, tuple) and value
      and all(isinstance(v, str) for v in value))
  if not ok:
    raise TypeError(
        f"{who}: {name} must be None, a mesh axis name (str) or a non-empty"
        f" tuple of axis names, got {value!r}.")


def is_static_zero(value) -> bool:
  """True when ``value`` is a concrete 0 known at trace time (not a schedule)."""
  if callable(value) or _is_traced(value):
    return False
  try:
    return bool(np.all(np.asarray(value) == 0))
  except Exception:  # pragma: no cover - exotic array types
    return False


def is_known_at_trace_time(value) -> bool:
  """True for a number or concrete array; False for a schedule or a tracer.

  A schedule's value changes from step to step, and a traced value (what
  ``optax.inject_hyperparams`` passes) is only known when the step runs, so
  code that depends on such a value must branch inside the compiled program.
  """
  return not (callable(value) or _is_traced(value))


def value_at(hyper_parameter: ScalarOrSchedule, count: jax.Array):
  """A hyper-parameter's value at step ``count`` (schedules are called)."""
  if callable(hyper_parameter):
    return hyper_parameter(count)
  return hyper_parameter


def rho_at(rho: ScalarOrSchedule, count: jax.Array):
  """The radius at step ``count``, clamped at 0: ``rho_t = max(rho_t, 0)``.

  :func:`check_scalar` rejects a negative ``rho`` it can see, but not one
  that only exists at run time: a schedule that goes below 0, or a value
  ``optax.inject_hyperparams`` passes as a tracer under ``jax.jit``. A
  negative radius would silently turn the ascent into a descent, and raising
  from inside a compiled step is not possible, so every transform that
  takes ``rho`` reads it here and a negative value acts as ``rho = 0`` (the
  base optimizer). A Python number was checked at construction and is
  returned as it is.
  """
  value = value_at(rho, count)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return value
  value = jnp.asarray(value)
  return jnp.maximum(value, jnp.zeros_like(value))


# ----------------------------------------------------------------------------
# the one place that evaluates the gradient at a perturbed point
# ----------------------------------------------------------------------------


def value_recorder(grad_fn):
  """The recorder a ``grad_fn`` carries for values it computes, else None.

  ``samtx.flax``'s ``grad_fn`` s record the loss they compute (for the
  step's ``perturbed_loss`` metric) in an object with ``latest()`` (the
  value recorded last) and ``record(value, taken=None)``. A value recorded
  inside a loop belongs to the loop's trace; a transform that calls
  ``grad_fn`` inside one (LookSAM) carries ``latest()`` out through the loop
  and records it again after it, with ``taken`` saying whether the loop's
  body ran.
  """
  recorder = getattr(grad_fn, "recorder", None)
  if callable(getattr(recorder, "latest", None)) and callable(
      getattr(recorder, "record", None)):
    return recorder
  return None


def _takes_one_argument(fn) -> bool:
  """Whether ``fn(x)`` binds (False for e.g. ``grad_fn(params, i)``)."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # builtins and C callables: assume so
    return True
  try:
    signature.bind(None)
  except TypeError:
    return False
  return True


def check_grad_fn(grad_fn, who: str) -> Callable[[Any], Any]:
  """``grad_fn``, checked: raises unless it is a callable of one argument.

  Also checked where a step does not call it (rho = 0), so that a missing or
  misshapen ``grad_fn`` fails the same way whatever ``rho`` is.
  """
  if grad_fn is None:
    raise TypeError(
        f"{who}.update needs the keyword-only argument grad_fn: a function"
        " params -> grads (the same tree as params) that samtx calls once at"
        " the perturbed point, e.g. update(grads, state, params,"
        " grad_fn=jax.grad(lambda p: loss(p, batch))).")
  if not callable(grad_fn):
    raise TypeError(f"{who}: grad_fn must be callable, got {grad_fn!r}.")
  if not _takes_one_argument(grad_fn):
    raise TypeError(
        f"{who}: grad_fn must be grad_fn(params) -> grads (one argument, a"
        f" tree like params), got one with signature"
        f" {inspect.signature(grad_fn)}; samtx calls it once per step at the"
        " perturbed point. Adapt an optax.contrib.sam-style grad_fn(params,"
        " i) as grad_fn=lambda p: contrib_grad_fn(p, 0).")
  return grad_fn


def gradient_like(out, grads, who: str, name: str = "grad_fn"):
  """``out`` (what gradient function ``name`` returned), checked to have
  the tree structure and leaf shapes of ``grads``, cast to their dtypes."""
  expected = jax.tree.structure(grads)
  got = jax.tree.structure(out)
  if got != expected:
    raise TypeError(
        f"{who}: {name} must return a tree with the structure of params;"
        f" expected {expected}, got {got}.")
  for path, o, g in zip(
      (p for p, _ in jax.tree_util.tree_leaves_with_path(grads)),
      jax.tree.leaves(out), jax.tree.leaves(grads)):
    if jnp.shape(o) != jnp.shape(g):
      raise ValueError(
          f"{who}: {name} returned shape {jnp.shape(o)} for leaf"
          f" {jax.tree_util.keystr(path)}, expected {jnp.shape(g)}.")
  return cast_like(out, grads)


def perturbed_gradient(
    grad_fn: Optional[Callable[[Any], Any]],
    params,
    perturbation,
    grads,
    *,
    axis_name: Optional[str],
    who: str,
):
  """Returns ``grad_fn(params + perturbation)``, checked and cast like grads.

  The perturbed gradient is averaged over ``axis_name`` (:func:`pmean_varying`)
  when one is given, so every device descends along the same direction.
  """
  grad_fn = check_grad_fn(grad_fn, who)
  if params is None:
    raise ValueError(
        f"{who}.update needs params: the perturbation is applied to them.")
  perturbed_params = jax.tree.map(
      lambda p, e: p + e.astype(p.dtype), params, perturbation)
  out = gradient_like(grad_fn(perturbed_params), grads, who)
  if axis_name is not None:
    out = pmean_varying(out, axis_name)
  return out


# ----------------------------------------------------------------------------
# finding a transform's state inside a wrapped optimizer state
# ----------------------------------------------------------------------------


def states_of(opt_state, state_type) -> list:
  """Every ``state_type`` node anywhere in ``opt_state`` (chains, wrappers)."""
  return [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, state_type))
          if isinstance(s, state_type)]
