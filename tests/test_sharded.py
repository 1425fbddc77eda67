"""Model-sharded parameters (FSDP, tensor parallel) and model state in samtx.parallel.

Every check compares a sharded run with an independent reference:

* the same optimizer run unsharded on one device with plain ``jax.jit``
  (the sharded steps must reproduce it: XLA or ``norm_axis_name`` computes
  the global norms across parameter blocks);
* a hand-written SAM step looped over the batch shards on one device, for
  BatchNorm-like model state, dropout keys and aux metrics.

All runs happen in one fresh process (``tests/fresh_process.py``); the
``compute_*`` functions below are what that process executes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import samtx
from samtx import parallel as par
from tests import fresh_process
from tests import helpers

B, DIN, H, C = 32, 8, 16, 4
LR, RHO = 0.05, 0.1
STEPS = 3
# FSDP shards every weight over the data axis as well; tensor parallelism
# splits the hidden layer over the model axis (column- then row-parallel).
LAYOUTS = {
    "replicated": {"w1": P(), "b1": P(), "w2": P(), "b2": P()},
    "fsdp": {"w1": P("data", None), "b1": P("data"), "w2": P("data", None),
             "b2": P()},
    "fsdp_tp": {"w1": P("data", "model"), "b1": P("model"),
                "w2": P("model", "data"), "b2": P()},
}
TP = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None),
      "b2": P()}


def optimizers(**axes):
  """Every rule, built with the given axis arguments."""
  return {
      "sam": samtx.sam(LR, RHO, momentum=0.9, **axes),
      "asam": samtx.sam(LR, 0.5, adaptive=True, eta=0.01, **axes),
      "adasam": samtx.adasam(0.01, RHO, **axes),
      "lightsam_I": samtx.lightsam(LR, RHO, **axes),
      "lightsam_II": samtx.lightsam(LR, RHO, variant="adagrad", **axes),
      "lightsam_III": samtx.lightsam(0.01, RHO, variant="adam", **axes),
      # k=2: the three steps run second pass, reuse, second pass
      "looksam": samtx.looksam(LR, RHO, k=2, momentum=0.9, **axes),
      # nonlinear in the perturbed gradient: a global perturbation must
      # average h before the rule
      "gsam": samtx.gsam(LR, RHO, alpha=0.3, **axes),
      # one pass: no perturbed gradient to average over a data axis
      "msam": samtx.msam(LR, RHO, momentum=0.9, **{
          k: v for k, v in axes.items() if k == "norm_axis_name"}),
  }


NAMES = sorted(optimizers())


def problem(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(DIN, H)) / 3, "b1": rng.normal(size=H) / 10,
            "w2": rng.normal(size=(H, C)) / 4, "b2": rng.normal(size=C) / 10}
  batch = (rng.normal(size=(B, DIN)), rng.normal(size=(B, C)))
  cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)
  return cast(params), cast(batch)


def mlp_loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def tp_loss(params, batch):
  """``mlp_loss`` on parameter blocks inside ``shard_map`` (Megatron MLP)."""
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  out = jax.lax.psum(hidden @ params["w2"], "model") + params["b2"]
  return jnp.mean((out - y) ** 2)


def unsharded_run(opt, params, batch, steps=STEPS):
  """The reference: plain jax.jit on one device, the whole batch."""
  trajectory, state = helpers.run(opt, lambda p: mlp_loss(p, batch), params,
                                  steps)
  return samtx.unperturb(trajectory[-1], state)


def mesh_2x4(kind=AxisType.Explicit):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


def flat(prefix, tree):
  return {f"{prefix}/{jax.tree_util.keystr(k)}": np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def spec_strings(prefix, tree):
  return {f"{prefix}/{jax.tree_util.keystr(k)}": np.array(str(v.sharding.spec))
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------
# what the child process computes
# ----------------------------------------------------------------------------


# Every rule on the sharded layouts of an Explicit mesh; two rules on every
# layout of an Auto mesh (replicated parameters on Explicit meshes are
# covered by test_parallel.py).
RUNS = ([("Explicit", layout, name) for layout in ("fsdp", "fsdp_tp")
         for name in NAMES]
        + [("Auto", layout, name) for layout in LAYOUTS
           for name in ("sam", "lightsam_II")])


def compute_jit_layouts():
  """jit_step on every layout and both axis types, every optimizer."""
  out = {}
  params, batch = problem()
  for name, opt in optimizers().items():
    out.update(flat(f"ref/{name}", unsharded_run(opt, params, batch)))
  for kind, layout, name in RUNS:
    mesh = mesh_2x4(AxisType[kind])
    opt = optimizers()[name]
    p = par.shard(params, mesh, LAYOUTS[layout])
    s = par.init_sharded(opt, p, mesh)
    step = par.jit_step(mlp_loss, opt, mesh, axis_name="data", donate=True)
    sharded_batch = par.shard_batch(batch, mesh, "data")
    first = p
    for _ in range(STEPS):
      p, s, metrics = step(p, s, sharded_batch)
    tag = f"{kind}/{layout}/{name}"
    out.update(flat(f"run/{tag}", samtx.unperturb(p, s)))
    out.update(spec_strings(f"spec/{tag}", p))
    out.update(spec_strings(f"state_spec/{tag}", s))
    out.update({k.replace("state_spec/", "state_shape/"): np.array(v.shape)
                for k, v in flat(f"state_spec/{tag}", s).items()})
    out[f"donated/{tag}"] = np.array(
        all(x.is_deleted() for x in jax.tree.leaves(first)))
    out[f"loss/{tag}"] = np.asarray(metrics["loss"])
  return out


def compute_tensor_parallel():
  """shard_map_step with tensor-parallel blocks (norm_axis_name='model') on a
  2x4 ('data', 'model') mesh, global perturbation, float32 and float64."""
  out = {}
  for dtype in (jnp.float32, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      tag = jnp.dtype(dtype).name
      params, batch = problem(dtype)
      mesh = mesh_2x4()
      sharded = optimizers(axis_name="data", norm_axis_name="model")
      for name, opt in optimizers().items():
        out.update(flat(f"ref/{tag}/{name}", unsharded_run(opt, params, batch)))
        tp_opt = sharded[name]
        step = par.shard_map_step(tp_loss, tp_opt, mesh, axis_name="data",
                                  param_specs=TP, m_sharpness=False)
        p = par.shard(params, mesh, TP)
        s = par.init_sharded(tp_opt, p, mesh)
        batch_on_mesh = par.shard_batch(batch, mesh, "data")
        try:
          for _ in range(STEPS):
            p, s, _ = step(p, s, batch_on_mesh)
        except ValueError as err:  # reported by the test of this optimizer
          out[f"error/{tag}/{name}"] = np.array(str(err)[:1500])
          continue
        out.update(flat(f"run/{tag}/{name}", samtx.unperturb(p, s)))
        out.update(spec_strings(f"spec/{tag}/{name}", p))
      if dtype == jnp.float64:
        out.update(tensor_parallel_m_sharpness(params, batch, mesh))
      # Control: without norm_axis_name each device would perturb with its
      # own block's norm; the step refuses to run (replicated leaves would
      # drift apart) and names the fix.
      opt = samtx.sam(LR, RHO, axis_name="data")
      try:
        par.shard_map_step(tp_loss, opt, mesh, axis_name="data",
                           param_specs=TP)(
            par.shard(params, mesh, TP), opt.init(params),
            par.shard_batch(batch, mesh, "data"))
        out[f"control/{tag}"] = np.array("ran")
      except ValueError as err:
        out[f"control/{tag}"] = np.array(str(err)[:400])
  return out


def tensor_parallel_m_sharpness(params, batch, mesh):
  """TP blocks with per-data-shard perturbations vs jit_step's 2 groups on
  unsharded parameters (and, as a control, the global perturbation)."""
  out = {}
  replicated = {k: P() for k in TP}
  for name in ("sam", "lightsam_I", "lightsam_III", "looksam"):
    runs = {
        "tp": (par.shard_map_step, tp_loss, TP, dict(m_sharpness=True),
               optimizers(axis_name="data", norm_axis_name="model")[name]),
        "groups": (par.jit_step, mlp_loss, replicated,
                   dict(m_sharpness_groups=2),
                   optimizers(axis_name="data")[name]),
    }
    for tag, (builder, loss, specs, kwargs, opt) in runs.items():
      step = builder(loss, opt, mesh, axis_name="data", param_specs=specs,
                     **kwargs)
      p = par.shard(params, mesh, specs)
      s = par.init_sharded(opt, p, mesh)
      try:
        for _ in range(STEPS):
          p, s, _ = step(p, s, par.shard_batch(batch, mesh, "data"))
      except ValueError as err:
        out[f"error/m_sharpness/{name}"] = np.array(str(err)[:1500])
        break
      out.update(flat(f"m_sharpness/{tag}/{name}", p))
  return out


# ----------------------------------------------------------------------------
# model state, dropout keys and aux metrics through the parallel steps
# ----------------------------------------------------------------------------

KEEP = 0.7


def bn_loss(params, batch, *, model_state, rng):
  """A BatchNorm + dropout layer written out: batch statistics of *this*
  device's batch, a running mean as model state, an int counter."""
  x, y = batch
  hidden = x @ params["w"]
  mean, var = hidden.mean(0), hidden.var(0)
  normed = (hidden - mean) / jnp.sqrt(var + 1e-5) * params["g"]
  keep = jax.random.bernoulli(rng, KEEP, normed.shape)
  dropped = jnp.where(keep, normed / KEEP, 0.0)
  err = jnp.tanh(dropped) @ params["v"] - y
  new_state = {"mean": 0.8 * model_state["mean"] + 0.2 * mean,
               "count": model_state["count"] + 1}
  return jnp.mean(err ** 2), (new_state, {"mae": jnp.mean(jnp.abs(err))})


