"""Step time of samtx optimizers against their base optimizers and optax.

For each model (MLPs from ~1e5 to ~1e7 parameters, a small CNN and a small
transformer, and the CNN and transformer sizes ``samtx compare`` trains, which
``--quick`` keeps next to two MLPs) this script compiles one jitted training step per optimizer --
with ``donate_argnums=(0, 1)`` so parameters and optimizer state update in
place -- and then times all of them *side by side in one process*: every
repeat runs each optimizer once, in rotated order, and the reported numbers
are medians over repeats. Compile time, ``memory_analysis()`` and XLA's cost
model are recorded separately for every step.

Run::

  .venv/bin/python benchmarks/step_time.py            # full run (~10 min CPU)
  .venv/bin/python benchmarks/step_time.py --quick    # a few min on 2 CPU cores

Results go to ``benchmarks/results/step_time_<backend>[_quick].{json,md}``.

A SAM step costs two forward-backward passes, so ``samtx.sam / base`` has a
physical limit of 2.0; MSAM takes one gradient, so ``msam / base`` has a limit
of 1.0. The ratios printed at the end compare against those limits (plus the
issue's tolerance) and against ``optax.contrib.sam``, which computes the same
maths in opaque mode and needs two ``update`` calls per real step in
transparent mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/ is not a package)

import samtx  # noqa: E402


LR = 1e-3
RHO = 0.05
MOMENTUM = 0.9

# ----------------------------------------------------------------------------
# models: (init(key) -> params, loss(params, batch) -> scalar, batch(key))
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
  """A benchmark model: pure-JAX parameters, loss and a fixed batch."""
  name: str
  init: Callable
  loss: Callable
  make_batch: Callable
  description: str


def _dense_init(key, fan_in, fan_out):
  w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
  return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def _cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def mlp(widths, batch_size) -> Model:
  """A ReLU MLP classifier on random 784-dimensional inputs."""
  widths = tuple(widths)

  def init(key):
    keys = jax.random.split(key, len(widths) - 1)
    return {f"dense{i}": _dense_init(k, a, b)
            for i, (k, a, b) in enumerate(zip(keys, widths[:-1], widths[1:]))}

  def loss(params, batch):
    x, y = batch
    n = len(widths) - 1
    for i in range(n):
      layer = params[f"dense{i}"]
      x = x @ layer["w"] + layer["b"]
      if i < n - 1:
        x = jax.nn.relu(x)
    return _cross_entropy(x, y)

  def make_batch(key):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (batch_size, widths[0]), jnp.float32),
            jax.random.randint(ky, (batch_size,), 0, widths[-1]))

  desc = f"MLP {'-'.join(map(str, widths))}, batch {batch_size}"
  return Model("", init, loss, make_batch, desc)


def cnn(channels, batch_size, image=28, classes=10) -> Model:
  """A small 3x3-conv network (stride 2 after the first layer) with avg-pool."""
  channels = tuple(channels)

  def init(key):
    keys = jax.random.split(key, len(channels) + 1)
    params, c_in = {}, 1
    for i, (k, c) in enumerate(zip(keys, channels)):
      w = jax.random.normal(k, (3, 3, c_in, c), jnp.float32) / math.sqrt(9 * c_in)
      params[f"conv{i}"] = {"w": w, "b": jnp.zeros((c,), jnp.float32)}
      c_in = c
    params["head"] = _dense_init(keys[-1], c_in, classes)
    return params

  def loss(params, batch):
    x, y = batch
    for i in range(len(channels)):
      layer = params[f"conv{i}"]
      x = jax.lax.conv_general_dilated(
          x, layer["w"], window_strides=(1, 1) if i == 0 else (2, 2),
          padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jax.nn.relu(x + layer["b"])
    x = jnp.mean(x, axis=(1, 2))
    return _cross_entropy(x @ params["head"]["w"] + params["head"]["b"], y)

  def make_batch(key):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (batch_size, image, image, 1), jnp.float32),
            jax.random.randint(ky, (batch_size,), 0, classes))

  desc = f"CNN conv{'-'.join(map(str, channels))}, {image}x{image}, batch {batch_size}"
  return Model("", init, loss, make_batch, desc)


def transformer(vocab, d_model, layers, heads, seq_len, batch_size) -> Model:
  """A pre-LayerNorm causal transformer language model."""
  d_ff = 4 * d_model

  def init(key):
    keys = iter(jax.random.split(key, 4 * layers + 2))
    params = {"embed": jax.random.normal(next(keys), (vocab, d_model)) * 0.02,
              "pos": jnp.zeros((seq_len, d_model), jnp.float32)}
    for i in range(layers):
      params[f"block{i}"] = {
          "ln1": jnp.ones((d_model,), jnp.float32),
          "qkv": _dense_init(next(keys), d_model, 3 * d_model),
          "proj": _dense_init(next(keys), d_model, d_model),
          "ln2": jnp.ones((d_model,), jnp.float32),
          "ff_in": _dense_init(next(keys), d_model, d_ff),
          "ff_out": _dense_init(next(keys), d_ff, d_model),
      }
    params["ln_f"] = jnp.ones((d_model,), jnp.float32)
    params["unembed"] = _dense_init(next(keys), d_model, vocab)
    return params

  def layer_norm(x, scale):
    x = x - jnp.mean(x, -1, keepdims=True)
    return scale * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

  def dense(p, x):
    return x @ p["w"] + p["b"]

  def loss(params, batch):
    tokens = batch
    b, t = tokens.shape[0], tokens.shape[1] - 1
    x = params["embed"][tokens[:, :-1]] + params["pos"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for i in range(layers):
      p = params[f"block{i}"]
      q, k, v = jnp.split(dense(p["qkv"], layer_norm(x, p["ln1"])), 3, -1)
      split = lambda z: z.reshape(b, t, heads, d_model // heads)
      att = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k))
      att = jnp.where(mask, att / math.sqrt(d_model // heads), -1e9)
      out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att), split(v))
      x = x + dense(p["proj"], out.reshape(b, t, d_model))
      x = x + dense(p["ff_out"], jax.nn.gelu(dense(p["ff_in"],
                                                   layer_norm(x, p["ln2"]))))
    logits = dense(params["unembed"], layer_norm(x, params["ln_f"]))
    return _cross_entropy(logits, tokens[:, 1:])

  def make_batch(key):
    return jax.random.randint(key, (batch_size, seq_len + 1), 0, vocab)

  desc = (f"Transformer d{d_model} L{layers} H{heads}, seq {seq_len},"
          f" vocab {vocab}, batch {batch_size}")
  return Model("", init, loss, make_batch, desc)


def named(name: str, model: Model) -> Model:
  return dataclasses.replace(model, name=name)


def models(quick: bool) -> list:
  """The benchmark models, smallest first (quick mode: a subset)."""
  ms = [
      named("mlp_1e5", mlp((784, 128, 10), batch_size=256)),
      named("cnn_1e5", cnn((32, 64, 128), batch_size=32)),
      named("mlp_1e6", mlp((784, 1024, 256, 10), batch_size=128)),
      named("transformer_5e5", transformer(256, 128, 2, 4, 64, batch_size=8)),
      named("mlp_1e7", mlp((784, 2048, 2048, 2048, 10), batch_size=128)),
      # The sizes `samtx compare` trains (digits CNN, text transformer).
      named("cnn_compare", cnn((16, 32), batch_size=128, image=8)),
      named("transformer_compare", transformer(128, 64, 2, 4, 64,
                                               batch_size=16)),
  ]
  if quick:
    keep = ("mlp_1e5", "mlp_1e6", "cnn_compare", "transformer_compare")
    ms = [m for m in ms if m.name in keep]
  return ms


# ----------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------

ONE_PASS = "one_pass"            # update(g, state, params)
TWO_PASS = "two_pass"            # update(g, state, params, grad_fn=g(p))
CONTRIB_OPAQUE = "contrib_opaque"          # grad_fn(p, i)
CONTRIB_TRANSPARENT = "contrib_transparent"  # two calls per real step


def contrib_sam(opaque: bool):
  """optax.contrib.sam with the same maths as ``samtx.sam(momentum=0.9)``."""
  return optax.contrib.sam(
      optax.sgd(LR, momentum=MOMENTUM),
      optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      opaque_mode=opaque)


def lightsam_base(variant: str):
  """LightSAM's descent preconditioner alone (its one-gradient baseline)."""
  return optax.chain(samtx.lightsam_preconditioner(variant),
                     optax.scale_by_learning_rate(LR))


