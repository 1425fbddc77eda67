"""GPA (samtx.gpa) and samtx.eval_params against independent references.

The references: the official special cases (eval_interp = 0 is the base
optimizer; heavy-ball and Nesterov momentum as optax.sgd computes them, with
the learning rate scaled by 1/(1-b) as the official tests do) and a NumPy
transcription of the three-sequence recurrence (x, y, z all stored, no
recovery of x), around AdamW and around SAM.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import samtx
from samtx import parallel
from tests import helpers
from tests import reference

TRAIN, EVAL = 0.7, 0.9          # asymmetric interpolation constants
LR, B1, B2, EPS, WD = 0.01, 0.8, 0.95, 1e-8, 0.03


def _numpy_adamw(lr_at):
  """AdamW on a list of leaves, as optax.adamw computes it (decay on the
  params it is given, lr from ``lr_at(t)``)."""
  class AdamW:
    def __init__(self, xs):
      self.m = [np.zeros(np.shape(x)) for x in xs]
      self.v = [np.zeros(np.shape(x)) for x in xs]
      self.t = 0

    def __call__(self, gs, xs):
      lr = lr_at(self.t)
      self.t += 1
      self.m = [B1 * m + (1 - B1) * g for m, g in zip(self.m, gs)]
      self.v = [B2 * v + (1 - B2) * g * g for v, g in zip(self.v, gs)]
      mhat = [m / (1 - B1 ** self.t) for m in self.m]
      vhat = [v / (1 - B2 ** self.t) for v in self.v]
      return [-lr * (mh / (np.sqrt(vh) + EPS) + WD * x)
              for mh, vh, x in zip(mhat, vhat, xs)]
  return AdamW


def _numpy_gpa(problem, steps, base, train_interp, eval_interp):
  """The three sequences, each stored: y_t gradient point, z_t base iterate,
  x_t evaluation point. ``train_interp(t)`` may change with the step."""
  z = [np.array(x, np.float64) for x in problem.x0]
  x = [a.copy() for a in z]
  y = [a.copy() for a in z]
  rule = base(z)
  ys, xs, zs = [], [], []
  for t in range(steps):
    u = rule(problem.grad(y), z)
    z = [a + b for a, b in zip(z, u)]
    x = [eval_interp * a + (1 - eval_interp) * b for a, b in zip(x, z)]
    mu_y = train_interp(t)
    y = [mu_y * a + (1 - mu_y) * b for a, b in zip(x, z)]
    ys.append(y)
    xs.append(x)
    zs.append(z)
  return ys, xs, zs


def _run(opt, loss, params, steps, **extra):
  """Jitted steps; the held params, eval_params and z after every step."""
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(grad_fn(params), state, params, **extra)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  ys, xs, zs = [], [], []
  for _ in range(steps):
    params, state = step(params, state)
    ys.append(params)
    xs.append(samtx.eval_params(params, state))
    zs.append(_gpa_state(state).z)
  return ys, xs, zs, state


def _gpa_state(state):
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, samtx.GPAState))
           if isinstance(s, samtx.GPAState)]
  assert len(found) == 1
  return found[0]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------ special cases
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("base_name", ["adamw", "sam_momentum"])
def test_eval_interp_zero_is_the_base_optimizer_bit_for_bit(base_name, dtype):
  """mu_x = 0: x = y = z for any mu_y, the update is the base's, bit for bit
  (the official test checks AdamW to 1e-6; here every bit, jitted)."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  loss32 = lambda p: loss(jax.tree.map(lambda x: x.astype(jnp.float32), p))
  make = {"adamw": lambda: optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD),
          "sam_momentum": lambda: samtx.sam(0.02, rho=0.05, momentum=0.8)}
  grad_fn = jax.grad(loss32)

  def run(opt):
    @jax.jit
    def step(p, s):
      u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s
    p, s = params, opt.init(params)
    for _ in range(20):
      p, s = step(p, s)
    return p, s

  wrapped_params, wrapped_state = run(
      samtx.gpa(make[base_name](), train_interp=0.3, eval_interp=0.0))
  base_params, base_state = run(make[base_name]())
  _assert_trees_equal(wrapped_params, base_params)
  _assert_trees_equal(wrapped_state.z, base_params)
  _assert_trees_equal(wrapped_state.base_state, base_state)
  _assert_trees_equal(samtx.eval_params(wrapped_params, wrapped_state),
                      base_params)

  # A traced 0 takes the general path: (1 - 0) u - (1 - 0) (y - z) with
  # y = z; XLA fuses it with the base's arithmetic, so equal to rounding.
  injected = optax.inject_hyperparams(samtx.gpa, hyperparam_dtype=jnp.float32)(
      base_optimizer=make[base_name](), train_interp=0.3, eval_interp=0.0)
  traced_params, traced_state = run(injected)
  ulp = float(jnp.finfo(dtype).eps)
  for got, want in zip(jax.tree.leaves(traced_params),
                       jax.tree.leaves(base_params)):
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32),
                               rtol=4 * ulp, atol=4 * ulp)
  for z, y in zip(jax.tree.leaves(traced_state.inner_state.z),
                  jax.tree.leaves(traced_params)):
    np.testing.assert_allclose(np.asarray(z, np.float32),
                               np.asarray(y, np.float32),
                               rtol=4 * ulp, atol=4 * ulp)


