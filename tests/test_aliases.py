"""Every alias against the independent NumPy recurrences, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers
from tests import reference

STEPS = 6


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False),
                                               (0.9, True)])
@pytest.mark.parametrize("adaptive,eta", [(False, 0.0), (True, 0.0),
                                          (True, 0.01)])
def test_sam_matches_reference(dtype, momentum, nesterov, adaptive, eta):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  opt = samtx.sam(0.05, rho=0.1, momentum=momentum, nesterov=nesterov,
                  adaptive=adaptive, eta=eta)
  got, _ = helpers.run(opt, loss, params, STEPS)
  want = reference.sam_run(problem, STEPS, 0.05, 0.1, momentum=momentum,
                           nesterov=nesterov, adaptive=adaptive, eta=eta)
  helpers.assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("delayed", [False, True])
def test_adasam_matches_reference(dtype, delayed):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  opt = samtx.adasam(0.02, rho=0.1, b1=0.8, b2=0.95, eps=1e-6,
                     delayed=delayed)
  got, _ = helpers.run(opt, loss, params, STEPS)
  want = reference.adasam_run(problem, STEPS, 0.02, 0.1, b1=0.8, b2=0.95,
                              eps=1e-6, delayed=delayed)
  helpers.assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("delayed", [False, True])
def test_amsgrad_matches_reference(dtype, delayed):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  opt = samtx.amsgrad(0.02, b1=0.8, b2=0.95, eps=1e-6, delayed=delayed)
  got, _ = helpers.run(opt, loss, params, STEPS)
  want = reference.adasam_run(problem, STEPS, 0.02, 0.0, b1=0.8, b2=0.95,
                              eps=1e-6, delayed=delayed)
  helpers.assert_close_to_reference(got, want, dtype)


@pytest.mark.parametrize("variant", samtx.LIGHTSAM_VARIANTS)
def test_lightsam_matches_reference(dtype, variant):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  opt = samtx.lightsam(0.1, rho=0.2, variant=variant, b1=0.8, b2=0.9,
                       eps=1e-6)
  got, _ = helpers.run(opt, loss, params, STEPS)
  want = reference.lightsam_run(problem, STEPS, 0.1, 0.2, variant, eps=1e-6,
                                b1=0.8, b2=0.9)
  helpers.assert_close_to_reference(got, want, dtype)


def test_delayed_differs_from_plain_after_first_step():
  """The delayed denominator must actually lag (else the flag is dead)."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  plain, _ = helpers.run(samtx.amsgrad(0.02, b2=0.5), loss, params, 3)
  delayed, _ = helpers.run(samtx.amsgrad(0.02, b2=0.5, delayed=True), loss,
                           params, 3)
  np.testing.assert_array_equal(helpers.leaves(plain[0])[0],
                                helpers.leaves(delayed[0])[0])
  assert not np.allclose(helpers.leaves(plain[2])[0],
                         helpers.leaves(delayed[2])[0])


# ------------------------------------------------------------ rho = 0 is base
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False),
                                               (0.9, True)])
