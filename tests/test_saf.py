"""SAF / MESA helpers against NumPy transcriptions of the official code.

The trajectory loss is the official line ``kl_div(log softmax(out/tau),
softmax(target/tau), reduction="none").sum(-1).mean() * tau**2`` written in
NumPy; SAF's memory is checked against a dictionary of what was recorded in
which epoch; MESA's teacher against the EMA of the parameter trajectory
computed in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from samtx import parallel
from tests import helpers

TAU = 2.5            # not the default 5: both must follow the argument
DECAY = 0.7          # asymmetric, and fast enough to see in a few steps


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _official_kl(out, target, tau):
  """The official loss line, in NumPy float64: F.kl_div(input, target) is
  target * (log target - input), input = log softmax(out/tau)."""
  log_q = np.log(_np_softmax(np.asarray(out, np.float64) / tau))
  p = _np_softmax(np.asarray(target, np.float64) / tau)
  return (p * (np.log(p) - log_q)).sum(-1).mean() * tau ** 2


# -------------------------------------------------------- trajectory loss
@pytest.mark.parametrize("tau", [TAU, 5.0, 0.7])
def test_trajectory_loss_matches_the_official_line(dtype, tau):
  rng = np.random.default_rng(0)
  out = rng.normal(size=(7, 5)) * 3
  target = rng.normal(size=(7, 5)) * 3
  got = samtx.trajectory_loss(jnp.asarray(out, dtype), jnp.asarray(target, dtype),
                              temperature=tau)
  assert got.dtype == dtype
  np.testing.assert_allclose(float(got), _official_kl(out, target, tau),
                             **helpers.tolerances(dtype))
  assert float(samtx.trajectory_loss(jnp.asarray(target, dtype),
                                     jnp.asarray(target, dtype))) == pytest.approx(
                                         0.0, abs=1e-6)


def test_no_gradient_reaches_the_target_and_the_logits_gradient_is_closed_form(
    dtype):
  """d/dlogits = tau (p_s - p_t)/B; d/dtarget = 0 (stop-gradient)."""
  rng = np.random.default_rng(1)
  out = jnp.asarray(rng.normal(size=(6, 4)), dtype)
  target = jnp.asarray(rng.normal(size=(6, 4)), dtype)
  loss = lambda a, b: samtx.trajectory_loss(a, b, temperature=TAU)
  grad_logits, grad_target = jax.grad(loss, argnums=(0, 1))(out, target)
  np.testing.assert_array_equal(grad_target, 0.0)
  p_s = _np_softmax(np.asarray(out, np.float64) / TAU)
  p_t = _np_softmax(np.asarray(target, np.float64) / TAU)
  np.testing.assert_allclose(grad_logits, TAU * (p_s - p_t) / 6,
                             **helpers.tolerances(dtype))


def test_leading_axes_are_averaged_like_one_flat_batch():
  rng = np.random.default_rng(2)
  out = rng.normal(size=(3, 4, 6))
  target = rng.normal(size=(3, 4, 6))
  got = samtx.trajectory_loss(jnp.asarray(out, jnp.float32),
                              jnp.asarray(target, jnp.float32), temperature=TAU)
  want = _official_kl(out.reshape(12, 6), target.reshape(12, 6), TAU)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_large_and_infinite_logits_stay_finite():
  """log_softmax, not log(softmax): logits of 1e4 neither overflow nor give
  log 0; a class the target rules out (-inf) contributes nothing."""
  out = jnp.array([[1e4, 0.0, -1e4], [3.0, 1.0, 2.0]])
  target = jnp.array([[-jnp.inf, 1e4, 0.0], [0.0, -jnp.inf, 1.0]])
  loss, grad = jax.value_and_grad(
      lambda a: samtx.trajectory_loss(a, target, temperature=1.0))(out)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
  # Row 0: the target puts all its mass on class 1, the student
  # log-probability there is -1e4: KL = 1e4. Row 1 by hand.
  p_t = np.array([1 / (1 + np.e), 0.0, np.e / (1 + np.e)])
  log_q = np.log(_np_softmax(np.array([3.0, 1.0, 2.0])))
  row1 = sum(p * (np.log(p) - q) for p, q in zip(p_t, log_q) if p > 0)
  np.testing.assert_allclose(float(loss), (1e4 + row1) / 2, rtol=1e-6)


def test_low_precision_logits_are_promoted():
  rng = np.random.default_rng(3)
  out, target = rng.normal(size=(2, 8, 10)), rng.normal(size=(2, 8, 10))
  got = samtx.trajectory_loss(jnp.asarray(out, jnp.bfloat16),
                              jnp.asarray(target, jnp.bfloat16))
  assert got.dtype == jnp.float32
  want = _official_kl(np.asarray(jnp.asarray(out, jnp.bfloat16), np.float64)
                      .reshape(16, 10),
                      np.asarray(jnp.asarray(target, jnp.bfloat16), np.float64)
                      .reshape(16, 10), 5.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_trajectory_loss_rejects_bad_arguments():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="same shape"):
    samtx.trajectory_loss(z, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="temperature"):
    samtx.trajectory_loss(z, z, temperature=0.0)
  with pytest.raises(TypeError, match="floating"):
    samtx.trajectory_loss(jnp.zeros((2, 3), jnp.int32), z)
  with pytest.raises(TypeError, match="floating"):
    samtx.trajectory_loss(z.astype(jnp.complex64), z)


# ------------------------------------------------------------ SAF memory
@pytest.mark.parametrize("lag", [1, 2, 3])
def test_saf_ring_buffer_matches_a_record_of_every_epoch(lag):
  """Shuffled batches over 7 epochs (jitted, epoch traced): the targets of
  epoch e are what was recorded for the same examples in epoch e - lag, and
  zeros (uniform targets) before lag epochs have passed."""
  n, classes, batch = 12, 5, 4
  rng = np.random.default_rng(lag)
  memory = samtx.saf_memory(n, classes, lag=lag)
  assert memory.shape == (n, lag + 1, classes) and memory.dtype == jnp.float32
  record = jax.jit(samtx.saf_record, donate_argnums=0)
  targets = jax.jit(samtx.saf_targets)
  recorded = {}                 # (epoch, example) -> logits
  for epoch in range(7):
    order = rng.permutation(n)
    for start in range(0, n, batch):
      idx = order[start:start + batch]
      logits = rng.normal(size=(batch, classes)).astype(np.float32)
      got = targets(memory, jnp.asarray(idx), jnp.asarray(epoch))
      want = np.stack([recorded.get((epoch - lag, i), np.zeros(classes))
                       for i in idx])
      np.testing.assert_array_equal(got, want)
      memory = record(memory, jnp.asarray(idx), jnp.asarray(logits),
                      jnp.asarray(epoch))
      for i, row in zip(idx, logits):
        recorded[(epoch, i)] = row


def test_saf_record_donates_the_memory_and_stops_gradients():
  memory = samtx.saf_memory(6, 3, lag=2)
  idx = jnp.array([5, 0])
  logits = jnp.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
  record = jax.jit(samtx.saf_record, donate_argnums=0)
  new = record(memory, idx, logits, 4)
  assert memory.is_deleted()     # updated in place, not copied
  np.testing.assert_array_equal(new[5, 4 % 3], logits[0])
  np.testing.assert_array_equal(new[0, 4 % 3], logits[1])
  assert float(jnp.abs(new).sum()) == float(jnp.abs(logits).sum())
  # Recording inside a differentiated loss adds no gradient path.
  grad = jax.grad(lambda z: jnp.sum(samtx.saf_record(new, idx, z, 0)))(logits)
  np.testing.assert_array_equal(grad, 0.0)


def test_saf_step_with_targets_updates_a_donated_memory_in_place():
  """The write of a SAF step depends only on the forward pass; passing the
  step's targets orders it after the read, so the compiled step needs no
  temporary the size of the memory (XLA otherwise copies it whole)."""
  n, classes, batch = 20_000, 10, 32
  memory = samtx.saf_memory(n, classes, lag=3)
  w = jnp.ones((5, classes))
  x = jnp.ones((batch, 5))
  idx = jnp.arange(batch)

  def step(memory, w, epoch):
    targets = samtx.saf_targets(memory, idx, epoch)

    def loss(w):
      out = x @ w
      return samtx.trajectory_loss(out, targets), out
    grads, out = jax.grad(loss, has_aux=True)(w)
    memory = samtx.saf_record(memory, idx, out, epoch, targets=targets)
    return memory, w - grads

  compiled = jax.jit(step, donate_argnums=0).lower(
      memory, w, jnp.asarray(5)).compile()
  analysis = compiled.memory_analysis()
  assert analysis.alias_size_in_bytes >= memory.nbytes
  assert analysis.temp_size_in_bytes < memory.nbytes / 10
  # Same values as without the ordering.
  new_memory, _ = compiled(jnp.array(memory), w, jnp.asarray(5))
  np.testing.assert_array_equal(new_memory[:batch, 5 % 4], x @ w)
  np.testing.assert_array_equal(new_memory[batch:], 0.0)


def test_saf_memory_low_precision_and_bad_arguments():
  memory = samtx.saf_memory(4, 2, lag=1, dtype=jnp.bfloat16)
  memory = samtx.saf_record(memory, jnp.array([1]), jnp.array([[0.3, 1.7]]),
                            0)
  assert memory.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(samtx.saf_targets(memory, jnp.array([1]), 1), np.float32),
      [[0.3, 1.7]], rtol=1e-2)
  with pytest.raises(ValueError, match="lag"):
    samtx.saf_memory(4, 2, lag=0)
  with pytest.raises(TypeError, match="num_examples"):
    samtx.saf_memory(4.0, 2)
  with pytest.raises(ValueError, match="saf_memory"):
    samtx.saf_targets(jnp.zeros((4, 2)), jnp.array([0]), 0)


def test_saf_training_step_end_to_end():
  """A jitted SAF step with the memory donated: before the start epoch the
  gradient is the task gradient alone; after it, task + lam * trajectory,
  with the trajectory target read from lag epochs back (checked against the
  closed-form gradient of a linear softmax model in NumPy)."""
  n, dim, classes, lag, lam, start = 8, 3, 4, 2, 0.3, 2
  rng = np.random.default_rng(5)
  x_all = rng.normal(size=(n, dim)).astype(np.float32)
  y_all = rng.integers(0, classes, n)

  def loss_fn(w, x, y, target, use_saf):
    logits = x @ w
    task = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         y[:, None], -1))
    tra = samtx.trajectory_loss(logits, target, temperature=TAU)
    return task + jnp.where(use_saf, lam, 0.0) * tra, logits

  def step(w, memory, idx, epoch):
    x, y = jnp.asarray(x_all)[idx], jnp.asarray(y_all)[idx]
    target = samtx.saf_targets(memory, idx, epoch)
    grads, logits = jax.grad(loss_fn, has_aux=True)(w, x, y, target,
                                                    epoch >= start)
    memory = samtx.saf_record(memory, idx, logits, epoch, targets=target)
    return w - 0.1 * grads, memory, grads

  step = jax.jit(step, donate_argnums=1)
  w = jnp.asarray(rng.normal(size=(dim, classes)), jnp.float32)
  memory = samtx.saf_memory(n, classes, lag=lag)
  history = {}
  for epoch in range(5):
    for idx in np.split(rng.permutation(n), 2):
      w_before = np.asarray(w, np.float64)
      w, memory, grads = step(w, memory, jnp.asarray(idx), epoch)
      x, y = x_all[idx].astype(np.float64), y_all[idx]
      logits = x @ w_before
      p = _np_softmax(logits)
      onehot = np.eye(classes)[y]
      want = x.T @ (p - onehot) / len(idx)
      if epoch >= start:
        target = np.stack([history[(epoch - lag, i)] for i in idx])
        p_s, p_t = _np_softmax(logits / TAU), _np_softmax(target / TAU)
        want = want + lam * x.T @ (TAU * (p_s - p_t) / len(idx))
      np.testing.assert_allclose(grads, want, rtol=2e-5, atol=2e-6)
      for i, row in zip(idx, logits):
        history[(epoch, i)] = row


# ----------------------------------------------------------------- MESA
def _numpy_ema(trajectory, start, decay):
  ema = [np.asarray(x, np.float64) for x in start]
  out = []
  for params in trajectory:
    ema = [decay * e + (1 - decay) * p for e, p in zip(ema, params)]
    out.append(ema)
  return out


def _trajectory(opt, loss, params, steps, two_pass):
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(p, s):
    extra = {"grad_fn": grad_fn} if two_pass else {}
    u, s = opt.update(grad_fn(p), s, p, **extra)
    return optax.apply_updates(p, u), s

  s = opt.init(params)
  ps, states = [], []
  for _ in range(steps):
    params, s = step(params, s)
    ps.append(params)
    states.append(s)
  return ps, states


BASES = {
    "sgd_momentum": (lambda: optax.sgd(0.02, momentum=0.8), False),
    "adamw": (lambda: optax.adamw(0.01, b1=0.8, weight_decay=0.03), False),
    "sam (two-pass)": (lambda: samtx.sam(0.02, rho=0.05, momentum=0.8), True),
    "looksam (two-pass, stateful)": (
        lambda: samtx.looksam(0.02, rho=0.05, k=3, alpha=0.7), True),
}


@pytest.mark.parametrize("base", BASES)
def test_mesa_ema_matches_numpy_and_leaves_the_updates_alone(dtype, base):
  make, two_pass = BASES[base]
  _, loss, params, _ = helpers.problem_and_loss(dtype)
  steps = 60
  wrapped, states = _trajectory(samtx.mesa(make(), decay=DECAY), loss, params,
                                steps, two_pass)
  bare, _ = _trajectory(make(), loss, params, steps, two_pass)
  for a, b in zip(wrapped, bare):           # the optimization is untouched
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  want = _numpy_ema([helpers.leaves(p) for p in bare],
                    helpers.leaves(params), DECAY)
  got = [samtx.ema_params(s) for s in states]
  helpers.assert_close_to_reference(got, want, dtype)
  # The teacher lags the student.
  assert np.abs(helpers.leaves(got[5])[0] - helpers.leaves(wrapped[5])[0]
                ).max() > 1e-4


def test_mesa_inside_a_chain_and_inject_hyperparams():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  chained = optax.chain(optax.clip_by_global_norm(0.5),
                        samtx.mesa(optax.sgd(0.05), decay=DECAY))
  ps, states = _trajectory(chained, loss, params, 20, False)
  want = _numpy_ema([helpers.leaves(p) for p in ps], helpers.leaves(params),
                    DECAY)
  helpers.assert_close_to_reference(
      [samtx.ema_params(s) for s in states], want, jnp.float32)

  injected = optax.inject_hyperparams(samtx.mesa)(optimizer=optax.sgd(0.05),
                                                  decay=DECAY)
  ps, states = _trajectory(injected, loss, params, 10, False)
  # A new decay from step 10 on.
  state = states[-1]
  state.hyperparams["decay"] = jnp.asarray(0.4)
  p = ps[-1]
  for _ in range(5):
    u, state = injected.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, u)
    ps.append(p)
  ema = helpers.leaves(params)
  for t, step_params in enumerate(ps):
    d = DECAY if t < 10 else 0.4
    ema = [d * e + (1 - d) * x for e, x in zip(ema, helpers.leaves(step_params))]
  for g, w in zip(helpers.leaves(samtx.ema_params(state)), ema):
    np.testing.assert_allclose(g, w, rtol=3e-5, atol=3e-6)


def test_mesa_low_precision_keeps_a_float32_teacher():
  params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)}
  opt = samtx.mesa(optax.sgd(0.1), decay=0.99)
  state = opt.init(params)
  assert state.ema["w"].dtype == jnp.float32
  loss = lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2)
  for _ in range(3):
    u, state = opt.update(jax.grad(loss)(params), state, params)
    assert u["w"].dtype == jnp.bfloat16
    params = optax.apply_updates(params, u)
  # float32 keeps the 1% moves a bfloat16 average would round away.
  assert not np.array_equal(np.asarray(state.ema["w"]),
                            np.asarray(state.ema["w"].astype(jnp.bfloat16),
                                       np.float32))


def test_mesa_sharded_init_and_donation():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  P = jax.sharding.PartitionSpec
  specs = {"w": P("data", "model")}
  params = parallel.shard({"w": jnp.arange(32.0).reshape(4, 8)}, mesh, specs)
  opt = samtx.mesa(optax.adam(0.01), decay=DECAY)
  state = opt.init(params)
  assert state.ema["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
  assert (state.ema["w"].addressable_shards[0].data.unsafe_buffer_pointer()
          != params["w"].addressable_shards[0].data.unsafe_buffer_pointer())
  assert parallel.state_specs(opt, params, specs).ema == specs
  sharded = parallel.init_sharded(opt, params, mesh)
  assert sharded.ema["w"].sharding.spec == specs["w"]
  loss = lambda p: jnp.sum(jnp.sin(p["w"]))

  def step(p, s):
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = jax.jit(step, donate_argnums=(0, 1))(params, sharded)
  assert s.ema["w"].sharding.is_equivalent_to(params["w"].sharding, 2)
  np.testing.assert_allclose(
      s.ema["w"], DECAY * np.arange(32.0).reshape(4, 8)
      + (1 - DECAY) * np.asarray(p["w"]), rtol=1e-6)


def test_mesa_bad_arguments_and_ema_params_errors():
  with pytest.raises(TypeError, match="optimizer"):
    samtx.mesa(0.1)
  with pytest.raises(ValueError, match="decay"):
    samtx.mesa(optax.sgd(0.1), decay=1.5)
  opt = samtx.mesa(optax.sgd(0.1))
  state = opt.init(jnp.ones(2))
  with pytest.raises(ValueError, match="needs params"):
    opt.update(jnp.ones(2), state)
  with pytest.raises(ValueError, match="found 0"):
    samtx.ema_params(optax.sgd(0.1).init(jnp.ones(2)))
  two = optax.chain(samtx.mesa(optax.sgd(0.1)), samtx.mesa(optax.sgd(0.1)))
  with pytest.raises(ValueError, match="found 2"):
    samtx.ema_params(two.init(jnp.ones(2)))


def test_mesa_teacher_with_batchnorm_statistics_recipe():
  """The docstring's recipe: batch statistics averaged beside the optimizer
  with optax.incremental_update(new, ema, 1 - decay) from the initial
  statistics, teacher run in eval mode with both averages."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(6)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.6)(x)
      return nn.Dense(3)(nn.relu(x))

  model = Net()
  rng = np.random.default_rng(7)
  xs = jnp.asarray(rng.normal(size=(6, 8, 4)), jnp.float32)
  ys = jnp.asarray(rng.integers(0, 3, (6, 8)))
  variables = model.init(jax.random.key(0), xs[0], train=False)
  params, stats = variables["params"], variables["batch_stats"]
  opt = samtx.mesa(optax.sgd(0.1, momentum=0.8), decay=DECAY)
  state = opt.init(params)
  ema_stats = stats

  @jax.jit
  def step(params, stats, state, ema_stats, x, y):
    teacher = model.apply({"params": samtx.ema_params(state),
                           "batch_stats": ema_stats}, x, train=False)

    def loss_fn(p):
      logits, updated = model.apply({"params": p, "batch_stats": stats}, x,
                                    train=True, mutable=["batch_stats"])
      task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return task + 0.8 * samtx.trajectory_loss(logits, teacher), updated
    grads, updated = jax.grad(loss_fn, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    new_stats = updated["batch_stats"]
    ema_stats = optax.incremental_update(new_stats, ema_stats,
                                         step_size=1 - DECAY)
    return (optax.apply_updates(params, updates), new_stats, state, ema_stats,
            teacher)

  stats_history, param_history, teachers = [], [], []
  for x, y in zip(xs, ys):
    params, stats, state, ema_stats, teacher = step(params, stats, state,
                                                    ema_stats, x, y)
    stats_history.append(stats)
    param_history.append(params)
    teachers.append(teacher)

  want_stats = _numpy_ema([helpers.leaves(s) for s in stats_history],
                          helpers.leaves(variables["batch_stats"]), DECAY)[-1]
  for g, w in zip(helpers.leaves(ema_stats), want_stats):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # The last teacher ran with the EMA weights and statistics before the last
  # step: recompute it from the NumPy averages of the first five steps.
  before_last = _numpy_ema(
      [helpers.leaves(p) for p in param_history[:-1]],
      helpers.leaves(variables["params"]), DECAY)[-1]
  stats_before = _numpy_ema([helpers.leaves(s) for s in stats_history[:-1]],
                            helpers.leaves(variables["batch_stats"]),
                            DECAY)[-1]
  unflatten = lambda like, leaves: jax.tree.unflatten(
      jax.tree.structure(like), [jnp.asarray(v, jnp.float32) for v in leaves])
  want_teacher = model.apply(
      {"params": unflatten(params, before_last),
       "batch_stats": unflatten(stats, stats_before)}, xs[-1], train=False)
  np.testing.assert_allclose(teachers[-1], want_teacher, rtol=1e-5, atol=1e-5)
  # The statistics really moved, so the recipe is exercised.
  assert np.abs(helpers.leaves(ema_stats)[0]
                - helpers.leaves(variables["batch_stats"])[0]).max() > 1e-3
