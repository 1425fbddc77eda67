"""Flax integration: samtx optimizers in linen ``TrainState`` and NNX ``Optimizer``.

Two-pass optimizers (SAM, ASAM, AdaSAM, LightSAM) need a ``grad_fn`` at
``update`` time; this module supplies it for both Flax APIs and gets the
SAM-specific details right:

* **BatchNorm**: running statistics are updated from the clean pass only.
  The perturbed pass runs in training mode (it normalises with its own batch
  statistics) but its statistic updates are discarded.
* **Dropout**: the perturbed pass uses the same dropout key as the clean pass,
  so both gradients see the same sub-network.
* **MSAM, GPA**: the weights a training loop holds are not the ones to
  evaluate (MSAM's carry the perturbation, GPA's are its gradient point);
  :func:`eval_params`, :func:`eval_variables` and :func:`eval_model` return the
  weights to evaluate or export (via :func:`samtx.eval_params`).
* **Several devices**: with ``mesh=`` (or ``axis_name=`` inside your own
  ``shard_map``/``pmap``) the step builders train data-parallel: per-device
  dropout keys, BatchNorm statistics averaged over devices (identical copies
  everywhere), m-sharpness or one global perturbation, averaged metrics.
* **Metrics for free**: :func:`make_train_step` and
  :func:`make_nnx_train_step` return the loss at the held weights, the loss
  at the perturbed point and the perturbation norm while running exactly the
  forward passes the optimizer needs (two for SAM, one for MSAM).

Inside this module ``import flax`` is the Flax package (imports are absolute);
import this module as ``samtx.flax`` or ``from samtx import flax as samtx_flax``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.extend
import jax.numpy as jnp
import optax
try:
  from flax import nnx
  from flax import struct
  from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
  from flax.training import train_state
except ImportError as error:
  # Flax is an optional extra: the core `import samtx` does not need it.
  raise ImportError(
      "samtx.flax needs Flax, which is an optional dependency of samtx: "
      "install it with `pip install 'samtx[flax]'`.") from error

from samtx import _common
from samtx import parallel as _parallel
from samtx.gpa import eval_params as _eval_params
from samtx.msam import MSAMState
from samtx.msam import unperturb
from samtx.perturbations import PerturbationState

__all__ = [
    "TrainState",
    "apply_gradients",
    "eval_params",
    "eval_variables",
    "make_train_step",
    "make_grad_fn",
    "make_nnx_train_step",
    "eval_model",
    "perturbation_norm",
]

Metrics = dict
_REPLICATED = jax.sharding.PartitionSpec()


# ----------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------


def _check_callable(name: str, value, who: str) -> None:
  if not callable(value):
    raise TypeError(f"{who}: {name} must be callable, got {value!r}.")


def _check_bool(name: str, value, who: str) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{who}: {name} must be a bool, got {value!r}.")


def _split_aux(out, has_aux: bool, who: str):
  """``(loss, aux)`` from a loss function's output, with shape checks."""
  if not has_aux and isinstance(out, tuple):
    # The Flax steps keep model state themselves (linen: the TrainState's
    # batch_stats; NNX: the model, in place): the only tuple is (loss, aux).
    raise TypeError(
        f"{who}: loss_fn returned a tuple; pass has_aux=True"
        " when it returns (loss, aux) with aux a dict of metrics. Model state"
        " is not returned: BatchNorm statistics are kept by the step (linen:"
        " the TrainState's batch_stats; NNX: the model, updated in place).")
  loss, _, aux = _parallel._split_loss_output(
      out, has_aux=has_aux, has_model_state=False, who=who)
  return loss, aux


class _LossRecorder:
  """Remembers the loss of the perturbed pass during the step's trace.

  ``grad_fn`` is called inside ``tx.update``, which the training step calls
  in its own trace, so the loss it computed may be returned from that step.
  The trace is checked: a ``grad_fn`` called under a nested transform (e.g.
  inside ``jax.lax.cond``) cannot hand its value out.
  """

  def __init__(self):
    self.value: Any = None
    self.taken: Any = None
    self.trace = None
    self.calls = 0

  def record(self, loss, taken=None) -> None:
    """Records ``loss``; ``taken`` (a traced bool) says whether grad_fn ran.

    A transform that calls grad_fn inside a loop (LookSAM) records the
    loss again after the loop, in the step's trace, with ``taken`` False on
    steps without a second pass.
    """
    self.value = loss
    self.taken = taken
    self.trace = jax.extend.core.get_opaque_trace_state()
    self.calls += 1

  def latest(self):
    """The value recorded last (in the trace that recorded it)."""
    return self.value

  def get(self, fallback):
    """The recorded loss, or ``fallback`` when grad_fn was never called (or,
    for LookSAM, did not run on this step)."""
    if self.calls == 0:
      return fallback
    if self.trace != jax.extend.core.get_opaque_trace_state():
      warnings.warn(
          "samtx.flax: grad_fn ran under a nested JAX transform (e.g. inside"
          " jax.lax.cond), so its loss cannot be returned; metrics"
          " 'perturbed_loss' is NaN. The update itself is unaffected.",
          stacklevel=3)
      return jnp.full_like(fallback, jnp.nan)
    if self.taken is not None:
      return jnp.where(self.taken, self.value, fallback)
    return self.value


