"""What SAM users ask for: schedules, accumulation, mixed precision, bad input,
frozen parameters and checkpoints, each checked against a reference."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import samtx
from tests import helpers
from tests import reference

ALIASES = {
    "sam": lambda: samtx.sam(0.05, 0.1, momentum=0.9),
    "asam": lambda: samtx.sam(0.05, 0.1, adaptive=True, eta=0.01),
    "adasam": lambda: samtx.adasam(0.01, 0.05),
    "adasam_delayed": lambda: samtx.adasam(0.01, 0.05, delayed=True),
    "amsgrad": lambda: samtx.amsgrad(0.01),
    "lightsam_I": lambda: samtx.lightsam(0.1, 0.1, variant="adagrad_norm"),
    "lightsam_II": lambda: samtx.lightsam(0.1, 0.1, variant="adagrad"),
    "lightsam_III": lambda: samtx.lightsam(0.01, 0.1, variant="adam"),
    "msam": lambda: samtx.msam(0.05, 0.1),
}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize("make", [
    lambda rho: samtx.sam_perturbation(rho),
    lambda rho: samtx.sam_perturbation(rho, adaptive=True),
])
def test_rho_schedule_sets_sam_perturbation_length(make):
  """GSAM-style rho proportional to a decaying learning rate."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  lr = optax.cosine_decay_schedule(0.1, 10)
  rho = lambda count: 0.5 * lr(count) / 0.1
  tx = make(rho)
  state = tx.init(params)
  seen = []

  def grad_fn(p):
    # A scheduled rho runs the second pass inside a once-or-never loop
    # (no grad_fn call where rho_t = 0), so the point is read out with a
    # callback rather than kept as a (traced) Python value.
    jax.debug.callback(seen.append, p)
    return jax.grad(loss)(p)

  for _ in range(4):
    grads = jax.grad(loss)(params)
    _, state = tx.update(grads, state, params, grad_fn=grad_fn)
    shift = [a - b for a, b in zip(helpers.leaves(seen[-1]), helpers.leaves(params))]
    np.testing.assert_allclose(float(state.perturbation_norm), reference.norm(shift), rtol=1e-5)
  # SAM: the length equals rho(t) exactly.
  sam_tx = samtx.sam_perturbation(rho)
  state = sam_tx.init(params)
  for t in range(4):
    _, state = sam_tx.update(jax.grad(loss)(params), state, params,
                             grad_fn=jax.grad(loss))
    np.testing.assert_allclose(float(state.perturbation_norm), float(rho(t)), rtol=1e-5)


def test_lightsam_rho_schedule_scales_the_perturbation():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  sched = optax.piecewise_constant_schedule(0.2, {1: 3.0})
  a = samtx.lightsam_perturbation(sched, variant="adagrad")
  b = samtx.lightsam_perturbation(0.6, variant="adagrad")
  sa, sb = a.init(params), b.init(params)
  g = jax.grad(loss)(params)
  _, sa = a.update(g, sa, params, grad_fn=jax.grad(loss))
  _, sb = b.update(g, sb, params, grad_fn=jax.grad(loss))
  _, sa = a.update(g, sa, params, grad_fn=jax.grad(loss))  # rho = 0.6 now
  _, sb = b.update(g, sb, params, grad_fn=jax.grad(loss))
  np.testing.assert_allclose(float(sa.perturbation_norm), float(sb.perturbation_norm), rtol=1e-6)


