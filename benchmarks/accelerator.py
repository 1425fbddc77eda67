"""Every samtx optimizer on the models users train, side by side with its base.

Three model families, written in Flax (linen), in float32:

* ``resnet18``: ResNet-18 for 32x32 images (CIFAR layout: 3x3 stem, stages
  of widths 64-128-256-512, two basic blocks each, BatchNorm whose
  statistics come from the clean pass only), 11.2M parameters;
* ``vit_ti``: ViT-Ti/4 on 32x32 images (patch 4, width 192, depth 12,
  3 heads, MLP 768, class token), 5.4M parameters;
* ``gpt2_small``: a GPT-2-small-shaped decoder (vocabulary 50257, width 768,
  12 layers, 12 heads, sequence 1024, tied embeddings), 124M parameters.

The transformer blocks are unrolled, as in Flax's examples;
``--scan-layers`` makes them one ``flax.linen.scan`` over layers instead
(faster to trace and compile; on XLA:CPU the two passes' stacked activations
then stay live together, so every two-pass step, ``optax.contrib.sam``'s
too, needs most of an extra activation set of temporary memory).

For each model the script compiles one jitted, donated training step per
optimizer -- every samtx alias (families included, and aliases that later
versions add, found by name in ``samtx``), its base optimizer (the same
descent rule without the perturbation), ``optax.contrib.sam`` (SAM's maths,
opaque mode) and SAM with a rho schedule that is 0 on the timed steps --
and times the steps *side by side in one process*: every repeat runs each
step for the same number of steps, in a rotated order. With more than one
local device the batch is sharded over all of them and parameters and state
are replicated (plain ``jax.jit`` data parallelism, one global perturbation,
as ``samtx.parallel.jit_step`` does).

Columns: step-time ratio to the base (median and IQR of the per-repeat
ratios), gradient evaluations per step (counted at run time on a tiny model:
they do not depend on the model), lowering + compile seconds, optimizer
state bytes, the compiled step's temporary bytes
(``.lower(...).compile().memory_analysis()``) and, on a GPU, the peak device
bytes in use while that step runs alone (``device.memory_stats()``, see
:func:`measure_peaks`). The targets of the issue are checked on every model.

Run (one line each)::

  python benchmarks/accelerator.py            # real sizes on a GPU or TPU
  python benchmarks/accelerator.py --quick    # tiny widths, CPU
  python benchmarks/accelerator.py --smoke    # smallest: what the tests run

The real sizes are meant to take about five minutes on one H100 (not yet run
on one). ``--quick`` is compile-bound: 66 compiled steps, 28 minutes on 2
CPU cores shared with other jobs (load 11).

Without ``--quick``/``--smoke`` the sizes follow the backend: real sizes when
``jax.default_backend() != "cpu"``, the quick ones on a CPU (``--full``
forces the real ones there). Results go to
``benchmarks/results/accelerator_<backend>[_quick|_smoke].{json,md}`` (the
JSON names the device). A group of steps that would not fit in device memory
is split (see :func:`timing_groups`); a step that still runs out of memory is
recorded as such and the run goes on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (benchmarks/ is not a package)

import samtx  # noqa: E402

LR, RHO, MOMENTUM, LOOKSAM_K, WEIGHT_DECAY = 1e-3, 0.05, 0.9, 5, 1e-2

# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------


class BasicBlock(nn.Module):
  """ResNet's basic block: two 3x3 convolutions and a shortcut."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9)
    y = nn.Conv(self.features, (3, 3), self.strides, padding=1,
                use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm()(nn.Conv(self.features, (1, 1), self.strides,
                         use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet-18 for small images (3x3 stem, no max-pool), ``widths`` per stage."""
  widths: tuple = (64, 128, 256, 512)
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, width in enumerate(self.widths):
      for block in range(2):
        x = BasicBlock(width, 2 if stage and not block else 1)(x, train)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


class Block(nn.Module):
  """A pre-LayerNorm transformer block, shaped for ``nn.scan`` over layers."""
  heads: int
  mlp: int
  causal: bool

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2])) if self.causal else None
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(
        nn.LayerNorm()(x), mask=mask)
    y = nn.Dense(self.mlp)(nn.LayerNorm()(x))
    return x + nn.Dense(x.shape[-1])(nn.gelu(y)), None


def _apply_blocks(x, depth: int, scan: bool, **kwargs):
  """``depth`` blocks, unrolled or as one ``nn.scan`` over layers."""
  if scan:
    x, _ = nn.scan(Block, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=depth)(**kwargs)(x, None)
    return x
  for _ in range(depth):
    x, _ = Block(**kwargs)(x, None)
  return x


class ViT(nn.Module):
  """A Vision Transformer with a class token on ``patch`` x ``patch`` patches."""
  patch: int = 4
  width: int = 192
  depth: int = 12
  heads: int = 3
  mlp: int = 768
  classes: int = 10
  scan: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), self.patch)(x)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)),
                         x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
    x = _apply_blocks(x, self.depth, self.scan, heads=self.heads,
                      mlp=self.mlp, causal=False)
    return nn.Dense(self.classes)(nn.LayerNorm()(x[:, 0]))


class GPT(nn.Module):
  """A GPT-2-shaped decoder: learned positions, tied input/output embedding."""
  vocab: int = 50257
  seq: int = 1024
  width: int = 768
  depth: int = 12
  heads: int = 12
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.width,
                     embedding_init=nn.initializers.normal(0.02))
    x = embed(tokens) + self.param("pos", nn.initializers.normal(0.01),
                                   (self.seq, self.width))[:tokens.shape[1]]
    x = _apply_blocks(x, self.depth, self.scan, heads=self.heads,
                      mlp=4 * self.width, causal=True)
    return embed.attend(nn.LayerNorm()(x))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


@dataclasses.dataclass(frozen=True)
class Model:
  """A benchmark model: ``loss(params, model_state, batch) -> (loss, state)``.

  ``model_state`` is what the forward pass updates (BatchNorm statistics; an
  empty dict otherwise); the perturbed pass reads it but its update is
  dropped, as in ``samtx.flax``.
  """
  name: str
  description: str
  init: Callable  # key -> (params, model_state)
  loss: Callable
  make_batch: Callable  # (key, global batch size) -> batch
  batch_size: int  # per device


def resnet18(widths, batch_size, image=32) -> Model:
  net = ResNet(widths=tuple(widths))

  def init(key):
    variables = net.init(key, jnp.zeros((1, image, image, 3)), train=True)
    return variables["params"], {"batch_stats": variables["batch_stats"]}

  def loss(params, model_state, batch):
    x, y = batch
    logits, new_state = net.apply({"params": params, **model_state}, x,
                                  train=True, mutable=["batch_stats"])
    return _cross_entropy(logits, y), dict(new_state)

  def make_batch(key, n):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (n, image, image, 3)),
            jax.random.randint(ky, (n,), 0, 10))

  return Model("resnet18", f"ResNet-18 widths {'-'.join(map(str, widths))},"
               f" {image}x{image}x3", init, loss, make_batch, batch_size)


def vit(width, depth, heads, mlp, batch_size, patch=4, image=32,
        scan=False) -> Model:
  net = ViT(patch=patch, width=width, depth=depth, heads=heads, mlp=mlp,
            scan=scan)

  def init(key):
    return net.init(key, jnp.zeros((1, image, image, 3)))["params"], {}

  def loss(params, model_state, batch):
    x, y = batch
    return _cross_entropy(net.apply({"params": params}, x), y), model_state

  def make_batch(key, n):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (n, image, image, 3)),
            jax.random.randint(ky, (n,), 0, 10))

  return Model("vit_ti", f"ViT width {width}, depth {depth}"
               f"{' (scanned)' if scan else ''}, {heads} heads, MLP {mlp},"
               f" patch {patch} on {image}x{image}x3", init, loss, make_batch,
               batch_size)


def gpt(vocab, seq, width, depth, heads, batch_size, scan=False) -> Model:
  net = GPT(vocab=vocab, seq=seq, width=width, depth=depth, heads=heads,
            scan=scan)

  def init(key):
    return net.init(key, jnp.zeros((1, seq), jnp.int32))["params"], {}

  def loss(params, model_state, tokens):
    logits = net.apply({"params": params}, tokens[:, :-1])
    return _cross_entropy(logits, tokens[:, 1:]), model_state

  def make_batch(key, n):
    return jax.random.randint(key, (n, seq + 1), 0, vocab)

  return Model("gpt2_small", f"GPT-2-shaped decoder width {width}, depth"
               f" {depth}{' (scanned)' if scan else ''}, {heads} heads, vocab"
               f" {vocab}, sequence {seq}", init, loss, make_batch,
               batch_size)


# Sizes: the real ones for accelerators, tiny widths for CPU runs and tests.
SIZES = {
    "full": lambda scan: [
        resnet18((64, 128, 256, 512), batch_size=128),
        vit(192, 12, 3, 768, batch_size=128, scan=scan),
        gpt(50257, 1024, 768, 12, 12, batch_size=8, scan=scan)],
    "quick": lambda scan: [
        resnet18((8, 16, 32, 64), batch_size=16),
        vit(32, 2, 2, 64, batch_size=16, scan=scan),
        gpt(512, 64, 32, 2, 2, batch_size=4, scan=scan)],
    "smoke": lambda scan: [
        resnet18((4, 4, 8, 8), batch_size=2, image=8),
        vit(8, 1, 2, 16, batch_size=2, patch=4, image=8, scan=scan),
        gpt(32, 8, 8, 1, 2, batch_size=2, scan=scan)],
}
# Timing per size: (repeats, shortest timed block in seconds).
TIMING = {"full": (9, 0.15), "quick": (15, 0.1), "smoke": (1, 0.0)}

# ----------------------------------------------------------------------------
# optimizers
# ----------------------------------------------------------------------------

ONE_PASS = "one_pass"  # update(g, state, params)
TWO_PASS = "two_pass"  # update(g, state, params, grad_fn=...)
CONTRIB = "contrib_opaque"  # optax.contrib.sam: grad_fn(params, i)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One optimizer: how to build it and what it is compared with."""
  name: str
  make: Callable[[], optax.GradientTransformation]
  kind: str
  base: Optional[str]  # None: a base itself
  two_pass: bool  # holds a perturbed second pass (temp-memory target)
  # Lookahead holds optax.LookaheadParams(fast, slow) and takes gradients at
  # the fast weights; every other optimizer holds the parameters themselves.
  lookahead: bool = False

  def held(self, params):
    return optax.LookaheadParams.init_synced(params) if self.lookahead \
        else params


def _zero_then_rho(switch):
  """rho = 0 before step ``switch``, then RHO; depends on the count at run
  time, so the step keeps both branches whichever side it is timed on."""
  return optax.join_schedules(
      [optax.constant_schedule(0.0), optax.constant_schedule(RHO)], [switch])


def _preconditioned(variant):
  return optax.chain(samtx.lightsam_preconditioner(variant),
                     optax.scale_by_learning_rate(LR))


SGD, CONTRIB_SAM, SAM = "optax.sgd", "optax.contrib.sam", "samtx.sam"
SCHEDULED_ZERO = "samtx.sam [rho schedule at 0]"
SCHEDULED_RHO = "samtx.sam [rho schedule past 0]"
LOOKSAM = f"samtx.looksam(k={LOOKSAM_K})"

# Names in samtx.__all__ that are building blocks, states or helpers rather
# than optimizers (each optimizer built from them has its own entry).
NOT_OPTIMIZERS = frozenset({
    "sam_perturbation", "lightsam_perturbation", "gsam_perturbation",
    "wsam_perturbation", "friendly_sam_perturbation", "looksam_perturbation",
    "fgsam_perturbation", "PerturbationState", "FriendlySAMState",
    "LookSAMState", "scale_by_amsgrad", "scale_by_adagrad_norm",
    "scale_by_adagrad", "scale_by_adam_uncorrected",
    "lightsam_preconditioner", "LIGHTSAM_VARIANTS", "ScaleByAmsgradState",
    "ScaleByAdagradNormState", "ScaleByAdagradState",
    "ScaleByAdamUncorrectedState", "MSAMState", "unperturb",
    "apply_if_finite", "eval_params", "trajectory_loss", "ema_params",
    "saf_memory", "saf_record", "saf_targets", "GPAState", "MESAState",
    "fgsam_plus_perturbation"})
# Optimizers timed elsewhere, where their cost means something.
TIMED_ELSEWHERE = {
    "fgsam_plus": "examples/fgsam_gcn.py: it saves the graph network's"
                  " gradient on steps where only its cheap peer runs, which"
                  " needs a model with such a peer"}


def entries() -> list:
  """Every optimizer benchmarked, bases first; later aliases via ``hasattr``."""
  sgd_m = dict(momentum=MOMENTUM)
  out = [
      Entry(SGD, lambda: optax.sgd(LR, **sgd_m), ONE_PASS, None, False),
      Entry("samtx.amsgrad", lambda: samtx.amsgrad(LR), ONE_PASS, None,
            False),
      Entry("optax.adamw", lambda: optax.adamw(LR, weight_decay=WEIGHT_DECAY),
            ONE_PASS, None, False),
  ]
  for variant in samtx.LIGHTSAM_VARIANTS:
    out.append(Entry(f"preconditioner {variant}",
                     functools.partial(_preconditioned, variant), ONE_PASS,
                     None, False))
  out += [
      Entry(CONTRIB_SAM, lambda: optax.contrib.sam(
          optax.sgd(LR, **sgd_m),
          optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
          opaque_mode=True), CONTRIB, SGD, True),
      Entry(SAM, lambda: samtx.sam(LR, RHO, **sgd_m), TWO_PASS, SGD, True),
      Entry(SCHEDULED_ZERO, lambda: samtx.sam(LR, _zero_then_rho(2**30),
                                              **sgd_m), TWO_PASS, SGD, True),
      Entry(SCHEDULED_RHO, lambda: samtx.sam(LR, _zero_then_rho(0), **sgd_m),
            TWO_PASS, SGD, True),
      Entry("samtx.sam(adaptive=True)", lambda: samtx.sam(
          LR, RHO, adaptive=True, **sgd_m), TWO_PASS, SGD, True),
      Entry("samtx.adasam", lambda: samtx.adasam(LR, RHO), TWO_PASS,
            "samtx.amsgrad", True),
  ]
  for variant, label in zip(samtx.LIGHTSAM_VARIANTS, ("I", "II", "III")):
    out.append(Entry(f"samtx.lightsam {label}", functools.partial(
        samtx.lightsam, LR, RHO, variant=variant), TWO_PASS,
        f"preconditioner {variant}", True))
  out += [
      Entry("samtx.gsam", lambda: samtx.gsam(LR, RHO, **sgd_m), TWO_PASS, SGD,
            True),
      Entry("samtx.wsam", lambda: samtx.wsam(LR, RHO, **sgd_m), TWO_PASS, SGD,
            True),
      Entry("samtx.friendly_sam", lambda: samtx.friendly_sam(LR, RHO, **sgd_m),
            TWO_PASS, SGD, True),
      Entry(LOOKSAM, lambda: samtx.looksam(LR, RHO, k=LOOKSAM_K, **sgd_m),
            TWO_PASS, SGD, True),
      Entry("samtx.msam", lambda: samtx.msam(LR, RHO, **sgd_m), ONE_PASS, SGD,
            False),
      Entry("samtx.msam_adamw", lambda: samtx.msam_adamw(
          LR, RHO, weight_decay=WEIGHT_DECAY), ONE_PASS, "optax.adamw", False),
      Entry("samtx.lookahead(samtx.sam)", lambda: samtx.lookahead(
          samtx.sam(LR, RHO, **sgd_m), sync_period=5, slow_step_size=0.5),
            TWO_PASS, SAM, True, lookahead=True),
  ]
  # Optimizers that later versions of samtx add (DESIGN.md's names): each
  # appears as soon as samtx has it, never as a stand-in.
  if hasattr(samtx, "fgsam"):  # its grad_fn is a peer loss; here the same
    out += [Entry("optax.adam", lambda: optax.adam(LR), ONE_PASS, None, False),
            Entry("samtx.fgsam", lambda: samtx.fgsam(LR, RHO), TWO_PASS,
                  "optax.adam", True)]
  if hasattr(samtx, "gpa"):
    out.append(Entry("samtx.gpa(optax.sgd)", lambda: samtx.gpa(
        optax.sgd(LR, **sgd_m)), ONE_PASS, SGD, False))
  if hasattr(samtx, "mesa"):
    out.append(Entry("samtx.mesa(optax.sgd)", lambda: samtx.mesa(
        optax.sgd(LR, **sgd_m)), ONE_PASS, SGD, False))
  if hasattr(samtx, "rapp"):  # Lookahead anchored: the same held params
    out.append(Entry("samtx.rapp(samtx.sam)", lambda: samtx.rapp(
        samtx.sam(LR, RHO, **sgd_m), sync_period=5, slow_step_size=0.5),
        TWO_PASS, SAM, True, lookahead=True))
  return out


def unbenchmarked() -> list:
  """Public samtx names that are neither benchmarked nor known helpers.

  Each optimizer that samtx exports should have an entry above; a name
  listed here is a new optimizer this script does not know yet.
  """
  covered = {"sam", "adasam", "amsgrad", "lightsam", "gsam", "wsam",
             "friendly_sam", "looksam", "msam", "msam_adamw", "lookahead",
             "fgsam", "gpa", "mesa", "rapp"}
  return sorted(n for n in samtx.__all__ if n not in covered
                and n not in NOT_OPTIMIZERS and n not in TIMED_ELSEWHERE)


# ----------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------


def make_step(model: Model, opt, kind: str, lookahead: bool = False
              ) -> Callable:
  """``step(params, (opt_state, model_state), batch)``, the same carry back.

  The perturbed gradient uses the same batch and the clean pass's model
  state (BatchNorm statistics); only the clean pass updates that state.
  With ``lookahead`` the held params are ``optax.LookaheadParams`` and the
  gradient is taken at the fast weights.
  """
  def step(params, carry, batch):
    opt_state, model_state = carry
    at = params.fast if lookahead else params
    (_, new_model_state), grads = jax.value_and_grad(
        model.loss, has_aux=True)(at, model_state, batch)
    grad = jax.grad(lambda p: model.loss(p, model_state, batch)[0])
    if kind == TWO_PASS:
      updates, opt_state = opt.update(grads, opt_state, params, grad_fn=grad)
    elif kind == CONTRIB:
      updates, opt_state = opt.update(grads, opt_state, params,
                                      grad_fn=lambda p, _: grad(p))
    else:
      updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), (opt_state, new_model_state)

  return step


def gradient_evaluations(entry: Entry, steps: int = 2 * LOOKSAM_K) -> float:
  """Loss gradients per step, counted at run time on a tiny model.

  A host callback in the loss counts its evaluations over ``steps`` jitted
  steps (a whole number of LookSAM cycles); the count does not depend on
  the model, so one tiny model serves every row.
  """
  calls = []
  w0 = jnp.asarray([0.5, -1.0, 2.0])

  def loss(p, model_state, batch):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.sum(jnp.cos(p["w"] * batch)), model_state

  tiny = Model("tiny", "", lambda key: ({"w": w0}, {}), loss,
               lambda key, n: None, 1)
  opt = entry.make()
  step = jax.jit(make_step(tiny, opt, entry.kind, entry.lookahead))
  params = entry.held({"w": w0})
  carry = (opt.init(params), {})
  batch = jnp.asarray([1.0, 0.3, -0.7])
  params, carry = step(params, carry, batch)  # compile outside the count
  jax.effects_barrier()
  calls.clear()
  for _ in range(steps):
    params, carry = step(params, carry, batch)
  jax.effects_barrier()
  return len(calls) / steps


# ----------------------------------------------------------------------------
# compile, memory, time
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
  entry: Entry
  fn: Any = None
  record: dict = dataclasses.field(default_factory=dict)


def _placement(mesh):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batched = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("batch"))
  return replicated, batched


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      jnp.shape(x), jnp.result_type(x), sharding=sharding), tree)


