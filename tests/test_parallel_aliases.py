"""Every alias of ``tests/optimizers.py::CASES`` through every data-parallel path.

For each alias, on 8 virtual CPU devices, a tanh MLP in float64 on a global
batch of 32 whose 8 shards differ strongly:

* **global perturbation**: ``pmap_step`` and ``shard_map_step`` with
  ``m_sharpness=False`` and ``jit_step`` without groups must equal a plain
  single-device ``jax.jit`` loop over the whole batch (the optimizer built
  with ``axis_name=None``). A rule that is nonlinear in the perturbed
  gradient (GSAM's cosine and norms) only passes if it is applied once, to
  the global gradients.
* **m-sharpness** (two-pass aliases): ``pmap_step`` and ``shard_map_step``
  with ``m_sharpness=True`` and ``jit_step(m_sharpness_groups=8)`` must equal
  a single-device ``jax.vmap`` over the 8 shards with the data axis bound
  (each shard perturbs along its own gradient, the optimizer averages over
  the axis), the perturbation state's float leaves averaged after each step
  as documented.

The aliases run five to a fresh process (``tests/fresh_process.py``):
every path is one compiled step called ``STEPS`` times. The list is read
from ``CASES``, so an alias added there is covered here without an edit (a
two-pass alias must take ``axis_name``). With one global perturbation a step
must also all-reduce just the gradient and the perturbed gradient.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import fresh_process
from tests.optimizers import CASES

N_DEV, BATCH, DIN, HIDDEN, DOUT = 8, 32, 6, 5, 2
# Three steps: LookSAM with k=2 takes a second pass, reuses, takes one again.
STEPS = 3
# float64: reduction order then costs ~1e-16, so the tolerance can be tight
# (the analysis form of AdaSAM amplifies float32 reduction noise to 3e-4 in
# three steps on this problem, on every path including plain jit).
TOL = dict(rtol=1e-10, atol=1e-12)
PATHS = ("pmap", "shard_map", "jit")


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, DIN)).astype(np.float32)
  # Very different shards, so per-shard and global rules differ clearly.
  x *= np.repeat(rng.uniform(0.3, 3.0, size=(N_DEV, 1)),
                 BATCH // N_DEV, 0).astype(np.float32)
  y = rng.normal(size=(BATCH, DOUT)).astype(np.float32)
  params = {"w1": (0.5 * rng.normal(size=(DIN, HIDDEN))).astype(np.float32),
            "b1": np.full((HIDDEN,), 0.1, np.float32),
            "w2": (0.5 * rng.normal(size=(HIDDEN, DOUT))).astype(np.float32)}
  return params, (x, y)


def _loss(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] - y) ** 2)


def _takes_axis_name(case) -> bool:
  return "axis_name" in inspect.signature(case.factory).parameters


def _build(case, axis_name):
  """The alias; two-pass aliases get ``axis_name``, one-pass ones nothing."""
  if not case.two_pass:
    return case.make()
  assert _takes_axis_name(case), (
      "every two-pass alias takes axis_name (DESIGN.md): without it, it"
      " cannot average its perturbed gradients over a data axis")
  return case.make(axis_name=axis_name)


def _global_reference(case, params, batch):
  """Whole batch, one device, plain jax.jit: the parameters after each step."""
  opt = case.make()
  grad_fn = jax.grad(lambda p: _loss(p, batch))

  @jax.jit
  def step(p, s):
    updates, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), s

  p, s, out = params, opt.init(params), []
  for _ in range(STEPS):
    p, s = step(p, s)
    out.append(p)
  return out


def _m_sharpness_reference(case, params, batch):
  """One device: the 8 shards as a named ``jax.vmap`` axis "batch"."""
  from samtx import PerturbationState
  opt = _build(case, "batch")
  shards = jax.tree.map(lambda a: a.reshape((N_DEV, -1) + a.shape[1:]), batch)

  def member(p, s, shard):
    grad_fn = jax.grad(lambda q: _loss(q, shard))
    return opt.update(grad_fn(p), s, p, grad_fn=grad_fn)

  def settle(state):
    # Documented: the float leaves of each PerturbationState are averaged
    # over the devices; everything else is the same on every member.
    is_ps = lambda x: isinstance(x, PerturbationState)
    first = lambda t: jax.tree.map(lambda x: x[0], t)
    mean = lambda t: jax.tree.map(
        lambda x: x.mean(0) if jnp.issubdtype(x.dtype, jnp.inexact)
        else x[0], t)
    return jax.tree.map(lambda x: mean(x) if is_ps(x) else first(x), state,
                        is_leaf=is_ps)

  @jax.jit
  def step(p, s):
    updates, s = jax.vmap(member, in_axes=(None, None, 0),
                          axis_name="batch")(p, s, shards)
    return optax.apply_updates(p, jax.tree.map(lambda u: u[0], updates)), \
        settle(s)

  p, s, out = params, opt.init(params), []
  for _ in range(STEPS):
    p, s = step(p, s)
    out.append(p)
  return out


def _run_path(path, case, params, batch, m_sharpness):
  from samtx import parallel as par
  mesh = jax.make_mesh((N_DEV,), ("batch",))
  if path == "jit":
    opt = _build(case, "batch" if m_sharpness and case.two_pass else None)
    step = par.jit_step(_loss, opt, mesh,
                        m_sharpness_groups=N_DEV if m_sharpness else None)
  else:
    opt = _build(case, "batch")
    if path == "pmap":
      step = par.pmap_step(_loss, opt, m_sharpness=m_sharpness)
    else:
      step = par.shard_map_step(_loss, opt, mesh, m_sharpness=m_sharpness)
  if path == "pmap":
    p, s = par.pmap_replicate(params), par.pmap_replicate(opt.init(params))
    sharded = batch
  else:
    p, s = par.replicate(params, mesh), par.replicate(opt.init(params), mesh)
    sharded = par.shard_batch(batch, mesh)
  out = []
  for _ in range(STEPS):
    p, s, _ = step(p, s, sharded)
    out.append(par.unreplicate(p) if path == "pmap" else p)
  return out


def compute_aliases(*names):
  """Every path and reference for the aliases ``names``.

  Returns ``{alias/mode/path/step/leaf: array}`` (``path`` is ``reference``
  for the single-device runs) and ``{alias/start/leaf: array}``.
  """
  jax.config.update("jax_enable_x64", True)
  params, batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                               _problem())
  out = {}
  for name in names:
    case = CASES[name]
    runs = {"global/reference": _global_reference(case, params, batch)}
    for m_sharpness in (False, True) if case.two_pass else (False,):
      mode = "m" if m_sharpness else "global"
      if m_sharpness:
        runs["m/reference"] = _m_sharpness_reference(case, params, batch)
      for path in PATHS:
        runs[f"{mode}/{path}"] = _run_path(path, case, params, batch,
                                           m_sharpness)
    out.update({f"{name}/start/{k}": np.asarray(v) for k, v in params.items()})
    for tag, trajectory in runs.items():
      for t, tree in enumerate(trajectory):
        for key, leaf in tree.items():
          out[f"{name}/{tag}/{t}/{key}"] = np.asarray(leaf)
  return out


def _trajectory(out, tag):
  keys = sorted(k for k in out if k.startswith(tag + "/"))
  assert keys, tag
  return {k[len(tag) + 1:]: out[k] for k in keys}


def max_difference(out, tag, reference):
  """Largest |difference| over every step and leaf of two runs in ``out``."""
  got, want = _trajectory(out, tag), _trajectory(out, reference)
  assert got.keys() == want.keys()
  return max(float(np.max(np.abs(got[k] - want[k]))) for k in want)


def _failures(out, name):
  """What is wrong with alias ``name``'s runs, as messages (none: all good)."""
  case, problems = CASES[name], []
  for mode in ("global", "m") if case.two_pass else ("global",):
    reference = _trajectory(out, f"{name}/{mode}/reference")
    for path in PATHS:
      got = _trajectory(out, f"{name}/{mode}/{path}")
      for key, want in reference.items():
        try:
          np.testing.assert_allclose(got[key], want, **TOL)
        except AssertionError:
          problems.append(
              f"{name} {mode}/{path} step/leaf {key}: max |difference|"
              f" {np.max(np.abs(got[key] - want)):.2e}")
  # Not vacuous: the run moved, and for two-pass rules the modes differ.
  final = STEPS - 1
  moved = max(float(np.max(np.abs(out[f"{name}/global/reference/{final}/{k}"]
                                  - out[f"{name}/start/{k}"])))
              for k in ("w1", "b1", "w2"))
  if moved < 1e-3:
    problems.append(f"{name}: the reference run barely moved ({moved:.1e})")
  if case.two_pass:
    gap = max_difference(out, f"{name}/m/reference",
                         f"{name}/global/reference")
    if gap < 1e-4:
      problems.append(f"{name}: m-sharpness equals the global run ({gap:.1e})")
  return problems


