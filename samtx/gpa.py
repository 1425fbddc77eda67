"""Generalized Primal Averaging (GPA) and :func:`eval_params`.

GPA keeps three sequences: the base optimizer's iterate ``z``, the point ``y``
where gradients are taken (the parameters the user holds) and the point ``x``
to evaluate, an exponential moving average of ``z``. Only ``z`` is stored:
``x`` is recovered from ``y`` and ``z``, so GPA costs one parameter-sized
buffer on top of its base optimizer. :func:`eval_params` returns the weights
to evaluate or export for any samtx state (GPA's ``x``, MSAM's unperturbed
weights, the held parameters otherwise).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from samtx import _common
from samtx.msam import unperturb

__all__ = ["GPAState", "eval_params", "gpa"]


class GPAState(NamedTuple):
  """State of :func:`gpa`.

  Attributes:
    z: the base optimizer's iterate, a tree like the parameters (same dtypes
      and shardings). At the start ``z = y = x``, the initial parameters.
    train_interp: the :math:`\\mu_y` the held parameters were built with
      (a scalar in the parameters' statistics dtype). :func:`eval_params`
      needs it to recover :math:`x = z + (y - z)/\\mu_y`, and it keeps that
      recovery exact when ``train_interp`` changes between steps
      (``optax.inject_hyperparams``).
    base_state: the base optimizer's state.
  """
  z: Any
  train_interp: jax.Array
  base_state: Any


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)



def _is_gradient_function(name: str, value) -> bool:
  """Extra arguments named ``grad_fn`` or ``*_grad_fn`` that are callables."""
  return callable(value) and (name == "grad_fn" or name.endswith("_grad_fn"))


def _shifted(grad_fn, offset):
  """``q -> grad_fn(q + offset)``, the sum taken in ``offset``'s precision."""
  # wraps keeps what grad_fn carries (samtx.flax's loss recorder).
  @functools.wraps(grad_fn)
  def shifted_grad_fn(point):
    return grad_fn(jax.tree.map(
        lambda q, d: (q.astype(d.dtype) + d).astype(q.dtype), point, offset))
  return shifted_grad_fn

def gpa(
    base_optimizer: optax.GradientTransformation,
    *,
    train_interp=0.7,
    eval_interp=0.9967,
) -> optax.GradientTransformationExtraArgs:
  r"""Generalized Primal Averaging around any optax optimizer.

  Three sequences: :math:`z` the base optimizer's iterate, :math:`y` the
  gradient point (the parameters you hold and pass to ``update``) and
  :math:`x` the evaluation point. With :math:`\mu_y` = ``train_interp``,
  :math:`\mu_x` = ``eval_interp`` and :math:`u_t` the base optimizer's update
  for the gradient :math:`g_t = \nabla f(y_t)`, taken with ``params`` = :math:`z_t`:

  .. math::
    z_{t+1} = z_t + u_t,\qquad
    x_{t+1} = \mu_x x_t + (1-\mu_x)\, z_{t+1},\qquad
    y_{t+1} = \mu_y x_{t+1} + (1-\mu_y)\, z_{t+1},

  starting from :math:`x_0 = y_0 = z_0` (the initial parameters). The state
  stores :math:`z` and the base state only; :math:`x = z + (y - z)/\mu_y`, and
  the update returned is

  .. math::
    y_{t+1} - y_t = (1 - \mu_x\mu_y)\, u_t - (1 - \mu_x)\,(y_t - z_t).

  ``eval_interp=0`` is the base optimizer exactly: :math:`y = z` at every
  step and the update is :math:`u_t` itself, bit for bit for a Python 0
  (the base's own compiled program); for a traced 0 (``inject_hyperparams``)
  to the last bit of float rounding. ``eval_interp=b`` with
  ``train_interp=1`` is heavy-ball momentum :math:`b`, and
  ``train_interp=eval_interp=b`` is Nesterov momentum :math:`b`, each with the
  learning rate multiplied by :math:`1-b` (an SGD base with learning rate
  :math:`\eta/(1-b)` matches ``optax.sgd(eta, momentum=b)``). The base step
  reaches the held weights scaled by :math:`1-\mu_x\mu_y`.

  The base optimizer sees ``params`` = :math:`z` (so decoupled weight decay
  acts on :math:`z`). Extra arguments of ``update`` are forwarded to it; a
  ``grad_fn`` (two-pass samtx optimizers; likewise any ``*_grad_fn``, such
  as FGSAM+'s ``graph_grad_fn``) is shifted to
  ``q -> grad_fn(q + y - z)``, so a perturbation the base builds around
  :math:`z` is evaluated around :math:`y`: SAM inside GPA calls
  ``grad_fn(y + e)``.

  Evaluate and export :func:`samtx.eval_params` ``(params, state)``
  (:math:`x`), not the held weights.

  GPA is ``optax.contrib.schedule_free``'s structure with ``b1`` =
  :math:`\mu_y` and a constant averaging weight :math:`1-\mu_x` instead of the
  uniform one. Differences from the official ``GPAAdamW``: the base
  optimizer is any optax transform, applied to :math:`z` (its decoupled
  weight decay decays :math:`z`, as :math:`u_t` includes it); the official
  class adds the decay term :math:`\lambda y_t` to its Adam direction.

  Args:
    base_optimizer: any ``optax.GradientTransformation`` (AdamW, SGD,
      ``samtx.sam``, a chain ...). Its learning rate schedule is evaluated at
      its own step count, as usual.
    train_interp: :math:`\mu_y` in :math:`(0, 1]`, the weight of :math:`x` in
      the gradient point. 0.7 (the official default); 0.8-0.99 is more
      stable.
    eval_interp: :math:`\mu_x` in :math:`[0, 1)`, the EMA decay of the
      evaluation point. 0.9967 (the official default, about DiLoCo with 32
      inner steps: :math:`0.9^{1/32}`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`GPAState`; ``update`` needs ``params`` (the held :math:`y`).

  Raises:
    TypeError: ``base_optimizer`` is not a gradient transformation.
    ValueError: an interpolation constant is outside its range.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> target = jnp.array([1.0, -2.0])
    >>> loss = lambda p: jnp.sum((p - target) ** 2)
    >>> opt = samtx.gpa(optax.adam(0.05), train_interp=0.7, eval_interp=0.9)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> for _ in range(300):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(samtx.eval_params(params, state).round(2))
    [ 1. -2.]

  References:
    Defazio, Mishchenko, Raman, Shi, Xiao, 2025, Smoothing DiLoCo with
    Primal Averaging for Faster Training of LLMs,
    https://arxiv.org/abs/2512.17131
    Defazio et al., 2024, The Road Less Scheduled,
    https://arxiv.org/abs/2405.15682
  """
  who = "gpa"
  if not isinstance(base_optimizer, optax.GradientTransformation):
    raise TypeError(
        f"{who}: base_optimizer must be an optax.GradientTransformation (e.g."
        f" optax.adamw(1e-3)), got {base_optimizer!r}.")
  _common.check_scalar("train_interp", train_interp, low=0.0, low_open=True,
                       high=1.0, who=who)
  _common.check_scalar("eval_interp", eval_interp, low=0.0, high=1.0,
                       high_open=True, who=who)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    return GPAState(
        # A copy, not the params' own buffers: a step that donates params
        # and state together needs one buffer per leaf. jnp.copy keeps the
        # sharding.
        z=jax.tree.map(jnp.copy, params),
        train_interp=jnp.asarray(train_interp,
                                 _common.tree_stat_dtype(params)),
        base_state=base.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          f"{who}.update needs params: the held weights y, from which GPA"
          " recovers its evaluation point.")
    if _common.is_static_zero(eval_interp):
      # y = z = x bit for bit: hand the base the held params and return its
      # step untouched, so that XLA compiles the base's own program (same
      # FMA contractions, same bits) plus the copy z = y + u.
      base_updates, base_state = base.update(updates, state.base_state,
                                             params, **extra_args)
      return base_updates, GPAState(
          z=optax.apply_updates(state.z, base_updates),
          train_interp=jnp.asarray(train_interp, state.train_interp.dtype),
          base_state=base_state)
    # y - z in statistics precision (float32 for bfloat16 weights).
    offset = jax.tree.map(
        lambda y, z: y.astype(_common.stat_dtype(y.dtype)) - z, params,
        state.z)
    # Every gradient function the base may call (grad_fn, and FGSAM+'s
    # graph_grad_fn) is a function of the point it is given: shift them all.
    extra_args = {
        name: (_shifted(value, offset) if _is_gradient_function(name, value)
               else value)
        for name, value in extra_args.items()}
    base_updates, base_state = base.update(updates, state.base_state,
                                           state.z, **extra_args)
    mu_x, mu_y = eval_interp, train_interp
    # x_t = z_t + d/mu_prev with the mu_y that built the held y_t; the step
    # is (1 - mu_x mu_y) u - (1 - mu_x mu_y/mu_prev) d. A traced mu_x = 0
    # (inject_hyperparams) makes both coefficients exactly 1 and d exactly 0:
    # the update is u, up to how XLA fuses the base's arithmetic with this.
    step_coefficient = 1 - mu_x * mu_y
    offset_coefficient = 1 - mu_x * (mu_y / state.train_interp)
    new_updates = jax.tree.map(
        lambda u, d: (step_coefficient * u.astype(d.dtype)
                      - offset_coefficient * d).astype(u.dtype),
        base_updates, offset)
    return new_updates, GPAState(
        z=optax.apply_updates(state.z, base_updates),
        train_interp=jnp.asarray(mu_y, state.train_interp.dtype),
        base_state=base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _evaluation_point(params, state: GPAState):
  """GPA's ``x = z + (y - z)/mu_y`` (leaves GPA does not own stay as held)."""
  def recover(z, y):
    if _is_masked(z):
      return y
    dtype = _common.stat_dtype(y.dtype)
    return (z.astype(dtype)
            + (y.astype(dtype) - z) / state.train_interp).astype(y.dtype)
  return jax.tree.map(recover, state.z, params, is_leaf=_is_masked)


def eval_params(params, opt_state):
  r"""The weights to evaluate or export, for any samtx optimizer state.

  - :func:`samtx.gpa` (found anywhere inside ``opt_state``: a chain,
    ``optax.inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
    ``optax.masked``): its evaluation point :math:`x = z + (y - z)/\mu_y`,
    with :math:`y` = ``params``.
  - MSAM (:func:`samtx.msam`, :func:`samtx.msam_adamw`): the unperturbed
    weights, as :func:`samtx.unperturb`.
  - GPA around MSAM: :math:`x + c\,v`, GPA's evaluation point with MSAM's
    current perturbation removed (:func:`samtx.unperturb` applied to
    :math:`x`). GPA averages MSAM's held, perturbed iterates, so :math:`x`
    carries the average of the recent perturbations; removing the current
    one is exact when the momentum direction is steady.
  - :func:`samtx.lookahead` (``params`` an ``optax.LookaheadParams``): the
    slow weights, which that wrapper keeps clean.
  - Anything else (SAM and the two-pass family, AMSGrad, plain optax,
    :func:`samtx.mesa`): ``params`` itself.

  Args:
    params: the parameters the training loop holds.
    opt_state: the optimizer state that goes with them.

  Returns:
    A tree like ``params`` (like ``params.slow`` for Lookahead).

  Raises:
    ValueError: ``opt_state`` holds more than one GPA state (or more than
      one MSAM state, see :func:`samtx.unperturb`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum((p - 3.0) ** 2)
    >>> opt = samtx.gpa(optax.sgd(0.1), train_interp=0.8, eval_interp=0.9)
    >>> params = jnp.zeros(1)
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> held, evaluated = params[0], samtx.eval_params(params, state)[0]
    >>> print(f"held y = {held:.4f}, evaluate x = {evaluated:.4f}")
    held y = 0.5967, evaluate x = 0.3228
    >>> sam_state = samtx.sam(0.1).init(params)
    >>> samtx.eval_params(params, sam_state) is params
    True
  """
  if isinstance(params, optax.LookaheadParams):
    return params.slow
  states = _common.states_of(opt_state, GPAState)
  if len(states) > 1:
    raise ValueError(
        f"eval_params: opt_state holds {len(states)} GPA states; apply"
        " eval_params to the part of the state that goes with params.")
  if states:
    params = _evaluation_point(params, states[0])
  return unperturb(params, opt_state)
