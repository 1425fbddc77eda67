"""samtx in an Equinox training loop (docs/guides/equinox.md), checked by numbers.

The step the guide shows: `eqx.filter_value_and_grad` for the clean pass,
`grad_fn` over the filtered array parameters (`eqx.partition(model,
eqx.is_inexact_array)`) for the perturbed pass, `eqx.filter_jit` around it.
Each optimizer step is compared with a NumPy transcription of SAM and of
MSAM's recurrence on the flattened parameter vector (gradients from
`jax.grad` of the loss as a function of that vector, so neither Equinox's
filtering nor samtx's transforms are on the reference path). The model holds
an integer array and a dropout layer: the integer array must be neither
perturbed nor updated, and both passes must drop the same units.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import samtx

LR, RHO, MU = 0.07, 0.3, 0.8


class Regressor(eqx.Module):
  """An MLP with dropout, a trainable scale and an integer buffer."""
  mlp: eqx.nn.MLP
  dropout: eqx.nn.Dropout
  scale: jax.Array
  buckets: jax.Array  # int32: not a parameter

  def __init__(self, key):
    self.mlp = eqx.nn.MLP(3, 1, width_size=16, depth=2, activation=jnp.tanh, key=key)
    self.dropout = eqx.nn.Dropout(0.3)
    self.scale = jnp.array(0.9)
    self.buckets = jnp.arange(4, dtype=jnp.int32)

  def __call__(self, x, key):
    hidden = jax.vmap(self.mlp)(x)[:, 0]
    return self.scale * self.dropout(hidden, key=key)


def loss(model, x, y, key):
  return jnp.mean((model(x, key) - y) ** 2)


def make_step(optimizer):
  """The guide's training step."""

  @eqx.filter_jit
  def step(model, opt_state, x, y, key):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def grad_fn(p):  # the perturbed pass: same batch, same dropout key
      return eqx.filter_grad(loss)(eqx.combine(p, static), x, y, key)

    value, grads = eqx.filter_value_and_grad(loss)(model, x, y, key)
    updates, opt_state = optimizer.update(grads, opt_state, params, grad_fn=grad_fn)
    return eqx.apply_updates(model, updates), opt_state, value

  return step


def _data(n=64, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, 3))
  y = jnp.sin(x @ jnp.array([1.0, -2.0, 0.5]))
  return x, y


def _flat(model):
  """The float parameters as one vector, and the loss as a function of it."""
  params, static = eqx.partition(model, eqx.is_inexact_array)
  vector, unravel = ravel_pytree(params)

  def flat_grad(v, x, y, key):
    return np.asarray(jax.grad(lambda w: loss(eqx.combine(unravel(w), static), x, y, key))(
        jnp.asarray(v, jnp.float32)), np.float64)

  return np.asarray(vector, np.float64), flat_grad


def test_sam_step_matches_numpy_sam_and_leaves_integer_arrays_alone():
  model = Regressor(jax.random.key(1))
  x, y = _data()
  optimizer = samtx.sam(LR, RHO)
  opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
  step = make_step(optimizer)
  w, flat_grad = _flat(model)
  for t in range(4):
    key = jax.random.key(100 + t)
    g = flat_grad(w, x, y, key)
    h = flat_grad(w + RHO * g / (np.linalg.norm(g) + 1e-12), x, y, key)  # same mask
    w = w - LR * h
    model, opt_state, _ = step(model, opt_state, x, y, key)
    np.testing.assert_allclose(_flat(model)[0], w, rtol=2e-5, atol=2e-6)
  np.testing.assert_array_equal(model.buckets, np.arange(4))
  assert model.buckets.dtype == jnp.int32


def test_msam_held_weights_and_unperturbed_weights_follow_the_recurrence():
  model = Regressor(jax.random.key(2))
  x, y = _data(seed=1)
  optimizer = samtx.msam(LR, RHO, momentum=MU)
  opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
  step = make_step(optimizer)
  held, flat_grad = _flat(model)  # MSAM starts unperturbed
  v, c = np.zeros_like(held), 0.0
  for t in range(4):
    key = jax.random.key(200 + t)
    g = flat_grad(held, x, y, key)  # one gradient, at the held weights
    clean = held + c * v
    v = MU * v + g
    clean = clean - LR * v
    c = RHO / (np.linalg.norm(v) + 1e-12)
    held = clean - c * v
    model, opt_state, _ = step(model, opt_state, x, y, key)
    np.testing.assert_allclose(_flat(model)[0], held, rtol=2e-5, atol=2e-6)
    # Evaluation: the clean weights, as a model.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    eval_model = eqx.combine(samtx.unperturb(params, opt_state), static)
    np.testing.assert_allclose(_flat(eval_model)[0], clean, rtol=2e-5, atol=2e-6)
  assert not np.allclose(held, clean)  # the held weights really are perturbed


@pytest.mark.parametrize("make_optimizer", [
    lambda: samtx.sam(0.1, rho=0.05, momentum=0.9),
    lambda: samtx.adasam(0.01, rho=0.05),
    lambda: samtx.msam(0.1, rho=0.1, momentum=0.9),
], ids=["sam", "adasam", "msam"])
def test_training_loop_fits(make_optimizer):
  """The guide's loop: the held-out loss of the evaluation weights falls."""
  model = Regressor(jax.random.key(3))
  x, y = _data(256, seed=2)
  x_test, y_test = _data(256, seed=3)
  optimizer = make_optimizer()
  opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
  step = make_step(optimizer)

  def test_loss(model, opt_state):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    clean = eqx.combine(samtx.unperturb(params, opt_state), static)
    return float(loss(eqx.nn.inference_mode(clean), x_test, y_test, None))

  before = test_loss(model, opt_state)
  key = jax.random.key(4)
  for t in range(100):
    batch = slice(64 * (t % 4), 64 * (t % 4 + 1))
    model, opt_state, _ = step(model, opt_state, x[batch], y[batch], jax.random.fold_in(key, t))
  after = test_loss(model, opt_state)
  assert np.isfinite(after) and after < 0.5 * before, (before, after)