def compile_model(model: Model, mesh, selected: list, jobs: int,
                  log=print) -> tuple:
  """Lowers every step (serially: tracing holds the GIL) and compiles them
  ``jobs`` at a time; returns ``(compiled, params, model_state, batch)``."""
  replicated, batched = _placement(mesh)
  params, model_state = jax.jit(model.init)(jax.random.key(0))
  n = model.batch_size * mesh.size
  batch = jax.device_put(model.make_batch(jax.random.key(1), n), batched)
  params, model_state = jax.device_put((params, model_state), replicated)
  out = []
  for entry in selected:
    opt = entry.make()
    held = jax.eval_shape(entry.held, params)
    state_shape = jax.eval_shape(opt.init, held)
    jitted = jax.jit(make_step(model, opt, entry.kind, entry.lookahead),
                     donate_argnums=(0, 1))
    t0 = time.perf_counter()
    lowered = jitted.lower(
        _abstract(held, replicated),
        _abstract((state_shape, model_state), replicated),
        _abstract(batch, batched))
    # Lookahead's slow weights are optimizer memory too: counted as state.
    extra_held = _timing.tree_bytes(held) - _timing.tree_bytes(params)
    out.append(Compiled(entry, lowered, {
        "lower_s": time.perf_counter() - t0,
        "state_bytes": _timing.tree_bytes(state_shape) + extra_held}))

  def finish(c):
    t0 = time.perf_counter()
    try:
      c.fn = c.fn.compile()
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
      c.fn, c.record["error"] = None, f"compile: {type(err).__name__}: {err}"
      return c
    c.record["compile_s"] = time.perf_counter() - t0
    c.record["memory"] = _timing.memory_stats(c.fn)
    c.record["cost"] = _timing.cost_stats(c.fn)
    return c

  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    out = list(pool.map(finish, out))
  for c in out:
    log(f"  {c.entry.name:34s} lower {c.record['lower_s']:5.2f}s"
        + (f"  compile {c.record['compile_s']:6.2f}s  temp"
           f" {_timing.fmt_bytes(c.record['memory']['temp_size_in_bytes'])}"
           if "compile_s" in c.record else f"  {c.record['error'][:80]}"))
  return out, params, model_state, batch


