"""Regressions for the defects found by outside test suites (issue 12).

Each test here failed on the code before its fix: the delayed AMSGrad step
on a coordinate with no history, complex leaves squared as ``z**2``, float16
overflow in per-coordinate accumulators, and the counters of
``samtx.apply_if_finite``. (MSAM's exact undo is in ``test_msam.py``;
``inject_hyperparams`` state, integer leaves, global-norm overflow and the
perturbed gradient's dtype are in ``test_common_suite.py``.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import reference


def _scripted_gradients(steps, shape, seed):
  """Gradients whose coordinates stay exactly zero for a random number of
  steps (a dead ReLU unit, an always-zero pixel), then come alive.

  Yields (gradient, mask of the coordinates that wake up at this step).
  """
  rng = np.random.default_rng(seed)
  wake = rng.integers(0, steps, size=shape)
  for t in range(steps):
    yield np.where(t >= wake, rng.normal(size=shape), 0.0), wake == t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delayed_amsgrad_follows_the_per_coordinate_rule(dtype, seed):
  """Divide by the previous vhat where it has history, else by this step's
  (the old rule stepped (1-b1)|h|/eps = 1e7 when a coordinate woke up)."""
  shape, eps = (6, 5), 1e-8
  tx = samtx.scale_by_amsgrad(0.9, 0.999, eps, delayed=True)
  ref = reference.AMSGrad([np.zeros(shape)], eps, 0.9, 0.999, delayed=True)
  state = tx.init(jnp.zeros(shape, dtype))
  update = jax.jit(tx.update)
  tol = ({"rtol": 1e-10, "atol": 1e-12} if dtype == jnp.float64
         else {"rtol": 2e-5, "atol": 1e-6})
  for t, (g, waking) in enumerate(_scripted_gradients(30, shape, seed)):
    out, state = update(jnp.asarray(g, dtype), state)
    (want,) = ref([g])
    np.testing.assert_allclose(np.asarray(out, np.float64), want,
                               err_msg=f"step {t}", **tol)
    # A coordinate's first move divides by its own vhat = (1-b2) h^2, so its
    # step is (1-b1)/sqrt(1-b2) = 3.16 in modulus, whatever h is.
    np.testing.assert_allclose(np.abs(np.asarray(out, np.float64))[waking],
                               0.1 / np.sqrt(0.001), rtol=1e-5)


def test_delayed_amsgrad_on_rosenbrock_stays_bounded():
  """amsgrad(1e-2, delayed=True) used to run off to 4e7 on Rosenbrock."""
  loss = lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
  opt = samtx.amsgrad(1e-2, delayed=True)
  params = jnp.array([-1.0, 1.0])
  state = opt.init(params)

  @jax.jit
  def run(params, state):
    def step(carry, _):
      p, s = carry
      u, s = opt.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, state), length=5000)[0]

  params, _ = run(params, state)
  assert np.all(np.abs(np.asarray(params)) < 2.0)
  assert float(loss(params)) < 1e-2


def test_sam_perturbation_of_complex_params_has_length_rho():
  """[3+4j, 1j]: ||g|| uses |z|^2 = 26, not z^2 (which put e at 5e10)."""
  rho = 0.1
  params = jnp.array([3.0 + 4.0j, 1.0j], jnp.complex64)
  seen = []

  def grad_fn(p):
    seen.append(p)
    return jnp.zeros_like(p)

  tx = samtx.sam_perturbation(rho)
  tx.update(params, tx.init(params), params, grad_fn=grad_fn)
  perturbation = np.asarray(seen[0] - params)
  np.testing.assert_allclose(np.linalg.norm(perturbation), rho, rtol=1e-6)
  np.testing.assert_allclose(perturbation, rho * np.asarray(params)
                             / np.sqrt(26.0), rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: samtx.scale_by_amsgrad(0.9, 0.999),
    lambda: samtx.scale_by_adagrad(),
    lambda: samtx.scale_by_adam_uncorrected(0.9, 0.999),
], ids=["amsgrad", "adagrad", "adam_uncorrected"])
def test_complex_second_moments_are_real_and_use_abs_squared(make):
  """optax's convention: v accumulates |h|^2 (real, >= 0), never h^2."""
  tx = make()
  h = jnp.array([1.0 + 2.0j, 3.0j, -1.0], jnp.complex64)
  state = tx.init(jnp.zeros_like(h))
  updates, state = tx.update(h, state)
  for name, leaf in state._asdict().items():
    if name in ("nu", "nu_max", "sum_of_squares"):
      assert not jnp.iscomplexobj(leaf), name
      assert np.all(np.asarray(leaf) > 0), name
  # With b1 = b2 = 0 every rule reduces to h / |h|: unit modulus.
  unit = {"amsgrad": samtx.scale_by_amsgrad(0.0, 0.0),
          "adam": samtx.scale_by_adam_uncorrected(0.0, 0.0)}
  for tx in unit.values():
    out, _ = tx.update(h, tx.init(h))
    np.testing.assert_allclose(np.abs(np.asarray(out)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.abs(np.asarray(updates)),
                             np.abs(np.asarray(updates)))


def test_adagrad_norm_keeps_the_imaginary_part():
  tx = samtx.scale_by_adagrad_norm()
  h = jnp.array([3.0 + 4.0j], jnp.complex64)
  out, _ = tx.update(h, tx.init(h))
  np.testing.assert_allclose(np.asarray(out), [0.6 + 0.8j], rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: samtx.scale_by_amsgrad(0.9, 0.999),
    lambda: samtx.scale_by_amsgrad(0.9, 0.999, delayed=True),
    lambda: samtx.scale_by_adagrad(),
    lambda: samtx.scale_by_adam_uncorrected(0.9, 0.999),
    lambda: samtx.scale_by_adagrad_norm(),
], ids=["amsgrad", "amsgrad_delayed", "adagrad", "adam_uncorrected",
        "adagrad_norm"])
