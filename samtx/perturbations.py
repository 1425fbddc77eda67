"""Two-pass (ascent) perturbations: SAM, ASAM, LightSAM and the wider family.

Each transform sits first in an ``optax.chain``. Its ``update`` receives the
gradient ``g`` at ``params``, builds a perturbation ``e``, calls the
keyword-only ``grad_fn(params + e)`` exactly once and passes that perturbed
gradient ``h`` -- or, for GSAM, WSAM and LookSAM, a combination of ``g`` and
``h`` -- downstream. LookSAM calls ``grad_fn`` only every ``k``-th step. No
copy of the parameters is kept between steps; Friendly-SAM and LookSAM keep
the one parameter-sized buffer their rule needs. FGSAM builds ``e`` from the
gradient of one loss and evaluates ``grad_fn`` for another loss that shares
the weights.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samtx import _common
from samtx import moments

__all__ = [
    "PerturbationState",
    "sam_perturbation",
    "lightsam_perturbation",
    "gsam_perturbation",
    "wsam_perturbation",
    "friendly_sam_perturbation",
    "looksam_perturbation",
    "FriendlySAMState",
    "LookSAMState",
    "fgsam_perturbation",
    "fgsam_plus_perturbation",
]


class PerturbationState(NamedTuple):
  """State of a two-pass perturbation.

  Attributes:
    count: number of updates taken so far (int32 scalar; drives ``rho``
      schedules).
    perturbation_norm: global L2 norm of the last perturbation ``e``
      (a scalar metric, 0 before the first step).
    inner: the rule's own statistics (``optax.EmptyState`` for SAM, ASAM,
      GSAM and WSAM; the preconditioner state for LightSAM;
      :class:`FriendlySAMState` and :class:`LookSAMState`).
  """
  count: jax.Array
  perturbation_norm: jax.Array
  inner: Any


# ascent(grads, inner_state, params, rho_t, count)
#   -> (perturbation, norm, inner_state)
AscentRule = Callable[[Any, Any, Any, Any, Any], tuple]
# combine(grads, perturbed_grads, inner_state, rho_t) -> (output, inner_state)
CombineRule = Callable[[Any, Any, Any, Any], tuple]
# reuse(grads, inner_state, rho_t) -> (coefficient, direction): on steps
# without a second pass the output is grads + coefficient * direction
ReuseRule = Callable[[Any, Any, Any], tuple]


def _reject_masked(params, who: str) -> None:
  """``optax.masked`` hides leaves from params, so grad_fn could not run."""
  nodes = jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  if any(isinstance(x, optax.MaskedNode) for x in nodes):
    raise TypeError(
        f"{who} cannot run inside optax.masked: the masked params it would"
        " receive lack the leaves grad_fn needs. To freeze leaves, zero their"
        " gradients around the perturbation instead: optax.chain("
        "optax.masked(optax.set_to_zero(), frozen), samtx.sam_perturbation(rho),"
        " optax.masked(optax.set_to_zero(), frozen), optax.sgd(lr)) (for"
        " GSAM and LookSAM also zero the frozen leaves of grad_fn's output).")


def check_axis_arguments(who: str, axis_name, norm_axis_name) -> None:
  """Validates the data axis and the model axes of a perturbation."""
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"{who}: axis_name must be a str or None, got {axis_name!r}.")
  _common.check_axis_names("norm_axis_name", norm_axis_name, who)


def _pass_through(grads, perturbed, inner, rho_t):
  """The default output of a two-pass rule: the perturbed gradient itself."""
  del grads, rho_t
  return perturbed, inner


def _vary_over(tree, varying):
  """Marks each leaf of ``tree`` as varying over its set in ``varying``."""
  def cast(x, axes):
    missing = tuple(sorted(axes - _common.varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree, varying)


def _two_pass(
    who: str,
    rho,
    axis_name: Optional[str],
    init_inner: Callable[[Any], Any],
    ascent: AscentRule,
    norm_axis_name=None,
    *,
    combine: CombineRule = _pass_through,
    reuse: Optional[ReuseRule] = None,
    every=None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a two-pass transform from its rules (the shared bookkeeping).

  Every step runs ``ascent`` on the clean gradient ``g``, evaluates
  ``h = grad_fn(params + e)`` (the only call of ``grad_fn``, through
  :func:`samtx._common.perturbed_gradient`) and returns
  ``combine(g, h, inner, rho_t)``. With ``every`` (a positive integer) and
  ``reuse``, only steps with ``count % every == 0`` take the second pass; the
  others return ``g + c d`` with ``(c, d) = reuse(g, inner, rho_t)``, and the
  compiled step really skips ``grad_fn`` (LookSAM, see
  :func:`_every_kth_second_pass`).

  The output is cast to the gradient's dtypes and, with ``axis_name``,
  averaged over that axis last: each device applies the rule to its own
  ``g`` and ``h`` (what m-sharpness asks), and one ``pmean`` keeps every
  device on the same step whichever branch ran. A ``g`` known to be the same
  on every device (typed replicated inside ``shard_map``, or declared by
  ``_common.replicated_inputs``) is one global perturbation: ``h`` is
  averaged *before* the rule, which then runs once on global quantities
  (exact for rules nonlinear in ``h``, such as GSAM's), and values already
  replicated are not averaged again (``_common.pmean_varying``).
  """
  _common.check_scalar("rho", rho, low=0.0, allow_schedule=True, who=who)
  check_axis_arguments(who, axis_name, norm_axis_name)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    return PerturbationState(
        count=jnp.zeros([], jnp.int32),
        perturbation_norm=jnp.zeros([], _common.tree_stat_dtype(params)),
        inner=init_inner(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    _common.check_float_leaves(updates, who)
    if params is None:
      raise ValueError(
          f"{who}.update needs params: the perturbation is applied to them.")
    _reject_masked(params, who)
    rho_t = _common.rho_at(rho, state.count)
    norm_dtype = state.perturbation_norm.dtype

    def second_pass(grads):
      perturbation, norm, inner = ascent(grads, state.inner, params, rho_t,
                                         state.count)
      # A g that is the same on every device means one global perturbation:
      # the rule then takes the global h too (averaged here unless the
      # caller's grad_fn already did), as on one device with the whole batch.
      global_perturbation = (axis_name is not None
                             and _common.is_replicated(grads, axis_name))
      perturbed = _common.perturbed_gradient(
          grad_fn, params, perturbation, grads,
          axis_name=axis_name if global_perturbation else None, who=who)
      output, inner = combine(grads, perturbed, inner, rho_t)
      return (_common.cast_like(output, grads),
              jnp.asarray(norm, norm_dtype),
              _common.cast_like(inner, state.inner))

    if reuse is None:
      output, norm, inner = second_pass(updates)
    else:
      output, norm, inner = _every_kth_second_pass(
          state.count % every == 0, second_pass, reuse, updates, state,
          rho_t, axis_name, _common.value_recorder(grad_fn))
    if axis_name is not None:
      output = _common.pmean_varying(output, axis_name)
    return output, PerturbationState(
        count=optax.safe_increment(state.count), perturbation_norm=norm,
        inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _every_kth_second_pass(take_second_pass, second_pass, reuse, grads,
                           state, rho_t, axis_name, recorder=None):
  """``second_pass(g)`` when ``take_second_pass``, else ``g + c d``.

  ``(c, d) = reuse(g, inner, rho_t)``. The branch is a ``while_loop`` that
  runs its body once or not at all, not a ``jax.lax.cond``: a loop updates
  its carried buffers in place, so on reusing steps ``g`` and the state pass
  through untouched, and ``g + c d`` is formed after the loop, where XLA
  fuses it into the downstream update. A cond instead writes ``g + c d``
  out from its branch and the update reads it back, or, if the branch only
  passes ``g`` and the state through, copies them (XLA:CPU, jax 0.10): a
  reusing step then costs 1.08-1.10x the base optimizer's step, against
  1.02-1.06x with the loop (paired runs of ``benchmarks/two_pass.py``). The
  reused output is computed from the loop's outputs (on a reusing step,
  ``g`` and the old state), so nothing the loop carries is read again after
  it. With ``axis_name`` the reported perturbation norm is averaged over the
  axis, so that it is replicated like the rest of the state.

  A value ``grad_fn`` records (``recorder``, see
  :func:`samtx._common.value_recorder`: ``samtx.flax``'s perturbed loss)
  belongs to the loop body's trace; the loop carries it out (zeros on a
  reusing step) and it is recorded again after the loop, with the flag.
  """
  def recorded():
    return () if recorder is None else recorder.latest()

  def body(g):
    output, norm, inner = second_pass(g)
    if axis_name is not None:
      norm = _common.pmean_varying(norm, axis_name)
    return output, norm, inner, recorded()

  body_shapes = jax.eval_shape(body, grads)
  nothing_recorded = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                  body_shapes[3])

  def skip():
    return grads, state.perturbation_norm, state.inner, nothing_recorded

  # Inside shard_map the second pass's results vary over the data axis
  # (local g and h) while a reused state is replicated: the carry takes the
  # union of both, and the body, which reads g from the carry, is typed
  # again with that g until nothing changes (the sets only grow, and the
  # mesh has finitely many axes).
  varying = _union_of_varying(body_shapes, jax.eval_shape(skip))
  typed_as = [_common.varying_axes(g) for g in jax.tree.leaves(grads)]
  while jax.tree.leaves(varying[0]) != typed_as:
    typed_as = jax.tree.leaves(varying[0])
    typed_g = jax.eval_shape(lambda: _vary_over(grads, varying[0]))
    varying = _union_of_varying(varying, jax.eval_shape(body, typed_g))
  # The flag varies where the step count does (a per-device state).
  run_body = jnp.asarray(take_second_pass)
  done = _vary_over(jnp.zeros([], bool), _common.varying_axes(run_body))
  _, (output, norm, inner, value) = jax.lax.while_loop(
      lambda carry: carry[0],
      lambda carry: (done, _vary_over(body(carry[1][0]), varying)),
      (run_body, _vary_over(skip(), varying)))
  if recorder is not None:
    recorder.record(value, taken=run_body)
  coefficient, direction = reuse(output, inner, rho_t)
  return jax.tree.map(
      lambda out, d: jnp.where(
          take_second_pass, out,
          (out.astype(d.dtype) + coefficient * d).astype(out.dtype)),
      output, direction), norm, inner


def _union_of_varying(a, b):
  """Leafwise union of the axes two same-structured trees vary over."""
  as_set = lambda x: x if isinstance(x, frozenset) else _common.varying_axes(x)
  return jax.tree.map(lambda x, y: frozenset(as_set(x) | as_set(y)), a, b,
                      is_leaf=lambda x: isinstance(x, frozenset))


def _sam_ascent(*, adaptive: bool, eta, eps, norm_axis_name,
                direction_of=None, normalize: bool = True) -> AscentRule:
  """SAM's (or ASAM's) ascent along ``direction_of(grads, inner)``.

  SAM: ``e = rho d / (||d|| + eps)``; ASAM, with ``T = |x| + eta``:
  ``e = rho T^2 d / (||T d|| + eps)``. ``d`` is the gradient itself unless
  ``direction_of(grads, inner, count)`` returns another direction (and the
  new inner state), as Friendly-SAM's does. ``normalize=False`` drops the
  division: ``e = rho d`` (ASAM: ``rho T^2 d``).
  """
  def ascent(grads, inner, params, rho_t, count):
    dtype = _common.tree_stat_dtype(grads)
    if direction_of is None:
      direction = _common.to_stat(grads)
    else:
      direction, inner = direction_of(_common.to_stat(grads), inner, count)
    if adaptive:
      scales = jax.tree.map(
          lambda x, d: jnp.abs(x.astype(d.dtype)) + eta, params, direction)
      weighted = jax.tree.map(jnp.multiply, scales, direction)
      direction = jax.tree.map(jnp.multiply, scales, weighted)
      denominator = _common.global_norm(weighted, dtype, norm_axis_name)
    else:
      denominator = _common.global_norm(direction, dtype, norm_axis_name)
    if normalize:
      step = rho_t / (denominator + eps)
    else:
      step = jnp.asarray(rho_t, dtype)
    perturbation = jax.tree.map(lambda d: d * step, direction)
    # SAM's perturbation norm is known without a second reduction.
    norm = (step * _common.global_norm(direction, dtype, norm_axis_name)
            if adaptive else step * denominator)
    return perturbation, norm, inner

  return ascent


def sam_perturbation(
    rho,
    *,
    normalize: bool = True,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM / ASAM ascent: the gradient at the worst point of a rho-ball.

  SAM (``adaptive=False``), with :math:`\|\cdot\|` the global L2 norm:

  .. math::
    e = \rho\, g / (\|g\| + \epsilon),\qquad
    \text{output} = \nabla f(x + e).

  ASAM (``adaptive=True``), with :math:`T = |x| + \eta` elementwise:

  .. math::
    e = \rho\, T^2 g / (\|T g\| + \epsilon).

  With ``eta=0`` this is the ``adaptive=True`` mode of the widely used
  PyTorch SAM implementation.

  Unnormalized SAM (``normalize=False``), the form most SAM theory
  analyses: the ascent step is not divided by its norm,

  .. math::
    e = \rho\, g \quad(\text{ASAM: } e = \rho\, T^2 g),

  so its length ``rho ||g||`` shrinks near a minimum. ``rho`` is then a step
  size rather than a radius (``eps`` is unused). With
  :func:`samtx.parallel.jit_step`'s perturbation groups of one example
  (``m_sharpness_groups`` equal to the batch size, ``axis_name`` set) every
  example ascends along its own gradient and the update is the mean of the
  per-example perturbed gradients: the unnormalized 1-SAM of Andriushchenko
  and Flammarion.

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      ``rho=0`` reproduces the base optimizer exactly. A negative value is
      rejected at construction; one that only appears at run time (a
      schedule's value, or a value ``optax.inject_hyperparams`` passes
      under ``jax.jit``) cannot raise and is clamped,
      ``rho_t = max(rho_t, 0)``, as in every samtx transform taking rho.
    normalize: divide the ascent step by its norm (SAM, ASAM); ``False``
      gives unnormalized SAM, ``e = rho g``.
    adaptive: ASAM's scale-invariant ball.
    eta: ASAM's offset ``>= 0`` (ignored when ``adaptive=False``).
    eps: ``> 0``, keeps a zero gradient finite.
    axis_name: when set, the perturbed gradient is averaged over this mapped
      axis (``jax.lax.pmean``). The ascent direction uses the ``grads`` the
      caller passes: per-device gradients give per-device perturbations
      (m-sharpness), already-averaged ones one global perturbation.
    norm_axis_name: mesh axis name(s) the *parameters* are sharded over
      inside ``jax.shard_map`` (tensor parallelism, FSDP). Every global norm
      then sums the per-block partials over those axes for the leaves that
      vary over them (replicated leaves are counted once), so the
      perturbation equals the unsharded one. Ignored outside ``shard_map``,
      where XLA already reduces across shards.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> tx = optax.chain(samtx.sam_perturbation(0.1), optax.sgd(0.1))
    >>> params = jnp.array([3.0, 4.0])
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss))
    >>> updates  # -0.1 * 2 * (x + 0.1 * x / |x|)
    Array([-0.612, -0.816], dtype=float32)

  References:
    Foret et al., 2021, Sharpness-aware minimization for efficiently improving
    generalization, https://arxiv.org/abs/2010.01412
    Kwon et al., 2021, ASAM: Adaptive sharpness-aware minimization for
    scale-invariant learning of deep neural networks,
    https://arxiv.org/abs/2102.11600
    Andriushchenko and Flammarion, 2022, Towards understanding
    sharpness-aware minimization, https://arxiv.org/abs/2206.06232
    Agarwala and Dauphin, 2023, SAM operates far from home: eigenvalue
    regularization as a dynamical phenomenon,
    https://arxiv.org/abs/2302.08692
  """
  who = "sam_perturbation"
  _common.check_scalar("eta", eta, low=0.0, who=who)
  _common.check_scalar("eps", eps, low=0.0, low_open=True, who=who)
  _check_bool("normalize", normalize, who)

  ascent = _sam_ascent(adaptive=adaptive, eta=eta, eps=eps,
                       norm_axis_name=norm_axis_name, normalize=normalize)
  return _two_pass(who, rho, axis_name, lambda params: optax.EmptyState(),
                   ascent, norm_axis_name)


def lightsam_perturbation(
    rho,
    *,
    variant: str,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""LightSAM ascent: a preconditioned, self-sizing perturbation.

  With gradient :math:`s` at :math:`x` and accumulators starting at
  :math:`\epsilon^2`:

  - ``"adagrad_norm"`` (LightSAM-I): :math:`u \mathrel{+}= \|s\|^2`,
    :math:`e = \rho\, s / \sqrt{u}` (scalar ``u``).
  - ``"adagrad"`` (LightSAM-II): :math:`u \mathrel{+}= s^2`,
    :math:`e = \rho\, s / \sqrt{u}` elementwise.
  - ``"adam"`` (LightSAM-III): :math:`r = \beta_1 r + (1-\beta_1) s`,
    :math:`u = \beta_2 u + (1-\beta_2) s^2`, :math:`e = \rho\, r/\sqrt{u}`,
    :math:`r_{-1} = 0`, no bias correction.

  The output is :math:`\nabla f(x + e)`. The perturbation is not renormalised
  to length ``rho``: its size adapts to the gradient history, which is what
  makes LightSAM insensitive to ``rho``. The preconditioners are
  :func:`samtx.lightsam_preconditioner`, the same ones the descent step uses.

  Args:
    rho: ``>= 0``, a float or an optax schedule of the step count.
      Run-time negatives are clamped to 0 (see :func:`sam_perturbation`).
    variant: ``"adagrad_norm"``, ``"adagrad"`` or ``"adam"``.
    b1: first-moment decay of the ``"adam"`` variant, in ``[0, 1)``.
    b2: second-moment decay of the ``"adam"`` variant, in ``[0, 1)``.
    eps: ``> 0``; accumulators start at ``eps**2``.
    axis_name: as in :func:`sam_perturbation`.
    norm_axis_name: as in :func:`sam_perturbation` (LightSAM-I's scalar
      accumulator and the reported norm are global).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> tx = samtx.lightsam_perturbation(0.5, variant="adagrad_norm")
    >>> params = jnp.array([3.0, 4.0])
    >>> state = tx.init(params)
    >>> h, state = tx.update(jax.grad(loss)(params), state, params,
    ...                      grad_fn=jax.grad(loss))
    >>> h  # 2 * (x + 0.5 * s / |s|)
    Array([6.6, 8.8], dtype=float32)

  References:
    Cheng et al., 2025, LightSAM: Parameter-agnostic sharpness-aware
    minimization, https://arxiv.org/abs/2505.24399
  """
  who = "lightsam_perturbation"
  preconditioner = moments.lightsam_preconditioner(
      variant, b1=b1, b2=b2, eps=eps, norm_axis_name=norm_axis_name)

  def ascent(grads, inner, params, rho_t, count):
    del params, count
    direction, inner = preconditioner.update(grads, inner)
    direction = _common.to_stat(direction)
    perturbation = jax.tree.map(lambda d: d * rho_t, direction)
    norm = rho_t * _common.global_norm(direction, None, norm_axis_name)
    return perturbation, norm, inner

  return _two_pass(who, rho, axis_name, preconditioner.init, ascent,
                   norm_axis_name)


# ----------------------------------------------------------------------------
# the wider two-pass family: GSAM, WSAM, Friendly-SAM, LookSAM
# ----------------------------------------------------------------------------


def _check_family_args(who, *, eps, axis_name, norm_axis_name, **unit_range):
  """Checks eps and the rule's coefficients named in ``unit_range``.

  ``unit_range`` maps a name to ``(value, high)``: the value must lie in
  ``[0, high)`` (``high=None`` means no upper bound).
  """
  _common.check_scalar("eps", eps, low=0.0, low_open=True, who=who)
  for name, (value, high) in unit_range.items():
    _common.check_scalar(name, value, low=0.0, high=high,
                         high_open=high is not None, who=who)
  check_axis_arguments(who, axis_name, norm_axis_name)


def _norms_and_cosine(grads, perturbed, eps, norm_axis_name):
  """``n(g)``, ``n(h)`` and ``cos = <g, h> / (n(g) n(h) + eps)`` (global)."""
  dtype = _common.tree_stat_dtype(grads)
  g_norm = _common.global_norm(grads, dtype, norm_axis_name)
  h_norm = _common.global_norm(perturbed, dtype, norm_axis_name)
  inner_product = _common.global_real_vdot(grads, perturbed, dtype,
                                           norm_axis_name)
  return g_norm, h_norm, inner_product / (g_norm * h_norm + eps)


def _only_when_perturbed(rho_t, value):
  """``value`` where ``rho_t > 0``, exactly 0 at ``rho_t = 0``.

  At ``rho = 0`` the perturbed gradient is ``g`` itself and the family's
  correction terms vanish in exact arithmetic but not in floating point;
  zeroing their coefficient makes ``rho = 0`` reproduce the base optimizer
  bit for bit.
  """
  return jnp.where(jnp.asarray(rho_t) > 0, value, jnp.zeros_like(value))


def gsam_perturbation(
    rho,
    *,
    alpha: float = 0.4,
    adaptive: bool = False,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""GSAM: SAM's gradient minus the part of ``g`` orthogonal to it.

  With :math:`n(\cdot)` the global L2 norm, :math:`h` the gradient at SAM's
  ascent point :math:`x + \rho g/(n(g)+\epsilon)` (ASAM's with
  ``adaptive=True``):

  .. math::
    \cos = \frac{\langle g, h\rangle}{n(g)\, n(h) + \epsilon},\quad
    g_\perp = g - \cos\, n(g) \frac{h}{n(h) + \epsilon},\quad
    \text{output} = h - \alpha\, g_\perp.

  Descending along :math:`-g_\perp` lowers the surrogate gap
  :math:`f(x+e) - f(x)` without changing the perturbed loss to first order.
  The paper ties ``rho`` to the learning-rate schedule: pass an optax
  schedule for ``rho``. No parameter-sized state.

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      ``rho=0`` reproduces the base optimizer exactly (``g_perp`` is then
      taken to be exactly 0). Run-time negatives are clamped to 0 (see
      :func:`sam_perturbation`).
    alpha: ``>= 0``, the weight of the surrogate-gap ascent.
    adaptive: ASAM's ascent point (``T = |x|``, the PyTorch
      ``adaptive=True`` mode).
    eps: ``> 0``, keeps a zero gradient finite.
    axis_name: when set, the output is averaged over this mapped axis
      (``jax.lax.pmean``) after each device applied the rule to its own
      ``g`` and ``h``. A ``g`` that is the same on every device (one global
      perturbation) gets the averaged ``h`` instead, and the rule runs once
      on the global gradients, as on one device.
    norm_axis_name: mesh axes the parameters are sharded over inside
      ``jax.shard_map``; every norm and inner product sums over them (see
      :func:`sam_perturbation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: p[0] ** 2 + 2 * p[1] ** 2 + p[0] * p[1]
    >>> tx = samtx.gsam_perturbation(0.5, alpha=0.5)
    >>> params = jnp.array([1.0, 0.0])
    >>> out, state = tx.update(jax.grad(loss)(params), tx.init(params),
    ...                        params, grad_fn=jax.grad(loss))
    >>> out.round(4)  # h = (3.118, 2.3416), g_perp = (0.2412, -0.3211)
    Array([2.9975, 2.5021], dtype=float32)

  References:
    Zhuang et al., 2022, Surrogate gap guided sharpness-aware minimization,
    https://arxiv.org/abs/2203.08065
  """
  who = "gsam_perturbation"
  _check_family_args(who, eps=eps, axis_name=axis_name,
                     norm_axis_name=norm_axis_name, alpha=(alpha, None))
  ascent = _sam_ascent(adaptive=adaptive, eta=0.0, eps=eps,
                       norm_axis_name=norm_axis_name)

  def combine(grads, perturbed, inner, rho_t):
    g, h = _common.to_stat(grads), _common.to_stat(perturbed)
    g_norm, h_norm, cos = _norms_and_cosine(g, h, eps, norm_axis_name)
    along_h = cos * g_norm / (h_norm + eps)
    weight = _only_when_perturbed(rho_t, jnp.asarray(alpha, along_h.dtype))
    output = jax.tree.map(lambda gx, hx: hx - weight * (gx - along_h * hx),
                          g, h)
    return output, inner

  return _two_pass(who, rho, axis_name, lambda params: optax.EmptyState(),
                   ascent, norm_axis_name, combine=combine)


def wsam_perturbation(
    rho,
    *,
    gamma: float = 0.9,
    adaptive: bool = False,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""WSAM (coupled form): the loss plus a weighted sharpness term.

  With :math:`h` the gradient at SAM's ascent point (ASAM's with
  ``adaptive=True``) and :math:`a = \gamma / (1-\gamma)`:

  .. math::
    \text{output} = (1-a)\, g + a\, h
    \;=\; h + (1-a)(g - h),

  the gradient of :math:`f(x) + a\,[f(x+e) - f(x)]`: ``gamma=0`` is plain
  gradient descent, ``gamma=0.5`` is SAM, larger ``gamma`` weighs the
  sharpness more. It is evaluated in the second form, so ``rho=0``
  (``h = g``) returns ``g`` bit for bit. No parameter-sized state.

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      Run-time negatives are clamped to 0 (see :func:`sam_perturbation`).
    gamma: sharpness weight in ``[0, 1)``.
    adaptive: ASAM's ascent point (``T = |x|``).
    eps: ``> 0``, keeps a zero gradient finite.
    axis_name: as in :func:`gsam_perturbation`.
    norm_axis_name: as in :func:`sam_perturbation`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> tx = samtx.wsam_perturbation(5.0, gamma=0.75)  # a = 3
    >>> params = jnp.array([3.0, 4.0])
    >>> out, state = tx.update(jax.grad(loss)(params), tx.init(params),
    ...                        params, grad_fn=jax.grad(loss))
    >>> out  # -2 g + 3 h with g = 2 x, h = 2 (x + 5 x / |x|) = 2 g
    Array([24., 32.], dtype=float32)

  References:
    Yue et al., 2023, Sharpness-aware minimization revisited: weighted
    sharpness as a regularization term, https://arxiv.org/abs/2305.15817
  """
  who = "wsam_perturbation"
  _check_family_args(who, eps=eps, axis_name=axis_name,
                     norm_axis_name=norm_axis_name, gamma=(gamma, 1.0))
  ascent = _sam_ascent(adaptive=adaptive, eta=0.0, eps=eps,
                       norm_axis_name=norm_axis_name)

  def combine(grads, perturbed, inner, rho_t):
    del rho_t
    g, h = _common.to_stat(grads), _common.to_stat(perturbed)
    weight_of_g = (1 - 2 * gamma) / (1 - gamma)  # 1 - a
    output = jax.tree.map(lambda gx, hx: hx + weight_of_g * (gx - hx), g, h)
    return output, inner

  return _two_pass(who, rho, axis_name, lambda params: optax.EmptyState(),
                   ascent, norm_axis_name, combine=combine)


class FriendlySAMState(NamedTuple):
  """Friendly-SAM's own statistics (``PerturbationState.inner``).

  Attributes:
    momentum: ``m``, the exponential moving average of clean gradients, one
      parameter-sized buffer in the statistics dtype (float32 for bfloat16
      and float16 leaves). The rule needs it: ``g - sigma m`` is the ascent
      direction.
  """
  momentum: optax.Updates


def friendly_sam_perturbation(
    rho,
    *,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    adaptive: bool = False,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM: ascend along the gradient minus its running mean.

  The full gradient's mean component generalises poorly as an ascent
  direction; Friendly-SAM removes an exponential moving average of past
  gradients from it. With ``t`` counting steps from 0:

  .. math::
    d_t = \begin{cases} g_0 & t = 0\\ g_t - \sigma m_{t-1} & t > 0\end{cases},
    \quad
    m_t = \begin{cases} g_0 & t = 0\\
      \lambda m_{t-1} + (1-\lambda) g_t & t > 0\end{cases},

  ascent point :math:`x + \rho\, d_t/(n(d_t)+\epsilon)` (ASAM's scaling of
  :math:`d_t` with ``adaptive=True``), output :math:`h`, the gradient there.
  State: one parameter-sized buffer, ``m`` (:class:`FriendlySAMState`).

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      ``rho=0`` reproduces the base optimizer exactly. Run-time negatives
      are clamped to 0 (see :func:`sam_perturbation`).
    sigma: ``>= 0``, how much of the running mean to remove.
    lmbda: decay of the running mean, in ``[0, 1)``.
    adaptive: ASAM's scaling of the ascent direction (``T = |x|``).
    eps: ``> 0``, keeps a zero direction finite.
    axis_name: as in :func:`sam_perturbation`.
    norm_axis_name: as in :func:`sam_perturbation`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> tx = samtx.friendly_sam_perturbation(0.5, sigma=1.0, lmbda=0.5)
    >>> params = jnp.array([3.0, 4.0])
    >>> state = tx.init(params)
    >>> _, state = tx.update(jax.grad(loss)(params), state, params,
    ...                      grad_fn=jax.grad(loss))
    >>> state.inner.momentum  # m = g on the first step
    Array([6., 8.], dtype=float32)

  References:
    Li et al., 2024, Friendly sharpness-aware minimization, CVPR 2024,
    https://arxiv.org/abs/2403.12350
  """
  who = "friendly_sam_perturbation"
  _check_family_args(who, eps=eps, axis_name=axis_name,
                     norm_axis_name=norm_axis_name, sigma=(sigma, None),
                     lmbda=(lmbda, 1.0))

  def direction_of(grads, inner, count):
    # m starts at 0, so d = g - sigma * 0 = g exactly on the first step; a
    # zero decay there makes m = g.
    direction = jax.tree.map(
        lambda g, m: g - (sigma * m).astype(g.dtype), grads, inner.momentum)
    # ``m + 0 d`` (= m for finite d) makes the in-place update of a donated
    # m wait for the read that builds d; with two unordered readers XLA:CPU
    # copies every m leaf each step instead.
    momentum = jax.tree.map(lambda m, d: m + 0 * d, inner.momentum, direction)
    decay = jnp.where(count == 0, 0.0, lmbda)
    return direction, FriendlySAMState(
        momentum=_common.ema(momentum, grads, decay))

  ascent = _sam_ascent(adaptive=adaptive, eta=0.0, eps=eps,
                       norm_axis_name=norm_axis_name,
                       direction_of=direction_of)
  return _two_pass(
      who, rho, axis_name,
      lambda params: FriendlySAMState(
          momentum=_common.full_like_stat(params, 0.0)),
      ascent, norm_axis_name)


class LookSAMState(NamedTuple):
  """LookSAM's own statistics (``PerturbationState.inner``).

  Attributes:
    g_v: the part of SAM's gradient orthogonal to ``g``, stored on the steps
      that take the second gradient and reused in between: one
      parameter-sized buffer in the statistics dtype.
    g_v_norm: ``n(g_v)``, a scalar kept so reusing steps need no reduction
      over ``g_v``.
  """
  g_v: optax.Updates
  g_v_norm: jax.Array


def _check_positive_int(name, value, who):
  """An integer ``>= 1`` (or a traced value, as inject_hyperparams passes)."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    arr = np.asarray(value)
  except Exception as err:  # pragma: no cover - exotic array types
    raise TypeError(f"{who}: {name} must be a positive int, got {value!r}."
                    ) from err
  if (isinstance(value, (bool, np.bool_)) or arr.ndim != 0
      or not np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"{who}: {name} must be a positive int, got {value!r}.")
  if int(arr) < 1:
    raise ValueError(f"{who}: {name} must be >= 1, got {value!r}.")


def looksam_perturbation(
    rho,
    *,
    k: int = 5,
    alpha: float = 0.7,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: SAM's second gradient only every ``k``-th step.

  On steps with ``count % k == 0``, :math:`h` is the gradient at SAM's
  ascent point and the part of it orthogonal to :math:`g` is stored:

  .. math::
    \cos = \frac{\langle g, h\rangle}{n(g)\, n(h) + \epsilon},\quad
    g_v = h - n(h) \cos \frac{g}{n(g) + \epsilon},\quad
    \text{output} = h.

  On the other steps ``grad_fn`` is not evaluated (the second pass sits in
  a loop that the compiled step runs once or not at all) and the stored
  direction is added, rescaled to the current gradient:

  .. math::
    \text{output} = g + \alpha \frac{n(g)}{n(g_v) + \epsilon}\, g_v.

  A step costs about ``1 + 1/k`` gradient evaluations on average.

  Choosing ``alpha``: the reused term always has length ``alpha n(g)``,
  while SAM's own orthogonal part ``n(g_v)`` grows with ``rho``. Set
  ``alpha`` near SAM's ``n(g_v)/n(g)`` at your ``rho`` (``k=1`` is SAM and
  stores ``g_v`` every step, so it measures it), not at 0.7 by default: on
  an MLP on digits at ``rho = 0.05`` that ratio is 0.08-0.31, LookSAM with
  ``k=5, alpha=0.1`` trains like SAM (train loss 0.010 against 0.007) and
  ``alpha=0.7`` underfits (0.112; ``benchmarks/looksam_settings.py``).
  Tune ``rho`` as for SAM; ``k=5`` is a good default. The rule is the
  paper's Algorithm 1 with global norms; pytorch_optimizer's ``LookSAM``
  uses per-tensor norms (identical on a one-tensor model, and alike in
  training).

  With ``rho = 0``, ``g_v`` would be rounding noise rescaled to ``n(g)``; it is
  taken to be exactly 0, so the base optimizer is reproduced. State: one
  parameter-sized buffer ``g_v`` and its norm (:class:`LookSAMState`);
  ``perturbation_norm`` reports the last perturbation actually evaluated.
  That loop (a ``jax.lax.while_loop``, which keeps ``g`` and the state in
  place on reusing steps) supports ``jax.jvp`` and ``jax.vmap`` through
  ``update`` but not reverse-mode ``jax.grad``, which JAX refuses with an
  error.

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      Run-time negatives are clamped to 0 (see :func:`sam_perturbation`).
    k: take the second gradient every ``k`` steps, an int ``>= 1``
      (``k=1`` is SAM).
    alpha: ``>= 0``, the weight of the reused direction (see above: near
      SAM's ``n(g_v)/n(g)``, e.g. 0.1, rather than the default 0.7).
    eps: ``> 0``, keeps a zero gradient finite.
    axis_name: as in :func:`gsam_perturbation` (the output of both kinds of
      step is averaged). The stored ``g_v`` is the average of the devices'
      ``g_v`` and ``g_v_norm`` its norm, so the state stays replicated; the
      reported ``perturbation_norm`` is the devices' average.
    norm_axis_name: as in :func:`sam_perturbation`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: p[0] ** 2 + 2 * p[1] ** 2 + p[0] * p[1]
    >>> tx = samtx.looksam_perturbation(0.5, k=2, alpha=1.0)
    >>> params = jnp.array([1.0, 0.0])
    >>> state = tx.init(params)
    >>> grad = jax.grad(loss)
    >>> h, state = tx.update(grad(params), state, params, grad_fn=grad)
    >>> state.inner.g_v.round(4)  # the part of h orthogonal to g = (2, 1)
    Array([-0.313 ,  0.6261], dtype=float32)
    >>> out, state = tx.update(grad(params), state, params, grad_fn=grad)
    >>> out.round(4)  # g + n(g) g_v / n(g_v), no grad_fn call
    Array([1., 3.], dtype=float32)

  References:
    Liu et al., 2022, Towards efficient and scalable sharpness-aware
    minimization, https://arxiv.org/abs/2203.02714
  """
  who = "looksam_perturbation"
  _check_positive_int("k", k, who)
  _check_family_args(who, eps=eps, axis_name=axis_name,
                     norm_axis_name=norm_axis_name, alpha=(alpha, None))
  ascent = _sam_ascent(adaptive=False, eta=0.0, eps=eps,
                       norm_axis_name=norm_axis_name)

  def init_inner(params):
    return LookSAMState(
        g_v=_common.full_like_stat(params, 0.0),
        g_v_norm=jnp.zeros([], _common.tree_stat_dtype(params)))

  def combine(grads, perturbed, inner, rho_t):
    del inner
    g, h = _common.to_stat(grads), _common.to_stat(perturbed)
    g_norm, h_norm, cos = _norms_and_cosine(g, h, eps, norm_axis_name)
    keep = _only_when_perturbed(rho_t, jnp.ones([], g_norm.dtype))
    along_g = keep * h_norm * cos / (g_norm + eps)
    g_v = jax.tree.map(lambda gx, hx: keep * hx - along_g * gx, g, h)
    if axis_name is not None:
      # One direction for all devices, and the norm of that direction: the
      # reuse rule assumes n(g_v) is the length of the g_v it adds.
      g_v = _common.pmean_varying(g_v, axis_name)
    return perturbed, LookSAMState(
        g_v=g_v, g_v_norm=_common.global_norm(g_v, g_norm.dtype,
                                              norm_axis_name))

  def reuse(grads, inner, rho_t):
    del rho_t
    g = _common.to_stat(grads)
    g_norm = _common.global_norm(g, inner.g_v_norm.dtype, norm_axis_name)
    return alpha * g_norm / (inner.g_v_norm + eps), inner.g_v

  return _two_pass(who, rho, axis_name, init_inner, ascent, norm_axis_name,
                   combine=combine, reuse=reuse, every=k)


# ----------------------------------------------------------------------------
# FGSAM: the ascent from one loss, the second gradient from another
# ----------------------------------------------------------------------------


def _check_bool(name, value, who):
  """A flag that switches structure: a Python bool, never an array."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{who}: {name} must be a bool, got {value!r}.")


def _check_fgsam_args(who, *, lam, **family_args):
  """The family's checks, and ``lam`` in ``[0, 1]`` (both ends allowed)."""
  _check_family_args(who, **family_args)
  _common.check_scalar("lam", lam, low=0.0, high=1.0, who=who)


def fgsam_perturbation(
    rho,
    *,
    lam: float = 0.5,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""FGSAM: ascend along one loss, take the second gradient of another.

  Two losses share the weights :math:`x`: the graph network's
  :math:`L_G` (message passing on), whose gradient :math:`g` is the one
  passed to ``update``, and its peer MLP's :math:`L_X` (the same layers with
  message passing off, far cheaper), which ``grad_fn`` differentiates:

  .. math::
    e = \rho\, \frac{g}{n(g) + \epsilon},\qquad
    h = \nabla L_X(x + e),\qquad
    \text{output} = \lambda\, h + (1 - \lambda)\, g .

  The sharpness is measured on the peer MLP (one cheap pass at the
  perturbed point) and the ``(1 - lam) g`` term re-injects the graph
  topology at no extra cost. A step costs one graph-network pass plus one
  MLP pass, against SAM's two graph-network passes.

  ``rho = 0`` switches the peer term off with the perturbation: the output
  is ``g`` exactly, so the base optimizer is reproduced bit for bit, as with
  every samtx perturbation (the paper's rule tends to
  ``lam grad L_X(x) + (1 - lam) g`` as ``rho -> 0+``; it is discontinuous at
  0 by this convention). No parameter-sized state.

  With ``grad_fn`` the gradient of the *same* loss as ``g``, this is WSAM's
  coupled form with weight ``lam`` on ``h`` (``lam = 1`` is SAM).

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
    lam: weight of the peer gradient ``h``, in ``[0, 1]`` (``lam = 0`` is
      the base optimizer on ``g``; ``grad_fn`` is still evaluated).
    eps: ``> 0``, keeps a zero gradient finite.
    axis_name: as in :func:`gsam_perturbation`.
    norm_axis_name: as in :func:`sam_perturbation`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    graph network's gradient and needs the keyword-only
    ``grad_fn(params) -> grads``, the gradient of the peer loss.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> graph_loss = lambda p: jnp.sum(p ** 2)
    >>> peer_loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> tx = samtx.fgsam_perturbation(0.5, lam=0.25)
    >>> params = jnp.array([3.0, 4.0])
    >>> out, state = tx.update(jax.grad(graph_loss)(params), tx.init(params),
    ...                        params, grad_fn=jax.grad(peer_loss))
    >>> out  # 0.25 * 2 (x + e - 1) + 0.75 * 2 x, e = 0.5 x / |x|
    Array([5.65, 7.7 ], dtype=float32)

  References:
    Luo et al., 2024, Fast graph sharpness-aware minimization for enhancing
    and accelerating few-shot node classification, NeurIPS 2024,
    https://arxiv.org/abs/2410.16845
  """
  who = "fgsam_perturbation"
  _check_fgsam_args(who, lam=lam, eps=eps, axis_name=axis_name,
                    norm_axis_name=norm_axis_name)
  ascent = _sam_ascent(adaptive=False, eta=0.0, eps=eps,
                       norm_axis_name=norm_axis_name)

  def combine(grads, perturbed, inner, rho_t):
    g, h = _common.to_stat(grads), _common.to_stat(perturbed)
    perturbed_step = jnp.asarray(rho_t) > 0
    output = jax.tree.map(
        lambda gx, hx: jnp.where(perturbed_step, lam * hx + (1 - lam) * gx,
                                 gx), g, h)
    return output, inner

  return _two_pass(who, rho, axis_name, lambda params: optax.EmptyState(),
                   ascent, norm_axis_name, combine=combine)


def _gradient_of(fn, params, like, who: str, name: str):
  """``fn(params)``, checked to be a gradient tree like ``like``, cast to it."""
  if fn is None:
    raise TypeError(
        f"{who}.update needs the keyword-only argument {name}: a function"
        " params -> grads of the graph network's loss, e.g. update(grads,"
        f" state, params, grad_fn=peer_grad, {name}=graph_grad).")
  if not callable(fn):
    raise TypeError(f"{who}: {name} must be callable, got {fn!r}.")
  out = fn(params)
  expected: Any = jax.tree.structure(like)
  got = jax.tree.structure(out)
  if got != expected:
    raise TypeError(
        f"{who}: {name} must return a tree with the structure of params;"
        f" expected {expected}, got {got}.")
  return _common.cast_like(out, like)


def fgsam_plus_perturbation(
    rho,
    *,
    k: int = 2,
    alpha: float = 0.7,
    lam: float = 0.5,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""FGSAM+: FGSAM every ``k``-th step, the peer MLP alone in between.

  The gradient passed to ``update`` is the peer MLP's, :math:`m = \nabla
  L_X(x)` (message passing off: cheap), on *every* step; the graph network's
  gradient comes from the keyword-only ``graph_grad_fn``, which only the
  FGSAM steps call. On steps with ``count % k == 0``, with
  :math:`g_G` = ``graph_grad_fn(x)`` and :math:`h` = ``grad_fn(x + e)``:

  .. math::
    e = \rho\,\frac{g_G}{n(g_G) + \epsilon},\quad
    g_s = \lambda h + (1-\lambda)\, g_G,\quad
    g_v = g_s - n(g_s)\cos(m, g_s)\,\frac{m}{n(m) + \epsilon},\quad
    \text{output} = g_s,

  storing :math:`g_v`, the part of FGSAM's gradient orthogonal to the MLP's
  (the graph topology and the sharpness that the MLP gradient misses). On
  the other steps neither ``graph_grad_fn`` nor ``grad_fn`` is evaluated
  (LookSAM's loop, see :func:`looksam_perturbation`):

  .. math::
    \text{output} = m + \alpha\,\frac{n(m)}{n(g_v) + \epsilon}\, g_v .

  So ``k - 1`` steps in ``k`` cost one MLP gradient, and the FGSAM step one
  graph-network gradient and two MLP gradients: FGSAM+ can be cheaper per
  step than the base optimizer on the graph network. Norms are global
  (samtx's LookSAM convention); the official code uses per-tensor norms.
  ``rho = 0`` reproduces the base optimizer on the given (MLP) gradient
  exactly (``g_v`` is then 0). State: one parameter-sized buffer ``g_v`` and
  its norm (:class:`LookSAMState`).

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count
      (the official code's FGSAM+ default is 0.1).
    k: an FGSAM step every ``k`` steps, an int ``>= 1`` (``k=1``: FGSAM on
      every step, with the MLP gradient only used to build ``g_v``).
    alpha: ``>= 0``, the weight of the reused direction.
    lam: weight of the peer gradient at the perturbed point, in ``[0, 1]``.
    eps: ``> 0``, keeps a zero gradient finite.
    axis_name: as in :func:`looksam_perturbation`.
    norm_axis_name: as in :func:`sam_perturbation`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    peer MLP's gradient and needs the keyword-only ``grad_fn`` (the peer
    MLP's gradient function) and ``graph_grad_fn`` (the graph network's).

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> graph_loss = lambda p: jnp.sum(p ** 2) + p[0] * p[1]
    >>> peer_loss = lambda p: jnp.sum(p ** 2)
    >>> mlp, graph = jax.grad(peer_loss), jax.grad(graph_loss)
    >>> tx = samtx.fgsam_plus_perturbation(0.1, k=2, alpha=1.0, lam=0.5)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> out, state = tx.update(mlp(params), state, params, grad_fn=mlp,
    ...                        graph_grad_fn=graph)
    >>> [round(float(v), 4) for v in state.inner.g_v]  # orthogonal to m
    [0.6187, -0.3094]
    >>> out, state = tx.update(mlp(params), state, params, grad_fn=mlp,
    ...                        graph_grad_fn=graph)
    >>> out.round(4)  # m + n(m) g_v / n(g_v), m = (2, 4): no graph gradient
    Array([6., 2.], dtype=float32)

  References:
    Luo et al., 2024, Fast graph sharpness-aware minimization for enhancing
    and accelerating few-shot node classification, NeurIPS 2024,
    https://arxiv.org/abs/2410.16845
  """
  who = "fgsam_plus_perturbation"
  _check_positive_int("k", k, who)
  _check_fgsam_args(who, lam=lam, eps=eps, axis_name=axis_name,
                    norm_axis_name=norm_axis_name, alpha=(alpha, None))
  sam_ascent = _sam_ascent(adaptive=False, eta=0.0, eps=eps,
                           norm_axis_name=norm_axis_name)

  def init_inner(params):
    return LookSAMState(
        g_v=_common.full_like_stat(params, 0.0),
        g_v_norm=jnp.zeros([], _common.tree_stat_dtype(params)))

  def reuse(grads, inner, rho_t):
    del rho_t
    m = _common.to_stat(grads)
    m_norm = _common.global_norm(m, inner.g_v_norm.dtype, norm_axis_name)
    return alpha * m_norm / (inner.g_v_norm + eps), inner.g_v

  def transform(graph_grad_fn):
    """The rule with this step's ``graph_grad_fn`` (an extra argument, so
    the rules are built per call, as optax.inject_hyperparams builds its
    inner transform)."""
    def ascent(grads, inner, params, rho_t, count):
      g_graph = _common.to_stat(_gradient_of(graph_grad_fn, params, grads,
                                             who, "graph_grad_fn"))
      perturbation, norm, _ = sam_ascent(g_graph, inner, params, rho_t, count)
      # combine() needs g_G too: it rides in the g_v slot, which combine
      # overwrites with the real g_v.
      return perturbation, norm, inner._replace(g_v=g_graph)

    def combine(grads, perturbed, inner, rho_t):
      m, g_graph = _common.to_stat(grads), inner.g_v
      h = _common.to_stat(perturbed)
      keep = _only_when_perturbed(rho_t, jnp.ones([], inner.g_v_norm.dtype))
      g_s = jax.tree.map(
          lambda mx, gx, hx: jnp.where(keep > 0, lam * hx + (1 - lam) * gx,
                                       mx), m, g_graph, h)
      m_norm, s_norm, cos = _norms_and_cosine(m, g_s, eps, norm_axis_name)
      along_m = keep * s_norm * cos / (m_norm + eps)
      g_v = jax.tree.map(lambda sx, mx: keep * sx - along_m * mx, g_s, m)
      if axis_name is not None:
        g_v = jax.lax.pmean(g_v, axis_name)
      return g_s, LookSAMState(
          g_v=g_v, g_v_norm=_common.global_norm(g_v, m_norm.dtype,
                                                norm_axis_name))

    return _two_pass(who, rho, axis_name, init_inner, ascent, norm_axis_name,
                     combine=combine, reuse=reuse, every=k)

  def update_fn(updates, state, params=None, *, grad_fn=None,
                graph_grad_fn=None, **extra_args):
    return transform(graph_grad_fn).update(updates, state, params,
                                           grad_fn=grad_fn, **extra_args)

  return optax.GradientTransformationExtraArgs(transform(None).init,
                                               update_fn)
