"""One-pass momentum perturbation (MSAM) and :func:`unperturb`.

MSAM takes one gradient per step. The parameters the user holds live at the
perturbed point ``x~ = x - rho v / (||v|| + 1e-12)``, where ``v`` is the SGD
momentum; each update removes the old perturbation, takes the SGD step and
adds the new one. The momentum is read from the base optimizer's own state,
so MSAM keeps no parameter-sized buffer beyond it, only two scalars.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samtx import _common

__all__ = ["MSAMState", "msam", "unperturb"]

# MSAM normalises the momentum with a fixed epsilon (Becker et al., Alg. 1).
_MSAM_NORM_EPS = 1e-12


class MSAMState(NamedTuple):
  """State of :func:`msam`.

  Attributes:
    count: number of updates taken (int32 scalar; drives ``rho`` schedules).
    scale: ``c = rho / (||v|| + 1e-12)`` of the perturbation the held
      parameters carry now (0 before the first step): they sit at
      ``x - c v``. Storing ``c`` rather than ``rho`` lets :func:`unperturb`
      remove the perturbation exactly, even when ``rho`` is scheduled, and
      lets the update avoid re-reading the old momentum.
    base_state: the SGD-with-momentum state; its ``optax.TraceState.trace``
      is the momentum ``v`` that defines the perturbation.
  """
  count: jax.Array
  scale: jax.Array
  base_state: Any


def _momentum_of(base_state) -> Any:
  """The momentum tree stored in the base optimizer's ``TraceState``."""
  traces = [s for s in jax.tree.leaves(
      base_state, is_leaf=lambda s: isinstance(s, optax.TraceState))
            if isinstance(s, optax.TraceState)]
  if len(traces) != 1:
    raise ValueError(
        "MSAM needs exactly one optax.TraceState (the momentum) in its base"
        f" optimizer's state, found {len(traces)}.")
  return traces[0].trace


def _scale_of(momentum, rho, dtype):
  """``c = rho / (||v|| + 1e-12)``, the scalar that sizes the perturbation."""
  return jnp.asarray(rho / (_common.global_norm(momentum) + _MSAM_NORM_EPS),
                     dtype)


def _scaled(tree, scale, like):
  """``scale * tree`` in statistics precision, cast to the dtypes of ``like``."""
  return jax.tree.map(
      lambda v, ref: (scale * v.astype(_common.stat_dtype(v.dtype))).astype(
          ref.dtype), tree, like)


