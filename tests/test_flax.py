"""samtx.flax: linen and NNX training steps checked against hand-written steps.

Pitfalls and the tests that prove them:
* BatchNorm statistics from the clean pass only, perturbed pass in training
  mode: ``test_linen_batchnorm_*``, ``test_nnx_batchnorm_and_dropout_*``.
* Dropout: both passes use the same key: ``test_linen_dropout_*``,
  ``test_nnx_batchnorm_and_dropout_*``.
* MSAM evaluation weights: ``test_*_msam_eval_weights_*``.
* Forward passes per step (2 for SAM, 1 for MSAM): ``test_*_every_alias_*``,
  ``test_linen_forward_passes_with_batchnorm``.
"""

import collections
import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import samtx
from samtx import flax as samtx_flax
from tests import fresh_process

TOL = {"rtol": 5e-5, "atol": 5e-6}
N, D, C = 16, 5, 3
RHO, LR = 0.3, 0.1


def _data(seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (N, D)),
          "y": jax.random.randint(ky, (N,), 0, C)}


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _numbers(x):
  if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def _close(a, b, **tol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      _numbers(u), _numbers(v), **(tol or TOL)), a, b)


def _far(a, b, min_diff=1e-3):
  diff = max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert diff > min_diff, diff


def _sam_direction(grads, rho=RHO):
  norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
  return jax.tree.map(lambda g: rho * g / (norm + 1e-12), grads), norm


def _add(a, b, scale=1.0):
  return jax.tree.map(lambda u, v: u + scale * v, a, b)


ALIASES = {
    "sam_nesterov": lambda: samtx.sam(LR, rho=RHO, momentum=0.9, nesterov=True),
    "asam": lambda: samtx.sam(LR, rho=0.5, adaptive=True, eta=0.01),
    "adasam_delayed": lambda: samtx.adasam(0.02, rho=RHO, delayed=True),
    "amsgrad": lambda: samtx.amsgrad(0.02),
    "lightsam_I": lambda: samtx.lightsam(LR, rho=RHO),
    "lightsam_II": lambda: samtx.lightsam(LR, rho=RHO, variant="adagrad"),
    "lightsam_III": lambda: samtx.lightsam(0.02, rho=RHO, variant="adam"),
    "msam": lambda: samtx.msam(LR, rho=RHO),
    "sgd": lambda: optax.sgd(LR),
}
TWO_PASS = {"sam_nesterov", "asam", "adasam_delayed", "lightsam_I",
            "lightsam_II", "lightsam_III"}


# ----------------------------------------------------------------------------
# linen
# ----------------------------------------------------------------------------


class LinenNet(nn.Module):
  batch_norm: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    x = jnp.tanh(x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(C)(x)


def _linen_loss(params, batch, apply):
  return _ce(apply(batch["x"], train=True), batch["y"])


def _linen_state(model, tx, cls=samtx_flax.TrainState):
  variables = model.init(jax.random.key(1), _data()["x"], train=False)
  extra = ({"batch_stats": variables["batch_stats"]}
           if "batch_stats" in variables else {})
  return cls.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                    **extra)


def _hand_linen_forward(model, params, batch_stats, batch, key, train=True):
  """(loss, new_batch_stats) of one linen forward pass written out by hand."""
  variables = {"params": params}
  rngs = None if key is None else {"dropout": key}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
    logits, new = model.apply(variables, batch["x"], train=train, rngs=rngs,
                              mutable=["batch_stats"])
    return _ce(logits, batch["y"]), new["batch_stats"]
  logits = model.apply(variables, batch["x"], train=train, rngs=rngs)
  return _ce(logits, batch["y"]), None


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("perturbed_train",))
def _hand_linen_sam_step(model, params, batch_stats, batch, key, *,
                         perturbed_key=None, perturbed_train=True):
  """Plain SAM + SGD on a linen model; knobs select the *wrong* variants.

  Returns new params, the clean pass's and the perturbed pass's BatchNorm
  statistics, and the metrics.
  """
  fwd = lambda p, k, train=True: _hand_linen_forward(
      model, p, batch_stats, batch, k, train)
  (loss, clean_stats), grads = jax.value_and_grad(fwd, has_aux=True)(params, key)
  e, gnorm = _sam_direction(grads)
  pkey = key if perturbed_key is None else perturbed_key
  (ploss, pert_stats), pgrads = jax.value_and_grad(fwd, has_aux=True)(
      _add(params, e), pkey, perturbed_train)
  new_params = _add(params, pgrads, -LR)
  return new_params, clean_stats, pert_stats, {"loss": loss, "perturbed_loss": ploss,
                             "perturbation_norm": RHO * gnorm / (gnorm + 1e-12)}


def test_linen_batchnorm_stats_from_clean_pass_and_perturbed_pass_in_train_mode():
  model = LinenNet(batch_norm=True)
  state = _linen_state(model, samtx.sam(LR, rho=RHO))
  step = jax.jit(samtx_flax.make_train_step(_linen_loss))
  params, stats = state.params, state.batch_stats
  for t in range(3):
    batch = _data(t)
    want_params, want_stats, wrong_stats, want_metrics = _hand_linen_sam_step(
        model, params, stats, batch, None)
    state, metrics = step(state, batch)
    _close(state.params, want_params)
    _close(state.batch_stats, want_stats)
    _close(metrics, want_metrics)
    # The wrong variants are measurably different, so the checks above bite.
    _far(state.batch_stats, wrong_stats, 1e-4)
    wrong_params, *_ = _hand_linen_sam_step(
        model, params, stats, batch, None, perturbed_train=False)
    _far(state.params, wrong_params)
    params, stats = want_params, want_stats
  assert int(state.step) == 3


