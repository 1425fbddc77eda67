"""Step time of the related-work systems against their base optimizers.

On small MLP classifiers this script compiles one jitted training step per
configuration -- with ``donate_argnums=(0, 1)`` so parameters, optimizer state
and SAF's logits memory update in place -- and times them *side by side in
one process* (every repeat runs each step once, in rotated order; medians of
per-repeat ratios), with ``benchmarks/_timing.py`` like the other benchmarks:

- ``samtx.gpa(optax.adamw)`` against ``optax.adamw``: the wrapper's own cost
  (one extra parameter-sized buffer read and written per step);
- ``samtx.mesa(sgd)`` against SGD-momentum: the EMA alone, then the whole
  MESA step (teacher forward with the EMA weights + trajectory loss);
- the whole SAF step (read the targets recorded ``lag`` epochs ago, record
  this step's logits, trajectory loss) against SGD-momentum.

The paper reports SAF at 99% and MESA at 85% of SGD's throughput on
ImageNet (ratios ~1.01 and ~1.17); on a small MLP the teacher forward is a
larger share of the step.

Run::

  .venv/bin/python benchmarks/related_step_time.py           # two MLPs
  .venv/bin/python benchmarks/related_step_time.py --quick   # one MLP

Results go to ``benchmarks/results/related_step_time_<backend>[_quick].*``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/ is not a package)

import samtx  # noqa: E402

LR, MOMENTUM = 1e-3, 0.9
TAU, LAM, LAG, DECAY = 5.0, 0.3, 3, 0.9998
NUM_EXAMPLES = 50_000


def mlp(widths):
  """``init(key) -> params`` and ``logits(params, x)`` of a ReLU MLP."""
  def init(key):
    keys = jax.random.split(key, len(widths) - 1)
    return {f"dense{i}": {
        "w": jax.random.normal(k, (a, b)) / math.sqrt(a),
        "b": jnp.zeros((b,))}
            for i, (k, a, b) in enumerate(zip(keys, widths[:-1], widths[1:]))}

  def logits(params, x):
    n = len(widths) - 1
    for i in range(n):
      x = x @ params[f"dense{i}"]["w"] + params[f"dense{i}"]["b"]
      if i < n - 1:
        x = jax.nn.relu(x)
    return x
  return init, logits


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def steps(logits_fn):
  """``name -> (optimizer, step(params, state, batch), extra state)``."""
  def plain(opt):
    def step(params, state, batch):
      x, y, _ = batch
      grads = jax.grad(lambda p: cross_entropy(logits_fn(p, x), y))(params)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return step

  def mesa_full(opt):
    def step(params, state, batch):
      x, y, _ = batch
      teacher = logits_fn(samtx.ema_params(state), x)

      def loss(p):
        out = logits_fn(p, x)
        return cross_entropy(out, y) + LAM * samtx.trajectory_loss(
            out, teacher, temperature=TAU)
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state
    return step

  def saf_full(opt):
    def step(params, state, batch):
      x, y, idx = batch
      opt_state, memory = state
      target = samtx.saf_targets(memory, idx, LAG + 2)

      def loss(p):
        out = logits_fn(p, x)
        return cross_entropy(out, y) + LAM * samtx.trajectory_loss(
            out, target, temperature=TAU), out
      grads, out = jax.grad(loss, has_aux=True)(params)
      memory = samtx.saf_record(memory, idx, out, LAG + 2, targets=target)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), (opt_state, memory)
    return step

  sgd = optax.sgd(LR, momentum=MOMENTUM)
  adamw = optax.adamw(LR, weight_decay=1e-2)
  mesa = samtx.mesa(optax.sgd(LR, momentum=MOMENTUM), decay=DECAY)
  gpa = samtx.gpa(optax.adamw(LR, weight_decay=1e-2))
  return {
      "optax.sgd_momentum": (sgd, plain(sgd), False),
      "mesa(sgd) EMA only": (mesa, plain(mesa), False),
      "MESA step (teacher + loss)": (mesa, mesa_full(mesa), False),
      "SAF step (memory + loss)": (sgd, saf_full(sgd), True),
      "optax.adamw": (adamw, plain(adamw), False),
      "gpa(adamw)": (gpa, plain(gpa), False),
  }


RATIOS = (
    ("GPA(AdamW) / AdamW", "gpa(adamw)", "optax.adamw"),
    ("mesa(SGD-m), EMA only / SGD-m", "mesa(sgd) EMA only",
     "optax.sgd_momentum"),
    ("MESA step / SGD-m", "MESA step (teacher + loss)", "optax.sgd_momentum"),
    ("SAF step / SGD-m", "SAF step (memory + loss)", "optax.sgd_momentum"),
)


def bench_model(name, widths, batch_size, repeats, min_block_s, log=print):
  init, logits_fn = mlp(widths)
  params0 = init(jax.random.key(0))
  kx, ky, ki = jax.random.split(jax.random.key(1), 3)
  batch = (jax.random.normal(kx, (batch_size, widths[0])),
           jax.random.randint(ky, (batch_size,), 0, widths[-1]),
           jax.random.permutation(ki, NUM_EXAMPLES)[:batch_size])
  n_params = _timing.tree_size(params0)
  log(f"\n== {name}: MLP {'-'.join(map(str, widths))}, batch {batch_size},"
      f" {n_params:,} parameters")
  steppers, rows = {}, {}
  for label, (opt, step, has_memory) in steps(logits_fn).items():
    params = _timing.unshare(params0)
    state = _timing.unshare(opt.init(params))
    if has_memory:
      state = (state, samtx.saf_memory(NUM_EXAMPLES, widths[-1], lag=LAG))
    compiled = _timing.compile_step(step, params, state, batch)
    steppers[label] = _timing.Stepper(compiled.fn, params, state, (batch,))
    rows[label] = {"lower_s": compiled.lower_s,
                   "compile_s": compiled.compile_s,
                   "state_bytes": _timing.tree_bytes(state),
                   "memory": compiled.memory, "cost": compiled.cost}
    log(f"  compiled {label:28s} compile {compiled.compile_s:5.2f}s")
  inner = _timing.calibrate_inner(steppers["optax.sgd_momentum"], min_block_s)
  times = _timing.interleaved_times(steppers, repeats=repeats, inner=inner)
  for label in rows:
    rows[label]["time"] = _timing.summary(times[label])
    rows[label]["times_s"] = [float(t) for t in times[label]]
  ratios = []
  for label, num, den in RATIOS:
    r = _timing.paired_ratio(times[num], times[den])
    # XLA's cost model: deterministic, unlike the times on a shared machine.
    cost = {f"{key}_ratio": (None if rows[den]["cost"][key] in (None, 0)
                             else rows[num]["cost"][key] / rows[den]["cost"][key])
            for key in ("flops", "bytes_accessed")}
    ratios.append({"label": label, "numerator": num, "denominator": den, **r,
                   **cost})
    log(f"  {label:34s} {r['ratio']:6.3f}  IQR {r['q25']:.3f}-{r['q75']:.3f}"
        f"  min/min {r['min_ratio']:.3f}  XLA bytes {_fmt(cost['bytes_accessed_ratio'])}")
  return {"model": name, "widths": list(widths), "batch_size": batch_size,
          "n_params": n_params, "inner_steps": inner, "repeats": repeats,
          "steps": rows, "ratios": ratios}


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def markdown(payload) -> str:
  m = payload["machine"]
  out = [f"# Related work: step time ({'quick' if payload['quick'] else 'full'}"
         " run)\n\n",
         f"Machine: {m['cpu']} ({m['cpu_count']} cores, backend {m['backend']}),"
         f" jax {m['jax']}, optax {m['optax']}, {m['date_utc']}; load average"
         f" at start {m['load_avg_at_start']}.\n\n",
         f"Command: `{payload['command']}`; {payload['wall_s']:.0f} s.\n\n",
         "Medians of per-repeat ratios over interleaved repeats (each repeat"
         " times every step once, rotated order); IQR gives the noise, min/min"
         " the ratio of the fastest repeats. Steps donate params and state"
         " (SAF: and its logits memory). XLA bytes and flops are the ratios"
         " of `compiled.cost_analysis()` figures (deterministic; the times"
         " of a shared machine are not). SAF and MESA settings: tau"
         f" {TAU}, lambda {LAM}, lag {LAG}, EMA decay {DECAY},"
         f" {NUM_EXAMPLES:,} examples in SAF's memory.\n\n"]
  header = ["ratio"] + [f"{r['model']} ({r['n_params']:.1e} params)"
                        for r in payload["results"]]
  rows = []
  for label, _, _ in RATIOS:
    row = [label]
    for result in payload["results"]:
      r = next(x for x in result["ratios"] if x["label"] == label)
      row.append(f"{r['ratio']:.3f} (IQR {r['q25']:.3f}-{r['q75']:.3f},"
                 f" min/min {r['min_ratio']:.3f}; XLA bytes"
                 f" {_fmt(r['bytes_accessed_ratio'])}, flops"
                 f" {_fmt(r['flops_ratio'])})")
    rows.append(row)
  out.append(_timing.md_table(header, rows))
  for result in payload["results"]:
    out.append(f"\n## {result['model']}\n\n{result['repeats']} repeats x"
               f" {result['inner_steps']} steps.\n\n")
    out.append(_timing.md_table(
        ["step", "median ms", "IQR ms", "state", "XLA temp"],
        [[label, f"{row['time']['median_ms']:.3f}",
          f"{row['time']['q25_ms']:.3f}-{row['time']['q75_ms']:.3f}",
          _timing.fmt_bytes(row["state_bytes"]),
          _timing.fmt_bytes(row["memory"]["temp_size_in_bytes"])]
         for label, row in result["steps"].items()]))
  return "".join(out)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="one small MLP, fewer repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default=None,
                      help="output path prefix (default benchmarks/results/"
                      "related_step_time_<backend>[_quick])")
  args = parser.parse_args(argv)
  repeats = args.repeats or (11 if args.quick else 21)
  min_block_s = (20.0 if args.quick else 40.0) / 1e3
  models = [("mlp_2e5", (784, 256, 10), 128)]
  if not args.quick:
    models.append(("mlp_2e6", (784, 1024, 1024, 10), 128))
  machine = _timing.machine_info()
  t0 = time.perf_counter()
  results = [bench_model(name, widths, batch, repeats, min_block_s)
             for name, widths, batch in models]
  payload = {
      "machine": machine, "quick": args.quick,
      "command": "python benchmarks/related_step_time.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "settings": {"lr": LR, "momentum": MOMENTUM, "tau": TAU, "lam": LAM,
                   "lag": LAG, "decay": DECAY, "num_examples": NUM_EXAMPLES,
                   "repeats": repeats, "min_block_s": min_block_s},
      "wall_s": time.perf_counter() - t0,
      "results": results,
  }
  prefix = _timing.write_results(
      "related_step_time", payload, markdown(payload),
      backend=machine["backend"], quick=args.quick, out=args.out)
  print(f"\nwrote {prefix}.json and {prefix}.md in {payload['wall_s']:.0f}s")
  return payload


if __name__ == "__main__":
  main()
