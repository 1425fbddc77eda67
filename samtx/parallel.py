"""Data-parallel training steps for samtx optimizers.

Three ready-made builders turn a user ``loss_fn(params, batch) -> scalar`` and
an optimizer into a compiled training step
``step(params, opt_state, batch) -> (params, opt_state, metrics)``:

- :func:`pmap_step` -- ``jax.pmap`` (one program per device, stacked params);
- :func:`shard_map_step` -- ``jax.shard_map`` over a ``jax.sharding.Mesh``;
- :func:`jit_step` -- plain ``jax.jit`` with a ``NamedSharding`` on the batch.

Parameters and optimizer state stay replicated; ``batch`` is the *global*
mini-batch (a pytree whose leaves share a leading batch axis), split over the
devices along that axis. ``metrics["loss"]`` is the clean loss averaged over
the global batch.

Two ways to perturb (two-pass optimizers: SAM, ASAM, AdaSAM, LightSAM):

- **m-sharpness** (``m_sharpness=True``, or ``m_sharpness_groups=G`` under
  ``jit_step``): every device (group) builds its perturbation from its *own*
  gradient, ``e_k = rho g_k / ||g_k||``, evaluates ``h_k = grad L_k(x + e_k)``
  and the update uses ``mean_k h_k``. This is the SAM paper's default, with
  ``m`` the per-device batch; it usually generalises better and costs no
  extra communication.
- **global perturbation** (``m_sharpness=False``): the clean gradient is
  averaged first, so all devices share ``e = rho g / ||g||``; the result
  equals a single-device run on the whole batch (up to float reduction
  order). Use it when the numbers must not depend on the device count.

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

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from samtx.perturbations import PerturbationState

__all__ = [
    "pmap_step",
    "shard_map_step",
    "jit_step",
    "replicate",
    "pmap_replicate",
    "unreplicate",
    "shard_batch",
]

LossFn = Callable[[Any, Any], jax.Array]
Step = Callable[[Any, Any, Any], tuple]


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


def _is_explicit(mesh, axis_name) -> bool:
  types = getattr(mesh, "axis_types", None)
  if not types:
    return False
  kind = dict(zip(mesh.axis_names, types))[axis_name]
  return "Explicit" in str(kind)


def _constrain(tree, mesh, spec, axis_name):
  """Places ``tree`` with ``NamedSharding(mesh, spec)`` inside a jit."""
  sharding = NamedSharding(mesh, spec)
  if _is_explicit(mesh, axis_name):
    return jax.tree.map(lambda x: jax.reshard(x, sharding), tree)
  return jax.lax.with_sharding_constraint(tree, sharding)


def _auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with every axis of type ``Auto``.

  ``jit_step`` computes on this mesh: collectives of a named ``vmap`` axis
  over an ``Explicit``-ly sharded dimension are not supported by jax 0.10.
  """
  auto = jax.sharding.AxisType.Auto
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(auto,) * len(mesh.axis_names))


def _place(tree, mesh, spec):
  """``jax.device_put`` to ``NamedSharding(mesh, spec)`` (a cast inside jit)."""
  return jax.device_put(tree, NamedSharding(mesh, spec))


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))  # older jax spelling


def _mark_varying(tree, axis_name):
  """``pcast``s leaves that do not yet vary over ``axis_name`` (shard_map).

  Under ``shard_map`` the gradient of a device-invariant (replicated) value
  with respect to a device-varying loss is implicitly summed over devices;
  differentiating with respect to a varying copy keeps the local gradient.
  """
  def mark(x):
    if axis_name in _varying_axes(x):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(mark, tree)


def _perturbation_states(state) -> list:
  is_ps = lambda s: isinstance(s, PerturbationState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_ps) if is_ps(s)]


def _average_perturbation_state(state, axis_name):
  """``pmean``s the float leaves of every ``PerturbationState`` over the axis.

  In m-sharpness mode these hold statistics of the local gradient; averaging
  them keeps the optimizer state replicated. Integer leaves (counts) are
  identical on all devices and are left alone.
  """
  def average(s):
    if not isinstance(s, PerturbationState):
      return s
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name)
        if jnp.issubdtype(x.dtype, jnp.inexact) else x, s)
  return jax.tree.map(
      average, state, is_leaf=lambda s: isinstance(s, PerturbationState))