def optimizers() -> dict:
  """``name -> (optimizer, calling convention)``, bases first."""
  return {
      "optax.sgd_momentum": (optax.sgd(LR, momentum=MOMENTUM), ONE_PASS),
      "optax.adam": (optax.adam(LR), ONE_PASS),
      "optax.adamw": (optax.adamw(LR, weight_decay=1e-2), ONE_PASS),
      "optax.amsgrad": (optax.amsgrad(LR), ONE_PASS),
      "samtx.amsgrad": (samtx.amsgrad(LR), ONE_PASS),
      "precond.adagrad_norm": (lightsam_base("adagrad_norm"), ONE_PASS),
      "precond.adagrad": (lightsam_base("adagrad"), ONE_PASS),
      "precond.adam": (lightsam_base("adam"), ONE_PASS),
      "samtx.msam": (samtx.msam(LR, RHO, momentum=MOMENTUM), ONE_PASS),
      "samtx.msam_adamw": (samtx.msam_adamw(LR, RHO, weight_decay=1e-2),
                           ONE_PASS),
      "samtx.sam": (samtx.sam(LR, RHO, momentum=MOMENTUM), TWO_PASS),
      "samtx.asam": (samtx.sam(LR, RHO, momentum=MOMENTUM, adaptive=True),
                     TWO_PASS),
      "samtx.adasam": (samtx.adasam(LR, RHO), TWO_PASS),
      "samtx.lightsam_I": (samtx.lightsam(LR, RHO, variant="adagrad_norm"),
                           TWO_PASS),
      "samtx.lightsam_II": (samtx.lightsam(LR, RHO, variant="adagrad"),
                            TWO_PASS),
      "samtx.lightsam_III": (samtx.lightsam(LR, RHO, variant="adam"),
                             TWO_PASS),
      "contrib.sam_opaque": (contrib_sam(opaque=True), CONTRIB_OPAQUE),
      "contrib.sam_transparent": (contrib_sam(opaque=False),
                                  CONTRIB_TRANSPARENT),
  }