def test_linen_dropout_uses_the_same_key_in_both_passes():
  model = LinenNet(dropout=0.5)
  state = _linen_state(model, samtx.sam(LR, rho=RHO))
  step = jax.jit(samtx_flax.make_train_step(_linen_loss))
  root = jax.random.key(42)
  params = state.params
  for t in range(3):
    batch, key = _data(t), jax.random.fold_in(root, t)
    want_params, _, _, want_metrics = _hand_linen_sam_step(
        model, params, None, batch, key)
    state, metrics = step(state, batch, key)
    _close(state.params, want_params)
    _close(metrics, want_metrics)
    wrong_params, *_ = _hand_linen_sam_step(
        model, params, None, batch, key,
        perturbed_key=jax.random.fold_in(key, 1))
    _far(state.params, wrong_params)
    params = want_params


def test_linen_dict_of_rngs_and_aux_metrics():
  model = LinenNet(dropout=0.5)
  state = _linen_state(model, samtx.sam(LR, rho=RHO))

  def loss_fn(params, batch, apply):
    logits = apply(batch["x"], train=True)
    return _ce(logits, batch["y"]), {"accuracy": jnp.mean(
        jnp.argmax(logits, -1) == batch["y"])}

  step = jax.jit(samtx_flax.make_train_step(loss_fn, has_aux=True))
  batch, key = _data(), jax.random.key(3)
  new_state, metrics = step(state, batch, {"dropout": key})
  logits = model.apply({"params": state.params}, batch["x"], train=True,
                       rngs={"dropout": key})
  np.testing.assert_allclose(
      metrics["accuracy"], np.mean(np.argmax(logits, -1) == batch["y"]))
  want_params, *_ = _hand_linen_sam_step(model, state.params, None, batch, key)
  _close(new_state.params, want_params)


def _pure_linen_mlp(p, x):
  """LinenNet() written out in jnp (Dense -> tanh -> Dense)."""
  h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _linen_reference_run(tx, params, steps):
  """The core optimizer on the plain params tree of the jnp model."""
  opt_state = tx.init(params)
  out = []
  for t in range(steps):
    batch = _data(t)
    loss = lambda p: _ce(_pure_linen_mlp(p, batch["x"]), batch["y"])
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params,
                                   grad_fn=jax.grad(loss))
    params = optax.apply_updates(params, updates)
    out.append((params, opt_state))
  return out


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_linen_every_alias_under_jit(name):
  model = LinenNet()
  tx = ALIASES[name]()
  state = _linen_state(model, tx, cls=train_state.TrainState)  # stock state
  want = _linen_reference_run(tx, state.params, 3)
  calls = collections.Counter()

  def counting_apply(*args, **kwargs):
    calls["forward"] += 1  # runs at trace time only
    return model.apply(*args, **kwargs)

  state = state.replace(apply_fn=counting_apply)
  step = jax.jit(samtx_flax.make_train_step(_linen_loss))
  for t, (want_params, want_opt_state) in enumerate(want):
    state, metrics = step(state, _data(t))
    _close(state.params, want_params)
    _close(state.opt_state, want_opt_state)
    assert np.isfinite(metrics["perturbed_loss"])
    if name not in TWO_PASS:  # one pass: the held point is the descent point
      np.testing.assert_array_equal(metrics["perturbed_loss"], metrics["loss"])
  assert type(state) is train_state.TrainState and int(state.step) == 3
  # Forward passes per step (counted once, at trace time): 2 for the two-pass
  # optimizers, 1 for MSAM and the one-pass baselines.
  assert calls["forward"] == (2 if name in TWO_PASS else 1)


def test_linen_train_state_method_and_stock_state_forward_grad_fn():
  model = LinenNet()
  state = _linen_state(model, samtx.sam(LR, rho=RHO))
  stock = _linen_state(model, samtx.sam(LR, rho=RHO), train_state.TrainState)
  batch = _data()
  fwd = lambda p: _hand_linen_forward(model, p, None, batch, None)[0]
  want_params, *_ = _hand_linen_sam_step(model, state.params, None, batch,
                                           None)
  new = jax.jit(lambda s: s.apply_gradients(
      grads=jax.grad(fwd)(s.params), grad_fn=jax.grad(fwd)))(state)
  _close(new.params, want_params)
  new_stock = jax.jit(lambda s: samtx_flax.apply_gradients(
      s, grads=jax.grad(fwd)(s.params), grad_fn=jax.grad(fwd)))(stock)
  _close(new_stock.params, want_params)
  assert type(new_stock) is train_state.TrainState and int(new_stock.step) == 1
  with pytest.raises(TypeError, match="grad_fn"):
    state.apply_gradients(grads=jax.grad(fwd)(state.params))


def test_linen_overwrite_with_gradient_collection_bypasses_tx():
  owg = "_overwrite_with_gradient"
  params = {"params": {"w": jnp.array([3.0, 4.0])}, owg: {"s": jnp.ones(2)}}
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=samtx.sam(LR, rho=RHO))
  loss = lambda p: jnp.sum(p["w"] ** 2)
  grads = {"params": jax.grad(loss)(params["params"]), owg: {"s": jnp.full(2, 7.0)}}
  new = samtx_flax.apply_gradients(state, grads=grads, grad_fn=jax.grad(loss))
  w = params["params"]["w"]
  e, _ = _sam_direction(2 * w)
  np.testing.assert_allclose(new.params["params"]["w"], w - LR * 2 * (w + e),
                             **TOL)
  np.testing.assert_array_equal(new.params[owg]["s"], jnp.full(2, 7.0))


def test_linen_msam_eval_weights_follow_hand_written_recurrence():
  model = LinenNet()
  mu = 0.9
  state = _linen_state(model, samtx.msam(LR, rho=RHO, momentum=mu))
  step = jax.jit(samtx_flax.make_train_step(_linen_loss))
  held = clean = state.params
  velocity = jax.tree.map(jnp.zeros_like, held)
  for t in range(4):
    batch = _data(t)
    grads = jax.grad(lambda p: _hand_linen_forward(
        model, p, None, batch, None)[0])(held)
    v_norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(velocity)))
    state, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["perturbation_norm"],
                               RHO * v_norm / (v_norm + 1e-12), **TOL)
    velocity = jax.tree.map(lambda v, g: mu * v + g, velocity, grads)
    clean = _add(clean, velocity, -LR)
    v_norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(velocity)))
    held = jax.tree.map(lambda x, v: x - RHO * v / (v_norm + 1e-12), clean,
                        velocity)
    _close(state.params, held)
    _close(samtx_flax.eval_params(state), clean)
    _close(samtx_flax.eval_variables(state), {"params": clean})
  _far(state.params, samtx_flax.eval_params(state))