def msam(
    learning_rate,
    rho,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""MSAM: SGD with momentum, perturbed along the momentum (one pass).

  The held weights are :math:`\tilde x = x - \rho\, v/(\|v\| + 10^{-12})`.
  Given the gradient :math:`g` at :math:`\tilde x`:

  .. math::
    x = \tilde x + \rho\, v/(\|v\|+10^{-12}),\quad v \leftarrow \mu v + g,\quad
    x \leftarrow x - \eta\, v,\quad
    \tilde x \leftarrow x - \rho\, v/(\|v\|+10^{-12})

  (with ``nesterov=True`` the step is :math:`g + \mu v` as in ``optax.sgd``).
  :math:`v = 0` at the start, so :math:`\tilde x = x`. Weight decay chained
  before this transform sees :math:`\tilde x`. Evaluate and export
  :func:`samtx.unperturb` ``(params, state)``, not the held weights.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; ``rho=0`` is exactly
      ``optax.sgd(learning_rate, momentum, nesterov)``.
    momentum: ``mu`` in ``[0, 1)``.
    nesterov: Nesterov momentum.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (one gradient per step, no
    ``grad_fn`` needed).

  Example:
    >>> import jax, jax.numpy as jnp, samtx
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> tx = samtx.msam(0.1, rho=0.05)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = params + updates
    >>> weights = samtx.unperturb(params, state)

  References:
    Becker et al., 2024, Momentum-SAM: Sharpness aware minimization without
    computational overhead, https://arxiv.org/abs/2401.12033
  """
  who = "msam"
  _common.check_scalar("learning_rate", learning_rate, low=0.0,
                       allow_schedule=True, who=who)
  _common.check_scalar("rho", rho, low=0.0, allow_schedule=True, who=who)
  _common.check_scalar("momentum", momentum, low=0.0, high=1.0,
                       high_open=True, who=who)
  base = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)

  # With a static momentum mu >= 0.5 (the usual 0.9 regime) the old momentum
  # is rebuilt from the new one, v_old = (v_new - g) / mu (optax.trace computes
  # v_new = g + mu v_old, with or without Nesterov). Reading v_old itself would
  # keep the donated buffer alive past the write of v_new and make XLA copy
  # the whole momentum. The rebuild amplifies rounding by 1/mu, so a small or
  # traced mu reads v_old instead.
  rebuild_old_momentum = (isinstance(momentum, (int, float))
                          and not isinstance(momentum, bool) and momentum >= 0.5)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    base_state = base.init(params)
    # sgd(momentum=0) would drop its trace; the momentum is needed regardless.
    _momentum_of(base_state)
    return MSAMState(
        count=jnp.zeros([], jnp.int32),
        scale=jnp.zeros([], _common.tree_stat_dtype(params)),
        base_state=base_state)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _common.check_float_leaves(updates, who)
    step, base_state = base.update(updates, state.base_state, params)
    new_momentum = _momentum_of(base_state)
    new_rho = _common.value_at(rho, state.count)
    if _common.is_static_zero(rho):
      # Nothing to undo or redo: return the base step untouched so that XLA
      # compiles exactly the SGD program (same FMA contractions, same bits).
      return step, MSAMState(count=optax.safe_increment(state.count),
                             scale=jnp.zeros_like(state.scale),
                             base_state=base_state)
    new_scale = _scale_of(new_momentum, new_rho, state.scale.dtype)
    if rebuild_old_momentum:
      old_momentum = jax.tree.map(
          lambda v, g: (v.astype(_common.stat_dtype(v.dtype))
                        - g.astype(_common.stat_dtype(v.dtype))) / momentum,
          new_momentum, updates)
    else:
      old_momentum = _momentum_of(state.base_state)
    undo = _scaled(old_momentum, state.scale, updates)  # x = x~ + c_old v_old
    redo = _scaled(new_momentum, new_scale, updates)    # x~' = x' - c_new v_new
    new_updates = jax.tree.map(lambda s, u, r: s + u - r, step, undo, redo)
    return new_updates, MSAMState(
        count=optax.safe_increment(state.count), scale=new_scale,
        base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def unperturb(params, opt_state):
  """The weights to evaluate or export: the held params minus any perturbation.

  For an MSAM state (found anywhere inside ``opt_state``, e.g. in a chain,
  ``optax.MultiSteps`` or ``optax.inject_hyperparams``) this returns
  :math:`x = \\tilde x + \\rho\\, v/(\\|v\\| + 10^{-12})`. For optimizers that
  hold no perturbation (SAM, AdaSAM, LightSAM, plain optax) it returns
  ``params`` unchanged.

  Args:
    params: the parameters the training loop holds.
    opt_state: the optimizer state that goes with them.

  Returns:
    A tree like ``params``.

  Raises:
    ValueError: ``opt_state`` holds more than one MSAM state.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> params = jnp.ones(3)
    >>> state = samtx.sam(0.1).init(params)
    >>> bool((samtx.unperturb(params, state) == params).all())
    True
  """
  states = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, MSAMState))
            if isinstance(s, MSAMState)]
  if not states:
    return params
  if len(states) > 1:
    raise ValueError(
        f"unperturb: opt_state holds {len(states)} MSAM states; apply"
        " unperturb to the part of the state that goes with params.")
  state = states[0]
  shift = _scaled(_momentum_of(state.base_state), state.scale, params)
  return jax.tree.map(jnp.add, params, shift)
