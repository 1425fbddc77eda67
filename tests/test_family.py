"""GSAM, WSAM, Friendly-SAM and LookSAM: references, limits, LookSAM's skip.

The generic properties (jit, inject_hyperparams, dtypes, MultiSteps, ...) run
over these aliases in ``test_common_suite.py``; here each rule is checked
against its NumPy recurrence in ``tests/reference.py``, against the optimizers
it reduces to, and LookSAM against the claim that skipped steps never call
``grad_fn``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers
from tests import reference

STEPS = 6
LR = 0.05
# (adaptive, momentum, nesterov): plain SGD and ASAM's point with Nesterov.
SETTINGS = [(False, 0.0, False), (True, 0.9, True)]


def _check(dtype, opt, rule, momentum, nesterov):
  problem, loss, params, _ = helpers.problem_and_loss(dtype)
  got, _ = helpers.run(opt, loss, params, STEPS)
  sgd = reference.SGD(problem.x0, momentum, nesterov)
  want = reference.run_rule(problem, STEPS, LR, rule, sgd)
  helpers.assert_close_to_reference(got, want, dtype)


# ------------------------------------------------------------- references
# name -> (alias, its rule's kwargs, reference rule for a given adaptive)
RULES = {
    "gsam": (samtx.gsam, dict(alpha=0.6),
             lambda adaptive: reference.gsam_rule(0.1, 0.6, adaptive=adaptive)),
    "wsam": (samtx.wsam, dict(gamma=0.8),
             lambda adaptive: reference.wsam_rule(0.1, 0.8, adaptive=adaptive)),
    "friendly_sam": (samtx.friendly_sam, dict(sigma=0.8, lmbda=0.6),
                     lambda adaptive: reference.FriendlySAMRule(
                         0.1, 0.8, 0.6, adaptive=adaptive)),
}


@pytest.mark.parametrize("adaptive,momentum,nesterov", SETTINGS)
@pytest.mark.parametrize("name", RULES)
def test_matches_reference(dtype, name, adaptive, momentum, nesterov):
  alias, kwargs, rule = RULES[name]
  opt = alias(LR, 0.1, adaptive=adaptive, momentum=momentum or None,
              nesterov=nesterov, **kwargs)
  _check(dtype, opt, rule(adaptive), momentum, nesterov)


@pytest.mark.parametrize("k,momentum,nesterov", [(2, 0.0, False),
                                                 (4, 0.9, True)])
def test_looksam_matches_reference(dtype, k, momentum, nesterov):
  opt = samtx.looksam(LR, 0.1, k=k, alpha=0.7, momentum=momentum or None,
                      nesterov=nesterov)
  rule = reference.LookSAMRule(0.1, k, 0.7)
  _check(dtype, opt, rule, momentum, nesterov)
  assert rule.second_passes == -(-STEPS // k)


def test_rho_schedule_is_evaluated_at_the_step_count():
  """GSAM ties rho to the lr schedule: both schedules step together."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  lr = optax.linear_schedule(LR, 0.0, 10)
  rho = optax.linear_schedule(0.1, 0.0, 10)
  got, _ = helpers.run(samtx.gsam(lr, rho, alpha=0.6), loss, params, STEPS)
  grad_fn = jax.grad(loss)

  @jax.jit
  def constant_step(p, s, lr_t, rho_t):
    opt = samtx.gsam(lr_t, rho_t, alpha=0.6)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  # By hand: the constants the schedules yield at t, on one state.
  p, s = params, samtx.gsam(LR, 0.1, alpha=0.6).init(params)
  for t in range(STEPS):
    p, s = constant_step(p, s, lr(t), rho(t))
    for a, b in zip(jax.tree.leaves(got[t]), jax.tree.leaves(p)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


# -------------------------------------------------- limits of each rule
FAMILY = {
    "gsam": lambda rho, **kw: samtx.gsam(LR, rho, alpha=0.6, **kw),
    "gsam_adaptive": lambda rho, **kw: samtx.gsam(LR, rho, adaptive=True,
                                                  **kw),
    "wsam": lambda rho, **kw: samtx.wsam(LR, rho, gamma=0.8, **kw),
    "friendly_sam": lambda rho, **kw: samtx.friendly_sam(LR, rho, **kw),
    "looksam": lambda rho, **kw: samtx.looksam(LR, rho, k=2, **kw),
}


def _assert_trajectories_equal(got, want):
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", FAMILY)
def test_rho_zero_is_sgd_bit_for_bit(name):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = FAMILY[name](0.0, momentum=0.9, nesterov=True)
  got, _ = helpers.run(opt, loss, params, STEPS)
  want, _ = helpers.run(optax.sgd(LR, momentum=0.9, nesterov=True), loss,
                        params, STEPS)
  _assert_trajectories_equal(got, want)


@pytest.mark.parametrize("name,make", [
    ("gsam alpha=0", lambda: samtx.gsam(LR, 0.1, alpha=0.0)),
    ("wsam gamma=0.5", lambda: samtx.wsam(LR, 0.1, gamma=0.5)),
    ("friendly_sam sigma=0", lambda: samtx.friendly_sam(LR, 0.1, sigma=0.0)),
    ("looksam k=1", lambda: samtx.looksam(LR, 0.1, k=1)),
])
def test_reduces_to_sam(name, make):
  """Each rule's SAM limit: no correction, or the second pass every step."""
  del name
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  got, _ = helpers.run(make(), loss, params, STEPS)
  want, _ = helpers.run(samtx.sam(LR, 0.1), loss, params, STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_wsam_gamma_zero_is_sgd():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  got, _ = helpers.run(samtx.wsam(LR, 0.1, gamma=0.0), loss, params, STEPS)
  want, _ = helpers.run(optax.sgd(LR), loss, params, STEPS)
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", FAMILY)
def test_zero_gradient_gives_finite_zero_update(name):
  opt = FAMILY[name](0.1, momentum=0.9)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  zero_grad_fn = lambda p: jax.tree.map(jnp.zeros_like, p)
  state = opt.init(params)
  update = jax.jit(lambda g, s, p: opt.update(g, s, p, grad_fn=zero_grad_fn))
  for _ in range(3):  # LookSAM(k=2) reuses a zero g_v on the second step
    updates, state = update(zero_grad_fn(params), state, params)
    for leaf in jax.tree.leaves((updates, state)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)


def test_gsam_correction_is_orthogonal_to_the_perturbed_gradient():
  """<g_perp, h> = 0: output - h = -alpha g_perp is orthogonal to h."""
  with jax.enable_x64(True):
    _, loss, params, _ = helpers.problem_and_loss(jnp.float64)
    tx = samtx.gsam_perturbation(0.3, alpha=0.5)
    grad = jax.grad(loss)

    @jax.jit
    def output_and_h(p):
      g = grad(p)
      out, _ = tx.update(g, tx.init(p), p, grad_fn=grad)
      g_norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
      return out, grad(jax.tree.map(lambda x, gx: x + 0.3 * gx / g_norm, p, g))

    out, h = output_and_h(params)
    h = helpers.leaves(h)
    correction = [o - x for o, x in zip(helpers.leaves(out), h)]
    assert reference.norm(correction) > 1e-3
    np.testing.assert_allclose(reference.dot(correction, h), 0.0, atol=1e-10)


# --------------------------------------------------------------- state size
@pytest.mark.parametrize("make,buffers", [
    (lambda: samtx.gsam_perturbation(0.1), 0),
    (lambda: samtx.gsam_perturbation(0.1, adaptive=True), 0),
    (lambda: samtx.wsam_perturbation(0.1), 0),
    (lambda: samtx.friendly_sam_perturbation(0.1), 1),
    (lambda: samtx.looksam_perturbation(0.1), 1),
])
def test_state_holds_only_what_the_rule_needs(make, buffers):
  """GSAM/WSAM keep scalars; Friendly-SAM's m and LookSAM's g_v are one
  parameter-sized buffer each (float32 for bfloat16 params)."""
  params = {"w": jnp.ones((50, 40), jnp.bfloat16), "b": jnp.ones(40)}
  state = make().init(params)
  arrays = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert sum(x.size for x in arrays) == buffers * (50 * 40 + 40)
  assert all(x.dtype == jnp.float32 for x in arrays)


# -------------------------------------------------------- LookSAM's skip
def _counting_grad_fn(loss, calls):
  grad = jax.grad(loss)

  def grad_fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return grad(p)
  return grad_fn


@pytest.mark.parametrize("k", [1, 3, 5])
def test_looksam_evaluates_grad_fn_once_per_k_steps_under_jit(k):
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  opt = samtx.looksam(LR, 0.1, k=k, momentum=0.9)
  calls, traces = [], []
  grad_fn = _counting_grad_fn(loss, calls)

  @jax.jit
  def step(p, s):
    traces.append(None)
    u, s = opt.update(jax.grad(loss)(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  p, s = params, opt.init(params)
  for n in range(1, 3 * k + 1):
    p, s = step(p, s)
    jax.effects_barrier()
    assert len(calls) == -(-n // k), n
  assert len(traces) == 1


def _find_eqn(jaxpr, name):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return eqn
    for sub in jax.core.jaxprs_in_params(eqn.params):
      found = _find_eqn(sub, name)
      if found is not None:
        return found
  return None


def test_looksam_grad_fn_runs_only_inside_the_once_or_never_loop():
  """grad_fn is traced only in the loop body, which runs iff count % k == 0.

  Outside the body the step is a handful of elementwise ops and one norm,
  not a forward-backward pass of the model.
  """
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  tx = samtx.looksam_perturbation(0.1, k=5)
  grad_fn = _counting_grad_fn(loss, [])
  jaxpr = jax.make_jaxpr(
      lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
          jax.grad(loss)(params), tx.init(params), params).jaxpr
  loop = _find_eqn(jaxpr, "while")
  body, cond = loop.params["body_jaxpr"], loop.params["cond_jaxpr"]
  has_callback = lambda j: "debug_callback" in str(j)
  outside = [e for e in jaxpr.eqns if e is not loop]
  assert has_callback(body) and not has_callback(cond)
  assert not any(has_callback(e) for e in outside)
  # The loop runs while its boolean carry holds; the body clears it.
  assert len(cond.jaxpr.eqns) == 0 and cond.jaxpr.outvars[0].aval.dtype == bool
  assert len(outside) < len(body.jaxpr.eqns) / 2


def test_looksam_reuse_step_keeps_g_v_and_the_reported_norm():
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  tx = samtx.looksam_perturbation(0.1, k=3)
  grad = jax.grad(loss)
  state = tx.init(params)
  _, first = tx.update(grad(params), state, params, grad_fn=grad)
  np.testing.assert_allclose(float(first.perturbation_norm), 0.1, rtol=1e-5)
  np.testing.assert_allclose(
      float(first.inner.g_v_norm), reference.norm(helpers.leaves(
          first.inner.g_v)), rtol=1e-5)
  moved = jax.tree.map(lambda x: x + 0.1, params)
  _, second = tx.update(grad(moved), first, moved, grad_fn=grad)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    if a.dtype != jnp.int32:
      np.testing.assert_array_equal(a, b)
  assert int(second.count) == 2


# ------------------------------------------------------ data and model axes
def _device_loss(loss, i, params):
  """A different loss per device: shifted by the device index ``i``."""
  return loss(params) + i * sum(jnp.sum(jnp.sin(x))
                                for x in jax.tree.leaves(params))


def _averaged_looksam_state(states):
  """What LookSAM with ``axis_name`` stores: the devices' mean ``g_v``, the
  norm of that mean, and the mean reported perturbation norm."""
  mean = lambda *xs: sum(xs) / len(xs)
  g_v = jax.tree.map(mean, *[s.inner.g_v for s in states])
  return states[0]._replace(
      perturbation_norm=mean(*[s.perturbation_norm for s in states]),
      inner=samtx.LookSAMState(
          g_v=g_v, g_v_norm=jnp.float32(reference.norm(helpers.leaves(g_v)))))


@pytest.mark.parametrize("make,shared_state", [
    (functools.partial(samtx.gsam_perturbation, 0.1), False),
    (functools.partial(samtx.looksam_perturbation, 0.1, k=2), True),
])
def test_axis_name_averages_the_per_device_outputs(make, shared_state):
  """Each device applies the rule to its own g and h; the outputs are
  averaged (one pmean), on LookSAM's reuse steps as on its second passes.
  LookSAM stores one direction for all devices: the mean of their g_v, with
  the norm of that mean (what its reuse steps then add)."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  devices = 4
  shift = functools.partial(_device_loss, loss)
  grads = jax.vmap(lambda i: jax.grad(functools.partial(shift, i))(params))(
      jnp.arange(devices, dtype=jnp.float32))
  mapped, single = make(axis_name="batch"), make()
  state = jax.vmap(lambda _: mapped.init(params))(jnp.arange(devices))
  singles = [single.init(params) for _ in range(devices)]

  def device_update(i, g, s):
    return mapped.update(g, s, params,
                         grad_fn=jax.grad(functools.partial(shift, i)))

  update = jax.jit(jax.vmap(device_update, axis_name="batch"))
  single_update = jax.jit(lambda i, g, s: single.update(
      g, s, params, grad_fn=jax.grad(functools.partial(shift, i))))
  for _ in range(3):
    out, state = update(jnp.arange(devices, dtype=jnp.float32), grads, state)
    want = []
    for i in range(devices):
      g_i = jax.tree.map(lambda x: x[i], grads)
      o, singles[i] = single_update(jnp.float32(i), g_i, singles[i])
      want.append(o)
    mean = jax.tree.map(lambda *xs: sum(xs) / devices, *want)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(mean)):
      for d in range(devices):
        np.testing.assert_allclose(a[d], b, rtol=2e-5, atol=1e-6)
    if shared_state:
      singles = [_averaged_looksam_state(singles)] * devices
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(singles[0])):
        for d in range(devices):
          np.testing.assert_allclose(a[d], b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    # SAM and LightSAM-I: the same psum path (it was dead on jax 0.10).
    functools.partial(samtx.sam, LR, 0.1, adaptive=True),
    functools.partial(samtx.lightsam, LR, 0.1, variant="adagrad_norm"),
    functools.partial(samtx.gsam, LR, 0.1, adaptive=True),
    functools.partial(samtx.friendly_sam, LR, 0.1, adaptive=True),
    functools.partial(samtx.looksam, LR, 0.1, k=2),
])
def test_norm_axis_name_under_shard_map_equals_the_unsharded_run(make):
  """Parameters split over a 'model' axis: every norm and inner product of
  the rule (inside LookSAM's cond too) sums the blocks, so the trajectory
  equals the unsharded one."""
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((4,), ("model",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
  target = {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
  # An elementwise loss sum(cosh(x - t) + 0.1 x^4), gradient written out:
  # a block's gradient needs only that block, and a replicated leaf's
  # gradient is not summed over the model axis by shard_map's autodiff.
  grad_of = lambda p, t: jax.tree.map(
      lambda x, y: jnp.sinh(x - y) + 0.4 * x ** 3, p, t)
  specs = {"w": P("model"), "b": P()}

  plain = make()
  p_plain, s_plain = params, plain.init(params)
  sharded = make(norm_axis_name="model")

  def local_step(p, s, t):
    grad_fn = lambda q: grad_of(q, t)
    u, s = sharded.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  with jax.set_mesh(mesh):
    put = lambda tree: jax.tree.map(
        lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(
            mesh, spec)), tree, specs)
    p_sh, t_sh = put(params), put(target)
    s_sh = sharded.init(p_sh)
    state_specs = jax.tree.map(lambda x: x.sharding.spec, s_sh)
    step = jax.jit(jax.shard_map(
        local_step, mesh=mesh, in_specs=(specs, state_specs, specs),
        out_specs=(specs, state_specs)))
    for _ in range(3):
      p_sh, s_sh = step(p_sh, s_sh, t_sh)
      grad_fn = lambda q: grad_of(q, target)
      u, s_plain = plain.update(grad_fn(p_plain), s_plain, p_plain,
                                grad_fn=grad_fn)
      p_plain = optax.apply_updates(p_plain, u)
      for a, b in zip(jax.tree.leaves(p_sh), jax.tree.leaves(p_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6,
                                   atol=1e-6)


# ------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("make,arg", [
    (lambda: samtx.gsam_perturbation(-0.1), "rho"),
    (lambda: samtx.gsam(0.1, 0.1, alpha=-0.5), "alpha"),
    (lambda: samtx.gsam_perturbation(0.1, eps=0.0), "eps"),
    (lambda: samtx.gsam(-1.0, 0.1), "learning_rate"),
    (lambda: samtx.wsam(0.1, 0.1, gamma=1.0), "gamma"),
    (lambda: samtx.wsam_perturbation(0.1, gamma=-0.1), "gamma"),
    (lambda: samtx.wsam(0.1, -0.1), "rho"),
    (lambda: samtx.friendly_sam(0.1, 0.1, sigma=-1.0), "sigma"),
    (lambda: samtx.friendly_sam(0.1, 0.1, lmbda=1.0), "lmbda"),
    (lambda: samtx.friendly_sam_perturbation(0.1, lmbda=float("nan")),
     "lmbda"),
    (lambda: samtx.friendly_sam(0.1, 0.1, momentum=1.5), "momentum"),
    (lambda: samtx.looksam(0.1, 0.1, k=0), "k"),
    (lambda: samtx.looksam_perturbation(0.1, k=2.5), "k"),
    (lambda: samtx.looksam_perturbation(0.1, k=True), "k"),
    (lambda: samtx.looksam(0.1, 0.1, alpha=-0.1), "alpha"),
    (lambda: samtx.looksam(0.1, 0.1, nesterov=True), "nesterov"),
    (lambda: samtx.looksam_perturbation(0.1, axis_name=3), "axis_name"),
    (lambda: samtx.gsam(0.1, jnp.ones(2)), "rho"),
])
def test_bad_arguments_are_named(make, arg):
  with pytest.raises((ValueError, TypeError), match=arg):
    make()


@pytest.mark.parametrize("make", [
    lambda: samtx.gsam_perturbation(0.1),
    lambda: samtx.friendly_sam_perturbation(0.1),
    lambda: samtx.looksam_perturbation(0.1, k=3),
])
def test_missing_grad_fn_is_a_clear_error(make):
  tx = make()
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match="grad_fn"):
    tx.update(params, tx.init(params), params)


# ------------------------------------------------------------ donation
@pytest.mark.parametrize("name", ["gsam", "friendly_sam", "looksam"])
def test_donated_step_compiles_once_and_updates_in_place(name):
  """Every parameter and state array (LookSAM's g_v through both branches of
  its cond too) is written into its donated input, with no host round trip
  and no retrace."""
  opt = FAMILY[name](0.1, momentum=0.9)
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  grad_fn = jax.grad(loss)
  traces = []

  def step(p, s):
    traces.append(None)
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  state = jax.tree.map(lambda x: x.copy(), opt.init(params))
  compiled = step.lower(params, state).compile()
  arrays = [x for x in jax.tree.leaves((params, state)) if x.ndim > 0]
  assert compiled.memory_analysis().alias_size_in_bytes >= sum(
      x.nbytes for x in arrays)
  with jax.transfer_guard("disallow"):
    for _ in range(4):
      params, state = step(params, state)
  assert all(x.is_deleted() for x in arrays)
  assert len(traces) == 1


@pytest.mark.parametrize("name,make", [
    ("looksam", lambda: samtx.looksam(0.1, 0.05, k=2, axis_name="batch")),
    ("gsam", lambda: samtx.gsam(0.1, 0.05, axis_name="batch")),
])
def test_shard_map_step_with_per_device_perturbations_matches_pmap(name,
                                                                  make):
  """m-sharpness under shard_map: local g and h make LookSAM's second pass
  vary over the data axis while its reuse branch returns the replicated
  state; both branches must agree on that (else lax.cond refuses), and the
  numbers equal pmap's."""
  import samtx.parallel as par
  del name
  opt = make()
  loss_fn = lambda p, b: jnp.mean((b @ p - 1.0) ** 2)
  batch = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)),
                      jnp.float32)
  mesh = jax.make_mesh((4,), ("batch",))
  pmap_step = par.pmap_step(loss_fn, opt, devices=jax.devices()[:4])
  shard_step = par.shard_map_step(loss_fn, opt, mesh)
  p1 = par.pmap_replicate(jnp.zeros(3), jax.devices()[:4])
  s1 = par.pmap_replicate(opt.init(jnp.zeros(3)), jax.devices()[:4])
  p2 = par.replicate(jnp.zeros(3), mesh)
  s2 = par.replicate(opt.init(jnp.zeros(3)), mesh)
  for _ in range(3):
    p1, s1, _ = pmap_step(p1, s1, batch)
    p2, s2, _ = shard_step(p2, s2, batch)
    np.testing.assert_allclose(np.asarray(p1[0]), np.asarray(p2), rtol=1e-5,
                               atol=1e-7)


def test_looksam_update_is_forward_differentiable_and_says_why_not_reverse():
  """The once-or-never loop supports jax.jvp, through a second-pass step
  (grad_fn inside the loop) and a reusing step, checked against central
  finite differences; jax.grad is refused with JAX's while_loop error, as
  the docs say."""
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  tx = samtx.looksam_perturbation(0.1, k=2)
  grad = jax.grad(loss)
  _, reusing = tx.update(grad(params), tx.init(params), params, grad_fn=grad)

  for state in (tx.init(params), reusing):
    def update_along(t, state=state):
      p = jax.tree.map(lambda x: x * (1.0 + t), params)
      out, _ = tx.update(grad(p), state, p, grad_fn=grad)
      return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out))

    _, tangent = jax.jvp(update_along, (0.0,), (1.0,))
    step = 1e-3
    finite = (update_along(step) - update_along(-step)) / (2 * step)
    np.testing.assert_allclose(tangent, finite, rtol=2e-3)
    with pytest.raises(ValueError, match="Reverse-mode differentiation"):
      jax.grad(update_along)(0.0)


def test_looksam_runs_with_a_per_device_state_inside_shard_map():
  """A state typed as varying over a mesh axis (e.g. per-device optimizer
  states in a user's shard_map): the loop's flag follows the step count's
  typing, and both kinds of step give the plain update."""
  P = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((4,), ("b",))
  _, loss, params, _ = helpers.problem_and_loss(jnp.float32)
  grad = jax.grad(loss)
  tx = samtx.looksam_perturbation(0.1, k=2)

  def local(p, s):
    s = jax.tree.map(lambda x: jax.lax.pcast(x, "b", to="varying"), s)
    out, s = tx.update(grad(p), s, p, grad_fn=grad)
    # every device computed the same values; pmax makes them replicated
    return jax.tree.map(lambda x: jax.lax.pmax(x, "b"), (out, s))

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P()),
                               out_specs=(P(), P())))
  state, plain_state = tx.init(params), tx.init(params)
  for _ in range(3):
    out, state = step(params, state)
    want, plain_state = tx.update(grad(params), plain_state, params,
                                  grad_fn=grad)
    # g_v is the small part of h orthogonal to g, rescaled by n(g)/n(g_v):
    # float32 rounding of two compilations of h grows to ~1e-5 of |out|.
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------- complex parameters
def _complex_problem():
  """A complex leaf z = a + i b whose loss is the reference problem over the
  real leaves (a, b): samtx on z must equal the NumPy rule on (a, b)."""
  problem = reference.Problem([(5,), (5,)], seed=3)
  a, c, d = ([jnp.asarray(v, jnp.float32) for v in vs]
             for vs in (problem.a, problem.c, problem.d))

  def loss(z):
    parts = (jnp.real(z), jnp.imag(z))
    return sum(jnp.sum(ai * x ** 4 / 4 + ci * x ** 2 / 2 + di * x)
               for x, ai, ci, di in zip(parts, a, c, d))

  z0 = jnp.asarray(problem.x0[0] + 1j * problem.x0[1], jnp.complex64)
  # optax's convention for complex leaves: descend along conj(jax.grad)
  grad = lambda z: jnp.conj(jax.grad(loss)(z))
  return problem, z0, grad


