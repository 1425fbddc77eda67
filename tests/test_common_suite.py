"""Generic properties every samtx optimizer must have, each written once.

These are the checks optax runs over its contrib optimizers (and that users
run over samtx), in our own words: extra arguments under jit without
recompiling, convergence on small real and complex targets,
``inject_hyperparams`` giving the same updates and the same state, dtypes
kept in low precision, state stable under ``lax.cond``, ``MultiSteps``,
``apply_if_finite``, schedules, and clear errors for integer leaves and a
missing ``params``. The list of optimizers lives in ``tests/optimizers.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests.optimizers import CASES
from tests.optimizers import NEEDS_PARAMS

NAMES = sorted(CASES)


def _abs_sq(x):
  return jnp.real(x * jnp.conj(x))


def _parabola(dtype):
  start = jnp.array([-1.0, 4.0, 1.0], dtype)
  target = jnp.array([1.0, -1.0, 1.0], dtype)
  return start, target, lambda p: jnp.sum(_abs_sq(p - target))


def _mixed_tensors(dtype):
  start = (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype))
  target = (jnp.array([1.0, -1.0, 2.0], dtype),
            jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
  return start, target, lambda p: sum(
      jnp.sum(_abs_sq(a - b)) for a, b in zip(p, target))


def _complex_parabola(dtype):
  del dtype
  start = jnp.array([1.0 - 1.0j, -2.0 + 0.5j], jnp.complex64)
  target = jnp.array([2.0 + 1.0j, 0.5 - 1.5j], jnp.complex64)
  return start, target, lambda p: jnp.sum(_abs_sq(p - target))


def _update(opt, grad_fn, grads, state, params, **extra):
  # FGSAM+ also takes the graph network's gradient function; here both are
  # the one loss (every other optimizer ignores the extra argument).
  return opt.update(grads, state, params, grad_fn=grad_fn,
                    graph_grad_fn=grad_fn, **extra)


def _descent_grad(loss):
  """``jax.grad`` conjugated, as optax expects for complex parameters.

  For a real loss of complex ``z`` JAX returns the conjugate of the
  steepest-ascent direction; optax (and samtx) step along ``conj(grad)``.
  A no-op for real leaves.
  """
  grad = jax.grad(loss)
  return lambda p: jax.tree.map(jnp.conj, grad(p))


def _step_fn(opt, loss):
  grad_fn = _descent_grad(loss)

  def step(params, state):
    updates, state = _update(opt, grad_fn, grad_fn(params), state, params)
    return optax.apply_updates(params, updates), state
  return step


@pytest.mark.parametrize("name", NAMES)
def test_accepts_extra_args_under_jit_and_does_not_recompile(name):
  opt = CASES[name].make()
  params, _, loss = _parabola(jnp.float32)
  grad_fn = jax.grad(loss)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    updates, state = _update(opt, grad_fn, grad_fn(params), state, params,
                             an_argument_nobody_expects=1)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize("target", [_parabola, _mixed_tensors,
                                    _complex_parabola])
@pytest.mark.parametrize("name", NAMES)
def test_converges(name, target):
  opt = CASES[name].make()
  params, want, loss = target(jnp.float32)
  step = _step_fn(opt, loss)

  @jax.jit
  def run(params, state):
    return jax.lax.scan(lambda c, _: (step(*c), None), (params, state),
                        length=3000)[0]

  params, state = run(params, opt.init(params))
  got = samtx.eval_params(params, state)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-2,
                               rtol=3e-2)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_same_updates_and_same_state(name):
  case = CASES[name]
  plain = case.make()
  injected = optax.inject_hyperparams(case.factory)(**case.kwargs)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  loss = lambda p: sum(jnp.sum(jnp.sin(x) * x ** 2) for x in p)
  step_plain = jax.jit(_step_fn(plain, loss))
  step_injected = jax.jit(_step_fn(injected, loss))
  state_plain = jax.jit(plain.init)(params)
  state_injected = jax.jit(injected.init)(params)
  # Same structure and size: no buffer appears because a default is numeric.
  assert (jax.tree.structure(state_injected.inner_state)
          == jax.tree.structure(state_plain))
  p1, p2 = params, params
  for _ in range(3):
    p1, state_plain = step_plain(p1, state_plain)
    p2, state_injected = step_injected(p2, state_injected)
  for a, b in zip(jax.tree.leaves((p1, state_plain)),
                  jax.tree.leaves((p2, state_injected.inner_state))):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("name", NAMES)
def test_updates_keep_the_params_dtype(name, dtype):
  opt = CASES[name].make()
  loss = lambda x: jnp.sum(x.astype(jnp.float32) ** 2)
  params = jnp.array([1.0, 2.0], dtype)
  grad_fn = jax.grad(loss)
  state = jax.jit(opt.init)(params)
  update = jax.jit(lambda g, s, p: _update(opt, grad_fn, g, s, p))
  for _ in range(2):
    updates, state = update(grad_fn(params), state, params)
    assert updates.dtype == dtype
    params = optax.apply_updates(params, updates)
    assert params.dtype == dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32",
                                   "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_state_shape_and_dtype_stable_under_cond(name, dtype):
  """Both branches of lax.cond must agree on every state leaf's type."""
  with jax.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    opt = CASES[name].make()
    params, _, loss = _parabola(dtype)
    grad_fn = jax.grad(lambda p: loss(p).astype(jnp.float32))

    @jax.jit
    def step(params, state, take):
      updates, new_state = jax.lax.cond(
          take, lambda: _update(opt, grad_fn, grad_fn(params), state, params),
          lambda: (jax.tree.map(jnp.zeros_like, params), state))
      return optax.apply_updates(params, updates), new_state

    state = opt.init(params)
    for take in (True, False, True):
      params, state = step(params, state, take)
      assert params.dtype == dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", NAMES)
