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
    rho: the radius of the perturbation the held parameters carry now
      (0 before the first step), so :func:`unperturb` can remove it even when
      ``rho`` is scheduled.
    base_state: the SGD-with-momentum state; its ``optax.TraceState.trace``
      is the momentum ``v`` that defines the perturbation.
  """
  count: jax.Array
  rho: jax.Array
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


def _perturbation(momentum, rho, like):
  """``-rho v / (||v|| + 1e-12)`` cast to the dtypes of ``like``."""
  step = rho / (_common.global_norm(momentum) + _MSAM_NORM_EPS)
  return jax.tree.map(
      lambda v, ref: (-step * v.astype(_common.stat_dtype(v.dtype))).astype(
          ref.dtype), momentum, like)


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

  def init_fn(params):
    _common.check_float_leaves(params, who)
    base_state = base.init(params)
    # sgd(momentum=0) would drop its trace; the momentum is needed regardless.
    _momentum_of(base_state)
    return MSAMState(
        count=jnp.zeros([], jnp.int32),
        rho=jnp.zeros([], _common.tree_stat_dtype(params)),
        base_state=base_state)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _common.check_float_leaves(updates, who)
    old_momentum = _momentum_of(state.base_state)
    step, base_state = base.update(updates, state.base_state, params)
    new_rho = jnp.asarray(_common.value_at(rho, state.count), state.rho.dtype)
    if _common.is_static_zero(rho):
      # Nothing to undo or redo: return the base step untouched so that XLA
      # compiles exactly the SGD program (same FMA contractions, same bits).
      return step, MSAMState(count=optax.safe_increment(state.count),
                             rho=new_rho, base_state=base_state)
    undo = _perturbation(old_momentum, state.rho, updates)
    redo = _perturbation(_momentum_of(base_state), new_rho, updates)
    # x~' = x~ - undo + step + redo, summed leafwise in one fused expression.
    new_updates = jax.tree.map(
        lambda s, u, r: s - u + r, step, undo, redo)
    return new_updates, MSAMState(
        count=optax.safe_increment(state.count), rho=new_rho,
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
  perturbation = _perturbation(_momentum_of(state.base_state), state.rho,
                               params)
  return jax.tree.map(lambda p, e: p - e, params, perturbation)