def bn_problem():
  rng = np.random.default_rng(7)
  params = {"w": rng.normal(size=(6, 8)), "g": 1 + rng.normal(size=8) / 5,
            "v": rng.normal(size=(8, 2)) / 3}
  x = rng.normal(size=(B, 6)) * np.repeat(rng.uniform(0.3, 3, (8, 1)), 4, 0)
  batch = (x, rng.normal(size=(B, 2)))
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  state = {"mean": jnp.zeros(8), "count": jnp.zeros((), jnp.int32)}
  return cast(params), cast(batch), state


def hand_sam_step(params, state, batch, key, shards, m_sharpness, fold):
  """SAM + SGD by hand on one device, looping over the batch shards."""
  size = B // shards  # device k holds the k-th contiguous slice
  parts = [jax.tree.map(lambda a: a[k * size:(k + 1) * size], batch)
           for k in range(shards)]
  keys = [jax.random.fold_in(key, k) if fold else key for k in range(shards)]
  clean = [jax.value_and_grad(bn_loss, has_aux=True)(
      params, part, model_state=state, rng=k) for part, k in zip(parts, keys)]
  mean = lambda trees: jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
  grads = [g for _, g in clean]
  if not m_sharpness:
    grads = [mean(grads)] * shards
  perturbed = []
  for g, part, k in zip(grads, parts, keys):
    norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
    point = jax.tree.map(lambda p, gi: p + RHO * gi / (norm + 1e-12), params, g)
    perturbed.append(jax.grad(lambda q: bn_loss(
        q, part, model_state=state, rng=k)[0])(point))
  new_params = jax.tree.map(lambda p, h: p - LR * h, params, mean(perturbed))
  new_state = {"mean": mean([aux[0]["mean"] for (_, aux), _ in clean]),
               "count": clean[0][0][1][0]["count"]}
  metrics = {"loss": mean([l for (l, _), _ in clean]),
             "mae": mean([aux[1]["mae"] for (_, aux), _ in clean])}
  return new_params, new_state, metrics


