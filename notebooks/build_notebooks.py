"""Writes the example notebooks and executes them so they render with outputs.

Usage (from the repository root):

    .venv/bin/python notebooks/build_notebooks.py            # write + execute
    .venv/bin/python notebooks/build_notebooks.py --no-execute

The notebooks read ``SAMTX_QUICK=1`` to shrink their training runs; the test
suite (``tests/test_notebooks.py``) executes them that way without writing
them back. Committed copies are executed in full mode.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

SETUP = '''\
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import samtx
from samtx import flax as samtx_flax

QUICK = os.environ.get("SAMTX_QUICK") == "1"  # set by the test suite
print("jax", jax.__version__, "| devices:", jax.devices(), "| quick mode:", QUICK)'''

DATA = '''\
# sklearn's 8x8 digits ship inside scikit-learn: no download.
digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)
x_train, x_test, y_train, y_test = train_test_split(
    x_all, y_all, test_size=0.5, random_state=0, stratify=y_all)
print(x_train.shape, x_test.shape)


def batches(steps, batch_size=64, seed=0):
  """The same sequence of random mini-batches for every optimizer."""
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.choice(len(x_train), batch_size, replace=False)
    yield {"x": x_train[idx], "y": y_train[idx]}'''


def _quickstart():
  md, code = v4.new_markdown_cell, v4.new_code_cell
  return [
      md("# samtx quickstart: SGD vs SAM, AdaSAM, LightSAM and MSAM\n\n"
         "A small MLP (Flax linen) on scikit-learn's embedded 8x8 digits. Every "
         "optimizer is a plain `optax` transformation; `samtx.flax.make_train_step` "
         "supplies the `grad_fn` that two-pass optimizers need and returns, "
         "without extra forward passes, the loss at the held weights, the loss "
         "at the perturbed point and the perturbation norm.\n\n"
         "Set `SAMTX_QUICK=1` for a short run (the test suite does)."),
      code(SETUP),
      code(DATA),
      md("## Model, loss and training step\n\n"
         "`loss_fn(params, batch, apply)` calls the model through `apply`, which "
         "runs `state.apply_fn` with the right variables (and dropout key / "
         "BatchNorm statistics when the model has them)."),
      code('''\
import flax.linen as nn


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128)(x))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


model = MLP()


def loss_fn(params, batch, apply):
  logits = apply(batch["x"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss, {"accuracy": jnp.mean(logits.argmax(-1) == batch["y"])}


train_step = jax.jit(samtx_flax.make_train_step(loss_fn, has_aux=True))


@jax.jit
def evaluate(params, x, y):
  logits = model.apply({"params": params}, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, jnp.mean(logits.argmax(-1) == y)'''),
      md("## Five optimizers, one loop\n\n"
         "MSAM holds *perturbed* weights; `samtx_flax.eval_params(state)` "
         "(= `samtx.unperturb`) gives the weights to evaluate, for every "
         "optimizer (identity for the others). MSAM runs one forward pass, so "
         "its metrics hold only the loss at the held weights; to plot its "
         "perturbed-vs-clean gap this notebook evaluates the batch loss at the "
         "clean weights as well (an extra pass for the plot only)."),
      code('''\
STEPS = 60 if QUICK else 1500
EVAL_EVERY = 20 if QUICK else 50

optimizers = {
    "SGD": optax.sgd(0.05, momentum=0.9),
    "SAM": samtx.sam(0.05, rho=0.1, momentum=0.9),
    "AdaSAM": samtx.adasam(1e-3, rho=0.1),
    "LightSAM": samtx.lightsam(2.0, rho=1.0),  # AdaGrad-Norm form (LightSAM-I)
    "MSAM": samtx.msam(0.05, rho=0.3, momentum=0.9),
}
batch_loss = jax.jit(lambda p, b: evaluate(p, b["x"], b["y"])[0])

history = {}
for name, tx in optimizers.items():
  state = samtx_flax.TrainState.create(
      apply_fn=model.apply, tx=tx,
      params=model.init(jax.random.key(0), x_train[:1])["params"])
  log = {"step": [], "train_loss": [], "test_acc": [], "gap": [], "rho": []}
  for step, batch in enumerate(batches(STEPS)):
    if name == "MSAM":  # clean weights before the step, for the gap plot only
      clean_loss = batch_loss(samtx_flax.eval_params(state), batch)
    state, metrics = train_step(state, batch)
    if name == "MSAM":  # loss at held (perturbed) weights minus clean loss
      log["gap"].append(metrics["loss"] - clean_loss)
    else:  # zero for SGD, whose "perturbed point" is the point itself
      log["gap"].append(metrics["perturbed_loss"] - metrics["loss"])
    log["rho"].append(metrics["perturbation_norm"])
    if (step + 1) % EVAL_EVERY == 0:
      params = samtx_flax.eval_params(state)
      log["step"].append(step + 1)
      log["train_loss"].append(float(evaluate(params, x_train, y_train)[0]))
      log["test_acc"].append(float(evaluate(params, x_test, y_test)[1]))
  log["gap"], log["rho"] = np.asarray(log["gap"]), np.asarray(log["rho"])
  history[name] = log
  print(f"{name:9s} train loss {log['train_loss'][-1]:.4f}  "
        f"test accuracy {log['test_acc'][-1]:.4f}  "
        f"last |e| {log['rho'][-1]:.4f}")'''),
      code('''\
def smooth(values, width=25):
  width = max(1, min(width, len(values) // 4))
  return np.convolve(values, np.ones(width) / width, mode="valid")


fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for name, log in history.items():
  axes[0].plot(log["step"], log["train_loss"], label=name)
  axes[1].plot(log["step"], log["test_acc"], label=name)
  axes[2].plot(smooth(log["gap"]), label=name)
axes[0].set(title="training loss (evaluation weights)", xlabel="step",
            yscale="log")
axes[1].set(title="test accuracy", xlabel="step")
axes[2].set(title="perturbed minus clean batch loss (smoothed)", xlabel="step")
axes[0].legend()
fig.tight_layout()
plt.show()'''),
      code('''\
# Sanity checks that keep this notebook honest when the test suite runs it.
for name, log in history.items():
  assert np.all(np.isfinite(log["train_loss"])), name
  assert log["test_acc"][-1] > 0.5, (name, log["test_acc"][-1])
assert max(np.abs(history["SGD"]["gap"])) == 0.0  # no perturbation
assert np.mean(history["SAM"]["gap"]) > 0  # the ascent step raises the loss'''),
      md("## Pitfalls handled by `samtx.flax`, and the tests that prove them\n\n"
         "| pitfall | what samtx.flax does | test |\n"
         "|---|---|---|\n"
         "| stock `TrainState.apply_gradients` cannot pass `grad_fn` | "
         "`samtx_flax.apply_gradients(state, grads=..., grad_fn=...)` (stock "
         "states) and `samtx_flax.TrainState.apply_gradients` | "
         "`tests/test_flax.py::test_linen_train_state_method_and_stock_state_forward_grad_fn`, "
         "`::test_linen_every_alias_under_jit` |\n"
         "| BatchNorm statistics must come from the clean pass; the perturbed "
         "pass still runs in training mode | the perturbed pass's statistic "
         "updates are discarded | `::test_linen_batchnorm_stats_from_clean_pass_and_perturbed_pass_in_train_mode`, "
         "`::test_nnx_batchnorm_and_dropout_match_hand_written_step` |\n"
         "| dropout: both passes must drop the same units | same key (linen); "
         "NNX RNG counters snapshotted before the clean pass | "
         "`::test_linen_dropout_uses_the_same_key_in_both_passes`, "
         "`::test_nnx_batchnorm_and_dropout_match_hand_written_step` |\n"
         "| the perturbed NNX pass must not mutate the model (`nnx.merge` "
         "reuses Variables) | `make_grad_fn` merges pure copies | "
         "`::test_nnx_batchnorm_and_dropout_match_hand_written_step` (whole "
         "model state, RNG counter included) |\n"
         "| MSAM's held weights are perturbed | `eval_params`, "
         "`eval_variables`, `eval_model` (`samtx.unperturb`) | "
         "`::test_linen_msam_eval_weights_follow_hand_written_recurrence`, "
         "`::test_nnx_msam_eval_weights_and_one_pass_metrics` |\n"
         "| metrics must not cost extra forward passes | perturbed loss "
         "captured inside `grad_fn` during the same trace | "
         "model calls counted at trace time in "
         "`::test_linen_every_alias_under_jit`, "
         "`::test_nnx_every_alias_under_nnx_jit`, "
         "`::test_linen_forward_passes_with_batchnorm` (2 for SAM, 1 for MSAM "
         "and SGD) |\n"
         "| every alias under `jax.jit` / `nnx.jit` | | "
         "`::test_linen_every_alias_under_jit`, "
         "`::test_nnx_every_alias_under_nnx_jit` |\n"
         "| `grad_fn` called under a nested transform (`optax.MultiSteps`) "
         "cannot return its loss | warning, `perturbed_loss` is NaN, update "
         "unaffected | `::test_grad_fn_under_nested_transform_warns_and_still_updates` |"),
  ]


def _nnx():
  md, code = v4.new_markdown_cell, v4.new_code_cell
  return [
      md("# samtx with Flax NNX\n\n"
         "`nnx.Optimizer.update(model, grads, **kwargs)` forwards keyword "
         "arguments to `tx.update`, so a samtx optimizer only needs a "
         "`grad_fn`. `samtx.flax.make_grad_fn` builds it from the model and the "
         "loss: it receives the pure `nnx.State` of the parameters, runs the "
         "loss on a *copy* of the model (the perturbed pass never mutates the "
         "model) with the RNG state from before the clean pass (same dropout "
         "mask)."),
      code(SETUP + "\nfrom flax import nnx"),
      code(DATA),
      code('''\
class CNN(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.linear = nnx.Linear(16 * 4 * 4, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(-1, 8, 8, 1)
    x = nnx.avg_pool(nnx.relu(self.conv(x)), (2, 2), strides=(2, 2))
    return self.linear(self.dropout(x.reshape(x.shape[0], -1)))


def loss_fn(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()'''),
      md("## The manual way: `make_grad_fn` + `optimizer.update`\n\n"
         "Build `grad_fn` **before** the clean pass, so it snapshots the RNG "
         "state the clean pass is about to use."),
      code('''\
sam_tx = samtx.sam(0.05, rho=0.1, momentum=0.9)
model = CNN(nnx.Rngs(0, dropout=1))
optimizer = nnx.Optimizer(model, sam_tx, wrt=nnx.Param)


@nnx.jit
def manual_step(model, optimizer, batch):
  grad_fn = samtx_flax.make_grad_fn(loss_fn, model, batch)  # before the clean pass
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)   # clean pass
  optimizer.update(model, grads, grad_fn=grad_fn)           # perturbed pass inside
  return loss


batch = next(batches(1))
print("loss", manual_step(model, optimizer, batch))
print("dropout RNG draws so far:", int(model.dropout.rngs.count[...]))  # 1: clean pass only'''),
      md("## The step builder: metrics for free\n\n"
         "`make_nnx_train_step(loss_fn)` does the same and returns the clean "
         "loss, the perturbed loss and the perturbation norm. It gives the "
         "very same update as the manual step:"),
      code('''\
train_step = nnx.jit(samtx_flax.make_nnx_train_step(loss_fn))
a, b = CNN(nnx.Rngs(0, dropout=1)), CNN(nnx.Rngs(0, dropout=1))
opt_a = nnx.Optimizer(a, sam_tx, wrt=nnx.Param)
opt_b = nnx.Optimizer(b, sam_tx, wrt=nnx.Param)
metrics = train_step(a, opt_a, batch)
manual_step(b, opt_b, batch)
print({k: float(v) for k, v in metrics.items()})
for u, v in zip(jax.tree.leaves(nnx.state(a, nnx.Param)),
                jax.tree.leaves(nnx.state(b, nnx.Param))):
  np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)'''),
      md("## SGD vs SAM vs MSAM\n\n"
         "For MSAM the model holds perturbed weights: evaluate "
         "`samtx_flax.eval_model(model, optimizer)`, a copy with the clean "
         "weights (the training model is not touched)."),
      code('''\
STEPS = 40 if QUICK else 800
EVAL_EVERY = 20 if QUICK else 50


@nnx.jit
def accuracy(model, x, y):
  return jnp.mean(model(x).argmax(-1) == y)


runs = {"SGD": optax.sgd(0.05, momentum=0.9),
        "SAM": sam_tx,  # the same object: nnx.jit reuses the compiled step
        "MSAM": samtx.msam(0.05, rho=0.3, momentum=0.9)}
history = {}
for name, tx in runs.items():
  model = CNN(nnx.Rngs(0, dropout=1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  log = {"loss": [], "perturbed_loss": [], "step": [], "test_acc": []}
  for step, batch in enumerate(batches(STEPS)):
    model.train()
    metrics = train_step(model, optimizer, batch)
    log["loss"].append(float(metrics["loss"]))
    log["perturbed_loss"].append(float(metrics["perturbed_loss"]))
    if (step + 1) % EVAL_EVERY == 0:
      clean = samtx_flax.eval_model(model, optimizer)
      clean.eval()  # dropout off
      log["step"].append(step + 1)
      log["test_acc"].append(float(accuracy(clean, x_test, y_test)))
  history[name] = log
  print(f"{name:5s} test accuracy {log['test_acc'][-1]:.4f}")'''),
      code('''\
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, log in history.items():
  width = max(1, min(20, len(log["loss"]) // 4))
  kernel = np.ones(width) / width
  axes[0].plot(np.convolve(log["loss"], kernel, "valid"), label=f"{name} loss")
  if name == "SAM":
    axes[0].plot(np.convolve(log["perturbed_loss"], kernel, "valid"), "--",
                 label="SAM perturbed loss")
  axes[1].plot(log["step"], log["test_acc"], label=name)
axes[0].set(title="training batch loss (smoothed)", xlabel="step", yscale="log")
axes[1].set(title="test accuracy (evaluation weights)", xlabel="step")
axes[0].legend()
axes[1].legend()
fig.tight_layout()
plt.show()
for name, log in history.items():
  assert np.all(np.isfinite(log["loss"])) and log["test_acc"][-1] > 0.3, name'''),
  ]


def _linen_batchnorm():
  md, code = v4.new_markdown_cell, v4.new_code_cell
  return [
      md("# samtx with Flax linen and BatchNorm\n\n"
         "`samtx_flax.TrainState` adds a `batch_stats` field and an "
         "`apply_gradients` that forwards `grad_fn`. `make_train_step` runs "
         "the clean pass (keeping its BatchNorm statistic updates) and the "
         "perturbed pass in training mode with the same dropout key, "
         "discarding that pass's statistic updates."),
      code(SETUP + "\nimport flax.linen as nn"),
      code(DATA),
      code('''\
class CNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape(-1, 8, 8, 1)
    x = nn.Conv(16, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.Dropout(0.2, deterministic=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(10)(x)


model = CNN()


def loss_fn(params, batch, apply):
  logits = apply(batch["x"], train=True)  # both passes run in training mode
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def create_state(tx):
  variables = model.init(jax.random.key(0), x_train[:1], train=False)
  return samtx_flax.TrainState.create(
      apply_fn=model.apply, tx=tx, params=variables["params"],
      batch_stats=variables["batch_stats"])


train_step = jax.jit(samtx_flax.make_train_step(loss_fn))'''),
      md("## One step, checked against a hand-written SAM step\n\n"
         "By hand: clean pass with `mutable=['batch_stats']`, "
         "`e = rho g / ||g||`, perturbed pass with the same dropout key whose "
         "new statistics are thrown away, SGD update."),
      code('''\
rho, lr = 0.1, 0.05
sam_tx = samtx.sam(lr, rho=rho)
state = create_state(sam_tx)
batch, key = next(batches(1)), jax.random.key(42)


def forward(params, batch_stats):
  logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, batch["x"], train=True,
      rngs={"dropout": key}, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss, updates["batch_stats"]


value_and_grad = jax.jit(jax.value_and_grad(forward, has_aux=True))
(loss, clean_stats), g = value_and_grad(state.params, state.batch_stats)
g_norm = optax.global_norm(g)
perturbed = jax.tree.map(lambda p, gi: p + rho * gi / (g_norm + 1e-12),
                         state.params, g)
(perturbed_loss, perturbed_stats), h = value_and_grad(perturbed, state.batch_stats)
want_params = jax.tree.map(lambda p, hi: p - lr * hi, state.params, h)

new_state, metrics = train_step(state, batch, key)
for u, v in zip(jax.tree.leaves((new_state.params, new_state.batch_stats)),
                jax.tree.leaves((want_params, clean_stats))):
  np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(metrics["perturbed_loss"], perturbed_loss, rtol=1e-5)
print("matches the hand-written step; clean vs perturbed-pass running mean differ by",
      float(optax.global_norm(jax.tree.map(jnp.subtract, clean_stats, perturbed_stats))))'''),
      md("## SGD vs SAM with BatchNorm\n\n"
         "Evaluate with `use_running_average=True` (`train=False`) and "
         "`samtx_flax.eval_variables(state)` (params via `samtx.unperturb`, "
         "plus `batch_stats`)."),
      code('''\
STEPS = 40 if QUICK else 800
EVAL_EVERY = 20 if QUICK else 50


@jax.jit
def accuracy(variables, x, y):
  return jnp.mean(model.apply(variables, x, train=False).argmax(-1) == y)


root = jax.random.key(0)
history = {}
for name, tx in {"SGD": optax.sgd(0.05),
                 "SAM": sam_tx}.items():
  state = create_state(tx)
  log = {"loss": [], "perturbed_loss": [], "step": [], "test_acc": []}
  for step, batch in enumerate(batches(STEPS)):
    state, metrics = train_step(state, batch, jax.random.fold_in(root, step))
    log["loss"].append(float(metrics["loss"]))
    log["perturbed_loss"].append(float(metrics["perturbed_loss"]))
    if (step + 1) % EVAL_EVERY == 0:
      log["step"].append(step + 1)
      log["test_acc"].append(float(accuracy(samtx_flax.eval_variables(state),
                                            x_test, y_test)))
  history[name] = log
  print(f"{name}: test accuracy {log['test_acc'][-1]:.4f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, log in history.items():
  width = max(1, min(20, len(log["loss"]) // 4))
  kernel = np.ones(width) / width
  axes[0].plot(np.convolve(log["loss"], kernel, "valid"), label=f"{name} loss")
  if name == "SAM":
    axes[0].plot(np.convolve(log["perturbed_loss"], kernel, "valid"), "--",
                 label="SAM perturbed loss")
  axes[1].plot(log["step"], log["test_acc"], label=name)
axes[0].set(title="training batch loss (smoothed)", xlabel="step", yscale="log")
axes[1].set(title="test accuracy (running statistics)", xlabel="step")
axes[0].legend()
axes[1].legend()
fig.tight_layout()
plt.show()
for name, log in history.items():
  assert np.all(np.isfinite(log["loss"])) and log["test_acc"][-1] > 0.3, name'''),
  ]


def _sharp_and_flat():
  md, code = v4.new_markdown_cell, v4.new_code_cell
  return [
      md("# Sharp and flat minima: what sharpness-aware means\n\n"
         "A 2-D loss with two minima: a **sharp** one (lower loss, but a narrow "
         "valley: the loss rises steeply across it) and a **flat** one (higher "
         "loss, wide basin). Every optimizer starts from the same point, inside "
         "the sharp valley's basin. Plain gradient methods roll into the "
         "nearest minimum, the sharp one. The sharpness-aware ones take their "
         "gradient at a point $\\rho$ uphill of the weights; in the sharp "
         "valley that point lies high on the valley's wall, where the valley "
         "no longer holds the weights, and they drift to the flat minimum.\n\n"
         "Each sharpness-aware optimizer runs with its base optimizer's "
         "learning rate: SAM against SGD, MSAM against SGD with momentum, "
         "AdaSAM against AMSGrad."),
      code('''\
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import samtx

QUICK = os.environ.get("SAMTX_QUICK") == "1"  # set by the test suite
print("jax", jax.__version__, "| devices:", jax.devices(), "| quick mode:", QUICK)'''),
      md("## The surface\n\n"
         "$f(x, y) = -e^{-x^2/(2\\cdot 0.6^2) - y^2/(2\\cdot 0.08^2)}"
         " - 0.9\\, e^{-((x-2)^2 + (y-0.3)^2)/(2\\cdot 1.2^2)}$: the sharp "
         "valley along $x$ near the origin is 0.08 wide across ($y$), the "
         "flat basin around $(2, 0.3)$ is 1.2 wide in every direction. The "
         "largest Hessian eigenvalue measures sharpness."),
      code('''\
SHARP_WIDTH = (0.6, 0.08)  # the valley is narrow in y
FLAT_CENTRE, FLAT_WIDTH, FLAT_DEPTH = jnp.array([2.0, 0.3]), 1.2, 0.9


def loss(p):
  x, y = p[0], p[1]
  sharp = jnp.exp(-x**2 / (2 * SHARP_WIDTH[0]**2) - y**2 / (2 * SHARP_WIDTH[1]**2))
  flat = FLAT_DEPTH * jnp.exp(-jnp.sum((p - FLAT_CENTRE)**2) / (2 * FLAT_WIDTH**2))
  return -sharp - flat


grad = jax.jit(jax.grad(loss))
hessian = jax.jit(jax.hessian(loss))


def local_minimum(p):
  """Newton's method from a nearby point."""
  for _ in range(20):
    p = p - jnp.linalg.solve(hessian(p), grad(p))
  return p