@pytest.mark.parametrize("name,make,rule", [
    ("gsam", lambda: samtx.gsam(LR, 0.1, alpha=0.6),
     lambda: reference.gsam_rule(0.1, 0.6)),
    ("looksam", lambda: samtx.looksam(LR, 0.1, k=2, alpha=0.7),
     lambda: reference.LookSAMRule(0.1, 2, 0.7)),
])
def test_complex_cosine_is_the_real_inner_product(name, make, rule):
  """GSAM's and LookSAM's cosine use Re <g, h> = sum Re(conj(g) h), the inner
  product of the real embedding; without the conjugation (sum Re(g h)) the
  imaginary parts enter with the wrong sign, which a leaf with a non-trivial
  phase exposes."""
  del name
  problem, z, grad = _complex_problem()
  assert float(jnp.min(jnp.abs(jnp.angle(z) % (np.pi / 2)))) > 1e-2
  opt = make()
  state = opt.init(z)
  step = jax.jit(lambda z, s: opt.update(grad(z), s, z, grad_fn=grad))
  want = reference.run_rule(problem, STEPS, LR, rule(),
                            reference.SGD(problem.x0))
  for t in range(STEPS):
    updates, state = step(z, state)
    z = z + updates
    np.testing.assert_allclose(np.real(z), want[t][0], rtol=3e-5, atol=3e-6,
                               err_msg=f"step {t}")
    np.testing.assert_allclose(np.imag(z), want[t][1], rtol=3e-5, atol=3e-6,
                               err_msg=f"step {t}")


