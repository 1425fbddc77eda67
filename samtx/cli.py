"""The ``samtx`` command line: ``samtx compare`` and ``samtx sensitivity``.

``samtx compare`` trains one fixed MLP with every optimizer on an embedded
dataset (no download), optionally with symmetric label noise, over several
seeds, and prints a table: test accuracy (mean +- std over seeds), final train
loss, wall-clock per step relative to SGD, gradient evaluations per step and
the top Hessian eigenvalue at the end. It writes ``results.json`` and PNG
plots (learning curves, accuracy vs cost) to the output folder it names.

``samtx sensitivity`` sweeps learning rate and rho over two orders of
magnitude around the tuned values for SAM and LightSAM and draws heat maps.

Hyper-parameters come from a tuning sweep on a validation split carved from
the training data (``--tune`` runs it; without it the values found by the
committed sweep, ``TUNED``, are used). The test split is never used for
tuning.

All seeds (and, in ``compare``, all noise levels) of one optimizer train in
one ``jax.vmap``-ed, ``jax.lax.scan``-ned program.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samtx
from samtx import datasets
from samtx import sharpness

# ----------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------

MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build one optimizer and where its tuning sweep looks.

  Attributes:
    label: name in tables and plots.
    make: ``make(learning_rate, rho) -> optax transform`` (rho ignored by the
      base optimizers).
    two_pass: whether ``update`` needs ``grad_fn``.
    lr_grid: learning rates of the tuning sweep.
    rho_grid: radii of the tuning sweep (``(0.0,)`` for base optimizers).
    family: ``"sgd"`` or ``"adaptive"`` (colours in the plots).
  """
  label: str
  make: Callable[..., optax.GradientTransformation]
  two_pass: bool
  lr_grid: tuple
  rho_grid: tuple
  family: str


SPECS: Dict[str, Spec] = {
    "sgd": Spec("SGD", lambda lr, rho: optax.sgd(lr, momentum=MOMENTUM),
                False, (0.01, 0.03, 0.1, 0.3), (0.0,), "sgd"),
    "amsgrad": Spec("AMSGrad", lambda lr, rho: samtx.amsgrad(lr), False,
                    (3e-4, 1e-3, 3e-3, 1e-2), (0.0,), "adaptive"),
    "sam": Spec("SAM", lambda lr, rho: samtx.sam(lr, rho, momentum=MOMENTUM),
                True, (0.03, 0.1, 0.3), (0.02, 0.05, 0.15), "sgd"),
    "asam": Spec("ASAM", lambda lr, rho: samtx.sam(
        lr, rho, momentum=MOMENTUM, adaptive=True), True,
                 (0.03, 0.1, 0.3), (0.2, 0.5, 1.5), "sgd"),
    "adasam": Spec("AdaSAM", lambda lr, rho: samtx.adasam(lr, rho), True,
                   (3e-4, 1e-3, 3e-3), (0.02, 0.05, 0.15), "adaptive"),
    "adasam_delayed": Spec("AdaSAM-delayed", lambda lr, rho: samtx.adasam(
        lr, rho, delayed=True), True, (3e-4, 1e-3, 3e-3), (0.02, 0.05, 0.15),
                           "adaptive"),
    "lightsam_i": Spec("LightSAM-I", lambda lr, rho: samtx.lightsam(
        lr, rho, variant="adagrad_norm"), True, (0.3, 1.0, 3.0, 10.0),
                       (0.1, 0.3, 1.0), "lightsam"),
    "lightsam_ii": Spec("LightSAM-II", lambda lr, rho: samtx.lightsam(
        lr, rho, variant="adagrad"), True, (0.003, 0.01, 0.03, 0.1),
                        (0.003, 0.01, 0.03), "lightsam"),
    "lightsam_iii": Spec("LightSAM-III", lambda lr, rho: samtx.lightsam(
        lr, rho, variant="adam"), True, (3e-4, 1e-3, 3e-3, 1e-2),
                         (3e-4, 1e-3, 3e-3), "lightsam"),
    "msam": Spec("MSAM", lambda lr, rho: samtx.msam(lr, rho, momentum=MOMENTUM),
                 False, (0.03, 0.1, 0.3), (0.1, 0.3, 1.0), "sgd"),
}