def test_linen_forward_passes_with_batchnorm():
  model = LinenNet(batch_norm=True, dropout=0.2)
  calls = collections.Counter()

  def counting_apply(*args, **kwargs):
    calls["forward"] += 1  # runs at trace time only
    return model.apply(*args, **kwargs)

  state = _linen_state(model, samtx.adasam(0.01, rho=RHO)).replace(
      apply_fn=counting_apply)
  step = jax.jit(samtx_flax.make_train_step(_linen_loss))
  for t in range(2):
    state, _ = step(state, _data(t), jax.random.key(t))
  assert calls["forward"] == 2


def test_linen_bad_arguments_name_the_argument():
  with pytest.raises(TypeError, match="loss_fn"):
    samtx_flax.make_train_step(3)
  with pytest.raises(TypeError, match="has_aux"):
    samtx_flax.make_train_step(_linen_loss, has_aux="yes")
  state = _linen_state(LinenNet(), samtx.sam(LR, rho=RHO))
  step = samtx_flax.make_train_step(_linen_loss)
  with pytest.raises(TypeError, match="rngs"):
    step(state, _data(), 7)
  vector_loss = lambda p, b, apply: jnp.ones(3)
  with pytest.raises(ValueError, match="scalar"):
    samtx_flax.make_train_step(vector_loss)(state, _data())
  with pytest.raises(TypeError, match="has_aux=True"):
    samtx_flax.make_train_step(lambda p, b, a: (1.0, {}))(state, _data())
  clash = lambda p, b, apply: (_linen_loss(p, b, apply), {"loss": 0.0})
  with pytest.raises(ValueError, match="clash"):
    samtx_flax.make_train_step(clash, has_aux=True)(state, _data())
  with pytest.raises(TypeError, match="grad_fn"):
    samtx_flax.apply_gradients(state, grads=state.params, grad_fn=3)


def test_grad_fn_under_nested_transform_warns_and_still_updates():
  model = LinenNet()
  tx = optax.MultiSteps(samtx.sam(LR, rho=RHO), every_k_schedule=1)
  state = _linen_state(model, tx)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state, metrics = jax.jit(samtx_flax.make_train_step(_linen_loss))(
        state, _data())
  assert any("nested JAX transform" in str(w.message) for w in caught)
  assert np.isnan(metrics["perturbed_loss"]) and np.isfinite(metrics["loss"])
  want = _linen_reference_run(tx, _linen_state(model, tx).params, 1)
  _close(state.params, want[0][0])


# ----------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------

NNX_CALLS = collections.Counter()


class NNXNet(nnx.Module):

  def __init__(self, rngs, batch_norm=False, dropout=0.0):
    self.l1 = nnx.Linear(D, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.8, rngs=rngs) if batch_norm else None
    self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.l2 = nnx.Linear(8, C, rngs=rngs)

  def __call__(self, x):
    NNX_CALLS["forward"] += 1  # trace-time count under nnx.jit
    x = self.l1(x)
    if self.bn is not None:
      x = self.bn(x)
    x = jnp.tanh(x)
    if self.drop is not None:
      x = self.drop(x)
    return self.l2(x)


def _nnx_loss(model, batch):
  return _ce(model(batch["x"]), batch["y"])


def _pure_mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  return h @ p["l2"]["kernel"] + p["l2"]["bias"]


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_nnx_every_alias_under_nnx_jit(name):
  model = NNXNet(nnx.Rngs(0))
  tx = ALIASES[name]()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Reference: the core optimizer on the pure param tree of a pure function.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  opt_state = tx.init(params)
  step = nnx.jit(samtx_flax.make_nnx_train_step(_nnx_loss))
  NNX_CALLS.clear()
  for t in range(3):
    batch = _data(t)
    loss = lambda p: _ce(_pure_mlp(p, batch["x"]), batch["y"])
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=jax.grad(loss))
    params = optax.apply_updates(params, updates)
    metrics = step(model, optimizer, batch)
    _close(nnx.as_pure(nnx.state(model, nnx.Param)), params)
    assert np.isfinite(metrics["perturbed_loss"])
  clean = samtx_flax.eval_model(model, optimizer)
  _close(nnx.as_pure(nnx.state(clean, nnx.Param)),
         samtx.unperturb(params, opt_state))
  assert int(optimizer.step[...]) == 3
  # Model calls per step, counted at trace time (once): 2 for SAM, 1 for MSAM.
  assert NNX_CALLS["forward"] == (2 if name in TWO_PASS else 1)


def test_nnx_manual_update_with_make_grad_fn_under_nnx_jit():
  model = NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, samtx.sam(LR, rho=RHO), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    grad_fn = samtx_flax.make_grad_fn(_nnx_loss, model, batch)
    grads = nnx.grad(_nnx_loss)(model, batch)
    optimizer.update(model, grads, grad_fn=grad_fn)

  params = nnx.as_pure(nnx.state(model, nnx.Param))
  batch = _data()
  loss = lambda p: _ce(_pure_mlp(p, batch["x"]), batch["y"])
  e, _ = _sam_direction(jax.grad(loss)(params))
  want = _add(params, jax.grad(loss)(_add(params, e)), -LR)
  step(model, optimizer, batch)
  _close(nnx.as_pure(nnx.state(model, nnx.Param)), want)