# A few aliases per fresh process: the process start and JAX's first
# multi-device programs cost about as much as one alias's runs.
# FGSAM+ takes the graph network's gradient function as a second extra
# argument, which the one-loss steps cannot supply: users write that step
# themselves (examples/fgsam_gcn.py); the ready-made steps refuse it clearly
# (test below).
NEEDS_A_SECOND_LOSS = ("fgsam_plus",)
NAMES = sorted(name for name in CASES if name not in NEEDS_A_SECOND_LOSS)
GROUPS = [NAMES[i:i + 5] for i in range(0, len(NAMES), 5)]


@pytest.mark.slow
@pytest.mark.parametrize("names", GROUPS, ids="+".join)
def test_every_path_equals_the_single_device_reference(names):
  out = fresh_process.run("tests.test_parallel_aliases", "compute_aliases",
                          *names)
  problems = [p for name in names for p in _failures(out, name)]
  assert not problems, "\n".join(problems)


def _summed_elements(jaxpr):
  """Elements all-reduced (``psum``) anywhere in ``jaxpr``, loops included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("psum", "psum_invariant"):
      total += sum(int(np.prod(v.aval.shape)) for v in eqn.invars)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      total += _summed_elements(sub)
  return total


@pytest.mark.parametrize("name", ["sam", "gsam", "looksam_momentum"])
@pytest.mark.parametrize("path", ["pmap", "shard_map"])
def test_global_perturbation_all_reduces_the_two_gradients_once(name, path):
  """With one global perturbation a step all-reduces g and h (two
  parameter-sized sums) and a few scalars; nothing that is already
  replicated is averaged again (LookSAM's stored direction, the output)."""
  from samtx import parallel as par
  params, batch = _problem()
  size = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  opt = _build(CASES[name], "batch")
  if path == "pmap":
    step = par.pmap_step(_loss, opt, m_sharpness=False)
    args = (par.pmap_replicate(params), par.pmap_replicate(opt.init(params)),
            batch)
  else:
    mesh = jax.make_mesh((N_DEV,), ("batch",))
    step = par.shard_map_step(_loss, opt, mesh, m_sharpness=False)
    args = (par.replicate(params, mesh), par.replicate(opt.init(params), mesh),
            par.shard_batch(batch, mesh))
  summed = _summed_elements(jax.make_jaxpr(step)(*args).jaxpr)
  assert 2 * size <= summed <= 2 * size + 4, (summed, size)


@pytest.mark.parametrize("name", NEEDS_A_SECOND_LOSS)
def test_one_loss_steps_refuse_a_rule_that_needs_a_second_loss(name):
  """No silent stand-in for the missing graph_grad_fn: a one-line error."""
  from samtx import parallel as par
  params, batch = _problem()
  opt = _build(CASES[name], "batch")
  mesh = jax.make_mesh((N_DEV,), ("batch",))
  step = par.shard_map_step(_loss, opt, mesh, m_sharpness=False)
  with pytest.raises(TypeError, match="graph_grad_fn"):
    step(par.replicate(params, mesh), par.replicate(opt.init(params), mesh),
         par.shard_batch(batch, mesh))
