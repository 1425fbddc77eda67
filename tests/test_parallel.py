"""Data-parallel steps (samtx.parallel) on 8 virtual CPU devices.

The references are written independently of samtx: a least-squares loss with
a hand-written NumPy gradient, SAM / AdaSAM / LightSAM-I maths in float64
NumPy, applied per shard (m-sharpness) or on the whole batch (global
perturbation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

import samtx
from samtx import parallel as par

N_DEV = 8
BATCH = 32
DIM = 5
STEPS = 3
LR, RHO = 0.05, 0.2
B1, B2, EPS = 0.9, 0.999, 1e-8
LOOKSAM_K, LOOKSAM_ALPHA = 2, 0.7


# ----------------------------------------------------------------------------
# problem: least squares, loss = mean((X w + b - y)^2)
# ----------------------------------------------------------------------------


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  # Very different shards so per-shard perturbations differ clearly.
  x *= np.repeat(rng.uniform(0.3, 3.0, size=(N_DEV, 1)), BATCH // N_DEV, 0)
  y = rng.normal(size=(BATCH,)).astype(np.float32)
  params = {"b": np.float32(0.3),
            "w": rng.normal(size=(DIM,)).astype(np.float32)}
  return (x, y), params


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def np_loss(p, x, y):
  return float(np.mean((x @ p[1] + p[0] - y) ** 2))


def np_grad(p, x, y):
  """Hand-written gradient; params as a flat list [b, w] in float64."""
  r = x @ p[1] + p[0] - y
  return [2.0 * np.mean(r), 2.0 * x.T @ r / len(y)]


def np_params(tree):
  return [np.float64(tree["b"]), np.asarray(tree["w"], np.float64)]


def norm(tree):
  return np.sqrt(sum(np.sum(np.square(t)) for t in tree))


def shards(batch, n):
  x, y = (np.asarray(a, np.float64) for a in batch)
  return list(zip(np.split(x, n), np.split(y, n)))


# ----------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------


def sam_gradient(p, parts, m_sharpness):
  """The averaged perturbed gradient: mean_k grad L_k(p + e_k)."""
  if m_sharpness:
    grads = [np_grad(p, *part) for part in parts]
  else:
    x = np.concatenate([a for a, _ in parts])
    y = np.concatenate([b for _, b in parts])
    g = np_grad(p, x, y)
    grads = [g] * len(parts)
  out = [0.0 * q for q in p]
  for g, part in zip(grads, parts):
    scale = RHO / (norm(g) + 1e-12)
    h = np_grad([q + scale * gi for q, gi in zip(p, g)], *part)
    out = [o + hi / len(parts) for o, hi in zip(out, h)]
  return out


def reference(kind, params, batch, n_shards, m_sharpness, steps=STEPS):
  """Float64 NumPy run of SAM / AdaSAM / LightSAM-I / MSAM / LookSAM."""
  p = np_params(params)
  parts = shards(batch, n_shards)
  m = [0.0 * q for q in p]
  v = [0.0 * q for q in p]
  vhat = [0.0 * q + EPS ** 2 for q in p]
  u_acc = v_acc = EPS ** 2
  rho_now = 0.0
  g_v, g_v_norm = None, 0.0
  for t in range(steps):
    if kind == "sam":
      h = sam_gradient(p, parts, m_sharpness)
      p = [q - LR * hi for q, hi in zip(p, h)]
    elif kind == "adasam":
      h = sam_gradient(p, parts, m_sharpness)
      m = [B1 * a + (1 - B1) * hi for a, hi in zip(m, h)]
      v = [B2 * a + (1 - B2) * hi ** 2 for a, hi in zip(v, h)]
      vhat = [np.maximum(a, b) for a, b in zip(vhat, v)]
      p = [q - LR * a / np.sqrt(b) for q, a, b in zip(p, m, vhat)]
    elif kind == "lightsam":
      # LightSAM-I; in m-sharpness mode device k perturbs with its own
      # gradient and the shared accumulator u_prev + ||s_k||^2, and the
      # accumulator then advances by the mean of the ||s_k||^2.
      if m_sharpness:
        grads = [np_grad(p, *part) for part in parts]
      else:
        grads = [np_grad(p, *_concatenate_parts(parts))] * len(parts)
      h = [0.0 * q for q in p]
      for g, part in zip(grads, parts):
        u_k = u_acc + norm(g) ** 2
        e = [RHO * gi / np.sqrt(u_k) for gi in g]
        hk = np_grad([q + ei for q, ei in zip(p, e)], *part)
        h = [a + b / len(parts) for a, b in zip(h, hk)]
      u_acc += np.mean([norm(g) ** 2 for g in grads])
      v_acc += norm(h) ** 2
      p = [q - LR * hi / np.sqrt(v_acc) for q, hi in zip(p, h)]
    elif kind == "msam":
      # Held weights x~ = x - rho v/||v||; gradient taken at x~.
      x_all = np.concatenate([a for a, _ in parts])
      y_all = np.concatenate([b for _, b in parts])
      g = np_grad(p, x_all, y_all)
      vn = norm(m) + 1e-12
      p = [q + rho_now * a / vn for q, a in zip(p, m)]
      m = [0.9 * a + gi for a, gi in zip(m, g)]
      p = [q - LR * a for q, a in zip(p, m)]
      rho_now = RHO
      vn = norm(m) + 1e-12
      p = [q - rho_now * a / vn for q, a in zip(p, m)]
    elif kind == "looksam":
      # Device k takes its own g_k (m-sharpness) or the global g; on
      # second-pass steps the stored direction is the devices' mean g_v and
      # its norm that mean's norm; outputs are averaged over the devices.
      if m_sharpness:
        grads = [np_grad(p, *part) for part in parts]
      else:
        grads = [np_grad(p, *_concatenate_parts(parts))] * len(parts)
      outs = []
      if t % LOOKSAM_K == 0:
        directions = []
        for g, part in zip(grads, parts):
          scale = RHO / (norm(g) + 1e-12)
          h = np_grad([q + scale * gi for q, gi in zip(p, g)], *part)
          g_norm, h_norm = norm(g), norm(h)
          cos = sum(np.sum(a * b) for a, b in zip(g, h)) / (
              g_norm * h_norm + 1e-12)
          along = h_norm * cos / (g_norm + 1e-12)
          directions.append([hi - along * gi for hi, gi in zip(h, g)])
          outs.append(h)
        g_v = [sum(d) / len(parts) for d in zip(*directions)]
        g_v_norm = norm(g_v)
      else:
        for g in grads:
          c = LOOKSAM_ALPHA * norm(g) / (g_v_norm + 1e-12)
          outs.append([gi + c * vi for gi, vi in zip(g, g_v)])
      out = [sum(o) / len(parts) for o in zip(*outs)]
      p = [q - LR * o for q, o in zip(p, out)]
    else:
      raise AssertionError(kind)
  return p


def _concatenate_parts(parts):
  return (np.concatenate([a for a, _ in parts]),
          np.concatenate([b for _, b in parts]))


def optimizer(kind, axis_name):
  if kind == "sam":
    return samtx.sam(LR, RHO, axis_name=axis_name)
  if kind == "adasam":
    return samtx.adasam(LR, RHO, b1=B1, b2=B2, eps=EPS, axis_name=axis_name)
  if kind == "lightsam":
    return samtx.lightsam(LR, RHO, variant="adagrad_norm", eps=EPS,
                          axis_name=axis_name)
  if kind == "msam":
    return samtx.msam(LR, RHO, momentum=0.9)
  if kind == "looksam":
    return samtx.looksam(LR, RHO, k=LOOKSAM_K, alpha=LOOKSAM_ALPHA,
                         axis_name=axis_name)
  raise AssertionError(kind)


# ----------------------------------------------------------------------------
# running the three paths
# ----------------------------------------------------------------------------


def explicit_mesh(n=N_DEV):
  return jax.make_mesh((n,), ("batch",), devices=jax.devices()[:n])


def auto_mesh(n=N_DEV):
  return Mesh(np.array(jax.devices()[:n]), ("batch",),
              axis_types=(AxisType.Auto,))


def run_pmap(kind, params, batch, m_sharpness, steps=STEPS, donate=False):
  opt = optimizer(kind, "batch")
  step = par.pmap_step(loss_fn, opt, m_sharpness=m_sharpness, donate=donate)
  p = par.pmap_replicate(params)
  s = par.pmap_replicate(opt.init(params))
  for _ in range(steps):
    p, s, metrics = step(p, s, batch)
  return par.unreplicate(p), metrics


def _run_on_mesh(step, opt, params, batch, mesh, steps):
  """Replicates params and state, shards the batch, runs ``steps`` steps."""
  p = par.replicate(params, mesh)
  s = par.replicate(opt.init(params), mesh)
  sharded = par.shard_batch(batch, mesh)
  for _ in range(steps):
    p, s, metrics = step(p, s, sharded)
  return p, metrics


def run_shard_map(kind, params, batch, m_sharpness, mesh, steps=STEPS):
  opt = optimizer(kind, "batch")
  step = par.shard_map_step(loss_fn, opt, mesh, m_sharpness=m_sharpness)
  return _run_on_mesh(step, opt, params, batch, mesh, steps)


def run_jit(kind, params, batch, groups, mesh, steps=STEPS):
  opt = optimizer(kind, None if groups is None else "batch")
  step = par.jit_step(loss_fn, opt, mesh, m_sharpness_groups=groups)
  return _run_on_mesh(step, opt, params, batch, mesh, steps)


def assert_close(tree, ref, rtol=2e-5, atol=2e-6):
  got = np_params(jax.tree.map(np.asarray, tree))
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


KINDS = ["sam", "adasam", "lightsam", "msam", "looksam"]


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


def test_eight_devices_are_visible():
  assert jax.device_count() == N_DEV


@pytest.mark.parametrize("kind", KINDS)
def test_m_sharpness_three_paths_match_per_shard_reference(kind):
  """pmap, shard_map (Explicit mesh) and jit+vmap groups (Auto mesh) all
  equal the explicit per-shard NumPy reference (per-device perturbations
  survive)."""
  batch, params = make_data()
  ref = reference(kind, params, batch, N_DEV, m_sharpness=True)
  p_pmap, m_pmap = run_pmap(kind, params, batch, True)
  p_smap, m_smap = run_shard_map(kind, params, batch, True, explicit_mesh())
  p_jit, m_jit = run_jit(kind, params, batch, N_DEV, auto_mesh())
  for got in (p_pmap, p_smap, p_jit):
    assert_close(got, ref)
  # Every path reports the clean loss of the global batch (last step).
  for metrics in (m_smap, m_jit):
    np.testing.assert_allclose(metrics["loss"], m_pmap["loss"], rtol=1e-5)


@pytest.mark.parametrize("kind", ["sam", "adasam", "lightsam", "looksam"])
def test_m_sharpness_differs_from_global_perturbation(kind):
  """Control: the per-shard and global references really differ here, so the
  test above would catch per-device gradients being summed or averaged."""
  batch, params = make_data()
  local = reference(kind, params, batch, N_DEV, m_sharpness=True)
  glob = reference(kind, params, batch, N_DEV, m_sharpness=False)
  gap = max(np.max(np.abs(a - b)) for a, b in zip(local, glob))
  # 1e-3 is 50x the tolerance the samtx runs are held to above
  assert gap > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_global_perturbation_equals_single_device_whole_batch(kind):
  """Global mode: shard_map_step equals the NumPy whole-batch run and a plain
  single-device jax.jit loop over the whole batch. (Every alias through all
  three paths against that single-device loop: test_parallel_aliases.py.)"""
  batch, params = make_data(1)
  ref = reference(kind, params, batch, 1, m_sharpness=False)
  # single device, plain JAX, no samtx.parallel
  opt = optimizer(kind, None)
  grad_fn = jax.grad(lambda p: loss_fn(p, batch))

  @jax.jit
  def single(p, s):
    updates, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), s

  p1 = jax.tree.map(jnp.asarray, params)
  s1 = opt.init(p1)
  for _ in range(STEPS):
    p1, s1 = single(p1, s1)
  assert_close(p1, ref)
  p_smap, _ = run_shard_map(kind, params, batch, False, explicit_mesh())
  assert_close(p_smap, ref)
  for a, b in zip(np_params(jax.tree.map(np.asarray, p_smap)),
                  np_params(jax.tree.map(np.asarray, p1))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_reported_loss_is_global_batch_mean():
  batch, params = make_data(2)
  x, y = (np.asarray(a, np.float64) for a in batch)
  _, metrics = run_shard_map("adasam", params, batch, True, explicit_mesh(),
                             steps=1)
  np.testing.assert_allclose(metrics["loss"], np_loss(np_params(params), x, y),
                             rtol=1e-5)
  _, metrics = run_pmap("sam", params, batch, True, steps=1)
  np.testing.assert_allclose(metrics["loss"], np_loss(np_params(params), x, y),
                             rtol=1e-5)


def test_global_mode_is_device_count_invariant():
  """The same global batch on 1, 2, 4 devices matches the 8-device run."""
  batch, params = make_data(3)
  p8, _ = run_jit("adasam", params, batch, None, explicit_mesh(8))
  runs = [run_jit("adasam", params, batch, None, explicit_mesh(n))[0]
          for n in (1, 2, 4)]
  runs.append(run_shard_map("adasam", params, batch, False,
                            explicit_mesh(2))[0])
  for got in runs:
    for a, b in zip(np_params(jax.tree.map(np.asarray, got)),
                    np_params(jax.tree.map(np.asarray, p8))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_jit_groups_equal_pmap_on_fewer_devices():
  """jit_step with G=4 groups on 8 devices equals pmap m-sharpness with 4
  shards (m = 8 examples), i.e. the NumPy 4-shard reference."""
  batch, params = make_data(4)
  ref = reference("sam", params, batch, 4, m_sharpness=True)
  p_jit, _ = run_jit("sam", params, batch, 4, explicit_mesh())
  assert_close(p_jit, ref)
  p_smap, _ = run_shard_map("sam", params, batch, True, auto_mesh(4))
  assert_close(p_smap, ref)


def test_state_stays_replicated():
  batch, params = make_data()
  mesh = explicit_mesh()
  opt = optimizer("lightsam", "batch")
  step = par.shard_map_step(loss_fn, opt, mesh)
  p, s, _ = step(par.replicate(params, mesh), par.replicate(opt.init(params), mesh),
                 par.shard_batch(batch, mesh))
  for leaf in jax.tree.leaves((p, s)):
    assert leaf.sharding.is_fully_replicated
  opt2 = optimizer("adasam", None)
  step2 = par.jit_step(loss_fn, opt2, mesh)
  p, s, _ = step2(par.replicate(params, mesh),
                  par.replicate(opt2.init(params), mesh),
                  par.shard_batch(batch, mesh))
  for leaf in jax.tree.leaves((p, s)):
    assert leaf.sharding.is_fully_replicated


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------


def bad_batch():
  batch, params = make_data()
  return (batch[0][:30], batch[1][:30]), params


def test_indivisible_batch_pmap():
  batch, params = bad_batch()
  opt = optimizer("sam", "batch")
  step = par.pmap_step(loss_fn, opt)
  with pytest.raises(ValueError, match=r"batch size 30 .*device count 8"):
    step(par.pmap_replicate(params), par.pmap_replicate(opt.init(params)),
         batch)


@pytest.mark.parametrize("builder", ["shard_map", "jit"])
def test_indivisible_batch_mesh_steps(builder):
  batch, params = bad_batch()
  mesh = explicit_mesh()
  if builder == "shard_map":
    opt = optimizer("adasam", "batch")
    step = par.shard_map_step(loss_fn, opt, mesh)
  else:
    opt = optimizer("adasam", None)
    step = par.jit_step(loss_fn, opt, mesh)
  with pytest.raises(ValueError, match=r"batch size 30 .*device count 8"):
    step(par.replicate(params, mesh), par.replicate(opt.init(params), mesh),
         batch)
  with pytest.raises(ValueError, match=r"batch size 30 .*device count 8"):
    par.shard_batch(batch, mesh)


def test_indivisible_groups():
  batch, params = make_data()  # 32 examples, 8 devices, 3 groups
  mesh = explicit_mesh()
  opt = optimizer("sam", "batch")
  step = par.jit_step(loss_fn, opt, mesh, m_sharpness_groups=3)
  with pytest.raises(ValueError, match=r"batch size 32 .*m_sharpness_groups 3"):
    step(par.replicate(params, mesh), par.replicate(opt.init(params), mesh),
         par.shard_batch(batch, mesh))


@pytest.mark.parametrize("axis", [None, "other"])
def test_axis_name_mismatch_is_detected(axis):
  batch, params = make_data()
  mesh = explicit_mesh()
  opt = samtx.sam(LR, RHO, axis_name=axis)
  for step, rep in (
      (par.pmap_step(loss_fn, opt), par.pmap_replicate),
      (par.shard_map_step(loss_fn, opt, mesh),
       lambda t: par.replicate(t, mesh)),
      (par.jit_step(loss_fn, opt, mesh, m_sharpness_groups=8),
       lambda t: par.replicate(t, mesh))):
    with pytest.raises(ValueError, match="axis_name='batch'"):
      step(rep(params), rep(opt.init(params)), batch)


def test_jit_global_rejects_axis_name():
  batch, params = make_data()
  mesh = explicit_mesh()
  opt = samtx.adasam(LR, RHO, axis_name="batch")
  step = par.jit_step(loss_fn, opt, mesh)
  with pytest.raises(ValueError, match="axis_name=None"):
    step(par.replicate(params, mesh), par.replicate(opt.init(params), mesh),
         batch)


def test_bad_arguments():
  mesh = explicit_mesh()
  opt = samtx.sam(LR)
  with pytest.raises(TypeError, match="loss_fn"):
    par.pmap_step(3, opt)
  with pytest.raises(TypeError, match="optimizer"):
    par.shard_map_step(loss_fn, "sgd", mesh)
  with pytest.raises(TypeError, match="mesh"):
    par.jit_step(loss_fn, opt, None)
  with pytest.raises(ValueError, match="axis_name 'data'"):
    par.shard_map_step(loss_fn, opt, mesh, axis_name="data")
  with pytest.raises(ValueError, match="m_sharpness_groups"):
    par.jit_step(loss_fn, opt, mesh, m_sharpness_groups=0)
  with pytest.raises(TypeError, match="m_sharpness_groups"):
    par.jit_step(loss_fn, opt, mesh, m_sharpness_groups=2.0)
  with pytest.raises(ValueError, match="leading"):
    par.shard_batch((np.zeros((8, 2)), np.zeros((16,))), mesh)


# ----------------------------------------------------------------------------
# donation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("builder", ["pmap", "shard_map", "jit"])
def test_donate_consumes_params_and_state(builder):
  batch, params = make_data()
  mesh = explicit_mesh()
  if builder == "pmap":
    opt = optimizer("adasam", "batch")
    step = par.pmap_step(loss_fn, opt, donate=True)
    p, s = par.pmap_replicate(params), par.pmap_replicate(opt.init(params))
  elif builder == "shard_map":
    opt = optimizer("adasam", "batch")
    step = par.shard_map_step(loss_fn, opt, mesh, donate=True)
    p, s = par.replicate(params, mesh), par.replicate(opt.init(params), mesh)
  else:
    opt = optimizer("adasam", None)
    step = par.jit_step(loss_fn, opt, mesh, donate=True)
    p, s = par.replicate(params, mesh), par.replicate(opt.init(params), mesh)
  new_p, _, _ = step(p, s, batch)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(p))
  float_state = [x for x in jax.tree.leaves(s)
                 if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 1 +
                 (builder == "pmap")]
  assert float_state and all(x.is_deleted() for x in float_state)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_p))


def test_model_state_aux_and_param_specs_arguments_are_checked():
  batch, params = make_data()
  mesh = explicit_mesh()
  opt = optimizer("sam", "batch")
  p, s = par.replicate(params, mesh), par.replicate(opt.init(params), mesh)
  with_state = par.shard_map_step(loss_fn, opt, mesh, has_model_state=True)
  with pytest.raises(TypeError, match="pass model_state"):
    with_state(p, s, batch)
  with pytest.raises(TypeError, match="has_model_state=False"):
    par.shard_map_step(loss_fn, opt, mesh)(p, s, batch, model_state={})
  pair = lambda q, b: (loss_fn(q, b), {"mae": 0.0})
  with pytest.raises(TypeError, match="has_aux=True"):
    par.jit_step(pair, optimizer("sam", None), mesh)(p, s, batch)
  not_a_dict = lambda q, b: (loss_fn(q, b), 1.0)
  with pytest.raises(TypeError, match="dict of metrics"):
    par.pmap_step(not_a_dict, opt, has_aux=True)(
        par.pmap_replicate(params), par.pmap_replicate(opt.init(params)), batch)
  clash = lambda q, b: (loss_fn(q, b), {"loss": 0.0})
  with pytest.raises(ValueError, match="clash"):
    par.shard_map_step(clash, opt, mesh, has_aux=True)(p, s, batch)
  with pytest.raises(ValueError, match="param_specs"):
    par.shard_map_step(loss_fn, opt, mesh, param_specs={"w": P()})(p, s, batch)


def compute_pmap_step_five_leaf_arguments():
  """One pmap_step of Friendly-SAM whose arguments have exactly 5 leaves."""
  x = make_data()[0][0][:, :3]  # 8 very different shards of 4 rows
  opt = samtx.friendly_sam(LR, RHO, axis_name="batch")
  w = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  # w, count, perturbation_norm, momentum, batch: as many leaves as the
  # step's five arguments (model_state and rng are None).
  assert len(jax.tree.leaves((w, opt.init(w), x, None, None))) == 5
  step = par.pmap_step(lambda p, b: jnp.mean((b @ p - 1.0) ** 2), opt)
  p, _, _ = step(par.pmap_replicate(w), par.pmap_replicate(opt.init(w)), x)
  return {"w": par.unreplicate(p), "x": x, "w0": w}


def test_pmap_step_splits_batch_whatever_the_leaf_count():
  """Regression: jax.pmap's flat in_axes fast path gave every device the
  global batch when the arguments had exactly five leaves, so m-sharpness
  silently became a global perturbation."""
  from tests import fresh_process
  out = fresh_process.run("tests.test_parallel",
                          "compute_pmap_step_five_leaf_arguments")
  x, w = np.asarray(out["x"], np.float64), np.asarray(out["w0"], np.float64)
  grad = lambda v, xs: 2.0 * xs.T @ (xs @ v - 1.0) / len(xs)

  def sam_grad(xs):  # Friendly-SAM's first step is SAM's (m = 0)
    g = grad(w, xs)
    return grad(w + RHO * g / np.linalg.norm(g), xs)

  local = w - LR * np.mean([sam_grad(s) for s in np.split(x, N_DEV)], 0)
  glob = w - LR * sam_grad(x)
  assert np.max(np.abs(local - glob)) > 1e-3  # the check is not vacuous
  np.testing.assert_allclose(out["w"], local, rtol=2e-5, atol=2e-6)


def _count_sums(jaxpr):
  """All-reduce sums in ``jaxpr`` (``psum``; ``psum_invariant`` is its name
  inside a vma-checked ``shard_map``)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ("psum", "psum_invariant")
    for sub in jax.core.jaxprs_in_params(eqn.params):
      count += _count_sums(sub)
  return count