@nnx.jit(static_argnames=("perturbed_rng", "stats_from"))
def _hand_nnx_sam_step(model, batch, *, perturbed_rng="same",
                       stats_from="clean"):
  """SAM + SGD on an NNX model by hand: clone, perturb, differentiate."""
  snapshot = nnx.clone(model)  # BatchStat and RNG counters before the step
  loss, grads = nnx.value_and_grad(_nnx_loss)(model, batch)  # clean pass
  grads = nnx.as_pure(grads)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  e, gnorm = _sam_direction(grads)
  perturbed = nnx.clone(snapshot)
  if perturbed_rng == "advanced":  # the wrong variant: rng moved on
    perturbed.drop.rngs.count[...] = model.drop.rngs.count[...]
  nnx.update(perturbed, _add(params, e))
  ploss, pgrads = nnx.value_and_grad(_nnx_loss)(perturbed, batch)
  if stats_from == "perturbed":  # the wrong variant
    nnx.update(model, nnx.state(perturbed, nnx.BatchStat))
  nnx.update(model, _add(params, nnx.as_pure(pgrads), -LR))
  return {"loss": loss, "perturbed_loss": ploss,
          "perturbation_norm": RHO * gnorm / (gnorm + 1e-12)}


def test_nnx_batchnorm_and_dropout_match_hand_written_step():
  make = lambda: NNXNet(nnx.Rngs(0, dropout=5), batch_norm=True, dropout=0.5)
  model, ref, wrong_stats, wrong_rng = make(), make(), make(), make()
  optimizer = nnx.Optimizer(model, samtx.sam(LR, rho=RHO), wrt=nnx.Param)
  step = nnx.jit(samtx_flax.make_nnx_train_step(_nnx_loss))
  for t in range(3):
    batch = _data(t)
    NNX_CALLS.clear()
    metrics = step(model, optimizer, batch)
    assert NNX_CALLS["forward"] == (2 if t == 0 else 0)  # traced once
    want_metrics = _hand_nnx_sam_step(ref, batch)
    _hand_nnx_sam_step(wrong_stats, batch, stats_from="perturbed")
    _hand_nnx_sam_step(wrong_rng, batch, perturbed_rng="advanced")
    # Whole model state: params, BatchStat and the dropout RNG counter.
    _close(nnx.as_pure(nnx.state(model)), nnx.as_pure(nnx.state(ref)))
    _close(metrics, want_metrics)
  _far(nnx.state(model, nnx.BatchStat), nnx.state(wrong_stats, nnx.BatchStat),
       1e-4)
  _far(nnx.state(model, nnx.Param), nnx.state(wrong_rng, nnx.Param))
  assert int(model.drop.rngs.count[...]) == 3  # one draw per step


def test_nnx_msam_eval_weights_and_one_pass_metrics():
  model = NNXNet(nnx.Rngs(0))
  mu = 0.9
  optimizer = nnx.Optimizer(model, samtx.msam(LR, rho=RHO, momentum=mu),
                            wrt=nnx.Param)
  step = nnx.jit(samtx_flax.make_nnx_train_step(_nnx_loss))
  held = clean = nnx.as_pure(nnx.state(model, nnx.Param))
  velocity = jax.tree.map(jnp.zeros_like, held)
  for t in range(4):
    batch = _data(t)
    loss = lambda p: _ce(_pure_mlp(p, batch["x"]), batch["y"])
    held_loss, grads = jax.value_and_grad(loss)(held)
    metrics = step(model, optimizer, batch)
    np.testing.assert_allclose(metrics["loss"], held_loss, **TOL)
    np.testing.assert_array_equal(metrics["perturbed_loss"], metrics["loss"])
    np.testing.assert_allclose(metrics["perturbation_norm"],
                               RHO if t else 0.0, **TOL)
    velocity = jax.tree.map(lambda v, g: mu * v + g, velocity, grads)
    clean = _add(clean, velocity, -LR)
    v_norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(velocity)))
    held = jax.tree.map(lambda x, v: x - RHO * v / (v_norm + 1e-12), clean,
                        velocity)
    _close(nnx.as_pure(nnx.state(model, nnx.Param)), held)
    evaluated = samtx_flax.eval_model(model, optimizer)
    _close(nnx.as_pure(nnx.state(evaluated, nnx.Param)), clean)
  _far(nnx.state(model, nnx.Param), nnx.state(evaluated, nnx.Param))


def test_nnx_bad_arguments_name_the_argument():
  model = NNXNet(nnx.Rngs(0))
  with pytest.raises(TypeError, match="loss_fn"):
    samtx_flax.make_nnx_train_step("loss")
  with pytest.raises(TypeError, match="has_aux"):
    samtx_flax.make_grad_fn(_nnx_loss, model, _data(), has_aux=1)
  with pytest.raises(TypeError, match="model"):
    samtx_flax.make_grad_fn(_nnx_loss, {"w": 1.0}, _data())
  with pytest.raises(TypeError, match="optimizer"):
    samtx_flax.make_nnx_train_step(_nnx_loss)(model, optax.sgd(0.1), _data())
  with pytest.raises(TypeError, match="optimizer"):
    samtx_flax.eval_model(model, optax.sgd(0.1))


def test_plain_gradient_transformation_gets_no_grad_fn():
  """A tx without extra-args support (it would reject grad_fn) still trains."""
  sgd = optax.sgd(LR)
  plain = optax.GradientTransformation(sgd.init, sgd.update)
  batch = _data()
  model = LinenNet()
  state = _linen_state(model, plain)
  fwd = lambda p: _hand_linen_forward(model, p, None, batch, None)[0]
  want = _add(state.params, jax.grad(fwd)(state.params), -LR)
  state, metrics = jax.jit(samtx_flax.make_train_step(_linen_loss))(state, batch)
  _close(state.params, want)
  assert float(metrics["perturbation_norm"]) == 0.0
  net = NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(net, plain, wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(net, nnx.Param))
  loss = lambda p: _ce(_pure_mlp(p, batch["x"]), batch["y"])
  nnx.jit(samtx_flax.make_nnx_train_step(_nnx_loss))(net, optimizer, batch)
  _close(nnx.as_pure(nnx.state(net, nnx.Param)),
         _add(params, jax.grad(loss)(params), -LR))


