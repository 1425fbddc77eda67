"""Two XLA:CPU behaviours behind the CPU misses of ``accelerator.py``.

1. **Convolutions inside a loop or conditional body.** XLA:CPU rewrites a
   convolution into the layout its fast (Eigen) kernel needs in a pass that
   walks only the entry computation (``ConvCanonicalization``), so the
   backward-pass convolutions of a gradient taken inside a ``while_loop`` or
   ``cond`` body keep their layout and run an unoptimised loop nest. Every
   step that puts a conv net's second pass in such a body pays for it: the
   steps of a scheduled ``rho`` past 0 and LookSAM's second passes. Timed
   here: the gradient of a two-layer conv net and of a two-layer MLP, plain,
   in a ``while_loop`` that runs once, and in a ``cond``.
2. **Temporary memory of two passes through scanned layers.** With the
   transformer blocks as one ``nn.scan`` over layers, XLA:CPU keeps both
   passes' stacked activations live, so a SAM step needs far more than one
   parameter-sized buffer over the base step; with unrolled blocks it does
   not. Measured with ``memory_analysis()`` on the quick GPT of
   ``accelerator.py`` (SGD vs ``samtx.sam`` vs ``optax.contrib.sam``).

Run::

  python benchmarks/xla_cpu_pitfalls.py    # ~2 min on 2 CPU cores

Results go to ``benchmarks/results/xla_cpu_pitfalls_<backend>.{json,md}``
(on a GPU both effects are expected to vanish: its convolutions go to cuDNN
wherever they sit, and its scheduler is another one).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
import accelerator  # noqa: E402

REPEATS = 7


def _once(f):
  """``f`` inside a ``while_loop`` that runs its body once."""
  return lambda x: jax.lax.while_loop(
      lambda c: c[0], lambda c: (jnp.zeros([], bool), f(c[1])),
      (jnp.ones([], bool), x))[1]


def _in_cond(f):
  return lambda x: jax.lax.cond(jnp.sum(jax.tree.leaves(x)[0]) < 1e30, f,
                                lambda y: y, x)


def _median_ms(fn, arg) -> float:
  compiled = jax.jit(fn).lower(arg).compile()
  jax.block_until_ready(compiled(arg))
  times = []
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(arg))
    times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1e3)


def control_flow_timings() -> list:
  """Gradient of a conv net and of an MLP: plain, in a loop, in a cond."""
  k = jax.random.split(jax.random.key(0), 4)
  images = jax.random.normal(k[0], (16, 32, 32, 16))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv_params = {"w1": jax.random.normal(k[1], (3, 3, 16, 16)) * 0.1,
                 "w2": jax.random.normal(k[2], (3, 3, 16, 16)) * 0.1}
  conv_grad = jax.grad(lambda p: jnp.sum(
      conv(jax.nn.relu(conv(images, p["w1"])), p["w2"]) ** 2))
  rows = jax.random.normal(k[3], (256, 512))
  mlp_params = {"w1": jnp.ones((512, 512)) * 0.01,
                "w2": jnp.ones((512, 512)) * 0.01}
  mlp_grad = jax.grad(lambda p: jnp.sum(
      jax.nn.relu(rows @ p["w1"]) @ p["w2"]) ** 2)
  out = []
  for name, grad, params in [("conv net (2 layers, 16x32x32x16)", conv_grad,
                              conv_params),
                             ("MLP (2 layers, 256x512)", mlp_grad,
                              mlp_params)]:
    plain = _median_ms(grad, params)
    out.append({"model": name, "plain_ms": plain,
                "while_loop_ms": _median_ms(_once(grad), params),
                "cond_ms": _median_ms(_in_cond(grad), params)})
  return out


def scan_temp_bytes() -> list:
  """XLA temp bytes of SGD and SAM steps on the quick GPT, unrolled/scanned."""
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("batch",))
  entries = {e.name: e for e in accelerator.entries()}
  names = [accelerator.SGD, accelerator.SAM, accelerator.CONTRIB_SAM]
  out = []
  for scan in (False, True):
    model = [m for m in accelerator.SIZES["quick"](scan)
             if m.name == "gpt2_small"][0]
    compiled, params, _, _ = accelerator.compile_model(
        model, mesh, [entries[n] for n in names], jobs=1, log=lambda *a: None)
    temps = {c.entry.name: c.record["memory"]["temp_size_in_bytes"]
             for c in compiled}
    out.append({"layers": "nn.scan" if scan else "unrolled",
                "param_bytes": _timing.tree_bytes(params), **temps})
  return out


def markdown(payload) -> str:
  m = payload["machine"]
  lines = [f"# XLA:CPU pitfalls\n\nMachine: {m['cpu']} ({m['cpu_count']}"
           f" cores, backend {m['backend']}), jax {m['jax']}, {m['date_utc']};"
           f" load average at start {m['load_avg_at_start']}. Command:"
           f" `{payload['command']}`.\n\n",
           "## A gradient inside a loop or conditional body (median ms of"
           f" {REPEATS} calls)\n\n"]
  lines.append(_timing.md_table(
      ["gradient of", "plain", "while_loop (once)", "cond", "loop / plain"],
      [[r["model"], f"{r['plain_ms']:.1f}", f"{r['while_loop_ms']:.1f}",
        f"{r['cond_ms']:.1f}", f"{r['while_loop_ms'] / r['plain_ms']:.1f}x"]
       for r in payload["control_flow"]]))
  lines.append("\n## Temporary bytes of a step on the quick GPT of"
               " `accelerator.py`\n\n")
  rows = []
  for r in payload["scan"]:
    base = r[accelerator.SGD]
    rows.append([r["layers"], _timing.fmt_bytes(r["param_bytes"]),
                 _timing.fmt_bytes(base)] + [
        f"{_timing.fmt_bytes(r[n])} (+{(r[n] - base) / r['param_bytes']:.1f}"
        " params)" for n in (accelerator.SAM, accelerator.CONTRIB_SAM)])
  lines.append(_timing.md_table(
      ["blocks", "params", "optax.sgd temp", "samtx.sam temp",
       "optax.contrib.sam temp"], rows))
  return "".join(lines)


def main(argv=None) -> dict:
  args = sys.argv[1:] if argv is None else argv
  payload = {"machine": _timing.machine_info(),
             "command": " ".join(["python benchmarks/xla_cpu_pitfalls.py",
                                  *args]),
             "control_flow": control_flow_timings(),
             "scan": scan_temp_bytes()}
  prefix = _timing.write_results(
      "xla_cpu_pitfalls", payload, markdown(payload),
      backend=payload["machine"]["backend"], quick=False)
  print(markdown(payload))
  print(f"wrote {prefix}.json and {prefix}.md")
  return payload


if __name__ == "__main__":
  main()
