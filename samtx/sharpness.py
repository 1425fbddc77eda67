"""Sharpness metrics: the top Hessian eigenvalue and the perturbed-loss gap.

Everything here is matrix-free (Hessian-vector products through
``jax.jvp(jax.grad(loss))``), jit-compiled and works on any parameter pytree.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

__all__ = [
    "hvp",
    "top_hessian_eigenvalue",
    "perturbed_loss_gap",
    "m_sharpness",
]

LossFn = Callable[[Any], jax.Array]


def hvp(loss_fn: LossFn, params, vector):
  """Hessian-vector product ``H(params) @ vector`` by forward-over-reverse.

  Args:
    loss_fn: scalar loss of ``params``.
    params: the point where the Hessian is taken (a pytree).
    vector: a pytree like ``params``.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> hvp(lambda p: jnp.sum(p ** 3), jnp.array([1.0, 2.0]), jnp.ones(2))
    Array([ 6., 12.], dtype=float32)
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def _flat_hvp(loss_fn, params):
  """``v -> H v`` on the flattened parameter vector, and that vector."""
  flat, unravel = ravel_pytree(params)
  flat_loss = lambda f: loss_fn(unravel(f))
  return (lambda v: jax.jvp(jax.grad(flat_loss), (flat,), (v,))[1]), flat


def _lanczos(matvec, v0, num_iters: int):
  """Largest eigenvalue of a symmetric operator by Lanczos.

  Full re-orthogonalisation; on breakdown (an invariant subspace is found)
  the next basis vector is a fresh direction orthogonal to the basis, with a
  zero off-diagonal entry, so the tridiagonal matrix stays exact.
  """
  n = v0.shape[0]
  k = num_iters
  basis = jnp.zeros((k + 1, n), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  restarts = jax.random.normal(jax.random.key(17), (k, n), v0.dtype)

  def orthogonalise(w, basis, upto):
    mask = (jnp.arange(k + 1) <= upto)[:, None]
    q = basis * mask
    for _ in range(2):  # twice is enough (Kahan-Parlett)
      w = w - q.T @ (q @ w)
    return w

  def body(j, carry):
    basis, alphas, betas = carry
    q = basis[j]
    w = matvec(q)
    alpha = jnp.vdot(q, w)
    w = orthogonalise(w, basis, j)
    beta = jnp.linalg.norm(w)
    scale = jnp.maximum(jnp.max(jnp.abs(alphas)), jnp.abs(alpha))
    broke = beta <= 1e-6 * scale + 1e-30
    fresh = orthogonalise(restarts[j], basis, j)
    w = jnp.where(broke, fresh, w)
    beta = jnp.where(broke, 0.0, beta)
    basis = basis.at[j + 1].set(w / jnp.linalg.norm(w))
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

  alphas = jnp.zeros(k, v0.dtype)
  betas = jnp.zeros(k, v0.dtype)
  _, alphas, betas = jax.lax.fori_loop(0, k, body, (basis, alphas, betas))
  tri = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
  return jnp.linalg.eigvalsh(tri)[-1]


def _power(matvec, v0, num_iters: int):
  """Rayleigh quotient after power iteration (the largest-|lambda| one)."""
  def body(_, v):
    w = matvec(v)
    return w / (jnp.linalg.norm(w) + 1e-30)
  v = jax.lax.fori_loop(0, num_iters, body, v0 / jnp.linalg.norm(v0))
  return jnp.vdot(v, matvec(v))


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters", "method"))
def top_hessian_eigenvalue(loss_fn: LossFn, params, key=None, *,
                           num_iters: int = 20, method: str = "lanczos"):
  """Top eigenvalue of the Hessian of ``loss_fn`` at ``params``, matrix-free.

  ``method="lanczos"`` returns the largest (algebraic) eigenvalue estimate of
  ``num_iters`` Lanczos steps with full re-orthogonalisation (exact once
  ``num_iters`` reaches the number of parameters). ``method="power"`` runs
  power iteration and returns the Rayleigh quotient of the dominant
  eigenvector, i.e. the eigenvalue of largest magnitude (the same as the top
  one near a minimum, where the Hessian is close to positive semi-definite).
  Only Hessian-vector products are formed, never the dense Hessian.

  Args:
    loss_fn: scalar loss of a parameter pytree. It must be hashable (a
      function object); close over the data. Pass the same function object
      across calls to avoid recompiling.
    params: the point where the Hessian is taken.
    key: PRNG key for the random start vector (``jax.random.key(0)`` if
      ``None``).
    num_iters: Lanczos steps or power iterations (static; Lanczos uses at
      most the number of parameters).
    method: ``"lanczos"`` or ``"power"``.

  Returns:
    A scalar array.

  Raises:
    ValueError: unknown ``method`` or ``num_iters < 1``.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p: 1.5 * jnp.sum(p["a"] ** 2) + 0.5 * jnp.sum(p["b"] ** 2)
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> round(float(top_hessian_eigenvalue(loss, params, num_iters=5)), 4)
    3.0

  References:
    Lanczos, 1950; Ghorbani et al., 2019, An investigation into neural net
    optimization via Hessian eigenvalue density,
    https://arxiv.org/abs/1901.10159; Yao et al., 2020, PyHessian,
    https://arxiv.org/abs/1912.07145
  """
  if method not in ("lanczos", "power"):
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}.")
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}.")
  matvec, flat = _flat_hvp(loss_fn, params)
  key = jax.random.key(0) if key is None else key
  v0 = jax.random.normal(key, flat.shape, flat.dtype)
  if method == "power":
    return _power(matvec, v0, num_iters)
  return _lanczos(matvec, v0, min(num_iters, flat.shape[0]))