# ------------------------------ LookSAM against pytorch_optimizer's LookSAM
def _pytorch_optimizer_looksam_adamw(problem, steps, *, lr, rho, k, alpha,
                                     b1, b2, eps, weight_decay,
                                     per_tensor=True):
  """pytorch_optimizer's ``LookSAM`` (``optimizer/sam.py``) around
  ``torch.optim.AdamW``, transcribed for a list of tensors.

  Its refresh schedule reads AdamW's ``state['step']`` (t steps taken before
  step t), so step t takes the second pass when t % k == 0. The ascent uses
  the global norm (+1e-12); g_v and the reuse scaling use per-tensor norms
  (no eps in the cosine, +1e-8 in the reuse); on other steps the closure
  recomputes the gradient at x (the same g). AdamW decays the weights by
  (1 - lr wd) first, then takes the bias-corrected Adam step with eps added
  to sqrt(v) / sqrt(1 - b2^t). With ``per_tensor=False`` the cosine, g_v
  and the reuse scaling use global norms: the paper's Algorithm 1.
  """
  rule = reference.LookSAMRule(rho, k, alpha)  # the paper's, for per_tensor=False
  xs = [np.array(x, np.float64) for x in problem.x0]
  m = [np.zeros_like(x) for x in xs]
  v = [np.zeros_like(x) for x in xs]
  g_v = [None] * len(xs)
  out = []
  for t in range(steps):
    gs = problem.grad(xs)
    if not per_tensor:
      ds = rule(xs, gs, problem.grad)
    elif t % k == 0:
      scale = rho / (reference.norm(gs) + 1e-12)
      hs = problem.grad([x + scale * g for x, g in zip(xs, gs)])
      for i, (g, h) in enumerate(zip(gs, hs)):
        unit_g = g / np.linalg.norm(g)
        h_norm = np.linalg.norm(h)
        g_v[i] = h - h_norm * np.sum(unit_g * h / h_norm) * unit_g
      ds = hs
    else:
      ds = [g + alpha * np.linalg.norm(g) / (np.linalg.norm(gv) + 1e-8) * gv
            for g, gv in zip(gs, g_v)]
    step = t + 1
    xs = [x * (1 - lr * weight_decay) for x in xs]
    m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, ds)]
    v = [b2 * vi + (1 - b2) * d * d for vi, d in zip(v, ds)]
    denom = [np.sqrt(vi) / np.sqrt(1 - b2 ** step) + eps for vi in v]
    xs = [x - lr / (1 - b1 ** step) * mi / di
          for x, mi, di in zip(xs, m, denom)]
    out.append([x.copy() for x in xs])
  return out


