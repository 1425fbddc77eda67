"""MSAM: the held-weights recurrence, unperturb, and its memory promise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers
from tests import reference


@pytest.mark.parametrize("momentum", [0.9, 0.3])
@pytest.mark.parametrize("nesterov", [False, True])
def test_held_weights_and_unperturb_follow_recurrence_for_20_steps(
    dtype, nesterov, momentum):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  opt = samtx.msam(0.02, rho=0.1, momentum=momentum, nesterov=nesterov)
  want = reference.msam_run(problem, 20, 0.02, 0.1, momentum=momentum,
                            nesterov=nesterov)
  tol = helpers.tolerances(dtype)
  if dtype == jnp.float32:
    tol = {"rtol": 1e-4, "atol": 2e-5}  # 20 steps of float32 rounding
  _assert_held_and_clean_follow(opt, loss, params, want, tol)


def _assert_held_and_clean_follow(opt, loss, params, want, tol):
  """Held weights and unperturb(...) match a reference's (held, clean)."""
  step = helpers.make_step(opt, loss)
  state = opt.init(params)
  for t, (held_ref, clean_ref) in enumerate(want):
    params, state = step(params, state)
    for got, ref in zip(helpers.leaves(params), held_ref):
      np.testing.assert_allclose(got, ref, err_msg=f"held, step {t}", **tol)
    clean = samtx.unperturb(params, state)
    for got, ref in zip(helpers.leaves(clean), clean_ref):
      np.testing.assert_allclose(got, ref, err_msg=f"clean, step {t}", **tol)


def test_state_is_sgd_momentum_plus_scalars():
  params = {"w": jnp.ones((30, 20)), "b": jnp.ones(20)}
  state = samtx.msam(0.1, 0.05).init(params)
  base = optax.sgd(0.1, momentum=0.9).init(params)
  big = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  base_big = [x for x in jax.tree.leaves(base) if np.ndim(x) > 0]
  assert sum(x.size for x in big) == sum(x.size for x in base_big)
  assert sum(x.size for x in big) == 30 * 20 + 20  # exactly the momentum
  scalars = [x for x in jax.tree.leaves(state) if np.ndim(x) == 0]
  assert len(scalars) <= 3


