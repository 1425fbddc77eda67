"""Data-parallel SAM on 8 devices: a BatchNorm + dropout CNN with samtx.flax.

Trains a small convolutional network on scikit-learn's embedded 8x8 digits
with ``samtx.adasam`` on 8 devices (virtual CPU devices here; the same code
runs on 8 GPUs or TPU cores). ``samtx.flax.make_train_step(loss_fn,
mesh=mesh)`` returns a jitted ``shard_map`` step that

* splits each global batch over the devices,
* perturbs each device along its own gradient (m-sharpness; pass
  ``m_sharpness=False`` for one global perturbation),
* gives every device its own dropout key (the perturbed pass reuses it),
* averages the clean pass's BatchNorm statistics, so every device keeps
  identical statistics (the perturbed pass's are discarded),
* returns metrics averaged over devices.

Run::

  .venv/bin/python examples/sharded_cnn.py              # 300 steps, ~1 min
  .venv/bin/python examples/sharded_cnn.py --steps 10   # a smoke run

The last line printed is a JSON summary (checked by tests/test_examples.py).
"""

from __future__ import annotations

import argparse
import json

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before JAX starts its backend

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import samtx  # noqa: E402
from samtx import flax as samtx_flax  # noqa: E402


class CNN(nn.Module):
  """conv-BN-relu x2, global average pool, dropout, dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    for features, stride in ((16, 1), (32, 2)):
      x = nn.Conv(features, (3, 3), strides=stride)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    x = x.mean(axis=(1, 2))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(x)


def loss_fn(params, batch, apply):
  logits = apply(batch["x"], train=True)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=128,
                      help="global batch (a multiple of the device count)")
  parser.add_argument("--global-perturbation", action="store_true",
                      help="one perturbation from the averaged gradient")
  args = parser.parse_args(argv)

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # N,8,8,1
  labels = digits.target.astype(np.int32)
  split = len(images) * 3 // 4
  train, test = slice(0, split), slice(split, None)

  mesh = jax.make_mesh((jax.device_count(),), ("batch",))
  model = CNN()
  variables = model.init(jax.random.key(0), images[:1], train=False)
  # Two-pass optimizers average their perturbed gradient over the data axis.
  tx = samtx.adasam(3e-3, rho=0.05, axis_name="batch")
  state = samtx_flax.TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=tx,
      batch_stats=variables["batch_stats"])
  train_step = samtx_flax.make_train_step(
      loss_fn, has_aux=True, mesh=mesh,
      m_sharpness=not args.global_perturbation)

  @jax.jit
  def evaluate(state, x, y):
    logits = model.apply(samtx_flax.eval_variables(state), x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  before = evaluate(state, images[test], labels[test])
  rng = np.random.default_rng(0)
  root = jax.random.key(1)
  for t in range(args.steps):
    idx = rng.choice(split, args.batch, replace=False)
    batch = {"x": images[train][idx], "y": labels[train][idx]}
    state, metrics = train_step(state, batch, jax.random.fold_in(root, t))
    if t % max(1, args.steps // 10) == 0 or t == args.steps - 1:
      print(f"step {t:4d}  loss {float(metrics['loss']):.4f}  perturbed "
            f"{float(metrics['perturbed_loss']):.4f}  batch accuracy "
            f"{float(metrics['accuracy']):.3f}", flush=True)
  after = evaluate(state, images[test], labels[test])

  # Every device holds the same BatchNorm statistics and parameters.
  copies = [np.stack([np.asarray(s.data) for s in leaf.addressable_shards])
            for leaf in jax.tree.leaves((state.batch_stats, state.params))]
  spread = max(float(np.max(np.ptp(c, axis=0))) for c in copies)
  print(f"test loss {float(before[0]):.4f} -> {float(after[0]):.4f}, test "
        f"accuracy {float(before[1]):.3f} -> {float(after[1]):.3f}; "
        f"{jax.device_count()} devices, largest difference between device "
        f"copies: {spread}")
  print(json.dumps({"devices": jax.device_count(), "steps": args.steps,
                    "test_loss_before": float(before[0]),
                    "test_loss_after": float(after[0]),
                    "test_accuracy_after": float(after[1]),
                    "replica_spread": spread}))


if __name__ == "__main__":
  main()