# --------------------------------------------------------- gradient accumulation
def test_accumulation_perturbs_each_micro_batch():
  """chain(sam_perturbation, MultiSteps(sgd)): each micro-batch gets its own
  SAM gradient (m-sharpness with m = micro-batch), their mean is applied once
  every k micro-steps; 2 gradient evaluations per micro-batch."""
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(4, 16, 3)).astype(np.float32)  # 4 micro-batches
  ys = rng.normal(size=(4, 16)).astype(np.float32)
  loss = lambda p, x, y: jnp.mean((jnp.tanh(x @ p["w"]) + p["b"] - y) ** 2)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.zeros(())}
  k, lr, rho = 2, 0.1, 0.05
  opt = optax.chain(samtx.sam_perturbation(rho),
                    optax.MultiSteps(optax.sgd(lr), every_k_schedule=k)
                    .gradient_transformation())
  state = opt.init(params)
  p = params
  for i in range(4):
    grad_fn = jax.grad(lambda q: loss(q, xs[i], ys[i]))
    u, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
    p = optax.apply_updates(p, u)

  # Reference: plain JAX, per-micro-batch SAM gradients averaged by hand.
  def sam_grad(q, x, y):
    g = jax.grad(loss)(q, x, y)
    n = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
    return jax.grad(loss)(jax.tree.map(lambda a, b: a + rho * b / (n + 1e-12), q, g), x, y)

  q = params
  for start in (0, 2):
    hs = [sam_grad(q, xs[i], ys[i]) for i in range(start, start + k)]
    mean = jax.tree.map(lambda *h: sum(h) / k, *hs)
    q = jax.tree.map(lambda a, h: a - lr * h, q, mean)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_multisteps_forwards_grad_fn_to_a_wrapped_samtx_optimizer():
  """optax.MultiSteps(samtx.sam) reaches grad_fn; with k=1 it is plain SAM."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  wrapped = optax.MultiSteps(samtx.sam(0.05, 0.1), every_k_schedule=1)
  got, _ = helpers.run(wrapped, loss, params, 3)
  want, _ = helpers.run(samtx.sam(0.05, 0.1), loss, params, 3)
  for a, b in zip(jax.tree.leaves(got[-1]), jax.tree.leaves(want[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize("low", [jnp.bfloat16, jnp.float16])
def test_low_precision_run_tracks_float32_and_keeps_dtypes(name, low):
  _, loss32, params32, _ = helpers.problem_and_loss(jnp.float32)
  _, loss_low, params_low, _ = helpers.problem_and_loss(low)
  opt = ALIASES[name]()
  traj32, _ = helpers.run(opt, loss32, params32, 8)
  step = helpers.make_step(opt, loss_low)
  state = opt.init(params_low)
  state_dtypes = [x.dtype for x in jax.tree.leaves(state)]
  p = params_low
  for _ in range(8):
    p, state = step(p, state)
    assert [x.dtype for x in jax.tree.leaves(p)] == [low] * 4
    assert [x.dtype for x in jax.tree.leaves(state)] == state_dtypes
  # samtx's own statistics are float32; the SGD momentum of sam/msam is
  # optax.trace's, kept in the parameter dtype exactly as optax.sgd keeps it.
  own_statistics = jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.TraceState))
  for leaf in own_statistics:
    if isinstance(leaf, optax.TraceState):
      assert all(t.dtype == low for t in jax.tree.leaves(leaf))
    elif jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  for a, b in zip(helpers.leaves(p), helpers.leaves(traj32[-1])):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


def test_schedule_learning_rate_does_not_promote_bfloat16_updates():
  params = {"w": jnp.ones(4, jnp.bfloat16)}
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2)
  opt = samtx.adasam(optax.linear_schedule(0.1, 0.01, 10), 0.05)
  grads = jax.grad(loss)(params)
  updates, _ = opt.update(grads, opt.init(params), params, grad_fn=jax.grad(loss))
  assert updates["w"].dtype == jnp.bfloat16


# ------------------------------------------------------------------ bad input
def _poisonable_step(opt, loss, *, poison_clean_gradient):
  """A jitted step whose grad_fn returns NaNs when ``poisoned`` is set: at the
  perturbed point only, or (``poison_clean_gradient``) for the clean
  gradient too."""
  good = jax.grad(loss)
  bad = lambda p: jax.tree.map(lambda g: g * jnp.nan, p)

  @jax.jit
  def step(p, s, poisoned):
    grad_fn = lambda q: jax.lax.cond(poisoned, bad, good, q)
    grads = grad_fn(p) if poison_clean_gradient else good(p)
    u, s = opt.update(grads, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  return step


def _assert_bad_step_skipped_then_recovered(step, params, state):
  """A poisoned step leaves params and state untouched; the next good step
  equals a good step taken from before the poisoned one."""
  p, state = step(params, state, False)
  p_bad, state_bad = step(p, state, True)
  _assert_trees_equal(p_bad, p)
  _assert_trees_equal(state_bad.inner_state, state.inner_state)
  assert int(state_bad.notfinite_count) == 1 and not bool(state_bad.last_finite)
  p_next, state_next = step(p_bad, state_bad, False)
  p_ref, _ = step(p, state, False)
  _assert_trees_equal(p_next, p_ref)
  return p_next, state_next


@pytest.mark.parametrize("name", ["sam", "adasam", "lightsam_II", "msam"])
def test_apply_if_finite_skips_a_nan_step_and_recovers(name):
  """A NaN from grad_fn (or in grads) leaves params and state untouched."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = optax.apply_if_finite(ALIASES[name](), max_consecutive_errors=3)
  step = _poisonable_step(opt, loss, poison_clean_gradient=True)
  _assert_bad_step_skipped_then_recovered(step, params, opt.init(params))