def test_first_step_holds_clean_weights_then_perturbs():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.msam(0.02, rho=0.3)
  state = opt.init(params)
  for a, b in zip(jax.tree.leaves(samtx.unperturb(params, state)),
                  jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  params, state = helpers.make_step(opt, loss)(params, state)
  shift = [a - b for a, b in zip(helpers.leaves(samtx.unperturb(params, state)),
                                 helpers.leaves(params))]
  np.testing.assert_allclose(reference.norm(shift), 0.3, rtol=1e-4)


def test_unperturb_is_identity_for_other_optimizers():
  params = {"w": jnp.arange(3.0)}
  for opt in [samtx.sam(0.1), samtx.adasam(0.1), optax.adam(0.1)]:
    out = samtx.unperturb(params, opt.init(params))
    np.testing.assert_array_equal(out["w"], params["w"])


def test_unperturb_finds_state_inside_wrappers():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  inner = samtx.msam(0.02, rho=0.1)
  wrapped = optax.chain(optax.add_decayed_weights(0.0),
                        optax.inject_hyperparams(samtx.msam)(
                            learning_rate=0.02, rho=0.1))
  p1, s1 = helpers.run(inner, loss, params, 3)
  p2, s2 = helpers.run(wrapped, loss, params, 3)
  for a, b in zip(jax.tree.leaves(samtx.unperturb(p1[-1], s1)),
                  jax.tree.leaves(samtx.unperturb(p2[-1], s2))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unperturb_rejects_ambiguous_state():
  params = {"w": jnp.ones(2)}
  state = (samtx.msam(0.1, 0.1).init(params), samtx.msam(0.1, 0.1).init(params))
  with pytest.raises(ValueError, match="MSAM states"):
    samtx.unperturb(params, state)


def test_rho_schedule_is_undone_with_the_radius_used():
  """A changing rho: unperturb removes the perturbation actually applied."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  schedule = optax.linear_schedule(0.3, 0.0, 4)
  opt = samtx.msam(0.02, rho=schedule)
  traj, state = helpers.run(opt, loss, params, 3)
  momentum_norm = reference.norm(helpers.leaves(state.base_state[0].trace))
  assert float(state.scale) * momentum_norm == pytest.approx(float(schedule(2)), rel=1e-5)
  clean = samtx.unperturb(traj[-1], state)
  shift = [a - b for a, b in zip(helpers.leaves(clean), helpers.leaves(traj[-1]))]
  np.testing.assert_allclose(reference.norm(shift), float(schedule(2)), rtol=1e-4)


def test_weight_decay_chained_before_sees_held_weights():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  wd = 0.1
  opt = optax.chain(optax.add_decayed_weights(wd), samtx.msam(0.02, rho=0.1))
  decayed_loss = lambda p: loss(p) + 0.5 * wd * sum(
      jnp.sum(x ** 2) for x in jax.tree.leaves(p))
  got, _ = helpers.run(opt, loss, params, 5)
  want, _ = helpers.run(samtx.msam(0.02, rho=0.1), decayed_loss, params, 5)
  for a, b in zip(jax.tree.leaves(got[-1]), jax.tree.leaves(want[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_donated_step_needs_at_most_one_transient_momentum():
  """The exact undo reads v_old while v_new is written: a donated step may
  hold one momentum-sized transient, never more (and keeps none after)."""
  params = {f"w{i}": jnp.ones(50_000) for i in range(4)}
  opt = samtx.msam(0.1, rho=0.05, momentum=0.9)

  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt.init(params), params).compile()
  momentum_bytes = 4 * 50_000 * 4
  assert compiled.memory_analysis().temp_size_in_bytes <= momentum_bytes * 1.01


def _msam_undo_error(opt, gradients, params):
  """max |unperturb(params) - x0| after feeding ``gradients`` with lr = 0."""
  state = opt.init(params)
  update = jax.jit(opt.update)
  for g in gradients:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  clean = samtx.unperturb(params, state)
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(clean), jax.tree.leaves(params0_of(gradients))))


def params0_of(gradients):
  return jax.tree.map(jnp.ones_like, gradients[0])


@pytest.mark.parametrize("make", [
    lambda: samtx.msam(0.0, rho=0.05, momentum=0.9),
    lambda: samtx.msam(0.0, rho=0.05, momentum=0.9, nesterov=True),
    lambda: samtx.msam(0.0, rho=0.05, momentum=0.3),
    lambda: samtx.msam_adamw(0.0, rho=0.05, weight_decay=0.1),
], ids=["sgd", "nesterov", "small_momentum", "adamw"])
@pytest.mark.parametrize("scenario", ["decay_then_step", "spike"])
def test_undo_is_exact_whatever_the_gradients(make, scenario):
  """With lr = 0 the weights must not move beyond float32 rounding.

  Rebuilding v_old from v_new = mu v_old + g loses v_old once |g| >> |v_old|:
  5 steps of a gradient, 200 zero gradients (the momentum decays to 1e-9 of
  it) and one more step left 3e-2; a spike 1e6 times the gradient does too.
  """
  rng = np.random.default_rng(0)
  g = {"w": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  zero = jax.tree.map(jnp.zeros_like, g)
  if scenario == "decay_then_step":
    gradients = [g] * 5 + [zero] * 200 + [g]
  else:
    spike = jax.tree.map(lambda x: 1e6 * x, g)
    gradients = [g] * 5 + [spike] + [g] * 3
  assert _msam_undo_error(make(), gradients, params0_of(gradients)) < 1e-6


def test_msam_adamw_follows_the_official_recurrence(dtype):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  opt = samtx.msam_adamw(0.01, rho=0.1, weight_decay=0.05)
  want = reference.msam_adamw_run(problem, 20, 0.01, 0.1, weight_decay=0.05)
  tol = ({"rtol": 1e-9, "atol": 1e-11} if dtype == jnp.float64
         else {"rtol": 1e-4, "atol": 2e-5})
  _assert_held_and_clean_follow(opt, loss, params, want, tol)


def test_msam_adamw_decay_reads_the_schedule_at_the_step_count(dtype):
  """The decoupled decay uses the same lr_t as the Adam step of that step."""
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  schedule = lambda t: 0.02 / (1.0 + 0.7 * t)
  opt = samtx.msam_adamw(schedule, rho=0.1, weight_decay=3.0)
  want = reference.msam_adamw_run(problem, 12, schedule, 0.1,
                                  weight_decay=3.0)
  tol = ({"rtol": 1e-9, "atol": 1e-11} if dtype == jnp.float64
         else {"rtol": 1e-4, "atol": 2e-5})
  _assert_held_and_clean_follow(opt, loss, params, want, tol)


def test_msam_adamw_state_is_adam_plus_scalars():
  params = {"w": jnp.ones((30, 20)), "b": jnp.ones(20)}
  state = samtx.msam_adamw(0.1, 0.05).init(params)
  adam = optax.adam(0.1).init(params)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree) if np.ndim(x))
  assert size(state) == size(adam) == 2 * (30 * 20 + 20)
  assert sum(1 for x in jax.tree.leaves(state) if np.ndim(x) == 0) <= 4


def test_msam_adamw_rho_zero_is_adam_with_multiplicative_decay():
  """rho = 0: Adam's step then x *= (1 - lr wd), written out with optax."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  lr, wd = 0.01, 0.1
  got, _ = helpers.run(samtx.msam_adamw(lr, 0.0, weight_decay=wd), loss,
                       params, 10)
  adam = optax.adam(lr)
  state = adam.init(params)
  want = params
  for t in range(10):
    updates, state = adam.update(jax.grad(loss)(want), state)
    want = jax.tree.map(lambda x, u: (x + u) * (1 - lr * wd), want, updates)
    for a, b in zip(jax.tree.leaves(got[t]), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_msam_adamw_keeps_float32_moments_for_bfloat16():
  params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
  opt = samtx.msam_adamw(0.1, 0.05)
  state = opt.init(params)
  adam_state = state.base_state[0]
  assert adam_state.mu["w"].dtype == jnp.float32
  assert adam_state.nu["w"].dtype == jnp.float32
  updates, _ = opt.update(params, state, params)
  assert updates["w"].dtype == jnp.bfloat16


def test_msam_adamw_rejects_bad_arguments():
  with pytest.raises(ValueError, match="weight_decay"):
    samtx.msam_adamw(0.1, 0.05, weight_decay=-1.0)
  with pytest.raises(ValueError, match="rho"):
    samtx.msam_adamw(0.1, -0.05)
  with pytest.raises(ValueError, match="b2"):
    samtx.msam_adamw(0.1, 0.05, b2=1.0)
  opt = samtx.msam_adamw(0.1, 0.05)
  params = jnp.ones(3)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, opt.init(params))
