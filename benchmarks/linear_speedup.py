"""Linear speedup in the mini-batch size: steps to a target loss vs batch size.

Task: a tanh MLP (64-32-10) classifying scikit-learn's embedded ``digits``
(1,797 images, no download). Each step draws a mini-batch of ``b`` examples
uniformly with replacement, so the gradient noise variance falls as 1/b.
We count the optimizer steps until the *full-dataset* training loss first
drops to ``--target`` (checked every ``max(1, 128 // b)`` steps, i.e. after
about every 128 examples, so the count's resolution is the same in examples
for every batch size).

Learning-rate rule: for every optimizer and batch size the learning rate is
tuned on a factor-2 grid (the protocol of Shallue et al., arXiv 1811.03600):
the grid value with the smallest median step count over the seeds is used,
and all seeds are reported at that value. With a single learning rate for
all batch sizes no optimizer can speed up linearly (the step size that is
stable for b=8 wastes large batches), so "steps needed" means "steps needed
with a good learning rate".

Outputs: a table on stdout, ``benchmarks/results/linear_speedup.json`` and
``benchmarks/results/linear_speedup.png``:

- the slope of log(steps) vs log(b) in the noise-dominated range (b at most
  a quarter of the critical batch) with a bootstrap-over-seeds standard
  error (perfect linear speedup is -1);
- the critical batch size B_crit from fitting steps(b) = S_min (1 + B_crit/b)
  (McCandlish et al., arXiv 1812.06162), with its bootstrap standard error;
- device invariance: the same global batch (global perturbation) through
  ``samtx.parallel.jit_step`` and ``shard_map_step`` on 1, 2, 4 and 8
  (virtual CPU) devices, with the step counts and the largest parameter
  difference.

The sweep runs the whole training loop inside one compiled ``lax.while_loop``
per (optimizer, batch size), vmapped over learning rates and seeds, on one
device; the device-invariance part shows that sharding a global batch does
not change the numbers.

Usage::

  python benchmarks/linear_speedup.py            # full run (~13 min, 2 cores)
  python benchmarks/linear_speedup.py --quick    # ~65 s of CPU time
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  # LLVM level 1: compiles ~3x faster than the default, runs about as fast
  # here (same numbers); the sweep compiles one program per (optimizer, b).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=1").strip()

import jax  # noqa: E402

if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import samtx  # noqa: E402
from samtx import parallel  # noqa: E402

HIDDEN = 32
RHO = 0.05
EVAL_EXAMPLES = 128  # check the loss after about this many examples

OPTIMIZERS = {
    # name: (factory(lr, axis_name), learning-rate grid)
    "adasam": (lambda lr, axis=None: samtx.adasam(lr, RHO, axis_name=axis),
               [2e-3 * 2 ** k for k in range(6)]),
    "amsgrad": (lambda lr, axis=None: samtx.amsgrad(lr),
                [2e-3 * 2 ** k for k in range(6)]),
    "sam": (lambda lr, axis=None: samtx.sam(lr, RHO, momentum=0.9,
                                            axis_name=axis),
            [0.025 * 2 ** k for k in range(8)]),
}


# ----------------------------------------------------------------------------
# task
# ----------------------------------------------------------------------------


def load_data():
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = digits.data.astype(np.float32)
  x = (x - x.mean(0)) / (x.std(0) + 1.0)
  return jnp.asarray(x), jnp.asarray(digits.target.astype(np.int32))


def init_params(key, dim, classes):
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (dim, HIDDEN)) / np.sqrt(dim),
      "b1": jnp.zeros(HIDDEN),
      "w2": jax.random.normal(k2, (HIDDEN, classes)) / np.sqrt(HIDDEN),
      "b2": jnp.zeros(classes),
  }


def loss_fn(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def sample(data, key, t, b):
  """The t-th mini-batch of a run: b indices drawn with replacement."""
  x, y = data
  idx = jax.random.randint(jax.random.fold_in(key, t), (b,), 0, x.shape[0])
  return x[idx], y[idx]


def eval_every(b):
  return max(1, EVAL_EXAMPLES // b)


# ----------------------------------------------------------------------------
# fused sweep: one while_loop per (optimizer, batch), vmapped over lr x seed
# ----------------------------------------------------------------------------


def make_sweep(name, b, n_features, classes, target, max_steps):
  """``fn(lrs, seeds, data) -> (steps, final loss)``, each ``(lrs, seeds)``.

  The data is an argument, not a closed-over constant: XLA would otherwise
  spend a long time constant-folding through it.
  """
  factory, _ = OPTIMIZERS[name]
  every = eval_every(b)

  def one(lr, seed, data):
    opt = factory(lr)
    key = jax.random.PRNGKey(seed)
    init_key, data_key = jax.random.split(key)
    params = init_params(init_key, n_features, classes)
    state = opt.init(params)

    def train(t, carry):
      params, state = carry
      batch = sample(data, data_key, t, b)
      grad_fn = jax.grad(lambda p: loss_fn(p, batch))
      updates, state = opt.update(grad_fn(params), state, params,
                                  grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    def cond(c):
      t, _, _, loss = c
      return (loss > target) & (t < max_steps)

    def body(c):
      t, params, state, _ = c
      params, state = jax.lax.fori_loop(t, t + every, train, (params, state))
      loss = loss_fn(params, data)
      loss = jnp.where(jnp.isfinite(loss), loss, jnp.inf)
      return t + every, params, state, loss

    t, _, _, loss = jax.lax.while_loop(
        cond, body, (jnp.int32(0), params, state, jnp.float32(jnp.inf)))
    return jnp.where(loss <= target, t, -1), loss

  return jax.jit(jax.vmap(jax.vmap(one, (None, 0, None)), (0, None, None)))


def sweep(names, batches, seeds, data, target, max_examples, log):
  results = {}
  for name in names:
    lrs = OPTIMIZERS[name][1]
    results[name] = {}
    for b in batches:
      max_steps = int(np.ceil(max_examples / b / eval_every(b))) * eval_every(b)
      max_steps = max(max_steps, 40 * eval_every(b))
      fn = make_sweep(name, b, int(data[0].shape[1]),
                      int(data[1].max()) + 1, target, max_steps)
      args = (jnp.asarray(lrs, jnp.float32), jnp.arange(seeds), data)
      t0 = time.perf_counter()
      compiled = fn.lower(*args).compile()
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      steps, _ = compiled(*args)
      steps = np.asarray(jax.block_until_ready(steps))
      wall = time.perf_counter() - t0
      # median over seeds, a failed run counts as infinitely many steps
      med = np.median(np.where(steps < 0, np.inf, steps), axis=1)
      best = int(np.argmin(med))
      results[name][b] = {
          "lr": lrs[best],
          "steps": [int(s) for s in steps[best]],
          "median_steps": float(med[best]),
          "median_steps_per_lr": {f"{lr:g}": float(m) for lr, m in
                                  zip(lrs, med)},
          "lr_at_grid_edge": best in (0, len(lrs) - 1),
          "max_steps": max_steps,
          "compile_s": compile_s,
          "run_s": wall,
      }
      log(f"  {name:8s} b={b:5d} lr={lrs[best]:<8.4g} median steps="
          f"{med[best]:8.1f}  seeds={[int(x) for x in steps[best]]}"
          f"  (compile {compile_s:.1f}s, run {wall:.1f}s)")
  return results


# ----------------------------------------------------------------------------
# fits
# ----------------------------------------------------------------------------


def fit_critical(batches, steps):
  """Least-squares fit of log S = log S_min + log(1 + B/b) (B >= 0)."""
  b = np.asarray(batches, float)
  logs = np.log(np.asarray(steps, float))
  best = (np.inf, None, None)
  for log_bc in np.linspace(np.log(b.min()) - 3, np.log(b.max()) + 3, 1201):
    shape = np.log1p(np.exp(log_bc) / b)
    log_smin = np.mean(logs - shape)
    err = np.sum((logs - log_smin - shape) ** 2)
    if err < best[0]:
      best = (err, np.exp(log_smin), np.exp(log_bc))
  return best[1], best[2]


def slope(batches, steps):
  b = np.log(np.asarray(batches, float))
  s = np.log(np.asarray(steps, float))
  coef = np.polyfit(b, s, 1)
  return float(coef[0])


def analyse(per_batch, batches, n_boot=1000, seed=0):
  """Slope in the noise-dominated range and critical batch, with bootstrap."""
  ok = [b for b in batches if np.all(np.asarray(per_batch[b]["steps"]) > 0)]
  steps = np.array([per_batch[b]["steps"] for b in ok], float)  # (B, seeds)
  med = np.median(steps, axis=1)
  s_min, b_crit = fit_critical(ok, med)
  noise = [b for b in ok if b <= b_crit / 4]
  if len(noise) < 3:
    noise = ok[:3]
  idx = [ok.index(b) for b in noise]
  main_slope = slope(noise, med[idx])
  rng = np.random.default_rng(seed)
  boot_slope, boot_crit = [], []
  n_seeds = steps.shape[1]
  for _ in range(n_boot):
    pick = rng.integers(0, n_seeds, n_seeds)
    m = np.median(steps[:, pick], axis=1)
    boot_slope.append(slope(noise, m[idx]))
    boot_crit.append(fit_critical(ok, m)[1])
  local = [float(np.log(med[i + 1] / med[i]) / np.log(ok[i + 1] / ok[i]))
           for i in range(len(ok) - 1)]
  return {
      "batches_reaching_target": ok,
      "median_steps": med.tolist(),
      "noise_dominated_batches": noise,
      "slope": main_slope,
      "slope_se": float(np.std(boot_slope)),
      "slope_ci95": [float(np.percentile(boot_slope, 2.5)),
                     float(np.percentile(boot_slope, 97.5))],
      "critical_batch": float(b_crit),
      "critical_batch_se": float(np.std(boot_crit)),
      "critical_batch_ci95": [float(np.percentile(boot_crit, 2.5)),
                              float(np.percentile(boot_crit, 97.5))],
      "s_min": float(s_min),
      "local_slopes": local,
  }


# ----------------------------------------------------------------------------
# device invariance through samtx.parallel
# ----------------------------------------------------------------------------


def device_run(builder, n, b, lr, data, target, max_steps, draw, seed=0):
  devices = jax.devices()[:n]
  mesh = jax.make_mesh((n,), ("batch",), devices=devices)
  factory = OPTIMIZERS["adasam"][0]
  if builder == "jit_step":
    opt = factory(lr)
    step = parallel.jit_step(loss_fn, opt, mesh)
  else:
    opt = factory(lr, "batch")
    step = parallel.shard_map_step(loss_fn, opt, mesh, m_sharpness=False)
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  classes = int(data[1].max()) + 1
  params = init_params(init_key, data[0].shape[1], classes)
  state = parallel.replicate(opt.init(params), mesh)
  params = parallel.replicate(params, mesh)
  full_loss = jax.jit(loss_fn)
  every = eval_every(b)
  t, loss = 0, np.inf
  while t < max_steps:
    for _ in range(every):
      batch = parallel.shard_batch(draw(data, data_key, t), mesh)
      params, state, _ = step(params, state, batch)
      t += 1
    loss = float(full_loss(params, data))
    if loss <= target:
      break
  steps = t if loss <= target else -1
  flat = np.concatenate([np.ravel(np.asarray(x))
                         for x in jax.tree.leaves(params)])
  return steps, flat


def device_invariance(batches, lrs, data, target, max_examples, counts,
                      builders, log):
  out = []
  for b in batches:
    max_steps = max(int(np.ceil(max_examples / b)), 40 * eval_every(b))
    reference = None
    row = {"batch": b, "lr": lrs[b], "runs": []}
    draw = jax.jit(lambda data, key, t, b=b: sample(data, key, t, b))
    for builder in builders:
      for n in counts:
        t0 = time.perf_counter()
        steps, flat = device_run(builder, n, b, lrs[b], data, target,
                                 max_steps, draw)
        if reference is None:
          reference = flat
        diff = float(np.max(np.abs(flat - reference)))
        row["runs"].append({"builder": builder, "devices": n,
                            "steps": steps, "max_param_diff": diff})
        log(f"  b={b:5d} {builder:15s} devices={n}: steps={steps:5d}"
            f"  max |params - params(1 device, jit_step)| = {diff:.2e}"
            f"  ({time.perf_counter() - t0:.1f}s)")
    row["identical_steps"] = len({r["steps"] for r in row["runs"]}) == 1
    out.append(row)
  return out


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------


def plot(results, fits, batches, path, target):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  colors = {"adasam": "C0", "sam": "C1", "amsgrad": "C2"}
  for name, per_batch in results.items():
    fit = fits[name]
    ok = fit["batches_reaching_target"]
    steps = np.array([per_batch[b]["steps"] for b in ok], float)
    for j in range(steps.shape[1]):
      ax.scatter(ok, steps[:, j], s=8, color=colors[name], alpha=0.35)
    ax.plot(ok, fit["median_steps"], "o-", color=colors[name],
            label=(f"{name}: slope {fit['slope']:.2f}±{fit['slope_se']:.2f},"
                   f" B_crit≈{fit['critical_batch']:.0f}"))
    bb = np.geomspace(min(ok), max(ok), 100)
    ax.plot(bb, fit["s_min"] * (1 + fit["critical_batch"] / bb), ":",
            color=colors[name], lw=1)
  ref = results.get("adasam", next(iter(results.values())))
  b0 = batches[0]
  s0 = np.median(ref[b0]["steps"]) if b0 in ref else None
  if s0:
    bb = np.array([b0, batches[-1]], float)
    ax.plot(bb, s0 * b0 / bb, "k--", lw=0.8, label="perfect linear speedup")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("global batch size b")
  ax.set_ylabel(f"steps to full-data training loss ≤ {target}")
  ax.set_title("digits MLP: steps to target (lr tuned per b, median of seeds)")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small sweep (< 2 min on 2 CPU cores)")
  parser.add_argument("--seeds", type=int, default=None)
  parser.add_argument("--target", type=float, default=0.01)
  parser.add_argument("--out", type=pathlib.Path,
                      default=ROOT / "benchmarks" / "results")
  args = parser.parse_args(argv)

  if args.quick:
    names = ["adasam"]
    batches = [8, 64, 512]
    seeds = args.seeds or 3
    invariance_batches, counts = [64], [1, 2, 4, 8]
    builders = ("jit_step",)
    max_examples = 20_000
    # a narrower grid around the full run's choices
    OPTIMIZERS["adasam"] = (OPTIMIZERS["adasam"][0],
                            [4e-3 * 2 ** k for k in range(3)])
    stem = "linear_speedup_quick"
  else:
    names = ["adasam", "sam", "amsgrad"]
    batches = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    seeds = args.seeds or 6
    invariance_batches, counts = [32, 256], [1, 2, 4, 8]
    builders = ("jit_step", "shard_map_step")
    max_examples = 40_000
    stem = "linear_speedup"

  lines = []

  def log(msg=""):
    print(msg, flush=True)
    lines.append(msg)

  data = load_data()
  log(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform}"
      f" devices; digits N={data[0].shape[0]}; target loss {args.target};"
      f" rho={RHO}; seeds={seeds}")
  log("sweep (lr tuned per batch on a factor-2 grid, median over seeds):")
  t0 = time.perf_counter()
  results = sweep(names, batches, seeds, data, args.target, max_examples, log)
  fits = {name: analyse(results[name], batches) for name in names}
  sweep_s = time.perf_counter() - t0

  log("device invariance (AdaSAM, global perturbation, same global batch):")
  t1 = time.perf_counter()
  lrs = {b: results["adasam"][b]["lr"] if b in results["adasam"]
         else OPTIMIZERS["adasam"][1][3] for b in invariance_batches}
  invariance = device_invariance(invariance_batches, lrs, data, args.target,
                                 max_examples, counts, builders, log)
  invariance_s = time.perf_counter() - t1

  log()
  header = f"{'b':>6} | " + " | ".join(f"{n:>18}" for n in names)
  log("median steps to target (tuned lr):")
  log(header)
  log("-" * len(header))
  for b in batches:
    cells = []
    for n in names:
      r = results[n][b]
      s = "n/a" if not np.isfinite(r["median_steps"]) else (
          f"{r['median_steps']:.0f} (lr {r['lr']:.3g})")
      cells.append(f"{s:>18}")
    log(f"{b:>6} | " + " | ".join(cells))
  log()
  for n in names:
    f = fits[n]
    log(f"{n:8s} slope d log(steps)/d log(b) over b in"
        f" {f['noise_dominated_batches']}: {f['slope']:.3f} ± {f['slope_se']:.3f}"
        f" (95% CI {f['slope_ci95'][0]:.2f}..{f['slope_ci95'][1]:.2f});"
        f" critical batch {f['critical_batch']:.0f} ± {f['critical_batch_se']:.0f}")
  for row in invariance:
    runs = ", ".join(f"{r['builder']}@{r['devices']}: {r['steps']}"
                     for r in row["runs"])
    log(f"device invariance b={row['batch']}: steps {runs};"
        f" identical={row['identical_steps']}; max param diff"
        f" {max(r['max_param_diff'] for r in row['runs']):.1e}")
  log(f"wall time: sweep {sweep_s:.0f}s (incl. compiles), invariance"
      f" {invariance_s:.0f}s")

  args.out.mkdir(parents=True, exist_ok=True)
  record = {
      "command": "python benchmarks/linear_speedup.py" +
                 (" --quick" if args.quick else ""),
      "task": "sklearn digits, tanh MLP 64-32-10, cross-entropy; batches "
              "drawn uniformly with replacement",
      "target_full_train_loss": args.target,
      "rho": RHO,
      "learning_rate_rule": "per (optimizer, batch) the factor-2 grid value "
                            "with the smallest median steps over seeds",
      "lr_grids": {n: OPTIMIZERS[n][1] for n in names},
      "loss_checked_every_steps": {str(b): eval_every(b) for b in batches},
      "seeds": seeds,
      "batches": batches,
      "results": {n: {str(b): r for b, r in results[n].items()}
                  for n in names},
      "fits": fits,
      "device_invariance": invariance,
      "wall_s": {"sweep": sweep_s, "device_invariance": invariance_s},
      "environment": {"jax": jax.__version__, "optax": optax.__version__,
                      "python": platform.python_version(),
                      "machine": platform.machine(),
                      "cpu_count": os.cpu_count(),
                      "devices": f"{jax.device_count()} x "
                                 f"{jax.devices()[0].platform}"},
  }
  (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
  plot(results, fits, batches, args.out / f"{stem}.png", args.target)
  log(f"wrote {args.out / (stem + '.json')} and {stem}.png")


if __name__ == "__main__":
  main()
