"""The training loop of ``samtx compare``: many runs of one optimizer at once.

All runs of one optimizer on one workload (seeds, noise levels, grid points)
train in one ``jax.vmap``-ed, ``jax.lax.scan``-ned, jit-compiled program: a
run has its own learning rate, rho, PRNG key and (noisy) labels.

A step follows DESIGN.md "Flax": the clean pass updates the BatchNorm
statistics; the perturbed pass of a two-pass optimizer (``grad_fn``) starts
from the statistics before the step, uses the same dropout key, and its
statistic updates are discarded. Evaluation uses the weights
:func:`samtx.unperturb` returns (MSAM holds perturbed weights) in evaluation
mode (running statistics, no dropout).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samtx
from samtx import sharpness
from samtx.compare import data as data_lib
from samtx.compare import models
from samtx.compare.config import Workload
from samtx.compare.optimizers import Spec

__all__ = ["Setup", "train_runs", "step_costs", "cross_entropy"]

_EVAL_BATCH = 64  # examples per evaluation chunk (bounds memory under vmap)


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


def _optimizer_step(model: models.Functional, spec: Spec, opt, params, stats,
                    opt_state, xb, yb, key, counter: Optional[list] = None):
  """One step; returns new params, statistics, optimizer state and the loss."""
  def loss(p, s):
    if counter is not None:
      counter.append(1)  # one forward+backward pass in the traced program
    logits, new_stats = model.apply(p, s, xb, train=True, key=key)
    return cross_entropy(logits, yb), new_stats

  (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(
      params, stats)
  extra = {}
  if spec.two_pass:
    # Statistics from before the step and the same dropout key; the
    # statistics this pass computes are dropped.
    extra["grad_fn"] = jax.grad(lambda p: loss(p, stats)[0])
  updates, opt_state = opt.update(grads, opt_state, params, **extra)
  return optax.apply_updates(params, updates), new_stats, opt_state, value


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
    self.final = jax.jit(jax.vmap(self._final))

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


def _trainer(spec: Spec, data: data_lib.Dataset, setup: Setup):
  """Jitted, run-vmapped ``init``, ``chunk`` and ``clean`` (cached)."""
  cache_key = (spec, data.name, data.x_train.shape, setup)
  if cache_key in _TRAINERS:
    return _TRAINERS[cache_key]
  evaluator = _evaluator(data, setup)
  model = evaluator.model
  n = evaluator.x_train.shape[0]
  steps_per_epoch = n // setup.batch_size

  def init(lr, rho, key):
    params, stats = model.init(jax.random.fold_in(key, 0))
    return params, stats, spec.make(lr, rho).init(params)

  def clean(carry):
    params, stats, opt_state = carry
    return samtx.unperturb(params, opt_state), stats

  def chunk(carry, lr, rho, y_train, y_val, epoch_keys):
    opt = spec.make(lr, rho)

    def epoch(carry, key):
      order_key, dropout_key = jax.random.split(key)
      perm = jax.random.permutation(order_key, n)[
          : steps_per_epoch * setup.batch_size]
      batches = perm.reshape(steps_per_epoch, setup.batch_size)
      step_keys = jax.random.split(dropout_key, steps_per_epoch)

      def step(carry, batch):
        idx, step_key = batch
        params, stats, opt_state, value = _optimizer_step(
            model, spec, opt, *carry, evaluator.x_train[idx], y_train[idx],
            step_key)
        return (params, stats, opt_state), value

      carry, losses = jax.lax.scan(step, carry, (batches, step_keys))
      metrics = evaluator.metrics(*clean(carry), y_train, y_val)
      metrics["batch_loss"] = jnp.mean(losses)
      return carry, metrics

    return jax.lax.scan(epoch, carry, epoch_keys)

  _TRAINERS[cache_key] = (jax.jit(jax.vmap(init)), jax.jit(jax.vmap(chunk)),
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


def train_runs(spec: Spec, data: data_lib.Dataset, setup: Setup, lrs, rhos,
               seeds, noise_rates, progress: Optional[Callable] = None, *,
               final: bool = True) -> dict:
  """Trains ``len(seeds)`` runs of one optimizer together.

  Args:
    spec: the optimizer.
    data: the dataset.
    setup: training settings.
    lrs, rhos, seeds, noise_rates: one entry per run. A run's seed drives its
      initialisation, minibatch order, dropout masks and label noise.
    progress: optional callback, called with the number of epochs done after
      each chunk of epochs.
    final: also compute the end-of-training metrics (train accuracy, top
      Hessian eigenvalue, perturbed-loss gap); tuning skips them.

  Returns:
    Numpy arrays: per-epoch ``curves`` (runs x epochs: ``train_loss``,
    ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc``,
    ``batch_loss``) and, with ``final``, ``final`` metrics (the last epoch's
    plus ``top_eig`` and ``gap``; one value per run).
  """
  lrs = jnp.asarray(lrs, jnp.float32)
  rhos = jnp.asarray(rhos, jnp.float32)
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  y_train, y_val = _labels(data, seeds, noise_rates)
  init, chunk, clean = _trainer(spec, data, setup)
  carry = init(lrs, rhos, keys)
  epoch_keys = jax.vmap(lambda k: jax.random.split(
      jax.random.fold_in(k, 1), setup.epochs))(keys)
  # Equal chunks (one compiled program): the most chunks <= setup.chunks
  # that divide the epochs.
  count = max(c for c in range(1, setup.chunks + 1) if setup.epochs % c == 0)
  bounds = np.arange(count + 1) * (setup.epochs // count)
  curves = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    carry, part = chunk(carry, lrs, rhos, y_train, y_val,
                        epoch_keys[:, lo:hi])
    curves.append(jax.device_get(part))
    if progress is not None:
      progress(int(hi - lo))
  out = {"curves": {k: np.concatenate([c[k] for c in curves], axis=1)
                    for k in curves[0]}}
  if final:
    fin = jax.device_get(_evaluator(data, setup).final(
        *clean(carry), y_train, y_val))
    out["final"] = {k: np.asarray(v) for k, v in fin.items()}
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
  alike; the median is reported.

  Args:
    jobs: ``name -> (learning rate, rho)``.
    specs: ``name -> Spec`` for every name in ``jobs``.
    data: the dataset.
    setup: the workload (model) and batch size.
    steps: steps per timed call.
    repeats: timed rounds.

  Returns:
    ``name -> {"seconds_per_step", "compile_seconds",
    "grad_evals_per_step"}``; gradient evaluations are counted in the traced
    step (each forward+backward pass of the loss in the program).
  """
  model = models.build(setup.workload.model, data, setup.workload.options)
  params, stats = model.init(jax.random.key(0))
  idx = np.random.default_rng(0).integers(0, len(data.y_train),
                                          (steps, setup.batch_size))
  xs, ys = jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
  keys = jax.random.split(jax.random.key(1), steps)
  calls, out = {}, {}
  for name, (lr, rho) in jobs.items():
    spec = specs[name]
    opt = spec.make(lr, rho)
    opt_state = opt.init(params)
    counter: List[int] = []
    jax.make_jaxpr(lambda p, s, o, x, y, k, spec=spec, opt=opt:
                   _optimizer_step(model, spec, opt, p, s, o, x, y, k,
                                   counter))(
                       params, stats, opt_state, xs[0], ys[0], keys[0])

    def many(params, stats, opt_state, spec=spec, opt=opt):
      def body(carry, batch):
        return _optimizer_step(model, spec, opt, *carry, *batch)[:3], None
      return jax.lax.scan(body, (params, stats, opt_state), (xs, ys, keys))[0]

    many = jax.jit(many)
    start = time.perf_counter()
    jax.block_until_ready(many(params, stats, opt_state))
    out[name] = {"compile_seconds": time.perf_counter() - start,
                 "grad_evals_per_step": len(counter), "times": []}
    calls[name] = (many, opt_state)
  for _ in range(repeats):
    for name, (many, opt_state) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(many(params, stats, opt_state))
      out[name]["times"].append((time.perf_counter() - start) / steps)
  for res in out.values():
    res["seconds_per_step"] = float(np.median(res.pop("times")))
  return out


def bits(nats) -> np.ndarray:
  """Nats per character to bits per character."""
  return np.asarray(nats) / math.log(2.0)