def perturbation_norm(params, old_opt_state, new_opt_state) -> jax.Array:
  """Global L2 norm of the perturbation the last update evaluated its gradient at.

  Two-pass transforms report it in ``PerturbationState.perturbation_norm``
  (read from ``new_opt_state``). MSAM's held weights carry a perturbation set
  by the *previous* update: its norm is ``||params - unperturb(params,
  old_opt_state)||``. Several perturbations (e.g. ``optax.multi_transform``
  of two SAMs) combine as the square root of the sum of squares; an optimizer
  with none gives 0.

  Args:
    params: the parameters the update started from (the held weights).
    old_opt_state: the optimizer state before the update.
    new_opt_state: the optimizer state after the update.

  Returns:
    A float32 (or wider) scalar.

  Example:
    >>> import jax, jax.numpy as jnp, samtx
    >>> from samtx import flax as samtx_flax
    >>> loss = lambda p: jnp.sum(p ** 2)
    >>> opt, params = samtx.sam(0.1, rho=0.05), jnp.array([3.0, 4.0])
    >>> old = opt.init(params)
    >>> _, new = opt.update(jax.grad(loss)(params), old, params,
    ...                     grad_fn=jax.grad(loss))
    >>> print(f"{samtx_flax.perturbation_norm(params, old, new):.3f}")
    0.050
  """
  is_state = lambda s: isinstance(s, (PerturbationState, MSAMState))
  squares = [jnp.square(s.perturbation_norm.astype(jnp.float32))
             for s in jax.tree.leaves(new_opt_state, is_leaf=is_state)
             if isinstance(s, PerturbationState)]
  if any(isinstance(s, MSAMState)
         for s in jax.tree.leaves(old_opt_state, is_leaf=is_state)):
    shift = jax.tree.map(lambda p, c: p - c, params,
                         unperturb(params, old_opt_state))
    squares.append(_common.global_sq_norm(shift).astype(jnp.float32))
  if not squares:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(squares))


def _takes_extra_args(tx) -> bool:
  """Whether ``tx.update`` accepts ``grad_fn`` (extra keyword arguments).

  True for ``optax.GradientTransformationExtraArgs`` and for objects such as
  ``optax.MultiSteps`` whose ``update`` takes ``**kwargs``; False for a plain
  ``optax.GradientTransformation(init, update)`` without them.
  """
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return True
  try:
    parameters = inspect.signature(tx.update).parameters.values()
  except (TypeError, ValueError):  # pragma: no cover - builtins, C callables
    return True
  return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "grad_fn"
             for p in parameters)


def _metrics(loss, perturbed_loss, norm, aux, who) -> Metrics:
  return _parallel._merge_metrics(
      {"loss": loss, "perturbed_loss": perturbed_loss,
       "perturbation_norm": norm}, aux, who)


def _data_axis(mesh, axis_name, m_sharpness, who) -> _parallel._DataAxis:
  """The data axis of a multi-device step (``None``: one device)."""
  _check_bool("m_sharpness", m_sharpness, who)
  if mesh is not None:
    axis_name = "batch" if axis_name is None else axis_name
    _parallel._check_mesh(mesh, axis_name, who)
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"{who}: axis_name must be None or a str, got"
                    f" {axis_name!r}.")
  # pcast is a no-op under pmap and required under shard_map.
  return _parallel._DataAxis(axis_name, m_sharpness=m_sharpness, manual=True)