@pytest.mark.parametrize("momentum", [0.7, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_special_cases_match_optax_sgd(momentum, nesterov):
  """eval_interp = b with train_interp = 1 is heavy ball, equal interps are
  Nesterov; GPA's SGD takes lr/(1-b) (GPA scales its base step by
  1 - mu_x mu_y, heavy ball amplifies by 1/(1-b))."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  lr = 0.02
  want, _ = helpers.run(optax.sgd(lr, momentum=momentum, nesterov=nesterov),
                        loss, params, 60)
  gpa = samtx.gpa(optax.sgd(lr / (1 - momentum)),
                  train_interp=momentum if nesterov else 1.0,
                  eval_interp=momentum)
  got, _ = helpers.run(gpa, loss, params, 60)
  helpers.assert_close_to_reference(got, [helpers.leaves(w) for w in want],
                                    jnp.float32)


# ---------------------------------------------------- the NumPy recurrence
@pytest.mark.parametrize("interps", [(TRAIN, EVAL), (0.3, 0.6), (1.0, 0.95)])
@pytest.mark.parametrize("schedule", [False, True])
def test_three_sequences_around_adamw_match_numpy(dtype, interps, schedule):
  """200 steps of GPA(AdamW) against the stored-x NumPy recurrence, in float32
  and float64; with a warmup-cosine schedule in the base optimizer too."""
  train_interp, eval_interp = interps
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  # Linear warmup, then exponential decay; the reference evaluates the same
  # formula in NumPy float64.
  lr = ((lambda count: LR * jnp.minimum(1.0, (count + 1.0) / 20.0) * 0.99 ** count)
        if schedule else LR)
  lr_at = ((lambda t: LR * min(1.0, (t + 1) / 20) * 0.99 ** t) if schedule
           else (lambda t: LR))
  steps = 200
  opt = samtx.gpa(optax.adamw(lr, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
                  train_interp=train_interp, eval_interp=eval_interp)
  ys, xs, zs, _ = _run(opt, loss, params, steps)
  want = _numpy_gpa(problem, steps, _numpy_adamw(lr_at),
                    lambda t: train_interp, eval_interp)
  # float32 against the float64 reference: Adam's m/sqrt(v) amplifies the
  # rounding of coordinates whose gradient is near zero (up to ~1e-4 here).
  tolerance = (helpers.tolerances(dtype) if dtype == jnp.float64
               else {"rtol": 2e-4, "atol": 2e-5})
  for got_seq, want_seq in zip((ys, xs, zs), want):
    for t in range(steps):
      for g, w in zip(helpers.leaves(got_seq[t]), want_seq[t]):
        np.testing.assert_allclose(g, w, err_msg=f"step {t}", **tolerance)
  # The runs moved: y, x and z differ from each other and from the start.
  final = [helpers.leaves(s[-1]) for s in (ys, xs, zs)]
  assert np.abs(final[1][0] - final[2][0]).max() > 1e-3
  assert np.abs(final[2][0] - problem.x0[0]).max() > 1e-1


def test_gpa_around_sam_perturbs_around_y(dtype):
  """The base SAM sees params = z; its grad_fn is shifted by y - z, so it is
  called at y + rho g/||g|| with g the gradient at y (NumPy reference: SAM
  with momentum on z, every point recorded)."""
  problem, loss, params, tree_of = helpers.problem_and_loss(dtype)
  rho, lr, mu = 0.05, 0.02, 0.8
  opt = samtx.gpa(samtx.sam(lr, rho=rho, momentum=mu),
                  train_interp=TRAIN, eval_interp=EVAL)
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(params, state):
    called_at = []

    def recording_grad_fn(point):
      called_at.append(point)
      return grad_fn(point)

    updates, state = opt.update(grad_fn(params), state, params,
                                grad_fn=recording_grad_fn)
    assert len(called_at) == 1
    return optax.apply_updates(params, updates), state, called_at[0]

  state = opt.init(params)
  got_y, called_at = [], []
  for _ in range(15):
    params, state, point = step(params, state)
    got_y.append(params)
    called_at.append(point)

  # The reference: the three sequences stored, SAM's ascent around y, its
  # momentum descent applied to z.
  sgd = reference.SGD(problem.x0, mu)
  z = [np.array(x, np.float64) for x in problem.x0]
  x, y = [a.copy() for a in z], [a.copy() for a in z]
  want_points, want_y = [], []
  for _ in range(15):
    es = reference.sam_perturbation(y, problem.grad(y), rho)
    point = [a + e for a, e in zip(y, es)]
    want_points.append(point)
    z = [a - lr * d for a, d in zip(z, sgd(problem.grad(point)))]
    x = [EVAL * a + (1 - EVAL) * b for a, b in zip(x, z)]
    y = [TRAIN * a + (1 - TRAIN) * b for a, b in zip(x, z)]
    want_y.append(y)
  assert len(called_at) == 15
  helpers.assert_close_to_reference(called_at, want_points, dtype)
  helpers.assert_close_to_reference(got_y, want_y, dtype)
  # Not around z: after a few steps y and z are far apart.
  assert np.abs(helpers.leaves(state.z)[0] - want_y[-1][0]).max() > 1e-3


def test_every_gradient_function_is_shifted_to_y_and_others_pass_through():
  """FGSAM+'s graph_grad_fn (any ``*_grad_fn``) is evaluated around y like
  grad_fn; other extra arguments reach the base untouched."""
  seen = {}

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params, *, grad_fn, graph_grad_fn, note):
    seen["grad"] = grad_fn(params)
    seen["graph"] = graph_grad_fn(params)
    seen["note"] = note
    return jax.tree.map(lambda u: -0.3 * u, updates), state

  opt = samtx.gpa(optax.GradientTransformationExtraArgs(init, update),
                  train_interp=0.7, eval_interp=0.9)
  y = jnp.array([1.0, -2.0])
  state = opt.init(y)
  identity = lambda p: p
  updates, state = opt.update(jnp.array([0.5, 0.25]), state, y,
                              grad_fn=identity, graph_grad_fn=identity,
                              note="kept")
  y = optax.apply_updates(y, updates)
  opt.update(jnp.array([0.5, 0.25]), state, y, grad_fn=identity,
             graph_grad_fn=identity, note="kept")
  # The base is called at z; both gradient functions are called at z + (y -
  # z) = y, not at z (which differs from y after one step).
  assert not np.allclose(np.asarray(state.z), np.asarray(y))
  np.testing.assert_allclose(seen["grad"], y, rtol=1e-6)
  np.testing.assert_allclose(seen["graph"], y, rtol=1e-6)
  assert seen["note"] == "kept"


# ------------------------------------------------- hyper-parameters, jit
def test_inject_hyperparams_equals_plain_and_a_changed_train_interp_is_exact():
  """optax.inject_hyperparams(samtx.gpa): same steps as the plain wrapper;
  then train_interp (and eval_interp) changed mid-run follow the recurrence
  with the new constants, x recovered with the mu_y that built y."""
  problem, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  base = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
  injected = optax.inject_hyperparams(samtx.gpa)(
      base_optimizer=base, train_interp=TRAIN, eval_interp=EVAL)
  plain = samtx.gpa(base, train_interp=TRAIN, eval_interp=EVAL)
  grad_fn = jax.grad(loss)
  step = jax.jit(lambda opt_update, p, s: opt_update(grad_fn(p), s, p),
                 static_argnums=0)
  p1, s1 = params, injected.init(params)
  p2, s2 = params, plain.init(params)
  for _ in range(10):
    u, s1 = step(injected.update, p1, s1)
    p1 = optax.apply_updates(p1, u)
    u, s2 = step(plain.update, p2, s2)
    p2 = optax.apply_updates(p2, u)
  for a, b in zip(jax.tree.leaves((p1, s1.inner_state)),
                  jax.tree.leaves((p2, s2))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # Run on with new constants from step 10.
  s1.hyperparams["train_interp"] = jnp.asarray(0.4, jnp.float32)
  s1.hyperparams["eval_interp"] = jnp.asarray(0.8, jnp.float32)
  for _ in range(20):
    u, s1 = step(injected.update, p1, s1)
    p1 = optax.apply_updates(p1, u)
  assert float(s1.inner_state.train_interp) == pytest.approx(0.4)

  # Reference: the recurrence with mu_y = 0.7 then 0.4 (the x and z it keeps
  # do not depend on mu_y; only y does), mu_x = 0.9 then 0.8.
  z = [np.array(x, np.float64) for x in problem.x0]
  x, y = [a.copy() for a in z], [a.copy() for a in z]
  adamw = _numpy_adamw(lambda t: LR)(z)
  for t in range(30):
    mu_y, mu_x = (TRAIN, EVAL) if t < 10 else (0.4, 0.8)
    u = adamw(problem.grad(y), z)
    z = [a + b for a, b in zip(z, u)]
    x = [mu_x * a + (1 - mu_x) * b for a, b in zip(x, z)]
    y = [mu_y * a + (1 - mu_y) * b for a, b in zip(x, z)]
  for got, want in ((p1, y), (samtx.eval_params(p1, s1), x)):
    for g, w in zip(helpers.leaves(got), want):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5)


def test_injected_base_learning_rate_changes_the_base_step():
  """The base optimizer's own hyper-parameters stay injectable: halving the
  lr inside GPA's base state halves z's next step."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.gpa(optax.inject_hyperparams(optax.sgd)(learning_rate=0.05),
                  train_interp=TRAIN, eval_interp=EVAL)
  grad_fn = jax.grad(loss)
  state = opt.init(params)
  updates, state = opt.update(grad_fn(params), state, params)
  params = optax.apply_updates(params, updates)
  state.base_state.hyperparams["learning_rate"] = jnp.asarray(0.025)
  g = grad_fn(params)
  z_before = state.z
  _, state = jax.jit(opt.update)(g, state, params)
  for z_new, z_old, gi in zip(*(jax.tree.leaves(t)
                                for t in (state.z, z_before, g))):
    np.testing.assert_allclose(z_new - z_old, -0.025 * gi, rtol=1e-5,
                               atol=1e-7)


def test_jit_with_donation_and_no_recompile():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.gpa(samtx.sam(0.02, rho=0.05), train_interp=TRAIN,
                  eval_interp=EVAL)
  grad_fn = jax.grad(loss)
  traces = []

  def step_fn(p, s):
    traces.append(None)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  step = jax.jit(step_fn)
  donated = jax.jit(step_fn, donate_argnums=(0, 1))
  p1, s1 = params, opt.init(params)
  p2, s2 = jax.tree.map(jnp.copy, params), opt.init(params)
  for _ in range(4):
    p1, s1 = step(p1, s1)
    p2, s2 = donated(p2, s2)
  assert len(traces) == 1  # traced once, for both (donation is not traced)
  _assert_trees_equal(p1, p2)
  _assert_trees_equal(s1, s2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_interp=0.0), "train_interp"),
    (dict(train_interp=1.2), "train_interp"),
    (dict(eval_interp=1.0), "eval_interp"),
    (dict(eval_interp=-0.1), "eval_interp"),
])
def test_bad_interpolation_constants_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    samtx.gpa(optax.sgd(0.1), **kwargs)