minima = {"sharp": local_minimum(jnp.array([0.1, 0.0])),
          "flat": local_minimum(FLAT_CENTRE)}
for name, p in minima.items():
  top_eig = float(jnp.linalg.eigvalsh(hessian(p))[-1])
  print(f"{name:5s} minimum at ({float(p[0]):+.3f}, {float(p[1]):+.3f}): "
        f"loss {float(loss(p)):.3f}, largest Hessian eigenvalue {top_eig:.2f}")'''),
      md("## Six optimizers from one start\n\n"
         "Settings: start $(-0.6, 0.2)$; learning rate 0.01 for SGD, SAM, SGD "
         "with momentum 0.9 and MSAM; 0.02 for AMSGrad and AdaSAM; "
         "$\\rho = 0.25$ for the three sharpness-aware methods; 3000 full-batch "
         "steps (the loss is exact: no noise). The learning rate is stable in "
         "the sharp minimum (printed below: SGD's $\\eta\\lambda_{\\max} < 2$), so "
         "plain SGD does not leave it by diverging. "
         "MSAM holds perturbed weights; `samtx.unperturb` gives the weights "
         "each trajectory plots."),
      code('''\
START = jnp.array([-0.6, 0.2])
STEPS = 3000
LR, ADAPTIVE_LR, RHO = 0.01, 0.02, 0.25

