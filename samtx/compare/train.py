"""The training loop of ``samtx compare``: many runs of one optimizer at once.

All runs of one optimizer on one workload (seeds, noise levels, grid points)
train in one jit-compiled program, ``jax.vmap``-ed over runs (or, for the
transformer, ``jax.lax.map``-ped: on CPU that is cheaper per run) and
``jax.lax.scan``-ned over steps: a run has its own learning rate, rho, PRNG
key and (noisy) labels.

A step follows DESIGN.md "Flax": the clean pass updates the BatchNorm
statistics; the perturbed pass of a two-pass optimizer (``grad_fn``) starts
from the statistics before the step, uses the same dropout key, and its
statistic updates are discarded. Evaluation uses the weights
``samtx.eval_params`` returns (GPA's averaged point, MSAM's unperturbed
weights; ``samtx.unperturb`` where samtx has no ``eval_params`` yet) in
evaluation mode (running statistics, no dropout).

**The loss-side hook** (SAF and MESA, Du et al., arXiv 2205.14083): a
method whose :attr:`Spec.trajectory` is set trains on
``cross-entropy + lambda * samtx.trajectory_loss(logits, targets)`` from the
workload's ``trajectory_start`` epoch on (lambda is the run's ``rho``). The
targets come from a per-run hook state carried beside the optimizer state:

- SAF: a per-example logits memory (``samtx.saf_memory``) indexed by the
  example indices of the minibatch (the data pipeline passes them); after
  each step the clean pass's logits are recorded (``samtx.saf_record``) and
  the targets are those recorded ``lag`` epochs earlier
  (``samtx.saf_targets``).
- MESA: the optimizer is wrapped in ``samtx.mesa`` (an EMA of the
  post-update weights, horizon a tenth of the run); the teacher's logits are
  a forward pass in evaluation mode at ``samtx.ema_params`` with an EMA, at
  the same decay, of the student's BatchNorm running statistics (the
  official code's timm ``ModelEmaV2`` averages every buffer, BatchNorm's
  included), taken before the update as in the official code.

The gradient of the trajectory term flows into the student's logits only;
the reported batch loss is the cross-entropy alone.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samtx
from samtx import sharpness
from samtx.compare import data as data_lib
from samtx.compare import models
from samtx.compare.config import Workload
from samtx.compare.optimizers import SAF_LAG
from samtx.compare.optimizers import Spec

__all__ = ["Setup", "train_runs", "step_costs", "cross_entropy", "lr_shape",
           "timing_summary", "wait", "parameter_count", "TIMING_SPREAD_LIMIT"]

_EVAL_BATCH = 64  # examples per evaluation chunk (bounds memory under vmap)
# A time ratio whose interquartile range over the round-robin repeats is
# wider than this fraction of its median is flagged, not reported.
TIMING_SPREAD_LIMIT = 0.2
# MESA's EMA horizon 1 / (1 - decay), as a fraction of the training steps.
MESA_HORIZON = 0.1

if hasattr(samtx, "eval_params"):
  _eval_params = samtx.eval_params
else:
  _eval_params = samtx.unperturb


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything but the optimizer and its hyper-parameters that defines a run.

  Attributes:
    workload: the (dataset, model) pair and its settings.
    epochs: training epochs.
    batch_size: minibatch size.
    hessian_iters: Lanczos iterations for the top Hessian eigenvalue.
    sharpness_rho: radius of the perturbed-loss gap.
    chunks: the most progress updates per training (epochs are grouped).
  """
  workload: Workload
  epochs: int
  batch_size: int
  hessian_iters: int = 20
  sharpness_rho: float = 0.05
  chunks: int = 5


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy over all labels (examples and positions)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def lr_shape(schedule: str, total_steps: int) -> Optional[Callable]:
  """The learning-rate multiplier of a workload's schedule (None: constant).

  ``"cosine"``: linear warm-up from 0 over the first 5% of ``total_steps``,
  then cosine decay from 1 to 0.1 at ``total_steps``.

  Example:
    >>> shape = lr_shape("cosine", 200)
    >>> [round(float(shape(c)), 3) for c in (0, 5, 10, 200)]
    [0.0, 0.5, 1.0, 0.1]
  """
  if schedule == "constant":
    return None
  if schedule != "cosine":
    raise ValueError(f"unknown schedule {schedule!r}")
  warmup = max(1, total_steps // 20)
  return optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup, max(total_steps, warmup + 1), end_value=0.1)


