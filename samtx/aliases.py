"""Ready-made optimizers: a perturbation, a ``scale_by_*`` rule and a step size.

Each alias is assembled the way ``optax.adam`` assembles ``scale_by_adam`` and
``scale_by_learning_rate``. ``learning_rate`` may be a float or an optax
schedule everywhere.
"""

from __future__ import annotations

from typing import Optional

import optax

from samtx import _common
from samtx import moments
from samtx import perturbations
from samtx.msam import msam
from samtx.msam import msam_adamw

__all__ = ["sam", "adasam", "amsgrad", "lightsam", "msam", "msam_adamw",
           "gsam", "wsam", "friendly_sam", "looksam", "fgsam", "fgsam_plus"]


def _check_learning_rate(learning_rate, who):
  _common.check_scalar("learning_rate", learning_rate, low=0.0,
                       allow_schedule=True, who=who)


def _momentum_transform(momentum, nesterov, who):
  """SGD's momentum trace; none at all when ``momentum`` is ``None``.

  ``None`` (not ``0.0``) is the default, as in ``optax.sgd``: a numeric
  default would become an array under ``optax.inject_hyperparams`` and build
  a parameter-sized buffer the plain optimizer does not have.
  """
  if momentum is None or (isinstance(momentum, (int, float))
                          and not isinstance(momentum, bool) and momentum == 0):
    if nesterov:
      raise ValueError(f"{who}: nesterov=True needs momentum > 0.")
    return optax.identity()
  _common.check_scalar("momentum", momentum, low=0.0, high=1.0,
                       high_open=True, who=who)
  return optax.trace(decay=momentum, nesterov=nesterov)


def _on_sgd(perturbation, learning_rate, momentum, nesterov, who):
  """``perturbation`` followed by SGD with optional (Nesterov) momentum."""
  _check_learning_rate(learning_rate, who)
  return optax.chain(
      perturbation,
      _momentum_transform(momentum, nesterov, who),
      optax.scale_by_learning_rate(learning_rate),
  )