optimizers = {  # name: (optimizer, base or sharpness-aware)
    "SGD": (optax.sgd(LR), "base"),
    "SGD + momentum": (optax.sgd(LR, momentum=0.9), "base"),
    "AMSGrad": (samtx.amsgrad(ADAPTIVE_LR), "base"),
    "SAM": (samtx.sam(LR, RHO), "aware"),
    "MSAM": (samtx.msam(LR, RHO, momentum=0.9), "aware"),
    "AdaSAM": (samtx.adasam(ADAPTIVE_LR, RHO), "aware"),
}


def trajectory(opt, start=START, steps=STEPS):
  """The evaluation weights after every step, under one jit'd lax.scan."""
  def step(carry, _):
    params, state = carry
    updates, state = opt.update(grad(params), state, params, grad_fn=grad)
    params = optax.apply_updates(params, updates)
    return (params, state), samtx.unperturb(params, state)
  _, path = jax.lax.scan(step, (start, opt.init(start)), length=steps)
  return np.concatenate([np.asarray(start)[None], np.asarray(path)])


def basin(p):
  """The minimum a point ended at (within 0.3: SAM bounces about it), else 'stalled'."""
  name, distance = min(((name, np.linalg.norm(p - np.asarray(m))) for name, m in minima.items()),
                       key=lambda item: item[1])
  return name if distance < 0.3 else "stalled"