def mesa_decay(total_steps: int) -> float:
  """MESA's EMA decay for a run: horizon ``MESA_HORIZON`` of the steps."""
  return 1.0 - 1.0 / max(1.0, MESA_HORIZON * total_steps)


def _make(spec: Spec, lr, rho, total_steps: int, schedule: str):
  """The optimizer of one run: the spec's, its lr scheduled, MESA wrapped."""
  shape = lr_shape(schedule, total_steps)
  learning_rate = lr if shape is None else (lambda count: lr * shape(count))
  opt = spec.make(learning_rate, rho)
  if spec.trajectory == "mesa":
    opt = samtx.mesa(opt, decay=mesa_decay(total_steps))
  return opt


def _hook_init(spec: Spec, params, stats, num_examples: int,
               num_classes: int):
  """The per-run state of the loss-side hook (an empty tuple without one)."""
  if spec.trajectory == "saf":
    return samtx.saf_memory(num_examples, num_classes, lag=SAF_LAG)
  if spec.trajectory == "mesa":
    return stats  # the teacher's BatchNorm statistics (their EMA)
  return ()


def _optimizer_step(model: models.Functional, spec: Spec, opt, carry, xb, yb,
                    idx, epoch, key, lam, start_epoch: int, total_steps: int,
                    count: Optional[Callable] = None):
  """One step; returns the new carry and the batch's cross-entropy.

  ``carry`` is ``(params, stats, opt_state, hook_state)``; ``idx`` are the
  minibatch's example indices, ``epoch`` the epoch number and ``lam`` the
  trajectory loss's weight (the SAF and MESA hook). ``count``, if given, is
  a host callback run once per gradient evaluation (how the step costs are
  counted).
  """
  params, stats, opt_state, hook = carry
  targets = None
  if spec.trajectory == "saf":
    targets = samtx.saf_targets(hook, idx, epoch)
    weight = jnp.where(epoch >= start_epoch, lam, 0.0)
  elif spec.trajectory == "mesa":
    teacher = samtx.ema_params(opt_state)
    targets = jax.lax.stop_gradient(
        model.apply(teacher, hook, xb, train=False)[0])
    weight = jnp.where(epoch >= start_epoch, lam, 0.0)

  def loss(p, s):
    logits, new_stats = model.apply(p, s, xb, train=True, key=key)
    task = cross_entropy(logits, yb)
    total = task
    if targets is not None:
      total = task + weight * samtx.trajectory_loss(
          logits, targets, temperature=dict(spec.settings)["temperature"])
    return total, (task, new_stats, logits)

  def counted(fn):
    if count is None:
      return fn
    def wrapped(*args):
      jax.debug.callback(count)
      return fn(*args)
    return wrapped

  (_, (value, new_stats, logits)), grads = counted(
      jax.value_and_grad(loss, has_aux=True))(params, stats)
  extra = {}
  if spec.two_pass:
    # Statistics from before the step and the same dropout key; the
    # statistics this pass computes are dropped.
    extra["grad_fn"] = counted(jax.grad(lambda p: loss(p, stats)[0]))
  updates, opt_state = opt.update(grads, opt_state, params, **extra)
  params = optax.apply_updates(params, updates)
  if spec.trajectory == "saf":
    # The targets make the write wait for the read: the memory is updated in
    # place instead of copied every step (samtx.saf_record).
    hook = samtx.saf_record(hook, idx, logits, epoch, targets=targets)
  elif spec.trajectory == "mesa":
    decay = mesa_decay(total_steps)
    hook = jax.tree.map(lambda e, s: decay * e + (1 - decay) * s, hook,
                        new_stats)
  return (params, new_stats, opt_state, hook), value


