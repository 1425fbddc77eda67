"""samtx.lookahead against optax.lookahead and a NumPy Lookahead-MSAM; the NNX
recipe for changing an injected hyper-parameter at run time; unperturb
through optax's wrappers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers
from tests import reference
from tests.test_composition import ALIASES
from tests.test_composition import kind

SYNC, SLOW_STEP, STEPS = 3, 0.3, 8  # not 0.5: alpha and 1 - alpha differ


def closed_over(opt, grad_fn):
  """``opt`` with ``grad_fn`` supplied from a closure, for wrappers (like
  optax.lookahead) that forward no extra arguments."""
  opt = optax.with_extra_args_support(opt)

  def update_fn(updates, state, params=None):
    return opt.update(updates, state, params, grad_fn=grad_fn,
                      graph_grad_fn=grad_fn)

  return optax.GradientTransformation(opt.init, update_fn)


def run_lookahead(tx, loss, params, steps, **extra_args):
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params.fast), state, params,
                               **extra_args)
    return optax.apply_updates(params, updates), state

  params = optax.LookaheadParams.init_synced(params)
  state = tx.init(params)
  trajectory = []
  for _ in range(steps):
    params, state = step(params, state)
    trajectory.append((params, state))
  return trajectory


def assert_trees_equal(a, b, **tolerance):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if tolerance:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------- samtx.lookahead vs optax
@pytest.mark.parametrize("reset_state", [False, True])
@pytest.mark.parametrize("alias", [a for a in ALIASES if kind(a) != "one_pass"],
                         ids=lambda a: a.label)
def test_lookahead_follows_optax_lookahead_with_grad_fn_closed_over(
    alias, reset_state):
  """Without a held perturbation samtx.lookahead is optax.lookahead, step for
  step and bit for bit (params and state), with grad_fn forwarded instead of
  closed over."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  ours = samtx.lookahead(alias.build(), SYNC, SLOW_STEP, reset_state)
  theirs = optax.lookahead(closed_over(alias.build(), jax.grad(loss)), SYNC,
                           SLOW_STEP, reset_state)
  got = run_lookahead(ours, loss, params, STEPS, grad_fn=jax.grad(loss),
                      graph_grad_fn=jax.grad(loss))
  want = run_lookahead(theirs, loss, params, STEPS)
  for (p, s), (q, r) in zip(got, want):  # the same operations: same bits
    assert_trees_equal(p, q)
    assert_trees_equal(s, r)
  assert float(loss(got[-1][0].slow)) < float(loss(params))


def test_lookahead_grad_fn_is_evaluated_around_the_fast_weights():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  seen = []
  tx = samtx.lookahead(samtx.sam(0.05, 0.1), SYNC, SLOW_STEP)
  pair = optax.LookaheadParams(
      fast=params, slow=jax.tree.map(lambda x: x + 10.0, params))
  grads = jax.grad(loss)(pair.fast)
  tx.update(grads, tx.init(pair), pair,
            grad_fn=lambda p: seen.append(p) or jax.grad(loss)(p))
  shift = [a - b for a, b in zip(helpers.leaves(seen[0]), helpers.leaves(params))]
  np.testing.assert_allclose(reference.norm(shift), 0.1, rtol=1e-5)


def test_lookahead_init_accepts_plain_params_like_optax():
  params = {"w": jnp.ones(3)}
  ours = samtx.lookahead(samtx.sam(0.1), SYNC, SLOW_STEP).init(params)
  theirs = optax.lookahead(optax.sgd(0.1), SYNC, SLOW_STEP).init(params)
  assert type(ours) is type(theirs) is optax.LookaheadState
  assert int(ours.steps_since_sync) == 0


# ------------------------------------------------------- Lookahead + MSAM
def lookahead_msam_numpy(problem, steps, lr, rho, momentum, sync, alpha):
  """Lookahead over MSAM's clean weights, from the equations: the fast
  weights held are x~ = x - rho v/(|v| + 1e-12); on a sync the slow weights
  move alpha of the way to the clean fast weights x, and the fast weights
  restart there, perturbed again along the (kept) momentum."""
  x = [np.array(a, np.float64) for a in problem.x0]
  slow = [a.copy() for a in x]
  v = [np.zeros_like(a) for a in x]
  held = [a.copy() for a in x]
  out = []
  for t in range(steps):
    g = problem.grad(held)
    n = reference.norm(v) + 1e-12
    x = [h + rho * vi / n for h, vi in zip(held, v)]
    v = [momentum * vi + gi for vi, gi in zip(v, g)]
    x = [xi - lr * vi for xi, vi in zip(x, v)]
    if (t + 1) % sync == 0:
      slow = [s + alpha * (xi - s) for s, xi in zip(slow, x)]
      x = [s.copy() for s in slow]
    n = reference.norm(v) + 1e-12
    held = [xi - rho * vi / n for xi, vi in zip(x, v)]
    out.append((held, x, slow))
  return out


