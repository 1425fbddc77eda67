"""Data-parallel and model-sharded training steps for samtx optimizers.

Three ready-made builders turn a user ``loss_fn(params, batch) -> scalar`` and
an optimizer into a compiled training step
``step(params, opt_state, batch) -> (params, opt_state, metrics)``:

- :func:`pmap_step` -- ``jax.pmap`` (one program per device, stacked params);
- :func:`shard_map_step` -- ``jax.shard_map`` over a ``jax.sharding.Mesh``;
  parameters replicated, or sharded over model axes with ``param_specs``
  (tensor parallel: the optimizer is then built with ``norm_axis_name``);
- :func:`jit_step` -- plain ``jax.jit`` with ``NamedSharding``: the batch is
  split over the data axis, parameters keep the sharding they arrive with
  (or the ``param_specs`` given: FSDP, tensor parallel, both) and the
  optimizer state follows them (:func:`state_specs`).

``batch`` is the *global* mini-batch (a pytree whose leaves share a leading
batch axis), split over the data-axis devices along that axis.
``metrics["loss"]`` is the clean loss averaged over the global batch.

Model state and randomness (all builders):

- ``has_model_state=True``: ``loss_fn(params, batch, model_state=...)``
  returns ``(loss, new_model_state)`` (BatchNorm statistics, counters); the
  step takes ``model_state=`` and returns
  ``(params, opt_state, model_state, metrics)``. The new state comes from the
  clean pass only (the perturbed pass's is discarded) and its float leaves
  are averaged over the data axis, so it stays identical on every device.
- ``step(..., rng=key)``: ``loss_fn`` receives ``rng=`` (e.g. a dropout key)
  folded with the device index (``jax.random.fold_in(key, device)``); both
  passes of a step use the same key. Use a fresh key every step.
- ``has_aux=True``: ``loss_fn`` returns ``(loss, aux)`` (or
  ``(loss, (new_model_state, aux))``) with ``aux`` a dict of scalar metrics,
  averaged over the data axis and merged into ``metrics``.

Two ways to perturb (two-pass optimizers: SAM, ASAM, AdaSAM, LightSAM):

- **m-sharpness** (``m_sharpness=True``, or ``m_sharpness_groups=G`` under
  ``jit_step``): every device (group) builds its perturbation from its *own*
  gradient, ``e_k = rho g_k / ||g_k||``, evaluates ``h_k = grad L_k(x + e_k)``
  and the update uses ``mean_k h_k``. This is the SAM paper's default, with
  ``m`` the per-device batch; it usually generalises better and costs no
  extra communication.
- **global perturbation** (``m_sharpness=False``): the clean gradient is
  averaged first, so all devices share ``e = rho g / ||g||``, and so is the
  perturbed gradient ``h``: every gradient the optimizer sees is the global
  one and its rule runs once on them (GSAM's cosine and norms of ``h``
  included); the result equals a single-device run on the whole batch (up to
  float reduction order). The step all-reduces ``g`` and ``h``; the
  optimizer does not average again what is already replicated. Use it when
  the numbers must not depend on the device count.

In m-sharpness mode the ascent statistics that depend on the local gradient
(``PerturbationState.perturbation_norm`` and LightSAM's ascent accumulators)
are averaged over devices after each step, so the state stays replicated.

One-pass optimizers (MSAM, AMSGrad, any optax optimizer) see the gradient
averaged over the global batch; the step ``pmean``'s it for them.

Under ``pmap``/``shard_map`` two-pass optimizers must be built with
``axis_name`` equal to the step's ``axis_name`` (it averages the perturbed
gradients); under ``jit_step`` with ``m_sharpness_groups`` likewise, and
without groups they must have ``axis_name=None``. A mismatch is detected when
the step is first traced and raises a ``ValueError``.

References:
  Foret et al., 2021, Sharpness-aware minimization for efficiently improving
  generalization (m-sharpness, Sec. 4), https://arxiv.org/abs/2010.01412
  Sun et al., 2023, AdaSAM (linear speedup in the mini-batch size),
  https://arxiv.org/abs/2303.00565
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from samtx import _common
from samtx.perturbations import PerturbationState

__all__ = [
    "pmap_step",
    "shard_map_step",
    "jit_step",
    "replicate",
    "pmap_replicate",
    "unreplicate",
    "shard_batch",
    "shard",
    "state_specs",
    "init_sharded",
]

LossFn = Callable[..., Any]
Step = Callable[..., tuple]
_is_spec = lambda x: isinstance(x, P)


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------


def _check_common(loss_fn, optimizer, axis_name, who):
  if not callable(loss_fn):
    raise TypeError(f"{who}: loss_fn must be callable, got {loss_fn!r}.")
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise TypeError(
        f"{who}: optimizer must be an optax GradientTransformation, got"
        f" {optimizer!r}.")
  if not isinstance(axis_name, str):
    raise TypeError(f"{who}: axis_name must be a str, got {axis_name!r}.")


def _check_mesh(mesh, axis_name, who) -> int:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{who}: mesh must be a jax.sharding.Mesh, got {mesh!r}.")
  if axis_name not in mesh.axis_names:
    raise ValueError(
        f"{who}: axis_name {axis_name!r} is not an axis of the mesh"
        f" {tuple(mesh.axis_names)}.")
  return int(mesh.shape[axis_name])


def _batch_size(batch, who) -> int:
  """The common leading dimension of every leaf of ``batch``."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f"{who}: batch has no array leaves.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"{who}: every leaf of batch needs the same leading (batch) axis;"
        f" got leading sizes {sorted(s for s in sizes if s is not None)}"
        f"{' and a scalar leaf' if None in sizes else ''}.")
  return sizes.pop()


def _check_divisible(batch, parts: int, who: str, what: str = "device count"):
  size = _batch_size(batch, who)
  if size % parts:
    raise ValueError(
        f"{who}: the global batch size {size} is not divisible by the"
        f" {what} {parts}; use a batch size that is a multiple of {parts}.")
  return size


