"""LookSAM before/after in one process: two samtx trees, timed side by side.

Usage (from the repository root)::

  git archive <old commit> samtx | tar -x -C /tmp/old
  .venv/bin/python benchmarks/results/two_pass_before_after/ab_looksam.py \
      /tmp/old [--repeats 21]

The old tree is imported as ``samtx_before`` (its package is copied and its
``samtx`` imports renamed), the working tree's ``samtx`` as the after. Both
LookSAM(k=5) steps, both reuse-only steps (``k=2**30``) and the base SGD
step run interleaved on the benchmark MLP; the script prints ratios to the
base step and checks that the two versions give the same parameters after
12 steps.
"""

import argparse
import os
import pathlib
import re
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2]))  # benchmarks/

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _timing  # noqa: E402
import step_time  # noqa: E402
import samtx  # noqa: E402

LR, RHO, MU, K = 1e-3, 0.05, 0.9, 5


def import_renamed(root: str, name: str):
  """``root/samtx`` imported as package ``name``."""
  tmp = pathlib.Path(tempfile.mkdtemp())
  shutil.copytree(pathlib.Path(root) / "samtx", tmp / name)
  for path in (tmp / name).rglob("*.py"):
    path.write_text(re.sub(r"\bsamtx\b", name, path.read_text()))
  sys.path.insert(0, str(tmp))
  return __import__(name)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("before", help="a directory holding the old samtx/")
  parser.add_argument("--repeats", type=int, default=21)
  args = parser.parse_args()
  before = import_renamed(args.before, "samtx_before")
  model = step_time.mlp((784, 1024, 256, 10), batch_size=256)
  params0 = model.init(jax.random.key(0))
  batch = model.make_batch(jax.random.key(1))
  two = step_time.TWO_PASS
  entries = {
      "sgd (base)": (optax.sgd(LR, momentum=MU), step_time.ONE_PASS),
      "looksam(k=5) before": (before.looksam(LR, RHO, k=K, momentum=MU), two),
      "looksam(k=5) after": (samtx.looksam(LR, RHO, k=K, momentum=MU), two),
      "reuse steps before": (before.looksam(LR, RHO, k=2**30, momentum=MU),
                             two),
      "reuse steps after": (samtx.looksam(LR, RHO, k=2**30, momentum=MU),
                            two),
  }
  steppers = {}
  for name, (opt, kind) in entries.items():
    params = _timing.unshare(params0)
    state = _timing.unshare(opt.init(params))
    compiled = _timing.compile_step(
        step_time.make_step(opt, model.loss, kind), params, state, batch)
    steppers[name] = _timing.Stepper(compiled.fn, params, state, (batch,))
  inner = _timing.calibrate_inner(steppers["looksam(k=5) after"], 0.25)
  inner = int(np.ceil(inner / K) * K)
  times = _timing.interleaved_times(steppers, repeats=args.repeats,
                                    inner=inner)
  print(f"load {os.getloadavg()}, {args.repeats} repeats of {inner} steps")
  for name in steppers:
    r = _timing.paired_ratio(times[name], times["sgd (base)"])
    print(f"{name:22s} {np.median(times[name]) * 1e3:7.2f} ms  / base"
          f" {r['ratio']:.3f} ({r['q25']:.3f}-{r['q75']:.3f})"
          f"  min/min {r['min_ratio']:.3f}")
  old, new = (entries[f"looksam(k=5) {w}"][0] for w in ("before", "after"))
  steps = [jax.jit(step_time.make_step(o, model.loss, two)) for o in (old, new)]
  carries = [(params0, o.init(params0)) for o in (old, new)]
  for _ in range(12):
    carries = [f(p, s, batch) for f, (p, s) in zip(steps, carries)]
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(carries[0][0]), jax.tree.leaves(carries[1][0])))
  print(f"max |before - after| of the parameters after 12 steps: {diff:.1e}")


if __name__ == "__main__":
  main()