# ----------------------------------------------------------------------------
# several devices (mesh=...): checked in a fresh process against a
# hand-written per-shard SAM step (tests/fresh_process.py)
# ----------------------------------------------------------------------------

DEVICES, GLOBAL = 8, 32


def _global_data(seed):
  kx, ky = jax.random.split(jax.random.key(100 + seed))
  return {"x": jax.random.normal(kx, (GLOBAL, D)),
          "y": jax.random.randint(ky, (GLOBAL,), 0, C)}


def _shards(batch):
  size = GLOBAL // DEVICES  # device k holds the k-th contiguous slice
  return [jax.tree.map(lambda a: a[k * size:(k + 1) * size], batch)
          for k in range(DEVICES)]


def _mean(trees):
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


def _hand_data_parallel_sam(clean, perturbed, params, m_sharpness):
  """Per-shard SAM + SGD: ``clean[k](p) -> (loss, grads)`` and
  ``perturbed[k](p) -> (loss, grads)`` are device k's passes."""
  losses, grads = zip(*(f(params) for f in clean))
  if not m_sharpness:
    grads = [_mean(grads)] * DEVICES
  directions = [_sam_direction(g) for g in grads]
  ascent = [f(_add(params, e)) for f, (e, _) in zip(perturbed, directions)]
  new_params = _add(params, _mean([g for _, g in ascent]), -LR)
  metrics = {"loss": _mean(losses),
             "perturbed_loss": _mean([l for l, _ in ascent]),
             "perturbation_norm": _mean([RHO * n / (n + 1e-12)
                                         for _, n in directions])}
  return new_params, metrics


def _nnx_pass(snapshot, params, shard):
  """One training-mode pass of a copy of ``snapshot`` at ``params``."""
  model = nnx.clone(snapshot)
  nnx.update(model, params)
  loss, grads = nnx.value_and_grad(_nnx_loss)(model, shard)
  return (loss, nnx.as_pure(grads)), model


