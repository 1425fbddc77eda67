"""Two-pass (ascent) perturbations: SAM, ASAM and LightSAM.

Each transform sits first in an ``optax.chain``. Its ``update`` receives the
gradient ``g`` at ``params``, builds a perturbation ``e``, calls the
keyword-only ``grad_fn(params + e)`` exactly once and passes that perturbed
gradient downstream. No copy of the parameters is kept between steps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from samtx import _common
from samtx import moments

__all__ = [
    "PerturbationState",
    "sam_perturbation",
    "lightsam_perturbation",
]


class PerturbationState(NamedTuple):
  """State of a two-pass perturbation.

  Attributes:
    count: number of updates taken so far (int32 scalar; drives ``rho``
      schedules).
    perturbation_norm: global L2 norm of the last perturbation ``e``
      (a scalar metric, 0 before the first step).
    inner: the ascent rule's own statistics (``optax.EmptyState`` for SAM and
      ASAM; the preconditioner state for LightSAM).
  """
  count: jax.Array
  perturbation_norm: jax.Array
  inner: Any


# ascent(grads, inner_state, params, rho_t) -> (perturbation, norm, inner_state)
AscentRule = Callable[[Any, Any, Any, Any], tuple]


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
        " optax.masked(optax.set_to_zero(), frozen), optax.sgd(lr)).")


def check_axis_arguments(who: str, axis_name, norm_axis_name) -> None:
  """Validates the data axis and the model axes of a perturbation."""
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"{who}: axis_name must be a str or None, got {axis_name!r}.")
  _common.check_axis_names("norm_axis_name", norm_axis_name, who)


def _two_pass(
    who: str,
    rho,
    axis_name: Optional[str],
    init_inner: Callable[[Any], Any],
    ascent: AscentRule,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a two-pass transform from an ascent rule (shared bookkeeping)."""
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
    rho_t = _common.value_at(rho, state.count)
    perturbation, norm, inner = ascent(updates, state.inner, params, rho_t)
    perturbed = _common.perturbed_gradient(
        grad_fn, params, perturbation, updates, axis_name=axis_name, who=who)
    return perturbed, PerturbationState(
        count=optax.safe_increment(state.count),
        perturbation_norm=jnp.asarray(norm, state.perturbation_norm.dtype),
        inner=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam_perturbation(
    rho,
    *,
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

  Args:
    rho: radius ``>= 0``, a float or an optax schedule of the step count.
      ``rho=0`` reproduces the base optimizer exactly.
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
  """
  who = "sam_perturbation"
  _common.check_scalar("eta", eta, low=0.0, who=who)
  _common.check_scalar("eps", eps, low=0.0, low_open=True, who=who)

  def ascent(grads, inner, params, rho_t):
    dtype = _common.tree_stat_dtype(grads)
    grads = _common.to_stat(grads)
    if adaptive:
      scales = jax.tree.map(
          lambda x, g: jnp.abs(x.astype(g.dtype)) + eta, params, grads)
      weighted = jax.tree.map(jnp.multiply, scales, grads)
      direction = jax.tree.map(jnp.multiply, scales, weighted)
      denominator = _common.global_norm(weighted, dtype, norm_axis_name)
    else:
      direction = grads
      denominator = _common.global_norm(grads, dtype, norm_axis_name)
    step = rho_t / (denominator + eps)
    perturbation = jax.tree.map(lambda d: d * step, direction)
    # SAM's perturbation norm is known without a second reduction.
    norm = (step * _common.global_norm(direction, dtype, norm_axis_name)
            if adaptive else step * denominator)
    return perturbation, norm, inner

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

  def ascent(grads, inner, params, rho_t):
    del params
    direction, inner = preconditioner.update(grads, inner)
    direction = _common.to_stat(direction)
    perturbation = jax.tree.map(lambda d: d * rho_t, direction)
    norm = rho_t * _common.global_norm(direction, None, norm_axis_name)
    return perturbation, norm, inner

  return _two_pass(who, rho, axis_name, preconditioner.init, ascent,
                   norm_axis_name)