def test_float16_squares_are_taken_in_float32(make):
  """h = 300 per coordinate: h^2 = 9e4 overflows float16 (max 65504).
  Squared in the leaf's dtype the accumulator is inf and the step 0."""
  def first_update(dtype):
    tx = make()
    h = jnp.full((1000,), 300.0, dtype)
    out, _ = tx.update(h, tx.init(h))
    return np.asarray(out, np.float32)

  got, want = first_update(jnp.float16), first_update(jnp.float32)
  assert np.all(want != 0)
  np.testing.assert_allclose(got, want, rtol=2e-3)


def test_adagrad_norm_float16_matches_the_documented_step():
  """1000 x 10.0 in float16: ||g||^2 = 1e5; step 10 / sqrt(1e5) = 0.0316."""
  tx = samtx.scale_by_adagrad_norm()
  g = jnp.full((1000,), 10.0, jnp.float16)
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.asarray(out, np.float32), 0.0316, rtol=2e-3)


def test_apply_if_finite_counters_follow_optax_semantics():
  """total_notfinite counts every rejected step and is never reset by a good
  one; notfinite_count resets; last_finite says whether this step was
  finite, also when max_consecutive_errors lets a bad step through."""
  opt = samtx.apply_if_finite(samtx.sam(0.1, 0.05), max_consecutive_errors=2)
  params = jnp.ones(3)
  good = lambda p: 2.0 * p
  bad = lambda p: p * jnp.nan
  state = opt.init(params)
  update = jax.jit(lambda s, grad_fn: opt.update(good(params), s, params,
                                                 grad_fn=grad_fn),
                   static_argnums=1)
  history = []
  for grad_fn in (bad, good, bad, bad, bad, good):
    updates, state = update(state, grad_fn)
    history.append((int(state.notfinite_count), int(state.total_notfinite),
                    bool(state.last_finite),
                    bool(np.all(np.isfinite(np.asarray(updates)))),
                    bool(np.all(np.asarray(updates) == 0))))
  assert history == [
      (1, 1, False, True, True),    # rejected: zero update
      (0, 1, True, True, False),    # good: count resets, total kept
      (1, 2, False, True, True),
      (2, 3, False, True, True),
      (3, 4, False, False, False),  # past the limit: the NaN goes through
      (0, 4, True, True, False),
  ]