def _fresh_carry(entry, params, model_state, replicated):
  """Own copies of params and state for one donated stepper."""
  params = _timing.unshare(entry.held(params))
  state = jax.device_put(_timing.unshare(entry.make().init(params)),
                         replicated)
  return params, (state, _timing.unshare(model_state))


def measure_peaks(compiled: list, params, model_state, batch, mesh,
                  log=print, device=None) -> None:
  """Peak device bytes of each step run alone (GPU/TPU allocators only).

  ``memory_stats()["peak_bytes_in_use"]`` is a high-water mark that cannot
  be reset, so the steps run one at a time, each with only its own
  parameters, state and the batch alive, in ascending order of XLA's
  estimate (argument + output - aliased + temp bytes). A step whose peak is
  not above everything measured before it reads the earlier mark: such a
  value is an upper bound and is flagged (``peak_is_upper_bound``).
  """
  device = device or mesh.devices.flat[0]
  if not (device.memory_stats() or {}).get("peak_bytes_in_use"):
    return
  replicated, _ = _placement(mesh)
  ready = [c for c in compiled if c.fn is not None]
  ready.sort(key=lambda c: c.record["memory"]["live_bytes_bound"] or 0)
  for c in ready:
    before = device.memory_stats()["peak_bytes_in_use"]
    try:
      carry = _fresh_carry(c.entry, params, model_state, replicated)
      jax.block_until_ready(c.fn(*carry, batch))
    except Exception as err:  # noqa: BLE001 - out of memory: recorded
      c.record["error"] = f"run: {type(err).__name__}: {str(err)[:200]}"
      continue
    finally:
      carry = None
    peak = device.memory_stats()["peak_bytes_in_use"]
    c.record["peak_bytes"] = int(peak)
    c.record["peak_is_upper_bound"] = bool(peak <= before)
  log(f"  peak bytes measured for {len(ready)} steps")