def _is_explicit(mesh) -> bool:
  types = getattr(mesh, "axis_types", None) or ()
  return any("Explicit" in str(kind) for kind in types)


def _auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with every axis of type ``Auto``.

  The jit steps compute on this mesh: collectives of a named ``vmap`` axis
  over an ``Explicit``-ly sharded dimension are not supported by jax 0.10,
  and a user's ``loss_fn`` need not be written for sharding-in-types.
  """
  auto = jax.sharding.AxisType.Auto
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(auto,) * len(mesh.axis_names))


def _spec_tree(specs, tree, who, what):
  """``specs`` broadcast to ``tree``: one ``PartitionSpec`` per leaf.

  ``specs`` is a tree of ``PartitionSpec`` with the structure of ``tree`` or
  a prefix of it (a single ``P()`` covers a whole subtree); ``None`` means
  replicated.
  """
  if specs is None:
    specs = P()
  try:
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda _: spec, sub), specs, tree,
        is_leaf=_is_spec)
  except ValueError as err:
    raise ValueError(
        f"{who}: {what} must be a tree of PartitionSpec with the structure of"
        f" (a prefix of) the tree it describes: {err}") from None


def _sharding_tree(mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=_is_spec)


def _place_specs(tree, mesh, specs):
  """``jax.device_put`` of every leaf to ``NamedSharding(mesh, its spec)``."""
  return jax.tree.map(
      lambda s, x: jax.device_put(x, NamedSharding(mesh, s)), specs, tree,
      is_leaf=_is_spec)


def _constrain_specs(tree, mesh, specs):
  """Places ``tree`` leafwise with ``NamedSharding(mesh, spec)`` inside a jit."""
  if _is_explicit(mesh):
    return jax.tree.map(
        lambda s, x: jax.reshard(x, NamedSharding(mesh, s)), specs, tree,
        is_leaf=_is_spec)
  return jax.tree.map(
      lambda s, x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)),
      specs, tree, is_leaf=_is_spec)


def _spec_of(x, mesh) -> P:
  """The ``PartitionSpec`` of an array on ``mesh``, else replicated."""
  sharding = getattr(x, "sharding", None)
  if (isinstance(sharding, NamedSharding)
      and tuple(sharding.mesh.axis_names) == tuple(mesh.axis_names)
      and sharding.mesh.devices.shape == mesh.devices.shape
      and (sharding.mesh.devices == mesh.devices).all()):
    return sharding.spec
  return P()


def _uses_axes(specs, axes) -> bool:
  """Whether any ``PartitionSpec`` in ``specs`` shards over one of ``axes``."""
  used = set()
  for spec in jax.tree.leaves(specs, is_leaf=_is_spec):
    for entry in spec:
      used.update(entry if isinstance(entry, tuple) else (entry,))
  return bool(used & set(axes))


def _mark_varying(tree, axis_name):
  """``pcast``s leaves that do not yet vary over ``axis_name`` (shard_map).

  Under ``shard_map`` the gradient of a device-invariant (replicated) value
  with respect to a device-varying loss is implicitly summed over devices;
  differentiating with respect to a varying copy keeps the local gradient.
  """
  def mark(x):
    if axis_name in _common.varying_axes(x):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(mark, tree)


def _perturbation_states(state) -> list:
  is_ps = lambda s: isinstance(s, PerturbationState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_ps) if is_ps(s)]


def _mean_inexact(tree, axis_name, *, skip_replicated=False):
  """``pmean``s the float leaves of ``tree``; integer leaves are left alone.

  With ``skip_replicated``, leaves known to be the same on every device
  (typed replicated inside a vma-checked ``shard_map``) are left alone too
  (:func:`samtx._common.pmean_varying`); where nothing is typed (``pmap``,
  named ``vmap``), every float leaf is averaged.
  """
  if skip_replicated:
    average = lambda x: _common.pmean_varying(x, axis_name)
  else:
    average = lambda x: jax.lax.pmean(x, axis_name)
  return jax.tree.map(
      lambda x: average(x) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
      else x, tree)


def _average_perturbation_state(state, axis_name):
  """``pmean``s the float leaves of every ``PerturbationState`` over the axis.

  In m-sharpness mode these hold statistics of the local gradient; averaging
  them keeps the optimizer state replicated. Integer leaves (counts) are
  identical on all devices and are left alone. Inside ``shard_map``, which
  types every value with the axes it varies over, a leaf typed replicated
  is already the same on every device and is not averaged again: LookSAM
  averages its stored direction itself, on second-pass steps only, so its
  reusing steps stay free of a parameter-sized all-reduce. Under ``pmap``
  and named ``vmap`` nothing is typed, and every float leaf is averaged.
  """
  return jax.tree.map(
      lambda s: _mean_inexact(s, axis_name, skip_replicated=True)
      if isinstance(s, PerturbationState) else s,
      state, is_leaf=lambda s: isinstance(s, PerturbationState))


def _bind_axes(fn, axis_names):
  """``fn`` under trivial ``vmap``s that bind ``axis_names`` (size 1).

  Lets an abstract probe trace an optimizer that reduces over model axes
  (``norm_axis_name``) outside the ``shard_map`` that binds them.
  """
  for name in axis_names:
    fn = jax.vmap(fn, in_axes=None, out_axes=0, axis_name=name, axis_size=1)
  return fn


def _probe_axis_name(optimizer, grads, state, params, axis_name, who,
                     other_axes=()):
  """Checks that a two-pass optimizer averages its output over ``axis_name``.

  Traces one update abstractly (``jax.eval_shape``, no computation) under
  ``jax.vmap(..., axis_name=axis_name)`` with a per-member gradient. If the
  optimizer averages over ``axis_name`` its updates leave the vmap unbatched;
  otherwise they stay batched (``axis_name=None``) or name an unbound axis.
  ``other_axes`` (the mesh's model axes) are bound by trivial vmaps.
  """
  spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  grads_s, state_s, params_s = jax.tree.map(spec, (grads, state, params))
  stacked = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((2,) + s.shape, s.dtype), grads_s)

  def run(g, state_in, params_in):
    def member(gm):
      updates, _ = optimizer.update(gm, state_in, params_in,
                                    grad_fn=lambda p: gm)
      return updates
    return jax.vmap(member, axis_name=axis_name, out_axes=None,
                    axis_size=2)(g)

  try:
    jax.eval_shape(_bind_axes(run, other_axes), stacked, state_s, params_s)
  except NameError as err:
    raise ValueError(
        f"{who}: the optimizer averages over an axis name other than the"
        f" step's axis_name {axis_name!r} ({err}). Build it with"
        f" axis_name={axis_name!r}, e.g. samtx.adasam(lr, rho,"
        f" axis_name={axis_name!r}).") from None
  except ValueError as err:
    if "out_axes" not in str(err) and "mapped" not in str(err):
      raise
    raise ValueError(
        f"{who}: the two-pass optimizer does not average its perturbed"
        f" gradient over axis {axis_name!r}, so devices would drift apart."
        f" Build it with axis_name={axis_name!r}, e.g. samtx.sam(lr, rho,"
        f" axis_name={axis_name!r}).") from None


def _probe_if_two_pass(optimizer, params, opt_state, axis_name, who,
                       other_axes=()):
  """Runs :func:`_probe_axis_name` for optimizers with a perturbation."""
  if _perturbation_states(opt_state):
    _probe_axis_name(optimizer, params, opt_state, params, axis_name, who,
                     other_axes)


def _probe_no_axis(optimizer, grads, state, params, who):
  """Checks that an optimizer used under plain jit names no mapped axis."""
  spec = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
  grads_s, state_s, params_s = jax.tree.map(spec, (grads, state, params))
  try:
    jax.eval_shape(
        lambda g, s, p: optimizer.update(g, s, p, grad_fn=lambda q: g)[0],
        grads_s, state_s, params_s)
  except NameError as err:
    raise ValueError(
        f"{who}: with m_sharpness_groups=None the optimizer must be built"
        f" with axis_name=None (plain jit has no mapped axis): {err}."
        " Either drop axis_name or pass m_sharpness_groups.") from None


# ----------------------------------------------------------------------------
# loss functions with model state, randomness and metrics
# ----------------------------------------------------------------------------


def _split_loss_output(out, *, has_aux: bool, has_model_state: bool, who: str):
  """``(loss, new_model_state, aux)`` from what a ``loss_fn`` returned.

  Shapes accepted: ``loss``; ``(loss, aux)`` with ``has_aux``;
  ``(loss, new_model_state)`` with ``has_model_state``; and
  ``(loss, (new_model_state, aux))`` with both. ``aux`` must be a dict.
  """
  def pair(value, what):
    if not (isinstance(value, tuple) and len(value) == 2):
      raise TypeError(f"{who}: loss_fn must return {what}; got"
                      f" {type(value).__name__}.")
    return value

  model_state, aux = None, {}
  if has_model_state and has_aux:
    loss, rest = pair(out, "(loss, (new_model_state, aux))")
    model_state, aux = pair(rest, "(loss, (new_model_state, aux))")
  elif has_model_state:
    loss, model_state = pair(out, "(loss, new_model_state)")
  elif has_aux:
    loss, aux = pair(out, "(loss, aux) where aux is a dict of metrics")
  else:
    if isinstance(out, tuple):
      raise TypeError(
          f"{who}: loss_fn returned a tuple; pass has_aux=True when it returns"
          " (loss, aux) or has_model_state=True for (loss, new_model_state).")
    loss = out
  if not isinstance(aux, Mapping):
    raise TypeError(f"{who}: with has_aux=True, aux must be a dict of metrics,"
                    f" got {type(aux).__name__}.")
  if jnp.ndim(loss) != 0:
    raise ValueError(f"{who}: loss_fn must return a scalar loss, got shape"
                     f" {jnp.shape(loss)}.")
  return loss, model_state, dict(aux)


def _merge_metrics(metrics: dict, aux: Mapping, who: str) -> dict:
  """``metrics`` with the user's ``aux`` merged in (name clashes rejected)."""
  clash = sorted(set(aux) & set(metrics))
  if clash:
    raise ValueError(
        f"{who}: aux metrics {clash} clash with the metrics samtx returns;"
        " rename them.")
  return {**metrics, **aux}


def _model_loss(loss_fn, has_aux, has_model_state, who):
  """``loss_fn`` as ``(params, batch, model_state, rng) -> (loss, (state, aux))``."""

  def call(params, batch, model_state, rng):
    kwargs = {}
    if has_model_state:
      kwargs["model_state"] = model_state
    if rng is not None:
      kwargs["rng"] = rng
    loss, new_state, aux = _split_loss_output(
        loss_fn(params, batch, **kwargs), has_aux=has_aux,
        has_model_state=has_model_state, who=who)
    return loss, (new_state, aux)

  return call


class _DataAxis:
  """The collectives of one data-parallel axis, shared by every samtx step.

  With ``axis_name=None`` (one device, or plain ``jit`` over a global batch)
  every method is the identity, so the same step body serves single- and
  multi-device training.

  Args:
    axis_name: the mapped data axis (``pmap``, ``shard_map``, named ``vmap``)
      or ``None``.
    m_sharpness: two-pass optimizers perturb along the local gradient.
    manual: the axis is a ``shard_map`` axis, where gradients of replicated
      values would otherwise be summed over devices (see :meth:`vary`).
  """

  def __init__(self, axis_name: Optional[str], *, m_sharpness: bool = True,
               manual: bool = False):
    self.axis_name = axis_name
    self.m_sharpness = m_sharpness
    self.manual = manual and axis_name is not None

  def vary(self, tree):
    """A copy to differentiate with respect to: local gradients survive."""
    return _mark_varying(tree, self.axis_name) if self.manual else tree

  def fold(self, key):
    """``key`` (or a dict of keys) made distinct for this device."""
    if self.axis_name is None or key is None:
      return key
    index = jax.lax.axis_index(self.axis_name)
    return jax.tree.map(lambda k: jax.random.fold_in(k, index), key)

  def mean(self, tree):
    """The float leaves of ``tree`` averaged over the axis."""
    return tree if self.axis_name is None else _mean_inexact(
        tree, self.axis_name)

  def mean_metrics(self, metrics):
    """Scalar metrics averaged over the axis (ints and bools as floats)."""
    as_float = jax.tree.map(
        lambda x: x if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        else jnp.asarray(x, jnp.float32), metrics)
    return self.mean(as_float)

  def gradient(self, grads, two_pass: bool):
    """The gradient the optimizer sees: local for m-sharpness, else the mean."""
    if self.axis_name is None or (two_pass and self.m_sharpness):
      return grads
    return jax.lax.pmean(grads, self.axis_name)

  def _global_perturbation(self, two_pass: bool) -> bool:
    return self.axis_name is not None and two_pass and not self.m_sharpness

  def perturbed(self, grad_fn, two_pass: bool):
    """The ``grad_fn`` the optimizer gets: with one global perturbation, the
    perturbed gradient averaged over the axis, like the clean one.

    Every gradient the rule sees is then the whole batch's, so rules that
    are nonlinear in the perturbed gradient (GSAM's cosine and norms) give
    the single-device numbers; per-device ``h`` combined with the global
    ``g`` and averaged afterwards would not.
    """
    if not self._global_perturbation(two_pass):
      return grad_fn

    # wraps keeps what grad_fn carries (samtx.flax's loss recorder).
    @functools.wraps(grad_fn)
    def averaged(params):
      return jax.lax.pmean(grad_fn(params), self.axis_name)

    return averaged

  def updating(self, two_pass: bool):
    """The context to call ``optimizer.update`` in.

    With one global perturbation everything the update sees is replicated;
    declaring it (:func:`samtx._common.replicated_inputs`) spares the
    transforms a second, redundant all-reduce under ``pmap``, where values
    are untyped (inside ``shard_map`` the types already say so).
    """
    if self.axis_name is None or not self._global_perturbation(two_pass):
      return contextlib.nullcontext()
    return _common.replicated_inputs(self.axis_name)

  def settle(self, opt_state, two_pass: bool):
    """Averages local ascent statistics so the state stays replicated."""
    if self.axis_name is None or not (two_pass and self.m_sharpness):
      return opt_state
    return _average_perturbation_state(opt_state, self.axis_name)


def _train_body(call, optimizer, axis: _DataAxis, who):
  """One training step on the batch one device (group) sees."""

  def body(params, opt_state, batch, model_state, rng):
    two_pass = bool(_perturbation_states(opt_state))
    rng = axis.fold(rng)
    local = lambda p: call(p, batch, model_state, rng)
    (loss, (new_model_state, aux)), grads = jax.value_and_grad(
        local, has_aux=True)(axis.vary(params))
    grads = axis.gradient(grads, two_pass)

    def grad_fn(p):
      # Same batch, model state and key; this pass's model state is dropped.
      return jax.grad(lambda q: local(q)[0])(axis.vary(p))

    with axis.updating(two_pass):
      updates, opt_state = optimizer.update(
          grads, opt_state, params, grad_fn=axis.perturbed(grad_fn, two_pass))
    opt_state = axis.settle(opt_state, two_pass)
    params = optax.apply_updates(params, updates)
    metrics = _merge_metrics({"loss": loss}, aux, who)
    return (params, opt_state, axis.mean(new_model_state),
            axis.mean_metrics(metrics))

  return body


def _check_model_state(model_state, has_model_state, who):
  if has_model_state and model_state is None:
    raise TypeError(f"{who}: the step was built with has_model_state=True;"
                    " pass model_state=... (e.g. BatchNorm statistics).")
  if not has_model_state and model_state is not None:
    raise TypeError(f"{who}: model_state given, but the step was built with"
                    " has_model_state=False.")


def _outputs(out, has_model_state):
  params, opt_state, model_state, metrics = out
  if has_model_state:
    return params, opt_state, model_state, metrics
  return params, opt_state, metrics


# ----------------------------------------------------------------------------
# placement helpers
# ----------------------------------------------------------------------------


def replicate(tree, mesh: Mesh):
  """Places a pytree on every device of ``mesh`` (fully replicated).

  Use it for params and optimizer state of :func:`shard_map_step` and
  :func:`jit_step`.

  Args:
    tree: a pytree of arrays.
    mesh: a ``jax.sharding.Mesh``.

  Returns:
    The tree with every leaf sharded as ``NamedSharding(mesh, P())``.

  Example:
    >>> import jax, jax.numpy as jnp, samtx.parallel as par
    >>> mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    >>> params = par.replicate({"w": jnp.ones(3)}, mesh)
    >>> params["w"].sharding.spec
    P()
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"replicate: mesh must be a jax.sharding.Mesh, got {mesh!r}.")
  sharding = NamedSharding(mesh, P())
  # One fresh buffer per leaf: optimizer states may hold the same array
  # object twice, and a buffer cannot be donated twice in one call.
  return jax.tree.map(
      lambda x: jax.device_put(jnp.array(x, copy=True), sharding), tree)


def pmap_replicate(tree, devices: Optional[Sequence[Any]] = None):
  """Stacks one copy of a pytree per device, the layout ``jax.pmap`` expects.

  Args:
    tree: a pytree of arrays.
    devices: the devices of the :func:`pmap_step` (default: all local ones).

  Returns:
    The tree with a new leading axis of length ``len(devices)``, one slice
    on each device.

  Example:
    >>> import jax, jax.numpy as jnp, samtx.parallel as par
    >>> stacked = par.pmap_replicate(jnp.arange(3.0))
    >>> stacked.shape == (jax.local_device_count(), 3)
    True
  """
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = Mesh(np.array(devices), ("_devices",))
  sharding = NamedSharding(mesh, P("_devices"))
  return jax.tree.map(
      lambda x: jax.device_put(
          jnp.array(jnp.broadcast_to(x, (len(devices),) + jnp.shape(x))),
          sharding), tree)


def unreplicate(tree):
  """The first copy of a :func:`pmap_replicate`-d tree (drops the device axis).

  Example:
    >>> import jax.numpy as jnp, samtx.parallel as par
    >>> par.unreplicate(par.pmap_replicate(jnp.arange(3.0))).shape
    (3,)
  """
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch, mesh: Mesh, axis_name: str = "batch"):
  """Splits a global batch over the ``axis_name`` devices of ``mesh``.

  Args:
    batch: a pytree whose leaves share a leading batch axis.
    mesh: a ``jax.sharding.Mesh``.
    axis_name: the mesh axis the batch is split over.

  Returns:
    The batch with leaves sharded as ``NamedSharding(mesh, P(axis_name))``.

  Raises:
    ValueError: the batch size is not divisible by the axis size.

  Example:
    >>> import jax, jax.numpy as jnp, samtx.parallel as par
    >>> mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    >>> x = par.shard_batch(jnp.zeros((8 * jax.device_count(), 2)), mesh)
    >>> x.sharding.spec
    P('batch',)
  """
  n = _check_mesh(mesh, axis_name, "shard_batch")
  _check_divisible(batch, n, "shard_batch")
  return jax.device_put(batch, NamedSharding(mesh, P(axis_name)))


def shard(tree, mesh: Mesh, specs):
  """Places a pytree on ``mesh`` with one ``PartitionSpec`` per leaf.

  Args:
    tree: a pytree of arrays (params, optimizer state, model state).
    mesh: a ``jax.sharding.Mesh``.
    specs: a tree of ``PartitionSpec`` with the structure of ``tree`` (or a
      prefix of it: one ``P()`` replicates a whole subtree).

  Returns:
    The tree with leaf ``x`` sharded as ``NamedSharding(mesh, spec)``, each
    leaf in its own buffer (so it can be donated).

  Example:
    >>> import jax, jax.numpy as jnp, samtx.parallel as par
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("model",))
    >>> params = {"w": jnp.ones((2, 8 * jax.device_count())), "b": jnp.ones(2)}
    >>> params = par.shard(params, mesh, {"w": P(None, "model"), "b": P()})
    >>> params["w"].sharding.spec
    P(None, 'model')
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"shard: mesh must be a jax.sharding.Mesh, got {mesh!r}.")
  specs = _spec_tree(specs, tree, "shard", "specs")
  # Fresh buffers: a tree may hold one array twice and donation needs one
  # buffer per leaf.
  return _place_specs(
      jax.tree.map(lambda x: jnp.array(x, copy=True), tree), mesh, specs)