def test_settle_averages_only_what_varies_under_shard_map():
  """Inside shard_map a state leaf typed replicated (LookSAM's stored
  direction, averaged by the optimizer itself) is not all-reduced again
  every step; a leaf of local statistics is. Under pmap nothing is typed
  and both are averaged."""
  from samtx.perturbations import PerturbationState
  mesh = explicit_mesh()
  replicated = jnp.arange(3.0)
  local = jnp.arange(3.0 * N_DEV).reshape(N_DEV, 3)

  def settle(rep, loc):
    state = PerturbationState(count=jnp.zeros([], jnp.int32),
                              perturbation_norm=jnp.zeros([]),
                              inner={"rep": rep, "loc": loc})
    out = par._average_perturbation_state(state, "batch")
    return out.inner["rep"], out.inner["loc"]

  smap = jax.jit(jax.shard_map(settle, mesh=mesh, in_specs=(P(), P("batch")),
                               out_specs=(P(), P())))
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh,
                                                                     spec))
  args = put(replicated, P()), put(local, P("batch"))
  rep, loc = smap(*args)
  np.testing.assert_array_equal(rep, replicated)
  np.testing.assert_allclose(loc, local.mean(0, keepdims=True))
  jaxpr = jax.make_jaxpr(smap)(*args).jaxpr
  # the local leaf only (the zero perturbation norm is replicated too)
  assert _count_sums(jaxpr) == 1

  pmapped = jax.pmap(settle, axis_name="batch", in_axes=(None, 0))
  rep, loc = pmapped(replicated, local)
  np.testing.assert_array_equal(rep, np.broadcast_to(replicated, (N_DEV, 3)))
  np.testing.assert_allclose(loc, np.broadcast_to(local.mean(0), (N_DEV, 3)))
  pmap_jaxpr = jax.make_jaxpr(pmapped)(replicated, local).jaxpr
  assert _count_sums(pmap_jaxpr) == 3


