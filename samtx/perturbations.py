"""Two-pass (ascent) perturbations: SAM, ASAM, LightSAM and the wider family.

Each transform sits first in an ``optax.chain``. Its ``update`` receives the
gradient ``g`` at ``params``, builds a perturbation ``e``, calls the
keyword-only ``grad_fn(params + e)`` exactly once and passes that perturbed
gradient ``h`` -- or, for GSAM, WSAM and LookSAM, a combination of ``g`` and
``h`` -- downstream. LookSAM calls ``grad_fn`` only every ``k``-th step, and no
transform calls it on steps where ``rho`` is 0. No copy of the parameters is
kept between steps; Friendly-SAM and LookSAM keep the one parameter-sized
buffer their rule needs. FGSAM builds ``e`` from the
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
    at_rho_zero: Optional[Callable[[Any], Any]] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a two-pass transform from its rules (the shared bookkeeping).

  Every step runs ``ascent`` on the clean gradient ``g``, evaluates
  ``h = grad_fn(params + e)`` (the only call of ``grad_fn``, through
  :func:`samtx._common.perturbed_gradient`) and returns
  ``combine(g, h, inner, rho_t)``. With ``every`` (a positive integer) and
  ``reuse``, only steps with ``count % every == 0`` take the second pass; the
  others return ``g + c d`` with ``(c, d) = reuse(g, inner, rho_t)``, and the
  compiled step really skips ``grad_fn`` (LookSAM: the second pass runs in a
  loop that runs once or never, :func:`_once_or_never`).

  **No second pass at rho = 0.** A step with ``rho_t == 0`` does not
  evaluate ``grad_fn``: it takes ``h = g`` (what ``grad_fn`` returns at
  ``params + 0`` when it is the gradient of the loss that gave ``g``), so
  the output is ``g`` itself, the reported perturbation norm is 0, and the
  rule's state is what ``at_rho_zero(inner)`` gives (LookSAM's zero
  ``g_v``), or by default what ``ascent`` leaves when it runs on ``g``
  (LightSAM's accumulators, Friendly-SAM's running mean). ``combine`` is
  therefore only called where ``rho_t > 0``. A ``rho`` that is a number
  compiles to one kind of step, with no branch: the plain step, or at 0 the
  base optimizer's (``grad_fn`` is checked, not called). A schedule or a
  traced value (``optax.inject_hyperparams``) branches in once-or-never
  loops, one for the second pass and one for the state at ``rho_t == 0``
  (left out when the rule has no state of its own), so neither kind of step
  computes the other's work.

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

    # Both passes map the carry (g, norm, inner) of the loop they may run in
    # to the step's (output, norm, inner), reading g and the rule's state
    # from it, not from outside: inside a loop it is the carried buffer.
    def second_pass(values):
      grads, _, inner = values
      perturbation, norm, inner = ascent(grads, inner, params, rho_t,
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
      norm = jnp.asarray(norm, norm_dtype)
      if reuse is not None and axis_name is not None:
        # Reusing steps carry the replicated norm of the state through.
        norm = _common.pmean_varying(norm, axis_name)
      return (_common.cast_like(output, grads), norm,
              _common.cast_like(inner, state.inner))

    def rho_zero_pass(values):
      grads, _, inner = values
      if at_rho_zero is None:
        _, _, inner = ascent(grads, inner, params, rho_t, state.count)
      else:
        inner = at_rho_zero(inner)
      return (grads, jnp.zeros([], norm_dtype),
              _common.cast_like(inner, state.inner))

    if reuse is None:
      take_second_pass = True
      values = (updates, jnp.zeros([], norm_dtype), state.inner)
    else:
      take_second_pass = state.count % every == 0
      values = (updates, state.perturbation_norm, state.inner)
    scheduled = not _common.is_known_at_trace_time(rho)
    if _common.is_static_zero(rho):
      _common.check_grad_fn(grad_fn, who)
      output, norm, inner = rho_zero_pass(values)
    elif reuse is None and not scheduled:
      output, norm, inner = second_pass(values)
    else:
      rho_is_zero = jnp.asarray(rho_t) == 0
      values = _once_or_never(
          jnp.logical_and(take_second_pass, jnp.logical_not(rho_is_zero))
          if scheduled else take_second_pass,
          second_pass, values, recorder=_common.value_recorder(grad_fn))
      # A rule without state of its own, whose loop starts from a zero norm,
      # already holds what a rho = 0 step gives: (g, 0, state).
      if scheduled and (reuse is not None or jax.tree.leaves(state.inner)):
        values = _once_or_never(jnp.logical_and(take_second_pass, rho_is_zero),
                                rho_zero_pass, values)
      output, norm, inner = values
      if reuse is not None:
        output = _reused_between(take_second_pass, output, inner, reuse, rho_t)
    if axis_name is not None:
      output = _common.pmean_varying(output, axis_name)
    return output, PerturbationState(
        count=optax.safe_increment(state.count), perturbation_norm=norm,
        inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _reused_between(take_second_pass, output, inner, reuse, rho_t):
  """``output`` on second-pass steps, else ``g + c d``, ``(c, d) = reuse(...)``.

  On a reusing step the loops left ``g`` and the old state in place, and
  ``g + c d`` is formed here, after them, where XLA fuses it into the
  downstream update; it is computed from the loops' outputs, so nothing the
  loops carry is read again after them.
  """
  coefficient, direction = reuse(output, inner, rho_t)
  return jax.tree.map(
      lambda out, d: jnp.where(
          take_second_pass, out,
          (out.astype(d.dtype) + coefficient * d).astype(out.dtype)),
      output, direction)


def _once_or_never(run, body, initial, *, recorder=None):
  """``body(initial)`` if ``run`` else ``initial``, without copying ``initial``.

  A ``jax.lax.while_loop`` whose body runs once or not at all, not a
  ``jax.lax.cond``: a loop updates its carried buffers in place, so when the
  body does not run (LookSAM's reusing steps, rho = 0 steps) ``g`` and the
  state pass through untouched. A cond instead writes its result out from
  its branch and the update reads it back, or, if the branch only passes
  ``g`` and the state through, copies them (XLA:CPU, jax 0.10): a LookSAM
  reusing step then costs 1.08-1.10x the base optimizer's step, against
  1.02-1.06x with the loop (paired runs of ``benchmarks/two_pass.py``).
  ``body`` must read everything it overwrites from its argument (the
  carry), not from outside the loop, or XLA copies those buffers to keep
  the outside value alive. The flag varies where ``run`` does (e.g. a
  per-device step count inside ``shard_map``).

  A value that ``grad_fn`` records (``recorder``, see
  :func:`samtx._common.value_recorder`: ``samtx.flax``'s perturbed loss)
  belongs to the body's trace: the loop carries it out (zeros where the body
  does not run) and it is recorded again after the loop, with ``run`` as
  the flag saying whether it was computed.
  """
  first = None
  if recorder is not None:
    loop_body = body
    body = lambda carry: (loop_body(carry[0]), recorder.latest())
    first = jax.eval_shape(body, (initial, None))
    initial = (initial, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                     first[1]))
  varying = _carry_typing(body, initial, first)
  run = jnp.asarray(run)
  done = _vary_over(jnp.zeros([], bool), _common.varying_axes(run))
  _, values = jax.lax.while_loop(
      lambda carry: carry[0],
      lambda carry: (done, _vary_over(body(carry[1]), varying)),
      (run, _vary_over(initial, varying)))
  if recorder is None:
    return values
  values, recorded = values
  recorder.record(recorded, taken=run)
  return values


def _carry_typing(body, initial, first=None):
  """The mesh axes each leaf of a loop's carry must vary over.

  Inside ``shard_map`` the body's results may vary over more axes than
  ``initial`` (local ``g`` and ``h`` against a replicated state): the carry
  takes the union of both, and the body, which reads the carry, is typed
  again with that carry until nothing changes (the sets only grow, and the
  mesh has finitely many axes). ``first`` is ``body``'s output shapes on
  ``initial`` where already known. Outside ``shard_map`` every set is empty.
  """
  if first is None:
    first = jax.eval_shape(body, initial)
  typed_as = jax.tree.leaves(_union_of_varying(initial, initial))
  varying = _union_of_varying(first, initial)
  while jax.tree.leaves(varying) != typed_as:
    typed_as = jax.tree.leaves(varying)
    typed = jax.eval_shape(lambda: _vary_over(initial, varying))
    varying = _union_of_varying(varying, jax.eval_shape(body, typed))
  return varying


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
      ``rho=0`` reproduces the base optimizer exactly: a step where ``rho``
      is 0 skips the second pass (``grad_fn`` is not evaluated, the output
      is ``g`` and the step costs one gradient), also where a schedule or a
      traced array (what ``optax.inject_hyperparams`` passes) is 0, e.g. a
      schedule that is 0 early in training and ``rho`` late. A negative
      value is rejected at construction; one that only appears at run time
      cannot raise and is clamped, ``rho_t = max(rho_t, 0)``, as in every
      samtx transform taking rho. A number compiles to one kind of step,
      with no branch; a schedule or a traced ``rho`` branches in loops that
      run once or never: ``jax.jvp`` and ``jax.vmap`` go through
      ``update``, reverse-mode ``jax.grad`` does not (JAX refuses it).
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
    >>> params = optax.apply_updates(params, updates)
    >>> for _ in range(40):  # keep training: the loss falls from 25
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"loss {loss(params):.3f}")
    loss 0.000

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
      Run-time negatives are clamped to 0, and a step where ``rho`` is 0
      skips ``grad_fn`` (see :func:`sam_perturbation`); the ascent
      accumulators are still updated from ``g`` there, as at ``rho = 0``.
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
    >>> opt = optax.chain(tx, optax.sgd(0.05))  # then a base optimizer: train
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> state = opt.init(params)
    >>> print(f"loss {loss(params):.3f}")
    loss 25.000
    >>> for _ in range(40):
    ...   params, state = step(params, state)
    >>> print(f"loss {loss(params):.3f}")
    loss 0.004

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
      Run-time negatives are clamped to 0; a step where ``rho`` is 0 skips
      ``grad_fn`` and outputs ``g``, so ``rho=0`` reproduces the base
      optimizer exactly (see :func:`sam_perturbation`).
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
    >>> opt = optax.chain(tx, optax.sgd(0.05))  # then a base optimizer: train
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> state = opt.init(params)
    >>> print(f"loss {loss(params):.3f}")
    loss 1.000
    >>> for _ in range(40):
    ...   params, state = step(params, state)
    >>> print(f"loss {loss(params):.3f}")
    loss 0.009

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
    del rho_t
    along_h = cos * g_norm / (h_norm + eps)
    weight = jnp.asarray(alpha, along_h.dtype)
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
  sharpness more. It is evaluated in the second form, which is ``g`` bit
  for bit where ``h = g``. No parameter-sized state.

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      Run-time negatives are clamped to 0, and a step where ``rho`` is 0
      skips ``grad_fn`` and outputs ``g`` (see :func:`sam_perturbation`).
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
    >>> opt = optax.chain(tx, optax.sgd(0.05))  # then a base optimizer: train
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> state = opt.init(params)
    >>> print(f"loss {loss(params):.3f}")
    loss 25.000
    >>> for _ in range(40):
    ...   params, state = step(params, state)
    >>> print(f"loss {loss(params):.3f}")
    loss 0.635

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
      are clamped to 0, and a step where ``rho`` is 0 skips ``grad_fn``
      (see :func:`sam_perturbation`); ``m`` is still updated from ``g``
      there.
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
    >>> opt = optax.chain(tx, optax.sgd(0.05))  # then a base optimizer: train
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   return optax.apply_updates(params, updates), state
    >>> state = opt.init(params)
    >>> print(f"loss {loss(params):.3f}")
    loss 25.000
    >>> for _ in range(40):
    ...   params, state = step(params, state)
    >>> print(f"loss {loss(params):.3f}")
    loss 0.319

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

  With ``rho = 0``, ``g_v`` would be rounding noise rescaled to ``n(g)``; a
  step at ``rho = 0`` skips ``grad_fn`` and stores exactly 0, so the base
  optimizer is reproduced. State: one
  parameter-sized buffer ``g_v`` and its norm (:class:`LookSAMState`);
  ``perturbation_norm`` reports the last perturbation actually evaluated.
  That loop (a ``jax.lax.while_loop``, which keeps ``g`` and the state in
  place on reusing steps) supports ``jax.jvp`` and ``jax.vmap`` through
  ``update`` but not reverse-mode ``jax.grad``, which JAX refuses with an
  error.

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      Run-time negatives are clamped to 0. A ``k``-th step where ``rho`` is
      0 skips ``grad_fn`` too (see :func:`sam_perturbation`): it returns
      ``g`` and stores ``g_v = 0``.
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
    >>> opt = optax.chain(tx, optax.sgd(0.05))  # then a base optimizer: train
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(grad(params), state, params, grad_fn=grad)
    ...   return optax.apply_updates(params, updates), state
    >>> state = opt.init(params)
    >>> print(f"loss {loss(params):.3f}")
    loss 1.000
    >>> for _ in range(40):
    ...   params, state = step(params, state)
    >>> print(f"loss {loss(params):.3f}")
    loss 0.008

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

  def combine(grads, perturbed, inner, rho_t):
    del inner, rho_t
    g, h = _common.to_stat(grads), _common.to_stat(perturbed)
    return perturbed, _orthogonal_part(h, g, eps, axis_name, norm_axis_name)

  return _two_pass(who, rho, axis_name, _no_direction_yet, ascent,
                   norm_axis_name, combine=combine,
                   reuse=_reuse_stored(alpha, eps, norm_axis_name), every=k,
                   at_rho_zero=_no_stored_direction)


def _no_direction_yet(params) -> LookSAMState:
  """LookSAM's (and FGSAM+'s) initial state: no stored direction."""
  return LookSAMState(
      g_v=_common.full_like_stat(params, 0.0),
      g_v_norm=jnp.zeros([], _common.tree_stat_dtype(params)))


def _orthogonal_part(full, base, eps, axis_name, norm_axis_name
                     ) -> LookSAMState:
  """The stored direction ``g_v = full - (n(full) cos / n(base)) base``.

  The part of ``full`` orthogonal to ``base`` (LookSAM: ``h`` against ``g``;
  FGSAM+: FGSAM's gradient against the peer's), with its norm. With
  ``axis_name`` it is averaged first: one direction for all devices, and
  the norm of that direction, since the reuse rule assumes ``n(g_v)`` is the
  length of the ``g_v`` it adds.
  """
  base_norm, full_norm, cos = _norms_and_cosine(base, full, eps,
                                                norm_axis_name)
  along_base = full_norm * cos / (base_norm + eps)
  g_v = jax.tree.map(lambda bx, fx: fx - along_base * bx, base, full)
  if axis_name is not None:
    g_v = _common.pmean_varying(g_v, axis_name)
  return LookSAMState(g_v=g_v, g_v_norm=_common.global_norm(
      g_v, base_norm.dtype, norm_axis_name))


def _reuse_stored(alpha, eps, norm_axis_name) -> ReuseRule:
  """The reusing steps' ``(alpha n(g) / n(g_v), g_v)``: ``g + that g_v``."""
  def reuse(grads, inner, rho_t):
    del rho_t
    g = _common.to_stat(grads)
    g_norm = _common.global_norm(g, inner.g_v_norm.dtype, norm_axis_name)
    return alpha * g_norm / (inner.g_v_norm + eps), inner.g_v
  return reuse


