"""Timing, memory and reporting helpers shared by the samtx benchmarks.

Everything here is deliberately small and free of samtx specifics:

* :func:`compile_step` lowers and compiles a step once (with buffer donation)
  and reports lowering / compile time, ``memory_analysis()`` and
  ``cost_analysis()`` of the compiled program;
* :class:`Stepper` carries donated ``(params, state)`` from call to call;
* :func:`interleaved_times` times several steppers *side by side*: every repeat
  runs each stepper once, in a rotated order, so slow drifts of a shared
  machine hit all of them alike;
* :func:`paired_ratio` turns two such series into a median ratio with an
  inter-quartile noise band (ratios are taken per repeat, then summarised);
* :func:`tree_bytes` counts the bytes of a pytree (arrays or shape structs).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "peak_memory_in_bytes",
    "live_bytes_bound",
)


# ----------------------------------------------------------------------------
# bytes
# ----------------------------------------------------------------------------


def leaf_bytes(leaf) -> int:
  """Bytes of one array or ``ShapeDtypeStruct``."""
  return int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def tree_bytes(tree) -> int:
  """Total bytes of every array leaf of ``tree`` (works on ``eval_shape``)."""
  return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


def tree_size(tree) -> int:
  """Number of scalars in ``tree``."""
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


def shared_buffers(tree) -> int:
  """How many array leaves of ``tree`` reuse a buffer another leaf holds.

  A tree with shared buffers cannot be passed to a step that donates it:
  XLA refuses to donate the same buffer twice.
  """
  ptrs = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)
          if hasattr(x, "unsafe_buffer_pointer")]
  return len(ptrs) - len(set(ptrs))


def unshare(tree):
  """A copy of ``tree`` in which every leaf owns its own buffer."""
  return jax.tree.map(lambda x: x.copy(), tree)


def state_bytes(opt, params) -> int:
  """Bytes of ``opt.init(params)``, computed abstractly (nothing allocated)."""
  return tree_bytes(jax.eval_shape(opt.init, params))


# ----------------------------------------------------------------------------
# compilation
# ----------------------------------------------------------------------------


def memory_stats(compiled) -> dict:
  """The byte fields of ``compiled.memory_analysis()`` (None if unsupported)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pragma: no cover - backend without memory analysis
    stats = None
  if stats is None:
    return {k: None for k in MEMORY_FIELDS}
  out = {k: getattr(stats, k, None) for k in MEMORY_FIELDS}
  # Every byte the program can hold at once: inputs, outputs that do not
  # reuse a donated input, and XLA's temporaries. (XLA's own
  # peak_memory_in_bytes leaves temporaries out on some backends.)
  out["live_bytes_bound"] = (
      stats.argument_size_in_bytes + stats.output_size_in_bytes
      - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  if out["peak_memory_in_bytes"] is None:
    out["peak_memory_in_bytes"] = out["live_bytes_bound"]
  return {k: (int(v) if v is not None else None) for k, v in out.items()}


def cost_stats(compiled) -> dict:
  """FLOPs and bytes accessed that XLA's cost model assigns to the program."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend without cost analysis
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return {"flops": None, "bytes_accessed": None}
  return {"flops": float(cost.get("flops", float("nan"))),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}


@dataclasses.dataclass
class CompiledStep:
  """A compiled step with what its compilation cost and what it needs."""
  fn: Callable
  lower_s: float
  compile_s: float
  memory: dict
  cost: dict


def compile_step(step: Callable, *args, donate_argnums=(0, 1)) -> CompiledStep:
  """Lowers and compiles ``step(*args)`` once, with ``donate_argnums``.

  Lowering (tracing included) and XLA compilation are timed separately, so
  the step-time measurements that follow contain neither.
  """
  jitted = jax.jit(step, donate_argnums=donate_argnums)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return CompiledStep(fn=compiled, lower_s=t1 - t0, compile_s=t2 - t1,
                      memory=memory_stats(compiled), cost=cost_stats(compiled))


# ----------------------------------------------------------------------------
# running and timing
# ----------------------------------------------------------------------------


class Stepper:
  """Calls ``fn(params, state, *consts)`` and keeps the donated outputs.

  ``calls_per_step`` > 1 models optimizers that need several ``update`` calls
  per real step (``optax.contrib.sam`` in transparent mode needs two).
  """

  def __init__(self, fn: Callable, params, state, consts: Sequence = (),
               calls_per_step: int = 1):
    self.fn = fn
    self.carry = (params, state)
    self.consts = tuple(consts)
    self.calls_per_step = calls_per_step

  def step(self) -> None:
    for _ in range(self.calls_per_step):
      self.carry = self.fn(*self.carry, *self.consts)

  def block(self) -> None:
    jax.block_until_ready(self.carry)

  def run(self, n: int) -> float:
    """Runs ``n`` real steps; returns seconds per step (device work included)."""
    self.block()
    t0 = time.perf_counter()
    for _ in range(n):
      self.step()
    self.block()
    return (time.perf_counter() - t0) / n


def calibrate_inner(stepper: Stepper, min_block_s: float, max_inner: int = 50
                    ) -> int:
  """Steps per timed block so that one block lasts at least ``min_block_s``."""
  t = min(stepper.run(1) for _ in range(3))
  return int(min(max_inner, max(1, np.ceil(min_block_s / max(t, 1e-6)))))


def interleaved_times(steppers: dict, repeats: int, inner: int,
                      warmup: int = 2) -> dict:
  """Median-ready per-step times of several steppers, measured side by side.

  Each repeat times ``inner`` steps of every stepper; the order rotates from
  repeat to repeat. Implicit host<->device transfers are disallowed while
  timing, so a step that secretly round-trips through the host fails loudly.

  Returns:
    ``{name: [seconds per step, one per repeat]}``.
  """
  names = list(steppers)
  with jax.transfer_guard("disallow"):
    for name in names:
      steppers[name].run(warmup)
    times = {name: [] for name in names}
    for r in range(repeats):
      shift = r % len(names)
      for name in names[shift:] + names[:shift]:
        times[name].append(steppers[name].run(inner))
  return times


def summary(seconds: Sequence[float]) -> dict:
  """Median and inter-quartile range of a series, in milliseconds."""
  ms = np.asarray(seconds) * 1e3
  q25, q50, q75 = np.percentile(ms, [25, 50, 75])
  return {"median_ms": float(q50), "q25_ms": float(q25), "q75_ms": float(q75),
          "min_ms": float(ms.min()), "repeats": int(ms.size)}


def paired_ratio(numer: Sequence[float], denom: Sequence[float]) -> dict:
  """Median of the per-repeat ratios ``numer[r] / denom[r]`` and its IQR.

  Each repeat measured both within a few hundred milliseconds of each other,
  so pairing cancels most of the load drift of a shared machine.
  ``min_ratio`` is ``min(numer) / min(denom)``: other processes only ever add
  time, so on a heavily shared machine the fastest repeat of each is the
  closest to its intrinsic cost.
  """
  r = np.asarray(numer) / np.asarray(denom)
  q25, q50, q75 = np.percentile(r, [25, 50, 75])
  return {"ratio": float(q50), "q25": float(q25), "q75": float(q75),
          "min_ratio": float(np.min(numer) / np.min(denom))}


def profile_ops(stepper: Stepper, steps: int = 3, top: int = 8) -> dict:
  """Device time per step of each kind of XLA op, from a ``jax.profiler`` trace.

  Op names such as ``multiply_add_fusion.12`` are grouped by kind
  (``multiply_add_fusion``); ``copy`` ops and ``ynn_fusion`` (reductions on
  XLA:CPU) show where a step copies a donated buffer or reduces a tree. Times
  are summed over threads, so compare kinds, not totals with wall time.
  """
  import collections
  import glob
  import gzip
  import re
  import tempfile

  stepper.run(1)
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    try:
      stepper.run(steps)
    finally:
      jax.profiler.stop_trace()
    files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"),
                      recursive=True)
    if not files:
      return {}
    with gzip.open(files[0]) as f:
      events = json.load(f)["traceEvents"]
  totals = collections.defaultdict(float)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith(("$", "end:")) or "::" in name:
      continue
    if not re.match(r"^[a-z_\-]+(\.\d+)?$", name):
      continue
    totals[re.sub(r"\.\d+$", "", name)] += e["dur"] / 1e3 / steps
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return {k: round(v, 3) for k, v in ranked}


# ----------------------------------------------------------------------------
# provenance and output
# ----------------------------------------------------------------------------


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info() -> dict:
  """Where and with what the numbers were taken."""
  import optax  # local: keep this module importable without optax
  device = jax.devices()[0]
  try:
    load = os.getloadavg()
  except OSError:  # pragma: no cover
    load = None
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M UTC"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "load_avg_at_start": load,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "optax": optax.__version__,
  }


def write_json(path: str, payload: Any) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, sort_keys=False)
    f.write("\n")


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, payload: dict, markdown: str, *, backend: str,
                  quick: bool, out: str | None = None) -> str:
  """Writes ``<prefix>.json`` and ``<prefix>.md``; returns the prefix.

  The default prefix names the backend (``step_time_cpu``, ``step_time_gpu``)
  and the mode, so runs on different machines never overwrite each other.
  """
  prefix = out or os.path.join(
      RESULTS_DIR, f"{name}_{backend}" + ("_quick" if quick else ""))
  write_json(prefix + ".json", payload)
  write_text(prefix + ".md", markdown)
  return prefix


def fmt_bytes(n) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-flavoured Markdown table."""
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"
