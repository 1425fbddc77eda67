"""Property-based tests: random trees, dtypes and hyper-parameters."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

import samtx
from tests import reference

SETTINGS = hypothesis.settings(max_examples=20, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=4)
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])
unit = st.floats(0.0, 0.99)


def _problem(shape_list, dtype, seed):
  """Params and a quadratic's gradient function on a random tree."""
  rng = np.random.default_rng(seed)
  params = {f"leaf{i}": jnp.asarray(rng.uniform(-1, 1, s), dtype)
            for i, s in enumerate(shape_list)}
  curv = {k: jnp.asarray(rng.uniform(0.1, 2.0, v.shape), dtype) for k, v in params.items()}
  shift = {k: jnp.asarray(rng.normal(size=v.shape), dtype) for k, v in params.items()}
  grad_fn = lambda p: jax.tree.map(lambda x, c, d: c * x + d, p, curv, shift)
  return params, grad_fn


def _optimizers(lr, rho, b1, b2, eps, variant):
  return {
      "sam": samtx.sam(lr, rho, momentum=b1),
      "asam": samtx.sam(lr, rho, adaptive=True, eta=0.01),
      "adasam": samtx.adasam(lr, rho, b1=b1, b2=b2, eps=eps),
      "adasam_delayed": samtx.adasam(lr, rho, b1=b1, b2=b2, eps=eps, delayed=True),
      "lightsam": samtx.lightsam(lr, rho, variant=variant, b1=b1, b2=b2, eps=eps),
      "msam": samtx.msam(lr, rho, momentum=b1),
  }


hyper = dict(lr=st.floats(1e-4, 1.0), rho=st.floats(0.0, 1.0), b1=unit,
             b2=st.floats(0.0, 0.999), eps=st.floats(1e-10, 1e-3),
             variant=st.sampled_from(samtx.LIGHTSAM_VARIANTS))


@SETTINGS
@hypothesis.given(shape_list=shapes, dtype=dtypes, seed=st.integers(0, 2**16),
                  **hyper)
def test_updates_finite_and_shapes_dtypes_preserved(shape_list, dtype, seed, lr,
                                                    rho, b1, b2, eps, variant):
  params, grad_fn = _problem(shape_list, dtype, seed)
  for name, opt in _optimizers(lr, rho, b1, b2, eps, variant).items():
    state = opt.init(params)
    p = params
    for _ in range(2):
      updates, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
      for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.shape == x.shape and u.dtype == x.dtype, name
        assert np.all(np.isfinite(np.asarray(u, np.float32))), name
      p = optax.apply_updates(p, updates)
      for x, x0 in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
        assert x.dtype == x0.dtype, name


@SETTINGS
@hypothesis.given(shape_list=shapes, seed=st.integers(0, 2**16),
                  lr=hyper["lr"], b1=unit, b2=hyper["b2"], eps=hyper["eps"],
                  delayed=st.booleans())
def test_rho_zero_equals_base(shape_list, seed, lr, b1, b2, eps, delayed):
  params, grad_fn = _problem(shape_list, jnp.float32, seed)
  pairs = [
      (samtx.sam(lr, 0.0, momentum=b1), optax.sgd(lr, momentum=b1)),
      (samtx.adasam(lr, 0.0, b1=b1, b2=b2, eps=eps, delayed=delayed),
       samtx.amsgrad(lr, b1=b1, b2=b2, eps=eps, delayed=delayed)),
      (samtx.msam(lr, 0.0, momentum=b1), optax.sgd(lr, momentum=b1)),
  ]
  for ours, base in pairs:
    s1, s2 = ours.init(params), base.init(params)
    p1 = p2 = params
    for _ in range(3):
      u1, s1 = ours.update(grad_fn(p1), s1, p1, grad_fn=grad_fn)
      u2, s2 = base.update(grad_fn(p2), s2, p2)
      p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_array_equal(a, b)


@SETTINGS
@hypothesis.given(shape_list=shapes, seed=st.integers(0, 2**16),
                  rho=st.floats(1e-2, 1.0))
def test_sam_perturbation_has_norm_rho(shape_list, seed, rho):
  params, grad_fn = _problem(shape_list, jnp.float32, seed)
  tx = samtx.sam_perturbation(rho)
  seen = []
  _, state = tx.update(grad_fn(params), tx.init(params), params,
                       grad_fn=lambda p: seen.append(p) or grad_fn(p))
  shift = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
           for a, b in zip(jax.tree.leaves(seen[0]), jax.tree.leaves(params))]
  np.testing.assert_allclose(reference.norm(shift), rho, rtol=1e-3)
  np.testing.assert_allclose(float(state.perturbation_norm), rho, rtol=1e-5)


@SETTINGS
@hypothesis.given(shape_list=shapes, dtype=dtypes, seed=st.integers(0, 2**16),
                  rho=st.floats(0.0, 1.0), eps=hyper["eps"],
                  variant=st.sampled_from(["adagrad_norm", "adagrad"]))
def test_lightsam_accumulators_are_monotone(shape_list, dtype, seed, rho, eps,
                                            variant):
  params, grad_fn = _problem(shape_list, dtype, seed)
  opt = samtx.lightsam(0.1, rho, variant=variant, eps=eps)
  state = opt.init(params)
  previous = None
  p = params
  for _ in range(4):
    updates, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
    p = optax.apply_updates(p, updates)
    ascent_sums = jax.tree.leaves(state[0].inner)
    descent_sums = jax.tree.leaves(state[1])
    current = [np.asarray(x, np.float64) for x in ascent_sums + descent_sums]
    if previous is not None:
      for now, before in zip(current, previous):
        assert np.all(now >= before)
    previous = current
