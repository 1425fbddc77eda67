"""LookSAM's alpha, k and rho on a small model: which settings train like SAM.

LookSAM (Liu et al., 2022, https://arxiv.org/abs/2203.02714) takes SAM's
second gradient every ``k``-th step, stores the part ``g_v`` of SAM's
gradient orthogonal to the clean one, and on the other steps adds
``alpha n(g) g_v / n(g_v)``. The reused term's length is therefore always
``alpha n(g)``, while SAM's own orthogonal part is ``n(g_v)``, which depends
on rho and the model. This script trains an MLP (64-128-10, tanh) on the
embedded digits set with SGD + momentum 0.9 (lr 0.1, batch 64) and compares,
over seeds:

- SGD and SAM (rho 0.05, SAM's usual radius);
- samtx.looksam over a grid of k and alpha at the same rho;
- pytorch_optimizer's form of the rule (per-tensor cosine, ``g_v`` and
  reuse scaling, written here as a small optax transform) at alpha 0.7 and
  0.1, to check that the behaviour is the method's, not samtx's global
  norms;
- the measured ratio ``n(g_v) / n(g)`` of SAM's own gradient on this model
  (LookSAM with k = 1 is SAM and stores ``g_v`` every step), which is the
  scale alpha should be compared with.

It prints the final training loss (whole training set) and test accuracy,
mean and spread over seeds.

Run::

  python benchmarks/looksam_settings.py           # ~6 min on 2 busy CPU cores
  python benchmarks/looksam_settings.py --quick   # ~1 min

Results go to ``benchmarks/results/looksam_settings[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import samtx
from samtx.compare import data as compare_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
LR, MOMENTUM, RHO, BATCH, HIDDEN = 0.1, 0.9, 0.05, 64, 128


def init_mlp(key, d_in, classes):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (d_in, HIDDEN)) / np.sqrt(d_in),
          "b1": jnp.zeros(HIDDEN),
          "w2": jax.random.normal(k2, (HIDDEN, classes)) / np.sqrt(HIDDEN),
          "b2": jnp.zeros(classes)}


def logits_of(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss_of(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_of(params, x), y).mean()


def per_tensor_looksam(rho, k, alpha):
  """pytorch_optimizer's LookSAM rule as an optax transform.

  Ascent with the global norm (+1e-12); on refresh steps, per tensor,
  ``g_v = h - n(h) <g/n(g), h/n(h)> g/n(g)``; on the other steps, per tensor,
  ``g + alpha n(g) / (n(g_v) + 1e-8) g_v``. (pytorch_optimizer divides by
  ``n(g)`` without an epsilon; 1e-12 is added here so a zero tensor gradient
  cannot give NaN, which never changes a non-zero result.)
  """
  def init_fn(params):
    return jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params)

  def update_fn(grads, state, params=None, *, grad_fn=None, **extra):
    del extra
    count, stored = state

    def refresh(_):
      scale = rho / (optax.global_norm(grads) + 1e-12)
      h = grad_fn(jax.tree.map(lambda p, g: p + scale * g, params, grads))

      def g_v(g, hx):
        unit_g = g / (jnp.linalg.norm(g) + 1e-12)
        h_norm = jnp.linalg.norm(hx)
        return hx - h_norm * jnp.sum(unit_g * hx / (h_norm + 1e-12)) * unit_g
      return h, jax.tree.map(g_v, grads, h)

    def reuse(_):
      return jax.tree.map(
          lambda g, v: g + alpha * jnp.linalg.norm(g)
          / (jnp.linalg.norm(v) + 1e-8) * v, grads, stored), stored

    out, stored = jax.lax.cond(count % k == 0, refresh, reuse, None)
    return out, (count + 1, stored)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def optimizers(quick):
  sgd = lambda: optax.sgd(LR, momentum=MOMENTUM)
  out = {"SGD": sgd(), f"SAM rho={RHO}": samtx.sam(LR, RHO, momentum=MOMENTUM)}
  ks, alphas = ((5,), (0.7, 0.1)) if quick else ((2, 5, 10),
                                                 (0.7, 0.3, 0.1, 0.03))
  for k in ks:
    for alpha in alphas:
      out[f"LookSAM k={k} alpha={alpha}"] = samtx.looksam(
          LR, RHO, k=k, alpha=alpha, momentum=MOMENTUM)
  for alpha in (0.7, 0.1):
    out[f"per-tensor LookSAM k=5 alpha={alpha}"] = optax.chain(
        per_tensor_looksam(RHO, 5, alpha), sgd())
  return out


def train(opt, data, seed, epochs, record_ratio=False):
  """Final (train loss, test accuracy); with ``record_ratio`` also the
  n(g_v)/n(g) of every step (for LookSAM with k = 1, i.e. SAM)."""
  x, y = jnp.asarray(data.x_train, jnp.float32), jnp.asarray(data.y_train)
  params = init_mlp(jax.random.key(seed), x.shape[1], data.num_classes)
  state = opt.init(params)
  steps = x.shape[0] // BATCH

  @jax.jit
  def epoch(params, state, order):
    def step(carry, idx):
      params, state = carry
      xb, yb = x[idx], y[idx]
      grad_fn = jax.grad(lambda p: loss_of(p, xb, yb))
      grads = grad_fn(params)
      updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
      ratio = (state[0].inner.g_v_norm / optax.global_norm(grads)
               if record_ratio else jnp.zeros([]))
      return (optax.apply_updates(params, updates), state), ratio
    batches = order[: steps * BATCH].reshape(steps, BATCH)
    return jax.lax.scan(step, (params, state), batches)

  rng = np.random.default_rng(seed)
  ratios = []
  for _ in range(epochs):
    (params, state), r = epoch(params, state,
                               jnp.asarray(rng.permutation(x.shape[0])))
    ratios.append(np.asarray(r))
  train_loss = float(loss_of(params, x, y))
  accuracy = float(jnp.mean(jnp.argmax(
      logits_of(params, jnp.asarray(data.x_test, jnp.float32)), -1)
                            == jnp.asarray(data.y_test)))
  return train_loss, accuracy, np.concatenate(ratios)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 seed, 10 epochs, k = 5 only")
  parser.add_argument("--out", type=pathlib.Path,
                      default=ROOT / "benchmarks" / "results")
  args = parser.parse_args(argv)
  seeds, epochs = ((0,), 10) if args.quick else ((0, 1, 2), 40)
  data = compare_data.load("digits")
  start = time.time()
  lines = ["# LookSAM's alpha and k on a small model", "",
           f"`python benchmarks/looksam_settings.py"
           f"{' --quick' if args.quick else ''}` (jax {jax.__version__},"
           f" {jax.devices()[0].platform}): digits, MLP 64-{HIDDEN}-10 tanh,"
           f" SGD momentum {MOMENTUM}, lr {LR}, batch {BATCH}, {epochs}"
           f" epochs, rho {RHO}, seeds {list(seeds)}. Mean (min-max) over"
           " seeds.", ""]

  _, _, ratios = train(samtx.looksam(LR, RHO, k=1, momentum=MOMENTUM), data,
                       seeds[0], epochs, record_ratio=True)
  quantiles = np.quantile(ratios, [0.1, 0.5, 0.9])
  lines += [f"SAM's own orthogonal part on this model (LookSAM k=1 = SAM,"
            f" every step): n(g_v)/n(g) median {quantiles[1]:.3f},"
            f" 10-90% {quantiles[0]:.3f}-{quantiles[2]:.3f}. LookSAM's reused"
            " term has length alpha n(g).", "",
            "| optimizer | final train loss | test accuracy % |",
            "|---|---|---|"]
  for line in lines:
    print(line, flush=True)
  rows = []
  for name, opt in optimizers(args.quick).items():
    runs = [train(opt, data, seed, epochs)[:2] for seed in seeds]
    losses, accs = np.array([r[0] for r in runs]), np.array(
        [100 * r[1] for r in runs])
    rows.append({"optimizer": name, "train_loss": losses.tolist(),
                 "test_accuracy": accs.tolist()})
    line = (f"| {name} | {losses.mean():.3f} ({losses.min():.3f}-"
            f"{losses.max():.3f}) | {accs.mean():.1f} ({accs.min():.1f}-"
            f"{accs.max():.1f}) |")
    print(line, flush=True)
    lines.append(line)
  lines += ["", f"Wall time {time.time() - start:.0f} s."]
  stem = "looksam_settings" + ("_quick" if args.quick else "")
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  (args.out / f"{stem}.json").write_text(json.dumps(
      {"seeds": list(seeds), "epochs": epochs, "rho": RHO, "lr": LR,
       "sam_orthogonal_ratio_quantiles_10_50_90": quantiles.tolist(),
       "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
  main()
