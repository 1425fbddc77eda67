"""Performance properties that do not depend on wall-clock time.

* optimizer state: the SAM family stores no parameter-sized buffer beyond
  its base optimizer (only O(1) scalars), counted from the state pytree;
* no recompilation: five jitted steps compile exactly once, for every alias,
  with scheduled learning rates and radii, and with implicit host<->device
  transfers disallowed (no host round-trips);
* buffer donation: a step built with ``donate_argnums=(0, 1)`` aliases every
  parameter and state array to its output, so they update in place;
* one fused norm: SAM's update reduces each gradient leaf exactly once;
* the benchmark scripts run end to end on a tiny model.

No test here times anything.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)
import _timing  # noqa: E402
import optimizer_overhead  # noqa: E402
import step_time  # noqa: E402

LR, RHO = 0.01, 0.05


def _params():
  """A small tree with matrices, vectors and a scalar leaf."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"dense": {"w": jax.random.normal(k1, (6, 5)),
                    "b": jax.random.normal(k2, (5,))},
          "out": jax.random.normal(k3, (5, 3)),
          "scale": jnp.asarray(1.5, jnp.float32)}  # not weakly typed


def _loss(params, x):
  h = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])
  return jnp.sum((h @ params["out"]) ** 2) * params["scale"] ** 2


def _array_leaf_bytes(tree):
  """Sorted byte sizes of the non-scalar leaves of a (shape) tree."""
  return sorted(_timing.leaf_bytes(x) for x in jax.tree.leaves(tree)
                if x.ndim > 0)


def _scalar_count(tree):
  return sum(1 for x in jax.tree.leaves(tree) if x.ndim == 0)


# ----------------------------------------------------------------------------
# state bytes
# ----------------------------------------------------------------------------

SGDM = optax.sgd(LR, momentum=0.9)


def _precond(variant):
  return optax.chain(samtx.lightsam_preconditioner(variant),
                     optax.scale_by_learning_rate(LR))


SCALAR_OVERHEAD = [
    ("sam", samtx.sam(LR, RHO, momentum=0.9), SGDM),
    ("asam", samtx.sam(LR, RHO, momentum=0.9, adaptive=True), SGDM),
    ("sam_no_momentum", samtx.sam(LR, RHO), optax.sgd(LR)),
    ("msam", samtx.msam(LR, RHO, momentum=0.9), SGDM),
    ("adasam", samtx.adasam(LR, RHO), samtx.amsgrad(LR)),
    ("adasam_delayed", samtx.adasam(LR, RHO, delayed=True),
     samtx.amsgrad(LR, delayed=True)),
    ("lightsam_I", samtx.lightsam(LR, RHO, variant="adagrad_norm"),
     _precond("adagrad_norm")),
    ("amsgrad_vs_optax", samtx.amsgrad(LR), optax.amsgrad(LR)),
]


@pytest.mark.parametrize("name,opt,base", SCALAR_OVERHEAD,
                         ids=[c[0] for c in SCALAR_OVERHEAD])
def test_state_is_base_plus_scalars(name, opt, base):
  params = _params()
  state = jax.eval_shape(opt.init, params)
  base_state = jax.eval_shape(base.init, params)
  # Same parameter-sized buffers as the base optimizer, nothing more ...
  assert _array_leaf_bytes(state) == _array_leaf_bytes(base_state), name
  # ... and at most a handful of scalars (count, radius, norm metric).
  extra_scalars = _scalar_count(state) - _scalar_count(base_state)
  extra_bytes = _timing.tree_bytes(state) - _timing.tree_bytes(base_state)
  assert 0 <= extra_scalars <= 3, name
  assert extra_bytes == sum(
      _timing.leaf_bytes(x) for x in jax.tree.leaves(state) if x.ndim == 0
  ) - sum(_timing.leaf_bytes(x) for x in jax.tree.leaves(base_state)
          if x.ndim == 0)


@pytest.mark.parametrize("variant", ["adagrad", "adam"])
def test_lightsam_per_coordinate_state_is_twice_its_preconditioner(variant):
  """LightSAM-II/III keep separate ascent and descent statistics (by design)."""
  params = _params()
  state = jax.eval_shape(samtx.lightsam(LR, RHO, variant=variant).init, params)
  base = jax.eval_shape(_precond(variant).init, params)
  assert _array_leaf_bytes(state) == sorted(2 * _array_leaf_bytes(base))