def perturbed_loss_gap(loss_fn: LossFn, params, rho, *, eps: float = 1e-12):
  r"""SAM's sharpness: ``loss(x + rho g/||g||) - loss(x)``.

  .. math::
    \max_{\|e\|\le\rho} L(x+e) - L(x) \approx
    L\big(x + \rho\, g/(\|g\|+\epsilon)\big) - L(x)

  with :math:`g = \nabla L(x)` and the global L2 norm over the pytree.

  Args:
    loss_fn: scalar loss of ``params``.
    params: a parameter pytree.
    rho: radius ``>= 0``.
    eps: keeps a zero gradient finite.

  Returns:
    A scalar array.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p: jnp.sum(p ** 2)   # g = 2x, gap = 2 rho |x| + rho^2
    >>> round(float(perturbed_loss_gap(loss, jnp.array([3.0, 4.0]), 0.1)), 4)
    1.01

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412 (Eq. 1 and Sec. 4.1)
  """
  value, grads = jax.value_and_grad(loss_fn)(params)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  scale = rho / (norm + eps)
  shifted = jax.tree.map(lambda p, g: p + scale * g, params, grads)
  return loss_fn(shifted) - value


def m_sharpness(loss_fn: Callable[[Any, Any], jax.Array], params, batch, rho,
                m: int, *, eps: float = 1e-12):
  """m-sharpness: the perturbed-loss gap averaged over sub-batches of size m.

  The batch (a pytree whose leaves share a leading axis of size ``n``) is cut
  into ``n // m`` consecutive groups of ``m`` examples (a remainder is
  dropped); each group gets its own ascent direction from its own gradient,
  and the gaps are averaged. ``m = n`` is :func:`perturbed_loss_gap` on the
  whole batch; small ``m`` is what SAM's per-device perturbations measure.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (a mean over the batch).
    params: a parameter pytree.
    batch: a pytree of arrays with a common leading axis.
    rho: radius ``>= 0``.
    m: group size, ``1 <= m <= n``.
    eps: keeps a zero gradient finite.

  Returns:
    A scalar array.

  Raises:
    ValueError: ``m`` outside ``[1, n]``.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda p, b: jnp.mean((b * p) ** 2)
    >>> batch = jnp.array([1.0, 2.0, 3.0, 4.0])
    >>> float(m_sharpness(loss, jnp.array(1.0), batch, 0.0, m=2))
    0.0

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412 (Sec. 4.1);
    Andriushchenko & Flammarion, 2022, Towards understanding sharpness-aware
    minimization, https://arxiv.org/abs/2206.06232
  """
  n = jax.tree.leaves(batch)[0].shape[0]
  if not 1 <= m <= n:
    raise ValueError(f"m must be in [1, {n}] (the batch size), got {m}.")
  groups = n // m
  grouped = jax.tree.map(
      lambda a: a[: groups * m].reshape((groups, m) + a.shape[1:]), batch)
  gap = lambda b: perturbed_loss_gap(lambda p: loss_fn(p, b), params, rho,
                                     eps=eps)
  return jnp.mean(jax.vmap(gap)(grouped))