def test_lookahead_msam_interpolates_clean_weights(dtype):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  lr, rho, mu = 0.05, 0.1, 0.9
  tx = samtx.lookahead(samtx.msam(lr, rho, momentum=mu), SYNC, SLOW_STEP)
  got = run_lookahead(tx, loss, params, STEPS)
  want = lookahead_msam_numpy(problem, STEPS, lr, rho, mu, SYNC, SLOW_STEP)
  helpers.assert_close_to_reference([p.slow for p, _ in got],
                                    [w[2] for w in want], dtype)
  helpers.assert_close_to_reference([p.fast for p, _ in got],
                                    [w[0] for w in want], dtype)
  helpers.assert_close_to_reference(
      [samtx.unperturb(p.fast, s.fast_state) for p, s in got],
      [w[1] for w in want], dtype)
  assert float(loss(got[-1][0].slow)) < float(loss(params))


def test_lookahead_msam_matches_optax_until_the_first_sync():
  """Before a sync nothing differs; on it optax.lookahead averages the
  perturbed weights, samtx.lookahead the clean ones."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  ours = run_lookahead(samtx.lookahead(samtx.msam(0.05, 0.1), SYNC, SLOW_STEP),
                       loss, params, SYNC)
  theirs = run_lookahead(optax.lookahead(samtx.msam(0.05, 0.1), SYNC,
                                         SLOW_STEP), loss, params, SYNC)
  for (p, _), (q, _) in zip(ours[:-1], theirs[:-1]):
    assert_trees_equal(p, q, rtol=1e-6, atol=1e-7)
  (p, _), (q, theirs_state) = ours[-1], theirs[-1]
  # The MSAM states agree; the perturbation they describe is c v.
  shift = samtx.unperturb(jax.tree.map(jnp.zeros_like, params),
                          theirs_state.fast_state)
  assert min(float(jnp.abs(x).max()) for x in jax.tree.leaves(shift)) > 0
  assert_trees_equal(
      q.slow, jax.tree.map(lambda a, c: a - SLOW_STEP * c, p.slow, shift),
      rtol=1e-5, atol=1e-6)


def test_lookahead_msam_reset_state_restarts_unperturbed():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  tx = samtx.lookahead(samtx.msam(0.05, 0.1), SYNC, SLOW_STEP, True)
  trajectory = run_lookahead(tx, loss, params, SYNC + 1)
  synced, state = trajectory[SYNC - 1]
  # Equal up to rounding, as with optax.lookahead: fast and slow are updated
  # by different expressions.
  assert_trees_equal(synced.fast, synced.slow, rtol=1e-6, atol=1e-7)
  assert_trees_equal(samtx.unperturb(synced.fast, state.fast_state),
                     synced.fast)
  assert int(state.fast_state.count) == 0


# ------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("make,error,message", [
    (lambda: samtx.lookahead(samtx.sam(0.1), 0, 0.5), ValueError,
     r"sync_period must lie in \[1.0, inf\]"),
    (lambda: samtx.lookahead(samtx.sam(0.1), 2.5, 0.5), TypeError,
     "sync_period must be an integer"),
    (lambda: samtx.lookahead(samtx.sam(0.1), True, 0.5), TypeError,
     "sync_period must be an integer"),
    (lambda: samtx.lookahead(samtx.sam(0.1), 5, 1.5), ValueError,
     r"slow_step_size must lie in \[0.0, 1.0\]"),
    (lambda: samtx.lookahead(samtx.sam(0.1), 5, "half"), TypeError,
     "slow_step_size must be a real scalar"),
    (lambda: samtx.lookahead(samtx.sam(0.1), 5, 0.5, "yes"), TypeError,
     "reset_state must be a bool"),
    (lambda: samtx.lookahead(samtx.sam, 5, 0.5), TypeError,
     "fast_optimizer must be an optax.GradientTransformation"),
])
def test_lookahead_bad_arguments_are_clear_errors(make, error, message):
  with pytest.raises(error, match=message):
    make()


def test_lookahead_accepts_array_hyperparameters():
  tx = samtx.lookahead(samtx.sam(0.1), jnp.array(5), jnp.array(0.5))
  params = optax.LookaheadParams.init_synced(jnp.ones(2))
  updates, _ = tx.update(jnp.ones(2), tx.init(params), params,
                         grad_fn=lambda p: p)
  assert updates.fast.shape == (2,)


def test_lookahead_update_needs_lookahead_params():
  tx = samtx.lookahead(samtx.sam(0.1), 5, 0.5)
  params = jnp.ones(2)
  with pytest.raises(TypeError, match=r"optax.LookaheadParams.init_synced"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


def test_lookahead_without_grad_fn_is_samtx_error():
  tx = samtx.lookahead(samtx.sam(0.1), 5, 0.5)
  params = optax.LookaheadParams.init_synced(jnp.ones(2))
  with pytest.raises(TypeError, match="needs the keyword-only argument grad_fn"):
    tx.update(jnp.ones(2), tx.init(params), params)


def test_optax_lookahead_cannot_forward_grad_fn():
  """The reason samtx.lookahead exists (optax 0.2.8)."""
  tx = optax.lookahead(samtx.sam(0.1), 5, 0.5)
  params = optax.LookaheadParams.init_synced(jnp.ones(2))
  with pytest.raises(TypeError, match="unexpected keyword argument 'grad_fn'"):
    tx.update(jnp.ones(2), tx.init(params), params, grad_fn=lambda p: p)


# --------------------------------------------- unperturb through wrappers
def _msam_steps(tx, params, steps=3):
  loss = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("wrap", [
    lambda tx: optax.MultiSteps(tx, 1).gradient_transformation(),
    lambda tx: optax.apply_if_finite(tx, 3),
    lambda tx: samtx.apply_if_finite(tx, 3),
    lambda tx: optax.chain(optax.add_decayed_weights(0.0), tx),
], ids=["MultiSteps", "optax.apply_if_finite", "samtx.apply_if_finite",
        "chain"])
def test_unperturb_sees_through_wrappers(wrap):
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.0, 3.0])}
  held, state = _msam_steps(wrap(samtx.msam(0.1, 0.2)), params)
  bare_held, bare_state = _msam_steps(samtx.msam(0.1, 0.2), params)
  assert_trees_equal(held, bare_held, rtol=1e-6, atol=1e-7)
  assert_trees_equal(samtx.unperturb(held, state),
                     samtx.unperturb(bare_held, bare_state),
                     rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrap", [
    lambda tx: optax.masked(tx, {"a": True, "b": False}),
    lambda tx: optax.multi_transform(
        {"msam": tx, "sgd": optax.sgd(0.1)}, {"a": "msam", "b": "sgd"}),
], ids=["masked", "multi_transform"])
def test_unperturb_sees_through_masked(wrap):
  """MSAM on leaf "a" only: unperturb shifts "a" exactly as MSAM alone on
  {"a"} would, and leaves "b" as held."""
  params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.0, 3.0])}
  held, state = _msam_steps(wrap(samtx.msam(0.1, 0.2)), params)
  bare_held, bare_state = _msam_steps(samtx.msam(0.1, 0.2), {"a": params["a"]})
  clean = samtx.unperturb(held, state)
  np.testing.assert_allclose(
      clean["a"], samtx.unperturb(bare_held, bare_state)["a"], rtol=1e-6)
  np.testing.assert_array_equal(clean["b"], held["b"])


# -------------------------------- NNX: change an injected rho at run time
def test_nnx_inject_hyperparams_recipe_changes_rho_without_warnings():
  """nnx.Optimizer over inject_hyperparams(samtx.sam): writing
  ``opt.opt_state.hyperparams['rho'][...] = value`` changes rho for the next
  step, compiles once and raises no deprecation warning (flax 0.12
  deprecates the ``.value`` setter). Checked against samtx.sam with rho
  switched by hand on plain arrays."""
  from flax import nnx
  from samtx import flax as samtx_flax

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)
  lr, rhos = 0.1, [0.05, 0.05, 0.3, 0.3, 0.0]
  loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)

  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    start = {"kernel": model.kernel[...], "bias": model.bias[...]}
    optimizer = nnx.Optimizer(
        model, optax.inject_hyperparams(samtx.sam)(learning_rate=lr,
                                                   rho=rhos[0]),
        wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model, optimizer, x, y):
      traces.append(None)
      grad_fn = samtx_flax.make_grad_fn(loss_fn, model, x, y)
      grads = nnx.grad(loss_fn)(model, x, y)
      optimizer.update(model, grads, grad_fn=grad_fn)

    for rho in rhos:
      optimizer.opt_state.hyperparams["rho"][...] = rho
      train_step(model, optimizer, x, y)
    got = {"kernel": model.kernel[...], "bias": model.bias[...]}
    assert float(optimizer.opt_state.hyperparams["rho"][...]) == rhos[-1]
  assert len(traces) == 1

  plain_loss = lambda p: jnp.mean((x @ p["kernel"] + p["bias"] - y) ** 2)
  params, state = start, samtx.sam(lr, rhos[0]).init(start)
  for rho in rhos:
    updates, state = samtx.sam(lr, rho).update(
        jax.grad(plain_loss)(params), state, params,
        grad_fn=jax.grad(plain_loss))
    params = optax.apply_updates(params, updates)
  assert_trees_equal(got, params, rtol=1e-5, atol=1e-6)
  assert float(plain_loss(params)) < float(plain_loss(start))