# (label, numerator, denominator, target, where the target comes from)
RATIOS = (
    ("samtx SAM / base (SGD-m)", "samtx.sam", "optax.sgd_momentum", 2.05,
     "issue (limit 2.0)"),
    ("samtx SAM / optax.contrib.sam opaque", "samtx.sam", "contrib.sam_opaque",
     1.0, "issue"),
    ("samtx SAM / optax.contrib.sam transparent (2 calls)", "samtx.sam",
     "contrib.sam_transparent", 1.0, "same maths"),
    ("MSAM / base (SGD-m)", "samtx.msam", "optax.sgd_momentum", 1.05,
     "issue (limit 1.0)"),
    ("MSAM-AdamW / optax.adamw", "samtx.msam_adamw", "optax.adamw", 1.05,
     "issue (limit 1.0)"),
    ("ASAM / base (SGD-m)", "samtx.asam", "optax.sgd_momentum", 2.05,
     "limit 2.0"),
    ("AdaSAM / samtx.amsgrad", "samtx.adasam", "samtx.amsgrad", 2.05,
     "limit 2.0"),
    ("LightSAM-I / its preconditioner", "samtx.lightsam_I",
     "precond.adagrad_norm", 2.05, "limit 2.0"),
    ("LightSAM-II / its preconditioner", "samtx.lightsam_II",
     "precond.adagrad", 2.05, "limit 2.0"),
    ("LightSAM-III / its preconditioner", "samtx.lightsam_III",
     "precond.adam", 2.05, "limit 2.0"),
    ("samtx.amsgrad / optax.amsgrad (whole step)", "samtx.amsgrad",
     "optax.amsgrad", 1.1, "issue (update alone)"),
)


