"""The models of `samtx compare`: they train, and the step follows DESIGN.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import samtx
from samtx import flax as samtx_flax
from samtx.compare import config
from samtx.compare import data as data_lib
from samtx.compare import models
from samtx.compare import train
from samtx.compare.optimizers import SPECS

# Tiny configurations: a few hundred examples, small widths, 2 epochs.
TINY = {
    "digits-mlp": (config.Workload("digits", "mlp", (("hidden", (32,)),)),
                   256, 32, "sgd", 0.1),
    "digits-cnn": (config.Workload("digits", "cnn", (
        ("channels", (4, 8)), ("kernel", 3), ("dropout", 0.1)),
                                   eval_examples=128, hessian_examples=64),
                   256, 32, "sgd", 0.1),
    "text-transformer": (config.Workload("text", "transformer", (
        ("width", 32), ("depth", 2), ("heads", 2)), eval_examples=64,
                                         hessian_examples=8),
                         128, 8, "adam", 1e-2),
}


def _small(data, n):
  """The first ``n`` training and 64 validation / test examples."""
  return data._replace(x_train=data.x_train[:n], y_train=data.y_train[:n],
                       x_val=data.x_val[:64], y_val=data.y_val[:64],
                       x_test=data.x_test[:64], y_test=data.y_test[:64])


@pytest.fixture(scope="module")
def loaded():
  return {name: data_lib.load(name, context=16) if name == "text" else
          data_lib.load(name) for name in ("digits", "mnist1d", "text")}


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_tiny_model_trains_and_its_loss_falls(name, loaded):
  workload, n, batch, optimizer, lr = TINY[name]
  data = _small(loaded[workload.dataset], n)
  setup = train.Setup(workload, epochs=3, batch_size=batch, hessian_iters=4)
  out = train.train_runs(SPECS[optimizer], data, setup, [lr, lr], [0.0, 0.0],
                         [0, 1], [0.0, 0.0], final=False)
  # The reference: the loss of the freshly initialised model, computed here
  # with the NNX module itself (a near-uniform prediction, about ln C).
  model = models.build(workload.model, data, workload.options)
  m = workload.eval_examples or n
  initial = []
  for seed in (0, 1):
    params, stats = model.init(jax.random.fold_in(jax.random.key(seed), 0))
    logits, _ = model.apply(params, stats, data.x_train[:m], train=False)
    initial.append(float(optax.softmax_cross_entropy_with_integer_labels(
        logits, data.y_train[:m]).mean()))
  assert np.allclose(initial, math.log(data.num_classes), rtol=0.35)
  assert out["curves"]["train_loss"].shape == (2, 3)  # runs x epochs
  final = out["curves"]["train_loss"][:, -1]
  assert np.all(np.isfinite(final))
  assert np.all(final < 0.85 * np.asarray(initial)), (final, initial)


def test_the_cnn_is_1d_on_mnist1d(loaded):
  data = loaded["mnist1d"]
  model = models.build("cnn", data, {"channels": (4, 8), "kernel": 5})
  params, stats = model.init(jax.random.key(0))
  kernel = params["conv1"]["kernel"][...]
  assert kernel.shape == (5, 1, 4)  # one spatial axis
  logits, new_stats = model.apply(params, stats, data.x_train[:3], train=True,
                                  key=jax.random.key(1))
  assert logits.shape == (3, 10)
  assert new_stats["bn2"]["mean"][...].shape == (8,)


def test_the_transformer_is_causal(loaded):
  data = loaded["text"]
  model = models.build("transformer", data, {"width": 16, "depth": 1,
                                             "heads": 2})
  params, stats = model.init(jax.random.key(0))
  tokens = jnp.asarray(data.x_train[:2])
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % data.num_classes)
  before, _ = model.apply(params, stats, tokens, train=False)
  after, _ = model.apply(params, stats, changed, train=False)
  # Positions before the change cannot see it; position 10 does.
  np.testing.assert_allclose(before[:, :10], after[:, :10], atol=1e-6)
  assert not np.allclose(before[:, 10], after[:, 10], atol=1e-4)


@pytest.fixture(scope="module")
def cnn_step(loaded):
  """One SAM step of the digits CNN (BatchNorm + dropout): trainer and flax."""
  workload = TINY["digits-cnn"][0]
  data = loaded["digits"]
  model = models.build("cnn", data, workload.options)
  x, y = jnp.asarray(data.x_train[:32]), jnp.asarray(data.y_train[:32])
  key = jax.random.key(7)
  opt = samtx.sam(0.1, 0.2, momentum=0.9)
  params, stats = model.init(jax.random.key(3))
  carry, loss = train._optimizer_step(
      model, SPECS["sam"], opt, (params, stats, opt.init(params), ()), x, y,
      jnp.arange(32), 0, key, 0.2, 5, 100)
  ours = (*carry[:3], loss)

  # The reference: samtx.flax's NNX step on the same model, with the dropout
  # key passed to both passes as an argument of the loss.
  module = model.create(jax.random.key(3))
  optimizer = nnx.Optimizer(module, opt, wrt=nnx.Param)

  def loss_fn(m, x, y, key):
    logits = m(x, train=True, dropout_key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  metrics = samtx_flax.make_nnx_train_step(loss_fn)(module, optimizer, x, y,
                                                    key)
  return model, (params, stats, x, y, key), ours, module, metrics


def test_the_step_equals_samtx_flax_with_batchnorm_and_dropout(cnn_step):
  _, _, ours, module, metrics = cnn_step
  new_params, new_stats, _, loss = ours
  reference = nnx.as_pure(nnx.state(module, nnx.Param))
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  reference_stats = nnx.as_pure(nnx.state(module, nnx.BatchStat))
  for a, b in zip(jax.tree.leaves(new_stats),
                  jax.tree.leaves(reference_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert float(loss) == pytest.approx(float(metrics["loss"]), rel=1e-5)


def test_batchnorm_statistics_come_from_the_clean_pass_only(cnn_step):
  model, (params, stats, x, _, key), ours, _, _ = cnn_step
  _, new_stats, _, _ = ours
  # The statistics after the step are exactly those of one forward pass at
  # the clean weights with the step's dropout key; a pass at the perturbed
  # weights would give others.
  _, clean = model.apply(params, stats, x, train=True, key=key)
  for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(clean)):
    np.testing.assert_array_equal(a, b)
  perturbed = jax.tree.map(lambda p: 1.5 * p, params)
  _, other = model.apply(perturbed, stats, x, train=True, key=key)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_stats),
                                                   jax.tree.leaves(other)))


def test_text_splits_are_disjoint_windows_of_the_stdlib_corpus(loaded):
  data = loaded["text"]
  corpus = np.frombuffer(data_lib.text_corpus().encode("ascii"), np.uint8)
  assert data.task == "language" and data.num_classes == 128
  # Targets are the inputs shifted by one character.
  np.testing.assert_array_equal(data.x_train[:, 1:], data.y_train[:, :-1])
  # About 8:1:1 of the corpus (whole 4096-character blocks).
  total = sum(x.size for x in (data.x_train, data.x_val, data.x_test))
  assert total == pytest.approx(len(corpus), rel=0.01)
  assert len(data.y_val) == pytest.approx(len(data.y_train) / 8, rel=0.15)
  assert len(data.y_val) == len(data.y_test)
  # The first training window is the corpus's first 16 characters.
  np.testing.assert_array_equal(data.x_train[0], corpus[:16])
  assert "argparse.py" in data.source