def _eval_fn(model: models.Functional):
  """``(params, stats, x, y) -> (mean loss, accuracy)`` in evaluation mode."""
  def per_example(params, stats, xy):
    x, y = xy
    logits, _ = model.apply(params, stats, x[None], train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[None])
    return loss.mean(), jnp.mean(jnp.argmax(logits, -1) == y[None])

  def evaluate(params, stats, x, y):
    losses, hits = jax.lax.map(
        lambda xy: per_example(params, stats, xy), (x, y),
        batch_size=_EVAL_BATCH)
    return losses.mean(), hits.mean()

  return evaluate


def _over_runs(fn: Callable, vectorize: bool) -> Callable:
  """``fn`` applied to every run (leading axis): vmapped or mapped."""
  if vectorize:
    return jax.vmap(fn)
  return lambda *args: jax.lax.map(lambda a: fn(*a), args)


class _Evaluator:
  """Evaluation-mode metrics of one workload, shared by all optimizers.

  The end-of-training metrics take the clean weights, not the optimizer
  state, so their (costly: Lanczos) program compiles once per workload.
  """

  def __init__(self, data: data_lib.Dataset, setup: Setup):
    workload = setup.workload
    self.model = models.build(workload.model, data, workload.options)
    self.evaluate = _eval_fn(self.model)
    self.x_train = jnp.asarray(data.x_train)
    self.x_val, self.x_test = jnp.asarray(data.x_val), jnp.asarray(data.x_test)
    self.y_test = jnp.asarray(data.y_test)
    self.n_eval = min(workload.eval_examples or len(data.y_train),
                      len(data.y_train))
    self.n_hessian = min(workload.hessian_examples or self.n_eval,
                         self.n_eval)
    self.setup = setup
    self.final = jax.jit(_over_runs(self._final, workload.vectorize))

  def metrics(self, clean, stats, y_train, y_val) -> dict:
    """Loss and accuracy on the train subset, validation and test splits."""
    m = self.n_eval
    train_loss, train_acc = self.evaluate(clean, stats, self.x_train[:m],
                                          y_train[:m])
    val_loss, val_acc = self.evaluate(clean, stats, self.x_val, y_val)
    test_loss, test_acc = self.evaluate(clean, stats, self.x_test,
                                        self.y_test)
    return {"train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
            "test_acc": test_acc}

  def _final(self, clean, stats, y_train, y_val) -> dict:
    h = self.n_hessian
    hessian_loss = lambda p: cross_entropy(
        self.model.apply(p, stats, self.x_train[:h], train=False)[0],
        y_train[:h])
    out = self.metrics(clean, stats, y_train, y_val)
    out["top_eig"] = sharpness.top_hessian_eigenvalue(
        hessian_loss, clean, num_iters=self.setup.hessian_iters)
    out["gap"] = sharpness.perturbed_loss_gap(hessian_loss, clean,
                                              self.setup.sharpness_rho)
    return out


_EVALUATORS: Dict[tuple, _Evaluator] = {}
_TRAINERS: Dict[tuple, tuple] = {}


def _evaluator(data: data_lib.Dataset, setup: Setup) -> _Evaluator:
  key = (data.name, data.x_train.shape, setup)
  if key not in _EVALUATORS:
    _EVALUATORS[key] = _Evaluator(data, setup)
  return _EVALUATORS[key]


def _steps_per_epoch(data: data_lib.Dataset, setup: Setup) -> int:
  return len(data.y_train) // setup.batch_size