def test_bad_base_and_missing_params_are_clear_errors():
  with pytest.raises(TypeError, match="base_optimizer"):
    samtx.gpa(0.1)
  opt = samtx.gpa(optax.sgd(0.1))
  state = opt.init(jnp.ones(2))
  with pytest.raises(ValueError, match="needs params"):
    opt.update(jnp.ones(2), state)


def test_arrays_are_accepted_and_train_interp_one_keeps_y_at_x():
  """Array constants (as inject_hyperparams passes) work; mu_y = 1 holds x."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.gpa(optax.adam(LR), train_interp=jnp.asarray(1.0),
                  eval_interp=jnp.asarray(EVAL))
  ys, xs, _, _ = _run(opt, loss, params, 5)
  _assert_trees_equal(ys[-1], xs[-1])


# ------------------------------------------------ sharding and checkpoints
def test_sharded_init_keeps_z_on_the_params_sharding():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  P = jax.sharding.PartitionSpec
  specs = {"w": P("data", "model"), "b": P("model")}
  params = parallel.shard({"w": jnp.arange(32.0).reshape(4, 8),
                           "b": jnp.ones(8)}, mesh, specs)
  opt = samtx.gpa(optax.adamw(LR), train_interp=TRAIN, eval_interp=EVAL)
  state = opt.init(params)
  for key in ("w", "b"):
    assert state.z[key].sharding.is_equivalent_to(params[key].sharding, 2
                                                  if key == "w" else 1)
  # z is a copy in its own buffer: a donated step may take both.
  assert (state.z["w"].addressable_shards[0].data.unsafe_buffer_pointer()
          != params["w"].addressable_shards[0].data.unsafe_buffer_pointer())
  state_specs = parallel.state_specs(opt, params, specs)
  assert state_specs.z == specs
  assert state_specs.train_interp == P()
  sharded = parallel.init_sharded(opt, params, mesh)
  assert sharded.z["w"].sharding.spec == specs["w"]
  assert sharded.base_state[0].mu["w"].sharding.spec == specs["w"]
  _assert_trees_equal(sharded, state)

  # A sharded jitted step keeps z where the params are.
  loss = lambda p: jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["b"] ** 2)
  step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
  updates, new_state = step(params, sharded)
  assert new_state.z["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
  assert updates["w"].sharding.is_equivalent_to(params["w"].sharding, 2)


@pytest.mark.parametrize("backend", ["orbax", "flax.serialization"])
def test_checkpoint_resume_is_bit_identical(backend, tmp_path):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.gpa(samtx.sam(0.02, rho=0.05, momentum=0.8),
                  train_interp=TRAIN, eval_interp=EVAL)
  step = helpers.make_step(opt, loss)
  p, s = params, opt.init(params)
  for _ in range(4):
    p, s = step(p, s)
  if backend == "orbax":
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", (p, s))
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (p, s))
    p_restored, s_restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  else:
    import flax.serialization
    blob = flax.serialization.to_bytes((p, s))
    p_restored, s_restored = flax.serialization.from_bytes((p, s), blob)
  p_full, s_full = p, s
  for _ in range(5):
    p_full, s_full = step(p_full, s_full)
    p_restored, s_restored = step(p_restored, s_restored)
  _assert_trees_equal(p_restored, p_full)
  _assert_trees_equal(s_restored, s_full)
  _assert_trees_equal(samtx.eval_params(p_restored, s_restored),
                      samtx.eval_params(p_full, s_full))


# --------------------------------------------------------------- eval_params
def _gpa_x(params, state):
  """x = (y - (1 - mu_y) z)/mu_y, the official eval() lerp, in float64."""
  mu_y = float(state.train_interp)
  return [(y - (1 - mu_y) * z) / mu_y
          for y, z in zip(helpers.leaves(params), helpers.leaves(state.z))]


WRAPPED = {
    "bare": lambda gpa: gpa,
    "chain(clip, gpa)": lambda gpa: optax.chain(
        optax.clip_by_global_norm(1.0), gpa),
    "MultiSteps": lambda gpa: optax.MultiSteps(gpa, every_k_schedule=1),
    "apply_if_finite": lambda gpa: samtx.apply_if_finite(gpa, 3),
    "inject_hyperparams": lambda gpa: optax.inject_hyperparams(
        lambda: gpa)(),
}


@pytest.mark.parametrize("wrap", WRAPPED)
def test_eval_params_finds_gpa_anywhere_in_the_state(wrap):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = WRAPPED[wrap](samtx.gpa(optax.adam(0.05), train_interp=TRAIN,
                                eval_interp=EVAL))
  step = helpers.make_step(opt, loss)
  p, s = params, opt.init(params)
  for _ in range(6):
    p, s = step(p, s)
  got = samtx.eval_params(p, s)
  want = _gpa_x(p, _gpa_state(s))
  for g, w in zip(helpers.leaves(got), want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
  assert np.abs(helpers.leaves(got)[0] - helpers.leaves(p)[0]).max() > 1e-3


def test_eval_params_inside_masked_moves_only_the_gpa_leaves():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  mask = {"a_weight": True, "b_bias": False,
          "c_block": {"kernel": True, "scale": False}}
  opt = optax.chain(
      optax.masked(samtx.gpa(optax.adam(0.05), train_interp=TRAIN,
                             eval_interp=EVAL), mask),
      optax.masked(optax.sgd(0.05), jax.tree.map(lambda m: not m, mask)))
  step = helpers.make_step(opt, loss)
  p, s = params, opt.init(params)
  for _ in range(6):
    p, s = step(p, s)
  got = samtx.eval_params(p, s)
  np.testing.assert_array_equal(got["b_bias"], p["b_bias"])
  np.testing.assert_array_equal(got["c_block"]["scale"],
                                p["c_block"]["scale"])
  z = _gpa_state(s).z
  want = (p["a_weight"] - (1 - TRAIN) * z["a_weight"]) / TRAIN
  np.testing.assert_allclose(got["a_weight"], want, rtol=1e-6, atol=1e-6)
  assert np.abs(got["a_weight"] - p["a_weight"]).max() > 1e-3


def test_eval_params_is_unperturb_for_msam_and_params_otherwise():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  for opt in (samtx.msam(0.02, rho=0.05), samtx.sam(0.02), optax.adam(0.01),
              samtx.mesa(samtx.msam(0.02, rho=0.05))):
    step = helpers.make_step(opt, loss)
    p, s = params, opt.init(params)
    for _ in range(3):
      p, s = step(p, s)
    _assert_trees_equal(samtx.eval_params(p, s), samtx.unperturb(p, s))
  assert samtx.eval_params(params, optax.adam(0.1).init(params)) is params


def test_eval_params_of_gpa_around_msam_removes_the_current_perturbation():
  """GPA treats MSAM's held (perturbed) iterate as z; eval_params returns
  GPA's x plus c v, MSAM's current shift (unperturb applied to x). Checked
  against the three sequences stored in NumPy around MSAM's own updates."""
  problem, loss, params, tree_of = helpers.problem_and_loss(jnp.float32)
  msam = samtx.msam(0.02, rho=0.05, momentum=0.8)
  opt = samtx.gpa(msam, train_interp=TRAIN, eval_interp=EVAL)
  step = helpers.make_step(opt, loss)
  p, s = params, opt.init(params)
  msam_update = jax.jit(msam.update)
  grad_fn = jax.jit(jax.grad(loss))
  z, x, ms = params, params, msam.init(params)
  for _ in range(12):
    p, s = step(p, s)
    y = jax.tree.map(lambda a, b: TRAIN * a + (1 - TRAIN) * b, x, z)
    u, ms = msam_update(grad_fn(y), ms, z)
    z = optax.apply_updates(z, u)
    x = jax.tree.map(lambda a, b: EVAL * a + (1 - EVAL) * b, x, z)
  momentum = ms.base_state[0].trace
  want = jax.tree.map(lambda a, v: a + ms.scale * v, x, momentum)
  got = samtx.eval_params(p, s)
  for g, w in zip(helpers.leaves(got), helpers.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  # The shift is really there: x alone is off by ~rho.
  gap = sum(np.sum((a - b) ** 2) for a, b in zip(
      helpers.leaves(got), _gpa_x(p, s))) ** 0.5
  assert gap == pytest.approx(0.05, rel=1e-3)


def test_eval_params_of_lookahead_is_the_slow_weights():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.lookahead(samtx.gpa(optax.adam(0.05)), 3, 0.5)
  lp = optax.LookaheadParams.init_synced(params)
  state = opt.init(lp)
  grads = jax.grad(loss)(lp.fast)
  updates, state = opt.update(grads, state, lp)
  lp = optax.apply_updates(lp, updates)
  assert samtx.eval_params(lp, state) is lp.slow


def test_eval_params_refuses_two_gpa_states():
  params = jnp.ones(2)
  opt = optax.chain(samtx.gpa(optax.sgd(0.1)), samtx.gpa(optax.sgd(0.1)))
  with pytest.raises(ValueError, match="2 GPA states"):
    samtx.eval_params(params, opt.init(params))


def test_flax_eval_params_and_eval_model_use_gpa_x():
  from flax import nnx
  from flax.training import train_state

  from samtx import flax as samtx_flax
  params = {"w": jnp.array([1.0, -2.0])}
  loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
  tx = samtx.gpa(optax.sgd(0.1), train_interp=TRAIN, eval_interp=EVAL)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  for _ in range(3):
    state = state.apply_gradients(grads=jax.grad(loss)(state.params))
  want = samtx.eval_params(state.params, state.opt_state)
  _assert_trees_equal(samtx_flax.eval_params(state), want)
  assert np.abs(want["w"] - state.params["w"]).max() > 1e-3

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2))) ** 2))(model)
  optimizer.update(model, grads)
  clean = samtx_flax.eval_model(model, optimizer)
  _, held, _ = nnx.split(model, nnx.Param, ...)
  want = samtx.eval_params(nnx.as_pure(held), nnx.as_pure(optimizer.opt_state))
  np.testing.assert_array_equal(clean.kernel[...], want["kernel"])
  assert np.abs(clean.kernel[...] - model.kernel[...]).max() > 1e-4
