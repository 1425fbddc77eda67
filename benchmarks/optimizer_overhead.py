"""What the optimizer alone costs: update time and state bytes, no model.

On a ~1e7-parameter tree shaped like a small transformer (~40 leaves of
mixed sizes) this script measures, side by side in one process:

1. **moment transforms**: each samtx ``scale_by_*`` rule (and the
   ``samtx.amsgrad`` optimizer) against its nearest optax equivalent, in
   median update time and in bytes of optimizer state;
2. **SAM-family update overhead**: each samtx optimizer's update with a
   synthetic, almost free ``grad_fn`` (``h = g + 1e-3 * params``), against its
   base optimizer, so the bookkeeping a perturbation adds shows without the
   forward-backward pass that hides it in a real step;
3. **state bytes**: every samtx optimizer's state against its base
   optimizer's (computed with ``jax.eval_shape``; nothing is allocated).

Every step is compiled with ``donate_argnums=(0, 1)``; the memory analysis of
each compiled update is recorded too.

Run::

  .venv/bin/python benchmarks/optimizer_overhead.py           # ~2 min on CPU
  .venv/bin/python benchmarks/optimizer_overhead.py --quick   # 1e6 params

Results go to ``benchmarks/results/optimizer_overhead_<backend>[_quick].*``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/ is not a package)

import samtx  # noqa: E402

LR, RHO, MOMENTUM = 1e-3, 0.05, 0.9


def transformer_like_shapes(d_model: int, layers: int, vocab: int) -> dict:
  """Leaf shapes of a transformer: 4*d^2 + 8*d^2 MLP per block, embeddings."""
  shapes = {"embed": (vocab, d_model)}
  for i in range(layers):
    shapes[f"block{i}"] = {
        "ln1": (d_model,), "qkv_w": (d_model, 3 * d_model),
        "qkv_b": (3 * d_model,), "proj_w": (d_model, d_model),
        "proj_b": (d_model,), "ln2": (d_model,),
        "ff_in_w": (d_model, 4 * d_model), "ff_in_b": (4 * d_model,),
        "ff_out_w": (4 * d_model, d_model), "ff_out_b": (d_model,)}
  shapes["ln_f"] = (d_model,)
  return shapes


def make_tree(shapes: dict, key) -> dict:
  """Random float32 arrays with the given nested shapes."""
  flat, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(key, len(flat))
  leaves = [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, flat)]
  return jax.tree.unflatten(treedef, leaves)


def tree_for(quick: bool):
  """~1e7 parameters (full) or ~1e6 (quick), ~40 leaves either way."""
  if quick:
    return transformer_like_shapes(d_model=128, layers=4, vocab=4096)
  return transformer_like_shapes(d_model=512, layers=3, vocab=1024 * 4)


# ----------------------------------------------------------------------------
# what is compared
# ----------------------------------------------------------------------------


def moment_pairs() -> list:
  """(label, samtx transform, optax equivalent, target or None, note)."""
  lr = optax.scale_by_learning_rate(LR)
  return [
      ("amsgrad optimizer", samtx.amsgrad(LR), optax.amsgrad(LR), 1.1,
       "optax bias-corrects and adds eps outside the sqrt"),
      ("scale_by_amsgrad", samtx.scale_by_amsgrad(),
       optax.scale_by_amsgrad(), 1.1, "as above"),
      ("scale_by_amsgrad(delayed)", samtx.scale_by_amsgrad(delayed=True),
       optax.scale_by_amsgrad(), None, "optax has no delayed form"),
      ("scale_by_adam_uncorrected", samtx.scale_by_adam_uncorrected(),
       optax.scale_by_adam(), None, "vs scale_by_adam (bias-corrected)"),
      ("scale_by_adagrad", samtx.scale_by_adagrad(),
       optax.scale_by_rss(initial_accumulator_value=0.0), None,
       "vs scale_by_rss"),
      ("scale_by_adagrad_norm", samtx.scale_by_adagrad_norm(),
       optax.contrib.normalize(), None,
       "vs contrib.normalize (also one global norm + a scale)"),
      ("lightsam_preconditioner('adam') + lr",
       optax.chain(samtx.lightsam_preconditioner("adam"), lr),
       optax.adam(LR), None, "vs optax.adam"),
  ]


def family_pairs() -> list:
  """(label, samtx optimizer, base optimizer, needs grad_fn)."""
  sgdm = optax.sgd(LR, momentum=MOMENTUM)
  pre = lambda v: optax.chain(samtx.lightsam_preconditioner(v),
                              optax.scale_by_learning_rate(LR))
  contrib = optax.contrib.sam(
      optax.sgd(LR, momentum=MOMENTUM),
      optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), opaque_mode=True)
  return [
      ("samtx.sam", samtx.sam(LR, RHO, momentum=MOMENTUM), "optax.sgd_momentum",
       sgdm),
      ("optax.contrib.sam opaque", contrib, "optax.sgd_momentum", sgdm),
      ("samtx.sam(adaptive)", samtx.sam(LR, RHO, momentum=MOMENTUM,
                                        adaptive=True),
       "optax.sgd_momentum", sgdm),
      ("samtx.msam", samtx.msam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd_momentum", sgdm),
      ("samtx.adasam", samtx.adasam(LR, RHO), "samtx.amsgrad",
       samtx.amsgrad(LR)),
      ("samtx.lightsam I", samtx.lightsam(LR, RHO, variant="adagrad_norm"),
       "preconditioner I", pre("adagrad_norm")),
      ("samtx.lightsam II", samtx.lightsam(LR, RHO, variant="adagrad"),
       "preconditioner II", pre("adagrad")),
      ("samtx.lightsam III", samtx.lightsam(LR, RHO, variant="adam"),
       "preconditioner III", pre("adam")),
      ("samtx.gsam", samtx.gsam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd_momentum", sgdm),
      ("samtx.wsam", samtx.wsam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd_momentum", sgdm),
      ("samtx.friendly_sam", samtx.friendly_sam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd_momentum", sgdm),
      # A timed block may hold a partial LookSAM cycle: see two_pass.py.
      ("samtx.looksam(k=5)", samtx.looksam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd_momentum", sgdm),
  ]


def state_pairs() -> list:
  """(samtx optimizer name, optimizer, base name, base, expectation)."""
  sgdm = optax.sgd(LR, momentum=MOMENTUM)
  pre = lambda v: optax.chain(samtx.lightsam_preconditioner(v),
                              optax.scale_by_learning_rate(LR))
  contrib = lambda opaque: optax.contrib.sam(
      optax.sgd(LR, momentum=MOMENTUM),
      optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      opaque_mode=opaque)
  scalars = "base + O(1) scalars"
  return [
      ("samtx.sam", samtx.sam(LR, RHO, momentum=MOMENTUM), "optax.sgd(momentum)",
       sgdm, scalars),
      ("samtx.sam(adaptive)", samtx.sam(LR, RHO, momentum=MOMENTUM,
                                        adaptive=True),
       "optax.sgd(momentum)", sgdm, scalars),
      ("samtx.msam", samtx.msam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd(momentum)", sgdm, scalars),
      ("samtx.adasam", samtx.adasam(LR, RHO), "samtx.amsgrad",
       samtx.amsgrad(LR), scalars),
      ("samtx.lightsam I", samtx.lightsam(LR, RHO, variant="adagrad_norm"),
       "preconditioner I", pre("adagrad_norm"), scalars),
      ("samtx.lightsam II", samtx.lightsam(LR, RHO, variant="adagrad"),
       "preconditioner II", pre("adagrad"),
       "2 x base + O(1): ascent and descent keep separate statistics"),
      ("samtx.lightsam III", samtx.lightsam(LR, RHO, variant="adam"),
       "preconditioner III", pre("adam"),
       "2 x base + O(1): ascent and descent keep separate statistics"),
      ("samtx.gsam", samtx.gsam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd(momentum)", sgdm, scalars),
      ("samtx.wsam", samtx.wsam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd(momentum)", sgdm, scalars),
      ("samtx.friendly_sam", samtx.friendly_sam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd(momentum)", sgdm,
       "base + 1 parameter-sized buffer (m) + O(1)"),
      ("samtx.looksam", samtx.looksam(LR, RHO, momentum=MOMENTUM),
       "optax.sgd(momentum)", sgdm,
       "base + 1 parameter-sized buffer (g_v) + O(1)"),
      ("samtx.amsgrad", samtx.amsgrad(LR), "optax.amsgrad", optax.amsgrad(LR),
       "equal + O(1)"),
      ("optax.contrib.sam opaque", contrib(True), "optax.sgd(momentum)", sgdm,
       "(reference)"),
      ("optax.contrib.sam transparent", contrib(False), "optax.sgd(momentum)",
       sgdm, "(reference: keeps a parameter copy)"),
  ]


# ----------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------


def synthetic_grad_fn(grads):
  """A near-free gradient that still depends on the perturbed parameters."""
  return lambda params: jax.tree.map(lambda g, p: g + 1e-3 * p, grads, params)


def update_step(opt, two_pass: bool, opaque_contrib: bool = False):
  """``step(params, state, grads) -> (params, state)`` around one update."""
  def step(params, state, grads):
    if opaque_contrib:
      gf = synthetic_grad_fn(grads)
      updates, state = opt.update(grads, state, params,
                                  grad_fn=lambda p, _: gf(p))
    elif two_pass:
      updates, state = opt.update(grads, state, params,
                                  grad_fn=synthetic_grad_fn(grads))
    else:
      updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def needs_grad_fn(opt, params, grads) -> bool:
  """Whether ``opt.update`` wants a ``grad_fn`` (tried abstractly)."""
  state = jax.eval_shape(opt.init, params)
  try:
    jax.eval_shape(lambda s: opt.update(grads, s, params), state)
    return False
  except (TypeError, ValueError):
    return True


def build(name, opt, params0, grads, contrib_opaque=False):
  """Compiles one donated update step; returns (Stepper, record)."""
  two_pass = contrib_opaque or needs_grad_fn(opt, params0, grads)
  params = _timing.unshare(params0)
  state = opt.init(params)
  shared = _timing.shared_buffers((params, state))
  state = _timing.unshare(state)
  compiled = _timing.compile_step(update_step(opt, two_pass, contrib_opaque),
                                  params, state, grads)
  record = {"lower_s": compiled.lower_s, "compile_s": compiled.compile_s,
            "state_bytes": _timing.tree_bytes(state),
            "init_shared_buffers": shared,
            "memory": compiled.memory, "cost": compiled.cost}
  return _timing.Stepper(compiled.fn, params, state, (grads,)), record


def time_group(entries: dict, params, grads, repeats, min_block_s, log,
               profile=False):
  """Builds and times ``{name: (opt, contrib_opaque)}`` side by side."""
  steppers, records = {}, {}
  for name, (opt, opaque) in entries.items():
    steppers[name], records[name] = build(name, opt, params, grads, opaque)
  if profile:
    for name, stepper in steppers.items():
      records[name]["profile_ms_per_step"] = _timing.profile_ops(stepper)
  first = next(iter(steppers.values()))
  inner = _timing.calibrate_inner(first, min_block_s)
  times = _timing.interleaved_times(steppers, repeats=repeats, inner=inner)
  for name in entries:
    records[name]["time"] = _timing.summary(times[name])
    log(f"  {name:42s} {records[name]['time']['median_ms']:8.2f} ms")
  return times, records


def state_comparison(params) -> list:
  """Bytes of each samtx optimizer's state against its base optimizer's."""
  rows = []
  for name, opt, base_name, base, expectation in state_pairs():
    state = jax.eval_shape(opt.init, params)
    base_state = jax.eval_shape(base.init, params)
    extra = _timing.tree_bytes(state) - _timing.tree_bytes(base_state)
    big = lambda t: sorted(_timing.leaf_bytes(x) for x in jax.tree.leaves(t)
                           if x.ndim > 0)
    scalars = lambda t: sum(1 for x in jax.tree.leaves(t) if x.ndim == 0)
    rows.append({
        "optimizer": name, "base": base_name, "expectation": expectation,
        "state_bytes": _timing.tree_bytes(state),
        "base_state_bytes": _timing.tree_bytes(base_state),
        "extra_bytes": extra,
        "extra_scalars": scalars(state) - scalars(base_state),
        "same_array_leaves": big(state) == big(base_state),
        "array_leaves_ratio": (sum(big(state)) / sum(big(base_state))
                               if big(base_state) else None),
    })
  return rows


# ----------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------


def markdown(payload) -> str:
  m = payload["machine"]
  out = [f"# samtx optimizer overhead ({'quick' if payload['quick'] else 'full'}"
         " run)\n\n",
         f"Machine: {m['cpu']} ({m['cpu_count']} cores, backend {m['backend']},"
         f" device {m['device']}), jax {m['jax']}, optax {m['optax']},"
         f" {m['date_utc']}; load average at start {m['load_avg_at_start']}.\n\n",
         f"Tree: {payload['n_params']:,} float32 parameters in"
         f" {payload['n_leaves']} leaves. Command: `{payload['command']}`;"
         f" wall time {payload['wall_s']:.0f} s. Each step is"
         " `update` + `apply_updates`, jitted with `donate_argnums=(0, 1)`;"
         " medians of interleaved repeats, ratios are medians of per-repeat"
         " ratios (IQR = noise); min/min is the ratio of the fastest"
         " repeats (other processes only add time).\n\n"
         "## Moment transforms vs optax\n\n"]
  rows = []
  for r in payload["moments"]:
    rows.append([r["label"], f"{r['samtx_ms']:.2f}", f"{r['optax_ms']:.2f}",
                 f"{r['ratio']:.3f}", f"{r['q25']:.3f}-{r['q75']:.3f}",
                 f"{r['min_ratio']:.3f}",
                 "-" if r["target"] is None else f"<= {r['target']}",
                 "-" if r["target"] is None else ("yes" if r["met"] else "**no**"),
                 _timing.fmt_bytes(r["samtx_state_bytes"]),
                 _timing.fmt_bytes(r["optax_state_bytes"]), r["note"]])
  out.append(_timing.md_table(
      ["transform", "samtx ms", "optax ms", "ratio", "IQR", "min/min",
       "target", "met",
       "samtx state", "optax state", "optax equivalent"], rows))
  out.append("\n## Update overhead of the SAM family (synthetic grad_fn,"
             " no model)\n\n")
  rows = []
  for r in payload["family"]:
    rows.append([r["label"], r["base"], f"{r['ms']:.2f}", f"{r['base_ms']:.2f}",
                 f"{r['extra_ms']:+.2f}", f"{r['ratio']:.3f}",
                 f"{r['q25']:.3f}-{r['q75']:.3f}", f"{r['min_ratio']:.3f}",
                 f"{r['bytes_accessed_ratio']:.2f}"
                 if r["bytes_accessed_ratio"] else "n/a",
                 _timing.fmt_bytes(r["peak_bytes"]),
                 _timing.fmt_bytes(r["base_peak_bytes"]),
                 _timing.fmt_bytes(r["temp_bytes"])])
  out.append(_timing.md_table(
      ["optimizer", "base", "update ms", "base ms", "extra ms", "ratio", "IQR",
       "min/min",
       "XLA bytes ratio", "peak", "base peak", "temp"], rows))
  profiled = [(r["label"], r["record"]["profile_ms_per_step"])
              for r in payload["family"]
              if r["record"].get("profile_ms_per_step")]
  if profiled:
    out.append("\n### Profile: device ms per step by XLA op kind"
               " (`--profile`, summed over threads)\n\n")
    rows = [[label, ", ".join(f"{k} {v:.1f}" for k, v in prof.items())]
            for label, prof in profiled]
    for name, rec in payload["family_bases"].items():
      if rec.get("profile_ms_per_step"):
        rows.append([name, ", ".join(
            f"{k} {v:.1f}" for k, v in rec["profile_ms_per_step"].items())])
    out.append(_timing.md_table(["optimizer", "op kind: ms"], rows))
  out.append("\n## Optimizer state bytes vs base\n\n")
  rows = []
  for r in payload["state"]:
    rows.append([r["optimizer"], r["base"], f"{r['state_bytes']:,}",
                 f"{r['base_state_bytes']:,}", f"{r['extra_bytes']:+,}",
                 r["extra_scalars"], "yes" if r["same_array_leaves"] else "no",
                 r["expectation"]])
  out.append(_timing.md_table(
      ["optimizer", "base", "state bytes", "base bytes", "extra bytes",
       "extra scalar leaves", "same array leaves as base", "expected"], rows))
  return "".join(out)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="a ~1e6-parameter tree, fewer repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--profile", action="store_true",
                      help="also profile every SAM-family update with"
                      " jax.profiler and record device time per op kind")
  args = parser.parse_args(argv)
  repeats = args.repeats or (9 if args.quick else 21)
  min_block_s = 0.02 if args.quick else 0.05
  log = print

  machine = _timing.machine_info()
  t0 = time.perf_counter()
  params = make_tree(tree_for(args.quick), jax.random.key(0))
  grads = make_tree(tree_for(args.quick), jax.random.key(1))
  n_params = _timing.tree_size(params)
  n_leaves = len(jax.tree.leaves(params))
  log(f"optimizer overhead: {n_params:,} parameters in {n_leaves} leaves,"
      f" {machine['cpu']} ({machine['cpu_count']} cores)")

  # 1. moment transforms vs optax, all in one interleaved group.
  log("\n== moment transforms vs optax")
  entries = {}
  for label, ours, theirs, _, _ in moment_pairs():
    entries[f"samtx {label}"] = (ours, False)
    entries[f"optax {label}"] = (theirs, False)
  times, records = time_group(entries, params, grads, repeats, min_block_s, log)
  moments_out = []
  for label, _, _, target, note in moment_pairs():
    a, b = f"samtx {label}", f"optax {label}"
    r = _timing.paired_ratio(times[a], times[b])
    moments_out.append({
        "label": label, "note": note, "target": target, **r,
        "met": None if target is None else r["ratio"] <= target,
        "samtx_ms": records[a]["time"]["median_ms"],
        "optax_ms": records[b]["time"]["median_ms"],
        "samtx_state_bytes": records[a]["state_bytes"],
        "optax_state_bytes": records[b]["state_bytes"],
        "samtx": records[a], "optax": records[b]})

  # 2. SAM family update overhead vs base, one interleaved group.
  log("\n== SAM-family update (synthetic grad_fn) vs base")
  entries = {}
  for label, opt, base_name, base in family_pairs():
    entries[label] = (opt, label.startswith("optax.contrib"))
    entries.setdefault(base_name, (base, False))
  times, records = time_group(entries, params, grads, repeats, min_block_s, log,
                              profile=args.profile)
  family_out = []
  for label, _, base_name, _ in family_pairs():
    r = _timing.paired_ratio(times[label], times[base_name])
    ca, cb = records[label]["cost"], records[base_name]["cost"]
    family_out.append({
        "label": label, "base": base_name, **r,
        "ms": records[label]["time"]["median_ms"],
        "base_ms": records[base_name]["time"]["median_ms"],
        "extra_ms": (records[label]["time"]["median_ms"]
                     - records[base_name]["time"]["median_ms"]),
        "bytes_accessed_ratio": (ca["bytes_accessed"] / cb["bytes_accessed"]
                                 if ca["bytes_accessed"] and cb["bytes_accessed"]
                                 else None),
        "peak_bytes": records[label]["memory"]["live_bytes_bound"],
        "base_peak_bytes": records[base_name]["memory"]["live_bytes_bound"],
        "temp_bytes": records[label]["memory"]["temp_size_in_bytes"],
        "record": records[label]})
  family_records = records

  # 3. state bytes.
  state_out = state_comparison(params)
  log("\n== state bytes vs base")
  for r in state_out:
    log(f"  {r['optimizer']:32s} {r['extra_bytes']:+14,d} B vs {r['base']}"
        f" ({r['extra_scalars']} extra scalars)")

  payload = {
      "machine": machine, "quick": args.quick,
      "command": "python benchmarks/optimizer_overhead.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "n_params": n_params, "n_leaves": n_leaves,
      "settings": {"lr": LR, "rho": RHO, "momentum": MOMENTUM,
                   "repeats": repeats, "min_block_s": min_block_s},
      "wall_s": time.perf_counter() - t0,
      "moments": moments_out, "family": family_out,
      "family_bases": {k: v for k, v in family_records.items()
                       if k not in {f[0] for f in family_pairs()}},
      "state": state_out,
  }
  log("\n== ratios")
  for r in moments_out:
    tgt = "" if r["target"] is None else f"  target <= {r['target']}"
    log(f"  samtx/optax {r['label']:40s} {r['ratio']:.3f}"
        f" ({r['q25']:.3f}-{r['q75']:.3f}){tgt}")
  for r in family_out:
    log(f"  {r['label']:26s} / {r['base']:20s} {r['ratio']:.3f}"
        f" ({r['extra_ms']:+.2f} ms)")
  prefix = _timing.write_results(
      "optimizer_overhead", payload, markdown(payload), backend=machine["backend"],
      quick=args.quick, out=args.out)
  log(f"\nwrote {prefix}.json and {prefix}.md in {payload['wall_s']:.0f}s")
  return payload


if __name__ == "__main__":
  main()