def _flat(prefix, tree):
  return {f"{prefix}/{jax.tree_util.keystr(k)}": np.asarray(_numbers(v))
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _replica_spread(tree):
  """Largest difference between the copies of a replicated tree's leaves."""
  return max(float(np.max(np.ptp(np.stack(
      [np.asarray(s.data) for s in x.addressable_shards]), axis=0)))
             for x in jax.tree.leaves(tree))


def compute_flax_multi_device():
  out = {}
  mesh = jax.make_mesh((DEVICES,), ("batch",))
  root = jax.random.key(5)
  # linen: BatchNorm + dropout
  model = LinenNet(batch_norm=True, dropout=0.3)
  for mode in ("m", "global"):
    m_sharpness = mode == "m"
    state = _linen_state(model, samtx.sam(LR, rho=RHO, axis_name="batch"))
    step = samtx_flax.make_train_step(_linen_loss, mesh=mesh,
                                      m_sharpness=m_sharpness)
    params, stats = state.params, state.batch_stats
    for t in range(2):
      batch, key = _global_data(t), jax.random.fold_in(root, t)
      state, metrics = step(state, batch, key)
      passes, device_stats = [], []
      for k, shard in enumerate(_shards(batch)):
        fwd = functools.partial(_hand_linen_forward, model, batch_stats=stats,
                                batch=shard, key=jax.random.fold_in(key, k))
        passes.append(jax.value_and_grad(lambda p, fwd=fwd: fwd(p)[0]))
        device_stats.append(fwd(params)[1])
      new_stats = _mean(device_stats)
      params, want = _hand_data_parallel_sam(passes, passes, params,
                                             m_sharpness)
      stats = new_stats
    out.update(_flat(f"linen/{mode}/run", {"params": state.params,
                                           "stats": state.batch_stats,
                                           "metrics": metrics}))
    out.update(_flat(f"linen/{mode}/ref", {"params": params, "stats": stats,
                                           "metrics": want}))
    out[f"linen/{mode}/spread"] = _replica_spread(
        (state.batch_stats, state.params))
  # The per-device body (axis_name, no mesh) under the user's own jax.pmap.
  from samtx import parallel
  body = samtx_flax.make_train_step(_linen_loss, axis_name="batch")
  state = _linen_state(model, samtx.sam(LR, rho=RHO, axis_name="batch"))
  stacked = parallel.pmap_replicate(state)
  pmapped = jax.pmap(body, axis_name="batch", in_axes=(0, 0, None),
                     out_axes=(0, None))
  for t in range(2):
    batch = jax.tree.map(lambda a: a.reshape((DEVICES, -1) + a.shape[1:]),
                         _global_data(t))
    stacked, metrics = pmapped(stacked, batch, jax.random.fold_in(root, t))
  out.update(_flat("linen/pmap/run", {
      "params": parallel.unreplicate(stacked.params),
      "stats": parallel.unreplicate(stacked.batch_stats), "metrics": metrics}))
  # NNX: BatchNorm + dropout; device k's dropout stream key is folded with k
  make = lambda: NNXNet(nnx.Rngs(0, dropout=5), batch_norm=True, dropout=0.3)
  for mode in ("m", "global"):
    model, ref = make(), make()
    optimizer = nnx.Optimizer(model, samtx.sam(LR, rho=RHO, axis_name="batch"),
                              wrt=nnx.Param)
    step = samtx_flax.make_nnx_train_step(_nnx_loss, mesh=mesh,
                                          m_sharpness=mode == "m")
    for t in range(2):
      batch = _global_data(t)
      metrics = step(model, optimizer, batch)
      snapshots = []
      for k in range(DEVICES):
        snapshot = nnx.clone(ref)
        snapshot.drop.rngs.key[...] = jax.random.fold_in(
            ref.drop.rngs.key[...], k)
        snapshots.append(snapshot)
      cleaned = []  # the models after device k's clean pass

      def clean(p, snapshot, shard):
        loss_grads, after = _nnx_pass(snapshot, p, shard)
        cleaned.append(after)
        return loss_grads

      passes = [(functools.partial(clean, snapshot=c, shard=s),
                 lambda p, c=c, s=s: _nnx_pass(c, p, s)[0])
                for c, s in zip(snapshots, _shards(batch))]
      new_params, want = _hand_data_parallel_sam(
          [c for c, _ in passes], [q for _, q in passes],
          nnx.as_pure(nnx.state(ref, nnx.Param)), mode == "m")
      nnx.update(ref, new_params, _mean(
          [nnx.as_pure(nnx.state(c, nnx.BatchStat)) for c in cleaned]))
      ref.drop.rngs.count[...] = cleaned[0].drop.rngs.count[...]
    out.update(_flat(f"nnx/{mode}/run", {"model": nnx.as_pure(
        nnx.state(model)), "metrics": metrics}))
    out.update(_flat(f"nnx/{mode}/ref", {"model": nnx.as_pure(nnx.state(ref)),
                                         "metrics": want}))
    out[f"nnx/{mode}/spread"] = _replica_spread(
        nnx.as_pure(nnx.state(model, nnx.BatchStat)))
  return out


@pytest.fixture(scope="module")
def multi_device():
  return fresh_process.run("tests.test_flax", "compute_flax_multi_device")


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("mode", ["m", "global"])
def test_multi_device_step_matches_per_shard_hand_step(multi_device, api, mode):
  """make_train_step / make_nnx_train_step with mesh=: params, BatchNorm
  statistics (mean of the devices' clean-pass statistics), the dropout RNG
  counter and the device-averaged metrics equal a hand-written per-shard SAM
  step with per-device dropout keys; every device holds identical copies."""
  keys = [k for k in multi_device if k.startswith(f"{api}/{mode}/ref/")]
  assert keys
  for key in keys:
    np.testing.assert_allclose(
        multi_device[key.replace("/ref/", "/run/")], multi_device[key],
        err_msg=key, **TOL)
  assert multi_device[f"{api}/{mode}/spread"] == 0.0


def test_per_device_body_under_users_pmap_equals_mesh_step(multi_device):
  """make_train_step(axis_name=...) inside the user's own jax.pmap gives the
  numbers of the mesh step (m-sharpness), which equal the hand-written step."""
  keys = [k for k in multi_device if k.startswith("linen/m/ref/")]
  assert keys
  for key in keys:
    np.testing.assert_allclose(
        multi_device[key.replace("linen/m/ref/", "linen/pmap/run/")],
        multi_device[key], err_msg=key, **TOL)


def compute_flax_global_gsam():
  """GSAM with one global perturbation through the Flax steps on 8 devices
  and on one device with the whole batch (no BatchNorm, no dropout: the two
  must agree)."""
  from samtx import parallel
  mesh = jax.make_mesh((DEVICES,), ("batch",))
  gsam = lambda axis_name: samtx.gsam(LR, rho=RHO, alpha=0.3,
                                      axis_name=axis_name)
  batches = [_global_data(t) for t in range(2)]
  out = {}
  model = LinenNet()
  single = jax.jit(samtx_flax.make_train_step(_linen_loss))
  state = _linen_state(model, gsam(None))
  for batch in batches:
    state, _ = single(state, batch)
  out.update(_flat("linen/single", state.params))
  on_mesh = samtx_flax.make_train_step(_linen_loss, mesh=mesh,
                                       m_sharpness=False)
  state = _linen_state(model, gsam("batch"))
  for batch in batches:
    state, _ = on_mesh(state, batch)
  out.update(_flat("linen/mesh", state.params))
  # the per-device body under the user's own jax.pmap
  body = samtx_flax.make_train_step(_linen_loss, axis_name="batch",
                                    m_sharpness=False)
  pmapped = jax.pmap(body, axis_name="batch", out_axes=(0, None))
  stacked = parallel.pmap_replicate(_linen_state(model, gsam("batch")))
  for batch in batches:
    stacked, _ = pmapped(stacked, jax.tree.map(
        lambda a: a.reshape((DEVICES, -1) + a.shape[1:]), batch))
  out.update(_flat("linen/pmap", parallel.unreplicate(stacked.params)))
  for tag, axis_name, step in (
      ("single", None, nnx.jit(samtx_flax.make_nnx_train_step(_nnx_loss))),
      ("mesh", "batch", samtx_flax.make_nnx_train_step(
          _nnx_loss, mesh=mesh, m_sharpness=False))):
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, gsam(axis_name), wrt=nnx.Param)
    for batch in batches:
      step(model, optimizer, batch)
    out.update(_flat(f"nnx/{tag}", nnx.as_pure(nnx.state(model, nnx.Param))))
  out.update(_flat("start", nnx.as_pure(nnx.state(NNXNet(nnx.Rngs(0)),
                                                  nnx.Param))))
  return out


@pytest.fixture(scope="module")
def global_gsam():
  return fresh_process.run("tests.test_flax", "compute_flax_global_gsam")


@pytest.mark.parametrize("route", ["linen/mesh", "linen/pmap", "nnx/mesh"])
def test_global_perturbation_gsam_equals_one_device_whole_batch(global_gsam,
                                                                route):
  """GSAM's rule is nonlinear in the perturbed gradient: with
  m_sharpness=False it must see the global h, not each device's."""
  out = global_gsam
  api = route.split("/")[0]
  keys = [k for k in out if k.startswith(f"{api}/single/")]
  assert keys
  for key in keys:
    np.testing.assert_allclose(out[key.replace("/single/", "/" + route[
        len(api) + 1:] + "/")], out[key], err_msg=key, rtol=2e-5, atol=2e-6)
  moved = max(float(np.max(np.abs(out[f"nnx/single{k[len('start'):]}"]
                                  - out[k])))
              for k in out if k.startswith("start/"))
  assert moved > 1e-2


