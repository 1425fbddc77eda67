"""Unnormalized SAM (``normalize=False``) against NumPy, and its per-example
1-SAM form through ``samtx.parallel.jit_step``'s perturbation groups.

The generic properties run over ``samtx.sam(..., normalize=False)`` in
``test_common_suite.py`` and in the composition matrix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from samtx import parallel
from tests import helpers
from tests import reference

STEPS, LR, RHO = 6, 0.05, 0.05


def unnormalized_ascent(xs, gs, rho, *, adaptive=False, eta=0.0):
  """x + rho g (ASAM: x + rho T^2 g with T = |x| + eta), written out."""
  if adaptive:
    return [rho * (np.abs(x) + eta) ** 2 * g for x, g in zip(xs, gs)]
  return [rho * g for g in gs]


# The step rho g is not capped at rho: on this quartic a large rho (0.3)
# throws the ascent point far out and the run overflows, in NumPy as here.
@pytest.mark.parametrize("adaptive,momentum,rho", [(False, 0.0, 0.05),
                                                   (True, 0.9, 0.01)])
def test_matches_reference(dtype, adaptive, momentum, rho):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  opt = samtx.sam(LR, rho, normalize=False, adaptive=adaptive, eta=0.01,
                  momentum=momentum or None)
  got, _ = helpers.run(opt, loss, params, STEPS)
  want = reference.run_two_pass(
      problem, STEPS, LR,
      lambda xs, gs: unnormalized_ascent(xs, gs, rho, adaptive=adaptive,
                                         eta=0.01),
      reference.SGD(problem.x0, momentum, False))
  helpers.assert_close_to_reference(got, want, dtype)
  assert float(loss(got[-1])) < float(loss(params))


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_norm_is_rho_times_the_ascent_direction(dtype, adaptive):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  tx = samtx.sam_perturbation(RHO, normalize=False, adaptive=adaptive)
  seen = []
  _, state = tx.update(jax.grad(loss)(params), tx.init(params), params,
                       grad_fn=lambda p: seen.append(p) or jax.grad(loss)(p))
  e = unnormalized_ascent(problem.x0, problem.grad(problem.x0), RHO,
                          adaptive=adaptive)
  tol = helpers.tolerances(dtype)
  np.testing.assert_allclose(float(state.perturbation_norm),
                             reference.norm(e), **tol)
  for point, x, ei in zip(helpers.leaves(seen[0]), problem.x0, e):
    np.testing.assert_allclose(point, x + ei, **tol)


def test_differs_from_sam_by_the_gradient_norm():
  """The unnormalized ascent is SAM's with radius rho ||g||."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  g = jax.grad(loss)(params)
  grad_norm = float(optax.global_norm(g))
  out, _ = samtx.sam_perturbation(RHO, normalize=False).update(
      g, samtx.sam_perturbation(RHO).init(params), params,
      grad_fn=jax.grad(loss))
  want, _ = samtx.sam_perturbation(RHO * grad_norm).update(
      g, samtx.sam_perturbation(RHO).init(params), params,
      grad_fn=jax.grad(loss))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rho_zero_is_sgd_bit_for_bit(adaptive):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  got, _ = helpers.run(samtx.sam(LR, 0.0, normalize=False, adaptive=adaptive,
                                 momentum=0.9), loss, params, STEPS)
  want, _ = helpers.run(optax.sgd(LR, momentum=0.9), loss, params, STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)


def test_zero_and_huge_gradients():
  """A zero gradient: no perturbation, finite update. A huge one moves the
  point by rho g (no normalisation caps it): the update is exactly the
  gradient there."""
  params = jnp.array([1.0, -2.0])
  tx = samtx.sam_perturbation(RHO, normalize=False)
  out, state = tx.update(jnp.zeros(2), tx.init(params), params,
                         grad_fn=lambda p: 2.0 * p)
  np.testing.assert_array_equal(out, 2.0 * params)
  assert float(state.perturbation_norm) == 0.0
  huge = jnp.array([1e6, 0.0])
  out, state = tx.update(huge, tx.init(params), params,
                         grad_fn=lambda p: 2.0 * p)
  np.testing.assert_allclose(out, 2.0 * (params + RHO * huge))
  np.testing.assert_allclose(float(state.perturbation_norm), RHO * 1e6)


def test_normalize_must_be_a_bool():
  with pytest.raises(TypeError, match="sam_perturbation: normalize must be"):
    samtx.sam_perturbation(0.1, normalize=0)
  with pytest.raises(TypeError, match="normalize must be a bool"):
    samtx.sam(0.1, 0.1, normalize="no")


def test_per_example_groups_are_unnormalized_1_sam():
  """jit_step with one perturbation group per example: every example i
  ascends along its own gradient, h_i = grad l_i(w + rho g_i), and the step
  is -lr mean_i h_i (Andriushchenko and Flammarion's 1-SAM, unnormalized)."""
  rng = np.random.default_rng(0)
  n, dim = 8, 3
  features = rng.normal(size=(n, dim))
  targets = rng.normal(size=n)
  w0 = rng.normal(size=dim)

  def loss_fn(w, batch):
    return 0.5 * jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

  # One device: the groups are a vmap, no cross-device collective is needed.
  mesh = jax.make_mesh((1,), ("batch",), devices=jax.devices()[:1])
  opt = samtx.sam(LR, RHO, normalize=False, axis_name="batch")
  step = parallel.jit_step(loss_fn, opt, mesh, m_sharpness_groups=n)
  batch = parallel.shard_batch(
      {"x": jnp.asarray(features, jnp.float32),
       "y": jnp.asarray(targets, jnp.float32)}, mesh)
  params = jnp.asarray(w0, jnp.float32)
  state = parallel.init_sharded(opt, params, mesh)
  w = w0.copy()
  for _ in range(STEPS):
    params, state, _ = step(params, state, batch)
    residual = lambda v: features @ v - targets       # per example
    per_example_grads = residual(w)[:, None] * features
    perturbed = w[None, :] + RHO * per_example_grads  # one point per example
    h = (np.sum(features * perturbed, axis=1) - targets)[:, None] * features
    w = w - LR * h.mean(axis=0)
    np.testing.assert_allclose(np.asarray(params), w, rtol=2e-5, atol=2e-6)
  # Not the global unnormalized ascent: one shared point x + rho mean_i g_i.
  g = (residual(w0)[:, None] * features).mean(axis=0)
  shared = w0 + RHO * g
  global_step = w0 - LR * (residual(shared)[:, None] * features).mean(axis=0)
  first, _, _ = parallel.jit_step(loss_fn, opt, mesh, m_sharpness_groups=n)(
      jnp.asarray(w0, jnp.float32), parallel.init_sharded(
          opt, jnp.asarray(w0, jnp.float32), mesh), batch)
  assert not np.allclose(np.asarray(first), global_step, rtol=1e-3)
