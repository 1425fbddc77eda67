"""Two-pass transforms: grad_fn contract, state contents, composition, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers
from tests import reference

PERTURBATIONS = {
    "sam": lambda: samtx.sam_perturbation(0.1),
    "asam": lambda: samtx.sam_perturbation(0.1, adaptive=True, eta=0.01),
    "lightsam_I": lambda: samtx.lightsam_perturbation(0.1, variant="adagrad_norm"),
    "lightsam_II": lambda: samtx.lightsam_perturbation(0.1, variant="adagrad"),
    "lightsam_III": lambda: samtx.lightsam_perturbation(0.1, variant="adam"),
}


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_grad_fn_called_once_with_perturbed_params(name):
  problem, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  tx = PERTURBATIONS[name]()
  calls = []

  def grad_fn(p):
    calls.append(p)
    return jax.grad(loss)(p)

  state = tx.init(params)
  grads = jax.grad(loss)(params)
  out, state = tx.update(grads, state, params, grad_fn=grad_fn)
  assert len(calls) == 1
  shift = [a - b for a, b in zip(helpers.leaves(calls[0]), helpers.leaves(params))]
  assert reference.norm(shift) > 0
  np.testing.assert_allclose(float(state.perturbation_norm),
                             reference.norm(shift), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grad_fn(calls[0]))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sam_perturbation_has_length_rho_and_direction_g():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  seen = []
  tx = samtx.sam_perturbation(0.3)
  grads = jax.grad(loss)(params)
  tx.update(grads, tx.init(params), params,
            grad_fn=lambda p: seen.append(p) or jax.grad(loss)(p))
  e = [a - b for a, b in zip(helpers.leaves(seen[0]), helpers.leaves(params))]
  np.testing.assert_allclose(reference.norm(e), 0.3, rtol=1e-5)
  g = helpers.leaves(grads)
  cos = sum(np.sum(a * b) for a, b in zip(e, g)) / (reference.norm(e) * reference.norm(g))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["sam", "asam", "lightsam_I"])
def test_state_holds_no_parameter_copy(name):
  """SAM/ASAM/LightSAM-I keep only scalars: no parameter-sized buffer."""
  params = {"w": jnp.ones((50, 40)), "b": jnp.ones(40)}
  state = PERTURBATIONS[name]().init(params)
  assert all(np.ndim(leaf) == 0 for leaf in jax.tree.leaves(state))


def test_lightsam_accumulators_are_monotone_and_perturbation_self_sizing():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  tx = samtx.lightsam_perturbation(1.0, variant="adagrad_norm")
  state = tx.init(params)
  sums, norms = [], []
  p = params
  for _ in range(5):
    _, state = tx.update(jax.grad(loss)(p), state, p, grad_fn=jax.grad(loss))
    sums.append(float(state.inner.sum_of_squares))
    norms.append(float(state.perturbation_norm))
    p = jax.tree.map(lambda x: 0.9 * x, p)
  assert all(b >= a for a, b in zip(sums, sums[1:]))
  np.testing.assert_allclose(norms[0], 1.0, rtol=1e-5)  # first step: s/|s|
  assert norms[-1] < norms[0]  # shrinking gradients shrink the perturbation


def test_composes_with_clipping_weight_decay_adam_and_schedule():
  """chain(sam_perturbation, clip, add_decayed_weights, adam(schedule))
  equals adam applied by hand to the clipped, decayed perturbed gradient."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  schedule = optax.linear_schedule(1e-2, 1e-3, 5)
  tail = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.add_decayed_weights(1e-2), optax.adam(schedule))
  opt = optax.chain(samtx.sam_perturbation(0.05), tail)
  got, _ = helpers.run(opt, loss, params, 4)

  grad_fn = jax.grad(loss)
  p, s = params, tail.init(params)
  for t in range(4):
    g = grad_fn(p)
    gn = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    h = grad_fn(jax.tree.map(lambda x, gx: x + 0.05 * gx / (gn + 1e-12), p, g))
    u, s = tail.update(h, s, p)
    p = optax.apply_updates(p, u)
    for a, b in zip(jax.tree.leaves(got[t]), jax.tree.leaves(p)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_changes_rho_and_lr_without_recompiling():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = optax.inject_hyperparams(samtx.sam)(learning_rate=0.05, rho=0.1)
  traces = []
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(p, s):
    traces.append(None)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  p1, state = step(params, state)
  # Same dtype (and weak type) as the stored value, so jit does not retrace.
  state.hyperparams["rho"] = jnp.zeros_like(state.hyperparams["rho"])
  state.hyperparams["learning_rate"] = jnp.full_like(
      state.hyperparams["learning_rate"], 0.01)
  p2, state = step(p1, state)
  assert len(traces) == 1
  want = helpers.make_step(samtx.sam(0.01, 0.0), loss)(p1, samtx.sam(0.01, 0.0).init(p1))[0]
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("factory", [samtx.adasam, samtx.lightsam, samtx.msam])
def test_inject_hyperparams_all_aliases_run_jitted(factory):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = optax.inject_hyperparams(factory)(learning_rate=0.01, rho=0.05)
  traj, _ = helpers.run(opt, loss, params, 2)
  direct, _ = helpers.run(factory(0.01, 0.05), loss, params, 2)
  # Injected hyper-parameters are float32 arrays, Python floats are not: the
  # (1 - b) terms round differently, hence float32-level tolerances.
  for a, b in zip(jax.tree.leaves(traj[-1]), jax.tree.leaves(direct[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("make", [
    lambda: samtx.sam_perturbation(-0.1),
    lambda: samtx.lightsam_perturbation(-1.0, variant="adam"),
    lambda: samtx.sam(0.1, rho=-0.05),
    lambda: samtx.adasam(0.1, rho=-1),
    lambda: samtx.lightsam(0.1, rho=-1),
    lambda: samtx.msam(0.1, rho=-1),
])
def test_negative_rho_rejected(make):
  with pytest.raises(ValueError, match="rho"):
    make()


@pytest.mark.parametrize("make", [
    lambda: samtx.sam_perturbation(0.1, eps=0.0),
    lambda: samtx.lightsam_perturbation(0.1, variant="adagrad", eps=-1e-8),
    lambda: samtx.scale_by_amsgrad(eps=0.0),
    lambda: samtx.adasam(0.1, eps=0.0),
    lambda: samtx.lightsam(0.1, 0.1, eps=0.0),
])
def test_non_positive_eps_rejected(make):
  with pytest.raises(ValueError, match="eps"):
    make()


@pytest.mark.parametrize("make,arg", [
    (lambda: samtx.sam(-0.1), "learning_rate"),
    (lambda: samtx.sam(0.1, momentum=1.0), "momentum"),
    (lambda: samtx.sam(0.1, eta=-1.0, adaptive=True), "eta"),
    (lambda: samtx.adasam(0.1, b1=1.0), "b1"),
    (lambda: samtx.amsgrad(0.1, b2=-0.1), "b2"),
    (lambda: samtx.sam(float("nan")), "learning_rate"),
    (lambda: samtx.sam(0.1, rho=jnp.ones(3)), "rho"),
])
def test_out_of_range_arguments_named(make, arg):
  with pytest.raises((ValueError, TypeError), match=arg):
    make()


def test_unknown_variant_rejected():
  with pytest.raises(ValueError, match="variant"):
    samtx.lightsam(0.1, 0.1, variant="sgd")
  with pytest.raises(ValueError, match="variant"):
    samtx.lightsam_perturbation(0.1, variant="adagrad-norm")


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_missing_grad_fn_is_a_clear_error(name):
  tx = PERTURBATIONS[name]()
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match="grad_fn"):
    tx.update(params, tx.init(params), params)


def test_missing_params_is_a_clear_error():
  tx = samtx.sam_perturbation(0.1)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params), None, grad_fn=lambda p: p)


def test_grad_fn_with_wrong_tree_is_a_clear_error():
  tx = samtx.sam(0.1)
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  state = tx.init(params)
  with pytest.raises(TypeError, match="grad_fn.*structure"):
    tx.update(params, state, params, grad_fn=lambda p: p["w"])
  with pytest.raises(ValueError, match="grad_fn.*shape"):
    tx.update(params, state, params,
              grad_fn=lambda p: {"w": jnp.ones(4), "b": jnp.ones(2)})
  with pytest.raises(TypeError, match="grad_fn"):
    jax.jit(lambda p, s: tx.update(p, s, p, grad_fn=lambda q: [q["w"]]))(
        params, state)


def test_two_argument_grad_fn_is_a_clear_error():
  """optax.contrib.sam's grad_fn(params, i) signature fails loudly here."""
  tx = samtx.sam(0.1)
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError):
    tx.update(params, tx.init(params), params, grad_fn=lambda p, i: p)


def test_integer_leaves_rejected():
  tx = samtx.sam(0.1)
  with pytest.raises(TypeError, match="int32"):
    tx.init({"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)})


def test_nesterov_without_momentum_rejected():
  with pytest.raises(ValueError, match="nesterov"):
    samtx.sam(0.1, nesterov=True)