def _trainer(spec: Spec, data: data_lib.Dataset, setup: Setup):
  """Jitted, run-batched ``init``, ``chunk`` and ``clean`` (cached)."""
  cache_key = (spec, data.name, data.x_train.shape, setup)
  if cache_key in _TRAINERS:
    return _TRAINERS[cache_key]
  evaluator = _evaluator(data, setup)
  model = evaluator.model
  workload = setup.workload
  n = evaluator.x_train.shape[0]
  steps_per_epoch = _steps_per_epoch(data, setup)
  total_steps = steps_per_epoch * setup.epochs
  make = lambda lr, rho: _make(spec, lr, rho, total_steps, workload.schedule)

  def init(lr, rho, key):
    params, stats = model.init(jax.random.fold_in(key, 0))
    return (params, stats, make(lr, rho).init(params),
            _hook_init(spec, params, stats, n, data.num_classes))

  def clean(carry):
    params, stats, opt_state, _ = carry
    return _eval_params(params, opt_state), stats

  def chunk(carry, lr, rho, y_train, y_val, epoch_keys, epochs):
    opt = make(lr, rho)

    def epoch_fn(carry, inputs):
      key, epoch = inputs
      order_key, dropout_key = jax.random.split(key)
      perm = jax.random.permutation(order_key, n)[
          : steps_per_epoch * setup.batch_size]
      batches = perm.reshape(steps_per_epoch, setup.batch_size)
      step_keys = jax.random.split(dropout_key, steps_per_epoch)

      def step(carry, batch):
        idx, step_key = batch
        return _optimizer_step(
            model, spec, opt, carry, evaluator.x_train[idx], y_train[idx],
            idx, epoch, step_key, rho, workload.trajectory_start,
            total_steps)

      carry, losses = jax.lax.scan(step, carry, (batches, step_keys))
      metrics = evaluator.metrics(*clean(carry), y_train, y_val)
      metrics["batch_loss"] = jnp.mean(losses)
      return carry, metrics

    return jax.lax.scan(epoch_fn, carry, (epoch_keys, epochs))

  over = lambda fn: jax.jit(_over_runs(fn, workload.vectorize))
  _TRAINERS[cache_key] = (jax.jit(jax.vmap(init)), over(chunk),
                          jax.jit(jax.vmap(clean)))
  return _TRAINERS[cache_key]


def _labels(data: data_lib.Dataset, seeds, noise_rates):
  """Per-run (noisy) training and validation labels."""
  def noisy(y, rate, seed, salt):
    if rate == 0:
      return y
    return data_lib.symmetric_label_noise(y, rate, data.num_classes,
                                          seed=seed * 1000 + salt)
  y_train = np.stack([noisy(data.y_train, r, s, 1)
                      for r, s in zip(noise_rates, seeds)])
  y_val = np.stack([noisy(data.y_val, r, s, 2)
                    for r, s in zip(noise_rates, seeds)])
  return jnp.asarray(y_train), jnp.asarray(y_val)


def wait(tree: Any, poll: float = 0.05) -> Any:
  """``jax.device_get(tree)``, waiting in short sleeps.

  A blocking fetch holds the interpreter inside XLA until the program ends
  (minutes for a chunk of training), so Ctrl-C would only be seen then;
  polling ``is_ready`` lets ``KeyboardInterrupt`` through within ``poll``
  seconds.
  """
  for leaf in jax.tree.leaves(tree):
    while hasattr(leaf, "is_ready") and not leaf.is_ready():
      time.sleep(poll)
  return jax.device_get(tree)