def test_optax_apply_if_finite_misses_a_nan_at_the_perturbed_point():
  """The pitfall samtx.apply_if_finite exists for: optax checks only the
  incoming gradient, so a NaN from grad_fn alone passes through."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = optax.apply_if_finite(samtx.sam(0.05, 0.1), max_consecutive_errors=3)
  nan_grad_fn = lambda p: jax.tree.map(lambda x: x * jnp.nan, p)
  updates, _ = opt.update(jax.grad(loss)(params), opt.init(params), params,
                          grad_fn=nan_grad_fn)
  assert all(np.isnan(u).all() for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", ["sam", "adasam", "lightsam_III"])
def test_samtx_apply_if_finite_catches_nan_at_the_perturbed_point(name):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.apply_if_finite(ALIASES[name](), max_consecutive_errors=1)
  step = _poisonable_step(opt, loss, poison_clean_gradient=False)
  p_next, state_next = _assert_bad_step_skipped_then_recovered(
      step, params, opt.init(params))
  assert int(state_next.notfinite_count) == 0
  # Past max_consecutive_errors the update goes through (fails loudly).
  p1, s1 = step(p_next, state_next, True)
  p2, s2 = step(p1, s1, True)
  assert int(s2.notfinite_count) == 2
  assert all(np.isnan(x).any() for x in jax.tree.leaves(p2))


@pytest.mark.parametrize("name", ALIASES)
def test_all_zero_subtree_gives_finite_updates(name):
  """A subtree whose gradient is always zero (unused head, dead units)."""
  params = {"used": jnp.array([1.0, -2.0, 0.5]), "unused": {"w": jnp.ones((2, 2)), "z": jnp.zeros(3)}}
  loss = lambda p: jnp.sum(p["used"] ** 2)
  traj, state = helpers.run(ALIASES[name](), loss, params, 4)
  for leaf in jax.tree.leaves((traj[-1], state)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
  if name != "msam":  # MSAM holds a perturbation along the momentum only
    _assert_trees_equal(traj[-1]["unused"], params["unused"])
  assert float(loss(traj[-1])) < float(loss(params))


def test_frozen_leaves_recipe():
  """Frozen leaves: not perturbed, not updated; the SAM norm is over the
  trainable leaves only (what PyTorch SAM does with requires_grad=False)."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  frozen = jax.tree.map(lambda _: False, params)
  frozen["a_weight"] = True
  opt = optax.chain(optax.masked(optax.set_to_zero(), frozen),
                    samtx.sam_perturbation(0.1),
                    optax.masked(optax.set_to_zero(), frozen),
                    optax.sgd(0.05))
  calls = []
  grad_fn = jax.grad(loss)
  state = opt.init(params)
  g = grad_fn(params)
  updates, state = opt.update(g, state, params,
                              grad_fn=lambda p: calls.append(p) or grad_fn(p))
  np.testing.assert_array_equal(updates["a_weight"], 0.0)
  np.testing.assert_array_equal(calls[0]["a_weight"], params["a_weight"])
  g_train = {"b_bias": g["b_bias"], "c_block": g["c_block"]}
  n = reference.norm(helpers.leaves(g_train))
  np.testing.assert_allclose(calls[0]["b_bias"], params["b_bias"] + 0.1 * g["b_bias"] / n, rtol=1e-5)


def test_masked_wrapper_is_a_clear_error():
  params = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = optax.masked(samtx.sam(0.1), {"a": True, "b": False})
  with pytest.raises(TypeError, match="optax.masked"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


def test_integer_leaves_are_rejected_with_the_leaf_named():
  with pytest.raises(TypeError, match=r"\['step'\].*int32"):
    samtx.adasam(0.1).init({"w": jnp.ones(2), "step": jnp.array(0)})


@pytest.mark.parametrize("make,message", [
    (lambda: samtx.sam(0.1, rho=-1.0), r"rho must lie in \[0.0, inf\]"),
    (lambda: samtx.adasam(0.1, b1=1.5), r"b1 must lie in \[0.0, 1.0\)"),
    (lambda: samtx.amsgrad(0.1, eps=-1.0), r"eps must lie in \(0.0, inf\]"),
    (lambda: samtx.msam(0.1, 0.1, momentum=-0.1), r"momentum must lie in \[0.0, 1.0\)"),
    (lambda: samtx.lightsam(0.1, 0.1, variant="adamw"), r"variant must be one of"),
    (lambda: samtx.sam("fast"), r"learning_rate must be a real scalar"),
])
def test_errors_name_argument_and_valid_range(make, message):
  with pytest.raises((ValueError, TypeError), match=message):
    make()


# ---------------------------------------------------------------- checkpoints
def _resume_equals_uninterrupted(name, save, restore):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = ALIASES[name]()
  step = helpers.make_step(opt, loss)
  p, s = params, opt.init(params)
  for _ in range(3):
    p, s = step(p, s)
  blob = save((p, s))
  p_full, s_full = p, s
  for _ in range(3):
    p_full, s_full = step(p_full, s_full)
  p_res, s_res = restore(blob, (p, s))
  for _ in range(3):
    p_res, s_res = step(p_res, s_res)
  _assert_trees_equal(p_res, p_full)
  _assert_trees_equal(s_res, s_full)
  _assert_trees_equal(samtx.unperturb(p_res, s_res), samtx.unperturb(p_full, s_full))


@pytest.mark.parametrize("name", ALIASES)
def test_flax_serialization_resume_is_bit_identical(name):
  _resume_equals_uninterrupted(
      name, flax.serialization.to_bytes,
      lambda blob, target: flax.serialization.from_bytes(target, blob))


@pytest.mark.parametrize("name", ["sam", "adasam_delayed", "lightsam_III", "msam"])
def test_orbax_resume_is_bit_identical(name, tmp_path):
  checkpointer = ocp.StandardCheckpointer()

  def save(tree):
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    return tmp_path / "ckpt"

  def restore(path, target):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return checkpointer.restore(path, abstract)

  _resume_equals_uninterrupted(name, save, restore)