def test_multisteps_accumulates_then_steps(name, dtype):
  """The first k-1 micro-steps return zeros; the k-th matches a plain step
  on the averaged gradient (grad_fn forwarded through MultiSteps)."""
  case = CASES[name]
  params = jnp.array([1.0, -2.0, 0.5], dtype)
  loss = lambda x: jnp.sum(x.astype(jnp.float32) ** 2)
  grad_fn = jax.grad(loss)
  opt = optax.MultiSteps(case.make(), every_k_schedule=2)
  state = opt.init(params)
  micro = [grad_fn(params) * s for s in (jnp.asarray(0.5, dtype),
                                         jnp.asarray(1.5, dtype))]
  update = jax.jit(lambda g, s: _update(opt, grad_fn, g, s, params))
  first, state = update(micro[0], state)
  np.testing.assert_array_equal(np.asarray(first, np.float32), 0.0)
  assert first.dtype == dtype
  second, _ = update(micro[1], state)
  inner = case.make()
  want, _ = _update(inner, grad_fn, grad_fn(params), inner.init(params),
                    params)
  np.testing.assert_allclose(np.asarray(second, np.float32),
                             np.asarray(want, np.float32), rtol=1e-2)


@pytest.mark.parametrize("wrapper", ["optax", "samtx"])
@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_a_nan_gradient(name, wrapper):
  wrap = {"optax": optax.apply_if_finite, "samtx": samtx.apply_if_finite}
  opt = wrap[wrapper](CASES[name].make(), max_consecutive_errors=2)
  params, _, loss = _parabola(jnp.float32)
  grad_fn = jax.grad(loss)
  state = opt.init(params)
  _, state = _update(opt, grad_fn, grad_fn(params), state, params)
  nan = jnp.full_like(params, jnp.nan)
  updates, bad_state = _update(opt, grad_fn, nan, state, params)
  np.testing.assert_array_equal(updates, 0.0)
  for a, b in zip(jax.tree.leaves(bad_state.inner_state),
                  jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(a, b)
  assert int(bad_state.notfinite_count) == 1


@pytest.mark.parametrize("name", NAMES)
def test_missing_params_is_a_clear_error_or_not_needed(name):
  opt = CASES[name].make()
  params, _, loss = _parabola(jnp.float32)
  grad_fn = jax.grad(loss)
  state = opt.init(params)
  if name in NEEDS_PARAMS:
    with pytest.raises(ValueError, match="needs params"):
      _update(opt, grad_fn, grad_fn(params), state, None)
  else:
    updates, _ = _update(opt, grad_fn, grad_fn(params), state, None)
    want, _ = _update(opt, grad_fn, grad_fn(params), state, params)
    np.testing.assert_array_equal(updates, want)


@pytest.mark.parametrize("name", NAMES)
def test_constant_schedule_equals_the_float(name):
  case = CASES[name]
  lr = case.kwargs["learning_rate"]
  with_schedule = case.make(learning_rate=optax.constant_schedule(lr))
  plain = case.make()
  params, _, loss = _parabola(jnp.float32)
  p1, s1 = params, with_schedule.init(params)
  p2, s2 = params, plain.init(params)
  step1, step2 = _step_fn(with_schedule, loss), _step_fn(plain, loss)
  for _ in range(5):
    p1, s1 = step1(p1, s1)
    p2, s2 = step2(p2, s2)
  np.testing.assert_allclose(p1, p2, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_integer_leaf_is_rejected_with_its_path(name):
  params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
  with pytest.raises(TypeError, match=r"\['step'\]"):
    CASES[name].make().init(params)


@pytest.mark.parametrize("name", NAMES)
def test_float16_norms_and_accumulators_do_not_overflow(name):
  """||g||^2 = 1e5 > 65504, the float16 maximum: every global norm, scalar
  accumulator and momentum norm must be summed in float32, so the float16
  step follows the float32 one to float16 rounding (a norm summed in float16
  is inf: no perturbation, or a zero step)."""
  case = CASES[name]
  # A radius large enough that the perturbation moves h well past rounding.
  overrides = {"rho": 0.5} if case.two_pass else {}
  grad = lambda p: 10.0 + 100.0 * (p.astype(jnp.float32) - 1.0)

  def first_update(dtype):
    opt = case.make(**overrides)
    params = jnp.ones(1000, dtype)
    grad_fn = lambda p: grad(p).astype(dtype)
    updates, _ = jax.jit(lambda s, p: _update(opt, grad_fn, grad_fn(p), s, p))(
        opt.init(params), params)
    return np.asarray(updates, np.float32)

  got, want = first_update(jnp.float16), first_update(jnp.float32)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-2)


@pytest.mark.parametrize("name", sorted(n for n in NAMES if CASES[n].two_pass))
def test_perturbed_gradient_is_cast_to_the_params_dtype(name):
  """A grad_fn that returns float32 for bfloat16 params (a float32 loss
  head) must not promote the updates or the state."""
  opt = CASES[name].make()
  params = jnp.array([1.0, -2.0, 0.5], jnp.bfloat16)
  f32_grad_fn = lambda p: 2.0 * p.astype(jnp.float32)
  bf16_grad_fn = lambda p: f32_grad_fn(p).astype(jnp.bfloat16)
  state = opt.init(params)
  got, got_state = opt.update(bf16_grad_fn(params), state, params,
                              grad_fn=f32_grad_fn, graph_grad_fn=f32_grad_fn)
  want, want_state = opt.update(bf16_grad_fn(params), state, params,
                                grad_fn=bf16_grad_fn,
                                graph_grad_fn=bf16_grad_fn)
  assert got.dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves((got, got_state)),
                  jax.tree.leaves((want, want_state))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("name", NAMES)
def test_init_keeps_each_state_leaf_on_its_parameter_sharding(name, axis_type):
  """State built by init lives where its parameter lives (FSDP x TP), so a
  sharded model's optimizer state is not gathered onto one device.

  Eagerly on any mesh, and under jit on an Explicit mesh (sharding in types).
  Under jit on an Auto mesh a zeros-like constant has no data dependence on
  its parameter, so XLA picks its layout (optax's own init behaves the same):
  pass out_shardings there, as samtx.parallel's sharded step does.
  """
  inits = ("eager", "jit") if axis_type == "Explicit" else ("eager",)
  axis_type = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  P = jax.sharding.PartitionSpec
  shardings = {"w": jax.sharding.NamedSharding(mesh, P("data", "model")),
               "b": jax.sharding.NamedSharding(mesh, P("model"))}
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.ones((4, 8)), shardings["w"]),
              "b": jax.device_put(jnp.ones(8), shardings["b"])}
    opt = CASES[name].make()
    for init in ({"eager": opt.init, "jit": jax.jit(opt.init)}[k]
                 for k in inits):
      state = init(params)
      checked = 0
      for leaf in jax.tree.leaves(state):
        for key in ("w", "b"):
          if leaf.shape == params[key].shape:
            assert leaf.sharding.is_equivalent_to(shardings[key], leaf.ndim)
            checked += 1
      assert checked == sum(
          1 for x in jax.tree.leaves(state) if np.ndim(x) > 0)


@pytest.mark.parametrize("name", sorted(
    n for n in NAMES if "norm_axis_name" in CASES[n].factory.__code__.co_varnames))
def test_norm_axis_name_is_inert_outside_shard_map_and_checked(name):
  """Outside shard_map XLA reduces across shards itself: the argument must
  change nothing there; a malformed value is a clear error."""
  params, _, loss = _parabola(jnp.float32)
  plain, named = CASES[name].make(), CASES[name].make(norm_axis_name="model")
  p1, s1 = params, plain.init(params)
  p2, s2 = params, named.init(params)
  for _ in range(3):
    p1, s1 = _step_fn(plain, loss)(p1, s1)
    p2, s2 = _step_fn(named, loss)(p2, s2)
  np.testing.assert_array_equal(p1, p2)
  with pytest.raises(TypeError, match="norm_axis_name"):
    CASES[name].make(norm_axis_name=3)