# Values chosen by the committed tuning sweep (`samtx compare --tune`, see
# benchmarks/results/compare/tuning.json): dataset -> noise -> name ->
# (learning rate, rho). A noise level not listed uses the nearest one.
TUNED: Dict[str, Dict[float, Dict[str, tuple]]] = {
    "mnist1d": {
        0.0: {
            "sgd": (0.1, 0.0),
            "amsgrad": (0.003, 0.0),
            "sam": (0.1, 0.15),
            "asam": (0.1, 1.5),
            "adasam": (0.003, 0.15),
            "adasam_delayed": (0.0003, 0.05),
            "lightsam_i": (10.0, 1.0),
            "lightsam_ii": (0.1, 0.01),
            "lightsam_iii": (0.003, 0.001),
            "msam": (0.1, 0.3),
        },
        0.25: {
            "sgd": (0.01, 0.0),
            "amsgrad": (0.001, 0.0),
            "sam": (0.03, 0.15),
            "asam": (0.03, 1.5),
            "adasam": (0.001, 0.05),
            "adasam_delayed": (0.0003, 0.15),
            "lightsam_i": (3.0, 0.1),
            "lightsam_ii": (0.03, 0.01),
            "lightsam_iii": (0.001, 0.001),
            "msam": (0.03, 1.0),
        },
    },
    "digits": {
        0.0: {
            "sgd": (0.3, 0.0),
            "amsgrad": (0.003, 0.0),
            "sam": (0.3, 0.15),
            "asam": (0.3, 0.5),
            "adasam": (0.003, 0.02),
            "adasam_delayed": (0.0003, 0.02),
            "lightsam_i": (10.0, 1.0),
            "lightsam_ii": (0.03, 0.003),
            "lightsam_iii": (0.01, 0.0003),
            "msam": (0.3, 1.0),
        },
        0.25: {
            "sgd": (0.03, 0.0),
            "amsgrad": (0.001, 0.0),
            "sam": (0.03, 0.15),
            "asam": (0.1, 1.5),
            "adasam": (0.003, 0.15),
            "adasam_delayed": (0.001, 0.05),
            "lightsam_i": (10.0, 0.1),
            "lightsam_ii": (0.1, 0.03),
            "lightsam_iii": (0.001, 0.003),
            "msam": (0.1, 1.0),
        },
    },
}


def hidden_sizes(name: str) -> tuple:
  """The fixed MLP's hidden widths for a dataset."""
  return (100, 100) if name == "mnist1d" else (128,)


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------


def init_mlp(key, sizes: Sequence[int]):
  """He-initialised MLP parameters ``[{"w", "b"}, ...]`` for ``sizes``.

  Args:
    key: PRNG key.
    sizes: layer widths, input first, classes last.

  Returns:
    A list of ``{"w": (m, n), "b": (n,)}`` dicts.

  Example:
    >>> params = init_mlp(jax.random.key(0), (40, 100, 100, 10))
    >>> apply_mlp(params, jnp.ones((3, 40))).shape
    (3, 10)
  """
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m),
           "b": jnp.zeros(n)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def apply_mlp(params, x):
  """ReLU MLP logits."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, x, y):
  """Mean softmax cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(
      apply_mlp(params, x), y).mean()


def accuracy(params, x, y):
  """Fraction of correct argmax predictions."""
  return jnp.mean(jnp.argmax(apply_mlp(params, x), -1) == y)