def _summed_elements_outside_loops(jaxpr):
  """Elements all-reduced by ``jaxpr`` outside ``while`` bodies."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("psum", "psum_invariant"):
      total += sum(int(np.prod(v.aval.shape)) for v in eqn.invars)
    if eqn.primitive.name == "while":
      continue
    for sub in jax.core.jaxprs_in_params(eqn.params):
      total += _summed_elements_outside_loops(sub)
  return total


def test_looksam_reusing_steps_all_reduce_only_the_update_under_shard_map():
  """m-sharpness under shard_map_step: the every-step collectives carry the
  update and the loss, not LookSAM's stored direction (averaged inside its
  loop, on second-pass steps only)."""
  batch, params = make_data()
  mesh = explicit_mesh()
  size = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  results = {}
  for kind in ("sam", "looksam"):
    opt = optimizer(kind, "batch")
    step = par.shard_map_step(loss_fn, opt, mesh, m_sharpness=True)
    args = (par.replicate(params, mesh), par.replicate(opt.init(params), mesh),
            par.shard_batch(batch, mesh))
    results[kind] = _summed_elements_outside_loops(
        jax.make_jaxpr(step)(*args).jaxpr)
  # SAM all-reduces its update (size) and a few scalars; so must LookSAM.
  assert size <= results["sam"] < 2 * size
  assert results["looksam"] <= results["sam"]


def test_looksam_state_is_replicated_under_pmap_with_a_global_perturbation():
  batch, params = make_data()
  opt = optimizer("looksam", "batch")
  step = par.pmap_step(loss_fn, opt, m_sharpness=False)
  p, s = par.pmap_replicate(params), par.pmap_replicate(opt.init(params))
  for _ in range(3):
    p, s, _ = step(p, s, batch)
  for leaf in jax.tree.leaves(s):
    leaf = np.asarray(leaf)
    for d in range(1, N_DEV):
      np.testing.assert_array_equal(leaf[d], leaf[0])


def test_integer_and_bool_aux_metrics_are_averaged_over_devices():
  """Each device counts its own shard; the metric is the devices' mean (as a
  float), not device 0's count."""
  batch, params = make_data(6)
  x, y = batch
  shard_x, shard_y = np.split(x, N_DEV), np.split(y, N_DEV)
  want = {"positives": np.mean([np.sum(s > 0) for s in shard_y]),
          "any_large": np.mean([np.any(np.abs(s) > 4.0) for s in shard_x])}
  firsts = {"positives": np.sum(shard_y[0] > 0),
            "any_large": np.any(np.abs(shard_x[0]) > 4.0)}
  # not vacuous: the mean differs from device 0's value
  assert all(abs(want[k] - firsts[k]) > 0.1 for k in want)

  def with_counts(p, b):
    xs, ys = b
    return loss_fn(p, b), {"positives": jnp.sum(ys > 0),
                           "any_large": jnp.any(jnp.abs(xs) > 4.0)}

  mesh = explicit_mesh()
  opt = optimizer("sam", "batch")
  runs = {
      "pmap": (par.pmap_step(with_counts, opt, has_aux=True),
               par.pmap_replicate, batch),
      "shard_map": (par.shard_map_step(with_counts, opt, mesh, has_aux=True),
                    lambda t: par.replicate(t, mesh),
                    par.shard_batch(batch, mesh)),
      "jit_groups": (par.jit_step(with_counts, opt, mesh, has_aux=True,
                                  m_sharpness_groups=N_DEV),
                     lambda t: par.replicate(t, mesh),
                     par.shard_batch(batch, mesh))}
  for name, (step, place, b) in runs.items():
    _, _, metrics = step(place(params), place(opt.init(params)), b)
    for key, value in want.items():
      assert jnp.issubdtype(metrics[key].dtype, jnp.floating), (name, key)
      np.testing.assert_allclose(metrics[key], value, rtol=1e-6,
                                 err_msg=f"{name}: {key}")
