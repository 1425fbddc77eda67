"""Every alias reaches a small loss on a quadratic and on a classification task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx

# (factory, steps) tuned once on these problems; each is a plain, jitted loop.
QUADRATIC = {
    "sam": lambda: samtx.sam(0.1, 0.05, momentum=0.9),
    "asam": lambda: samtx.sam(0.1, 0.05, momentum=0.9, adaptive=True, eta=0.01),
    "adasam": lambda: samtx.adasam(0.05, 0.05),
    "adasam_delayed": lambda: samtx.adasam(0.05, 0.05, delayed=True),
    "amsgrad": lambda: samtx.amsgrad(0.05),
    "lightsam_I": lambda: samtx.lightsam(2.0, 0.1, variant="adagrad_norm"),
    "lightsam_II": lambda: samtx.lightsam(1.0, 0.1, variant="adagrad"),
    "lightsam_III": lambda: samtx.lightsam(0.05, 0.1, variant="adam"),
    "msam": lambda: samtx.msam(0.1, 0.05, momentum=0.9),
}


def _train(opt, loss, params, steps):
  grad_fn = jax.grad(loss)

  def body(carry, _):
    p, s = carry
    u, s = opt.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return (optax.apply_updates(p, u), s), None

  (params, state), _ = jax.jit(
      lambda p, s: jax.lax.scan(body, (p, s), None, length=steps))(
          params, opt.init(params))
  return samtx.unperturb(params, state)


@pytest.mark.parametrize("name", QUADRATIC)
def test_quadratic(name):
  rng = np.random.default_rng(0)
  scales = jnp.asarray(rng.uniform(0.5, 2.0, 10), jnp.float32)
  target = jnp.asarray(rng.normal(size=10), jnp.float32)
  loss = lambda p: 0.5 * jnp.sum(scales * (p["x"] - target) ** 2)
  params = {"x": jnp.zeros(10)}
  initial = float(loss(params))
  final = float(loss(_train(QUADRATIC[name](), loss, params, 400)))
  assert final < 1e-3 * initial, (name, initial, final)


def _blobs(n=512, classes=4, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(scale=2.0, size=(classes, dim))
  labels = rng.integers(0, classes, n)
  x = centers[labels] + rng.normal(size=(n, dim))
  return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


CLASSIFICATION = dict(QUADRATIC)
CLASSIFICATION.update({
    "lightsam_I": lambda: samtx.lightsam(1.0, 0.1, variant="adagrad_norm"),
    "lightsam_II": lambda: samtx.lightsam(0.2, 0.1, variant="adagrad"),
    "lightsam_III": lambda: samtx.lightsam(0.01, 0.1, variant="adam"),
    "adasam": lambda: samtx.adasam(0.01, 0.05),
    "adasam_delayed": lambda: samtx.adasam(0.01, 0.05, delayed=True),
    "amsgrad": lambda: samtx.amsgrad(0.01),
})


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_mlp_classification(name):
  x, y = _blobs()
  key1, key2 = jax.random.split(jax.random.key(0))
  params = {
      "w1": jax.random.normal(key1, (8, 32)) / jnp.sqrt(8.0),
      "b1": jnp.zeros(32),
      "w2": jax.random.normal(key2, (32, 4)) / jnp.sqrt(32.0),
      "b2": jnp.zeros(4),
  }

  def loss(p):
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  trained = _train(CLASSIFICATION[name](), loss, params, 300)
  logits = jnp.tanh(x @ trained["w1"] + trained["b1"]) @ trained["w2"] + trained["b2"]
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y))
  assert float(loss(trained)) < 0.25, name
  assert accuracy > 0.9, name