def _probe_axis_name(optimizer, grads, state, params, axis_name, who):
  """Checks that a two-pass optimizer averages its output over ``axis_name``.

  Traces one update abstractly (``jax.eval_shape``, no computation) under
  ``jax.vmap(..., axis_name=axis_name)`` with a per-member gradient. If the
  optimizer averages over ``axis_name`` its updates leave the vmap unbatched;
  otherwise they stay batched (``axis_name=None``) or name an unbound axis.
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
    jax.eval_shape(run, stacked, state_s, params_s)
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


def _probe_if_two_pass(optimizer, params, opt_state, axis_name, who):
  """Runs :func:`_probe_axis_name` for optimizers with a perturbation."""
  if _perturbation_states(opt_state):
    _probe_axis_name(optimizer, params, opt_state, params, axis_name, who)


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


# ----------------------------------------------------------------------------
# the per-device step body shared by pmap and shard_map
# ----------------------------------------------------------------------------


def _mapped_body(loss_fn, optimizer, axis_name, m_sharpness, vary, who):
  """One training step seen from one device (``batch`` is the local shard)."""

  def body(params, opt_state, batch):
    two_pass = bool(_perturbation_states(opt_state))
    local_loss = lambda p: loss_fn(p, batch)

    def grad_fn(p):
      # Differentiate w.r.t. a device-varying copy: the local gradient.
      return jax.grad(local_loss)(vary(p))

    loss, grads = jax.value_and_grad(local_loss)(vary(params))
    if not (two_pass and m_sharpness):
      grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(
        grads, opt_state, params, grad_fn=grad_fn)
    if two_pass and m_sharpness:
      opt_state = _average_perturbation_state(opt_state, axis_name)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": jax.lax.pmean(loss, axis_name)}

  return body


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
) -> Step:
  """A ``jax.pmap`` training step with the global batch split over devices.

  ``params`` and ``opt_state`` carry a leading device axis (make them with
  :func:`pmap_replicate`, read them with :func:`unreplicate`); ``batch`` is
  the global batch, reshaped to ``(devices, batch / devices, ...)`` before
  the call.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch.
    optimizer: an optax optimizer. Two-pass samtx optimizers must be built
      with ``axis_name=axis_name``; one-pass ones (MSAM, optax) get the
      averaged gradient.
    axis_name: the pmap axis name.
    m_sharpness: per-device perturbations (``True``) or one global
      perturbation from the averaged gradient (``False``).
    donate: donate the ``params`` and ``opt_state`` buffers to the step.
    devices: the devices to map over (default: all local devices).

  Returns:
    ``step(params, opt_state, batch) -> (params, opt_state, metrics)``;
    ``metrics["loss"]`` (not stacked) is the clean loss averaged over the
    global batch.

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
  body = _mapped_body(loss_fn, optimizer, axis_name, m_sharpness,
                      lambda p: p, who)
  mapped = jax.pmap(
      body, axis_name=axis_name, devices=devices, out_axes=(0, 0, None),
      donate_argnums=(0, 1) if donate else ())

  checked = []

  def step(params, opt_state, batch):
    size = _check_divisible(batch, n, who)
    if not checked:
      local = lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], x.dtype)
      _probe_if_two_pass(optimizer, jax.tree.map(local, params),
                         jax.tree.map(local, opt_state), axis_name, who)
      checked.append(True)
    split = jax.tree.map(
        lambda x: x.reshape((n, size // n) + tuple(x.shape[1:])), batch)
    return mapped(params, opt_state, split)

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
) -> Step:
  """A jitted ``jax.shard_map`` training step over ``mesh``.

  Inside ``shard_map`` the gradient of replicated parameters w.r.t. a
  per-device loss is summed over devices by JAX's varying-axis typing; this
  step differentiates w.r.t. a device-varying copy of the parameters
  (``jax.lax.pcast(..., to="varying")``), so per-device gradients -- and
  hence per-device perturbations -- survive.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch.
    optimizer: an optax optimizer; two-pass samtx optimizers must be built
      with ``axis_name=axis_name``.
    mesh: a ``jax.sharding.Mesh`` that has ``axis_name`` among its axes
      (``Auto`` or ``Explicit`` axis types).
    axis_name: the mesh axis the batch is split over.
    m_sharpness: per-device perturbations (``True``) or one global one.
    donate: donate the ``params`` and ``opt_state`` buffers.

  Returns:
    ``step(params, opt_state, batch) -> (params, opt_state, metrics)``, a
    ``jax.jit``-ed function; params and state come back replicated.

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
  body = _mapped_body(loss_fn, optimizer, axis_name, m_sharpness,
                      lambda p: _mark_varying(p, axis_name), who)
  mapped = jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(), P(axis_name)),
      out_specs=(P(), P(), P()))

  def step(params, opt_state, batch):
    _check_divisible(batch, n, who)
    _probe_if_two_pass(optimizer, params, opt_state, axis_name, who)
    params, opt_state = _constrain((params, opt_state), mesh, P(), axis_name)
    batch = _constrain(batch, mesh, P(axis_name), axis_name)
    return mapped(params, opt_state, batch)

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


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
) -> Step:
  """A ``jax.jit`` training step with the batch sharded by ``NamedSharding``.

  No mapped axis exists under plain ``jit``: with ``m_sharpness_groups=None``
  the gradient of the global batch gives one global perturbation (build the
  optimizer with ``axis_name=None``). With ``m_sharpness_groups=G`` the batch
  is cut into ``G`` equal groups and the update is ``jax.vmap``-ed over them
  with ``axis_name=axis_name`` (build the optimizer with that axis name):
  each group gets its own perturbation, exactly like :func:`pmap_step` with
  ``G`` devices.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss of a batch.
    optimizer: an optax optimizer.
    mesh: a ``jax.sharding.Mesh`` with ``axis_name`` among its axes.
    axis_name: the mesh axis the batch is split over, and the vmap axis
      name in m-sharpness mode.
    m_sharpness_groups: ``None`` (global perturbation) or the number of
      perturbation groups ``G >= 1``.
    donate: donate the ``params`` and ``opt_state`` buffers.

  Returns:
    ``step(params, opt_state, batch) -> (params, opt_state, metrics)``, a
    ``jax.jit``-ed function.

  Raises:
    ValueError: the batch size is not divisible by the mesh axis size or by
      ``G`` (when traced), or the optimizer's ``axis_name`` does not match.

  Example:
    >>> import jax, jax.numpy as jnp, samtx, samtx.parallel as par
    >>> mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    >>> loss_fn = lambda p, b: jnp.mean((b @ p - 1.0) ** 2)
    >>> opt = samtx.sam(0.1, rho=0.05)
    >>> step = par.jit_step(loss_fn, opt, mesh)
    >>> params = par.replicate(jnp.zeros(2), mesh)
    >>> state = par.replicate(opt.init(jnp.zeros(2)), mesh)
    >>> batch = par.shard_batch(jnp.ones((2 * jax.device_count(), 2)), mesh)
    >>> params, state, metrics = step(params, state, batch)
    >>> float(metrics["loss"])
    1.0

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

  def global_update(params, opt_state, batch, two_pass):
    value_and_grad = jax.value_and_grad(loss_fn)
    loss, grads = value_and_grad(params, batch)
    if two_pass:
      _probe_no_axis(optimizer, grads, opt_state, params, who)
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
    updates, opt_state = optimizer.update(
        grads, opt_state, params, grad_fn=grad_fn)
    return updates, opt_state, loss

  def grouped_update(params, opt_state, batch, size):
    grouped = jax.tree.map(
        lambda x: x.reshape((groups, size // groups) + x.shape[1:]), batch)

    def member(group_batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, group_batch)
      grad_fn = lambda p: jax.grad(loss_fn)(p, group_batch)
      updates, new_state = optimizer.update(
          grads, opt_state, params, grad_fn=grad_fn)
      new_state = _average_perturbation_state(new_state, axis_name)
      return updates, new_state, jax.lax.pmean(loss, axis_name)

    _probe_if_two_pass(optimizer, params, opt_state, axis_name, who)
    return jax.vmap(member, axis_name=axis_name, out_axes=None)(grouped)

  auto_mesh = _auto_mesh(mesh)

  def step(params, opt_state, batch):
    size = _check_divisible(batch, n, who)
    if groups is not None:
      _check_divisible(batch, groups, who, what="m_sharpness_groups")
    params, opt_state = _place((params, opt_state), auto_mesh, P())
    batch = _place(batch, auto_mesh, P(axis_name))
    two_pass = bool(_perturbation_states(opt_state))
    if groups is None or not two_pass:
      updates, opt_state, loss = global_update(params, opt_state, batch,
                                               two_pass)
    else:
      updates, opt_state, loss = grouped_update(params, opt_state, batch,
                                                size)
    params = optax.apply_updates(params, updates)
    params, opt_state = _place((params, opt_state), mesh, P())
    return params, opt_state, {"loss": loss}

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
