"""optax wrappers that need to know about samtx: Lookahead with ``grad_fn``
and its anchored form, RAPP.

``optax.lookahead`` calls its fast optimizer as ``update(updates, state,
params.fast)`` and accepts no extra arguments, so a two-pass optimizer never
receives ``grad_fn`` (``TypeError: update_fn() got an unexpected keyword
argument 'grad_fn'``). :func:`lookahead` keeps optax's interface
(``optax.LookaheadParams`` and ``optax.LookaheadState``) and forwards the
extra arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samtx import _common
from samtx.msam import unperturb

__all__ = ["lookahead", "rapp"]


def _check_sync_period(sync_period, who):
  if isinstance(sync_period, jax.core.Tracer):
    return
  if isinstance(sync_period, (bool, np.bool_)) or not (
      np.ndim(sync_period) == 0
      and np.issubdtype(np.asarray(sync_period).dtype, np.integer)):
    raise TypeError(
        f"{who}: sync_period must be an integer >= 1, got {sync_period!r}.")
  _common.check_scalar("sync_period", sync_period, low=1.0, who=who)


def _perturbation_shift(fast_params, fast_state):
  """The shift ``x - x~`` that the fast state's one-pass perturbation puts on
  the held fast weights, or None when the state holds no perturbation.

  :func:`samtx.unperturb` adds the shift to whatever tree it is given, so
  applying it to zeros yields the shift exactly (no ``(p + s) - p`` rounding),
  and it returns its argument itself when there is nothing to remove.
  """
  zeros = jax.tree.map(jnp.zeros_like, fast_params)
  shift = unperturb(zeros, fast_state)
  return None if shift is zeros else shift


def lookahead(
    fast_optimizer: optax.GradientTransformation,
    sync_period,
    slow_step_size,
    reset_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Lookahead around any optimizer, forwarding ``grad_fn`` to it.

  The parameters are an ``optax.LookaheadParams(fast, slow)`` pair. Each step
  the fast optimizer updates the fast weights; every ``sync_period`` steps
  (counting from 1) the slow weights move towards the fast ones and the fast
  weights restart from there. With fast step :math:`u_t` at step :math:`t`,
  :math:`k` the sync period and :math:`\alpha` the slow step size:

  .. math::
    &\phi_{t+1} = \phi_t + u_t \quad\text{(no sync)},\\
    &\theta_{t+1} = \theta_t + \alpha\,(\phi_t + u_t - \theta_t),\quad
    \phi_{t+1} = \theta_{t+1} \quad\text{(sync, } (t+1) \bmod k = 0)

  for fast weights :math:`\phi` and slow weights :math:`\theta`. This is
  ``optax.lookahead`` exactly, step for step and bit for bit, except that
  extra keyword arguments of ``update`` (``grad_fn``) reach the fast
  optimizer, which evaluates ``grad_fn`` around ``params.fast``: ``grad_fn``
  takes a plain parameter tree, like the gradient the caller passes, which is
  taken at ``params.fast``.

  **One-pass optimizers (MSAM).** The fast weights MSAM holds are perturbed,
  :math:`\phi = x - c\,v`; :func:`samtx.unperturb` recovers :math:`x`. The
  slow weights here are *clean*: the sync interpolates towards
  :math:`x = \phi_t + u_t + c\,v` (the unperturbed fast weights), and the fast
  weights restart at :math:`\theta_{t+1} - c\,v`, so the MSAM state still
  describes the held weights. Evaluate ``params.slow``. (``optax.lookahead``
  would average the perturbed weights and restart the fast weights without
  the perturbation the MSAM state expects; without a perturbation the two
  agree exactly.)

  ``reset_state=True`` re-initialises the fast optimizer's state on sync
  steps, as optax does; the restarted fast weights then carry no perturbation.

  Args:
    fast_optimizer: any ``optax.GradientTransformation``, e.g.
      ``samtx.sam(...)``.
    sync_period: integer ``k >= 1``, fast steps between synchronisations.
    slow_step_size: ``alpha`` in ``[0, 1]``.
    reset_state: re-initialise the fast optimizer's state after each sync.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``init`` takes an
    ``optax.LookaheadParams`` (or plain params, like optax) and whose
    ``update(grads, state, params, **extra_args)`` takes the
    ``optax.LookaheadParams`` and returns ``optax.LookaheadParams`` updates.
    The state is ``optax.LookaheadState``.

  Raises:
    TypeError: ``fast_optimizer`` is not a gradient transformation,
      ``sync_period`` is not an integer or ``reset_state`` not a bool.
    ValueError: ``sync_period < 1`` or ``slow_step_size`` outside ``[0, 1]``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> opt = samtx.lookahead(samtx.sam(0.1, rho=0.05), sync_period=5,
    ...                       slow_step_size=0.5)
    >>> params = optax.LookaheadParams.init_synced(jnp.zeros(3))
    >>> state = opt.init(params)
    >>> for _ in range(50):
    ...   grads = jax.grad(loss)(params.fast)
    ...   updates, state = opt.update(grads, state, params,
    ...                               grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params.slow) < 1e-2)
    True

  References:
    Zhang et al., 2019, Lookahead optimizer: k steps forward, 1 step back,
    https://arxiv.org/abs/1907.08610
  """
  return _lookahead_transform("lookahead", fast_optimizer, sync_period,
                              slow_step_size, reset_state, anchored=False)