def make_step(opt, loss: Callable, kind: str) -> Callable:
  """``step(params, state, batch) -> (params, state)`` for a calling convention.

  The perturbed gradient uses the same batch as the clean one, as SAM does.
  """
  grad = jax.grad(loss)

  def step(params, state, batch):
    grads = grad(params, batch)
    if kind == TWO_PASS:
      updates, state = opt.update(grads, state, params,
                                  grad_fn=lambda p: grad(p, batch))
    elif kind == CONTRIB_OPAQUE:
      updates, state = opt.update(grads, state, params,
                                  grad_fn=lambda p, _: grad(p, batch))
    else:  # ONE_PASS, CONTRIB_TRANSPARENT (one of the two calls)
      updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


# ----------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------


def compute_ratios(rows: dict, times: dict) -> list:
  """Every ratio of ``RATIOS`` from per-repeat times and XLA cost figures."""
  ratios = []
  for label, num, den, target, source in RATIOS:
    if num not in times or den not in times:
      continue
    r = _timing.paired_ratio(times[num], times[den])

    def cost_ratio(key):
      a, b = rows[num]["cost"][key], rows[den]["cost"][key]
      if a is None or b is None:
        return None
      return (a * rows[num]["update_calls_per_step"]) / (
          b * rows[den]["update_calls_per_step"])

    ratios.append({
        "label": label, "numerator": num, "denominator": den,
        "target": target, "target_source": source, **r,
        "met": r["ratio"] <= target,
        "flops_ratio": cost_ratio("flops"),
        "bytes_accessed_ratio": cost_ratio("bytes_accessed"),
    })
  return ratios


def bench_model(model: Model, repeats: int, min_block_s: float,
                names=None, log=print) -> dict:
  """Compiles and times every optimizer on ``model``; returns a result dict."""
  opts = optimizers()
  if names is not None:
    opts = {k: v for k, v in opts.items() if k in names}
  key = jax.random.key(0)
  params0 = model.init(key)
  batch = model.make_batch(jax.random.key(1))
  n_params = _timing.tree_size(params0)
  log(f"\n== {model.name}: {model.description}, {n_params:,} parameters")

  steppers, rows = {}, {}
  for name, (opt, kind) in opts.items():
    params = _timing.unshare(params0)
    state = opt.init(params)
    # Donation needs every leaf of (params, state) to own its buffer; some
    # init functions share one (recorded, then copied apart).
    shared = _timing.shared_buffers((params, state))
    state = _timing.unshare(state)
    compiled = _timing.compile_step(make_step(opt, model.loss, kind),
                                    params, state, batch)
    calls = 2 if kind == CONTRIB_TRANSPARENT else 1
    steppers[name] = _timing.Stepper(compiled.fn, params, state, (batch,),
                                     calls_per_step=calls)
    rows[name] = {
        "kind": kind,
        "update_calls_per_step": calls,
        "lower_s": compiled.lower_s,
        "compile_s": compiled.compile_s,
        "state_bytes": _timing.tree_bytes(state),
        "init_shared_buffers": shared,
        "memory": compiled.memory,
        "cost": compiled.cost,
    }
    log(f"  compiled {name:26s} lower {compiled.lower_s:5.2f}s"
        f"  compile {compiled.compile_s:5.2f}s"
        + (f"  ({shared} leaves of init state share a buffer)" if shared else ""))

  inner = _timing.calibrate_inner(steppers["optax.sgd_momentum"], min_block_s)
  t0 = time.perf_counter()
  times = _timing.interleaved_times(steppers, repeats=repeats, inner=inner)
  log(f"  timed {repeats} repeats x {inner} steps in"
      f" {time.perf_counter() - t0:.1f}s")

  for name, stepper in steppers.items():
    rows[name]["time"] = _timing.summary(times[name])
    rows[name]["finite"] = bool(all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(stepper.carry[0])))
    rows[name]["times_s"] = [float(t) for t in times[name]]

  ratios = compute_ratios(rows, times)
  return {"model": model.name, "description": model.description,
          "n_params": n_params, "param_bytes": _timing.tree_bytes(params0),
          "inner_steps": inner, "repeats": repeats,
          "optimizers": rows, "ratios": ratios}