def test_transparent_optax_sam_keeps_a_parameter_copy_samtx_does_not():
  params = _params()
  param_bytes = _array_leaf_bytes(params)
  transparent = jax.eval_shape(step_time.contrib_sam(opaque=False).init, params)
  ours = jax.eval_shape(samtx.sam(LR, RHO, momentum=0.9).init, params)
  sgdm = jax.eval_shape(SGDM.init, params)
  assert _array_leaf_bytes(transparent) == sorted(
      _array_leaf_bytes(sgdm) + param_bytes)
  assert _array_leaf_bytes(ours) == _array_leaf_bytes(sgdm)


# ----------------------------------------------------------------------------
# compilation count and host round-trips
# ----------------------------------------------------------------------------

LR_SCHEDULE = optax.cosine_decay_schedule(LR, decay_steps=10)
RHO_SCHEDULE = optax.linear_schedule(0.0, RHO, transition_steps=3)

ALIASES = [
    ("sam", lambda lr, rho: samtx.sam(lr, rho, momentum=0.9)),
    ("sam_nesterov", lambda lr, rho: samtx.sam(lr, rho, momentum=0.9,
                                                nesterov=True)),
    ("asam", lambda lr, rho: samtx.sam(lr, rho, adaptive=True, eta=0.01)),
    ("adasam", lambda lr, rho: samtx.adasam(lr, rho)),
    ("adasam_delayed", lambda lr, rho: samtx.adasam(lr, rho, delayed=True)),
    ("amsgrad", lambda lr, rho: samtx.amsgrad(lr)),
    ("lightsam_I", lambda lr, rho: samtx.lightsam(lr, rho,
                                                  variant="adagrad_norm")),
    ("lightsam_II", lambda lr, rho: samtx.lightsam(lr, rho, variant="adagrad")),
    ("lightsam_III", lambda lr, rho: samtx.lightsam(lr, rho, variant="adam")),
    ("msam", lambda lr, rho: samtx.msam(lr, rho, momentum=0.9)),
]
ALIAS_IDS = [a[0] for a in ALIASES]
HYPERS = [(LR, RHO), (LR_SCHEDULE, RHO_SCHEDULE)]


def _counting_step(opt):
  """A jitted, donating step and a list that grows by one per Python trace."""
  traces = []
  grad = jax.grad(_loss)

  def step(params, state, x):
    traces.append(1)
    grads = grad(params, x)
    updates, state = opt.update(grads, state, params,
                                grad_fn=lambda p: grad(p, x))
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1)), traces


@pytest.mark.parametrize("hypers", HYPERS, ids=["constant", "schedules"])
@pytest.mark.parametrize("name,make", ALIASES, ids=ALIAS_IDS)
def test_five_steps_compile_once_without_host_round_trips(name, make, hypers):
  opt = make(*hypers)
  step, traces = _counting_step(opt)
  params = _params()
  # Fresh buffers: a donated call may not receive the same buffer twice.
  state = _timing.unshare(opt.init(params))
  x = jnp.ones((4, 6))
  with jax.transfer_guard("disallow"):
    for _ in range(5):
      params, state = step(params, state, x)
  assert len(traces) == 1, name
  assert step._cache_size() == 1, name
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


# ----------------------------------------------------------------------------
# buffer donation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,make", ALIASES, ids=ALIAS_IDS)
def test_state_from_init_owns_its_buffers(name, make):
  """``opt.init`` output can be donated directly (no leaf shares a buffer)."""
  params = _params()
  state = make(LR, RHO).init(params)
  assert _timing.shared_buffers((params, state)) == 0, name


@pytest.mark.parametrize("name,make", ALIASES, ids=ALIAS_IDS)
def test_donated_step_updates_params_and_state_in_place(name, make):
  opt = make(LR, RHO)
  step, _ = _counting_step(opt)
  params = _params()
  state = _timing.unshare(opt.init(params))
  x = jnp.ones((4, 6))
  compiled = step.lower(params, state, x).compile()
  array_bytes = sum(_array_leaf_bytes((params, state)))
  # Every parameter and state array is written into its donated input.
  assert compiled.memory_analysis().alias_size_in_bytes >= array_bytes, name
  # (A scalar metric may be left out of the aliasing; arrays may not.)
  old_arrays = [x for x in jax.tree.leaves((params, state)) if x.ndim > 0]
  new_params, _ = compiled(params, state, x)
  assert all(leaf.is_deleted() for leaf in old_arrays), name
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_params))


