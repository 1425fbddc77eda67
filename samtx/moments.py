"""Adaptive-moment ``scale_by_*`` transforms used after a samtx perturbation.

These are ordinary optax transforms (no ``grad_fn``): AdaSAM's AMSGrad rule,
with its delayed second moment, and the three preconditioners of LightSAM
(AdaGrad-Norm, AdaGrad, and the bias-free Adam form). LightSAM applies the
very same preconditioners to its ascent step, so they are written once here.

Statistics are kept in float32 for bfloat16/float16 leaves (and in float64
for float64 leaves); the scaled update is cast back to the gradient's dtype.
Complex leaves follow optax's convention: second moments and norms use the
real ``|z|^2 = z conj(z)``, never ``z^2``.
No epsilon is added to a denominator: every accumulator starts at
``eps**2`` instead, which keeps a zero gradient finite (``0 / eps``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from samtx import _common

__all__ = [
    "ScaleByAmsgradState",
    "ScaleByAdagradNormState",
    "ScaleByAdagradState",
    "ScaleByAdamUncorrectedState",
    "scale_by_amsgrad",
    "scale_by_adagrad_norm",
    "scale_by_adagrad",
    "scale_by_adam_uncorrected",
    "lightsam_preconditioner",
    "LIGHTSAM_VARIANTS",
]


def _precondition(numerator, second_moment, like):
  """``numerator / sqrt(second_moment)`` leafwise, cast to ``like``'s dtypes.

  Written as a multiplication by ``rsqrt``: XLA:CPU lowers ``n / sqrt(v)`` to
  a slow scalar loop (1.5-1.8x optax's update), while ``rsqrt`` vectorises.
  ``v >= eps**2`` always, so ``tiny`` only guards against a zero accumulator
  and never changes a result.
  """
  def scale(n, v, ref):
    return (n * jax.lax.rsqrt(v + jnp.finfo(v.dtype).tiny)).astype(ref.dtype)
  return jax.tree.map(scale, numerator, second_moment, like)


def _check_moment_args(who, *, b1=None, b2=None, eps):
  if b1 is not None:
    _common.check_scalar("b1", b1, low=0.0, high=1.0, high_open=True, who=who)
  if b2 is not None:
    _common.check_scalar("b2", b2, low=0.0, high=1.0, high_open=True, who=who)
  _common.check_scalar("eps", eps, low=0.0, low_open=True, who=who)


# The delayed form divides by the previous running maximum only where it is
# at least this fraction of the current one (see scale_by_amsgrad): steps are
# then at most 1/sqrt(0.25) = 2 times Algorithm 1's.
DELAYED_FLOOR = 0.25


class ScaleByAmsgradState(NamedTuple):
  """State of :func:`scale_by_amsgrad`.

  Attributes:
    count: number of updates taken so far (int32 scalar).
    mu: first moment ``m``.
    nu: second moment ``v``.
    nu_max: running maximum ``vhat`` (starts at ``eps**2``).
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates


def scale_by_amsgrad(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    delayed: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates by AdaSAM's AMSGrad rule (no bias correction).

  With gradient (or perturbed gradient) :math:`h_t`:

  .. math::
    &m_t = \beta_1 m_{t-1} + (1-\beta_1) h_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) h_t^2,\\
    &\hat v_t = \max(\hat v_{t-1}, v_t),\quad
    u_t = m_t / \sqrt{\hat v_t}

  with :math:`m_{-1} = v_{-1} = 0`, :math:`\hat v_{-1} = \epsilon^2` and no
  epsilon in the denominator (:math:`h^2` is :math:`|h|^2` for complex
  leaves). This is AdaSAM's Algorithm 1 and the default.

  ``delayed=True`` is **experimental**: the *analysis* form of the AdaSAM
  proof, not its Algorithm 1 and not recommended for training. It divides
  by the previous running maximum, so the step size does not depend on the
  current gradient, per coordinate, wherever that maximum is a usable
  history:

  .. math::
    u_t = m_t / \sqrt{d_t},\quad d_t = \begin{cases}
      \hat v_{t-1} & \hat v_{t-1} > \epsilon^2 \text{ and }
        \hat v_{t-1} \ge \hat v_t / 4 \\
      \hat v_t & \text{otherwise}
    \end{cases}

  Both guards bound the step: :math:`|u_t| \le 2 |m_t| / \sqrt{\hat v_t}`,
  at most twice Algorithm 1's. Without the first, a coordinate with an
  all-zero history (a dead ReLU unit, step 0) would step by
  :math:`(1-\beta_1)|h|/\epsilon`; without the second, one with a tiny
  history (``4e-15`` after a perturbed step on Rosenbrock) would divide its
  first O(1) gradient by the square root of that and diverge. The second
  guard only fires on a spike: with :math:`\beta_2 = 0.999`,
  :math:`\hat v_t > 4 \hat v_{t-1}` needs :math:`h_t^2 > 3000\, \hat
  v_{t-1}`, a gradient about 55 times its running RMS; everywhere else the
  step is the analysis form's :math:`m_t/\sqrt{\hat v_{t-1}}`.

  This differs from ``optax.scale_by_amsgrad``, which bias-corrects ``m`` and
  ``v`` and adds ``eps`` outside the square root.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: ``> 0``; ``eps**2`` is the initial running maximum.
    delayed: experimental analysis form (see above); not Algorithm 1.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> tx = samtx.scale_by_amsgrad(b1=0.0, b2=0.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([2.0, -3.0]), state)
    >>> updates
    Array([ 1., -1.], dtype=float32)

  References:
    Sun et al., 2023, AdaSAM: Boosting sharpness-aware minimization with
    adaptive learning rate and momentum, https://arxiv.org/abs/2303.00565
    Reddi et al., 2018, On the convergence of Adam and beyond,
    https://openreview.net/forum?id=ryQu7f-RZ
  """
  who = "scale_by_amsgrad"
  _check_moment_args(who, b1=b1, b2=b2, eps=eps)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    # Separate buffers for mu and nu: a shared one cannot be donated twice.
    return ScaleByAmsgradState(
        count=jnp.zeros([], jnp.int32),
        mu=_common.full_like_stat(params, 0.0),
        nu=_common.full_like_stat(params, 0.0, real=True),
        nu_max=_common.second_moments_like(params, eps))

  def update_fn(updates, state, params=None):
    del params
    mu = _common.ema(state.mu, updates, b1)
    nu = _common.ema(state.nu, jax.tree.map(_common.sq_stat, updates), b2)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    if delayed:
      def delayed_denominator(new, prev):
        has_history = prev > _common.initial_second_moment(eps, prev.dtype)
        not_dwarfed = prev >= DELAYED_FLOOR * new
        return jnp.where(has_history & not_dwarfed, prev, new)
      denominator = jax.tree.map(delayed_denominator, nu_max, state.nu_max)
    else:
      denominator = nu_max
    new_updates = _precondition(mu, denominator, updates)
    return new_updates, ScaleByAmsgradState(
        count=optax.safe_increment(state.count), mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdagradNormState(NamedTuple):
  """State of :func:`scale_by_adagrad_norm`: the scalar sum ``v``."""
  sum_of_squares: jax.Array


def scale_by_adagrad_norm(
    eps: float = 1e-8,
    *,
    norm_axis_name=None,
) -> optax.GradientTransformation:
  r"""Rescales updates by AdaGrad-Norm (one scalar step size for the tree).

  .. math::
    v_t = v_{t-1} + \|h_t\|^2,\quad u_t = h_t / \sqrt{v_t},\quad
    v_{-1} = \epsilon^2

  with :math:`\|\cdot\|` the global L2 norm over every leaf. This is
  LightSAM-I's descent rule and, scaled by ``rho``, its ascent rule.

  Args:
    eps: ``> 0``; ``eps**2`` is the initial accumulator.
    norm_axis_name: mesh axis name(s) the parameters are sharded over inside
      ``jax.shard_map``; the squared norm sums the blocks over them (see
      :func:`samtx.sam_perturbation`).

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> tx = samtx.scale_by_adagrad_norm(eps=1e-8)
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> updates
    Array([0.6, 0.8], dtype=float32)

  References:
    Cheng et al., 2025, LightSAM: Parameter-agnostic sharpness-aware
    minimization, https://arxiv.org/abs/2505.24399
    Ward et al., 2019, AdaGrad stepsizes, https://arxiv.org/abs/1806.01811
  """
  who = "scale_by_adagrad_norm"
  _check_moment_args(who, eps=eps)
  _common.check_axis_names("norm_axis_name", norm_axis_name, who)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    return ScaleByAdagradNormState(sum_of_squares=_common.initial_second_moment(
        eps, _common.tree_stat_dtype(params)))

  def update_fn(updates, state, params=None):
    del params
    total = state.sum_of_squares + _common.global_sq_norm(
        updates, state.sum_of_squares.dtype, norm_axis_name)
    root = jnp.sqrt(total)
    new_updates = jax.tree.map(
        lambda h: (h.astype(_common.stat_dtype(h.dtype)) / root).astype(
            h.dtype), updates)
    return new_updates, ScaleByAdagradNormState(sum_of_squares=total)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdagradState(NamedTuple):
  """State of :func:`scale_by_adagrad`: per-coordinate sums ``v``."""
  sum_of_squares: optax.Updates


def scale_by_adagrad(eps: float = 1e-8) -> optax.GradientTransformation:
  r"""Rescales updates by per-coordinate AdaGrad.

  .. math::
    v_t = v_{t-1} + h_t^2,\quad u_t = h_t / \sqrt{v_t},\quad
    v_{-1} = \epsilon^2

  elementwise. LightSAM-II's descent rule (and, scaled by ``rho``, its ascent
  rule). Unlike ``optax.scale_by_rss`` no epsilon is added to the
  denominator; the accumulator starts at ``eps**2``.

  Args:
    eps: ``> 0``; ``eps**2`` is the initial accumulator.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> tx = samtx.scale_by_adagrad()
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([3.0, -4.0]), state)
    >>> updates
    Array([ 1., -1.], dtype=float32)

  References:
    Cheng et al., 2025, LightSAM: Parameter-agnostic sharpness-aware
    minimization, https://arxiv.org/abs/2505.24399
    Duchi et al., 2011, Adaptive subgradient methods,
    https://jmlr.org/papers/v12/duchi11a.html
  """
  who = "scale_by_adagrad"
  _check_moment_args(who, eps=eps)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    return ScaleByAdagradState(
        sum_of_squares=_common.second_moments_like(params, eps))

  def update_fn(updates, state, params=None):
    del params
    sums = jax.tree.map(
        lambda v, h: v + _common.sq_stat(h), state.sum_of_squares, updates)
    new_updates = _precondition(
        _common.to_stat(updates), sums, updates)
    return new_updates, ScaleByAdagradState(sum_of_squares=sums)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamUncorrectedState(NamedTuple):
  """State of :func:`scale_by_adam_uncorrected`."""
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_uncorrected(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  r"""Rescales updates by the Adam form of LightSAM-III (no bias correction).

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) h_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) h_t^2,\quad
    u_t = m_t / \sqrt{v_t}

  with :math:`m_{-1} = 0`, :math:`v_{-1} = \epsilon^2`, no bias correction,
  no running maximum and no epsilon in the denominator.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: ``> 0``; ``eps**2`` is the initial second moment.

  Returns:
    An ``optax.GradientTransformation``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> tx = samtx.scale_by_adam_uncorrected(b1=0.0, b2=0.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([2.0, -5.0]), state)
    >>> updates
    Array([ 1., -1.], dtype=float32)

  References:
    Cheng et al., 2025, LightSAM: Parameter-agnostic sharpness-aware
    minimization, https://arxiv.org/abs/2505.24399
  """
  who = "scale_by_adam_uncorrected"
  _check_moment_args(who, b1=b1, b2=b2, eps=eps)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    return ScaleByAdamUncorrectedState(
        mu=_common.full_like_stat(params, 0.0),
        nu=_common.second_moments_like(params, eps))

  def update_fn(updates, state, params=None):
    del params
    mu = _common.ema(state.mu, updates, b1)
    nu = _common.ema(state.nu, jax.tree.map(_common.sq_stat, updates), b2)
    return _precondition(mu, nu, updates), ScaleByAdamUncorrectedState(
        mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


LIGHTSAM_VARIANTS = ("adagrad_norm", "adagrad", "adam")


def lightsam_preconditioner(
    variant: str,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    norm_axis_name=None,
) -> optax.GradientTransformation:
  """The preconditioner LightSAM uses for both its ascent and descent steps.

  Args:
    variant: ``"adagrad_norm"`` (LightSAM-I), ``"adagrad"`` (LightSAM-II) or
      ``"adam"`` (LightSAM-III).
    b1: first-moment decay of the ``"adam"`` form (ignored otherwise).
    b2: second-moment decay of the ``"adam"`` form (ignored otherwise).
    eps: ``> 0``; accumulators start at ``eps**2``.
    norm_axis_name: model axes for ``"adagrad_norm"``'s global norm (see
      :func:`scale_by_adagrad_norm`; the per-coordinate forms need none).

  Returns:
    :func:`scale_by_adagrad_norm`, :func:`scale_by_adagrad` or
    :func:`scale_by_adam_uncorrected`.

  Raises:
    ValueError: ``variant`` is not one of the three names.

  Example:
    >>> import samtx
    >>> tx = samtx.lightsam_preconditioner("adagrad")
  """
  if variant == "adagrad_norm":
    return scale_by_adagrad_norm(eps, norm_axis_name=norm_axis_name)
  if variant == "adagrad":
    return scale_by_adagrad(eps)
  if variant == "adam":
    return scale_by_adam_uncorrected(b1, b2, eps)
  raise ValueError(
      f"LightSAM: variant must be one of {LIGHTSAM_VARIANTS}, got {variant!r}.")
