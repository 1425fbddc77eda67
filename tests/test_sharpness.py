"""samtx.sharpness against dense-Hessian and closed-form references."""

import math

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samtx import sharpness


def _tiny_mlp(seed=0, n=24):
  """A 3-5-3 tanh MLP with cross-entropy (38 parameters) and its loss."""
  k = jax.random.split(jax.random.key(seed), 5)
  params = {"w1": jax.random.normal(k[0], (3, 5)),
            "b1": 0.1 * jax.random.normal(k[1], (5,)),
            "w2": jax.random.normal(k[2], (5, 3))}
  x = jax.random.normal(k[3], (n, 3))
  y = jax.random.randint(k[4], (n,), 0, 3)

  def loss(p):
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def _dense_eigs(loss, params):
  """Eigenvalues of the dense Hessian (jax.hessian + numpy eigvalsh)."""
  flat, unravel = ravel_pytree(params)
  dense = jax.hessian(lambda f: loss(unravel(f)))(flat)
  dense = np.asarray(dense, np.float64)
  return np.linalg.eigvalsh((dense + dense.T) / 2), dense


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lanczos_matches_dense_hessian(seed):
  params, loss = _tiny_mlp(seed)
  eigs, _ = _dense_eigs(loss, params)
  n = eigs.size
  got = float(sharpness.top_hessian_eigenvalue(
      loss, params, jax.random.key(seed), num_iters=n))
  assert got == pytest.approx(eigs[-1], rel=1e-3, abs=1e-4)


def test_lanczos_ritz_values_are_lower_bounds_that_grow():
  # Cauchy interlacing: the top Ritz value never exceeds lambda_max and
  # (same start vector) never decreases with more iterations.
  params, loss = _tiny_mlp(3)
  eigs, _ = _dense_eigs(loss, params)
  values = [float(sharpness.top_hessian_eigenvalue(loss, params,
                                                   num_iters=k))
            for k in (2, 4, 8, 16)]
  tol = 1e-4 * abs(eigs[-1]) + 1e-5
  assert all(v <= eigs[-1] + tol for v in values)
  assert all(b >= a - tol for a, b in zip(values, values[1:]))
  assert values[-1] == pytest.approx(eigs[-1], rel=1e-2)


def test_power_iteration_finds_largest_magnitude_eigenvalue():
  params, loss = _tiny_mlp(4)
  eigs, _ = _dense_eigs(loss, params)
  by_size = eigs[np.argsort(np.abs(eigs))]
  ratio = abs(by_size[-2]) / abs(by_size[-1])
  assert ratio < 0.99, "test model needs an eigen-gap"
  iters = int(math.ceil(math.log(1e-7) / math.log(ratio)))
  got = float(sharpness.top_hessian_eigenvalue(
      loss, params, num_iters=iters, method="power"))
  assert got == pytest.approx(by_size[-1], rel=1e-3)


def test_hvp_matches_dense_hessian_product():
  params, loss = _tiny_mlp(5)
  _, dense = _dense_eigs(loss, params)
  flat, unravel = ravel_pytree(params)
  v = np.random.default_rng(0).normal(size=flat.shape).astype(np.float32)
  got, _ = ravel_pytree(sharpness.hvp(loss, params, unravel(jnp.asarray(v))))
  np.testing.assert_allclose(np.asarray(got), dense @ v, rtol=1e-4, atol=1e-5)


def test_top_eigenvalue_rejects_bad_arguments():
  params, loss = _tiny_mlp()
  with pytest.raises(ValueError, match="method"):
    sharpness.top_hessian_eigenvalue(loss, params, method="arnoldi")
  with pytest.raises(ValueError, match="num_iters"):
    sharpness.top_hessian_eigenvalue(loss, params, num_iters=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_perturbed_loss_gap_matches_quadratic_closed_form(seed):
  # L(x) = 0.5 x'Ax + b'x: g = Ax + b and, with u = g/|g|,
  # L(x + rho u) - L(x) = rho |g| + 0.5 rho^2 u'Au exactly.
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(6, 6))
  a, b = m @ m.T / 6, rng.normal(size=6)
  x, rho = rng.normal(size=6), float(rng.uniform(0.01, 0.5))
  g = a @ x + b
  u = g / np.linalg.norm(g)
  expected = rho * np.linalg.norm(g) + 0.5 * rho ** 2 * u @ a @ u
  aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  loss = lambda p: 0.5 * p["x"] @ aj @ p["x"] + bj @ p["x"]
  got = sharpness.perturbed_loss_gap(loss, {"x": jnp.asarray(x, jnp.float32)},
                                     rho)
  assert float(got) == pytest.approx(expected, rel=1e-4)


def test_perturbed_loss_gap_is_zero_at_zero_gradient():
  loss = lambda p: jnp.sum(p ** 2)
  assert float(sharpness.perturbed_loss_gap(loss, jnp.zeros(3), 0.1)) == 0.0


def _group_gap_numpy(w, x, y, rho):
  """Least-squares gap for one group, in float64 numpy."""
  loss = lambda v: np.mean((x @ v - y) ** 2)
  g = 2 * x.T @ (x @ w - y) / len(y)
  return loss(w + rho * g / np.linalg.norm(g)) - loss(w)


@pytest.mark.parametrize("m", [1, 3, 4, 12])
def test_m_sharpness_matches_per_group_numpy(m):
  rng = np.random.default_rng(m)
  x, y, w = rng.normal(size=(13, 4)), rng.normal(size=13), rng.normal(size=4)
  rho = 0.2
  groups = 13 // m
  expected = np.mean([_group_gap_numpy(w, x[i * m:(i + 1) * m],
                                       y[i * m:(i + 1) * m], rho)
                      for i in range(groups)])
  loss = lambda v, b: jnp.mean((b[0] @ v - b[1]) ** 2)
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  got = sharpness.m_sharpness(loss, jnp.asarray(w, jnp.float32), batch, rho,
                              m=m)
  assert float(got) == pytest.approx(expected, rel=2e-4)


def test_m_sharpness_with_whole_batch_is_the_perturbed_gap():
  params, _ = _tiny_mlp(6)
  k = jax.random.split(jax.random.key(7), 2)
  x, y = jax.random.normal(k[0], (16, 3)), jax.random.randint(k[1], (16,), 0, 3)

  def loss(p, batch):
    logits = jnp.tanh(batch[0] @ p["w1"] + p["b1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch[1]).mean()

  whole = sharpness.perturbed_loss_gap(lambda p: loss(p, (x, y)), params, 0.1)
  got = sharpness.m_sharpness(loss, params, (x, y), 0.1, m=16)
  assert float(got) == pytest.approx(float(whole), rel=1e-5)
  with pytest.raises(ValueError, match="m must be"):
    sharpness.m_sharpness(loss, params, (x, y), 0.1, m=17)
