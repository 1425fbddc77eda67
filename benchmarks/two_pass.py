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
number of LookSAM cycles. ``looksam(reuse steps)`` times its steps without
a second pass alone (``k = 2**30``; the one second pass is a warm-up step).

``samtx.sam [rho schedule at 0]`` is SAM with a rho schedule that is
still 0 on every timed step (SAM late in training): its steps skip the
second pass, and its ratio to the base SGD step is what such a step costs
(target 1.05). ``samtx.sam [rho schedule past 0]`` is the same schedule
past its switch: the second pass inside the once-or-never loop, against the
plain ``samtx.sam`` step (target 1.0).

Rows named ``floor: ...`` are hand-fused steps of the same maths in plain
``jax.numpy`` (one function, no optax chain, no tree bookkeeping): what the
fewest passes over memory XLA can fuse the rule into cost. Each floor is
checked against its samtx optimizer before it is timed: from samtx's state
after three steps, one step of each gives the same parameters, the same
state and (except the ``no norm`` floors) the same reported perturbation
norm. ``floor: lightsam_II`` computes everything samtx's LightSAM-II
returns; the ``no norm`` floor drops the norm's reduction, so it bounds what
any implementation of the rule could cost.

Run::

  .venv/bin/python benchmarks/two_pass.py            # ~3 min on 2 CPU cores
  .venv/bin/python benchmarks/two_pass.py --quick    # ~1 min
  .venv/bin/python benchmarks/two_pass.py --profile  # + device ms per op kind
  .venv/bin/python benchmarks/two_pass.py --only \
      "samtx.sam [rho schedule at 0],samtx.sam [rho schedule past 0]" \
      --out benchmarks/results/two_pass_rho_zero_cpu

Results go to ``benchmarks/results/two_pass_<backend>[_quick].{json,md}``.
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
      # Only the first (warm-up) step takes the second pass: the cost of a
      # reusing step alone, against the base step.
      "samtx.looksam(reuse steps)": (
          samtx.looksam(LR, RHO, k=2**30, **sgd_m), two),
      # A scheduled rho (SAM late in training): steps before the switch
      # skip the second pass (against the base step), steps after it take
      # it inside the once-or-never loop (against samtx.sam).
      SCHEDULED_ZERO: (samtx.sam(LR, zero_then_rho(2**30), **sgd_m), two),
      SCHEDULED_RHO: (samtx.sam(LR, zero_then_rho(0), **sgd_m), two),
  }


SCHEDULED_ZERO = "samtx.sam [rho schedule at 0]"
SCHEDULED_RHO = "samtx.sam [rho schedule past 0]"


def zero_then_rho(switch: int):
  """rho = 0 before step ``switch``, then RHO (SAM late in training).

  The radius depends on the step count at run time, so the compiled step
  keeps both branches whichever side of the switch it is timed on.
  """
  return optax.join_schedules(
      [optax.constant_schedule(0.0), optax.constant_schedule(RHO)], [switch])


# ----------------------------------------------------------------------------
# hand-fused floors: the same maths as one plain jax.numpy function
# ----------------------------------------------------------------------------

B1, B2, EPS = 0.9, 0.999, 1e-8  # samtx.lightsam's defaults


def _tree_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def _scaled(n, v):
  """``n / sqrt(v)`` the way samtx writes it (``rsqrt`` of ``v + tiny``)."""
  return n * jax.lax.rsqrt(v + jnp.finfo(v.dtype).tiny)


def _floor_sam(loss):
  """SAM on SGD with momentum: ``x += rho g/(|g|+eps)``, ``m = h + mu m``."""
  grad = jax.grad(loss)

  def step(params, state, batch):
    m, _ = state
    g = grad(params, batch)
    g_norm = _tree_norm(g)
    scale = RHO / (g_norm + 1e-12)
    h = grad(jax.tree.map(lambda x, d: x + scale * d, params, g), batch)
    m = jax.tree.map(lambda m, h: h + MOMENTUM * m, m, h)
    return (jax.tree.map(lambda x, m: x - LR * m, params, m),
            (m, scale * g_norm))

  def from_samtx(state):  # (PerturbationState, TraceState, EmptyState)
    return state[1].trace, state[0].perturbation_norm

  return step, lambda p: (jax.tree.map(jnp.zeros_like, p),
                          jnp.zeros([])), from_samtx


def _floor_lightsam(loss, variant: str, report_norm: bool):
  """LightSAM-II (``"adagrad"``) or -III (``"adam"``), DESIGN.md's rule.

  State: ``(u, v, norm)`` for II, ``(r, u, m, v, norm)`` for III.
  """
  grad = jax.grad(loss)
  adam = variant == "adam"
  if adam:
    mean = lambda r, s: B1 * r + (1 - B1) * s
    square = lambda u, s: B2 * u + (1 - B2) * s * s
  else:
    square = lambda u, s: u + s * s

  def step(params, state, batch):
    s = grad(params, batch)
    if adam:
      r, u, m, v, _ = state
      r = jax.tree.map(mean, r, s)
    else:
      u, v, _ = state
      r = s
    u = jax.tree.map(square, u, s)
    d = jax.tree.map(_scaled, r, u)
    norm = RHO * _tree_norm(d) if report_norm else jnp.zeros([])
    h = grad(jax.tree.map(lambda x, d: x + RHO * d, params, d), batch)
    m = jax.tree.map(mean, m, h) if adam else h
    v = jax.tree.map(square, v, h)
    params = jax.tree.map(lambda x, m, v: x - LR * _scaled(m, v), params, m,
                          v)
    return params, ((r, u, m, v, norm) if adam else (u, v, norm))

  def init(p):
    zeros = lambda: jax.tree.map(jnp.zeros_like, p)
    floor = lambda: jax.tree.map(lambda x: jnp.full_like(x, EPS**2), p)
    if adam:
      return zeros(), floor(), zeros(), floor(), jnp.zeros([])
    return floor(), floor(), jnp.zeros([])

  def from_samtx(state):  # (PerturbationState, descent state, EmptyState)
    ascent, descent, norm = state[0].inner, state[1], state[0].perturbation_norm
    if adam:
      return ascent.mu, ascent.nu, descent.mu, descent.nu, norm
    return ascent.sum_of_squares, descent.sum_of_squares, norm

  return step, init, from_samtx


