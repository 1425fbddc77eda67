"""AdaSAM's delayed (analysis) form on optax's Rosenbrock check.

optax's ``alias_test.test_optimization`` runs every optimizer for 10000
steps from ``(0, 0)`` on ``|a - x|^2 + 100 |y - x^2|^2`` (``a = 1`` in
float32, ``a = 1 + i`` in complex64) and asks for ``(a, a^2)`` within
``rtol = atol = 3e-2``. This script runs that check for AdaSAM's Algorithm 1
(``samtx.adasam``), the delayed form as it is now (``delayed=True``) and the
delayed form's previous rule (the same code with the relative floor off:
divide by the previous running maximum wherever it exceeds ``eps**2``), over
a grid of learning rates and radii, and prints for each run whether the
check passes, the final distance to ``(a, a^2)`` and the largest ``|p|``
seen.

Run::

  python benchmarks/adasam_delayed.py           # ~2 min on 2 CPU cores
  python benchmarks/adasam_delayed.py --quick   # ~30 s

Results go to ``benchmarks/results/adasam_delayed_rosenbrock[_quick].{json,md}``.
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
from samtx import moments

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = ("algorithm 1", "delayed, previous rule", "delayed")


def rosenbrock(dtype):
  a = 1.0 + 1.0j if jnp.iscomplexobj(jnp.zeros((), dtype)) else 1.0
  abs_sq = lambda x: jnp.real(x * jnp.conj(x))
  loss = lambda p: abs_sq(a - p[0]) + 100.0 * abs_sq(p[1] - p[0] ** 2)
  grad = lambda p: jnp.conj(jax.grad(loss)(p))  # optax's complex convention
  return jnp.zeros(2, dtype), np.array([a, a ** 2]), grad


def run(rule, lr, rho, dtype, steps):
  """Final params and the largest |p| over the run."""
  # The previous rule is this code with the relative floor at 0; the floor is
  # read when the step is traced, so it is set for this build only.
  floor = moments.DELAYED_FLOOR
  moments.DELAYED_FLOOR = 0.0 if rule == "delayed, previous rule" else floor
  try:
    opt = samtx.adasam(lr, rho, delayed=rule != "algorithm 1")
    params, final, grad = rosenbrock(dtype)

    @jax.jit
    def go(params, state):
      def step(carry, _):
        p, s = carry
        u, s = opt.update(grad(p), s, p, grad_fn=grad)
        p = optax.apply_updates(p, u)
        return (p, s), jnp.max(jnp.abs(p))
      (p, _), sizes = jax.lax.scan(step, (params, state), length=steps)
      return p, jnp.max(sizes)

    p, largest = go(params, opt.init(params))
    p = np.asarray(p)
  finally:
    moments.DELAYED_FLOOR = floor
  finite = bool(np.all(np.isfinite(p)))
  passed = finite and bool(np.allclose(p, final, rtol=3e-2, atol=3e-2))
  return {"passed": passed,
          "distance": float(np.max(np.abs(p - final))) if finite else None,
          "largest": float(largest), "final": [str(x) for x in p]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="two learning rates, three radii, float32")
  parser.add_argument("--out", type=pathlib.Path,
                      default=ROOT / "benchmarks" / "results")
  args = parser.parse_args(argv)
  if args.quick:
    lrs, rhos, dtypes = (0.1, 0.01), (0.0, 1e-3, 0.05), (jnp.float32,)
  else:
    lrs, rhos = (0.1, 0.01, 0.001), (0.0, 1e-4, 1e-3, 0.01, 0.05)
    dtypes = (jnp.float32, jnp.complex64)
  steps = 10000
  start = time.time()
  lines = ["# AdaSAM's delayed form on optax's Rosenbrock check",
           "",
           f"`python benchmarks/adasam_delayed.py{' --quick' if args.quick else ''}`"
           f" (jax {jax.__version__}, {jax.devices()[0].platform}); {steps}"
           " steps from (0, 0); pass = within rtol = atol = 3e-2 of"
           " (a, a^2). Each cell: pass/FAIL, final max |p - (a, a^2)|,"
           " largest |p| seen.",
           "",
           "| dtype | lr | rho | " + " | ".join(RULES) + " |",
           "|---|---|---|" + "---|" * len(RULES)]
  rows = []
  for dtype in dtypes:
    for lr in lrs:
      for rho in rhos:
        cells = {rule: run(rule, lr, rho, dtype, steps) for rule in RULES}
        rows.append({"dtype": jnp.dtype(dtype).name, "lr": lr, "rho": rho,
                     **cells})

        def fmt(r):
          dist = "nan" if r["distance"] is None else f"{r['distance']:.2g}"
          return (f"{'pass' if r['passed'] else 'FAIL'}, {dist},"
                  f" {r['largest']:.2g}")
        line = (f"| {jnp.dtype(dtype).name} | {lr:g} | {rho:g} | "
                + " | ".join(fmt(cells[rule]) for rule in RULES) + " |")
        print(line, flush=True)
        lines.append(line)
  lines += ["", f"Wall time {time.time() - start:.0f} s."]
  stem = "adasam_delayed_rosenbrock" + ("_quick" if args.quick else "")
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  (args.out / f"{stem}.json").write_text(json.dumps(
      {"steps": steps, "rules": RULES, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
  main()
