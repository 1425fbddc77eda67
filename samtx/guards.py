"""Guards that keep a training run alive through non-finite gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from samtx import _common

__all__ = ["apply_if_finite"]


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def apply_if_finite(
    inner: optax.GradientTransformation,
    max_consecutive_errors: int,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips a step whose gradient *or perturbed gradient* is not finite.

  ``optax.apply_if_finite`` inspects only the incoming gradient, so a NaN or
  Inf produced by ``grad_fn`` at the perturbed point (a perturbation that
  steps into an overflow) reaches the inner state unnoticed. This wrapper
  runs the inner update and accepts it only when both the incoming gradient
  and the outgoing updates are finite; otherwise it returns zero updates and
  keeps the previous inner state. After ``max_consecutive_errors`` rejected
  steps in a row it lets the update through, as optax does, so a run that is
  genuinely broken fails loudly instead of stalling.

  The state is ``optax.ApplyIfFiniteState``, so code that reads optax's
  counters (``notfinite_count``, ``last_finite``, ``total_notfinite``) works.

  Args:
    inner: any transform, e.g. ``samtx.sam(...)``.
    max_consecutive_errors: ``>= 0``, rejected steps tolerated in a row.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` forwarding ``grad_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, samtx
    >>> opt = samtx.apply_if_finite(samtx.sam(0.1, 0.05), 5)
    >>> params = jnp.ones(2)
    >>> state = opt.init(params)
    >>> nan_grad_fn = lambda p: p * jnp.nan
    >>> updates, state = opt.update(params, state, params, grad_fn=nan_grad_fn)
    >>> updates, int(state.notfinite_count)
    (Array([0., 0.], dtype=float32), 1)

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412 (the two-pass step
    whose second gradient this guards).
  """
  _common.check_scalar("max_consecutive_errors", max_consecutive_errors,
                       low=0.0, who="apply_if_finite")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(
        updates, state.inner_state, params, **extra_args)
    finite = jnp.logical_and(_all_finite(updates), _all_finite(new_updates))
    notfinite_count = jnp.where(
        finite, jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count))
    accept = jnp.logical_or(finite, notfinite_count > max_consecutive_errors)
    select = lambda new, old: jnp.where(accept, new, old)
    return (
        jax.tree.map(lambda u: jnp.where(accept, u, jnp.zeros_like(u)),
                     new_updates),
        optax.ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=finite,
            total_notfinite=jnp.where(
                finite, state.total_notfinite,
                optax.safe_increment(state.total_notfinite)),
            inner_state=jax.tree.map(select, new_inner, state.inner_state)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