@pytest.mark.parametrize("k,alpha", [(3, 0.7), (2, 0.15)])
def test_looksam_with_adamw_matches_pytorch_optimizer_on_one_tensor(k, alpha):
  """On a model of one tensor per-tensor and global norms coincide, and
  samtx's LookSAM chained with optax.adamw (torch AdamW's defaults spelled
  out: weight_decay=1e-2, not optax's 1e-4) is pytorch_optimizer's LookSAM
  with torch AdamW step for step."""
  kw = dict(lr=0.01, rho=0.1, k=k, alpha=alpha, b1=0.9, b2=0.999, eps=1e-8,
            weight_decay=1e-2)
  with jax.enable_x64(True):
    problem = reference.Problem([(7,)], seed=5)
    x = jnp.asarray(problem.x0[0])
    loss = lambda p: jnp.sum(jnp.asarray(problem.a[0]) * p ** 4 / 4
                             + jnp.asarray(problem.c[0]) * p ** 2 / 2
                             + jnp.asarray(problem.d[0]) * p)
    opt = optax.chain(
        samtx.looksam_perturbation(kw["rho"], k=k, alpha=alpha),
        optax.adamw(kw["lr"], b1=kw["b1"], b2=kw["b2"], eps=kw["eps"],
                    weight_decay=kw["weight_decay"]))
    got, _ = helpers.run(opt, loss, x, 12)
    want = _pytorch_optimizer_looksam_adamw(problem, 12, **kw)
    # The reuse denominators differ by their eps (1e-8 there, 1e-12 here): a
    # relative 1e-8 / n(g_v) per reusing step.
    for t, (g, w) in enumerate(zip(got, want)):
      np.testing.assert_allclose(np.asarray(g), w[0], rtol=1e-6, atol=1e-9,
                                 err_msg=f"step {t}")