def sam(
    learning_rate,
    rho=0.05,
    *,
    normalize: bool = True,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    adaptive: bool = False,
    eta: float = 0.0,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM (or ASAM with ``adaptive=True``) on SGD with optional momentum.

  .. math::
    e = \rho\, g/(\|g\|+\epsilon),\quad h = \nabla f(x+e),\quad
    v \leftarrow \mu v + h,\quad x \leftarrow x - \eta_t v

  ``normalize=False`` is unnormalized SAM, ``e = rho g`` (see
  :func:`samtx.sam_perturbation`). ``rho=0`` is bit-for-bit
  ``optax.sgd(learning_rate, momentum, nesterov)``.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    normalize: divide the ascent step by its norm; ``False`` gives
      unnormalized SAM (``e = rho g``, ASAM: ``rho T^2 g``).
    momentum: SGD momentum ``mu`` in ``[0, 1)``; ``None`` (or 0) keeps no
      momentum buffer.
    nesterov: Nesterov momentum.
    adaptive: ASAM's scale-invariant perturbation.
    eta: ASAM's offset ``>= 0``.
    axis_name: average the perturbed gradient over this mapped axis.
    norm_axis_name: mesh axes the parameters are sharded over inside
      ``jax.shard_map`` (see :func:`samtx.sam_perturbation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> opt = samtx.sam(0.1, rho=0.05)
    >>> params = jnp.zeros(3)
    >>> state = opt.init(params)
    >>> for _ in range(50):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params, grad_fn=jax.grad(loss))
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 1e-2)
    True

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412;
    Kwon et al., 2021, https://arxiv.org/abs/2102.11600;
    Andriushchenko and Flammarion, 2022 (unnormalized SAM),
    https://arxiv.org/abs/2206.06232
  """
  return _on_sgd(
      perturbations.sam_perturbation(
          rho, normalize=normalize, adaptive=adaptive, eta=eta,
          axis_name=axis_name, norm_axis_name=norm_axis_name),
      learning_rate, momentum, nesterov, "sam")


def amsgrad(
    learning_rate,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    delayed: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaSAM's AMSGrad rule without perturbation (the AdaSAM baseline).

  .. math::
    m = \beta_1 m + (1-\beta_1) g,\ v = \beta_2 v + (1-\beta_2) g^2,\
    \hat v = \max(\hat v, v),\ x \leftarrow x - \eta_t m / \sqrt{\hat v}

  No bias correction, ``vhat`` starts at ``eps**2``. This is *not*
  ``optax.amsgrad``, which bias-corrects and adds ``eps`` outside the square
  root; see :func:`samtx.scale_by_amsgrad`.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    b1: first-moment decay in ``[0, 1)``.
    b2: second-moment decay in ``[0, 1)``.
    eps: ``> 0``.
    delayed: experimental analysis form of the AdaSAM proof (divides by the
      previous ``vhat`` where it has history and is at least a quarter of
      the current one); not Algorithm 1, not recommended. See
      :func:`samtx.scale_by_amsgrad`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> opt = samtx.amsgrad(0.01)
    >>> state = opt.init(jnp.zeros(2))

  References:
    Sun et al., 2023, https://arxiv.org/abs/2303.00565
  """
  _check_learning_rate(learning_rate, "amsgrad")
  return optax.chain(
      moments.scale_by_amsgrad(b1, b2, eps, delayed=delayed),
      optax.scale_by_learning_rate(learning_rate),
  )


def adasam(
    learning_rate,
    rho=0.05,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    delayed: bool = False,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaSAM: the SAM perturbation followed by AdaSAM's AMSGrad rule.

  .. math::
    &h = \nabla f(x + \rho g/(\|g\|+\epsilon_{\text{SAM}})),\quad
    m = \beta_1 m + (1-\beta_1) h,\quad v = \beta_2 v + (1-\beta_2) h^2,\\
    &\hat v = \max(\hat v, v),\quad x \leftarrow x - \eta_t m/\sqrt{\hat v}

  This is the paper's Algorithm 1. ``rho=0`` equals :func:`samtx.amsgrad`.
  ``delayed=True`` is the experimental *analysis* form of the paper's proof
  (dividing by the previous ``vhat`` where a coordinate has history that is
  at least a quarter of the current ``vhat``), not its Algorithm 1 and not
  recommended; see :func:`samtx.scale_by_amsgrad`.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    b1: first-moment decay in ``[0, 1)``.
    b2: second-moment decay in ``[0, 1)``.
    eps: ``> 0``, the AMSGrad epsilon (``vhat`` starts at ``eps**2``).
    delayed: experimental analysis form (see above), not Algorithm 1.
    axis_name: average the perturbed gradient over this mapped axis.
    norm_axis_name: mesh axes the parameters are sharded over inside
      ``jax.shard_map`` (see :func:`samtx.sam_perturbation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``grad_fn``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> opt = samtx.adasam(1e-3, rho=0.05)
    >>> state = opt.init({"w": jnp.zeros((2, 2))})

  References:
    Sun et al., 2023, AdaSAM: Boosting sharpness-aware minimization with
    adaptive learning rate and momentum, https://arxiv.org/abs/2303.00565
  """
  _check_learning_rate(learning_rate, "adasam")
  return optax.chain(
      perturbations.sam_perturbation(rho, axis_name=axis_name,
                                     norm_axis_name=norm_axis_name),
      moments.scale_by_amsgrad(b1, b2, eps, delayed=delayed),
      optax.scale_by_learning_rate(learning_rate),
  )


def lightsam(
    learning_rate,
    rho,
    *,
    variant: str = "adagrad_norm",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""LightSAM-I/II/III: preconditioned ascent and descent.

  The same preconditioner :math:`P` (AdaGrad-Norm, AdaGrad or the bias-free
  Adam form, see :func:`samtx.lightsam_preconditioner`) is applied, with
  separate statistics, to the clean gradient for the ascent and to the
  perturbed gradient for the descent:

  .. math::
    e = \rho\, P_u(s),\quad h = \nabla f(x + e),\quad
    x \leftarrow x - \eta_t P_v(h)

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    variant: ``"adagrad_norm"`` (I), ``"adagrad"`` (II) or ``"adam"`` (III).
    b1: first-moment decay of the ``"adam"`` variant.
    b2: second-moment decay of the ``"adam"`` variant.
    eps: ``> 0``; all accumulators start at ``eps**2``.
    axis_name: average the perturbed gradient over this mapped axis.
    norm_axis_name: mesh axes the parameters are sharded over inside
      ``jax.shard_map`` (see :func:`samtx.sam_perturbation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``grad_fn``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> opt = samtx.lightsam(0.5, rho=0.1, variant="adam")
    >>> state = opt.init(jnp.zeros(4))

  References:
    Cheng et al., 2025, LightSAM: Parameter-agnostic sharpness-aware
    minimization, https://arxiv.org/abs/2505.24399
  """
  _check_learning_rate(learning_rate, "lightsam")
  return optax.chain(
      perturbations.lightsam_perturbation(
          rho, variant=variant, b1=b1, b2=b2, eps=eps, axis_name=axis_name,
          norm_axis_name=norm_axis_name),
      moments.lightsam_preconditioner(variant, b1=b1, b2=b2, eps=eps,
                                      norm_axis_name=norm_axis_name),
      optax.scale_by_learning_rate(learning_rate),
  )


# ----------------------------------------------------------------------------
# the wider two-pass family, on SGD with optional momentum like ``sam``
# ----------------------------------------------------------------------------

def gsam(
    learning_rate,
    rho,
    *,
    alpha: float = 0.4,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    adaptive: bool = False,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""GSAM on SGD with optional momentum.

  .. math::
    h = \nabla f(x + \rho g/(\|g\|+\epsilon)),\quad
    u = h - \alpha g_\perp,\quad v \leftarrow \mu v + u,\quad
    x \leftarrow x - \eta_t v

  with :math:`g_\perp` the part of :math:`g` orthogonal to :math:`h` (see
  :func:`samtx.gsam_perturbation`). ``rho=0`` is bit-for-bit
  ``optax.sgd``. The paper decays ``rho`` with the learning rate: pass the
  same kind of schedule for both.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    alpha: ``>= 0``, the weight of the surrogate-gap ascent.
    adaptive: ASAM's ascent point.
    momentum: SGD momentum in ``[0, 1)``; ``None`` (or 0) keeps no momentum
      buffer.
    nesterov: Nesterov momentum.
    axis_name: average the output over this mapped axis.
    norm_axis_name: mesh axes the parameters are sharded over inside
      ``jax.shard_map`` (see :func:`samtx.sam_perturbation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax.numpy as jnp, optax, samtx
    >>> schedule = optax.linear_schedule(0.1, 0.0, 100)
    >>> opt = samtx.gsam(schedule, rho=optax.linear_schedule(0.05, 0.0, 100))
    >>> state = opt.init(jnp.zeros(3))

  References:
    Zhuang et al., 2022, https://arxiv.org/abs/2203.08065
  """
  return _on_sgd(
      perturbations.gsam_perturbation(
          rho, alpha=alpha, adaptive=adaptive, axis_name=axis_name,
          norm_axis_name=norm_axis_name),
      learning_rate, momentum, nesterov, "gsam")


def wsam(
    learning_rate,
    rho,
    *,
    gamma: float = 0.9,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    adaptive: bool = False,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""WSAM (coupled form) on SGD with optional momentum.

  .. math::
    a = \gamma/(1-\gamma),\quad u = (1-a)\, g + a\, h,\quad
    v \leftarrow \mu v + u,\quad x \leftarrow x - \eta_t v

  with :math:`h` the gradient at SAM's ascent point (see
  :func:`samtx.wsam_perturbation`). ``rho=0`` is bit-for-bit ``optax.sgd``.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    gamma: sharpness weight in ``[0, 1)`` (0.5 is SAM).
    adaptive: ASAM's ascent point.
    momentum, nesterov, axis_name, norm_axis_name: as in :func:`samtx.gsam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> opt = samtx.wsam(0.1, rho=0.05, gamma=0.9, momentum=0.9)
    >>> state = opt.init(jnp.zeros(3))

  References:
    Yue et al., 2023, https://arxiv.org/abs/2305.15817
  """
  return _on_sgd(
      perturbations.wsam_perturbation(
          rho, gamma=gamma, adaptive=adaptive, axis_name=axis_name,
          norm_axis_name=norm_axis_name),
      learning_rate, momentum, nesterov, "wsam")


def friendly_sam(
    learning_rate,
    rho,
    *,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    adaptive: bool = False,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly-SAM on SGD with optional momentum.

  .. math::
    &d = g - \sigma m,\quad m \leftarrow \lambda m + (1-\lambda) g,\\
    &h = \nabla f(x + \rho d/(\|d\|+\epsilon)),\quad
    v \leftarrow \mu v + h,\quad x \leftarrow x - \eta_t v

  (``d = m = g`` on the first step, see
  :func:`samtx.friendly_sam_perturbation`). ``rho=0`` is bit-for-bit
  ``optax.sgd``. State: SGD's plus one parameter-sized buffer ``m``.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    sigma: ``>= 0``, how much of the gradient's running mean to remove.
    lmbda: decay of the running mean, in ``[0, 1)``.
    adaptive: ASAM's scaling of the ascent direction.
    momentum, nesterov, axis_name, norm_axis_name: as in :func:`samtx.gsam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> opt = samtx.friendly_sam(0.1, rho=0.05, momentum=0.9)
    >>> state = opt.init(jnp.zeros(3))

  References:
    Li et al., 2024, Friendly sharpness-aware minimization, CVPR 2024,
    https://arxiv.org/abs/2403.12350
  """
  return _on_sgd(
      perturbations.friendly_sam_perturbation(
          rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive,
          axis_name=axis_name, norm_axis_name=norm_axis_name),
      learning_rate, momentum, nesterov, "friendly_sam")


def looksam(
    learning_rate,
    rho,
    *,
    k: int = 5,
    alpha: float = 0.7,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM on SGD with optional momentum: SAM's second pass every k steps.

  Every ``k``-th step takes SAM's gradient :math:`h` and stores its part
  :math:`g_v` orthogonal to :math:`g`; the steps in between take one
  gradient and use :math:`u = g + \alpha\, \|g\| g_v/(\|g_v\|+\epsilon)`
  (see :func:`samtx.looksam_perturbation`), then
  :math:`v \leftarrow \mu v + u,\ x \leftarrow x - \eta_t v`. About
  ``1 + 1/k`` gradient evaluations per step. ``rho=0`` is bit-for-bit
  ``optax.sgd``. State: SGD's plus one parameter-sized buffer ``g_v``.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule; run-time negatives are
      clamped to 0 (see :func:`samtx.sam_perturbation`).
    k: second gradient every ``k`` steps, an int ``>= 1``.
    alpha: ``>= 0``, the weight of the reused direction; set it near SAM's
      own ``n(g_v)/n(g)`` (e.g. 0.1) rather than the default 0.7, which
      underfits small models (see :func:`samtx.looksam_perturbation`).
    momentum, nesterov, axis_name, norm_axis_name: as in :func:`samtx.gsam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs the
    keyword-only ``grad_fn(params) -> grads``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> opt = samtx.looksam(0.1, rho=0.05, k=5, momentum=0.9)
    >>> state = opt.init(jnp.zeros(3))

  References:
    Liu et al., 2022, https://arxiv.org/abs/2203.02714
  """
  return _on_sgd(
      perturbations.looksam_perturbation(
          rho, k=k, alpha=alpha, axis_name=axis_name,
          norm_axis_name=norm_axis_name),
      learning_rate, momentum, nesterov, "looksam")


# ----------------------------------------------------------------------------
# FGSAM and FGSAM+, on Adam as in the official code
# ----------------------------------------------------------------------------

def fgsam(
    learning_rate,
    rho=0.05,
    *,
    lam: float = 0.5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""FGSAM on Adam: the graph network's ascent, its peer MLP's gradient.

  With :math:`g` the graph network's gradient (passed to ``update``) and
  ``grad_fn`` the gradient of the peer MLP's loss (the same weights,
  message passing off):

  .. math::
    h = \nabla L_X\big(x + \rho\, g/(\|g\|+\epsilon)\big),\quad
    u = \lambda h + (1-\lambda) g + w x,\quad
    x \leftarrow x - \eta_t\, \hat m / (\sqrt{\hat v} + \epsilon_{\text{Adam}})

  with :math:`\hat m, \hat v` Adam's bias-corrected moments of :math:`u`
  (``optax.scale_by_adam``: ``eps`` outside the square root, as in
  ``torch.optim.Adam``, the official code's base optimizer) and :math:`w`
  the ``weight_decay``. See :func:`samtx.fgsam_perturbation`.
  ``rho=0`` (with ``weight_decay=0``) is bit-for-bit
  ``optax.adam(learning_rate, b1, b2, eps)`` on ``g``.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule (the paper's default 0.05).
    lam: weight of the peer MLP's perturbed gradient, in ``[0, 1]``.
    b1: Adam's first-moment decay in ``[0, 1)``.
    b2: Adam's second-moment decay in ``[0, 1)``.
    eps: ``> 0``, Adam's epsilon (outside the square root).
    weight_decay: ``>= 0``, *coupled* L2 added to the combined gradient
      before Adam's moments, like ``torch.optim.Adam(weight_decay=...)``
      (the official code uses 5e-4). For decoupled decay chain
      :func:`samtx.fgsam_perturbation` with ``optax.adamw`` instead.
    axis_name: average the output over this mapped axis.
    norm_axis_name: mesh axes the parameters are sharded over inside
      ``jax.shard_map`` (see :func:`samtx.sam_perturbation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes the graph
    network's gradient and needs the keyword-only ``grad_fn(params) ->
    grads`` of the peer loss.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> graph_loss = lambda p: jnp.sum((p - 1.0) ** 2) + 0.1 * jnp.sum(p ** 2)
    >>> peer_loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> opt = samtx.fgsam(0.05, rho=0.05, lam=0.3)
    >>> params = jnp.zeros(3)
    >>> state = opt.init(params)
    >>> for _ in range(300):
    ...   grads = jax.grad(graph_loss)(params)
    ...   updates, state = opt.update(grads, state, params,
    ...                               grad_fn=jax.grad(peer_loss))
    ...   params = optax.apply_updates(params, updates)
    >>> params.round(2)  # between the minima of the two losses, 1/1.1 and 1
    Array([0.93, 0.93, 0.93], dtype=float32)

  References:
    Luo et al., 2024, Fast graph sharpness-aware minimization for enhancing
    and accelerating few-shot node classification, NeurIPS 2024,
    https://arxiv.org/abs/2410.16845
  """
  return _on_coupled_adam(
      perturbations.fgsam_perturbation(
          rho, lam=lam, axis_name=axis_name, norm_axis_name=norm_axis_name),
      learning_rate, b1, b2, eps, weight_decay, "fgsam")


def fgsam_plus(
    learning_rate,
    rho=0.1,
    *,
    k: int = 2,
    alpha: float = 0.7,
    lam: float = 0.5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    axis_name: Optional[str] = None,
    norm_axis_name=None,
) -> optax.GradientTransformationExtraArgs:
  r"""FGSAM+ on Adam: FGSAM every ``k``-th step, the peer MLP in between.

  ``update`` takes the peer MLP's gradient :math:`m` on every step, with
  ``grad_fn`` (the peer MLP's gradient function) and ``graph_grad_fn`` (the
  graph network's), which only every ``k``-th step evaluates; the other
  steps reuse the stored part :math:`g_v` of FGSAM's gradient orthogonal to
  :math:`m` (see :func:`samtx.fgsam_plus_perturbation`):

  .. math::
    u = \begin{cases} \lambda h + (1-\lambda)\, g_G & t \bmod k = 0\\
      m + \alpha\, \|m\|\, g_v / (\|g_v\| + \epsilon) & \text{else}
    \end{cases},\quad
    x \leftarrow x - \eta_t\, \hat m_u / (\sqrt{\hat v_u} + \epsilon_{\text{Adam}})

  with Adam's bias-corrected moments of :math:`u + w x` (``weight_decay``
  :math:`w`, coupled as in ``torch.optim.Adam``). Defaults are the official
  code's FGSAM+ settings (``k=2``, ``alpha=0.7``, ``rho=0.1``,
  ``lam=0.5``). ``rho=0`` (with ``weight_decay=0``) is bit-for-bit
  ``optax.adam`` on the MLP gradient.

  Args:
    learning_rate: ``>= 0``, a float or an optax schedule.
    rho: ``>= 0``, a float or an optax schedule.
    k: an FGSAM step every ``k`` steps, an int ``>= 1``.
    alpha: ``>= 0``, the weight of the reused direction.
    lam: weight of the peer gradient at the perturbed point, in ``[0, 1]``.
    b1: Adam's first-moment decay in ``[0, 1)``.
    b2: Adam's second-moment decay in ``[0, 1)``.
    eps: ``> 0``, Adam's epsilon (outside the square root).
    weight_decay: ``>= 0``, coupled L2 (see :func:`samtx.fgsam`).
    axis_name: average the output over this mapped axis.
    norm_axis_name: mesh axes the parameters are sharded over inside
      ``jax.shard_map`` (see :func:`samtx.sam_perturbation`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes the peer
    MLP's gradient and needs the keyword-only ``grad_fn`` and
    ``graph_grad_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> graph_loss = lambda p: jnp.sum((p - 1.0) ** 2) + 0.1 * jnp.sum(p ** 2)
    >>> peer_loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> opt = samtx.fgsam_plus(0.05, rho=0.05, k=2, alpha=0.1, lam=0.3)
    >>> @jax.jit
    ... def step(params, state):
    ...   grads = jax.grad(peer_loss)(params)  # the cheap gradient, always
    ...   updates, state = opt.update(grads, state, params,
    ...                               grad_fn=jax.grad(peer_loss),
    ...                               graph_grad_fn=jax.grad(graph_loss))
    ...   return optax.apply_updates(params, updates), state
    >>> params = jnp.zeros(3)
    >>> state = opt.init(params)
    >>> for _ in range(300):
    ...   params, state = step(params, state)
    >>> bool(jnp.all((params > 0.9) & (params < 1.0)))
    True

  References:
    Luo et al., 2024, https://arxiv.org/abs/2410.16845
  """
  return _on_coupled_adam(
      perturbations.fgsam_plus_perturbation(
          rho, k=k, alpha=alpha, lam=lam, axis_name=axis_name,
          norm_axis_name=norm_axis_name),
      learning_rate, b1, b2, eps, weight_decay, "fgsam_plus")


def _on_coupled_adam(perturbation, learning_rate, b1, b2, eps, weight_decay,
                     who):
  """``perturbation``, coupled L2 (``torch.optim.Adam``'s weight_decay: the
  decay joins the gradient before the moments), then Adam."""
  _check_learning_rate(learning_rate, who)
  moments._check_moment_args(who, b1=b1, b2=b2, eps=eps)
  _common.check_scalar("weight_decay", weight_decay, low=0.0, who=who)
  # A static 0 adds nothing (rho = 0 is then optax.adam bit for bit); under
  # inject_hyperparams the value is an array and the decay stays in (its
  # state is empty either way, so the state structure is the same).
  decay = (optax.identity() if _common.is_static_zero(weight_decay)
           else optax.add_decayed_weights(weight_decay))
  return optax.chain(
      perturbation,
      decay,
      _in_stat_dtype(optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
      optax.scale_by_learning_rate(learning_rate),
  )


def _in_stat_dtype(inner: optax.GradientTransformation
                   ) -> optax.GradientTransformation:
  """``inner`` with its state and arithmetic in the statistics dtype.

  optax's Adam keeps its moments in the params' dtype, where float16 rounds
  ``eps`` and small squared gradients to 0 (NaN on the first step). Here it
  sees float32 copies of low-precision updates and params; float32, float64
  and complex leaves pass through unchanged, so their program is optax's own
  bit for bit. The updates come back in the gradient's dtype.
  """
  def init_fn(params):
    return inner.init(_common.to_stat(params))

  def update_fn(updates, state, params=None):
    out, state = inner.update(
        _common.to_stat(updates), state,
        None if params is None else _common.to_stat(params))
    return _common.cast_like(out, updates), state

  return optax.GradientTransformation(init_fn, update_fn)