@jax.tree_util.register_pytree_node_class
class _ParamsSlot:
  """A leafless stand-in for the params: ``optimizer.init`` of it marks
  where the state holds parameter-shaped trees (as in
  ``optax.tree_map_params``)."""

  def tree_flatten(self):
    return (), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux, children
    return cls()


def state_specs(optimizer: optax.GradientTransformation, params, param_specs):
  """The ``PartitionSpec`` of every optimizer-state leaf, from the params'.

  Every parameter-shaped state leaf (moments, accumulators, LightSAM's
  ascent statistics, MSAM's momentum) gets its parameter's spec; scalars and
  other leaves are replicated (``P()``). Found the way
  ``optax.tree_map_params`` finds them, abstractly (nothing is allocated).
  For ``samtx.lookahead`` (and ``optax.lookahead``), whose params are an
  ``optax.LookaheadParams(fast, slow)`` pair, the fast optimizer's state
  takes the specs of ``params.fast``.

  Args:
    optimizer: an optax optimizer.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    param_specs: a tree of ``PartitionSpec`` like ``params`` (or a prefix).

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``optimizer.init(params)``.

  Example:
    >>> import jax, jax.numpy as jnp, samtx, samtx.parallel as par
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"w": jnp.ones((4, 8))}
    >>> specs = par.state_specs(samtx.adasam(1e-3), params,
    ...                         {"w": P("data", "model")})
    >>> [s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    ...  if s != P()]
    [P('data', 'model'), P('data', 'model'), P('data', 'model')]
  """
  param_specs = _spec_tree(param_specs, params, "state_specs", "param_specs")
  state = jax.eval_shape(optimizer.init, params)
  # Lookahead (samtx's and optax's) keeps its fast optimizer's state, whose
  # parameter-shaped parts follow params.fast, not the (fast, slow) pair.
  candidates = [param_specs]
  if isinstance(param_specs, optax.LookaheadParams):
    candidates.append(param_specs.fast)

  def specs_like(params_shaped):
    structure: Any = jax.tree.structure(params_shaped)
    for specs in candidates:
      if structure == jax.tree.structure(specs, is_leaf=_is_spec):
        return specs
    raise ValueError(
        "state_specs: a parameter-shaped part of the optimizer state has the"
        f" structure {structure}, which is not that of the params"
        f" {jax.tree.structure(param_specs, is_leaf=_is_spec)}.")

  # optax.tree_map_params, but the whole parameter-shaped subtree is seen.
  slots = optimizer.init(_ParamsSlot())
  is_slot = lambda x: isinstance(x, _ParamsSlot)
  return jax.tree.map(
      lambda slot, value: specs_like(value) if is_slot(slot) else P(),
      slots, state, is_leaf=is_slot)


