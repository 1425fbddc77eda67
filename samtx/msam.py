"""One-pass momentum perturbations (MSAM, MSAM-AdamW) and :func:`unperturb`.

MSAM takes one gradient per step. The parameters the user holds live at the
perturbed point ``x~ = x - c v`` with ``c = rho / (||v|| + 1e-12)``, where
``v`` is the base optimizer's momentum (SGD's trace, or Adam's first moment);
each update removes the old perturbation, takes the base step and adds the
new one. The momentum is read from the base optimizer's own state, so the
persistent state is the base optimizer's plus two scalars.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samtx import _common

__all__ = ["MSAMState", "msam", "msam_adamw", "unperturb"]

# MSAM normalises the momentum with a fixed epsilon (Becker et al., Alg. 1).
_MSAM_NORM_EPS = 1e-12


class MSAMState(NamedTuple):
  """State of :func:`msam` and :func:`msam_adamw`.

  Attributes:
    count: number of updates taken (int32 scalar; drives ``rho`` schedules).
    scale: ``c = rho / (||v|| + 1e-12)`` of the perturbation the held
      parameters carry now (0 before the first step): they sit at
      ``x - c v``. Storing ``c`` rather than ``rho`` lets :func:`unperturb`
      remove the perturbation exactly, even when ``rho`` is scheduled.
    base_state: the base optimizer's state; its ``optax.TraceState.trace``
      (SGD) or ``optax.ScaleByAdamState.mu`` (AdamW) is the momentum ``v``
      that defines the perturbation.
  """
  count: jax.Array
  scale: jax.Array
  base_state: Any


def _is_momentum_state(s) -> bool:
  return isinstance(s, (optax.TraceState, optax.ScaleByAdamState))


def _momentum_of(base_state) -> Any:
  """The momentum tree of the base optimizer (SGD trace or Adam's ``mu``)."""
  found = [s for s in jax.tree.leaves(base_state, is_leaf=_is_momentum_state)
           if _is_momentum_state(s)]
  if len(found) != 1:
    raise ValueError(
        "MSAM needs exactly one momentum (an optax.TraceState or"
        " optax.ScaleByAdamState) in its base optimizer's state, found"
        f" {len(found)}.")
  state = found[0]
  return state.trace if isinstance(state, optax.TraceState) else state.mu


def _scaled(tree, scale, like):
  """``scale * tree`` in statistics precision, cast to the dtypes of ``like``."""
  return jax.tree.map(
      lambda v, ref: (scale * v.astype(_common.stat_dtype(v.dtype))).astype(
          ref.dtype), tree, like)


def _one_pass(
    who: str,
    base: optax.GradientTransformation,
    rho,
    *,
    norm_axis_name=None,
    learning_rate=None,
    weight_decay=None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps a momentum optimizer so the held weights sit at ``x - c v``.

  Shared by every one-pass form. ``weight_decay`` (with ``learning_rate``)
  multiplies the unperturbed weights after the base step by
  ``1 - lr * weight_decay`` (AdamW's decoupled decay as MSAM-AdamW has it).
  """
  _common.check_scalar("rho", rho, low=0.0, allow_schedule=True, who=who)
  _common.check_axis_names("norm_axis_name", norm_axis_name, who)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    base_state = base.init(params)
    _momentum_of(base_state)  # fail at init, not at the first update
    return MSAMState(
        count=jnp.zeros([], jnp.int32),
        scale=jnp.zeros([], _common.tree_stat_dtype(params)),
        base_state=base_state)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _common.check_float_leaves(updates, who)
    if weight_decay is not None and params is None:
      raise ValueError(f"{who}.update needs params for the weight decay.")
    # Read before the base update overwrites the momentum: the undo must use
    # the very v_old the held weights were built with. Rebuilding it from
    # v_new = mu v_old + g loses v_old when |g| >> |v_old|. This is a
    # transient inside the step; the persistent state stays base + scalars.
    undo = _scaled(_momentum_of(state.base_state), state.scale, updates)
    step, base_state = base.update(updates, state.base_state, params)
    if weight_decay is not None:
      decay = _common.value_at(learning_rate, state.count) * weight_decay
      step = jax.tree.map(
          lambda s, x, u: (s - decay * (x + u + s)).astype(s.dtype),
          step, params, undo)
    count = optax.safe_increment(state.count)
    if _common.is_static_zero(rho):
      # Nothing to undo or redo: return the base step untouched so that XLA
      # compiles exactly the base program (same FMA contractions, same bits).
      return step, MSAMState(count=count, scale=jnp.zeros_like(state.scale),
                             base_state=base_state)
    new_momentum = _momentum_of(base_state)
    new_rho = _common.rho_at(rho, state.count)
    new_scale = jnp.asarray(
        new_rho / (_common.global_norm(new_momentum, None, norm_axis_name)
                   + _MSAM_NORM_EPS), state.scale.dtype)
    redo = _scaled(new_momentum, new_scale, updates)  # x~' = x' - c_new v_new
    new_updates = jax.tree.map(lambda s, u, r: s + u - r, step, undo, redo)
    return new_updates, MSAMState(count=count, scale=new_scale,
                                  base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def msam(
    learning_rate,
    rho,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    norm_axis_name=None,
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
  :func:`samtx.unperturb` ``(params, state)``, not the held weights. The undo
  is exact: with ``learning_rate=0`` the unperturbed weights never move,
  whatever the gradients do.

  Deviations from the official MSAM code: the undo uses the radius the
  perturbation was built with (exact under a ``rho`` schedule); ``nesterov``
  is samtx's extension (the official code ignores it); weight decay is
  chained by the user (the official default is L2 ``1e-2`` at the perturbed
  point).

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; ``rho=0`` is exactly
      ``optax.sgd(learning_rate, momentum, nesterov)``. Run-time negatives
      (a schedule's, or injected under ``jax.jit``) are clamped to 0 (see
      :func:`samtx.sam_perturbation`).
    momentum: ``mu`` in ``[0, 1)``.
    nesterov: Nesterov momentum.
    norm_axis_name: mesh axis name(s) the parameters are sharded over inside
      ``jax.shard_map``; the momentum norm sums the blocks over them (see
      :func:`samtx.sam_perturbation`).

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
  _common.check_scalar("momentum", momentum, low=0.0, high=1.0,
                       high_open=True, who=who)
  base = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
  return _one_pass(who, base, rho, norm_axis_name=norm_axis_name)


def _in_stat_dtype(inner: optax.GradientTransformation):
  """Runs ``inner`` on statistics-dtype copies (float32 Adam for bf16)."""
  def init_fn(params):
    return inner.init(_common.to_stat(params))

  def update_fn(updates, state, params=None):
    stat_params = None if params is None else _common.to_stat(params)
    new_updates, state = inner.update(_common.to_stat(updates), state,
                                      stat_params)
    return _common.cast_like(new_updates, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def msam_adamw(
    learning_rate,
    rho,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""MSAM on AdamW: perturbed along Adam's first moment (one pass).

  The official ``AdamW_MSAM``, used in the MSAM paper for ViTs. With
  :math:`c` the stored scale (0 at the start), :math:`g` taken at the held
  weights :math:`\tilde x` and :math:`t` counting steps from 1:

  .. math::
    x &= \tilde x + c\, m,\quad
    m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
    v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
    x &\leftarrow x - \frac{\eta}{1-\beta_1^t}\,
        \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon},\quad
    x \leftarrow x\,(1 - \eta\lambda), \\
    c &= \rho / (\|m\| + 10^{-12}),\quad \tilde x = x - c\, m

  (:math:`m` in :math:`c` is not bias-corrected). The decay multiplies the
  weights *after* the Adam step, as the official code does, which differs
  from ``optax.adamw`` by :math:`\eta^2\lambda` terms. State: Adam's
  ``(count, mu, nu)`` (float32 for low-precision params) plus two scalars.
  Evaluate and export :func:`samtx.unperturb` ``(params, state)``.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    b1: first-moment decay in ``[0, 1)``.
    b2: second-moment decay in ``[0, 1)``.
    eps: ``> 0``, added to the bias-corrected ``sqrt(v)`` as in Adam.
    weight_decay: ``>= 0``, the decoupled decay :math:`\lambda`.
    norm_axis_name: as in :func:`msam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (one gradient per step);
    ``update`` needs ``params`` (for the decay).

  Example:
    >>> import jax, jax.numpy as jnp, samtx
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> tx = samtx.msam_adamw(0.05, rho=0.05, weight_decay=0.0)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = params + updates
    >>> bool(jnp.allclose(samtx.unperturb(params, state), 1.0, atol=0.1))
    True

  References:
    Becker et al., 2024, Momentum-SAM: Sharpness aware minimization without
    computational overhead, https://arxiv.org/abs/2401.12033
    Loshchilov and Hutter, 2019, Decoupled weight decay regularization,
    https://arxiv.org/abs/1711.05101
  """
  who = "msam_adamw"
  _common.check_scalar("learning_rate", learning_rate, low=0.0,
                       allow_schedule=True, who=who)
  _common.check_scalar("b1", b1, low=0.0, high=1.0, high_open=True, who=who)
  _common.check_scalar("b2", b2, low=0.0, high=1.0, high_open=True, who=who)
  _common.check_scalar("eps", eps, low=0.0, low_open=True, who=who)
  _common.check_scalar("weight_decay", weight_decay, low=0.0, who=who)
  base = optax.chain(
      _in_stat_dtype(optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
      optax.scale_by_learning_rate(learning_rate))
  return _one_pass(who, base, rho, norm_axis_name=norm_axis_name,
                   learning_rate=learning_rate, weight_decay=weight_decay)


def unperturb(params, opt_state):
  """The weights to evaluate or export: the held params minus any perturbation.

  For an MSAM state (found anywhere inside ``opt_state``, e.g. in a chain,
  ``optax.MultiSteps``, ``optax.inject_hyperparams``, or ``optax.masked`` /
  ``optax.multi_transform``, where only the leaves MSAM owns move) this returns
  :math:`x = \\tilde x + c\\, v` with :math:`c = \\rho/(\\|v\\| + 10^{-12})`.
  For optimizers that hold no perturbation (SAM, AdaSAM, LightSAM, plain
  optax) it returns ``params`` unchanged.

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

  def shift(momentum, param):
    # Inside optax.masked / multi_transform, leaves MSAM does not own are
    # MaskedNode in its state: they carry no perturbation.
    if isinstance(momentum, optax.MaskedNode):
      return param
    return param + (state.scale * momentum.astype(
        _common.stat_dtype(momentum.dtype))).astype(param.dtype)

  return jax.tree.map(shift, _momentum_of(state.base_state), params,
                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