def compute_model_state():
  """pmap / shard_map / jit (global and groups) with model state and rng."""
  params, batch, state = bn_problem()
  root = jax.random.key(11)
  mesh = jax.make_mesh((8,), ("batch",))
  out = {}
  sam = lambda axis: samtx.sam(LR, RHO, axis_name=axis)
  builds = {
      "shard_map/m": (par.shard_map_step, sam("batch"), dict(mesh=mesh), 8, True),
      "shard_map/global": (par.shard_map_step, sam("batch"),
                           dict(mesh=mesh, m_sharpness=False), 8, False),
      "pmap/m": (par.pmap_step, sam("batch"), {}, 8, True),
      "jit/global": (par.jit_step, sam(None), dict(mesh=mesh), 1, False),
      "jit/groups": (par.jit_step, sam("batch"),
                     dict(mesh=mesh, m_sharpness_groups=4), 4, True),
  }
  for tag, (builder, opt, kwargs, shards, m_sharp) in builds.items():
    kwargs = dict(kwargs)
    mesh_arg = kwargs.pop("mesh", None)
    args = (bn_loss, opt) + ((mesh_arg,) if mesh_arg is not None else ())
    step = builder(*args, has_aux=True, has_model_state=True, **kwargs)
    if builder is par.pmap_step:
      place, read = par.pmap_replicate, par.unreplicate
    else:
      place, read = (lambda t: par.replicate(t, mesh)), (lambda t: t)
    p, s, ms = place(params), place(opt.init(params)), place(state)
    ref_p, ref_ms = params, state
    for t in range(2):
      key = jax.random.fold_in(root, t)
      p, s, ms, metrics = step(p, s, batch, model_state=ms, rng=key)
      ref_p, ref_ms, ref_metrics = hand_sam_step(
          ref_p, ref_ms, batch, key, shards, m_sharp, fold=shards > 1)
    out.update(flat(f"run/{tag}", {"params": read(p), "state": read(ms),
                                   "metrics": metrics}))
    out.update(flat(f"ref/{tag}", {"params": ref_p, "state": ref_ms,
                                   "metrics": ref_metrics}))
    if builder is not par.pmap_step:
      # Replicated model state: every device holds the same statistics.
      shards_of = [np.asarray(x.data) for x in ms["mean"].addressable_shards]
      out[f"spread/{tag}"] = np.max(np.ptp(np.stack(shards_of), axis=0))
  # Control: without per-device keys (every device the same dropout mask)
  # the result differs, so the checks above see the folding.
  wrong, *_ = hand_sam_step(params, state, batch, root, 8, True, fold=False)
  right, *_ = hand_sam_step(params, state, batch, root, 8, True, fold=True)
  out["fold_gap"] = max(float(jnp.max(jnp.abs(a - b)))
                        for a, b in zip(jax.tree.leaves(wrong),
                                        jax.tree.leaves(right)))
  return out


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jit_layouts():
  return fresh_process.run("tests.test_sharded", "compute_jit_layouts")