def rapp(
    fast_optimizer: optax.GradientTransformation,
    sync_period,
    slow_step_size,
    reset_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""RAPP: Lookahead whose inner steps all start from the anchor.

  Relaxed approximate proximal point (Pethick et al., 2023). The slow
  weights are the anchor :math:`z`; each inner step takes the fast
  optimizer's step at the current inner iterate but applies it *from the
  anchor*; every ``sync_period`` steps the anchor moves part of the way to
  the last inner iterate. For a fast optimizer ``optax.sgd(gamma)`` and an
  operator :math:`F` (the gradient, or :math:`(\nabla_x f, -\nabla_y f)`
  for a min-max game), with :math:`\tau` the sync period and
  :math:`\lambda` the slow step size:

  .. math::
    w_0 = z_k,\qquad
    w_{t+1} = z_k - \gamma F(w_t)\quad (t = 0, \dots, \tau - 1),\qquad
    z_{k+1} = (1 - \lambda)\, z_k + \lambda\, w_\tau .

  The inner loop is a fixed-point iteration for the resolvent
  :math:`(I + \gamma F)^{-1} z_k` (a contraction when :math:`\gamma L < 1`),
  so RAPP approximates a relaxed proximal-point step: it converges on
  cohypomonotone (:math:`\rho`-comonotone with :math:`\rho > -1/(2L)`)
  problems such as bilinear games, where gradient descent-ascent diverges.
  :func:`lookahead` is the same loop with :math:`w_{t+1} = w_t - \gamma
  F(w_t)`; with ``sync_period=1`` the two coincide.

  Any optax optimizer can take the inner step: its update :math:`u_t`
  (computed from the gradient at :math:`w_t`, with ``params`` :math:`w_t`,
  its state carried across syncs unless ``reset_state``) gives
  :math:`w_{t+1} = z_k + u_t`. Extra arguments (``grad_fn``) are forwarded
  as in :func:`lookahead`, and a one-pass fast optimizer (MSAM) is handled
  as there: its clean step is applied from the anchor.

  Step counting follows ``optax.lookahead``: every cycle has exactly
  ``sync_period`` inner steps. (The official PyTorch code syncs before
  steps ``tau, 2 tau, ...`` counted from 1, so its first cycle has
  ``tau - 1`` inner steps and the later ones ``tau``; start from
  ``state._replace(steps_since_sync=1 % tau)`` to reproduce it.)

  Args:
    fast_optimizer: the inner optimizer, any
      ``optax.GradientTransformation`` (``optax.sgd(gamma)`` is the paper's).
    sync_period: ``tau``, an integer ``>= 1``: inner steps per anchor
      update.
    slow_step_size: ``lambda`` in ``[0, 1]``, the relaxation of the anchor
      update (``lambda = 1``: the anchor jumps to ``w_tau``).
    reset_state: re-initialise the fast optimizer's state after each sync.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over
    ``optax.LookaheadParams(fast, slow)`` with state
    ``optax.LookaheadState``, exactly like :func:`lookahead`: take gradients
    at ``params.fast`` and evaluate ``params.slow``.

  Raises:
    TypeError: ``fast_optimizer`` is not a gradient transformation,
      ``sync_period`` is not an integer or ``reset_state`` not a bool.
    ValueError: ``sync_period < 1`` or ``slow_step_size`` outside ``[0, 1]``.

  Example:
    A bilinear game, :math:`\min_x \max_y\, x y`: gradient
    descent-ascent spirals out, RAPP converges to the saddle point.

    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> field = lambda p: {"x": p["y"], "y": -p["x"]}  # (df/dx, -df/dy)
    >>> opt = samtx.rapp(optax.sgd(0.5), sync_period=5, slow_step_size=0.5)
    >>> params = optax.LookaheadParams.init_synced(
    ...     {"x": jnp.array(1.0), "y": jnp.array(1.0)})
    >>> state = opt.init(params)
    >>> for _ in range(400):
    ...   updates, state = opt.update(field(params.fast), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{float(jnp.hypot(params.slow['x'], params.slow['y'])):.0e}")
    4e-03

  References:
    Pethick, Xie and Cevher, 2023, Stable nonconvex-nonconcave training via
    linear interpolation, NeurIPS 2023, https://arxiv.org/abs/2310.13459
  """
  return _lookahead_transform("rapp", fast_optimizer, sync_period,
                              slow_step_size, reset_state, anchored=True)


def _lookahead_transform(who, fast_optimizer, sync_period, slow_step_size,
                         reset_state, *, anchored):
  """Lookahead (``anchored=False``) or RAPP (``anchored=True``)."""
  if not isinstance(fast_optimizer, optax.GradientTransformation):
    raise TypeError(
        f"{who}: fast_optimizer must be an optax.GradientTransformation (e.g."
        f" samtx.sam(...)), got {fast_optimizer!r}.")
  _check_sync_period(sync_period, who)
  _common.check_scalar("slow_step_size", slow_step_size, low=0.0, high=1.0,
                       who=who)
  if not isinstance(reset_state, (bool, np.bool_)):
    raise TypeError(f"{who}: reset_state must be a bool, got {reset_state!r}.")
  fast_optimizer = optax.with_extra_args_support(fast_optimizer)

  def init_fn(params):
    # Like optax, plain params are taken to be the fast weights.
    fast_params = getattr(params, "fast", params)
    return optax.LookaheadState(
        fast_state=fast_optimizer.init(fast_params),
        steps_since_sync=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if not (hasattr(params, "fast") and hasattr(params, "slow")):
      raise TypeError(
          f"{who}.update needs params=optax.LookaheadParams(fast, slow), got"
          f" {type(params).__name__}. Build them once with"
          " optax.LookaheadParams.init_synced(params) and take gradients at"
          " params.fast.")
    fast_updates, fast_state = fast_optimizer.update(
        updates, state.fast_state, params.fast, **extra_args)
    if anchored:
      fast_updates = _from_the_anchor(fast_updates, params, state.fast_state)
    sync_next = state.steps_since_sync == (sync_period - 1)
    new_fast = jax.tree.map(jnp.add, params.fast, fast_updates)
    shift = _perturbation_shift(params.fast, fast_state)
    if reset_state:
      initial_state = fast_optimizer.init(params.fast)
      fast_state = jax.tree.map(
          lambda current, init: jnp.where(sync_next, init, current),
          fast_state, initial_state)
    restart_shift = (None if shift is None
                     else _perturbation_shift(params.fast, fast_state))
    # Written as in optax._src.lookahead so that, without a perturbation, the
    # result is optax's bit for bit. With one, the sync interpolates towards
    # the clean fast weights and restarts the fast weights at the slow ones
    # minus the perturbation the (possibly reset) fast state now describes.
    if shift is None:
      last_difference = jax.tree.map(jnp.subtract, new_fast, params.slow)
      fast_updates = jax.tree.map(
          lambda up, diff: up - sync_next * (1 - slow_step_size) * diff,
          fast_updates, last_difference)
    else:
      last_difference = jax.tree.map(
          lambda f, s, slow: f + s - slow, new_fast, shift, params.slow)
      fast_updates = jax.tree.map(
          lambda up, diff, s, r: up - sync_next * (
              (1 - slow_step_size) * diff - s + r),
          fast_updates, last_difference, shift, restart_shift)
    slow_updates = jax.tree.map(
        lambda diff: slow_step_size * sync_next * diff, last_difference)
    steps_since_sync = (state.steps_since_sync + 1) % sync_period
    return (optax.LookaheadParams(fast=fast_updates, slow=slow_updates),
            optax.LookaheadState(fast_state, steps_since_sync))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _from_the_anchor(fast_updates, params, fast_state):
  """The fast update that moves the held fast weights to ``slow + u``.

  RAPP applies the fast optimizer's step ``u`` (taken with the gradient at
  the fast weights) from the anchor, the slow weights: the new clean fast
  weights are ``slow + u + s_new - s_old`` for the clean step of a one-pass
  optimizer (MSAM, whose held weights sit ``s`` below the clean ones), so
  the held ones become ``slow + u - s_old``. ``(slow + u) - fast`` rather
  than ``u + (slow - fast)``: the difference of two iterates within a factor
  of two of each other is exact (Sterbenz), and then ``fast + update`` is
  ``slow + u`` to the last bit.
  """
  old_shift = _perturbation_shift(params.fast, fast_state)
  if old_shift is None:
    return jax.tree.map(lambda u, slow, fast: (slow + u) - fast,
                        fast_updates, params.slow, params.fast)
  return jax.tree.map(lambda u, slow, fast, s: (slow + u - s) - fast,
                      fast_updates, params.slow, params.fast, old_shift)