def train_runs(spec: Spec, data: data_lib.Dataset, setup: Setup, lrs, rhos,
               seeds, noise_rates, progress: Optional[Callable] = None, *,
               final: bool = True) -> dict:
  """Trains ``len(seeds)`` runs of one optimizer together.

  Args:
    spec: the optimizer.
    data: the dataset.
    setup: training settings.
    lrs, rhos, seeds, noise_rates: one entry per run. A run's seed drives its
      initialisation, minibatch order, dropout masks and label noise. For
      SAF and MESA, ``rho`` is the weight of the trajectory loss.
    progress: optional callback, called with the number of epochs done after
      each chunk of epochs.
    final: also compute the end-of-training metrics (train accuracy, top
      Hessian eigenvalue, perturbed-loss gap); tuning skips them.

  Returns:
    Numpy arrays: per-epoch ``curves`` (runs x epochs: ``train_loss``,
    ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc``,
    ``batch_loss``), with ``final`` the ``final`` metrics (the last epoch's
    plus ``top_eig`` and ``gap``; one value per run), and ``meta``:
    ``seconds``, the wall-clock time of the whole call.
  """
  start = time.perf_counter()
  if spec.trajectory == "saf" and data.task != "classify":
    raise ValueError("SAF's per-example logits memory needs a "
                     "classification dataset")
  lrs = jnp.asarray(lrs, jnp.float32)
  rhos = jnp.asarray(rhos, jnp.float32)
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  y_train, y_val = _labels(data, seeds, noise_rates)
  init, chunk, clean = _trainer(spec, data, setup)
  carry = init(lrs, rhos, keys)
  epoch_keys = jax.vmap(lambda k: jax.random.split(
      jax.random.fold_in(k, 1), setup.epochs))(keys)
  epochs = jnp.broadcast_to(jnp.arange(setup.epochs), (len(seeds),
                                                       setup.epochs))
  # Equal chunks (one compiled program): the most chunks <= setup.chunks
  # that divide the epochs.
  count = max(c for c in range(1, setup.chunks + 1) if setup.epochs % c == 0)
  bounds = np.arange(count + 1) * (setup.epochs // count)
  curves = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    carry, part = chunk(carry, lrs, rhos, y_train, y_val,
                        epoch_keys[:, lo:hi], epochs[:, lo:hi])
    curves.append(wait(part))
    if progress is not None:
      progress(int(hi - lo))
  out = {"curves": {k: np.concatenate([c[k] for c in curves], axis=1)
                    for k in curves[0]}}
  if final:
    fin = wait(_evaluator(data, setup).final(*clean(carry), y_train, y_val))
    out["final"] = {k: np.asarray(v) for k, v in fin.items()}
  out["meta"] = {"seconds": np.asarray(time.perf_counter() - start)}
  return out


def step_costs(jobs: Dict[str, tuple], specs: Dict[str, Spec],
               data: data_lib.Dataset, setup: Setup, steps: int = 100,
               repeats: int = 15) -> dict:
  """Wall-clock per step and gradient evaluations per step, single run.

  Each optimizer's step is jitted as a ``lax.scan`` over ``steps`` fixed
  minibatches (so Python dispatch is not what is measured) and compiled and
  run once as warm-up (timed separately as ``compile_seconds``). Then the
  optimizers are timed round-robin, ``repeats`` rounds, each call ended by
  ``block_until_ready``, so that load from other processes hits all of them
  alike; every round's time is kept (:func:`timing_summary` turns them into
  ratios with their spread).

  Gradient evaluations are counted while a separate copy of the program
  runs once: a host callback beside every gradient call (the clean pass and
  ``grad_fn``) counts the calls that really ran, so LookSAM's second pass,
  which runs on one step in ``k``, counts ``1/k`` per step.

  Args:
    jobs: ``name -> (learning rate, rho)``.
    specs: ``name -> Spec`` for every name in ``jobs``.
    data: the dataset.
    setup: the workload (model) and batch size.
    steps: steps per timed call.
    repeats: timed rounds.

  Returns:
    ``name -> {"seconds_per_step", "times", "compile_seconds",
    "grad_evals_per_step"}`` (``times``: seconds per step of each round).
  """
  model = models.build(setup.workload.model, data, setup.workload.options)
  params, stats = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  idx = rng.integers(0, len(data.y_train), (steps, setup.batch_size))
  xs, ys = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
  keys = jax.random.split(jax.random.key(1), steps)
  idx = jnp.asarray(idx)
  total_steps = _steps_per_epoch(data, setup) * setup.epochs
  workload = setup.workload
  calls, out = {}, {}
  for name, (lr, rho) in jobs.items():
    spec = specs[name]
    opt = _make(spec, lr, rho, total_steps, workload.schedule)
    carry = (params, stats, opt.init(params),
             _hook_init(spec, params, stats, len(data.y_train),
                        data.num_classes))

    def many(carry, count=None, spec=spec, opt=opt, rho=rho):
      # Epoch = trajectory start: SAF and MESA pay for their term.
      def body(carry, batch):
        x, y, i, k = batch
        return _optimizer_step(model, spec, opt, carry, x, y, i,
                               workload.trajectory_start, k, rho,
                               workload.trajectory_start, total_steps,
                               count)[0], None
      return jax.lax.scan(body, carry, (xs, ys, idx, keys))[0]

    calls_made: List[int] = []
    jax.block_until_ready(jax.jit(lambda c, many=many, calls_made=calls_made:
                                  many(c, lambda: calls_made.append(1)))(
                                      carry))
    jax.effects_barrier()
    timed = jax.jit(many)
    start = time.perf_counter()
    jax.block_until_ready(timed(carry))
    out[name] = {"compile_seconds": time.perf_counter() - start,
                 "grad_evals_per_step": len(calls_made) / steps,
                 "times": []}
    calls[name] = (timed, carry)
  for _ in range(repeats):
    for name, (timed, carry) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(timed(carry))
      out[name]["times"].append((time.perf_counter() - start) / steps)
  for res in out.values():
    res["seconds_per_step"] = float(np.median(res["times"]))
  return out


def timing_summary(timing: dict, name: str, base: str) -> dict:
  """The step-time ratio of ``name`` to ``base`` with its spread.

  Each round-robin round timed both back to back, so the ratio is taken per
  round (load that hits a round hits both) and summarised by its median and
  interquartile range. A ratio whose IQR is wider than
  :data:`TIMING_SPREAD_LIMIT` of its median, or that has fewer than 3
  rounds, is ``unstable``: its repeats disagree and it is not a result.

  Args:
    timing: :func:`step_costs`' output (``times`` per optimizer; records
      without ``times`` fall back to the ratio of the medians).
    name, base: optimizer names in ``timing``.

  Returns:
    ``{"ratio", "low", "high", "unstable"}`` (``low``/``high``: the 25th
    and 75th percentiles of the per-round ratios).

  Example:
    >>> timing = {"sgd": {"times": [1.0, 1.0, 2.0, 1.0]},
    ...           "sam": {"times": [2.0, 2.1, 4.0, 1.9]}}
    >>> timing_summary(timing, "sam", "sgd")["unstable"]
    False
    >>> timing["sam"]["times"] = [0.6, 2.0, 1.7, 1.0]
    >>> timing_summary(timing, "sam", "sgd")["unstable"]
    True
  """
  own, ref = timing[name], timing[base]
  if "times" not in own or "times" not in ref:
    ratio = own["seconds_per_step"] / ref["seconds_per_step"]
    return {"ratio": ratio, "low": ratio, "high": ratio, "unstable": True}
  ratios = np.asarray(own["times"]) / np.asarray(ref["times"])
  low, mid, high = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
  unstable = bool(len(ratios) < 3 or (high - low) > TIMING_SPREAD_LIMIT * mid)
  return {"ratio": mid, "low": low, "high": high, "unstable": unstable}


def parameter_count(data: data_lib.Dataset, setup: Setup) -> int:
  """Trainable parameters of the workload's model (no BatchNorm statistics)."""
  model = models.build(setup.workload.model, data, setup.workload.options)
  params, _ = jax.eval_shape(model.init, jax.random.key(0))
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def bits(nats) -> np.ndarray:
  """Nats per character to bits per character."""
  return np.asarray(nats) / math.log(2.0)