def _leaves_close(results, got, want, **tol):
  keys = sorted(k[len(want) + 1:] for k in results if k.startswith(want + "/"))
  assert keys
  for key in keys:
    np.testing.assert_allclose(results[f"{got}/{key}"], results[f"{want}/{key}"],
                               err_msg=f"{got}/{key}", **tol)


@pytest.mark.parametrize("kind,layout,name", RUNS)
def test_jit_step_sharded_params_equal_unsharded_run(jit_layouts, kind, layout,
                                                     name):
  """FSDP / FSDP+TP / replicated params under jit_step (Explicit and Auto
  meshes) equal the unsharded single-device run, to float32 rounding."""
  tag = f"{kind}/{layout}/{name}"
  # LightSAM-II's sign-like first ascent step amplifies reduction-order
  # rounding (docs/guides/sharding.md); three steps stay within 1e-5.
  _leaves_close(jit_layouts, f"run/{tag}", f"ref/{name}", rtol=1e-5,
                atol=1e-5 if name == "lightsam_II" else 1e-6)


def normalized(spec_text) -> P:
  """A spec string as a ``PartitionSpec`` without trailing ``None``s."""
  entries = list(eval(str(spec_text), {"P": P, "PartitionSpec": P}))
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


@pytest.mark.parametrize("kind,layout", sorted({run[:2] for run in RUNS}))
def test_jit_step_keeps_param_and_state_shardings(jit_layouts, kind, layout):
  """Outputs are pinned to the input layout (no gather to one device, no
  silent replication); every parameter-shaped state leaf has its
  parameter's sharding (the four parameter shapes differ, so the shape
  names the parameter); donation consumed the inputs."""
  params, _ = problem()
  spec_of_shape = {params[k].shape: normalized(v)
                   for k, v in LAYOUTS[layout].items()}
  names = [n for k, lay, n in RUNS if (k, lay) == (kind, layout)]
  assert names
  for name in names:
    tag = f"{kind}/{layout}/{name}"
    for leaf, spec in LAYOUTS[layout].items():
      assert normalized(jit_layouts[f"spec/{tag}/['{leaf}']"]) == normalized(
          spec), (tag, leaf)
    state_keys = [k for k in jit_layouts if k.startswith(f"state_spec/{tag}/")]
    assert state_keys
    sharded = 0
    for key in state_keys:
      shape = jit_layouts[key.replace("state_spec/", "state_shape/")]
      want = spec_of_shape.get(tuple(shape), P())
      assert normalized(jit_layouts[key]) == want, (key, tuple(shape))
      sharded += want != P()
    has_param_state = name not in ("asam", "lightsam_I", "gsam")
    assert (sharded > 0) == (layout != "replicated" and has_param_state), tag
    assert bool(jit_layouts[f"donated/{tag}"])


@pytest.fixture(scope="module")
def model_state_runs():
  return fresh_process.run("tests.test_sharded", "compute_model_state")


@pytest.mark.parametrize("tag", ["shard_map/m", "shard_map/global", "pmap/m",
                                 "jit/global", "jit/groups"])
def test_model_state_rng_and_aux_through_parallel_steps(model_state_runs, tag):
  """Params, averaged model state (int leaves untouched) and averaged aux
  metrics equal a hand-written per-shard SAM step with per-device keys."""
  _leaves_close(model_state_runs, f"run/{tag}", f"ref/{tag}", rtol=2e-5,
                atol=2e-6)
  if not tag.startswith("pmap"):
    assert model_state_runs[f"spread/{tag}"] == 0.0
  assert model_state_runs["fold_gap"] > 1e-3