def test_sam_rho_zero_is_sgd_bit_for_bit(momentum, nesterov):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  got, _ = helpers.run(samtx.sam(0.05, rho=0.0, momentum=momentum,
                                 nesterov=nesterov), loss, params, STEPS)
  want, _ = helpers.run(optax.sgd(0.05, momentum=momentum or None,
                                  nesterov=nesterov), loss, params, STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("delayed", [False, True])
def test_adasam_rho_zero_is_amsgrad_bit_for_bit(delayed):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  got, _ = helpers.run(samtx.adasam(0.02, rho=0.0, delayed=delayed), loss,
                       params, STEPS)
  want, _ = helpers.run(samtx.amsgrad(0.02, delayed=delayed), loss, params,
                        STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)


def test_msam_rho_zero_is_sgd_momentum_bit_for_bit():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  got, _ = helpers.run(samtx.msam(0.05, rho=0.0, momentum=0.9), loss, params,
                       STEPS)
  want, _ = helpers.run(optax.sgd(0.05, momentum=0.9), loss, params, STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- one step, by hand
def test_sam_one_step_by_hand():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  lr, rho, eps = 0.1, 0.05, 1e-12
  g = jax.grad(loss)(params)
  gnorm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda x, gx: x + rho * gx / (gnorm + eps), params, g)
  want = jax.tree.map(lambda x, h: x - lr * h, params, jax.grad(loss)(perturbed))
  (got,), _ = helpers.run(samtx.sam(lr, rho), loss, params, 1)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_asam_one_step_by_hand():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  lr, rho, eta, eps = 0.1, 0.5, 0.01, 1e-12
  g = jax.grad(loss)(params)
  t = jax.tree.map(lambda x: jnp.abs(x) + eta, params)
  tg_norm = jnp.sqrt(sum(jnp.sum((a * b) ** 2) for a, b in
                         zip(jax.tree.leaves(t), jax.tree.leaves(g))))
  perturbed = jax.tree.map(
      lambda x, tx, gx: x + rho * tx ** 2 * gx / (tg_norm + eps), params, t, g)
  want = jax.tree.map(lambda x, h: x - lr * h, params, jax.grad(loss)(perturbed))
  (got,), _ = helpers.run(samtx.sam(lr, rho, adaptive=True, eta=eta), loss,
                          params, 1)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sam_matches_optax_contrib_sam_opaque():
  """Same update as optax.contrib.sam(opaque) with SGD outer, normalized-SGD
  adversary, on a problem with a non-zero gradient."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  lr, rho = 0.05, 0.1
  reference_opt = optax.contrib.sam(
      optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2, opaque_mode=True)
  ours = samtx.sam(lr, rho)
  grad_fn = jax.grad(loss)
  p_ref, p_ours = params, params
  s_ref, s_ours = reference_opt.init(params), ours.init(params)
  for _ in range(4):
    g_ref = grad_fn(p_ref)
    assert sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g_ref)) > 0
    u_ref, s_ref = reference_opt.update(
        g_ref, s_ref, p_ref, grad_fn=lambda p, i: grad_fn(p))
    u_ours, s_ours = ours.update(grad_fn(p_ours), s_ours, p_ours,
                                 grad_fn=grad_fn)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    p_ref = optax.apply_updates(p_ref, u_ref)
    p_ours = optax.apply_updates(p_ours, u_ours)


# ------------------------------------------------ zero gradients, schedules
ALIASES = {
    "sam": lambda: samtx.sam(0.1, 0.05, momentum=0.9),
    "asam": lambda: samtx.sam(0.1, 0.5, adaptive=True),
    "adasam": lambda: samtx.adasam(0.01, 0.05),
    "adasam_delayed": lambda: samtx.adasam(0.01, 0.05, delayed=True),
    "amsgrad": lambda: samtx.amsgrad(0.01),
    "lightsam_I": lambda: samtx.lightsam(0.1, 0.1, variant="adagrad_norm"),
    "lightsam_II": lambda: samtx.lightsam(0.1, 0.1, variant="adagrad"),
    "lightsam_III": lambda: samtx.lightsam(0.1, 0.1, variant="adam"),
    "msam": lambda: samtx.msam(0.1, 0.1),
}


@pytest.mark.parametrize("name", ALIASES)
def test_zero_gradient_gives_finite_zero_update(name):
  opt = ALIASES[name]()
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  zero_grad_fn = lambda p: jax.tree.map(jnp.zeros_like, p)
  state = opt.init(params)
  for _ in range(3):
    updates, state = jax.jit(
        lambda g, s, p: opt.update(g, s, p, grad_fn=zero_grad_fn))(
            zero_grad_fn(params), state, params)
    for leaf in jax.tree.leaves((updates, state)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("name", ["sam", "adasam", "lightsam", "amsgrad",
                                  "msam"])
def test_learning_rate_schedule(name):
  """A schedule gives the same trajectory as the constants it yields."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  schedule = optax.piecewise_constant_schedule(0.05, {2: 0.5})
  make = {"sam": lambda lr: samtx.sam(lr, 0.05),
          "adasam": lambda lr: samtx.adasam(lr, 0.05),
          "lightsam": lambda lr: samtx.lightsam(lr, 0.05),
          "amsgrad": lambda lr: samtx.amsgrad(lr),
          "msam": lambda lr: samtx.msam(lr, 0.05)}[name]
  got, _ = helpers.run(make(schedule), loss, params, 4)
  # Same run by hand: two steps at 0.05, then two at 0.025 on the same state.
  opt_hi, opt_lo = make(0.05), make(0.025)
  state = opt_hi.init(params)
  p = params
  want = []
  for t in range(4):
    opt = opt_hi if t < 2 else opt_lo
    p, state = helpers.make_step(opt, loss)(p, state)
    want.append(p)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