def floors(loss) -> dict:
  """``name -> (step, init, from_samtx, the samtx optimizer it matches)``.

  ``from_samtx`` maps that optimizer's state to the floor's (the reported
  perturbation norm last).
  """
  return {
      "floor: sam": (*_floor_sam(loss), SAM),
      "floor: lightsam_II": (*_floor_lightsam(loss, "adagrad", True),
                             "samtx.lightsam_II"),
      "floor: lightsam_II, no norm": (
          *_floor_lightsam(loss, "adagrad", False), "samtx.lightsam_II"),
      "floor: lightsam_III": (*_floor_lightsam(loss, "adam", True),
                              "samtx.lightsam_III"),
      "floor: lightsam_III, no norm": (
          *_floor_lightsam(loss, "adam", False), "samtx.lightsam_III"),
  }


def check_floor(model, floor_step, from_samtx, opt, key, warmup=3) -> float:
  """Largest difference of floor and samtx after one step from one state.

  samtx takes ``warmup`` steps first, so the step compared starts from
  non-trivial moments, which are mapped into the floor's state; then each
  takes one step from the same parameters and state, and the parameters and
  every state leaf (the reported norm too, unless the floor reports none)
  are compared, each relative to its largest magnitude. Comparing single
  steps keeps the check tight: over many steps LightSAM-III's ``eps**2 =
  1e-16`` second moment amplifies last-bit differences of gradient entries
  near ``eps`` (the floor and samtx fuse ``x + e`` differently). Raises
  unless the two agree to float32 rounding, i.e. if the floor computes
  other maths.
  """
  params = model.init(key)
  batch = model.make_batch(jax.random.key(1))
  samtx_step = jax.jit(step_time.make_step(opt, model.loss,
                                           step_time.TWO_PASS))
  state = opt.init(params)
  for _ in range(warmup):
    params, state = samtx_step(params, state, batch)
  a, samtx_state = samtx_step(params, state, batch)
  b, floor_state = jax.jit(floor_step)(params, from_samtx(state), batch)
  want, got = list(from_samtx(samtx_state)), list(floor_state)
  if not float(got[-1]):  # a floor that does not report the norm
    want, got = want[:-1], got[:-1]
  diff = 0.0
  for x, y in [(a, b), (want, got)]:
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      scale = max(float(jnp.max(jnp.abs(u))), 1e-30)
      diff = max(diff, float(jnp.max(jnp.abs(u - v))) / scale)
  if not diff <= 1e-5:
    raise AssertionError(
        f"hand-fused floor differs from samtx: {diff:.2g} (relative)")
  return diff


def build(model, step, init, key):
  """A compiled, donated ``step`` on ``model``; (Stepper, record)."""
  params = _timing.unshare(model.init(key))
  state = _timing.unshare(init(params))
  batch = model.make_batch(jax.random.key(1))
  compiled = _timing.compile_step(step, params, state, batch)
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
  steps = {name: (step_time.make_step(opt, model.loss, kind), opt.init)
           for name, (opt, kind) in entries.items()}
  floor_diffs = {}
  for name, (step, init, from_samtx, of) in floors(model.loss).items():
    if of in entries:
      floor_diffs[name] = check_floor(model, step, from_samtx,
                                      entries[of][0], jax.random.key(0))
      steps[name] = (step, init)
      log(f"  {name} matches {of} (one step: largest relative"
          f" difference {floor_diffs[name]:.1e})")
  steppers, records = {}, {}
  for name, (step, init) in steps.items():
    steppers[name], records[name] = build(model, step, init,
                                          jax.random.key(0))
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
  for name in steps:
    flops = records[name]["cost"]["flops"]
    rows.append({
        "name": name, **_timing.summary(times[name]),
        "vs_sam": _timing.paired_ratio(times[name], times[SAM]),
        "vs_base": _timing.paired_ratio(times[name], times[BASE]),
        "flops_vs_sam": flops / sam_flops if flops and sam_flops else None,
        "step_diff_vs_samtx": floor_diffs.get(name),
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
  log(f"\n{'optimizer':30s} {'ms':>8s} {'/sam':>7s} {'IQR':>13s}"
      f" {'min/min':>7s} {'/base':>7s}")
  for r in rows:
    s, b = r["vs_sam"], r["vs_base"]
    log(f"{r['name']:30s} {r['median_ms']:8.2f} {s['ratio']:7.3f}"
        f" {s['q25']:6.3f}-{s['q75']:6.3f} {s['min_ratio']:7.3f}"
        f" {b['ratio']:7.3f}")
  prefix = _timing.write_results(
      "two_pass", payload, markdown(payload), backend=machine["backend"],
      quick=args.quick, out=args.out)
  log(f"\nwrote {prefix}.json and {prefix}.md in {payload['wall_s']:.0f}s")
  return payload


if __name__ == "__main__":
  main()