# ----------------------------------------------------------------------------
# one fused norm per tree
# ----------------------------------------------------------------------------


def _reductions_in_update(opt, params):
  """Number of ``reduce_sum`` equations in one update's jaxpr."""
  grads = jax.tree.map(jnp.ones_like, params)
  state = opt.init(params)
  elementwise_grad_fn = lambda p: jax.tree.map(lambda x: 2.0 * x, p)
  jaxpr = jax.make_jaxpr(lambda g, s, p: opt.update(
      g, s, p, grad_fn=elementwise_grad_fn))(grads, state, params)

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "reduce_sum"
      for sub in jax.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n

  return count(jaxpr.jaxpr)


@pytest.mark.parametrize("opt", [samtx.sam(LR, RHO, momentum=0.9),
                                 samtx.adasam(LR, RHO)], ids=["sam", "adasam"])
def test_sam_reduces_each_gradient_leaf_once(opt):
  """One global norm for the ascent, none for the perturbation-norm metric."""
  params = _params()
  assert _reductions_in_update(opt, params) == len(jax.tree.leaves(params))


# ----------------------------------------------------------------------------
# the benchmark scripts themselves
# ----------------------------------------------------------------------------


def test_step_time_ratios_name_only_benchmarked_optimizers():
  names = set(step_time.optimizers())
  for label, num, den, target, _ in step_time.RATIOS:
    assert num in names and den in names, label
    assert target >= 1.0


def test_step_time_benchmark_runs_and_reports_its_ratios():
  model = step_time.named("tiny_mlp", step_time.mlp((8, 16, 4), batch_size=4))
  names = {"optax.sgd_momentum", "samtx.sam", "samtx.msam",
           "contrib.sam_opaque", "contrib.sam_transparent"}
  result = step_time.bench_model(model, repeats=2, min_block_s=0.0,
                                 names=names, log=lambda *a: None)
  expected = {r[0] for r in step_time.RATIOS if {r[1], r[2]} <= names}
  assert {r["label"] for r in result["ratios"]} == expected
  for r in result["ratios"]:
    assert np.isfinite(r["ratio"]) and r["ratio"] > 0
    assert r["q25"] <= r["ratio"] <= r["q75"]
  for name, row in result["optimizers"].items():
    assert row["finite"], name
    assert row["memory"]["alias_size_in_bytes"] >= result["param_bytes"], name
    assert row["compile_s"] > 0
  sam = result["optimizers"]["samtx.sam"]
  sgdm = result["optimizers"]["optax.sgd_momentum"]
  opaque = result["optimizers"]["contrib.sam_opaque"]
  # Two gradients per step: XLA's flop count is about twice the base's, and
  # samtx.sam compiles to the same work as optax.contrib.sam (opaque).
  assert 1.8 < sam["cost"]["flops"] / sgdm["cost"]["flops"] < 2.2
  assert sam["cost"]["bytes_accessed"] <= opaque["cost"]["bytes_accessed"] * 1.01
  assert "| samtx SAM / base (SGD-m) |" in step_time.ratio_table(result)


def test_optimizer_overhead_state_table():
  params = optimizer_overhead.make_tree(
      optimizer_overhead.transformer_like_shapes(8, 1, 16), jax.random.key(0))
  rows = {r["optimizer"]: r for r in optimizer_overhead.state_comparison(params)}
  for name in ("samtx.sam", "samtx.sam(adaptive)", "samtx.msam",
               "samtx.adasam", "samtx.lightsam I"):
    assert rows[name]["same_array_leaves"], name
    assert 0 < rows[name]["extra_bytes"] <= 16, name
  assert rows["optax.contrib.sam transparent"]["extra_bytes"] >= (
      _timing.tree_bytes(params))
  assert rows["samtx.lightsam II"]["array_leaves_ratio"] == 2.0
