"""No second pass where rho is 0: a scheduled or injected rho skips grad_fn.

Every two-pass alias built on a rho schedule (here 0 for the first steps,
then rho: SAM late in training, Zhou et al. 2024) or on the traced rho of
``optax.inject_hyperparams`` evaluates ``grad_fn`` only on steps where
``rho_t != 0``. Checked here: the evaluations counted at run time under
``jit``, the updates of skipped steps against the base optimizer bit for bit,
the rule's own state against the plain rho = 0 step, whole runs against
float64 NumPy recurrences, ``jvp``/``vmap``/``grad`` through ``update``,
the compiled programs, and the data-parallel steps (pmap, shard_map, jit
with and without m-sharpness) in a fresh process.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import fresh_process
from tests import helpers
from tests import reference

LR, RHO, MOMENTUM = 0.05, 0.1, 0.9
SWITCH, STEPS = 3, 7  # rho_t = 0 for t < SWITCH, RHO afterwards


def zero_then_rho(rho=RHO, switch=SWITCH):
  """The schedule a user writes for SAM late in training."""
  return optax.join_schedules(
      [optax.constant_schedule(0.0), optax.constant_schedule(rho)], [switch])


def _sgd(nesterov=False):
  return optax.sgd(LR, momentum=MOMENTUM, nesterov=nesterov)


def _preconditioned(variant):
  return optax.chain(samtx.lightsam_preconditioner(variant),
                     optax.scale_by_learning_rate(LR))


# name -> (alias at a given rho, its base optimizer): every two-pass alias,
# with non-default coefficients where the rule has any.
ALIASES = {
    "sam": (lambda rho: samtx.sam(LR, rho, momentum=MOMENTUM, nesterov=True),
            lambda: _sgd(nesterov=True)),
    "asam": (lambda rho: samtx.sam(LR, rho, momentum=MOMENTUM, adaptive=True,
                                   eta=0.01), _sgd),
    "adasam": (lambda rho: samtx.adasam(LR, rho), lambda: samtx.amsgrad(LR)),
    "lightsam_I": (lambda rho: samtx.lightsam(LR, rho, variant="adagrad_norm"),
                   lambda: _preconditioned("adagrad_norm")),
    "lightsam_II": (lambda rho: samtx.lightsam(LR, rho, variant="adagrad"),
                    lambda: _preconditioned("adagrad")),
    "lightsam_III": (lambda rho: samtx.lightsam(LR, rho, variant="adam"),
                     lambda: _preconditioned("adam")),
    "gsam": (lambda rho: samtx.gsam(LR, rho, alpha=0.3, momentum=MOMENTUM),
             _sgd),
    "wsam": (lambda rho: samtx.wsam(LR, rho, gamma=0.7, momentum=MOMENTUM),
             _sgd),
    "friendly_sam": (lambda rho: samtx.friendly_sam(
        LR, rho, sigma=0.8, lmbda=0.6, momentum=MOMENTUM), _sgd),
    "looksam": (lambda rho: samtx.looksam(LR, rho, k=2, alpha=0.3,
                                          momentum=MOMENTUM), _sgd),
}


def _second_passes(name, schedule_values):
  """Steps on which the rule evaluates grad_fn, from the rho values."""
  if name == "looksam":  # every k = 2 steps, and only where rho_t != 0
    return [t % 2 == 0 and r != 0 for t, r in enumerate(schedule_values)]
  return [r != 0 for r in schedule_values]


def _run_counting(opt, loss, params, steps):
  """Jitted steps; grad_fn evaluations per step, the trajectory, states."""
  calls, traces = [], []
  step = helpers.counting_step(opt, loss, calls, traces)
  p, s = params, opt.init(params)
  per_step, trajectory, states = [], [], []
  for _ in range(steps):
    before = len(calls)
    p, s = step(p, s)
    jax.effects_barrier()
    per_step.append(len(calls) - before)
    trajectory.append(p)
    states.append(s)
  assert len(traces) == 1
  return per_step, trajectory, states


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- counts
@pytest.mark.parametrize("name", ALIASES)
def test_grad_fn_runs_only_where_the_schedule_is_nonzero(name):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  per_step, _, _ = _run_counting(ALIASES[name][0](zero_then_rho()), loss,
                                 params, STEPS)
  values = [float(zero_then_rho()(t)) for t in range(STEPS)]
  assert per_step == [int(x) for x in _second_passes(name, values)]


@pytest.mark.parametrize("name", ["sam", "lightsam_III", "looksam"])
def test_injected_rho_switches_the_second_pass_without_recompiling(name):
  """inject_hyperparams passes rho as a traced array: set to 0, the step
  skips grad_fn; set back to rho, it evaluates it again; one compilation."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  make = ALIASES[name][0]
  opt = optax.inject_hyperparams(lambda rho: make(rho))(rho=0.0)
  calls, traces = [], []
  step = helpers.counting_step(opt, loss, calls, traces)
  p, s = params, opt.init(params)
  values = [0.0, 0.0, RHO, RHO, 0.0, RHO]
  per_step = []
  for rho in values:
    s.hyperparams["rho"] = jnp.asarray(rho, jnp.float32)
    before = len(calls)
    p, s = step(p, s)
    jax.effects_barrier()
    per_step.append(len(calls) - before)
  assert per_step == [int(x) for x in _second_passes(name, values)]
  assert len(traces) == 1