def worst_loss_nearby(p, radius=RHO, n=720):
  """max f over the circle of radius rho around p: what SAM minimises."""
  angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
  ring = np.asarray(p) + radius * np.stack([np.cos(angles), np.sin(angles)], 1)
  return float(jnp.max(jax.vmap(loss)(jnp.asarray(ring))))


paths = {name: trajectory(opt) for name, (opt, _) in optimizers.items()}
sharp_eig = float(jnp.linalg.eigvalsh(hessian(minima["sharp"]))[-1])
print(f"SGD in the sharp minimum: lr * largest eigenvalue = {LR * sharp_eig:.2f} < 2 (stable)")
print(f"{'optimizer':15s} {'ends in':8s} {'loss':>7s} {'worst loss within rho':>22s}")
for name, path in paths.items():
  end = path[-1]
  print(f"{name:15s} {basin(end):8s} {float(loss(end)):7.3f} {worst_loss_nearby(end):22.3f}")'''),
      code('''\
xs, ys = np.meshgrid(np.linspace(-1.3, 3.6, 241), np.linspace(-0.7, 1.2, 121))
zs = np.asarray(jax.vmap(jax.vmap(lambda x, y: loss(jnp.array([x, y]))))(xs, ys))
styles = {"SGD": ("C0", "-"), "SAM": ("C0", "-"), "SGD + momentum": ("C1", "--"),
          "MSAM": ("C1", "--"), "AMSGrad": ("C2", "-."), "AdaSAM": ("C2", "-.")}

