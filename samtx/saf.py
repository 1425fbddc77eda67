"""Sharpness-aware training for free: SAF's and MESA's trajectory loss.

SAF and MESA (Du et al., 2022) regularise the loss instead of the update, so
they are helpers around a training step, not a perturbation:

- :func:`trajectory_loss`, the distillation term both add to the task loss,
  ``lambda * trajectory_loss(logits, targets)`` after a start epoch;
- SAF's targets are the logits the model gave the same examples ``lag``
  epochs earlier: :func:`saf_memory` allocates the per-example ring buffer,
  :func:`saf_record` writes this epoch's logits, :func:`saf_targets` reads the
  old ones (pure functions over one array, jit- and donation-friendly);
- MESA's targets are a teacher's logits, the model with exponentially
  averaged weights: :func:`mesa` wraps any optimizer and keeps that average
  in its state, :func:`ema_params` reads it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from samtx import _common

__all__ = [
    "MESAState",
    "ema_params",
    "mesa",
    "saf_memory",
    "saf_record",
    "saf_targets",
    "trajectory_loss",
]


# ----------------------------------------------------------------------------
# the trajectory loss
# ----------------------------------------------------------------------------


def trajectory_loss(logits, target_logits, *, temperature=5.0) -> jax.Array:
  r"""SAF / MESA's trajectory loss: KL(target || current) at temperature tau.

  .. math::
    L_\mathrm{tra} = \tau^2\, \frac{1}{B} \sum_i \sum_c p^t_{ic}
      \left(\log p^t_{ic} - \log p^s_{ic}\right),\qquad
    p^t = \mathrm{softmax}(\mathrm{sg}(\hat y)/\tau),\quad
    p^s = \mathrm{softmax}(f_\theta(x)/\tau)

  with :math:`\mathrm{sg}` the stop-gradient: no gradient flows into the
  targets, and the gradient with respect to the logits is
  :math:`\tau\,(p^s - p^t)/B`. This is the official code's
  ``kl_div(log softmax(out/tau), softmax(target/tau)).sum(-1).mean() *
  tau**2`` (the :math:`\tau^2` of Hinton's distillation, not in the paper's
  Eq. 8), computed from ``log_softmax`` so large logits do not overflow.
  Classes the target gives zero probability (``-inf`` target logits)
  contribute 0. Low-precision logits are promoted to float32.

  The training loss is then ``task_loss + lam * trajectory_loss(...)`` from a
  start epoch on (the paper: :math:`\tau = 5`, :math:`\lambda = 0.3` for SAF
  and 0.8 for MESA, start epoch 5); that schedule is the caller's.

  Args:
    logits: the model's logits, shape ``[..., num_classes]``. Every leading
      axis is averaged over (``[batch, classes]``, or
      ``[batch, tokens, classes]`` for sequences: the mean over examples and
      tokens).
    target_logits: logits of the same shape: SAF's recorded logits
      (:func:`saf_targets`) or MESA's teacher output.
    temperature: :math:`\tau > 0`.

  Returns:
    A scalar (float32, or float64 for float64 logits).

  Raises:
    ValueError: the shapes differ or ``temperature`` is not positive.
    TypeError: complex or integer logits.

  Example:
    >>> import jax, jax.numpy as jnp, samtx
    >>> target = jnp.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    >>> logits = jnp.zeros((2, 3))
    >>> loss = lambda z: samtx.trajectory_loss(z, target, temperature=2.0)
    >>> print(f"{loss(logits):.4f}")
    0.9189
    >>> for _ in range(200):
    ...   logits = logits - 1.0 * jax.grad(loss)(logits)
    >>> print(f"{abs(loss(logits)):.4f}")
    0.0000
    >>> bool(jnp.allclose(jax.nn.softmax(logits / 2.0),
    ...                   jax.nn.softmax(target / 2.0), atol=1e-4))
    True

  References:
    Du, Zhou, Feng, Tan, Zhou, 2022, Sharpness-Aware Training for Free,
    https://arxiv.org/abs/2205.14083
    Hinton, Vinyals, Dean, 2015, Distilling the Knowledge in a Neural
    Network, https://arxiv.org/abs/1503.02531
  """
  who = "trajectory_loss"
  _common.check_scalar("temperature", temperature, low=0.0, low_open=True,
                       who=who)
  logits, target_logits = jnp.asarray(logits), jnp.asarray(target_logits)
  for name, x in (("logits", logits), ("target_logits", target_logits)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{who}: {name} must be real floating point, got"
                      f" {x.dtype}.")
  if logits.shape != target_logits.shape or logits.ndim < 1:
    raise ValueError(
        f"{who}: logits and target_logits must have the same shape"
        f" [..., num_classes], got {logits.shape} and {target_logits.shape}.")
  dtype = jnp.promote_types(_common.stat_dtype(logits.dtype),
                            _common.stat_dtype(target_logits.dtype))
  log_student = jax.nn.log_softmax(logits.astype(dtype) / temperature, axis=-1)
  log_teacher = jax.nn.log_softmax(
      jax.lax.stop_gradient(target_logits).astype(dtype) / temperature,
      axis=-1)
  teacher = jnp.exp(log_teacher)
  # 0 log 0 = 0: a class the target rules out (logit -inf) adds nothing.
  per_class = jnp.where(teacher > 0, teacher * (log_teacher - log_student), 0)
  return temperature ** 2 * jnp.mean(jnp.sum(per_class, axis=-1))


# ----------------------------------------------------------------------------
# SAF: the per-example logits memory
# ----------------------------------------------------------------------------


def _check_count(name, value, low, who):
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise TypeError(f"{who}: {name} must be an int, got {value!r}.")
  if value < low:
    raise ValueError(f"{who}: {name} must be >= {low}, got {value!r}.")


def saf_memory(num_examples: int, num_classes: int, *, lag: int = 3,
               dtype=jnp.float32) -> jax.Array:
  r"""SAF's logits memory: a ring buffer of ``lag + 1`` epochs per example.

  An array of zeros, shape ``[num_examples, lag + 1, num_classes]``: slot
  ``epoch % (lag + 1)`` holds the logits recorded in ``epoch``
  (:func:`saf_record`), and :func:`saf_targets` reads the slot written
  ``lag`` epochs earlier. ``lag`` is the second axis minus one, so the
  memory is a plain array: pass it through ``jax.jit`` and donate it.

  Size: ``num_examples * (lag + 1) * num_classes`` values (CIFAR-100 with
  ``lag=3``: 50,000 x 4 x 100 float32 = 80 MB); ``dtype=jnp.bfloat16`` halves
  it. Shard its first axis over the data axis for large datasets.

  Args:
    num_examples: examples in the training set (indices ``0..N-1``).
    num_classes: logits per example.
    lag: :math:`\tilde E \ge 1`, how many epochs old the targets are (the
      paper's default 3).
    dtype: the stored dtype (float32; bfloat16 to halve the memory).

  Returns:
    The zero-filled memory.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> memory = samtx.saf_memory(5, 3, lag=2)
    >>> memory.shape
    (5, 3, 3)
    >>> memory = samtx.saf_record(memory, jnp.array([4, 1]),
    ...                           jnp.ones((2, 3)), epoch=0)
    >>> samtx.saf_targets(memory, jnp.array([4, 0]), epoch=2)  # epoch 0's
    Array([[1., 1., 1.],
           [0., 0., 0.]], dtype=float32)
  """
  who = "saf_memory"
  _check_count("num_examples", num_examples, 1, who)
  _check_count("num_classes", num_classes, 1, who)
  _check_count("lag", lag, 1, who)
  return jnp.zeros((num_examples, lag + 1, num_classes), dtype)


def _check_memory(memory, who):
  if getattr(memory, "ndim", None) != 3 or memory.shape[1] < 2:
    raise ValueError(
        f"{who}: memory must be the [num_examples, lag + 1, num_classes] array"
        f" samtx.saf_memory returns, got shape {getattr(memory, 'shape', None)}.")


def saf_record(memory: jax.Array, indices, logits, epoch, *,
               targets=None) -> jax.Array:
  r"""Writes a batch's logits into SAF's memory, slot ``epoch % (lag + 1)``.

  ``memory.at[indices, epoch % (lag + 1)].set(stop_gradient(logits))``: a
  pure update, so under ``jax.jit`` with the memory donated it happens in
  place. The official code records the training forward's logits every step
  (the augmented view of the example that step saw).

  **Pass the step's targets.** A step reads the targets (:func:`saf_targets`)
  and writes the logits into the same array. XLA orders operations only by
  data: when the written logits do not depend on the read (they come from the
  forward pass; only the loss uses the targets), XLA cannot prove the read
  happens first and copies the *whole* memory every step to keep it valid.
  ``targets=`` makes the write depend on the read through an exact zero
  (``isnan(sum(targets)) * 0``, 0 even for non-finite targets), and the
  donated memory is updated in place.

  Args:
    memory: from :func:`saf_memory`.
    indices: integer example indices, shape ``[batch]`` (any shape
      ``[...]`` with ``logits`` ``[..., num_classes]``).
    logits: the model's logits for those examples (cast to the memory's
      dtype; no gradient flows through).
    epoch: the current epoch (a Python int or an integer array; traced is
      fine).
    targets: the :func:`saf_targets` output read from this ``memory`` in the
      same step, if any (see above; the values are not used).

  Returns:
    The updated memory.

  Example:
    >>> import jax, jax.numpy as jnp, samtx
    >>> @jax.jit
    ... def record(memory, indices, logits, epoch):
    ...   targets = samtx.saf_targets(memory, indices, epoch)
    ...   # ... the loss uses targets and logits ...
    ...   return samtx.saf_record(memory, indices, logits, epoch,
    ...                           targets=targets)
    >>> memory = samtx.saf_memory(4, 2, lag=1)
    >>> memory = record(memory, jnp.array([2]), jnp.array([[1.0, -1.0]]), 0)
    >>> memory[2]
    Array([[ 1., -1.],
           [ 0.,  0.]], dtype=float32)
  """
  _check_memory(memory, "saf_record")
  slot = jnp.asarray(epoch) % memory.shape[1]
  logits = jax.lax.stop_gradient(jnp.asarray(logits))
  if targets is not None:
    # XLA folds neither isnan(.) nor x * 0 for floats: the zero stays a data
    # dependence of the write on the read.
    zero = jnp.isnan(jnp.sum(jax.lax.stop_gradient(targets))).astype(
        logits.dtype) * 0
    logits = logits + zero
  return memory.at[jnp.asarray(indices), slot].set(logits.astype(memory.dtype))


def saf_targets(memory: jax.Array, indices, epoch) -> jax.Array:
  r"""The logits recorded for ``indices`` ``lag`` epochs before ``epoch``.

  Reads slot ``(epoch - lag) % (lag + 1)``, the one :func:`saf_record` wrote
  in epoch ``epoch - lag``. Before ``lag`` epochs have passed that slot was
  never written and holds the initial zeros, whose softmax is the uniform
  distribution: start the trajectory loss at an epoch ``> lag`` (the paper
  starts at epoch 5 with ``lag=3``). Reading and recording in the same step
  touch different slots, so their order does not change the values; pass
  the targets to :func:`saf_record` so that XLA updates the memory in place.

  Args:
    memory: from :func:`saf_memory`.
    indices: integer example indices (shape ``[...]``).
    epoch: the current epoch (a Python int or an integer array).

  Returns:
    An array ``[..., num_classes]`` in the memory's dtype.
  """
  _check_memory(memory, "saf_targets")
  slots = memory.shape[1]
  slot = (jnp.asarray(epoch) - (slots - 1)) % slots
  return memory[jnp.asarray(indices), slot]


# ----------------------------------------------------------------------------
# MESA: the teacher's weights
# ----------------------------------------------------------------------------


class MESAState(NamedTuple):
  """State of :func:`mesa`.

  Attributes:
    ema: the exponential moving average of the parameters after each update,
      the teacher's weights (a tree like the parameters, in their statistics
      dtype: float32 for bfloat16/float16 parameters). Starts at the initial
      parameters.
    inner_state: the wrapped optimizer's state.
  """
  ema: Any
  inner_state: Any


def mesa(optimizer: optax.GradientTransformation, *,
         decay=0.9998) -> optax.GradientTransformationExtraArgs:
  r"""MESA's teacher: keeps the EMA of the parameters in the optimizer state.

  Wraps any optimizer. With :math:`u_t` the wrapped optimizer's update and
  :math:`\theta_t` the parameters passed to ``update``,

  .. math::
    \theta_{t+1} = \theta_t + u_t,\qquad
    v_{t+1} = \beta\, v_t + (1-\beta)\, \theta_{t+1},\qquad v_0 = \theta_0,

  and the update returned is :math:`u_t` unchanged: the wrapper does not
  touch the optimization, it only records :math:`v` (:func:`ema_params`).
  :math:`\theta_{t+1}` is computed as ``optax.apply_updates`` computes it, so
  :func:`mesa` must see the final update: wrap the whole optimizer (a chain,
  a two-pass ``samtx.sam``), not a part of a chain. Extra arguments
  (``grad_fn``) are forwarded. With MSAM inside, :math:`\theta` are the
  held (perturbed) weights.

  The training step uses the teacher from the state *before* the update, as
  the official code does (teacher forward, loss, step, then EMA update):

  .. code-block:: python

    teacher_logits = model.apply(samtx.ema_params(opt_state), x)
    loss = task_loss + lam * samtx.trajectory_loss(logits, teacher_logits)

  **BatchNorm.** The official EMA (timm's ``ModelEmaV2``) averages every
  state-dict entry, BatchNorm running statistics included, and runs the
  teacher in eval mode. In JAX the statistics are model state, not
  optimizer parameters, so average them beside the optimizer with the same
  decay, starting from the initial statistics, one line per step::

    ema_stats = optax.incremental_update(new_batch_stats, ema_stats,
                                         step_size=1 - decay)

  and run the teacher with ``{"params": samtx.ema_params(opt_state),
  "batch_stats": ema_stats}`` in eval mode (``train=False`` /
  ``use_running_average=True``).

  Args:
    optimizer: any ``optax.GradientTransformation``.
    decay: :math:`\beta` in :math:`[0, 1]` (timm's default 0.9998; the paper
      takes :math:`\beta \in (0.9, 1)`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`MESAState`; ``update`` needs ``params``. Memory: one
    parameter-sized buffer beyond the wrapped optimizer's.

  Raises:
    TypeError: ``optimizer`` is not a gradient transformation.
    ValueError: ``decay`` outside ``[0, 1]``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
    >>> opt = samtx.mesa(optax.sgd(0.1), decay=0.9)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> for _ in range(100):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params.round(3), samtx.ema_params(state).round(3))
    [1. 1.] [1. 1.]

  References:
    Du, Zhou, Feng, Tan, Zhou, 2022, Sharpness-Aware Training for Free,
    https://arxiv.org/abs/2205.14083
  """
  who = "mesa"
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
        f"{who}: optimizer must be an optax.GradientTransformation (e.g."
        f" optax.sgd(0.1, momentum=0.9)), got {optimizer!r}.")
  _common.check_scalar("decay", decay, low=0.0, high=1.0, who=who)
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    _common.check_float_leaves(params, who)
    # A copy in its own buffer (donation-safe), on the parameter's sharding.
    ema = jax.tree.map(
        lambda p: jnp.array(p, dtype=_common.stat_dtype(p.dtype), copy=True),
        params)
    return MESAState(ema=ema, inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          f"{who}.update needs params: the teacher averages params + updates.")
    new_updates, inner_state = inner.update(updates, state.inner_state,
                                            params, **extra_args)
    new_params = optax.apply_updates(params, new_updates)
    return new_updates, MESAState(
        ema=_common.ema(state.ema, new_params, decay), inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ema_params(opt_state):
  """The teacher's weights of a :func:`mesa` state found anywhere in ``opt_state``.

  Finds the :class:`MESAState` inside chains, ``optax.inject_hyperparams``,
  ``MultiSteps`` or ``apply_if_finite`` states and returns its ``ema``.

  Args:
    opt_state: an optimizer state holding exactly one MESA state.

  Returns:
    A tree like the parameters (float32 leaves for bfloat16/float16
    parameters: cast them if the model needs its own dtype).

  Raises:
    ValueError: ``opt_state`` holds no MESA state or more than one.

  Example:
    >>> import jax.numpy as jnp, optax, samtx
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0),
    ...                   samtx.mesa(optax.adam(1e-3)))
    >>> samtx.ema_params(opt.init({"w": jnp.ones(2)}))
    {'w': Array([1., 1.], dtype=float32)}
  """
  states = _common.states_of(opt_state, MESAState)
  if len(states) != 1:
    raise ValueError(
        f"ema_params: opt_state must hold exactly one samtx.mesa state, found"
        f" {len(states)}.")
  return states[0].ema
