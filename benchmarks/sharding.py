"""Optimizer state per device and step time: replicated vs FSDP vs FSDP+TP.

On 8 (virtual CPU) devices arranged as a 2x4 ``('data', 'model')`` mesh, an
MLP stack is trained with ``samtx.parallel.jit_step`` (batch over
``'data'``) in three parameter layouts:

* **replicated** -- every device holds every parameter (data parallel);
* **FSDP** -- every weight and bias split 8 ways over ``('data', 'model')``;
* **FSDP+TP** -- Megatron-style tensor parallelism over ``'model'``
  (column- then row-parallel weights) and the other dimension split over
  ``'data'``.

For every optimizer it reports the optimizer-state bytes one device holds
(from the state's shardings, :func:`samtx.parallel.state_specs`; nothing is
gathered) and the median step time (donated, interleaved repeats,
``benchmarks/_timing.py``), with the compile time of each layout separately.

``--lightsam-ii`` instead runs the float32 rounding study of LightSAM-II
(docs/guides/sharding.md): FSDP vs unsharded vs a one-ulp nudge of the
initial weights vs float64, after 1 and 20 steps.

Run::

  .venv/bin/python benchmarks/sharding.py --quick        # ~1-2 min on 2 cores
  .venv/bin/python benchmarks/sharding.py                # larger model
  .venv/bin/python benchmarks/sharding.py --lightsam-ii  # ~1 min

Results: ``benchmarks/results/sharding_cpu[_quick].{json,md}`` and
``benchmarks/results/sharding_lightsam_ii_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402  (after the device count is set)
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/ is not a package)

import samtx  # noqa: E402
from samtx import parallel as par  # noqa: E402

RHO = 0.05


def optimizers() -> dict:
  """Every samtx optimizer, at settings a real run could use."""
  return {
      "sam": samtx.sam(0.05, RHO),
      "sam_momentum": samtx.sam(0.05, RHO, momentum=0.9),
      "asam": samtx.sam(0.05, 0.5, adaptive=True, eta=0.01),
      "adasam": samtx.adasam(1e-3, RHO),
      "amsgrad": samtx.amsgrad(1e-3),
      "lightsam_I": samtx.lightsam(0.05, RHO),
      "lightsam_II": samtx.lightsam(0.05, RHO, variant="adagrad"),
      "lightsam_III": samtx.lightsam(1e-3, RHO, variant="adam"),
      "msam": samtx.msam(0.05, RHO),
      "msam_adamw": samtx.msam_adamw(1e-3, RHO),
  }


def mlp(width: int, layers: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {f"layer{i}": {
      "w": jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width),
                       jnp.float32),
      "b": jnp.zeros(width, jnp.float32)} for i in range(layers)}


def loss_fn(params, batch):
  x, y = batch
  for layer in params.values():
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return jnp.mean((x - y) ** 2)


def layouts(params) -> dict:
  all_axes = ("data", "model")
  fsdp_tp = {}
  for i, name in enumerate(params):
    column = i % 2 == 0  # Megatron pairs: column- then row-parallel
    fsdp_tp[name] = {"w": P("data", "model") if column else P("model", "data"),
                     "b": P("model") if column else P()}
  return {
      "replicated": jax.tree.map(lambda _: P(), params),
      "FSDP": {k: {"w": P(all_axes, None), "b": P(all_axes)} for k in params},
      "FSDP+TP": fsdp_tp,
  }


def per_device_bytes(tree, specs, mesh) -> int:
  """Bytes one device holds of ``tree`` laid out with ``specs`` (abstract)."""
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return sum(
      int(np.prod(NamedSharding(mesh, s).shard_shape(x.shape), dtype=np.int64))
      * np.dtype(x.dtype).itemsize for x, s in zip(leaves, spec_leaves))


def benchmark(args) -> dict:
  width, layers, batch_size = ((256, 4, 64) if args.quick else (512, 4, 128))
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  params = mlp(width, layers)
  rng = np.random.default_rng(1)
  batch = par.shard_batch(
      (jnp.asarray(rng.normal(size=(batch_size, width)), jnp.float32),
       jnp.asarray(rng.normal(size=(batch_size, width)) / 2, jnp.float32)),
      mesh, "data")
  rows = []
  for name, opt in optimizers().items():
    abstract_state = jax.eval_shape(opt.init, params)
    steppers, compile_s, state_bytes = {}, {}, {}
    for layout, specs in layouts(params).items():
      p = par.shard(params, mesh, specs)
      s = par.init_sharded(opt, p, mesh)
      state_bytes[layout] = per_device_bytes(
          abstract_state, par.state_specs(opt, params, specs), mesh)
      step = par.jit_step(loss_fn, opt, mesh, axis_name="data", donate=True)
      t0 = time.perf_counter()
      p, s, _ = step(p, s, batch)
      jax.block_until_ready(p)
      compile_s[layout] = time.perf_counter() - t0
      steppers[layout] = _timing.Stepper(
          lambda p, s, b, step=step: step(p, s, b)[:2], p, s, consts=(batch,))
    times = _timing.interleaved_times(steppers, repeats=args.repeats,
                                      inner=args.inner)
    for layout in steppers:
      rows.append({
          "optimizer": name, "layout": layout,
          "state_bytes_per_device": state_bytes[layout],
          "state_bytes_replicated": state_bytes["replicated"],
          "step_ms": _timing.summary(times[layout]),
          "first_call_s": compile_s[layout]})
      print(f"{name:14s} {layout:10s} state/device "
            f"{_timing.fmt_bytes(state_bytes[layout]):>10s}  step "
            f"{rows[-1]['step_ms']['median_ms']:.2f} ms", flush=True)
  return {"width": width, "layers": layers, "batch": batch_size,
          "param_count": _timing.tree_size(params),
          "param_bytes": _timing.tree_bytes(params), "rows": rows}


def markdown(result: dict, info: dict) -> str:
  header = ["optimizer", "layout", "state / device", "replicated / state",
            "step (median ms, IQR)", "first call (s, compile included)"]
  table = []
  for row in result["rows"]:
    ms = row["step_ms"]
    ratio = (row["state_bytes_replicated"] / row["state_bytes_per_device"]
             if row["state_bytes_per_device"] else float("nan"))
    table.append([row["optimizer"], row["layout"],
                  _timing.fmt_bytes(row["state_bytes_per_device"]),
                  f"{ratio:.2f}x",
                  f"{ms['median_ms']:.2f} ({ms['q25_ms']:.2f}-{ms['q75_ms']:.2f})",
                  f"{row['first_call_s']:.1f}"])
  return (f"# Optimizer state per device and step time by layout\n\n"
          f"MLP {result['layers']} x {result['width']}x{result['width']} "
          f"({result['param_count']:,} parameters, "
          f"{_timing.fmt_bytes(result['param_bytes'])}), global batch "
          f"{result['batch']}, 2x4 ('data', 'model') mesh of {info['device']}"
          f" devices; jax {info['jax']}, {info['date_utc']}, load "
          f"{info['load_avg_at_start']}.\n\n" + _timing.md_table(header, table)
          + "\n")


# ----------------------------------------------------------------------------
# LightSAM-II in float32: how far rounding carries a run
# ----------------------------------------------------------------------------


def lightsam_ii_study() -> dict:
  """Distance between runs that differ only in rounding, per optimizer."""
  from sklearn.datasets import load_digits  # embedded data, no download

  digits = load_digits()
  idx = np.random.default_rng(0).choice(len(digits.data), 256, replace=False)
  x, y = digits.data[idx] / 16.0, digits.target[idx]
  mesh = jax.make_mesh((8,), ("data",))
  fsdp = {"w1": P("data", None), "b1": P("data"), "w2": P("data", None),
          "b2": P()}

  def init(dtype, nudge):
    rng = np.random.default_rng(1)
    params = {"w1": rng.normal(size=(64, 32)) / 8, "b1": np.zeros(32),
              "w2": rng.normal(size=(32, 10)) / 6, "b2": np.zeros(10)}
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    if nudge:  # one ulp up: a rounding difference with no sharding at all
      params = jax.tree.map(lambda a: jnp.nextafter(a, jnp.inf), params)
    return params

  def digits_loss(params, batch):
    inputs, labels = batch
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(
        hidden @ params["w2"] + params["b2"], labels).mean()

  def run(opt, dtype, steps, how):
    params = init(dtype, how == "ulp")
    batch = (jnp.asarray(x, dtype), jnp.asarray(y))
    if how == "fsdp":
      params = par.shard(params, mesh, fsdp)
      state = par.init_sharded(opt, params, mesh)
      step = par.jit_step(digits_loss, opt, mesh, axis_name="data")
      batch = par.shard_batch(batch, mesh, "data")
      for _ in range(steps):
        params, state, _ = step(params, state, batch)
    else:
      grad_fn = jax.grad(lambda q: digits_loss(q, batch))

      @jax.jit
      def step(p, s):
        updates, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), s

      state = opt.init(params)
      for _ in range(steps):
        params, state = step(params, state)
    final = samtx.unperturb(params, state)
    return np.concatenate([np.asarray(v, np.float64).ravel()
                           for v in jax.tree.leaves(final)])

  cases = {
      "lightsam_II lr=1": lambda: samtx.lightsam(1.0, RHO, variant="adagrad"),
      "lightsam_II lr=0.05": lambda: samtx.lightsam(0.05, RHO,
                                                    variant="adagrad"),
      "lightsam_I lr=1": lambda: samtx.lightsam(1.0, RHO),
      "adasam lr=0.01": lambda: samtx.adasam(0.01, RHO),
      "sam+momentum lr=0.5": lambda: samtx.sam(0.5, RHO, momentum=0.9),
  }
  gap = lambda a, b: float(np.max(np.abs(a - b)))
  rows = []
  for name, make in cases.items():
    for steps in (1, 20):
      with jax.enable_x64(True):
        f64 = run(make(), jnp.float64, steps, "plain")
        f64_fsdp = run(make(), jnp.float64, steps, "fsdp")
      f32 = run(make(), jnp.float32, steps, "plain")
      f32_fsdp = run(make(), jnp.float32, steps, "fsdp")
      f32_ulp = run(make(), jnp.float32, steps, "ulp")
      rows.append({"optimizer": name, "steps": steps,
                   "f32_fsdp_vs_unsharded": gap(f32_fsdp, f32),
                   "f32_one_ulp_vs_unsharded": gap(f32_ulp, f32),
                   "f32_unsharded_vs_f64": gap(f32, f64),
                   "f64_fsdp_vs_unsharded": gap(f64_fsdp, f64)})
      print(rows[-1], flush=True)
  return {"rows": rows, "zero_gradient_coordinate": zero_gradient_coordinate()}


def zero_gradient_coordinate(seeds=range(4)) -> list:
  """LightSAM-II's first ascent on a coordinate whose exact gradient is 0.

  Least squares with ``w = 0``: the gradient of ``w_0`` is
  ``-2/n sum_i y_i X_i0``, and ``X_i0 = s_i / y_i`` with ``s`` in ``+u, -u``
  pairs makes that sum exactly 0; float32 leaves rounding noise whose size
  and sign depend on the reduction order (one device vs 8 batch shards).
  """
  n, d = 256, 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

  def lsq(w, batch):
    inputs, targets = batch
    return jnp.mean((inputs @ w - targets) ** 2)

  rows = []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    targets, inputs = rng.normal(size=n), rng.normal(size=(n, d))
    pairs = 30 * rng.normal(size=n // 2)
    inputs[:, 0] = np.stack([pairs, -pairs], 1).ravel() / targets
    row = {"seed": seed}
    for dtype in (jnp.float32, jnp.float64):
      with jax.enable_x64(dtype == jnp.float64):
        batch = (jnp.asarray(inputs, dtype), jnp.asarray(targets, dtype))
        w = jnp.zeros(d, dtype)
        grads = {
            "1 device": jax.jit(jax.grad(lsq))(w, batch),
            "8 shards": jax.jit(jax.grad(lsq))(
                par.shard(w, mesh, P()), par.shard_batch(batch, mesh, "data"))}
        for eps in (1e-8, 1e-4):
          ascent = samtx.lightsam_perturbation(RHO, variant="adagrad", eps=eps)
          for where, g in grads.items():
            seen = {}

            def grad_fn(p, g=g, seen=seen):
              seen["e"] = p - w  # the perturbation the ascent chose
              return g

            ascent.update(g, ascent.init(w), w, grad_fn=grad_fn)
            tag = f"{jnp.dtype(dtype).name} eps={eps:g} {where}"
            row[f"{tag} g0"] = float(g[0])
            row[f"{tag} e0"] = float(seen["e"][0])
    rows.append(row)
    print(row, flush=True)
  return rows


def lightsam_ii_markdown(result: dict, info: dict) -> str:
  header = ["optimizer", "steps", "f32: FSDP vs unsharded",
            "f32: 1-ulp nudge vs unsharded", "f32 vs f64 (unsharded)",
            "f64: FSDP vs unsharded"]
  table = [[r["optimizer"], r["steps"], f"{r['f32_fsdp_vs_unsharded']:.1e}",
            f"{r['f32_one_ulp_vs_unsharded']:.1e}",
            f"{r['f32_unsharded_vs_f64']:.1e}",
            f"{r['f64_fsdp_vs_unsharded']:.1e}"] for r in result["rows"]]
  return ("# How far float32 rounding carries a run (max |param difference|)\n\n"
          "tanh MLP 64-32-10 on 256 digits images, full batch, rho = 0.05, "
          f"8 CPU devices (FSDP over 'data'); jax {info['jax']}, "
          f"{info['date_utc']}.\n\n" + _timing.md_table(header, table) + "\n"
          + zero_gradient_markdown(result["zero_gradient_coordinate"]))


def zero_gradient_markdown(rows) -> str:
  header = ["seed"] + [f"{dt} eps={eps:g}: g0, e0 (1 device / 8 shards)"
                       for dt in ("float32", "float64") for eps in (1e-8, 1e-4)]
  table = []
  for row in rows:
    cells = [row["seed"]]
    for dt in ("float32", "float64"):
      for eps in (1e-8, 1e-4):
        tag = f"{dt} eps={eps:g}"
        cells.append(
            f"{row[f'{tag} 1 device g0']:+.1e} / {row[f'{tag} 8 shards g0']:+.1e};"
            f" {row[f'{tag} 1 device e0']:+.4f} / {row[f'{tag} 8 shards e0']:+.4f}")
    table.append(cells)
  return ("\n## First ascent on a coordinate with exact gradient 0 (rho = 0.05)"
          "\n\n" + _timing.md_table(header, table) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small model, few repeats")
  parser.add_argument("--lightsam-ii", action="store_true",
                      help="run the LightSAM-II float32 rounding study")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--inner", type=int, default=None)
  parser.add_argument("--out", default=None, help="results prefix")
  args = parser.parse_args(argv)
  args.repeats = args.repeats or (5 if args.quick else 7)
  args.inner = args.inner or (3 if args.quick else 5)
  info = _timing.machine_info()
  backend = jax.default_backend()
  if args.lightsam_ii:
    result = lightsam_ii_study()
    prefix = _timing.write_results(
        "sharding_lightsam_ii", {"machine": info, **result},
        lightsam_ii_markdown(result, info), backend=backend, quick=False,
        out=args.out)
  else:
    result = benchmark(args)
    prefix = _timing.write_results(
        "sharding", {"machine": info, "quick": args.quick, **result},
        markdown(result, info), backend=backend, quick=args.quick,
        out=args.out)
  print(f"wrote {prefix}.json and {prefix}.md")


if __name__ == "__main__":
  main()