fig, axes = plt.subplots(1, 2, figsize=(13, 3.9), sharey=True)
titles = {"base": "plain optimizers: the sharp minimum",
          "aware": "sharpness-aware: the flat minimum"}
for ax, kind in zip(axes, ["base", "aware"]):
  ax.contourf(xs, ys, zs, levels=30, cmap="Greys_r", alpha=0.85)
  ax.contour(xs, ys, zs, levels=30, colors="k", linewidths=0.3, alpha=0.4)
  for name, (_, group) in optimizers.items():
    if group == kind:
      path = paths[name]
      colour, line = styles[name]
      ax.plot(path[:, 0], path[:, 1], line, color=colour, lw=2, label=name)
  ax.plot(*START, "k^", ms=9, label="start (all)")
  for name, m in minima.items():
    ax.plot(*np.asarray(m), "w*", ms=14, mec="k")
    ax.annotate(f"{name} minimum", np.asarray(m), xytext=(-30, -26 if name == "sharp" else 16),
                textcoords="offset points", color="w", fontsize=11, weight="bold")
  ax.set(title=titles[kind], xlabel="x", aspect="equal")
  ax.legend(loc="lower right", fontsize=9)
axes[0].set_ylabel("y")
fig.suptitle(f"same start, same learning rate per pair, rho = {RHO}", y=0.98)
fig.tight_layout()
plt.show()'''),
      md("## How robust is this?\n\n"
         "Only for a large enough $\\rho$. The gradient SAM uses is taken "
         "$\\rho$ across the valley: once that point is past the valley's "
         "wall (a few times its width of 0.08), the valley stops holding the "
         "weights and the flat basin's pull wins. With a small $\\rho$ it stays "
         "in or near the sharp valley. With a large one, its uphill point can land on "
         "the low ground of the sharp valley's long tail while the weights "
         "are on the flat basin's rim, and deterministic SAM stalls there "
         "(marked `stalled`). The sweep below reruns "
         "the three sharpness-aware optimizers for several radii (same start, "
         "same learning rates)."),
      code('''\