# ----------------------------------------------------------------------------
# training (one optimizer, many runs at once)
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything but the optimizer that defines a training run."""
  epochs: int
  batch_size: int
  hessian_iters: int = 20
  sharpness_rho: float = 0.05
  chunks: int = 5


def _optimizer_step(spec: Spec, opt, params, state, xb, yb, counter=None):
  """One training step; returns new params, state and the minibatch loss."""
  def loss(p):
    if counter is not None:
      counter.append(1)  # one forward+backward pass in the traced program
    return cross_entropy(p, xb, yb)
  value, grads = jax.value_and_grad(loss)(params)
  if spec.two_pass:
    updates, state = opt.update(grads, state, params, grad_fn=jax.grad(loss))
  else:
    updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state, value


_TRAINERS: Dict[tuple, tuple] = {}


def build_trainer(spec: Spec, data: datasets.Dataset, setup: Setup):
  """Jitted ``init``, ``chunk`` and ``final`` functions over a run axis.

  Every function is ``jax.vmap``-ed over runs: a run has its own learning
  rate, rho, PRNG key and (noisy) training / validation labels.

  Args:
    spec: the optimizer.
    data: the dataset (inputs shared by all runs).
    setup: epochs, batch size and metric settings.

  Returns:
    ``(init, chunk, clean_params)``: ``init(lr, rho, key) -> carry``;
    ``chunk(carry, lr, rho, y_train, y_val, epoch_keys) -> (carry, curves)``
    runs ``epoch_keys.shape[1]`` epochs; ``clean_params(carry)`` returns the
    evaluation weights (:func:`samtx.unperturb`).
  """
  sizes = (data.x_train.shape[1],) + hidden_sizes(data.name) + (
      data.num_classes,)
  x_train = jnp.asarray(data.x_train)
  x_val, x_test = jnp.asarray(data.x_val), jnp.asarray(data.x_test)
  y_test = jnp.asarray(data.y_test)
  n = x_train.shape[0]
  steps_per_epoch = n // setup.batch_size

  def init(lr, rho, key):
    params = init_mlp(jax.random.fold_in(key, 0), sizes)
    return params, spec.make(lr, rho).init(params)

  def evaluate(params, state, y_train, y_val):
    clean = samtx.unperturb(params, state)
    return {"train_loss": cross_entropy(clean, x_train, y_train),
            "val_acc": accuracy(clean, x_val, y_val),
            "test_acc": accuracy(clean, x_test, y_test)}

  def chunk(carry, lr, rho, y_train, y_val, epoch_keys):
    opt = spec.make(lr, rho)

    def epoch(carry, key):
      perm = jax.random.permutation(key, n)[: steps_per_epoch *
                                            setup.batch_size]

      def step(carry, idx):
        params, state = carry
        params, state, value = _optimizer_step(
            spec, opt, params, state, x_train[idx], y_train[idx])
        return (params, state), value

      carry, losses = jax.lax.scan(
          step, carry, perm.reshape(steps_per_epoch, setup.batch_size))
      metrics = evaluate(*carry, y_train, y_val)
      metrics["batch_loss"] = jnp.mean(losses)
      return carry, metrics

    return jax.lax.scan(epoch, carry, epoch_keys)

  def clean_params(carry):
    return samtx.unperturb(*carry)

  return (jax.jit(jax.vmap(init)), jax.jit(jax.vmap(chunk)),
          jax.jit(jax.vmap(clean_params)))


_FINALS: Dict[tuple, Callable] = {}


def final_metrics(data: datasets.Dataset, setup: Setup) -> Callable:
  """Jitted, run-vmapped end-of-training metrics (shared by all optimizers).

  ``fn(clean_params, y_train, y_val)`` returns the train loss and accuracy
  (training labels), validation and test accuracy, the top Hessian
  eigenvalue of the full-batch train loss (Lanczos) and the perturbed-loss
  gap at ``setup.sharpness_rho``.
  """
  key = (data.name, setup.hessian_iters, setup.sharpness_rho)
  if key in _FINALS:
    return _FINALS[key]
  x_train = jnp.asarray(data.x_train)
  x_val, x_test = jnp.asarray(data.x_val), jnp.asarray(data.x_test)
  y_test = jnp.asarray(data.y_test)

  def final(clean, y_train, y_val):
    loss_fn = lambda p: cross_entropy(p, x_train, y_train)
    return {
        "train_loss": loss_fn(clean),
        "train_acc": accuracy(clean, x_train, y_train),
        "val_acc": accuracy(clean, x_val, y_val),
        "test_acc": accuracy(clean, x_test, y_test),
        "top_eig": sharpness.top_hessian_eigenvalue(
            loss_fn, clean, num_iters=setup.hessian_iters),
        "gap": sharpness.perturbed_loss_gap(loss_fn, clean,
                                            setup.sharpness_rho)}

  _FINALS[key] = jax.jit(jax.vmap(final))
  return _FINALS[key]


def train_runs(spec: Spec, data: datasets.Dataset, setup: Setup, lrs, rhos,
               seeds, noise_rates, progress=None) -> dict:
  """Trains ``len(seeds)`` runs of one optimizer together.

  Args:
    spec: the optimizer.
    data: the dataset.
    setup: training settings.
    lrs, rhos, seeds, noise_rates: one entry per run. A run's seed drives its
      initialisation, minibatch order and label noise.
    progress: optional callback called after each chunk of epochs.

  Returns:
    Numpy arrays: per-epoch ``curves`` (runs x epochs) and ``final`` metrics
    (one value per run).
  """
  lrs = jnp.asarray(lrs, jnp.float32)
  rhos = jnp.asarray(rhos, jnp.float32)
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  noisy = lambda y, rate, seed, salt: datasets.symmetric_label_noise(
      y, rate, data.num_classes, seed=seed * 1000 + salt)
  y_train = jnp.asarray(np.stack([noisy(data.y_train, r, s, 1)
                                  for r, s in zip(noise_rates, seeds)]))
  y_val = jnp.asarray(np.stack([noisy(data.y_val, r, s, 2)
                                for r, s in zip(noise_rates, seeds)]))
  cache_key = (spec, data.name, setup)
  if cache_key not in _TRAINERS:  # reuse compiled programs across calls
    _TRAINERS[cache_key] = build_trainer(spec, data, setup)
  init, chunk, clean_params = _TRAINERS[cache_key]
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
      progress(hi - lo)
  out = {k: np.concatenate([c[k] for c in curves], axis=1)
         for k in curves[0]}
  fin = jax.device_get(final_metrics(data, setup)(
      clean_params(carry), y_train, y_val))
  return {"curves": out, "final": {k: np.asarray(v) for k, v in fin.items()}}


def step_costs(jobs: Dict[str, tuple], data: datasets.Dataset,
               batch_size: int, steps: int = 100, repeats: int = 15) -> dict:
  """Wall-clock per step and gradient evaluations per step, single run.

  Each optimizer's step is jitted as a ``lax.scan`` over ``steps`` fixed
  minibatches (so Python dispatch is not what is measured) and compiled and
  run once as warm-up (timed separately as ``compile_seconds``). Then the
  optimizers are timed round-robin, ``repeats`` rounds, each call ended by
  ``block_until_ready``, so that load from other processes hits all of them
  alike; the median is reported.

  Args:
    jobs: ``name -> (learning rate, rho)``.
    data: the dataset (its MLP and input width).
    batch_size: minibatch size.
    steps: steps per timed call.
    repeats: timed rounds.

  Returns:
    ``name -> {"seconds_per_step", "compile_seconds",
    "grad_evals_per_step"}``; gradient evaluations are counted in the traced
    step (each forward+backward pass of the loss in the program).
  """
  sizes = (data.x_train.shape[1],) + hidden_sizes(data.name) + (
      data.num_classes,)
  params = init_mlp(jax.random.key(0), sizes)
  rng = np.random.default_rng(0)
  idx = rng.integers(0, len(data.y_train), (steps, batch_size))
  xs = jnp.asarray(data.x_train[idx])
  ys = jnp.asarray(data.y_train[idx])
  calls, out = {}, {}
  for name, (lr, rho) in jobs.items():
    spec = SPECS[name]
    opt = spec.make(lr, rho)
    state = opt.init(params)
    counter: List[int] = []
    jax.make_jaxpr(lambda p, s, x, y, spec=spec, opt=opt: _optimizer_step(
        spec, opt, p, s, x, y, counter))(params, state, xs[0], ys[0])

    def many(params, state, xs, ys, spec=spec, opt=opt):
      def body(carry, batch):
        p, s, _ = _optimizer_step(spec, opt, *carry, *batch)
        return (p, s), None
      return jax.lax.scan(body, (params, state), (xs, ys))[0]

    many = jax.jit(many)
    start = time.perf_counter()
    jax.block_until_ready(many(params, state, xs, ys))
    out[name] = {"compile_seconds": time.perf_counter() - start,
                 "grad_evals_per_step": len(counter), "times": []}
    calls[name] = (many, state)
  for _ in range(repeats):
    for name, (many, state) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(many(params, state, xs, ys))
      out[name]["times"].append((time.perf_counter() - start) / steps)
  for res in out.values():
    res["seconds_per_step"] = float(np.median(res.pop("times")))
  return out


# ----------------------------------------------------------------------------
# tuning
# ----------------------------------------------------------------------------


def tuned_hparams(dataset: str, noise: float, name: str,
                  table: Optional[dict] = None) -> tuple:
  """``(lr, rho)`` for an optimizer from ``table`` (default ``TUNED``).

  Args:
    dataset: dataset name.
    noise: label-noise rate; the nearest tuned level is used.
    name: optimizer key of :data:`SPECS`.
    table: ``dataset -> noise -> name -> (lr, rho)``.

  Returns:
    ``(lr, rho)`` as floats.

  Raises:
    KeyError: nothing tuned for this dataset or optimizer.

  Example:
    >>> table = {"digits": {0.0: {"sam": (0.1, 0.05)},
    ...                     0.25: {"sam": (0.3, 0.1)}}}
    >>> tuned_hparams("digits", 0.3, "sam", table)
    (0.3, 0.1)
  """
  table = TUNED if table is None else table
  by_noise = table.get(dataset) or table.get(str(dataset))
  if not by_noise:
    raise KeyError(f"no tuned hyper-parameters for dataset {dataset!r}.")
  levels = {float(k): v for k, v in by_noise.items()}
  nearest = min(levels, key=lambda level: abs(level - noise))
  if name not in levels[nearest]:
    raise KeyError(f"no tuned hyper-parameters for {name!r} on {dataset!r}.")
  lr, rho = levels[nearest][name]
  return float(lr), float(rho)


def tune(spec: Spec, data: datasets.Dataset, setup: Setup,
         noises: Sequence[float], seeds: Sequence[int], progress=None) -> list:
  """Grid search over ``spec``'s (lr, rho) grid by mean validation accuracy.

  All grid points, noise levels and seeds train together in one vmapped
  program; each noise level gets its own winner. Validation labels carry the
  same label noise as the training labels (no clean labels are assumed). A
  diverged run (non-finite final train loss) counts as accuracy 0.

  Returns:
    One ``{"noise", "best": [lr, rho], "grid": [{"lr", "rho", "val_acc",
    "val_std"}]}`` per noise level.
  """
  grid = [(lr, rho) for lr in spec.lr_grid for rho in spec.rho_grid]
  runs = [(lr, rho, n, s) for n in noises for lr, rho in grid for s in seeds]
  out = train_runs(spec, data, setup, [r[0] for r in runs],
                   [r[1] for r in runs], [r[3] for r in runs],
                   [r[2] for r in runs], progress)
  shape = (len(noises), len(grid), len(seeds))
  val = out["final"]["val_acc"].reshape(shape)
  finite = np.isfinite(out["final"]["train_loss"]).reshape(shape)
  val = np.where(finite, val, 0.0)
  result = []
  for noise, v in zip(noises, val):
    means = v.mean(1)
    best = int(np.argmax(means))
    result.append({"noise": noise, "best": list(grid[best]), "grid": [
        {"lr": lr, "rho": rho, "val_acc": float(m), "val_std": float(sd)}
        for (lr, rho), m, sd in zip(grid, means, v.std(1))]})
  return result


# ----------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------


def _mean_std(values) -> tuple:
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values, ddof=1)
                                       if values.size > 1 else 0.0)


def format_table(rows: List[dict]) -> str:
  """The comparison table (plain text, one line per optimizer)."""
  head = (f"{'optimizer':15s} {'test acc %':>14s} {'train loss':>11s} "
          f"{'time/step':>10s} {'grads/step':>10s} {'top eig':>14s} "
          f"{'lr':>7s} {'rho':>7s}")
  lines = [head, "-" * len(head)]
  for r in rows:
    acc = f"{100 * r['test_acc_mean']:.1f} ± {100 * r['test_acc_std']:.1f}"
    eig = f"{r['top_eig_mean']:.2f} ± {r['top_eig_std']:.2f}"
    lines.append(
        f"{r['label']:15s} {acc:>14s} {r['train_loss_mean']:11.3f} "
        f"{r['relative_time']:9.2f}x {r['grad_evals_per_step']:10d} "
        f"{eig:>14s} {r['lr']:7.2g} {r['rho']:7.2g}")
  return "\n".join(lines)


def markdown_table(rows: List[dict]) -> str:
  """The comparison table in Markdown (for the README)."""
  lines = ["| optimizer | test acc % (mean ± std) | final train loss | "
           "time/step vs SGD | grads/step | top Hessian eig | lr | rho |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['label']} | {100 * r['test_acc_mean']:.1f} ± "
        f"{100 * r['test_acc_std']:.1f} | {r['train_loss_mean']:.3f} | "
        f"{r['relative_time']:.2f}x | {r['grad_evals_per_step']} | "
        f"{r['top_eig_mean']:.2f} ± {r['top_eig_std']:.2f} | {r['lr']:.3g} | "
        f"{r['rho']:.3g} |")
  return "\n".join(lines)


def _plt():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as err:  # pragma: no cover
    raise ImportError("plots need matplotlib: pip install 'samtx[demo]'") from err
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


_COLOURS = {"sgd": "tab:blue", "adaptive": "tab:orange", "lightsam": "tab:green"}


def plot_curves(group: dict, path: str) -> None:
  """Test accuracy and train loss per epoch (mean over seeds)."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  styles = ["-", "--", ":", "-."]
  seen: Dict[str, int] = {}
  for name, res in group["optimizers"].items():
    family = SPECS[name].family
    style = styles[seen.get(family, 0) % len(styles)]
    seen[family] = seen.get(family, 0) + 1
    epochs = np.arange(1, len(res["curves"]["test_acc_mean"]) + 1)
    for ax, key in zip(axes, ("test_acc", "train_loss")):
      mean = np.asarray(res["curves"][f"{key}_mean"])
      std = np.asarray(res["curves"][f"{key}_std"])
      ax.plot(epochs, mean, style, color=_COLOURS[family],
              label=SPECS[name].label, lw=1.4)
      ax.fill_between(epochs, mean - std, mean + std, color=_COLOURS[family],
                      alpha=0.08)
  axes[0].set(xlabel="epoch", ylabel="test accuracy (clean labels)")
  axes[1].set(xlabel="epoch", ylabel="train loss (training labels)",
              yscale="log")
  # Keep the loss axis readable when some runs diverged (their curves leave
  # the plot; the table and JSON still report them).
  finals = {n: np.asarray(r["curves"]["train_loss_mean"])
            for n, r in group["optimizers"].items()}
  typical = np.median([np.nanmin(c) for c in finals.values()])
  kept = [c for c in finals.values()
          if np.all(np.isfinite(c)) and np.max(c[-1:]) < 100 * max(typical,
                                                                  1e-6)]
  if kept:
    low = max(min(float(np.min(c)) for c in kept), 1e-6)
    axes[1].set_ylim(low / 1.5, 1.5 * max(float(np.max(c)) for c in kept))
  axes[0].legend(fontsize=8, ncol=2)
  fig.suptitle(f"{group['dataset']}, label noise {group['noise']:.0%}, "
               f"{group['seeds']} seeds (mean ± std)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_cost(group: dict, path: str) -> None:
  """Test accuracy (mean ± std) against wall-clock per step relative to SGD."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for name, res in group["optimizers"].items():
    row = res["summary"]
    ax.errorbar(row["relative_time"], 100 * row["test_acc_mean"],
                yerr=100 * row["test_acc_std"], fmt="o", capsize=3,
                color=_COLOURS[SPECS[name].family])
    ax.annotate(row["label"], (row["relative_time"], 100 * row["test_acc_mean"]),
                textcoords="offset points", xytext=(5, 4), fontsize=8)
  ax.set(xlabel="wall-clock per step relative to SGD",
         ylabel="test accuracy % (mean ± std over seeds)",
         title=f"{group['dataset']}, label noise {group['noise']:.0%}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _write_json(obj, path: str) -> None:
  def default(o):
    if isinstance(o, (np.floating, np.integer)):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
    raise TypeError(type(o))
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=default)


# ----------------------------------------------------------------------------
# argument parsing helpers
# ----------------------------------------------------------------------------


def _names(text: str) -> List[str]:
  names = [t.strip() for t in text.split(",") if t.strip()]
  if names == ["all"]:
    return list(SPECS)
  bad = [n for n in names if n not in SPECS]
  if bad or not names:
    raise argparse.ArgumentTypeError(
        f"unknown optimizer(s) {bad}; choose from {', '.join(SPECS)} or 'all'")
  return names


def _datasets(text: str) -> List[str]:
  names = [t.strip() for t in text.split(",") if t.strip()]
  if names == ["all"]:
    return list(datasets.DATASETS)
  bad = [n for n in names if n not in datasets.DATASETS]
  if bad or not names:
    raise argparse.ArgumentTypeError(
        f"unknown dataset(s) {bad}; choose from "
        f"{', '.join(datasets.DATASETS)} or 'all'")
  return names


def _rate(text: str) -> float:
  try:
    value = float(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(f"not a number: {text!r}") from err
  if not 0.0 <= value < 1.0:
    raise argparse.ArgumentTypeError(
        f"label noise must be in [0, 1), got {value}")
  return value


def _rates(text: str) -> List[float]:
  return [_rate(t) for t in text.split(",") if t.strip()] or [0.0]


def _positive_floats(text: str) -> List[float]:
  try:
    values = [float(t) for t in text.split(",") if t.strip()]
  except ValueError as err:
    raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from err
  if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
    raise argparse.ArgumentTypeError(
        f"need positive finite numbers, got {text!r}")
  return values


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from err
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _nonneg_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(f"not a number: {text!r}") from err
  if not (value >= 0 and math.isfinite(value)):
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
  return value


def _load_hparams(path: str) -> dict:
  """A tuning JSON written by ``compare --tune`` -> TUNED-like table."""
  with open(path) as f:
    raw = json.load(f)
  table: dict = {}
  for entry in raw.get("tuning", raw if isinstance(raw, list) else []):
    table.setdefault(entry["dataset"], {}).setdefault(
        float(entry["noise"]), {})[entry["optimizer"]] = tuple(entry["best"])
  if not table:
    raise ValueError(f"{path}: no tuning entries found.")
  return table


class _Progress:
  """A tqdm bar over epochs of all runs (silent without tqdm or if off)."""

  def __init__(self, total: int, enabled: bool):
    self.bar = None
    if enabled:
      try:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True,
                        file=sys.stderr)
      except ImportError:  # pragma: no cover
        self.bar = None

  def describe(self, text: str) -> None:
    if self.bar is not None:
      self.bar.set_description(text)
    else:
      print(text, file=sys.stderr, flush=True)

  def __call__(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# ----------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------


def run_compare(args) -> dict:
  """The ``compare`` job; returns everything written to ``results.json``."""
  os.makedirs(args.out, exist_ok=True)
  setup = Setup(epochs=args.epochs, batch_size=args.batch_size,
                hessian_iters=args.hessian_iters,
                sharpness_rho=args.sharpness_rho)
  tune_setup = dataclasses.replace(setup, epochs=args.tune_epochs or
                                   args.epochs)
  table = _load_hparams(args.hparams) if args.hparams else TUNED
  seeds = list(range(args.seeds))
  tune_seeds = [1000 + s for s in range(args.tune_seeds)]
  loaded = {name: datasets.load(name) for name in args.dataset}
  for data in loaded.values():
    if args.batch_size > len(data.y_train):
      raise SystemExit(
          f"samtx compare: error: --batch-size {args.batch_size} exceeds the "
          f"{len(data.y_train)} training examples of {data.name}")

  total = len(loaded) * len(args.optimizers) * args.epochs
  if args.tune:
    total += len(loaded) * len(args.optimizers) * tune_setup.epochs
  progress = _Progress(total, not args.no_progress)
  result = {"config": {k: v for k, v in vars(args).items() if k != "func"},
            "jax": {"version": jax.__version__,
                    "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
            "tuning": [], "groups": [], "timing": {}}
  try:
    hparams: Dict[tuple, tuple] = {}
    for data in loaded.values():
      for name in args.optimizers:
        if args.tune:
          progress.describe(f"tune {data.name} {name}")
          for entry in tune(SPECS[name], data, tune_setup, args.noise,
                            tune_seeds, progress):
            result["tuning"].append(
                {"dataset": data.name, "optimizer": name, **entry})
            hparams[data.name, entry["noise"], name] = tuple(entry["best"])
        else:
          for noise in args.noise:
            hparams[data.name, noise, name] = tuned_hparams(
                data.name, noise, name, table)

    for data in loaded.values():
      per_opt = {}
      for name in args.optimizers:
        progress.describe(f"train {data.name} {name} "
                          f"({len(seeds)} seeds x {len(args.noise)} noise)")
        runs = [(noise, seed) for noise in args.noise for seed in seeds]
        per_opt[name] = train_runs(
            SPECS[name], data, setup,
            [hparams[data.name, n, name][0] for n, _ in runs],
            [hparams[data.name, n, name][1] for n, _ in runs],
            [s for _, s in runs], [n for n, _ in runs], progress)
      # Timing: one run, lr/rho of the first noise level.
      progress.describe(f"time {data.name} (all optimizers, round-robin)")
      timing = step_costs(
          {name: hparams[data.name, args.noise[0], name]
           for name in args.optimizers}, data, args.batch_size,
          args.timing_steps, args.timing_repeats)
      base = timing.get("sgd", next(iter(timing.values())))["seconds_per_step"]
      result["timing"][data.name] = timing

      for i, noise in enumerate(args.noise):
        sl = slice(i * len(seeds), (i + 1) * len(seeds))
        group = {"dataset": data.name, "noise": noise, "seeds": len(seeds),
                 "optimizers": {}}
        rows = []
        for name, res in per_opt.items():
          fin = {k: v[sl] for k, v in res["final"].items()}
          curves = {k: v[sl] for k, v in res["curves"].items()}
          lr, rho = hparams[data.name, noise, name]
          row = {"optimizer": name, "label": SPECS[name].label,
                 "lr": lr, "rho": rho,
                 "relative_time": timing[name]["seconds_per_step"] / base,
                 "seconds_per_step": timing[name]["seconds_per_step"],
                 "grad_evals_per_step": timing[name]["grad_evals_per_step"]}
          for key in ("test_acc", "val_acc", "train_loss", "train_acc",
                      "top_eig", "gap"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(fin[key])
          rows.append(row)
          group["optimizers"][name] = {
              "summary": row,
              "per_seed": {k: v for k, v in fin.items()},
              "curves": {f"{k}_{stat}": fn(v, axis=0)
                         for k, v in curves.items()
                         for stat, fn in (("mean", np.mean), ("std", np.std))}}
        stem = f"{data.name}_noise{int(round(100 * noise)):02d}"
        group["table"] = format_table(rows)
        group["markdown"] = markdown_table(rows)
        group["plots"] = {"curves": f"{stem}_curves.png",
                          "cost": f"{stem}_cost.png"}
        result["groups"].append(group)
        if not args.no_plots:
          plot_curves(group, os.path.join(args.out, group["plots"]["curves"]))
          plot_cost(group, os.path.join(args.out, group["plots"]["cost"]))
  finally:
    progress.close()

  for group in result["groups"]:
    print(f"\n{group['dataset']}, label noise {group['noise']:.0%}, "
          f"{group['seeds']} seeds, {args.epochs} epochs "
          f"(test accuracy on clean test labels, final epoch)")
    print(group["table"])
  if result["tuning"]:
    _write_json({"tuning": result["tuning"]},
                os.path.join(args.out, "tuning.json"))
  _write_json(result, os.path.join(args.out, "results.json"))
  print(f"\nwrote results.json and plots to {os.path.abspath(args.out)}")
  return result


# ----------------------------------------------------------------------------
# sensitivity
# ----------------------------------------------------------------------------


def run_sensitivity(args) -> dict:
  """The ``sensitivity`` job; returns everything written to its JSON."""
  os.makedirs(args.out, exist_ok=True)
  data = datasets.load(args.dataset)
  setup = Setup(epochs=args.epochs, batch_size=args.batch_size)
  table = _load_hparams(args.hparams) if args.hparams else TUNED
  seeds = list(range(args.seeds))
  factors = args.factors
  progress = _Progress(len(args.optimizers) * args.epochs,
                       not args.no_progress)
  result = {"config": {k: v for k, v in vars(args).items() if k != "func"},
            "optimizers": {}}
  try:
    for name in args.optimizers:
      lr0, rho0 = tuned_hparams(data.name, args.noise, name, table)
      if rho0 == 0:
        raise SystemExit(f"samtx sensitivity: error: {name} has no rho")
      lrs = [lr0 * f for f in factors]
      rhos = [rho0 * f for f in factors]
      runs = [(lr, rho, s) for lr in lrs for rho in rhos for s in seeds]
      progress.describe(f"sensitivity {name} ({len(runs)} runs)")
      out = train_runs(SPECS[name], data, setup, [r[0] for r in runs],
                       [r[1] for r in runs], [r[2] for r in runs],
                       [args.noise] * len(runs), progress)
      acc = out["final"]["test_acc"].reshape(len(lrs), len(rhos), len(seeds))
      finite = np.isfinite(out["final"]["train_loss"]).reshape(acc.shape)
      acc = np.where(finite, acc, 1.0 / data.num_classes)
      mean = acc.mean(-1)
      result["optimizers"][name] = {
          "label": SPECS[name].label, "lr": lrs, "rho": rhos,
          "test_acc_mean": mean, "test_acc_std": acc.std(-1),
          "diverged_runs": int((~finite).sum()),
          "spread": float(mean.max() - mean.min()),
          "best": float(mean.max()), "worst": float(mean.min()),
          "spread_lr_at_tuned_rho": float(
              np.ptp(mean[:, len(factors) // 2])),
          "spread_rho_at_tuned_lr": float(
              np.ptp(mean[len(factors) // 2, :]))}
  finally:
    progress.close()

  print(f"\n{data.name}, label noise {args.noise:.0%}, {len(seeds)} seeds, "
        f"{args.epochs} epochs; lr and rho = tuned x {factors}")
  head = (f"{'optimizer':14s} {'best %':>7s} {'worst %':>8s} {'spread':>7s} "
          f"{'spread(lr)':>10s} {'spread(rho)':>11s}")
  print(head + "\n" + "-" * len(head))
  for res in result["optimizers"].values():
    print(f"{res['label']:14s} {100 * res['best']:7.1f} "
          f"{100 * res['worst']:8.1f} {100 * res['spread']:7.1f} "
          f"{100 * res['spread_lr_at_tuned_rho']:10.1f} "
          f"{100 * res['spread_rho_at_tuned_lr']:11.1f}")
  stem = f"{data.name}_noise{int(round(100 * args.noise)):02d}"
  if not args.no_plots:
    plot_heatmaps(result, os.path.join(args.out, f"{stem}_heatmap.png"))
  _write_json(result, os.path.join(args.out, f"{stem}.json"))
  print(f"\nwrote {stem}.json and {stem}_heatmap.png to "
        f"{os.path.abspath(args.out)}")
  return result


def plot_heatmaps(result: dict, path: str) -> None:
  """One heat map of test accuracy over (lr, rho) per optimizer."""
  plt = _plt()
  items = list(result["optimizers"].values())
  fig, axes = plt.subplots(1, len(items), figsize=(5.2 * len(items), 4.2),
                           squeeze=False)
  fig.subplots_adjust(wspace=0.45)
  for ax, res in zip(axes[0], items):
    mean = 100 * np.asarray(res["test_acc_mean"])
    im = ax.imshow(mean, origin="lower", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(res["rho"])),
                  [f"{r:.2g}" for r in res["rho"]], rotation=45)
    ax.set_yticks(range(len(res["lr"])), [f"{r:.2g}" for r in res["lr"]])
    for i in range(mean.shape[0]):
      for j in range(mean.shape[1]):
        ax.text(j, i, f"{mean[i, j]:.0f}", ha="center", va="center",
                color="w" if mean[i, j] < 60 else "k", fontsize=8)
    ax.set(xlabel="rho", ylabel="learning rate",
           title=f"{res['label']}: spread {100 * res['spread']:.1f} pts")
  fig.colorbar(im, ax=axes[0].tolist(), label="test accuracy %")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of the ``samtx`` command."""
  parser = argparse.ArgumentParser(
      prog="samtx", description="samtx: sharpness-aware optimizers for optax.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  fmt = argparse.ArgumentDefaultsHelpFormatter

  cmp = sub.add_parser(
      "compare", formatter_class=fmt,
      help="train one MLP with every optimizer and compare them",
      description=(
          "Train a fixed MLP with SGD, AMSGrad, SAM, ASAM, AdaSAM, "
          "AdaSAM-delayed, LightSAM-I/II/III and MSAM on an embedded dataset "
          "(no download), print a table (test accuracy mean ± std over seeds, "
          "final train loss, wall-clock per step relative to SGD, gradient "
          "evaluations per step, top Hessian eigenvalue) and write "
          "results.json and PNG plots to --out."))
  cmp.add_argument("--dataset", type=_datasets, default=["mnist1d"],
                   help="comma-separated datasets: mnist1d, digits or all")
  cmp.add_argument("--noise", type=_rates, default=[0.0, 0.25],
                   help="comma-separated symmetric label-noise rates in "
                        "[0, 1) applied to the train and validation labels "
                        "(test labels stay clean)")
  cmp.add_argument("--seeds", type=_positive_int, default=3,
                   help="number of seeds (0..N-1) per optimizer and noise "
                        "level; a seed sets init, batch order and label noise")
  cmp.add_argument("--epochs", type=_positive_int, default=30,
                   help="training epochs per run")
  cmp.add_argument("--batch-size", type=_positive_int, default=128,
                   help="minibatch size")
  cmp.add_argument("--optimizers", type=_names, default=list(SPECS),
                   help="comma-separated optimizers, or all: "
                        + ", ".join(SPECS))
  cmp.add_argument("--tune", action="store_true",
                   help="run the (lr, rho) tuning sweep on the validation "
                        "split first (per dataset and noise level) instead of "
                        "using the built-in tuned values")
  cmp.add_argument("--tune-seeds", type=_positive_int, default=2,
                   help="seeds per grid point in the tuning sweep (seeds "
                        "1000.. distinct from the evaluation seeds)")
  cmp.add_argument("--tune-epochs", type=_positive_int, default=None,
                   help="epochs per tuning run (None: the same as --epochs)")
  cmp.add_argument("--hparams", default=None, metavar="JSON",
                   help="tuning.json from an earlier --tune run to take "
                        "(lr, rho) from")
  cmp.add_argument("--hessian-iters", type=_positive_int, default=20,
                   help="Lanczos iterations for the top Hessian eigenvalue")
  cmp.add_argument("--sharpness-rho", type=_nonneg_float, default=0.05,
                   help="radius of the perturbed-loss gap stored in the JSON")
  cmp.add_argument("--timing-steps", type=_positive_int, default=100,
                   help="steps per timed call of the jitted step loop")
  cmp.add_argument("--timing-repeats", type=_positive_int, default=15,
                   help="timed round-robin repeats (the median is reported)")
  cmp.add_argument("--out", default="samtx-results/compare",
                   help="output folder for results.json and the PNG plots")
  cmp.add_argument("--no-plots", action="store_true",
                   help="skip the PNG plots")
  cmp.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar")
  cmp.set_defaults(func=run_compare)

  sen = sub.add_parser(
      "sensitivity", formatter_class=fmt,
      help="test accuracy over a (lr, rho) grid for SAM vs LightSAM",
      description=(
          "Train over a grid of learning rates and rho values (the tuned "
          "values times --factors, two orders of magnitude by default), draw "
          "heat maps of test accuracy and report each optimizer's spread "
          "(max - min mean accuracy over the grid)."))
  sen.add_argument("--dataset", choices=datasets.DATASETS, default="mnist1d",
                   help="dataset")
  sen.add_argument("--noise", type=_rate, default=0.0,
                   help="symmetric label-noise rate in [0, 1)")
  sen.add_argument("--seeds", type=_positive_int, default=2,
                   help="seeds per grid point")
  sen.add_argument("--epochs", type=_positive_int, default=30,
                   help="training epochs per run")
  sen.add_argument("--batch-size", type=_positive_int, default=128,
                   help="minibatch size")
  sen.add_argument("--optimizers", type=_names,
                   default=["sam", "lightsam_i", "lightsam_ii", "lightsam_iii"],
                   help="comma-separated optimizers with a rho")
  sen.add_argument("--factors", type=_positive_floats,
                   default=[0.1, 0.316, 1.0, 3.16, 10.0],
                   help="multipliers of the tuned lr and rho")
  sen.add_argument("--hparams", default=None, metavar="JSON",
                   help="tuning.json to take the centre (lr, rho) from")
  sen.add_argument("--out", default="samtx-results/sensitivity",
                   help="output folder")
  sen.add_argument("--no-plots", action="store_true", help="skip the PNG")
  sen.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar")
  sen.set_defaults(func=run_sensitivity)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Runs the ``samtx`` command (``compare`` when no command is given)."""
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv:
    argv = ["compare"]
  args = parser.parse_args(argv)
  if args.command is None:
    parser.error("choose a command: compare or sensitivity")
  args.func(args)


if __name__ == "__main__":
  main()