class FSDPNet(nnx.Module):
  """A tanh MLP whose weights may be split over the mesh axis "batch"."""

  def __init__(self, rngs, fsdp=True):
    init = nnx.initializers.lecun_normal()
    split = {"sharding_names": ("batch", None)} if fsdp else {}
    self.w1 = nnx.Param(init(rngs.params(), (8, 16)), **split)
    self.b1 = nnx.Param(jnp.zeros(16))
    self.w2 = nnx.Param(init(rngs.params(), (16, C)), **split)

  def __call__(self, x):
    return jnp.tanh(x @ self.w1 + self.b1) @ self.w2


def _fsdp_loss(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


def _flax_page_blocks():
  text = (fresh_process.ROOT / "docs" / "guides" / "flax.md").read_text()
  section = text[text.index("### NNX with FSDP"):]
  return re.findall(r"```python\n(.*?)```", section, re.S)[:2]


def compute_nnx_fsdp():
  """The two NNX FSDP routes of docs/guides/flax.md against an unsharded
  run; their parameter and state shardings."""
  rng = np.random.default_rng(3)
  batches = [(jnp.asarray(rng.normal(size=(32, 8)), jnp.float32),
              jnp.asarray(rng.normal(size=(32, C)), jnp.float32))
             for _ in range(3)]
  out = {}
  flat = lambda tag, tree: out.update(_flat(tag, tree))
  specs = lambda tag, tree: out.update(
      {f"{tag}/{jax.tree_util.keystr(k)}": np.asarray(str(v.sharding.spec))
       for k, v in jax.tree_util.tree_leaves_with_path(tree)})
  # unsharded reference: the same optimizer and steps on one device
  model = FSDPNet(nnx.Rngs(0), fsdp=False)
  optimizer = nnx.Optimizer(model, samtx.adasam(1e-2, rho=0.05),
                            wrt=nnx.Param)
  step = nnx.jit(samtx_flax.make_nnx_train_step(_fsdp_loss))
  flat("start", nnx.as_pure(nnx.state(model, nnx.Param)))
  for batch in batches:
    step(model, optimizer, batch)
  flat("reference", nnx.as_pure(nnx.state(model, nnx.Param)))
  first, second = _flax_page_blocks()
  page = {"Model": FSDPNet, "loss_fn": _fsdp_loss, "batches": batches}
  exec(compile(first, "flax.md", "exec"), page)  # noqa: S102
  flat("nnx_jit", nnx.as_pure(nnx.state(page["model"], nnx.Param)))
  specs("nnx_jit/params", nnx.as_pure(nnx.state(page["model"], nnx.Param)))
  specs("nnx_jit/state", nnx.as_pure(page["optimizer"].opt_state))
  exec(compile(second, "flax.md", "exec"), page)  # noqa: S102
  flat("jit_step", nnx.as_pure(nnx.state(page["model"], nnx.Param)))
  specs("jit_step/params", page["params"])
  specs("jit_step/state", page["opt_state"])
  # The replicated mesh step refuses the sharded model.
  with jax.set_mesh(page["mesh"]):
    model = FSDPNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, samtx.adasam(1e-2, rho=0.05,
                                                  axis_name="batch"),
                              wrt=nnx.Param)
  mesh_step = samtx_flax.make_nnx_train_step(_fsdp_loss, mesh=page["mesh"])
  try:
    mesh_step(model, optimizer, batches[0])
    out["mesh_step_error"] = np.asarray("")
  except ValueError as err:
    out["mesh_step_error"] = np.asarray(str(err))
  return out


@pytest.fixture(scope="module")
def nnx_fsdp():
  return fresh_process.run("tests.test_flax", "compute_nnx_fsdp")


@pytest.mark.parametrize("route", ["nnx_jit", "jit_step"])
def test_nnx_fsdp_route_equals_unsharded_run_and_stays_sharded(nnx_fsdp,
                                                               route):
  """Both documented routes give the unsharded numbers; the weights and the
  optimizer's moments stay split over the mesh, the rest replicated."""
  out = nnx_fsdp
  keys = [k[len("reference/"):] for k in out if k.startswith("reference/")]
  assert keys
  for key in keys:
    np.testing.assert_allclose(out[f"{route}/{key}"], out[f"reference/{key}"],
                               err_msg=key, rtol=2e-5, atol=2e-6)
  assert max(float(np.max(np.abs(out[f"reference/{k}"] - out[f"start/{k}"])))
             for k in keys) > 1e-3
  for kind in ("params", "state"):
    got = {k: str(out[k]) for k in out if k.startswith(f"{route}/{kind}/")}
    assert got
    for key, spec in got.items():
      matrix = key.endswith(("w1']", "w2']"))
      # P('batch',) and P('batch', None) are the same layout
      assert (spec.startswith("P('batch'") if matrix else spec == "P()"), (
          key, spec)
    if kind == "state":  # AdaSAM: three moment buffers per weight matrix
      assert sum(spec.startswith("P('batch'") for spec in got.values()) == 6


def test_nnx_mesh_step_refuses_fsdp_params_and_names_the_routes(nnx_fsdp):
  message = str(nnx_fsdp["mesh_step_error"])
  assert "w1" in message and "nnx.jit" in message and "jit_step" in message, (
      message)