def timing_groups(compiled: list, param_bytes: int, budget_bytes,
                  split: bool = False) -> list:
  """Steps timed together: all of them if their buffers fit, else per base.

  Every stepper keeps its own parameters and state alive while the others
  run. When their sum (plus the largest temporary) would exceed
  ``budget_bytes``, or with ``split``, the steps are timed in groups that
  share a base (the base's descendants, and ``optax.contrib.sam`` with
  SGD), so each ratio is still taken side by side.
  """
  ready = [c for c in compiled if c.fn is not None]
  live = sum(param_bytes + c.record["state_bytes"] for c in ready)
  temp = max((c.record["memory"]["temp_size_in_bytes"] or 0) for c in ready)
  if not split and (budget_bytes is None or live + temp <= budget_bytes):
    return [ready]
  by_name = {c.entry.name: c for c in ready}

  def root(c):
    while c.entry.base is not None and c.entry.base in by_name:
      c = by_name[c.entry.base]
    return c.entry.name

  groups: dict = {}
  for c in ready:
    groups.setdefault(root(c), []).append(c)
  return list(groups.values())


def time_group(group: list, params, model_state, batch, mesh, repeats: int,
               min_block_s: float) -> dict:
  """Interleaved per-step times of one group; ``{name: [seconds, ...]}``."""
  replicated, _ = _placement(mesh)
  steppers = {}
  for c in group:
    p, carry = _fresh_carry(c.entry, params, model_state, replicated)
    steppers[c.entry.name] = _timing.Stepper(c.fn, p, carry, (batch,))
  # Whole LookSAM cycles in every block, so its average is fair.
  first = steppers[group[0].entry.name]
  inner = _timing.calibrate_inner(first, min_block_s) if min_block_s else 1
  inner = int(math.ceil(inner / LOOKSAM_K) * LOOKSAM_K)
  times = _timing.interleaved_times(steppers, repeats=repeats, inner=inner)
  steppers.clear()
  return {"times": times, "inner": inner}