@pytest.fixture(scope="module")
def tensor_parallel():
  return fresh_process.run("tests.test_sharded", "compute_tensor_parallel")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_parallel_shard_map_equals_unsharded_run(tensor_parallel, name,
                                                        dtype):
  """Parameter blocks inside shard_map (column/row-parallel MLP over
  'model', batch over 'data') with norm_axis_name='model' give the
  unsharded single-device numbers; the params keep their TP layout."""
  error = tensor_parallel.get(f"error/{dtype}/{name}")
  assert error is None, str(error)
  tol = ({"rtol": 1e-9, "atol": 1e-9} if dtype == "float64"
         else {"rtol": 1e-5, "atol": 1e-5 if name == "lightsam_II" else 1e-6})
  _leaves_close(tensor_parallel, f"run/{dtype}/{name}", f"ref/{dtype}/{name}",
                **tol)
  for leaf, spec in TP.items():
    assert normalized(tensor_parallel[f"spec/{dtype}/{name}/['{leaf}']"]) == (
        normalized(spec))
  assert "norm_axis_name" in str(tensor_parallel[f"control/{dtype}"])


@pytest.mark.parametrize("name", ["sam", "lightsam_I", "lightsam_III",
                                  "looksam"])
def test_tensor_parallel_with_m_sharpness_equals_jit_groups(tensor_parallel,
                                                           name):
  """TP blocks inside shard_map with per-data-shard perturbations equal
  jit_step with 2 perturbation groups on unsharded parameters (float64), and
  differ from the global-perturbation run (the check sees m-sharpness)."""
  error = tensor_parallel.get(f"error/m_sharpness/{name}")
  assert error is None, str(error)
  _leaves_close(tensor_parallel, f"m_sharpness/tp/{name}",
                f"m_sharpness/groups/{name}", rtol=1e-9, atol=1e-12)
  gap = max(np.max(np.abs(tensor_parallel[f"m_sharpness/tp/{name}/['{k}']"]
                          - tensor_parallel[f"ref/float64/{name}/['{k}']"]))
            for k in TP)
  assert gap > 1e-4



@pytest.mark.parametrize("wrapper", ["samtx", "optax", "rapp"])
def test_state_specs_of_lookahead_follow_the_fast_params(wrapper):
  """Lookahead's state holds its fast optimizer's state, shaped like
  params.fast: its parameter-shaped leaves take the fast params' specs
  (this raised a pytree structure error)."""
  params = optax.LookaheadParams.init_synced(
      {"w": jnp.ones((8, 4)), "b": jnp.ones(4)})
  fast = {"w": P("data", None), "b": P()}
  specs = optax.LookaheadParams(fast=fast, slow=fast)
  if wrapper == "samtx":
    opt = samtx.lookahead(samtx.adasam(0.01, RHO), sync_period=2,
                          slow_step_size=0.3)
    buffers = 3  # AMSGrad's mu, nu, nu_max
  elif wrapper == "rapp":  # the anchored Lookahead keeps the same state
    opt = samtx.rapp(samtx.adasam(0.01, RHO), sync_period=2,
                     slow_step_size=0.3)
    buffers = 3
  else:
    opt = optax.lookahead(optax.adam(0.01), sync_period=2,
                          slow_step_size=0.3)
    buffers = 2  # Adam's mu, nu
  got = par.state_specs(opt, params, specs)
  assert jax.tree.structure(got, is_leaf=lambda x: isinstance(x, P)) == (
      jax.tree.structure(jax.eval_shape(opt.init, params)))
  leaves = jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P))
  assert sorted(map(str, leaves)).count(str(P("data", None))) == buffers
  assert all(s in (P(), P("data", None)) for s in leaves)


def test_rapp_state_is_initialised_sharded_like_the_fast_params():
  """``init_sharded`` on RAPP (anchored Lookahead): the fast optimizer's
  moments land with the fast params' sharding, scalars replicated."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  params = optax.LookaheadParams.init_synced(
      {"w": jnp.ones((8, 4)), "b": jnp.ones(4)})
  fast = {"w": P("data", None), "b": P()}
  opt = samtx.rapp(samtx.adasam(0.01, RHO), sync_period=2, slow_step_size=0.3)
  state = par.init_sharded(opt, params, mesh,
                           optax.LookaheadParams(fast=fast, slow=fast))
  shaped = [x for x in jax.tree.leaves(state) if x.shape == (8, 4)]
  assert len(shaped) == 3
  assert all(x.sharding.spec == P("data", None) for x in shaped)
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(state)
             if x.ndim == 0)