def init_sharded(optimizer: optax.GradientTransformation, params, mesh: Mesh,
                 param_specs=None):
  """``optimizer.init(params)`` with every state leaf placed on ``mesh``.

  Parameter-shaped leaves get their parameter's sharding (:func:`state_specs`),
  the rest are replicated; the state is computed sharded (``jax.jit`` with
  ``out_shardings``), never gathered on one device.

  Args:
    optimizer: an optax optimizer.
    params: the (possibly sharded) parameters.
    mesh: the ``jax.sharding.Mesh``.
    param_specs: a tree of ``PartitionSpec`` like ``params``; default: the
      specs the params already carry on ``mesh`` (replicated otherwise).

  Returns:
    The optimizer state, sharded.

  Example:
    >>> import jax, jax.numpy as jnp, samtx, samtx.parallel as par
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("model",))
    >>> params = par.shard({"w": jnp.ones((8 * jax.device_count(),))}, mesh,
    ...                    {"w": P("model")})
    >>> state = par.init_sharded(samtx.lightsam(0.1, 0.1, variant="adagrad"),
    ...                          params, mesh)
    >>> sorted({str(x.sharding.spec) for x in jax.tree.leaves(state)})
    ["P('model',)", 'P()']
  """
  if param_specs is None:
    param_specs = jax.tree.map(lambda x: _spec_of(x, mesh), params)
  specs = state_specs(optimizer, params, param_specs)
  return jax.jit(optimizer.init, out_shardings=_sharding_tree(mesh, specs))(
      params)