def test_looksam_on_several_tensors_is_the_papers_rule_not_per_tensor():
  """On a model of several tensors samtx follows the paper's global rule
  (Algorithm 1, around the same AdamW) and differs from pytorch_optimizer's
  per-tensor one: the documented deviation, and how large it is here."""
  kw = dict(lr=0.01, rho=0.1, k=3, alpha=0.7, b1=0.9, b2=0.999, eps=1e-8,
            weight_decay=1e-2)
  with jax.enable_x64(True):
    problem, loss, params, _ = helpers.problem_and_loss(jnp.float64)
    opt = optax.chain(
        samtx.looksam_perturbation(kw["rho"], k=kw["k"], alpha=kw["alpha"]),
        optax.adamw(kw["lr"], b1=kw["b1"], b2=kw["b2"], eps=kw["eps"],
                    weight_decay=kw["weight_decay"]))
    got, _ = helpers.run(opt, loss, params, 12)
    paper = _pytorch_optimizer_looksam_adamw(problem, 12, per_tensor=False,
                                             **kw)
    per_tensor = _pytorch_optimizer_looksam_adamw(problem, 12, **kw)
    helpers.assert_close_to_reference(got, paper, jnp.float64)
    gap = max(np.max(np.abs(a - b)) for a, b in zip(helpers.leaves(got[-1]),
                                                    per_tensor[-1]))
    assert gap > 1e-3
