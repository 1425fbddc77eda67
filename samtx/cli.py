"""The ``samtx`` command line (``samtx compare``)."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samtx


def _data(seed, n=1024, classes=4, dim=16, noise=2.0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim))
  labels = rng.integers(0, classes, 2 * n)
  x = centers[labels] + noise * rng.normal(size=(2 * n, dim)) / np.sqrt(dim)
  x, labels = jnp.asarray(x, jnp.float32), jnp.asarray(labels)
  return (x[:n], labels[:n]), (x[n:], labels[n:])


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    "sam": lambda: samtx.sam(0.1, 0.05, momentum=0.9),
    "adasam": lambda: samtx.adasam(0.01, 0.05),
    "lightsam": lambda: samtx.lightsam(0.5, 0.1),
    "msam": lambda: samtx.msam(0.1, 0.3),
}


def compare(args) -> None:
  (x, y), (xt, yt) = _data(args.seed)
  print(f"{'optimizer':10s} {'test acc':>9s} {'train loss':>11s} {'s/step':>9s}")
  for name, make in OPTIMIZERS.items():
    opt = make()
    keys = jax.random.split(jax.random.key(args.seed), 2)
    params = {"w1": jax.random.normal(keys[0], (x.shape[1], 64)) * 0.25,
              "b1": jnp.zeros(64),
              "w2": jax.random.normal(keys[1], (64, 4)) * 0.125,
              "b2": jnp.zeros(4)}

    def logits(p, xs):
      return jax.nn.relu(xs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(
          logits(p, x), y).mean()

    @jax.jit
    def step(p, s):
      grad_fn = jax.grad(loss)
      u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s

    state = opt.init(params)
    params, state = step(params, state)
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(args.steps):
      params, state = step(params, state)
    jax.block_until_ready(params)
    per_step = (time.perf_counter() - start) / args.steps
    clean = samtx.unperturb(params, state)
    acc = float(jnp.mean(jnp.argmax(logits(clean, xt), -1) == yt))
    print(f"{name:10s} {acc:9.3f} {float(loss(clean)):11.4f} {per_step:9.2e}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="samtx", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  cmp = sub.add_parser("compare", help="train one model with each optimizer")
  cmp.add_argument("--steps", type=int, default=300, help="training steps")
  cmp.add_argument("--seed", type=int, default=0, help="data and init seed")
  cmp.set_defaults(func=compare)
  args = parser.parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main()
