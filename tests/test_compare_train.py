"""The trainer of `samtx compare`: schedules, run batching, cost counting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samtx.compare import config
from samtx.compare import data as data_lib
from samtx.compare import models
from samtx.compare import report
from samtx.compare import train
from samtx.compare.optimizers import SPECS

MLP = config.Workload("digits", "mlp", (("hidden", (16,)),), epochs=3,
                      batch_size=64, schedule="cosine")


@pytest.fixture(scope="module")
def digits():
  data = data_lib.load("digits")
  return data._replace(x_train=data.x_train[:320], y_train=data.y_train[:320])


def _cosine(step, lr, total):
  """The documented schedule, written out: warm-up 5%, cosine to lr/10."""
  warmup = max(1, total // 20)
  if step < warmup:
    return lr * step / warmup
  frac = (step - warmup) / (total - warmup)
  return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def test_the_cosine_schedule_trains_like_a_hand_written_loop(digits):
  # SGD with momentum 0.9 under the workload's schedule, against a loop that
  # applies v = 0.9 v + g, p -= lr_t v with lr_t from the formula above.
  seed, lr = 2, 0.3
  setup = train.Setup(MLP, epochs=3, batch_size=64)
  got = train.train_runs(SPECS["sgd"], digits, setup, [lr, 0.1], [0.0, 0.0],
                         [seed, 5], [0.0, 0.0])

  key = jax.random.key(seed)
  mlp = models.MLP((64, 16, 10),
                   rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
  graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)
  params = nnx.as_pure(params)
  apply = lambda p, xb: nnx.merge(graphdef, p, rest)(xb)
  x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)

  @jax.jit
  def grad(params, idx):
    return jax.grad(lambda p: train.cross_entropy(apply(p, x[idx]), y[idx]))(
        params)

  n, b = len(digits.y_train), 64
  total = 3 * (n // b)
  velocity = jax.tree.map(jnp.zeros_like, params)
  step = 0
  for epoch_key in jax.random.split(jax.random.fold_in(key, 1), 3):
    order_key, _ = jax.random.split(epoch_key)
    perm = np.asarray(jax.random.permutation(order_key, n))
    for i in range(n // b):
      g = grad(params, perm[i * b:(i + 1) * b])
      velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, g)
      rate = _cosine(step, lr, total)
      params = jax.tree.map(lambda p, v: p - rate * v, params, velocity)
      step += 1
  full = float(train.cross_entropy(apply(params, x), y))
  assert float(got["final"]["train_loss"][0]) == pytest.approx(full, rel=2e-4)
  assert got["meta"]["seconds"] > 0


def test_mapped_runs_equal_vmapped_runs():
  # The transformer trains its runs one after the other (lax.map); a run's
  # numbers must not depend on that choice.
  text = data_lib.load("text", context=16)
  text = text._replace(x_train=text.x_train[:64], y_train=text.y_train[:64],
                       x_val=text.x_val[:16], y_val=text.y_val[:16],
                       x_test=text.x_test[:16], y_test=text.y_test[:16])
  out = {}
  for vectorize in (True, False):
    workload = config.Workload(
        "text", "transformer", (("width", 16), ("depth", 1), ("heads", 2)),
        eval_examples=16, hessian_examples=4, schedule="cosine",
        vectorize=vectorize)
    setup = train.Setup(workload, epochs=2, batch_size=16, hessian_iters=3)
    out[vectorize] = train.train_runs(SPECS["sam_adamw"], text, setup,
                                      [3e-3, 1e-2], [0.05, 0.1], [0, 1],
                                      [0.0, 0.0])
  for group in ("curves", "final"):
    for key, value in out[True][group].items():
      np.testing.assert_allclose(out[False][group][key], value, rtol=2e-4,
                                 atol=1e-5, err_msg=key)


def test_gradient_evaluations_are_counted_as_they_run(digits):
  # 10 steps: SGD and MSAM take one gradient per step, SAM two; LookSAM
  # (k = 5) takes its second on steps 0 and 5 only: 12 / 10.
  setup = train.Setup(config.WORKLOADS["digits-mlp"], epochs=1, batch_size=32)
  jobs = {"sgd": (0.1, 0.0), "sam": (0.1, 0.05), "msam": (0.1, 0.3),
          "looksam": (0.1, 0.05)}
  costs = train.step_costs(jobs, SPECS, digits, setup, steps=10, repeats=3)
  assert {k: v["grad_evals_per_step"] for k, v in costs.items()} == {
      "sgd": 1.0, "sam": 2.0, "msam": 1.0, "looksam": 1.2}
  for value in costs.values():
    assert len(value["times"]) == 3
    assert value["seconds_per_step"] == np.median(value["times"])


def test_a_time_ratio_is_the_median_of_per_round_ratios_with_its_iqr():
  timing = {"sgd": {"times": [1.0, 2.0, 1.0, 1.0, 3.0]},
            "sam": {"times": [1.9, 4.2, 2.0, 2.1, 6.0]}}
  ratios = np.array([1.9, 2.1, 2.0, 2.1, 2.0])
  got = train.timing_summary(timing, "sam", "sgd")
  assert got["ratio"] == pytest.approx(np.median(ratios))
  assert got["low"] == pytest.approx(np.percentile(ratios, 25))
  assert got["high"] == pytest.approx(np.percentile(ratios, 75))
  assert got["unstable"] is False
  # The reruns of issue 21: 0.61x in one round, 1.73x in another.
  timing["sam"]["times"] = [0.61, 3.46, 1.0, 1.5, 5.0]
  flagged = train.timing_summary(timing, "sam", "sgd")
  assert flagged["unstable"] is True
  row = {"relative_time": flagged["ratio"],
         "relative_time_low": flagged["low"],
         "relative_time_high": flagged["high"], "timing_unstable": True}
  assert report.time_cell(row) == (f"? {flagged['low']:.2f}-"
                                   f"{flagged['high']:.2f}x")
  # Two rounds are too few to call anything a measurement.
  two = {"a": {"times": [1.0, 1.0]}, "b": {"times": [2.0, 2.0]}}
  assert train.timing_summary(two, "b", "a")["unstable"] is True


def test_the_parameter_count_is_the_models():
  data = data_lib.load("digits")
  setup = train.Setup(config.WORKLOADS["digits-mlp"], 1, 32)
  assert train.parameter_count(data, setup) == 64 * 128 + 128 + 128 * 10 + 10


def _kl(logits, targets, tau=5.0):
  """The trajectory loss written out: tau^2 mean_i sum_c p_t log(p_t/p_s)."""
  p_t = jax.nn.softmax(jax.lax.stop_gradient(targets) / tau, -1)
  log_s = jax.nn.log_softmax(logits / tau, -1)
  return tau ** 2 * jnp.mean(jnp.sum(p_t * (jnp.log(p_t) - log_s), -1))


def _batches(key, n, b, epochs):
  """The trainer's minibatch order and dropout keys, epoch by epoch."""
  for epoch, epoch_key in enumerate(jax.random.split(
      jax.random.fold_in(key, 1), epochs)):
    order_key, dropout_key = jax.random.split(epoch_key)
    perm = np.asarray(jax.random.permutation(order_key, n))
    keys = jax.random.split(dropout_key, n // b)
    for i in range(n // b):
      yield epoch, perm[i * b:(i + 1) * b], keys[i]


def _sgd_momentum(params, velocity, grads, lr):
  velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, grads)
  return jax.tree.map(lambda p, v: p - lr * v, params, velocity), velocity


@pytest.mark.parametrize("kind", ["saf", "mesa"])
def test_the_trajectory_hook_trains_like_the_papers_loop(kind, digits):
  # SAF: the targets are the logits recorded for the same examples 3 epochs
  # earlier (a dict here); MESA: an EMA teacher in evaluation mode with an
  # EMA of the BatchNorm statistics. The loss gains lambda x the trajectory
  # loss from the start epoch on; everything else is SGD with momentum.
  data = digits._replace(x_train=digits.x_train[:64],
                         y_train=digits.y_train[:64])
  model_name = "mlp" if kind == "saf" else "cnn"
  options = ((("hidden", (16,)),) if kind == "saf" else
             (("channels", (2, 4)), ("kernel", 3), ("dropout", 0.1)))
  workload = config.Workload("digits", model_name, options, batch_size=16,
                             trajectory_start=4, eval_examples=64,
                             hessian_examples=16)
  setup = train.Setup(workload, epochs=6, batch_size=16, hessian_iters=2)
  seed, lr, lam = 4, 0.1, 0.7
  got = train.train_runs(SPECS[kind], data, setup, [lr], [lam], [seed],
                         [0.0])

  model = models.build(model_name, data, dict(options))
  key = jax.random.key(seed)
  params, stats = model.init(jax.random.fold_in(key, 0))
  velocity = jax.tree.map(jnp.zeros_like, params)
  x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  total = 6 * (64 // 16)
  decay = 1 - 1 / (0.1 * total)
  ema, ema_stats, seen = params, stats, {}

  def loss(p, s, xb, yb, k, targets, weight):
    logits, new_s = model.apply(p, s, xb, train=True, key=k)
    value = train.cross_entropy(logits, yb) + weight * _kl(logits, targets)
    return value, (new_s, logits)

  for epoch, idx, k in _batches(key, 64, 16, 6):
    weight = lam if epoch >= 4 else 0.0
    if kind == "saf":
      targets = jnp.stack([seen.get((epoch - 3, i), jnp.zeros(10))
                           for i in idx])
    else:
      targets = model.apply(ema, ema_stats, x[idx], train=False)[0]
    grads, (stats_new, logits) = jax.grad(loss, has_aux=True)(
        params, stats, x[idx], y[idx], k, targets, weight)
    params, velocity = _sgd_momentum(params, velocity, grads, lr)
    stats = stats_new
    for i, row in zip(idx, logits):
      seen[epoch, i] = row
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    ema_stats = jax.tree.map(lambda e, s: decay * e + (1 - decay) * s,
                             ema_stats, stats)
  logits, _ = model.apply(params, stats, x, train=False)
  full = float(train.cross_entropy(logits, y))
  assert float(got["final"]["train_loss"][0]) == pytest.approx(full, rel=1e-4)
  # The term matters: without it (lambda = 0) the run ends elsewhere.
  plain = train.train_runs(SPECS[kind], data, setup, [lr], [0.0], [seed],
                           [0.0])
  assert abs(float(plain["final"]["train_loss"][0]) - full) > 1e-3