# ----------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------

# (label, numerator, denominator, target)
TARGETS = (
    ("a rho = 0 step (scheduled SAM) / base SGD", SCHEDULED_ZERO, SGD, 1.05),
    ("SAM / base SGD", SAM, SGD, 2.05),
    ("MSAM / base SGD", "samtx.msam", SGD, 1.05),
    ("MSAM-AdamW / AdamW", "samtx.msam_adamw", "optax.adamw", 1.05),
    (f"LookSAM(k={LOOKSAM_K}) / base SGD", LOOKSAM, SGD, 1.3),
    ("samtx SAM / optax.contrib.sam", SAM, CONTRIB_SAM, 1.0),
    ("scheduled SAM past 0 / samtx SAM", SCHEDULED_RHO, SAM, 1.0),
)


def _verdict(ratio: dict, target: float) -> str:
  if ratio["ratio"] <= target:
    return "holds"
  return "within noise" if ratio["q25"] <= target else "misses"


def model_result(model: Model, compiled: list, times: dict, inners: dict,
                 param_bytes: int, grads: dict) -> dict:
  rows = {}
  for c in compiled:
    name, base = c.entry.name, c.entry.base
    row = {"base": base, "kind": c.entry.kind, "two_pass": c.entry.two_pass,
           "grads_per_step": grads.get(name), **c.record}
    if name in times:
      row["time"] = _timing.summary(times[name])
      row["times_s"] = [float(t) for t in times[name]]
      row["inner_steps"] = inners[name]
      if base in times:
        row["vs_base"] = _timing.paired_ratio(times[name], times[base])
    rows[name] = row
  for row in rows.values():  # the temporary-memory target
    base = rows.get(row["base"] or "")
    if row["two_pass"] and base and "memory" in row and "memory" in base:
      extra = (row["memory"]["temp_size_in_bytes"]
               - base["memory"]["temp_size_in_bytes"])
      row["extra_temp_params"] = extra / param_bytes
      row["temp_target_holds"] = bool(extra <= param_bytes)
  targets = []
  for label, num, den, target in TARGETS:
    if num in times and den in times:
      ratio = _timing.paired_ratio(times[num], times[den])
      targets.append({"label": label, "numerator": num, "denominator": den,
                      "target": target, **ratio,
                      "verdict": _verdict(ratio, target)})
  return {"model": model.name, "description": model.description,
          "batch_per_device": model.batch_size, "param_bytes": param_bytes,
          "n_params": param_bytes // 4, "optimizers": rows,
          "targets": targets}


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------