# ----------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------

BASE_OF = {
    "samtx.sam": "optax.sgd_momentum", "samtx.asam": "optax.sgd_momentum",
    "samtx.msam": "optax.sgd_momentum", "samtx.adasam": "samtx.amsgrad",
    "samtx.msam_adamw": "optax.adamw",
    "samtx.amsgrad": "optax.amsgrad",
    "samtx.lightsam_I": "precond.adagrad_norm",
    "samtx.lightsam_II": "precond.adagrad",
    "samtx.lightsam_III": "precond.adam",
    "contrib.sam_opaque": "optax.sgd_momentum",
    "contrib.sam_transparent": "optax.sgd_momentum",
}


def ratio_table(result: dict) -> str:
  rows = []
  for r in result["ratios"]:
    status = "yes" if r["met"] else (
        "within noise" if r["q25"] <= r["target"] else "**no**")
    fl = r["flops_ratio"]
    by = r["bytes_accessed_ratio"]
    rows.append([
        r["label"], f"{r['ratio']:.3f}", f"{r['q25']:.3f}-{r['q75']:.3f}",
        f"{r['min_ratio']:.3f}",
        f"<= {r['target']:.2f} ({r['target_source']})", status,
        "n/a" if fl is None else f"{fl:.3f}",
        "n/a" if by is None else f"{by:.3f}"])
  return _timing.md_table(
      ["ratio", "median", "IQR", "min/min", "target", "met (median)",
       "XLA flops ratio", "XLA bytes ratio"], rows)


def time_memory_table(result: dict) -> str:
  rows = []
  opt_rows = result["optimizers"]
  for name, row in opt_rows.items():
    base = BASE_OF.get(name)
    base_row = opt_rows.get(base) if base else None
    peak = row["memory"]["live_bytes_bound"]
    rows.append([
        name, f"{row['time']['median_ms']:.2f}",
        f"{row['time']['q25_ms']:.2f}-{row['time']['q75_ms']:.2f}",
        f"{row['lower_s']:.2f} + {row['compile_s']:.2f}",
        _timing.fmt_bytes(row["state_bytes"]),
        _timing.fmt_bytes(peak),
        base or "-",
        _timing.fmt_bytes(base_row["memory"]["live_bytes_bound"])
        if base_row else "-",
        _timing.fmt_bytes(row["memory"]["temp_size_in_bytes"]),
        _timing.fmt_bytes(row["memory"]["alias_size_in_bytes"]),
    ])
  return _timing.md_table(
      ["optimizer", "step ms (median)", "IQR ms", "lower + compile s",
       "state", "peak bytes", "base", "base peak", "temp", "aliased"],
      rows)


def summary_table(payload: dict) -> str:
  """One row per ratio, one column per model: median [min/min]."""
  results = payload["results"]
  header = ["ratio", "target"] + [
      f"{r['model']} ({r['n_params']:.1e})" for r in results]
  rows = []
  for label, _, _, target, source in RATIOS:
    row = [label, f"<= {target:.2f} ({source})"]
    for result in results:
      match = [r for r in result["ratios"] if r["label"] == label]
      if not match:
        row.append("-")
        continue
      r = match[0]
      mark = "" if r["met"] else " (miss)"
      row.append(f"{r['ratio']:.2f} [{r['min_ratio']:.2f}]{mark}")
    rows.append(row)
  return _timing.md_table(header, rows)