def _no_stored_direction(inner: LookSAMState) -> LookSAMState:
  """LookSAM's (and FGSAM+'s) state after a step at ``rho = 0``: ``g_v = 0``.

  With ``h = g`` the part of ``h`` orthogonal to ``g`` is 0 in exact
  arithmetic but rounding noise in floating point, which the reusing steps
  would rescale to ``alpha n(g)``; storing exactly 0 keeps them at ``g``.
  """
  return LookSAMState(g_v=jax.tree.map(jnp.zeros_like, inner.g_v),
                      g_v_norm=jnp.zeros_like(inner.g_v_norm))


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

  ``rho = 0`` switches the peer term off with the perturbation: the step
  skips ``grad_fn`` and the output is ``g`` exactly, so the base optimizer
  is reproduced bit for bit, as with every samtx perturbation (also where a
  schedule or an injected ``rho`` is 0; the paper's rule tends to
  ``lam grad L_X(x) + (1 - lam) g`` as ``rho -> 0+``; it is discontinuous at
  0 by this convention). No parameter-sized state.

  With ``grad_fn`` the gradient of the *same* loss as ``g``, this is WSAM's
  coupled form with weight ``lam`` on ``h`` (``lam = 1`` is SAM).

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      Run-time negatives are clamped to 0 (see :func:`sam_perturbation`).
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
    >>> opt = optax.chain(tx, optax.sgd(0.05))  # then a base optimizer: train
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(jax.grad(graph_loss)(params), state, params,
    ...                               grad_fn=jax.grad(peer_loss))
    ...   return optax.apply_updates(params, updates), state
    >>> state = opt.init(params)
    >>> print(f"loss {graph_loss(params):.3f}")
    loss 25.000
    >>> for _ in range(40):
    ...   params, state = step(params, state)
    >>> print(f"loss {graph_loss(params):.3f}")
    loss 0.089

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
    del rho_t  # > 0 here: a step at rho = 0 outputs g without grad_fn
    g, h = _common.to_stat(grads), _common.to_stat(perturbed)
    output = jax.tree.map(lambda gx, hx: lam * hx + (1 - lam) * gx, g, h)
    return output, inner

  return _two_pass(who, rho, axis_name, lambda params: optax.EmptyState(),
                   ascent, norm_axis_name, combine=combine)


