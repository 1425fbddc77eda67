"""Every two-pass optimizer at the two-pass limit: step time against SAM.

A two-pass optimizer takes two forward-backward passes per step plus
elementwise work over the parameters, so on a model whose passes dominate it
should cost what ``samtx.sam`` costs. This script compiles one jitted,
donated training step per optimizer on a float32 MLP 784-1024-256-10 (batch
256) and times them *side by side*: every repeat runs each optimizer for the
same number of steps, in a rotated order, so the load of a shared machine
hits all of them alike. It prints each optimizer's median per-repeat ratio
to the ``samtx.sam`` step and to the base SGD step, with the inter-quartile
band of those ratios (the noise) and the ratio of the fastest repeats.

LookSAM(k=5) takes the second pass on one step in five, so it is compared
with the base step (limit ``1 + 1/k = 1.2``); every timed block is a whole
number of LookSAM cycles.

Run::

  .venv/bin/python benchmarks/two_pass.py            # ~3 min on 2 CPU cores
  .venv/bin/python benchmarks/two_pass.py --quick    # ~1 min
  .venv/bin/python benchmarks/two_pass.py --profile  # + device ms per op kind

Results go to ``benchmarks/results/two_pass_<backend>[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/ is not a package)
import step_time  # noqa: E402  (the MLP and the step builder, shared)

import samtx  # noqa: E402

LR, RHO, MOMENTUM, LOOKSAM_K = 1e-3, 0.05, 0.9, 5
BASE, SAM = "optax.sgd", "samtx.sam"


def optimizers() -> dict:
  """``name -> (optimizer, calling convention)``: the base, then SAM, then
  every other two-pass optimizer (all with momentum 0.9 where they take one).
  """
  two = step_time.TWO_PASS
  sgd_m = dict(momentum=MOMENTUM)
  return {
      BASE: (optax.sgd(LR, momentum=MOMENTUM), step_time.ONE_PASS),
      SAM: (samtx.sam(LR, RHO, **sgd_m), two),
      "samtx.asam": (samtx.sam(LR, RHO, adaptive=True, **sgd_m), two),
      "samtx.adasam": (samtx.adasam(LR, RHO), two),
      "samtx.lightsam_I": (samtx.lightsam(LR, RHO, variant="adagrad_norm"),
                           two),
      "samtx.lightsam_II": (samtx.lightsam(LR, RHO, variant="adagrad"), two),
      "samtx.lightsam_III": (samtx.lightsam(LR, RHO, variant="adam"), two),
      "samtx.gsam": (samtx.gsam(LR, RHO, **sgd_m), two),
      "samtx.wsam": (samtx.wsam(LR, RHO, **sgd_m), two),
      "samtx.friendly_sam": (samtx.friendly_sam(LR, RHO, **sgd_m), two),
      f"samtx.looksam(k={LOOKSAM_K})": (
          samtx.looksam(LR, RHO, k=LOOKSAM_K, **sgd_m), two),
  }


def build(model, opt, kind, key):
  """A compiled, donated step of ``opt`` on ``model``; (Stepper, record)."""
  params = _timing.unshare(model.init(key))
  state = _timing.unshare(opt.init(params))
  batch = model.make_batch(jax.random.key(1))
  compiled = _timing.compile_step(step_time.make_step(opt, model.loss, kind),
                                  params, state, batch)
  record = {"compile_s": compiled.compile_s, "cost": compiled.cost,
            "memory": compiled.memory,
            "state_bytes": _timing.tree_bytes(state)}
  return _timing.Stepper(compiled.fn, params, state, (batch,)), record


def markdown(payload) -> str:
  m = payload["machine"]
  out = [f"# Two-pass optimizers vs SAM ({'quick' if payload['quick'] else 'full'}"
         " run)\n\n",
         f"Machine: {m['cpu']} ({m['cpu_count']} cores, backend {m['backend']}),"
         f" jax {m['jax']}, optax {m['optax']}, {m['date_utc']}; load average"
         f" at start {m['load_avg_at_start']}, at end"
         f" {payload['load_avg_at_end']}.\n\n",
         f"Model: {payload['model']}. Command: `{payload['command']}`; wall"
         f" time {payload['wall_s']:.0f} s; {payload['repeats']} interleaved"
         f" repeats of {payload['inner']} steps each. Ratios are medians of"
         " per-repeat ratios (IQR = noise of the shared machine); min/min is"
         " the ratio of the fastest repeats (other processes only add"
         " time).\n\n"]
  rows = []
  for r in payload["rows"]:
    rows.append([r["name"], f"{r['median_ms']:.2f}",
                 f"{r['vs_sam']['ratio']:.3f}",
                 f"{r['vs_sam']['q25']:.3f}-{r['vs_sam']['q75']:.3f}",
                 f"{r['vs_sam']['min_ratio']:.3f}",
                 f"{r['vs_base']['ratio']:.3f}",
                 f"{r['vs_base']['min_ratio']:.3f}",
                 f"{r['flops_vs_sam']:.3f}" if r["flops_vs_sam"] else "n/a"])
  out.append(_timing.md_table(
      ["optimizer", "step ms", "/ sam", "IQR", "min/min", "/ base sgd",
       "min/min", "XLA flops / sam"], rows))
  profiled = [(r["name"], r["profile_ms_per_step"]) for r in payload["rows"]
              if r.get("profile_ms_per_step")]
  if profiled:
    out.append("\n## Device ms per step by XLA op kind (summed over"
               " threads)\n\n")
    out.append(_timing.md_table(
        ["optimizer", "op kind: ms"],
        [[n, ", ".join(f"{k} {v:.1f}" for k, v in p.items())]
         for n, p in profiled]))
  return "".join(out)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer repeats, shorter timed blocks")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--only", default=None,
                      help="comma-separated optimizer names (base and SAM"
                      " are always kept)")
  parser.add_argument("--profile", action="store_true",
                      help="record device time per XLA op kind")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  repeats = args.repeats or (7 if args.quick else 15)
  min_block_s = 0.1 if args.quick else 0.25
  log = print

  machine = _timing.machine_info()
  t0 = time.perf_counter()
  model = step_time.mlp((784, 1024, 256, 10), batch_size=256)
  entries = optimizers()
  if args.only:
    keep = {BASE, SAM, *args.only.split(",")}
    entries = {k: v for k, v in entries.items() if k in keep}
  log(f"two-pass step time: {model.description}, {machine['cpu']}"
      f" ({machine['cpu_count']} cores), load {machine['load_avg_at_start']}")
  steppers, records = {}, {}
  for name, (opt, kind) in entries.items():
    steppers[name], records[name] = build(model, opt, kind, jax.random.key(0))
    log(f"  compiled {name:28s} {records[name]['compile_s']:6.2f} s")
  if args.profile:
    for name, stepper in steppers.items():
      records[name]["profile_ms_per_step"] = _timing.profile_ops(
          stepper, steps=2 * LOOKSAM_K)
  # Whole LookSAM cycles in every timed block, so its average is fair.
  inner = _timing.calibrate_inner(steppers[SAM], min_block_s)
  inner = int(np.ceil(inner / LOOKSAM_K) * LOOKSAM_K)
  times = _timing.interleaved_times(steppers, repeats=repeats, inner=inner)

  rows = []
  sam_flops = records[SAM]["cost"]["flops"]
  for name in entries:
    flops = records[name]["cost"]["flops"]
    rows.append({
        "name": name, **_timing.summary(times[name]),
        "vs_sam": _timing.paired_ratio(times[name], times[SAM]),
        "vs_base": _timing.paired_ratio(times[name], times[BASE]),
        "flops_vs_sam": flops / sam_flops if flops and sam_flops else None,
        **{k: v for k, v in records[name].items()}})
  try:
    load_end = os.getloadavg()
  except OSError:  # pragma: no cover
    load_end = None
  payload = {
      "machine": machine, "quick": args.quick, "load_avg_at_end": load_end,
      "command": "python benchmarks/two_pass.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "model": model.description, "repeats": repeats, "inner": inner,
      "settings": {"lr": LR, "rho": RHO, "momentum": MOMENTUM,
                   "looksam_k": LOOKSAM_K},
      "wall_s": time.perf_counter() - t0, "rows": rows,
  }
  log(f"\n{'optimizer':28s} {'ms':>8s} {'/sam':>7s} {'IQR':>13s}"
      f" {'min/min':>7s} {'/base':>7s}")
  for r in rows:
    s, b = r["vs_sam"], r["vs_base"]
    log(f"{r['name']:28s} {r['median_ms']:8.2f} {s['ratio']:7.3f}"
        f" {s['q25']:6.3f}-{s['q75']:6.3f} {s['min_ratio']:7.3f}"
        f" {b['ratio']:7.3f}")
  prefix = _timing.write_results(
      "two_pass", payload, markdown(payload), backend=machine["backend"],
      quick=args.quick, out=args.out)
  log(f"\nwrote {prefix}.json and {prefix}.md in {payload['wall_s']:.0f}s")
  return payload


if __name__ == "__main__":
  main()