# ----------------------------------------------------------------------------
# (a) pmap
# ----------------------------------------------------------------------------


def pmap_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    m_sharpness: bool = True,
    donate: bool = False,
    devices: Optional[Sequence[Any]] = None,
    has_aux: bool = False,
    has_model_state: bool = False,
) -> Step:
  """A ``jax.pmap`` training step with the global batch split over devices.

  ``params``, ``opt_state`` (and ``model_state``) carry a leading device axis
  (make them with :func:`pmap_replicate`, read them with
  :func:`unreplicate`); ``batch`` is the global batch, reshaped to
  ``(devices, batch / devices, ...)`` before the call; ``rng`` is one key.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch;
      it also receives ``model_state=`` (with ``has_model_state``) and
      ``rng=`` (when the step is called with one). See the module docstring
      for what it returns with ``has_aux`` / ``has_model_state``.
    optimizer: an optax optimizer. Two-pass samtx optimizers must be built
      with ``axis_name=axis_name``; one-pass ones (MSAM, optax) get the
      averaged gradient.
    axis_name: the pmap axis name.
    m_sharpness: per-device perturbations (``True``) or one global
      perturbation from the averaged gradient (``False``).
    donate: donate the ``params`` and ``opt_state`` (and ``model_state``)
      buffers to the step.
    devices: the devices to map over (default: all local devices).
    has_aux: ``loss_fn`` also returns a dict of metrics (averaged).
    has_model_state: ``loss_fn`` takes and returns model state (averaged).

  Returns:
    ``step(params, opt_state, batch, *, model_state=None, rng=None) ->
    (params, opt_state[, model_state], metrics)``; ``metrics`` (not stacked)
    holds ``"loss"``, the clean loss averaged over the global batch, and the
    averaged ``aux``.

  Raises:
    ValueError: the batch size is not divisible by the device count
      (at call time), or the optimizer's ``axis_name`` does not match.

  Example:
    >>> import jax, jax.numpy as jnp, samtx, samtx.parallel as par
    >>> loss_fn = lambda p, b: jnp.mean((b @ p - 1.0) ** 2)
    >>> opt = samtx.sam(0.1, rho=0.05, axis_name="batch")
    >>> params = par.pmap_replicate(jnp.zeros(2))
    >>> state = par.pmap_replicate(opt.init(jnp.zeros(2)))
    >>> step = par.pmap_step(loss_fn, opt)
    >>> batch = jnp.ones((2 * jax.local_device_count(), 2))
    >>> params, state, metrics = step(params, state, batch)
    >>> float(metrics["loss"])
    1.0

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412
  """
  who = "pmap_step"
  _check_common(loss_fn, optimizer, axis_name, who)
  devices = None if devices is None else list(devices)
  n = len(devices) if devices is not None else jax.local_device_count()
  call = _model_loss(loss_fn, has_aux, has_model_state, who)
  body = _train_body(call, optimizer,
                     _DataAxis(axis_name, m_sharpness=m_sharpness), who)
  # in_axes must not be a flat tuple of ints/None: jax 0.10's pmap then
  # assigns it leaf by leaf whenever the arguments have exactly five leaves
  # (one param array, a 3-leaf optimizer state, the batch, model_state=None,
  # rng=None), so the batch got rng's None and each device the global batch.
  # Wrapping the batch in a 1-tuple makes in_axes a nested prefix.
  mapped = jax.pmap(
      lambda p, s, b, m, r: body(p, s, b[0], m, r), axis_name=axis_name,
      devices=devices, in_axes=(0, 0, (0,), 0, None),
      out_axes=(0, 0, 0, None), donate_argnums=(0, 1, 3) if donate else ())

  checked = []

  def step(params, opt_state, batch, *, model_state=None, rng=None):
    _check_model_state(model_state, has_model_state, who)
    size = _check_divisible(batch, n, who)
    if not checked:
      local = lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], x.dtype)
      _probe_if_two_pass(optimizer, jax.tree.map(local, params),
                         jax.tree.map(local, opt_state), axis_name, who)
      checked.append(True)
    split = jax.tree.map(
        lambda x: x.reshape((n, size // n) + tuple(x.shape[1:])), batch)
    return _outputs(mapped(params, opt_state, (split,), model_state, rng),
                    has_model_state)

  return step


# ----------------------------------------------------------------------------
# (b) shard_map
# ----------------------------------------------------------------------------


def shard_map_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "batch",
    m_sharpness: bool = True,
    donate: bool = False,
    param_specs=None,
    has_aux: bool = False,
    has_model_state: bool = False,
) -> Step:
  """A jitted ``jax.shard_map`` training step over ``mesh``.

  Inside ``shard_map`` the gradient of replicated parameters w.r.t. a
  per-device loss is summed over devices by JAX's varying-axis typing; this
  step differentiates w.r.t. a device-varying copy of the parameters
  (``jax.lax.pcast(..., to="varying")``), so per-device gradients -- and
  hence per-device perturbations -- survive.

  **Model-sharded parameters.** With ``param_specs`` naming other mesh axes
  (e.g. ``P(None, "model")`` for a column-parallel kernel), ``loss_fn`` sees
  parameter *blocks* and does its own model-axis collectives (``psum`` of a
  row-parallel matmul); the optimizer must then be built with
  ``norm_axis_name="model"`` so that its global norms sum over the blocks.
  The optimizer state is sharded like the parameters (:func:`state_specs`).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of the
      device's batch; also gets ``model_state=`` / ``rng=`` (module
      docstring).
    optimizer: an optax optimizer; two-pass samtx optimizers must be built
      with ``axis_name=axis_name`` (and ``norm_axis_name`` for sharded
      parameters).
    mesh: a ``jax.sharding.Mesh`` that has ``axis_name`` among its axes
      (``Auto`` or ``Explicit`` axis types).
    axis_name: the mesh axis the batch is split over.
    m_sharpness: per-device perturbations (``True``) or one global one.
    donate: donate the ``params`` and ``opt_state`` (and ``model_state``)
      buffers.
    param_specs: a tree of ``PartitionSpec`` like ``params`` (or a prefix);
      ``None`` replicates them. They must not use ``axis_name``.
    has_aux: ``loss_fn`` also returns a dict of metrics (averaged).
    has_model_state: ``loss_fn`` takes and returns model state (replicated,
      averaged over ``axis_name``).

  Returns:
    ``step(params, opt_state, batch, *, model_state=None, rng=None) ->
    (params, opt_state[, model_state], metrics)``, a ``jax.jit``-ed function;
    params and state come back with the shardings of ``param_specs``.

  Raises:
    ValueError: (when traced) the batch size is not divisible by the mesh
      axis size, or the optimizer's ``axis_name`` does not match.

  Example:
    >>> import jax, jax.numpy as jnp, samtx, samtx.parallel as par
    >>> mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    >>> loss_fn = lambda p, b: jnp.mean((b @ p - 1.0) ** 2)
    >>> opt = samtx.adasam(0.01, rho=0.05, axis_name="batch")
    >>> params = par.replicate(jnp.zeros(2), mesh)
    >>> state = par.replicate(opt.init(jnp.zeros(2)), mesh)
    >>> step = par.shard_map_step(loss_fn, opt, mesh)
    >>> batch = par.shard_batch(jnp.ones((2 * jax.device_count(), 2)), mesh)
    >>> params, state, metrics = step(params, state, batch)
    >>> float(metrics["loss"])
    1.0

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412
  """
  who = "shard_map_step"
  _check_common(loss_fn, optimizer, axis_name, who)
  n = _check_mesh(mesh, axis_name, who)
  call = _model_loss(loss_fn, has_aux, has_model_state, who)
  body = _train_body(
      call, optimizer,
      _DataAxis(axis_name, m_sharpness=m_sharpness, manual=True), who)
  model_axes = tuple(a for a in mesh.axis_names if a != axis_name)

  def step(params, opt_state, batch, model_state, rng):
    _check_divisible(batch, n, who)
    _probe_if_two_pass(optimizer, params, opt_state, axis_name, who,
                       model_axes)
    pspecs = _spec_tree(param_specs, params, who, "param_specs")
    sspecs = state_specs(optimizer, params, pspecs)
    mapped = jax.shard_map(
        body, mesh=mesh,
        in_specs=(pspecs, sspecs, P(axis_name), P(), P()),
        out_specs=(pspecs, sspecs, P(), P()))
    params = _constrain_specs(params, mesh, pspecs)
    opt_state = _constrain_specs(opt_state, mesh, sspecs)
    batch = _constrain_specs(batch, mesh,
                             _spec_tree(P(axis_name), batch, who, "batch"))
    try:
      return mapped(params, opt_state, batch, model_state, rng)
    except ValueError as err:
      if "out_specs" not in str(err) or not _uses_axes(pspecs, model_axes):
        raise
      raise ValueError(
          f"{who}: with parameters sharded over {model_axes}, build the"
          f" optimizer with norm_axis_name={model_axes!r} (e.g."
          f" samtx.sam(lr, rho, axis_name={axis_name!r},"
          f" norm_axis_name={model_axes[0]!r})) so that its global norms sum"
          " over the parameter blocks; without it each device computes its"
          f" own block's norm and replicated leaves drift apart.\n{err}"
      ) from None

  jitted = jax.jit(step, donate_argnums=(0, 1, 3) if donate else ())

  def run(params, opt_state, batch, *, model_state=None, rng=None):
    _check_model_state(model_state, has_model_state, who)
    return _outputs(jitted(params, opt_state, batch, model_state, rng),
                    has_model_state)

  return run


# ----------------------------------------------------------------------------
# (c) plain jit with NamedSharding
# ----------------------------------------------------------------------------


def jit_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "batch",
    m_sharpness_groups: Optional[int] = None,
    donate: bool = False,
    param_specs=None,
    has_aux: bool = False,
    has_model_state: bool = False,
) -> Step:
  """A ``jax.jit`` training step with the batch and parameters sharded by ``NamedSharding``.

  No mapped axis exists under plain ``jit``: with ``m_sharpness_groups=None``
  the gradient of the global batch gives one global perturbation (build the
  optimizer with ``axis_name=None``). With ``m_sharpness_groups=G`` the batch
  is cut into ``G`` equal groups and the update is ``jax.vmap``-ed over them
  with ``axis_name=axis_name`` (build the optimizer with that axis name):
  each group gets its own perturbation, exactly like :func:`pmap_step` with
  ``G`` devices.

  **Sharded parameters** (FSDP, tensor parallel, both): parameters keep the
  sharding they arrive with, or take ``param_specs``; the optimizer state
  takes :func:`state_specs` (parameter-shaped leaves like their parameter);
  the output shardings are pinned to those, so a step never gathers or
  re-lays out what it was given. XLA computes the global norms across
  shards: the numbers equal the unsharded run. The step computes on an
  ``Auto``-axes copy of ``mesh``, so it works with ``Auto`` and
  ``Explicit`` meshes alike (``jax.make_mesh``'s default is ``Explicit``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch;
      also gets ``model_state=`` / ``rng=`` (module docstring).
    optimizer: an optax optimizer.
    mesh: a ``jax.sharding.Mesh`` with ``axis_name`` among its axes.
    axis_name: the mesh axis the batch is split over, and the vmap axis
      name in m-sharpness mode.
    m_sharpness_groups: ``None`` (global perturbation) or the number of
      perturbation groups ``G >= 1``.
    donate: donate the ``params`` and ``opt_state`` (and ``model_state``)
      buffers.
    param_specs: a tree of ``PartitionSpec`` like ``params`` (or a prefix);
      ``None``: each parameter's own ``NamedSharding`` on ``mesh``
      (replicated if it has none).
    has_aux: ``loss_fn`` also returns a dict of metrics.
    has_model_state: ``loss_fn`` takes and returns model state (replicated).

  Returns:
    ``step(params, opt_state, batch, *, model_state=None, rng=None) ->
    (params, opt_state[, model_state], metrics)``; compiled once per
    parameter layout.

  Raises:
    ValueError: the batch size is not divisible by the mesh axis size or by
      ``G`` (when traced), or the optimizer's ``axis_name`` does not match.

  Example:
    >>> import jax, jax.numpy as jnp, samtx, samtx.parallel as par
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    >>> loss_fn = lambda p, b: jnp.mean((b @ p - 1.0) ** 2)
    >>> opt = samtx.sam(0.1, rho=0.05)
    >>> step = par.jit_step(loss_fn, opt, mesh)
    >>> dim = 2 * jax.device_count()
    >>> params = par.shard(jnp.zeros(dim), mesh, P("batch"))  # FSDP-style
    >>> state = par.init_sharded(opt, params, mesh)
    >>> batch = par.shard_batch(jnp.ones((jax.device_count(), dim)), mesh)
    >>> params, state, metrics = step(params, state, batch)
    >>> float(metrics["loss"]), params.sharding.spec
    (1.0, P('batch',))

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412
  """
  who = "jit_step"
  _check_common(loss_fn, optimizer, axis_name, who)
  n = _check_mesh(mesh, axis_name, who)
  if m_sharpness_groups is not None:
    if (isinstance(m_sharpness_groups, bool)
        or not isinstance(m_sharpness_groups, (int, np.integer))):
      raise TypeError(
          f"{who}: m_sharpness_groups must be None or an int, got"
          f" {m_sharpness_groups!r}.")
    if m_sharpness_groups < 1:
      raise ValueError(
          f"{who}: m_sharpness_groups must be >= 1, got {m_sharpness_groups}.")
  groups = m_sharpness_groups
  call = _model_loss(loss_fn, has_aux, has_model_state, who)
  global_body = _train_body(call, optimizer, _DataAxis(None), who)
  group_body = _train_body(call, optimizer, _DataAxis(axis_name), who)
  auto_mesh = _auto_mesh(mesh)

  def update(params, opt_state, batch, model_state, rng):
    two_pass = bool(_perturbation_states(opt_state))
    if groups is None or not two_pass:
      if two_pass:
        _probe_no_axis(optimizer, params, opt_state, params, who)
      return global_body(params, opt_state, batch, model_state, rng)
    _probe_if_two_pass(optimizer, params, opt_state, axis_name, who)
    size = _batch_size(batch, who)
    grouped = jax.tree.map(
        lambda x: x.reshape((groups, size // groups) + x.shape[1:]), batch)
    member = lambda b: group_body(params, opt_state, b, model_state, rng)
    return jax.vmap(member, axis_name=axis_name, out_axes=None)(grouped)

  def build(pspecs, sspecs):
    """The step compiled for one layout, outputs pinned to it on ``mesh``."""
    replicated = NamedSharding(mesh, P())

    def inner(params, opt_state, batch, model_state, rng):
      # Compute on the Auto copy of the mesh, with the same specs.
      params = _place_specs(params, auto_mesh, pspecs)
      opt_state = _place_specs(opt_state, auto_mesh, sspecs)
      batch = jax.device_put(batch, NamedSharding(auto_mesh, P(axis_name)))
      model_state = jax.device_put(model_state, NamedSharding(auto_mesh, P()))
      out = update(params, opt_state, batch, model_state, rng)
      params, opt_state, model_state, metrics = out
      return (_place_specs(params, mesh, pspecs),
              _place_specs(opt_state, mesh, sspecs),
              jax.device_put(model_state, replicated),
              jax.device_put(metrics, replicated))

    return jax.jit(
        inner, donate_argnums=(0, 1, 3) if donate else (),
        out_shardings=(_sharding_tree(mesh, pspecs),
                       _sharding_tree(mesh, sspecs), replicated, replicated))

  compiled = {}

  def step(params, opt_state, batch, *, model_state=None, rng=None):
    _check_model_state(model_state, has_model_state, who)
    _check_divisible(batch, n, who)
    if groups is not None:
      _check_divisible(batch, groups, who, what="m_sharpness_groups")
    if param_specs is None:
      pspecs = jax.tree.map(lambda x: _spec_of(x, mesh), params)
    else:
      pspecs = _spec_tree(param_specs, params, who, "param_specs")
    key = (jax.tree.structure(params), tuple(jax.tree.leaves(
        pspecs, is_leaf=_is_spec)))
    if key not in compiled:
      compiled[key] = build(pspecs, state_specs(optimizer, params, pspecs))
    return _outputs(compiled[key](params, opt_state, batch, model_state, rng),
                    has_model_state)

  return step