radii = [0.05, 0.25] if QUICK else [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4]
makers = {"SAM": lambda r: samtx.sam(LR, r),
          "MSAM": lambda r: samtx.msam(LR, r, momentum=0.9),
          "AdaSAM": lambda r: samtx.adasam(ADAPTIVE_LR, r)}
sweep = {name: [basin(trajectory(make(r))[-1]) for r in radii]
         for name, make in makers.items()}
print("rho     " + "".join(f"{r:>8}" for r in radii))
for name, ends in sweep.items():
  print(f"{name:8s}" + "".join(f"{end:>8s}" for end in ends))'''),
      code('''\
# The claims of this notebook, checked every time it runs (the test suite
# runs it too).
for name, (_, group) in optimizers.items():
  expected = "sharp" if group == "base" else "flat"
  assert basin(paths[name][-1]) == expected, (name, paths[name][-1])
assert all(ends[radii.index(0.05)] == "sharp" for ends in sweep.values())  # small rho stays
assert all(ends[radii.index(0.25)] == "flat" for ends in sweep.values())
assert loss(minima["sharp"]) < loss(minima["flat"])  # the sharp minimum is lower ...
assert worst_loss_nearby(minima["sharp"]) > worst_loss_nearby(minima["flat"])  # ... but sharp'''),
      md("**What this shows, and what it does not.** On this surface, from "
         "this start, every sharpness-aware optimizer ends in the flat "
         "minimum, whose loss is higher but whose worst loss within $\\rho$ is "
         "far lower, and each plain optimizer ends in the sharp one. It is a "
         "picture of the mechanism, not evidence that flat minima generalise "
         "better: that question is measured on real data in the results "
         "pages. Nor does $\\rho$ tune itself: it has to match the width of "
         "the features it should ignore, which is what the `rho` grids of "
         "the results pages search over."),
  ]