# ------------------------------------------------- skipped steps: numbers
@pytest.mark.parametrize("name", ALIASES)
def test_skipped_steps_equal_the_base_optimizer_bit_for_bit(name):
  """While the schedule is 0 the parameters are the base optimizer's, bit
  for bit; the rule's own state is what the plain (unskipped) rho = 0 step
  leaves (LightSAM's accumulators and Friendly-SAM's momentum are updated
  from g, LookSAM's g_v is 0), up to one rounding of XLA's fusion."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  make, base = ALIASES[name]
  _, got, got_states = _run_counting(make(zero_then_rho()), loss, params,
                                     STEPS)
  want, _ = helpers.run(base(), loss, params, SWITCH)
  for t in range(SWITCH):
    _assert_trees_equal(got[t], want[t])
  plain, plain_state = helpers.run(make(0.0), loss, params, SWITCH)
  skipped, unskipped = got_states[SWITCH - 1], plain_state
  for x, y in zip(jax.tree.leaves(skipped), jax.tree.leaves(unskipped)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=3e-7,
                               atol=0)
  _assert_trees_equal(got[SWITCH - 1], plain[SWITCH - 1])


def _numpy_rule(name, rho_at):
  """``rule(t, xs, gs, grad) -> output`` and its descent, in float64 NumPy,
  with the radius ``rho_at(t)`` of step t (DESIGN.md's equations)."""
  x0 = reference.Problem(
      [helpers.SHAPES[0], helpers.SHAPES[1], helpers.SHAPES[3],
       helpers.SHAPES[2]]).x0
  sam_point = lambda xs, gs, grad, rho, **kw: (
      reference.gradient_at_sam_point(xs, gs, grad, rho, **kw))
  if name in ("sam", "asam"):
    adaptive = name == "asam"
    rule = lambda t, xs, gs, grad: grad([
        x + e for x, e in zip(xs, reference.sam_perturbation(
            xs, gs, rho_at(t), adaptive=adaptive,
            eta=0.01 if adaptive else 0.0))])
    return rule, reference.SGD(x0, MOMENTUM, nesterov=name == "sam")
  if name == "adasam":
    return (lambda t, xs, gs, grad: sam_point(xs, gs, grad, rho_at(t)),
            reference.AMSGrad(x0, 1e-8))
  if name.startswith("lightsam"):
    variant = {"lightsam_I": "adagrad_norm", "lightsam_II": "adagrad",
               "lightsam_III": "adam"}[name]
    ascent = reference.PRECONDITIONERS[variant](x0, 1e-8)

    def rule(t, xs, gs, grad):
      return grad([x + rho_at(t) * d for x, d in zip(xs, ascent(gs))])
    return rule, reference.PRECONDITIONERS[variant](x0, 1e-8)
  if name == "gsam":
    return (lambda t, xs, gs, grad: reference.gsam_rule(rho_at(t), 0.3)(
        xs, gs, grad) if rho_at(t) else gs), reference.SGD(x0, MOMENTUM)
  if name == "wsam":
    return (lambda t, xs, gs, grad: reference.wsam_rule(rho_at(t), 0.7)(
        xs, gs, grad)), reference.SGD(x0, MOMENTUM)
  stateful = (reference.FriendlySAMRule(0.0, 0.8, 0.6) if name == "friendly_sam"
              else reference.LookSAMRule(0.0, 2, 0.3))

  def rule(t, xs, gs, grad):
    stateful.rho = rho_at(t)
    return stateful(xs, gs, grad)
  return rule, reference.SGD(x0, MOMENTUM)


@pytest.mark.parametrize("name", ALIASES)
def test_zero_then_rho_over_a_whole_run_matches_numpy(dtype, name):
  """The whole run (skipped steps, the switch, second passes; LookSAM's
  reuse of a g_v stored as 0 while rho was 0) against the recurrence."""
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  schedule = zero_then_rho()
  _, got, _ = _run_counting(ALIASES[name][0](schedule), loss, params, STEPS)
  rule, descent = _numpy_rule(name, lambda t: float(schedule(t)))
  xs = [np.array(x, np.float64) for x in problem.x0]
  want = []
  for t in range(STEPS):
    gs = problem.grad(xs)
    xs = [x - LR * d for x, d in zip(xs, descent(rule(t, xs, gs,
                                                      problem.grad)))]
    want.append(xs)
  helpers.assert_close_to_reference(got, want, dtype)


def test_looksam_reference_stores_no_direction_at_rho_zero():
  """The NumPy LookSAM used above follows DESIGN.md at rho = 0 (g_v = 0), so
  a reuse step after it returns g: the reference is not rigged to match."""
  problem = reference.Problem([(3,), (2, 2)])
  rule = reference.LookSAMRule(0.0, 2, 0.3)
  xs = [np.array(x, np.float64) for x in problem.x0]
  gs = problem.grad(xs)
  rule(xs, gs, problem.grad)
  assert all(not np.any(v) for v in rule.g_v)
  out = rule(xs, gs, problem.grad)
  for a, b in zip(out, gs):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------- the compiled program
def _while_loops(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      found.append(eqn)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found += _while_loops(sub)
  return found


@pytest.mark.parametrize("name,loops_at_a_number,loops_scheduled", [
    ("sam", 0, 1), ("lightsam_II", 0, 2), ("friendly_sam", 0, 2),
    ("gsam", 0, 1), ("looksam", 1, 2)])
def test_a_number_compiles_without_a_branch(name, loops_at_a_number,
                                            loops_scheduled):
  """A Python-number rho traces the plain step (LookSAM: its one every-k
  loop); a schedule adds the once-or-never loops, one for the second pass
  and, for rules with state of their own, one for the state at rho = 0.
  grad_fn is traced only inside the second pass's loop."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  grad_fn = helpers.counting_grad_fn(loss, [])
  has_callback = lambda j: "debug_callback" in str(j)
  for rho, expected in [(RHO, loops_at_a_number),
                        (zero_then_rho(), loops_scheduled)]:
    opt = ALIASES[name][0](rho)
    jaxpr = jax.make_jaxpr(
        lambda g, s, p, opt=opt: opt.update(g, s, p, grad_fn=grad_fn))(
            jax.grad(loss)(params), opt.init(params), params).jaxpr
    loops = _while_loops(jaxpr)
    assert len(loops) == expected
    if expected:
      outside = [e for e in jaxpr.eqns if e.primitive.name != "while"]
      assert not any(has_callback(e) for e in outside)
      assert sum(has_callback(e.params["body_jaxpr"]) for e in loops) == 1


# ------------------------------------------------------ transformations
def test_update_is_forward_differentiable_and_vmappable_not_reversible():
  """jvp through a skipped and a second-pass step equals finite
  differences; vmap over injected radii takes each lane's branch; jax.grad
  through update is refused (a while loop) where rho is scheduled, and
  works, as before, where rho is a number."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  grad = jax.grad(loss)
  scheduled = samtx.sam(LR, zero_then_rho(switch=1), momentum=MOMENTUM)
  first = scheduled.init(params)
  _, second = scheduled.update(grad(params), first, params, grad_fn=grad)

  def update_along(t, opt, state):
    p = jax.tree.map(lambda x: x * (1.0 + t), params)
    out, _ = opt.update(grad(p), state, p, grad_fn=grad)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

  for state in (first, second):  # rho_t = 0, then rho_t = RHO
    f = functools.partial(update_along, opt=scheduled, state=state)
    _, tangent = jax.jvp(f, (0.0,), (1.0,))
    step = 1e-3
    np.testing.assert_allclose(tangent, (f(step) - f(-step)) / (2 * step),
                               rtol=2e-3)
    with pytest.raises(ValueError, match="Reverse-mode differentiation"):
      jax.grad(f)(0.0)
  plain = samtx.sam(LR, RHO, momentum=MOMENTUM)
  assert np.isfinite(jax.grad(functools.partial(
      update_along, opt=plain, state=plain.init(params)))(0.0))

  injected = optax.inject_hyperparams(samtx.sam)(learning_rate=LR, rho=RHO)
  state = injected.init(params)
  radii = jnp.asarray([0.0, RHO, 0.0, 0.3])

  def lane(rho):
    s = state._replace(hyperparams={**state.hyperparams, "rho": rho})
    return injected.update(grad(params), s, params, grad_fn=grad)[0]

  lanes = jax.jit(jax.vmap(lane))(radii)
  for i, rho in enumerate(radii):
    want, _ = samtx.sam(LR, float(rho)).update(
        grad(params), samtx.sam(LR, float(rho)).init(params), params,
        grad_fn=grad)
    for a, b in zip(jax.tree.leaves(lanes), jax.tree.leaves(want)):
      np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------- data parallel
N_DEV, BATCH, DIM = 4, 16, 5
DP_STEPS = 4  # rho_t = 0 on steps 0, 1, then RHO


def _dp_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
  x *= np.repeat(rng.uniform(0.3, 3.0, size=(N_DEV, 1)), BATCH // N_DEV, 0)
  y = rng.normal(size=(BATCH,)).astype(np.float32)
  params = {"b": jnp.float32(0.3),
            "w": jnp.asarray(rng.normal(size=(DIM,)), jnp.float32)}
  return (jnp.asarray(x), jnp.asarray(y)), params


def data_parallel_runs():
  """Every data-parallel step with rho = 0 then RHO (run in a child).

  Returns, per run, the losses evaluated per step (one callback per loss
  evaluation and device or group) and the parameters after each step, for
  samtx.sam / samtx.looksam and for their base optimizer.
  """
  import samtx.parallel as par
  calls = []

  def loss_fn(p, batch):
    jax.debug.callback(lambda: calls.append(1))
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  batch, params = _dp_problem()
  devices = jax.devices()[:N_DEV]
  mesh = jax.make_mesh((N_DEV,), ("batch",), devices=devices)
  schedule = zero_then_rho(switch=2)
  optimizers = {
      "base": lambda axis: optax.sgd(LR, momentum=MOMENTUM),
      "sam": lambda axis: samtx.sam(LR, schedule, momentum=MOMENTUM,
                                    axis_name=axis),
      "looksam": lambda axis: samtx.looksam(LR, schedule, k=2, alpha=0.3,
                                            momentum=MOMENTUM,
                                            axis_name=axis),
      # a state of its own, updated from g on every step
      "friendly_sam": lambda axis: samtx.friendly_sam(
          LR, schedule, sigma=0.8, lmbda=0.6, momentum=MOMENTUM,
          axis_name=axis),
  }

  def pmap(make, m_sharpness=True):
    opt = make("batch")
    step = par.pmap_step(loss_fn, opt, m_sharpness=m_sharpness,
                         devices=devices)
    return (step, par.pmap_replicate(params, devices),
            par.pmap_replicate(opt.init(params), devices), par.unreplicate)

  def shard_map(make, m_sharpness=True):
    opt = make("batch")
    step = par.shard_map_step(loss_fn, opt, mesh, m_sharpness=m_sharpness)
    return (step, par.replicate(params, mesh),
            par.replicate(opt.init(params), mesh), lambda t: t)

  def jit(make, groups=None):
    opt = make(None if groups is None else "batch")
    step = par.jit_step(loss_fn, opt, mesh, m_sharpness_groups=groups)
    return (step, par.replicate(params, mesh),
            par.init_sharded(opt, par.replicate(params, mesh), mesh),
            lambda t: t)

  modes = {
      "pmap": pmap, "pmap_global": functools.partial(pmap, m_sharpness=False),
      "shard_map": shard_map,
      "shard_map_global": functools.partial(shard_map, m_sharpness=False),
      "jit_groups": functools.partial(jit, groups=N_DEV), "jit_global": jit,
  }
  out = {}
  for mode, build in modes.items():
    for name, make in optimizers.items():
      step, p, s, read = build(make)
      sharded = (par.shard_batch(batch, mesh) if not mode.startswith("pmap")
                 else batch)
      counts, trajectory = [], []
      for _ in range(DP_STEPS):
        before = len(calls)
        p, s, _ = step(p, s, sharded)
        jax.effects_barrier()
        counts.append(len(calls) - before)
        trajectory.append(np.concatenate([
            np.ravel(np.asarray(x)) for x in jax.tree.leaves(read(p))]))
      out[f"{mode}/{name}/calls"] = np.asarray(counts)
      out[f"{mode}/{name}/params"] = np.stack(trajectory)
  return out


NAMES = ("sam", "looksam", "friendly_sam")


@pytest.mark.slow
def test_data_parallel_steps_skip_grad_fn_and_match():
  """pmap, shard_map and jit (m-sharpness groups and global): the steps at
  rho = 0 evaluate the loss as often as the base optimizer's (no second
  pass on any device or group) and give its parameters; later steps
  evaluate it twice as often (LookSAM: on its k-th steps) and every
  m-sharpness run (pmap, shard_map, jit groups) gives the same numbers, as
  does every global one."""
  out = fresh_process.run("tests.test_rho_zero", "data_parallel_runs",
                          timeout=600)
  modes = ["pmap", "pmap_global", "shard_map", "shard_map_global",
           "jit_groups", "jit_global"]
  for mode in modes:
    base = out[f"{mode}/base/calls"]
    assert base[0] > 0 and np.all(base == base[0]), (mode, base)
    clean = int(base[0])
    for name in ("sam", "friendly_sam"):
      assert list(out[f"{mode}/{name}/calls"]) == [clean, clean, 2 * clean,
                                                   2 * clean], (mode, name)
    assert list(out[f"{mode}/looksam/calls"]) == [clean, clean, 2 * clean,
                                                  clean], mode
    for name in NAMES:
      np.testing.assert_allclose(out[f"{mode}/{name}/params"][:2],
                                 out[f"{mode}/base/params"][:2], rtol=1e-6,
                                 atol=1e-7, err_msg=f"{mode}/{name}")
  for group in (["pmap", "shard_map", "jit_groups"],
                ["pmap_global", "shard_map_global", "jit_global"]):
    for name in NAMES:
      first = out[f"{group[0]}/{name}/params"]
      for mode in group[1:]:
        np.testing.assert_allclose(out[f"{mode}/{name}/params"], first,
                                   rtol=2e-5, atol=1e-6,
                                   err_msg=f"{mode}/{name}")
      # the second pass did something: rho > 0 moved away from the base
      assert not np.allclose(first[2:], out[f"{group[0]}/base/params"][2:],
                             rtol=1e-6, atol=0)
