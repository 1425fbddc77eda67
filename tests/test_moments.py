"""The moment transforms alone, against the NumPy rules, in several dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers
from tests import reference

RULES = {
    "amsgrad": (lambda: samtx.scale_by_amsgrad(0.8, 0.9, 1e-6),
                lambda xs: reference.AMSGrad(xs, 1e-6, 0.8, 0.9)),
    "amsgrad_delayed": (
        lambda: samtx.scale_by_amsgrad(0.8, 0.9, 1e-6, delayed=True),
        lambda xs: reference.AMSGrad(xs, 1e-6, 0.8, 0.9, delayed=True)),
    "adagrad_norm": (lambda: samtx.scale_by_adagrad_norm(1e-6),
                     lambda xs: reference.AdaGradNorm(xs, 1e-6)),
    "adagrad": (lambda: samtx.scale_by_adagrad(1e-6),
                lambda xs: reference.AdaGrad(xs, 1e-6)),
    "adam": (lambda: samtx.scale_by_adam_uncorrected(0.8, 0.9, 1e-6),
             lambda xs: reference.AdamForm(xs, 1e-6, 0.8, 0.9)),
}


@pytest.mark.parametrize("name", RULES)
def test_rule_matches_reference_over_steps(name, dtype):
  make, make_ref = RULES[name]
  _, _, params, tree_of = helpers.problem_and_loss(dtype)
  rng = np.random.default_rng(1)
  tx, ref = make(), make_ref(helpers.leaves(params))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(6):
    grads_np = [rng.normal(size=np.shape(x)) for x in helpers.leaves(params)]
    grads = jax.tree.unflatten(jax.tree.structure(params),
                               [jnp.asarray(g, dtype) for g in grads_np])
    out, state = update(grads, state)
    want = ref([np.asarray(g, np.float64) for g in helpers.leaves(grads)])
    for o, w in zip(helpers.leaves(out), want):
      np.testing.assert_allclose(o, w, **helpers.tolerances(dtype))
    for leaf in jax.tree.leaves(out):
      assert leaf.dtype == dtype


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("low", [jnp.bfloat16, jnp.float16])
def test_low_precision_keeps_float32_statistics(name, low):
  make, make_ref = RULES[name]
  params = {"w": jnp.zeros((4, 3), low), "b": jnp.zeros(3, low)}
  tx = make()
  state = tx.init(params)
  for leaf in jax.tree.leaves(state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, low), params)
  out, state = jax.jit(tx.update)(grads, state)
  ref = make_ref([np.zeros((3,)), np.zeros((4, 3))])
  want = ref([np.full(3, 0.5), np.full((4, 3), 0.5)])
  for o, w in zip(helpers.leaves(out), want):
    np.testing.assert_allclose(o, w, rtol=1e-2)
  # A zero gradient next: finite, and the dtype is kept.
  out, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state)
  for leaf in jax.tree.leaves(out):
    assert leaf.dtype == low
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_amsgrad_differs_from_optax_amsgrad_as_documented():
  """optax bias-corrects and adds eps outside the sqrt; samtx does neither.
  At step 1 with b1=0.9, b2=0.999: samtx gives (1-b1)/sqrt(1-b2) * sign(g),
  optax gives ~sign(g)."""
  g = jnp.array([1.0, -2.0])
  ours, _ = samtx.scale_by_amsgrad().update(g, samtx.scale_by_amsgrad().init(g))
  theirs, _ = optax.scale_by_amsgrad().update(g, optax.scale_by_amsgrad().init(g))
  np.testing.assert_allclose(ours, 0.1 / np.sqrt(0.001) * np.sign(g), rtol=1e-5)
  np.testing.assert_allclose(theirs, np.sign(g), rtol=1e-5)


def test_lightsam_preconditioner_maps_variants():
  assert isinstance(samtx.lightsam_preconditioner("adagrad_norm").init(jnp.ones(2)),
                    samtx.ScaleByAdagradNormState)
  assert isinstance(samtx.lightsam_preconditioner("adagrad").init(jnp.ones(2)),
                    samtx.ScaleByAdagradState)
  assert isinstance(samtx.lightsam_preconditioner("adam").init(jnp.ones(2)),
                    samtx.ScaleByAdamUncorrectedState)


def test_amsgrad_state_can_be_donated_straight_from_init():
  """mu and nu must be distinct buffers, else donate_argnums fails."""
  params = {"w": jnp.ones((3, 2))}
  tx = samtx.scale_by_amsgrad()
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s), donate_argnums=(1,))
  out, state = step(params, state)
  np.testing.assert_allclose(out["w"], 0.1 / np.sqrt(0.001), rtol=1e-5)