def _refuse_sharded(tree, who: str, routes: str) -> None:
  """The ``mesh=`` steps replicate the model and optimizer over the data
  axis: a leaf sharded over the mesh would be gathered onto every device
  without a word, so it is refused with the routes that keep it sharded."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    sharding = getattr(leaf, "sharding", None)
    if (isinstance(leaf, jax.Array) and sharding is not None
        and not sharding.is_fully_replicated):
      spec = getattr(sharding, "spec", sharding)
      raise ValueError(
          f"{who}: leaf {jax.tree_util.keystr(path)} is sharded ({spec}), but"
          " with mesh= the step replicates the model and optimizer over the"
          f" data axis and would gather it onto every device. {routes}")


def _over_mesh(body, mesh, axis, n_state, who, probe):
  """``body(*state, *batch_args)`` as a jitted ``shard_map`` over ``mesh``.

  The first ``n_state`` arguments are replicated (model, optimizer state,
  keys); the others are batch arguments split along their leading axis.
  ``probe(*state)`` checks the optimizer's ``axis_name`` before tracing.
  """
  axis_name = axis.axis_name
  n = int(mesh.shape[axis_name])

  def step(*args):
    state, batch = args[:n_state], args[n_state:]
    _parallel._check_divisible(batch, n, who)
    probe(*state)
    # On an Explicit mesh shard_map's inputs must already carry its specs.
    place = lambda tree, spec: _parallel._constrain_specs(
        tree, mesh, _parallel._spec_tree(spec, tree, who, "inputs"))
    state = place(state, _REPLICATED)
    batch = place(batch, jax.sharding.PartitionSpec(axis_name))
    mapped = jax.shard_map(
        body, mesh=mesh,
        in_specs=(_REPLICATED,) * n_state
        + (jax.sharding.PartitionSpec(axis_name),) * len(batch),
        out_specs=_REPLICATED)
    return mapped(*state, *batch)

  return step


# ----------------------------------------------------------------------------
# linen
# ----------------------------------------------------------------------------


def apply_gradients(state, *, grads, grad_fn=None, **kwargs):
  """``TrainState.apply_gradients`` that forwards ``grad_fn`` to ``tx.update``.

  Works with the stock ``flax.training.train_state.TrainState`` and any
  subclass of it (anything with ``step``, ``params``, ``tx``, ``opt_state``
  and ``replace``). Stock ``state.apply_gradients`` cannot pass ``grad_fn``,
  which samtx's two-pass optimizers need.

  Args:
    state: a linen train state.
    grads: gradients at ``state.params`` (same tree).
    grad_fn: ``params -> grads``, evaluated by the optimizer at the perturbed
      point; build it on the same batch (and dropout key) as ``grads``. May be
      ``None`` for optimizers that do not need it (MSAM, plain optax).
    **kwargs: other fields to ``replace`` (e.g. ``batch_stats``).

  Returns:
    The state with ``step + 1``, updated ``params`` and ``opt_state``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, samtx
    >>> from flax.training import train_state
    >>> from samtx import flax as samtx_flax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply, tx=samtx.sam(0.1, rho=0.05),
    ...     params=model.init(jax.random.key(0), x)["params"])
    >>> loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    >>> state = samtx_flax.apply_gradients(
    ...     state, grads=jax.grad(loss)(state.params), grad_fn=jax.grad(loss))
    >>> int(state.step)
    1

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412
  """
  if grad_fn is not None:
    _check_callable("grad_fn", grad_fn, "samtx.flax.apply_gradients")
  # A transformation whose update takes no extra args has no use for grad_fn
  # (optax.chain drops extra args for such members in the same way).
  extra = ({"grad_fn": grad_fn}
           if grad_fn is not None and _takes_extra_args(state.tx) else {})
  # Same fp8 convention as flax: OVERWRITE_WITH_GRADIENT leaves bypass tx and
  # grad_fn then sees (and must return) the 'params' sub-collection.
  overwrite = isinstance(grads, Mapping) and OVERWRITE_WITH_GRADIENT in grads
  params = state.params["params"] if overwrite else state.params
  tx_grads = grads["params"] if overwrite else grads
  updates, opt_state = state.tx.update(tx_grads, state.opt_state, params,
                                       **extra)
  new_params = optax.apply_updates(params, updates)
  if overwrite:
    new_params = {"params": new_params,
                  OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT]}
  return state.replace(step=state.step + 1, params=new_params,
                       opt_state=opt_state, **kwargs)


class TrainState(train_state.TrainState):
  """A linen ``TrainState`` for samtx: ``grad_fn`` and BatchNorm statistics.

  Attributes:
    batch_stats: the ``'batch_stats'`` collection of a model with BatchNorm
      (``None`` for models without one). :func:`make_train_step` updates it
      from the clean pass only.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, samtx
    >>> from samtx import flax as samtx_flax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> state = samtx_flax.TrainState.create(
    ...     apply_fn=model.apply, tx=samtx.adasam(1e-2, rho=0.05),
    ...     params=model.init(jax.random.key(0), x)["params"])
    >>> loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    >>> grad_fn = jax.grad(loss)
    >>> state = state.apply_gradients(grads=grad_fn(state.params), grad_fn=grad_fn)
    >>> int(state.step), state.batch_stats is None
    (1, True)
  """

  batch_stats: Any = struct.field(pytree_node=True, default=None)

  def apply_gradients(self, *, grads, grad_fn=None, **kwargs):
    """Applies ``grads`` with ``tx``, forwarding ``grad_fn`` (see :func:`apply_gradients`).

    Args:
      grads: gradients at ``self.params``.
      grad_fn: ``params -> grads`` for two-pass optimizers, else ``None``.
      **kwargs: other fields to ``replace``.

    Returns:
      The updated state.
    """
    return apply_gradients(self, grads=grads, grad_fn=grad_fn, **kwargs)


def eval_params(state):
  """The parameters to evaluate or export: ``samtx.eval_params(params, opt_state)``.

  Identity except for MSAM, whose held weights carry the perturbation, and
  GPA, whose held weights are its gradient point (see
  :func:`samtx.eval_params`).

  Args:
    state: a linen train state.

  Returns:
    A tree like ``state.params``.

  Example:
    >>> import jax.numpy as jnp, optax, samtx
    >>> from flax.training import train_state
    >>> from samtx import flax as samtx_flax
    >>> state = train_state.TrainState.create(
    ...     apply_fn=None, params={"w": jnp.ones(2)}, tx=samtx.msam(0.1, 0.05))
    >>> samtx_flax.eval_params(state)["w"]
    Array([1., 1.], dtype=float32)

  References:
    Becker et al., 2024, https://arxiv.org/abs/2401.12033
  """
  return _eval_params(state.params, state.opt_state)


def eval_variables(state) -> dict:
  """``{'params': eval_params(state)}`` plus ``batch_stats`` when the state has them.

  Args:
    state: a linen train state (``batch_stats`` is read when present).

  Returns:
    A variables dict for ``state.apply_fn(variables, x, train=False)``.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> from samtx import flax as samtx_flax
    >>> state = samtx_flax.TrainState.create(
    ...     apply_fn=None, params={"w": jnp.ones(2)}, tx=samtx.sam(0.1),
    ...     batch_stats={"mean": jnp.zeros(2)})
    >>> sorted(samtx_flax.eval_variables(state))
    ['batch_stats', 'params']
  """
  variables = {"params": eval_params(state)}
  batch_stats = getattr(state, "batch_stats", None)
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  return variables


def _as_rngs(rngs, who):
  """``None``, a PRNG key (the ``'dropout'`` stream) or a dict of keys."""
  if rngs is None or isinstance(rngs, Mapping):
    return rngs
  if isinstance(rngs, jax.Array):
    return {"dropout": rngs}
  raise TypeError(
      f"{who}: rngs must be None, a PRNG key or a dict of PRNG keys, got"
      f" {type(rngs).__name__}.")


def make_train_step(loss_fn: Callable[..., Any], *, has_aux: bool = False,
                    mesh=None, axis_name=None, m_sharpness: bool = True):
  """Builds a linen training step for any samtx (or optax) optimizer.

  ``loss_fn(params, batch, apply)`` computes the loss; it calls the model
  through ``apply(*inputs, **kwargs)``, which runs ``state.apply_fn`` with
  the right variables, the step's dropout key and, for states with
  ``batch_stats``, ``mutable=['batch_stats']``. The step then

  1. runs the clean pass (loss and gradient at ``state.params``), keeping its
     updated BatchNorm statistics;
  2. hands ``tx.update`` a ``grad_fn`` that runs the *same* ``loss_fn``, in
     training mode and with the *same* dropout key, at the perturbed point and
     discards that pass's statistic updates;
  3. returns the new state and metrics, with no forward pass beyond those
     (two for SAM/ASAM/AdaSAM/LightSAM, one for MSAM and plain optax).

  Metrics: ``loss`` is the loss at ``state.params`` (the held weights; for
  MSAM these carry the perturbation, evaluate :func:`eval_params` for the
  clean ones); ``perturbed_loss`` is the loss at the point whose gradient
  drives the descent (for MSAM and plain optax the same pass, so equal to
  ``loss``; for LookSAM, on steps that reuse its stored direction instead of
  taking a second pass, also ``loss``); ``perturbation_norm`` see
  :func:`perturbation_norm`. With
  ``has_aux=True`` the dict ``aux`` of the clean pass is merged in.

  **Several devices** (data parallel). With ``mesh`` the step is a jitted
  ``jax.shard_map`` over the mesh's ``axis_name`` axis (default
  ``"batch"``): ``state`` is replicated, ``batch`` is the *global* batch
  (split along its leading axis) and the step

  * gives every device its own dropout key (``rngs`` folded with the device
    index; the perturbed pass reuses it);
  * averages the clean pass's BatchNorm statistics over devices, so they
    stay identical everywhere (each device normalises with its own batch's
    statistics, like ``pmap``-ed Flax examples);
  * perturbs per device (``m_sharpness=True``, the SAM paper's m-sharpness)
    or along the averaged gradient (``m_sharpness=False``: the run equals
    one device on the whole batch when the model has no BatchNorm);
  * returns metrics averaged over devices.

  Two-pass optimizers must be built with ``axis_name`` equal to the step's.
  With ``axis_name`` but no ``mesh`` the returned function is the per-device
  body, to call inside your own ``jax.shard_map`` or ``jax.pmap``. A state
  whose arrays are sharded over the mesh is refused with a ``ValueError``
  (use :func:`samtx.parallel.jit_step` for FSDP or tensor parallelism).

  Args:
    loss_fn: ``(params, batch, apply) -> loss`` or ``(loss, aux)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)`` with ``aux`` a dict.
    mesh: a ``jax.sharding.Mesh`` to train data-parallel on, or ``None``.
    axis_name: the data axis (``"batch"`` when ``mesh`` is given).
    m_sharpness: per-device perturbations (multi-device only).

  Returns:
    ``train_step(state, batch, rngs=None) -> (state, metrics)``. Without
    ``mesh`` a pure function to wrap in ``jax.jit``; with ``mesh`` already
    jitted. ``rngs`` is a PRNG key (used as the ``'dropout'`` stream) or a
    dict of keys; use a fresh key every step, e.g.
    ``jax.random.fold_in(key, state.step)``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, samtx
    >>> from samtx import flax as samtx_flax
    >>> model = nn.Dense(3)
    >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.arange(8) % 3}
    >>> def loss_fn(params, batch, apply):
    ...   logits = apply(batch["x"])
    ...   return optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, batch["y"]).mean()
    >>> state = samtx_flax.TrainState.create(
    ...     apply_fn=model.apply, tx=samtx.sam(0.1, rho=0.05),
    ...     params=model.init(jax.random.key(0), batch["x"])["params"])
    >>> train_step = jax.jit(samtx_flax.make_train_step(loss_fn))
    >>> state, metrics = train_step(state, batch)
    >>> sorted(metrics)
    ['loss', 'perturbation_norm', 'perturbed_loss']
    >>> bool(metrics["perturbed_loss"] > metrics["loss"])
    True

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412;
    Becker et al., 2024, https://arxiv.org/abs/2401.12033
  """
  who = "samtx.flax.make_train_step"
  _check_callable("loss_fn", loss_fn, who)
  _check_bool("has_aux", has_aux, who)
  axis = _data_axis(mesh, axis_name, m_sharpness, who)

  def train_step(state, batch, rngs=None):
    rngs = axis.fold(_as_rngs(rngs, who))
    batch_stats = getattr(state, "batch_stats", None)
    two_pass = bool(_parallel._perturbation_states(state.opt_state))

    def forward(params):
      """One forward pass; returns (loss, (aux, new_batch_stats))."""
      mutated = {}

      def apply(*args, **kwargs):
        variables = {"params": params}
        if batch_stats is None:
          return state.apply_fn(variables, *args, rngs=rngs, **kwargs)
        variables["batch_stats"] = batch_stats
        out, updates = state.apply_fn(variables, *args, rngs=rngs,
                                      mutable=["batch_stats"], **kwargs)
        mutated.update(updates)
        return out

      loss, aux = _split_aux(loss_fn(params, batch, apply), has_aux, who)
      return loss, (aux, mutated.get("batch_stats", batch_stats))

    value_and_grad = jax.value_and_grad(forward, has_aux=True)
    (loss, (aux, new_batch_stats)), grads = value_and_grad(
        axis.vary(state.params))
    recorder = _LossRecorder()

    def grad_fn(params):
      (perturbed_loss, _), perturbed_grads = value_and_grad(axis.vary(params))
      recorder.record(perturbed_loss)  # statistics of this pass: discarded
      return perturbed_grads

    grad_fn.recorder = recorder  # read by transforms that loop over grad_fn

    with axis.updating(two_pass):
      new_state = apply_gradients(
          state, grads=axis.gradient(grads, two_pass),
          grad_fn=axis.perturbed(grad_fn, two_pass))
    new_state = new_state.replace(
        opt_state=axis.settle(new_state.opt_state, two_pass))
    if batch_stats is not None:
      new_state = new_state.replace(batch_stats=axis.mean(new_batch_stats))
    norm = perturbation_norm(state.params, state.opt_state,
                             new_state.opt_state)
    metrics = _metrics(loss, recorder.get(loss), norm, aux, who)
    return new_state, axis.mean_metrics(metrics)

  if mesh is None:
    return train_step

  def probe(state, rngs):
    del rngs
    _parallel._probe_if_two_pass(state.tx, state.params, state.opt_state,
                                 axis.axis_name, who)

  sharded = jax.jit(_over_mesh(lambda state, rngs, batch: train_step(
      state, batch, rngs), mesh, axis, 2, who, probe))

  def step(state, batch, rngs=None):
    _refuse_sharded(
        state, who,
        "For FSDP or tensor-parallel parameters use samtx.parallel.jit_step"
        " with a loss that calls the model's apply (docs/guides/sharding.md).")
    return sharded(state, _as_rngs(rngs, who), batch)

  return step


# ----------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------


def make_grad_fn(loss_fn: Callable[..., Any], model: nnx.Module, *args,
                 wrt=nnx.Param, has_aux: bool = False, **kwargs):
  """A ``grad_fn`` for ``nnx.Optimizer.update(model, grads, grad_fn=...)``.

  The returned function takes the pure ``nnx.State`` of the ``wrt``
  parameters (what ``nnx.Optimizer`` passes ``tx.update``) and returns
  ``d loss_fn(model', *args, **kwargs) / d params`` as the same tree, where
  ``model'`` is a fresh copy of ``model`` with those parameters. Everything
  else (BatchNorm statistics, dropout RNG counters) is copied from ``model``
  *as it is now*: the model is never mutated by the perturbed pass, and
  because RNG counters are taken before the clean pass advances them, the
  perturbed pass draws the same dropout masks. **Call it before the clean
  pass** (``nnx.value_and_grad(loss_fn)(model, ...)``).

  Args:
    loss_fn: ``(model, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
    model: the NNX model, in training mode.
    *args: positional arguments of ``loss_fn`` after the model (the batch).
    wrt: the optimizer's ``wrt`` filter (default ``nnx.Param``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux is ignored.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``grad_fn(params_state) -> grads_state``. After it has been called in a
    trace, ``grad_fn.loss`` holds the loss it computed (a value of that
    trace).

  Example:
    >>> import jax, jax.numpy as jnp, optax, samtx
    >>> from flax import nnx
    >>> from samtx import flax as samtx_flax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, samtx.sam(0.1, rho=0.05), wrt=nnx.Param)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> grad_fn = samtx_flax.make_grad_fn(loss_fn, model, x, y)
    >>> grads = nnx.grad(loss_fn)(model, x, y)
    >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
    >>> int(optimizer.step[...])
    1

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412
  """
  who = "samtx.flax.make_grad_fn"
  _check_callable("loss_fn", loss_fn, who)
  _check_bool("has_aux", has_aux, who)
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{who}: model must be an nnx.Module, got"
                    f" {type(model).__name__}.")
  return _snapshot_grad_fn(loss_fn, model, args, kwargs, wrt, has_aux,
                           lambda params: params, who)


def _snapshot_grad_fn(loss_fn, model, args, kwargs, wrt, has_aux, vary, who):
  """:func:`make_grad_fn`; ``vary`` prepares params for differentiation."""
  graphdef, _, rest = nnx.split(model, wrt, ...)
  # Pure arrays: nnx.merge builds new Variables from them, so updates made by
  # the perturbed pass (BatchStat, RngCount) never reach `model`.
  rest = nnx.as_pure(rest)

  def perturbed_loss(params):
    out = loss_fn(nnx.merge(graphdef, params, rest), *args, **kwargs)
    return _split_aux(out, has_aux, who)[0]

  value_and_grad = jax.value_and_grad(perturbed_loss)
  recorder = _LossRecorder()

  def grad_fn(params):
    loss, grads = value_and_grad(vary(nnx.as_pure(params)))
    recorder.record(loss)
    grad_fn.loss = loss
    return grads

  grad_fn.loss = None
  grad_fn.recorder = recorder
  return grad_fn


def make_nnx_train_step(loss_fn: Callable[..., Any], *, has_aux: bool = False,
                        mesh=None, axis_name=None, m_sharpness: bool = True):
  """Builds an NNX training step for an ``nnx.Optimizer`` holding any samtx optimizer.

  The step snapshots the model (:func:`make_grad_fn`), runs the clean pass
  with ``nnx.value_and_grad`` (which updates BatchNorm statistics and
  advances the dropout RNG as usual), then calls
  ``optimizer.update(model, grads, grad_fn=grad_fn)``: the perturbed pass
  runs in training mode on a copy, with the pre-step RNG state (same dropout
  masks), and its statistic updates are discarded.

  Metrics are those of :func:`make_train_step`: ``loss`` (at the held
  weights), ``perturbed_loss``, ``perturbation_norm``, plus ``aux``.

  **Several devices**: as :func:`make_train_step`. With ``mesh`` every
  positional argument after the optimizer is a global batch split along its
  leading axis; the model and optimizer are replicated, updated in place and
  stay identical on every device (BatchNorm statistics averaged, each
  device's ``nnx.Rngs`` keys folded with its index for the step). A model
  whose arrays are sharded over the mesh (FSDP, tensor parallel) is refused
  with a ``ValueError``, not gathered: train it without ``mesh`` under
  ``nnx.jit`` on a mesh with ``Auto`` axes, or with
  :func:`samtx.parallel.jit_step` on ``nnx.split``'s parameters (the Flax
  guide's "NNX with FSDP").

  Args:
    loss_fn: ``(model, *args) -> loss`` or ``(loss, aux)`` with aux a dict.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    mesh: a ``jax.sharding.Mesh`` to train data-parallel on, or ``None``.
    axis_name: the data axis (``"batch"`` when ``mesh`` is given); without
      ``mesh``, the per-device body for your own ``shard_map``/``pmap``.
    m_sharpness: per-device perturbations (multi-device only).

  Returns:
    ``train_step(model, optimizer, *args) -> metrics``, which updates
    ``model`` and ``optimizer`` in place. Without ``mesh`` wrap it in
    ``nnx.jit``; with ``mesh`` it is already compiled.

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> from flax import nnx
    >>> from samtx import flax as samtx_flax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, samtx.lightsam(0.1, rho=0.05), wrt=nnx.Param)
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> train_step = nnx.jit(samtx_flax.make_nnx_train_step(loss_fn))
    >>> metrics = train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))
    >>> bool(metrics["perturbed_loss"] >= metrics["loss"])
    True

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412
  """
  who = "samtx.flax.make_nnx_train_step"
  _check_callable("loss_fn", loss_fn, who)
  _check_bool("has_aux", has_aux, who)
  axis = _data_axis(mesh, axis_name, m_sharpness, who)
  several = axis.axis_name is not None

  def clean_loss(model, *args):
    return _split_aux(loss_fn(model, *args), has_aux, who)

  def train_step(model, optimizer, *args):
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f"{who}: optimizer must be an nnx.Optimizer, got"
                      f" {type(optimizer).__name__}.")
    wrt = optimizer.wrt
    params = nnx.as_pure(nnx.state(model, wrt))
    old_opt_state = nnx.as_pure(optimizer.opt_state)
    two_pass = bool(_parallel._perturbation_states(old_opt_state))
    if several:
      # This device's keys for both passes; replicated params are made
      # device-varying so that their gradient stays local.
      keys = nnx.as_pure(nnx.state(model, nnx.RngKey))
      nnx.update(model, axis.vary(params), axis.fold(keys))
    grad_fn = _snapshot_grad_fn(loss_fn, model, args, {}, wrt, has_aux,
                                axis.vary, who)
    value_and_grad = nnx.value_and_grad(
        clean_loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
    (loss, aux), grads = value_and_grad(model, *args)
    if several:
      nnx.update(model, params, keys)
      model_state = nnx.All(nnx.Not(wrt), nnx.Not(nnx.RngState))
      nnx.update(model, axis.mean(nnx.as_pure(nnx.state(model, model_state))))
      grads = axis.gradient(grads, two_pass)
    if _takes_extra_args(optimizer.tx):
      with axis.updating(two_pass):
        optimizer.update(model, grads,
                         grad_fn=axis.perturbed(grad_fn, two_pass))
    else:  # a plain transformation has no use for grad_fn (and rejects it)
      optimizer.update(model, grads)
    if several and two_pass:
      _settle_in_place(optimizer.opt_state, axis)
    norm = perturbation_norm(params, old_opt_state,
                             nnx.as_pure(optimizer.opt_state))
    metrics = _metrics(loss, grad_fn.recorder.get(loss), norm, aux, who)
    return axis.mean_metrics(metrics)

  if mesh is None:
    return train_step

  def pure_step(graphdef, values, *args):
    model, optimizer = nnx.merge(graphdef, values)
    metrics = train_step(model, optimizer, *args)
    return nnx.as_pure(nnx.state((model, optimizer))), metrics

  def probe(graphdef, values):
    model, optimizer = nnx.merge(graphdef, values)
    _parallel._probe_if_two_pass(
        optimizer.tx, nnx.as_pure(nnx.state(model, optimizer.wrt)),
        nnx.as_pure(optimizer.opt_state), axis.axis_name, who)

  def over_mesh(graphdef, values, *args):
    body = functools.partial(pure_step, graphdef)
    return _over_mesh(body, mesh, axis, 1, who,
                      functools.partial(probe, graphdef))(values, *args)

  sharded = jax.jit(over_mesh, static_argnums=0)

  def step(model, optimizer, *args):
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f"{who}: optimizer must be an nnx.Optimizer, got"
                      f" {type(optimizer).__name__}.")
    graphdef, values = nnx.split((model, optimizer))
    _refuse_sharded(
        nnx.as_pure(values), who,
        "For FSDP or tensor-parallel parameters, train without mesh=:"
        " nnx.jit(samtx.flax.make_nnx_train_step(loss_fn)) under"
        " jax.set_mesh(mesh) on a mesh with Auto axes, or"
        " samtx.parallel.jit_step on the params of nnx.split(model,"
        " nnx.Param, ...) (docs/guides/flax.md, 'NNX with FSDP').")
    values, metrics = sharded(graphdef, nnx.as_pure(values), *args)
    nnx.update((model, optimizer), values)
    return metrics

  return step


def _settle_in_place(opt_state, axis) -> None:
  """Averages the float leaves of every ``PerturbationState`` over ``axis``.

  The NNX optimizer holds its state in ``Variable`` s: the averaged values
  are written into them (see ``samtx.parallel`` on m-sharpness).
  """
  is_ps = lambda s: isinstance(s, PerturbationState)
  is_var = lambda v: isinstance(v, nnx.Variable)
  for state in jax.tree.leaves(opt_state, is_leaf=is_ps):
    if not is_ps(state):
      continue
    for variable in jax.tree.leaves(state, is_leaf=is_var):
      if jnp.issubdtype(variable[...].dtype, jnp.inexact):
        variable[...] = axis.mean(variable[...])


def eval_model(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.Module:
  """A copy of ``model`` with the weights to evaluate (``samtx.eval_params``).

  For MSAM the model holds perturbed weights; the copy holds the clean ones.
  For GPA the copy holds the evaluation point. For every other optimizer the
  copy equals the model. ``model`` itself is not
  changed, so training continues from the held weights.

  Args:
    model: the NNX model being trained.
    optimizer: its ``nnx.Optimizer``.

  Returns:
    A new ``nnx.Module`` (remember ``.eval()`` for BatchNorm/Dropout).

  Example:
    >>> import jax.numpy as jnp, samtx
    >>> from flax import nnx
    >>> from samtx import flax as samtx_flax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, samtx.msam(0.1, rho=0.05), wrt=nnx.Param)
    >>> clean = samtx_flax.eval_model(model, optimizer)
    >>> clean is model, bool((clean.kernel[...] == model.kernel[...]).all())
    (False, True)

  References:
    Becker et al., 2024, https://arxiv.org/abs/2401.12033
  """
  who = "samtx.flax.eval_model"
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{who}: model must be an nnx.Module, got"
                    f" {type(model).__name__}.")
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(f"{who}: optimizer must be an nnx.Optimizer, got"
                    f" {type(optimizer).__name__}.")
  graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
  clean = _eval_params(nnx.as_pure(params), nnx.as_pure(optimizer.opt_state))
  return nnx.merge(graphdef, clean, nnx.as_pure(rest))