NOTEBOOKS = {
    "00_sharp_and_flat.ipynb": _sharp_and_flat,
    "01_quickstart.ipynb": _quickstart,
    "02_flax_nnx.ipynb": _nnx,
    "03_linen_batchnorm.ipynb": _linen_batchnorm,
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook ``name`` without outputs."""
  nb = v4.new_notebook(cells=NOTEBOOKS[name]())
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  return nb


def execute(nb: nbformat.NotebookNode, *, quick: bool,
            timeout: int = 600) -> nbformat.NotebookNode:
  """Runs ``nb`` in this Python's ``python3`` kernel from the notebooks folder."""
  import nbclient  # pylint: disable=g-import-not-at-top

  env = {"SAMTX_QUICK": "1" if quick else "0"}
  if quick:  # a quick run is dominated by XLA compiles: make them cheaper
    env["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
  old = {key: os.environ.get(key) for key in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}})
    return client.execute()
  finally:
    for key, value in old.items():
      if value is None:
        del os.environ[key]
      else:
        os.environ[key] = value


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-execute", action="store_true")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("names", nargs="*", default=sorted(NOTEBOOKS))
  args = parser.parse_args()
  for name in args.names:
    nb = build(name)
    if not args.no_execute:
      nb = execute(nb, quick=args.quick)
    nbformat.write(nb, HERE / name)
    print("wrote", HERE / name)


if __name__ == "__main__":
  main()