def test_linen_mesh_step_refuses_sharded_params():
  """Sharded TrainState params are refused, not silently replicated (the
  check runs before anything is compiled)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((DEVICES,), ("batch",))
  state = _linen_state(LinenNet(), samtx.sam(LR, rho=RHO, axis_name="batch"))
  kernel = state.params["Dense_0"]["kernel"]  # (D, 8): split the 8 columns
  params = {**state.params, "Dense_0": {
      **state.params["Dense_0"],
      "kernel": jax.device_put(kernel, NamedSharding(mesh, P(None, "batch")))}}
  step = samtx_flax.make_train_step(_linen_loss, mesh=mesh)
  with pytest.raises(ValueError, match=r"Dense_0.*kernel.*jit_step"):
    step(state.replace(params=params), _global_data(0))


# ---------------------------------------- a tuple from loss_fn, has_aux off
def test_tuple_from_loss_fn_names_has_aux_and_the_fix_works():
  """The error names only arguments the step builders take."""
  data = _data()
  model = nn.Dense(C)
  params = model.init(jax.random.key(0), data["x"])["params"]

  def linen_loss(params, batch, apply):
    loss = _ce(apply(batch["x"]), batch["y"])
    return loss, {"half": loss / 2}

  nnx_model = nnx.Linear(D, C, rngs=nnx.Rngs(0))

  def nnx_loss(model, x, y):
    loss = _ce(model(x), y)
    return loss, {"half": loss / 2}

  def linen_state():
    return samtx_flax.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=samtx.sam(LR, RHO))

  def nnx_optimizer():
    return nnx.Optimizer(nnx_model, samtx.sam(LR, RHO), wrt=nnx.Param)

  for step_of, call in [
      (lambda **kw: samtx_flax.make_train_step(linen_loss, **kw),
       lambda step: step(linen_state(), data)),
      (lambda **kw: samtx_flax.make_nnx_train_step(nnx_loss, **kw),
       lambda step: step(nnx_model, nnx_optimizer(), data["x"], data["y"])),
  ]:
    with pytest.raises(TypeError) as error:
      call(step_of())
    message = str(error.value)
    assert "has_aux=True" in message and "has_model_state" not in message
    out = call(step_of(has_aux=True))
    metrics = out[1] if isinstance(out, tuple) else out
    assert float(metrics["half"]) == pytest.approx(float(metrics["loss"]) / 2)


# ------------------------------------------- LookSAM's loss at the perturbed point
def _looksam_expected_losses(params, forward, k, steps):
  """(loss, perturbed loss) per step from the core optimizer on the jnp
  model: the loss at SAM's point on second-pass steps (t % k == 0), the
  clean loss on reusing steps (no perturbed point is evaluated there)."""
  tx = samtx.looksam(LR, RHO, k=k, alpha=0.3)
  opt_state = tx.init(params)
  out = []
  for t in range(steps):
    batch = _data(t)
    loss = lambda p: _ce(forward(p, batch["x"]), batch["y"])
    grads = jax.grad(loss)(params)
    perturbed = loss(_add(params, _sam_direction(grads)[0]))
    out.append((loss(params), perturbed if t % k == 0 else loss(params)))
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=jax.grad(loss))
    params = optax.apply_updates(params, updates)
  return out


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_looksam_perturbed_loss_is_finite_and_right_under_both_apis(api, k):
  """grad_fn runs inside LookSAM's once-or-never loop; the loss it computes
  is carried out of the loop (it used to be NaN on every step, k = 1 too)."""
  tx = samtx.looksam(LR, RHO, k=k, alpha=0.3)
  if api == "linen":
    state = _linen_state(LinenNet(), tx)
    want = _looksam_expected_losses(state.params, _pure_linen_mlp, k, 4)
    linen_step = jax.jit(samtx_flax.make_train_step(_linen_loss))

    def step(batch):
      nonlocal state
      state, metrics = linen_step(state, batch)
      return metrics
  else:
    model = NNXNet(nnx.Rngs(0))
    want = _looksam_expected_losses(nnx.as_pure(nnx.state(model, nnx.Param)),
                                    _pure_mlp, k, 4)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx_step = nnx.jit(samtx_flax.make_nnx_train_step(_nnx_loss))
    step = lambda batch: nnx_step(model, optimizer, batch)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "nested JAX transform" warning
    for t, (loss, perturbed) in enumerate(want):
      metrics = step(_data(t))
      np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
      np.testing.assert_allclose(metrics["perturbed_loss"], perturbed,
                                 rtol=1e-5, err_msg=f"step {t}")


def compute_looksam_perturbed_loss_through_wrappers():
  """LookSAM's perturbed_loss where samtx wraps the step's grad_fn: GPA's
  shift around y, and the global-perturbation average on a mesh."""
  mesh = jax.make_mesh((DEVICES,), ("batch",))
  out = {}
  for tag, tx, step in (
      ("gpa", samtx.gpa(samtx.looksam(LR, RHO, k=2, alpha=0.3),
                        train_interp=0.7, eval_interp=0.9),
       jax.jit(samtx_flax.make_train_step(_linen_loss))),
      ("mesh", samtx.looksam(LR, RHO, k=2, alpha=0.3, axis_name="batch"),
       samtx_flax.make_train_step(_linen_loss, mesh=mesh, m_sharpness=False))):
    state = _linen_state(LinenNet(), tx)
    for t in range(3):
      state, metrics = step(state, _global_data(t))
      out[f"{tag}/{t}/loss"] = np.asarray(metrics["loss"])
      out[f"{tag}/{t}/perturbed_loss"] = np.asarray(metrics["perturbed_loss"])
  return out


def test_looksam_perturbed_loss_survives_the_grad_fn_wrappers():
  """The loss recorder samtx.flax attaches to grad_fn must survive GPA's
  shifted grad_fn and the averaged grad_fn of one global perturbation:
  finite everywhere, above the clean loss on second-pass steps (t = 0, 2),
  equal to it on the reusing step."""
  out = fresh_process.run("tests.test_flax",
                          "compute_looksam_perturbed_loss_through_wrappers")
  for tag in ("gpa", "mesh"):
    for t in range(3):
      loss = out[f"{tag}/{t}/loss"]
      perturbed = out[f"{tag}/{t}/perturbed_loss"]
      assert np.isfinite(perturbed), (tag, t)
      if t % 2:
        np.testing.assert_allclose(perturbed, loss, rtol=1e-6)
      else:
        assert perturbed > loss, (tag, t, perturbed, loss)