def _cost_ratio(rows: dict, num: str, den, key: str):
  """``num``'s XLA cost figure over ``den``'s (None where either is missing)."""
  a = rows.get(num, {}).get("cost", {}).get(key)
  b = rows.get(den or "", {}).get("cost", {}).get(key)
  return a / b if a and b else None


def _fmt_ratio(x):
  return "-" if x is None else f"{x:.3f}"


def markdown(payload: dict) -> str:
  m = payload["machine"]
  out = [f"# samtx on ResNet, ViT and GPT: step time and memory"
         f" ({payload['size']} sizes)\n\n",
         f"Device: {payload['devices']} x {m['device']} (backend"
         f" {m['backend']}); host {m['cpu']} ({m['cpu_count']} cores);"
         f" jax {m['jax']}, optax {m['optax']}, flax {payload['flax']};"
         f" {m['date_utc']}; load average at start {m['load_avg_at_start']},"
         f" at end {payload['load_avg_at_end']}.\n\n",
         f"Command: `{payload['command']}`; wall time {payload['wall_s']:.0f}"
         f" s; {payload['repeats']} interleaved repeats per group; steps"
         f" compiled {payload['jobs']} at a time. Ratios are medians of"
         " per-repeat ratios to the base optimizer measured side by side (IQR"
         " = noise); grads/step counted at run time; temp = XLA's temporary"
         " bytes of the compiled step (`memory_analysis()`), +temp its excess"
         " over the base step's in parameter sizes (target <= 1 for two-pass"
         " steps); peak = device bytes in use while the step runs alone"
         " (GPU only; <= marks an upper bound); XLA flops = the compiled"
         " step's flops (`cost_analysis()`, deterministic) over the base's,"
         " counting a loop body once, so the branched steps (a scheduled"
         " rho, LookSAM) count their second pass.\n\n"]
  header = ["target"] + [r["model"] for r in payload["results"]]
  rows = []
  for label, _, _, target in TARGETS:
    row = [f"{label} <= {target}"]
    for result in payload["results"]:
      found = [t for t in result["targets"] if t["label"] == label]
      row.append(f"{found[0]['ratio']:.3f} ({found[0]['q25']:.3f}-"
                 f"{found[0]['q75']:.3f}) {found[0]['verdict']}"
                 if found else "n/a")
    rows.append(row)
  temp_row = ["two-pass temp <= base temp + 1 param buffer"]
  for result in payload["results"]:
    misses = [n for n, r in result["optimizers"].items()
              if r.get("temp_target_holds") is False]
    temp_row.append("holds" if not misses else "misses: " + ", ".join(misses))
  rows.append(temp_row)
  cost_row = ["samtx SAM / optax.contrib.sam in XLA flops, bytes"]
  for result in payload["results"]:
    rows_ = result["optimizers"]
    flops = _cost_ratio(rows_, SAM, CONTRIB_SAM, "flops")
    moved = _cost_ratio(rows_, SAM, CONTRIB_SAM, "bytes_accessed")
    cost_row.append("n/a" if flops is None or moved is None
                    else f"{flops:.4f}, {moved:.4f}")
  rows.append(cost_row)
  out.append("## Targets\n\n")
  out.append(_timing.md_table(header, rows))
  for result in payload["results"]:
    out.append(f"\n## {result['model']}: {result['description']},"
               f" {result['n_params']:,} parameters, batch"
               f" {result['batch_per_device']} per device\n\n")
    rows = []
    for name, r in result["optimizers"].items():
      vs = r.get("vs_base")
      peak = r.get("peak_bytes")
      rows.append([
          name, r["base"] or "-",
          f"{r['time']['median_ms']:.2f}" if "time" in r else "n/a",
          f"{vs['ratio']:.3f} ({vs['q25']:.3f}-{vs['q75']:.3f})" if vs else "-",
          "n/a" if r.get("grads_per_step") is None
          else f"{r['grads_per_step']:.2f}",
          _fmt_ratio(_cost_ratio(result["optimizers"], name, r["base"],
                                 "flops")),
          f"{r['lower_s']:.1f} + {r['compile_s']:.1f}" if "compile_s" in r
          else "n/a",
          _timing.fmt_bytes(r["state_bytes"]),
          _timing.fmt_bytes(r["memory"]["temp_size_in_bytes"])
          if "memory" in r else "n/a",
          f"{r['extra_temp_params']:+.2f}" if "extra_temp_params" in r
          else "-",
          "-" if peak is None else
          ("<= " if r.get("peak_is_upper_bound") else "")
          + _timing.fmt_bytes(peak),
          r.get("error", "")[:60]])
    out.append(_timing.md_table(
        ["optimizer", "base", "step ms", "/ base (IQR)", "grads/step",
         "XLA flops / base", "lower + compile s", "state", "temp",
         "+temp (params)", "peak", "error"], rows))
  if payload["unbenchmarked"]:
    out.append("\nNot benchmarked (new samtx names this script does not"
               f" know): {', '.join(payload['unbenchmarked'])}.\n")
  return "".join(out)


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sizes = parser.add_mutually_exclusive_group()
  sizes.add_argument("--quick", action="store_true",
                     help="tiny widths (CPU; compile-bound: every optimizer"
                     " takes tens of minutes, --only a few about a minute)")
  sizes.add_argument("--smoke", action="store_true",
                     help="the smallest sizes, one repeat (tests)")
  sizes.add_argument("--full", action="store_true",
                     help="real sizes also on a CPU (slow there)")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset: resnet18,vit_ti,gpt2_small")
  parser.add_argument("--only", default=None,
                      help="comma-separated optimizer names to keep (their"
                      " bases and optax.contrib.sam are kept too)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="ViT and GPT blocks as one nn.scan over layers"
                      " (faster to compile; on XLA:CPU every two-pass step"
                      " then keeps both passes' activations live)")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--devices", type=int, default=None,
                      help="data-parallel over this many local devices"
                      " (default: all)")
  parser.add_argument("--jobs", type=int, default=None,
                      help="compilations at a time (default: the host's"
                      " cores; compile seconds are then those of each"
                      " compilation sharing the host)")
  parser.add_argument("--memory-fraction", type=float, default=0.6,
                      help="time all steps of a model together only if"
                      " their buffers fit in this fraction of device memory")
  parser.add_argument("--render", default=None, metavar="JSON",
                      help="only rewrite the Markdown beside a saved run")
  parser.add_argument("--out", default=None,
                      help="output prefix (default: benchmarks/results/"
                      "accelerator_<backend>[_quick|_smoke])")
  args = parser.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      payload = json.load(f)
    _timing.write_text(os.path.splitext(args.render)[0] + ".md",
                       markdown(payload))
    return payload
  backend = jax.default_backend()
  size = ("smoke" if args.smoke else "quick" if args.quick else "full"
          if args.full or backend != "cpu" else "quick")
  repeats = args.repeats or TIMING[size][0]
  min_block_s = TIMING[size][1]
  jobs = args.jobs or os.cpu_count() or 1
  devices = jax.local_devices()[:args.devices or None]
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  log = print

  machine = _timing.machine_info()
  import flax
  t_start = time.perf_counter()
  models = SIZES[size](args.scan_layers)
  if args.models:
    keep = set(args.models.split(","))
    models = [m for m in models if m.name in keep]
  selected = entries()
  if args.only:
    keep = set(args.only.split(","))
    names = {e.name for e in selected}
    closure = set(keep & names)
    for e in selected:  # keep bases (and what SAM is compared with)
      if e.name in closure and e.base:
        closure.add(e.base)
    if SAM in closure:
      closure |= {CONTRIB_SAM, SGD}
    selected = [e for e in selected if e.name in closure]
  log(f"accelerator benchmark ({size} sizes): {len(devices)} x"
      f" {machine['device']}, {len(selected)} optimizers, load"
      f" {machine['load_avg_at_start']}")
  grads = {e.name: gradient_evaluations(e) for e in selected}

  device = devices[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  budget = None if limit is None else args.memory_fraction * limit
  results = []
  for model in models:
    t0 = time.perf_counter()
    log(f"\n== {model.name}: {model.description}")
    compiled, params, model_state, batch = compile_model(
        model, mesh, selected, jobs, log)
    param_bytes = _timing.tree_bytes(params)
    log(f"  {param_bytes // 4:,} parameters; compiled in"
        f" {time.perf_counter() - t0:.0f}s")
    measure_peaks(compiled, params, model_state, batch, mesh, log)
    times, inners = {}, {}
    pending = timing_groups(compiled, param_bytes, budget)
    while pending:
      group = pending.pop(0)
      try:
        timed = time_group(group, params, model_state, batch, mesh, repeats,
                           min_block_s)
      except Exception as err:  # noqa: BLE001 - out of memory: recorded
        smaller = timing_groups(group, param_bytes, budget, split=True)
        if len(smaller) > 1:  # retry in groups that share a base
          log(f"  timing all together failed ({type(err).__name__});"
              " timing per base")
          pending = smaller + pending
          continue
        for c in group:
          c.record.setdefault("error", f"timing: {type(err).__name__}:"
                              f" {str(err)[:200]}")
        continue
      times.update(timed["times"])
      inners.update({name: timed["inner"] for name in timed["times"]})
    result = model_result(model, compiled, times, inners, param_bytes, grads)
    result["wall_s"] = time.perf_counter() - t0
    results.append(result)
    for t in result["targets"]:
      log(f"  {t['label']:44s} {t['ratio']:6.3f} ({t['q25']:.3f}-"
          f"{t['q75']:.3f}) <= {t['target']}: {t['verdict']}")
    del compiled, params, model_state, batch

  try:
    load_end = os.getloadavg()
  except OSError:  # pragma: no cover
    load_end = None
  payload = {
      "machine": machine, "size": size, "devices": len(devices),
      "flax": flax.__version__, "repeats": repeats, "jobs": jobs,
      "command": "python benchmarks/accelerator.py " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "settings": {"lr": LR, "rho": RHO, "momentum": MOMENTUM,
                   "looksam_k": LOOKSAM_K, "weight_decay": WEIGHT_DECAY},
      "load_avg_at_end": load_end, "unbenchmarked": unbenchmarked(),
      "wall_s": time.perf_counter() - t_start, "results": results,
  }
  suffix = "" if size == "full" else f"_{size}"
  prefix = args.out or os.path.join(
      _timing.RESULTS_DIR, f"accelerator_{backend}{suffix}")
  _timing.write_json(prefix + ".json", payload)
  _timing.write_text(prefix + ".md", markdown(payload))
  log(f"\nwrote {prefix}.json and {prefix}.md in {payload['wall_s']:.0f}s")
  return payload


if __name__ == "__main__":
  main()