def markdown(payload: dict) -> str:
  m = payload["machine"]
  out = [f"# samtx step time ({'quick' if payload['quick'] else 'full'} run)\n",
         f"Machine: {m['cpu']} ({m['cpu_count']} cores, backend"
         f" {m['backend']}, device {m['device']}), jax {m['jax']}, optax"
         f" {m['optax']}, {m['date_utc']}; load average at start"
         f" {m['load_avg_at_start']}.\n",
         f"Command: `{payload['command']}`; total wall time"
         f" {payload['wall_s']:.0f} s.\n",
         "Times are medians over interleaved repeats (each repeat times every"
         " optimizer once, rotated order); ratios are medians of per-repeat"
         " ratios, IQR gives the noise. Steps are compiled with"
         " `donate_argnums=(0, 1)`. `optax.contrib.sam` transparent counts two"
         " `update` calls (two compiled-step calls) per real step. XLA ratios"
         " come from `compiled.cost_analysis()` (deterministic). min/min is"
         " the ratio of the fastest repeats (other processes only add time)."
         " Peak bytes ="
         " argument + output - aliased + temp bytes of"
         " `compiled.memory_analysis()` (all fields are in the JSON).\n",
         "\n## Summary: median ratio [ratio of fastest repeats]\n\n",
         summary_table(payload)]
  for result in payload["results"]:
    out.append(f"\n## {result['model']}: {result['description']},"
               f" {result['n_params']:,} parameters\n\n")
    out.append(f"{result['repeats']} repeats x {result['inner_steps']}"
               " steps per optimizer.\n\n")
    out.append(ratio_table(result))
    out.append("\n")
    out.append(time_memory_table(result))
  return "".join(out)


def print_ratios(result: dict, log=print) -> None:
  log(f"  {'ratio':52s} {'median':>7s} {'IQR':>13s} {'min/min':>7s}  target")
  for r in result["ratios"]:
    flag = "ok" if r["met"] else "MISS"
    log(f"  {r['label']:52s} {r['ratio']:7.3f} {r['q25']:6.3f}-{r['q75']:6.3f}"
        f" {r['min_ratio']:7.3f}  <= {r['target']:.2f} {flag}")


def render(path: str) -> dict:
  """Recomputes the ratios of a saved run from its per-repeat times."""
  import json
  with open(path) as f:
    payload = json.load(f)
  for result in payload["results"]:
    rows = result["optimizers"]
    times = {name: row["times_s"] for name, row in rows.items()}
    for name, row in rows.items():
      row["time"] = _timing.summary(times[name])
      m = row["memory"]
      m.setdefault("live_bytes_bound", m["argument_size_in_bytes"]
                   + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
                   + m["temp_size_in_bytes"])
    result["ratios"] = compute_ratios(rows, times)
  _timing.write_json(path, payload)
  _timing.write_text(os.path.splitext(path)[0] + ".md", markdown(payload))
  print(f"rewrote {path} and its .md")
  return payload


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="two small MLPs and the compare CNN and transformer, "
                      "fewer repeats")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--min-block-ms", type=float, default=None,
                      help="each timed block lasts at least this long")
  parser.add_argument("--models", nargs="*", default=None,
                      help="subset of model names")
  parser.add_argument("--render", default=None, metavar="JSON",
                      help="only rewrite the Markdown of an earlier run")
  parser.add_argument("--out", default=None,
                      help="output path prefix (default benchmarks/results/"
                      "step_time_<backend>[_quick])")
  args = parser.parse_args(argv)
  if args.render:
    return render(args.render)

  repeats = args.repeats or (9 if args.quick else 21)
  min_block_s = (args.min_block_ms or (20.0 if args.quick else 40.0)) / 1e3
  selected = models(args.quick)
  if args.models:
    selected = [m for m in models(False) if m.name in args.models]
  machine = _timing.machine_info()
  print(f"samtx step time on {machine['cpu']} ({machine['cpu_count']} cores,"
        f" {machine['backend']}), jax {machine['jax']}")

  t0 = time.perf_counter()
  results = []
  for model in selected:
    result = bench_model(model, repeats, min_block_s)
    print_ratios(result)
    results.append(result)
  payload = {
      "machine": machine, "quick": args.quick,
      "command": "python benchmarks/step_time.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "settings": {"lr": LR, "rho": RHO, "momentum": MOMENTUM,
                   "repeats": repeats, "min_block_s": min_block_s,
                   "donate_argnums": [0, 1]},
      "wall_s": time.perf_counter() - t0,
      "results": results,
  }
  prefix = _timing.write_results(
      "step_time", payload, markdown(payload), backend=machine["backend"],
      quick=args.quick, out=args.out)
  print(f"\nwrote {prefix}.json and {prefix}.md in {payload['wall_s']:.0f}s")
  return payload


if __name__ == "__main__":
  main()