def _check_gradient_fn(fn, who: str, name: str) -> None:
  """Raises unless ``fn`` (an extra gradient function) is given, callable."""
  if fn is None:
    raise TypeError(
        f"{who}.update needs the keyword-only argument {name}: a function"
        " params -> grads of the graph network's loss, e.g. update(grads,"
        f" state, params, grad_fn=peer_grad, {name}=graph_grad).")
  if not callable(fn):
    raise TypeError(f"{who}: {name} must be callable, got {fn!r}.")


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
  exactly: a step at ``rho = 0`` evaluates neither ``graph_grad_fn`` nor
  ``grad_fn`` and stores ``g_v = 0``. State: one parameter-sized buffer
  ``g_v`` and its norm (:class:`LookSAMState`).

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count
      (the official code's FGSAM+ default is 0.1). Run-time negatives are
      clamped to 0 (see :func:`sam_perturbation`).
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
    >>> opt = optax.chain(tx, optax.sgd(0.05))  # then a base optimizer: train
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = opt.update(mlp(params), state, params,
    ...                               grad_fn=mlp, graph_grad_fn=graph)
    ...   return optax.apply_updates(params, updates), state
    >>> state = opt.init(params)
    >>> print(f"loss {graph_loss(params):.3f}")
    loss 7.000
    >>> for _ in range(40):
    ...   params, state = step(params, state)
    >>> print(f"loss {graph_loss(params):.3f}")
    loss 0.000

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

  reuse = _reuse_stored(alpha, eps, norm_axis_name)  # m plays g's part

  def transform(graph_grad_fn):
    """The rule with this step's ``graph_grad_fn`` (an extra argument, so
    the rules are built per call, as optax.inject_hyperparams builds its
    inner transform)."""
    def ascent(grads, inner, params, rho_t, count):
      g_graph = _common.to_stat(_common.gradient_like(
          graph_grad_fn(params), grads, who, "graph_grad_fn"))
      perturbation, norm, _ = sam_ascent(g_graph, inner, params, rho_t, count)
      # combine() needs g_G too: it rides in the g_v slot, which combine
      # overwrites with the real g_v.
      return perturbation, norm, inner._replace(g_v=g_graph)

    def combine(grads, perturbed, inner, rho_t):
      del rho_t  # > 0 here: a step at rho = 0 stores g_v = 0 instead
      m, g_graph = _common.to_stat(grads), inner.g_v
      h = _common.to_stat(perturbed)
      g_s = jax.tree.map(lambda gx, hx: lam * hx + (1 - lam) * gx, g_graph, h)
      return g_s, _orthogonal_part(g_s, m, eps, axis_name, norm_axis_name)

    return _two_pass(who, rho, axis_name, _no_direction_yet, ascent,
                     norm_axis_name,
                     combine=combine, reuse=reuse, every=k,
                     at_rho_zero=_no_stored_direction)

  def update_fn(updates, state, params=None, *, grad_fn=None,
                graph_grad_fn=None, **extra_args):
    # Checked here, not where it is called: a step at rho = 0 never is.
    _check_gradient_fn(graph_grad_fn, who, "graph_grad_fn")
    return transform(graph_grad_fn).update(updates, state, params,
                                           grad_fn=grad_fn, **extra_args)

  return optax.GradientTransformationExtraArgs(transform(None).init,
                                               update_fn)
