"""samtx inside optax's wrappers: every alias x every wrapper, as data.

Each cell either runs (jitted once) and matches the same pipeline written out
by hand step by step (with ``grad_fn`` closed over), and lowers the loss, or
raises a clear error. The matrix is two lists:

- ``ALIASES`` x ``WRAPPERS``: a whole samtx alias inside a wrapper;
- ``PERTURBATIONS`` x ``BASES``: a perturbation transform followed by another
  base (the form to use where the wrapper must act on the perturbed gradient).

Aliases and perturbations are discovered from ``samtx.__all__`` (a function
whose first argument is ``learning_rate``, a name ending in
``_perturbation``), so new ones join the matrix with their default
hyper-parameters; ``VARIANTS`` adds the flag settings worth a column.
docs/guides/wrappers.md is this file as a table.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import samtx
from tests import helpers

STEPS = 8
LR, RHO = 0.05, 0.05
CLIP, WEIGHT_DECAY = 0.5, 0.1
ACCUMULATE = 2                 # MultiSteps' every_k_schedule
SYNC, SLOW_STEP = 3, 0.5       # Lookahead
SCHEDULE_FREE_B1 = 0.9
CHANGE_AT = STEPS // 2         # inject_hyperparams: new values from this step

_, LOSS, PARAMS, _ = helpers.problem_and_loss(jnp.float32)
FROZEN = "a_weight"            # the leaf the freezing rows keep fixed
FROZEN_MASK = jax.tree_util.tree_map_with_path(
    lambda path, _: jax.tree_util.keystr(path) == f"['{FROZEN}']", PARAMS)
TRAIN_MASK = jax.tree.map(lambda frozen: not frozen, FROZEN_MASK)
LABELS = jax.tree.map(lambda frozen: "frozen" if frozen else "train",
                      FROZEN_MASK)
# One micro-batch per step: a linear term that changes the gradient, so that
# accumulation and grad_fn forwarding are visible in the numbers.
NOISE = jax.tree.map(
    lambda x, k: 0.3 * jax.random.normal(k, (STEPS,) + x.shape),
    PARAMS, jax.tree.unflatten(jax.tree.structure(PARAMS), list(
        jax.random.split(jax.random.key(1), len(jax.tree.leaves(PARAMS))))))


def batch_loss(params, i):
  linear = jax.tree.map(lambda x, n: jnp.sum(n[i] * x), params, NOISE)
  return LOSS(params) + sum(jax.tree.leaves(linear))


# Jitted so that the hand-written references, which run eagerly, stay cheap.
_batch_grad = jax.jit(jax.grad(batch_loss))


def grad_fn_for(i):
  """The gradient of micro-batch ``i``'s loss (a closure, as users write)."""
  return lambda params: _batch_grad(params, i)




@jax.jit
def mean_loss(params):
  return jnp.mean(jax.vmap(batch_loss, (None, 0))(params, jnp.arange(STEPS)))


def trainable(tree):
  return {k: v for k, v in tree.items() if k != FROZEN}


def with_frozen(sub):
  return {FROZEN: PARAMS[FROZEN], **sub}


def sub_grad_fn_for(i):
  """grad_fn of the trainable leaves alone, the frozen leaf held fixed."""
  return lambda sub: trainable(grad_fn_for(i)(with_frozen(sub)))


def tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def hand_clip(tree):
  """optax.clip_by_global_norm(CLIP), written out."""
  norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))
  return jax.tree.map(lambda x: jnp.where(norm < CLIP, x, x / norm * CLIP),
                      tree)


# ---------------------------------------------------------------- the columns
VARIANTS = {
    "sam": [("sam", {}), ("sam_momentum", {"momentum": 0.9}),
            ("asam", {"adaptive": True, "eta": 0.01}),
            ("sam_unnormalized", {"normalize": False})],
    "lightsam": [("lightsam_I", {"variant": "adagrad_norm"}),
                 ("lightsam_II", {"variant": "adagrad"}),
                 ("lightsam_III", {"variant": "adam"})],
    "sam_perturbation": [("sam_perturbation", {}),
                         ("asam_perturbation", {"adaptive": True, "eta": 0.01}),
                         ("sam_perturbation_unnormalized",
                          {"normalize": False})],
    # gamma = 0.9 puts -8 g + 9 h in the step: with a clipped g (and this
    # lr) the run diverges, in the reference as much as in the pipeline.
    "wsam": [("wsam", {"gamma": 0.7})],
    "lightsam_perturbation": [
        (f"lightsam_perturbation_{v}", {"variant": v})
        for v in ("adagrad_norm", "adagrad", "adam")],
}


class Alias(NamedTuple):
  """A samtx alias with its flags; ``build`` takes hyper-parameter overrides.
  Hashable (flags as sorted items) so per-column results can be cached."""
  label: str
  name: str
  flags: tuple

  @property
  def kwargs(self):
    return dict(self.flags)

  @property
  def factory(self):
    return getattr(samtx, self.name)

  def hyperparams(self, **overrides):
    names = inspect.signature(self.factory).parameters
    values = {"learning_rate": LR, "rho": RHO}
    values.update(overrides)
    return {k: v for k, v in values.items() if k in names}

  def build(self, **overrides):
    return self.factory(**self.hyperparams(**overrides), **self.kwargs)


def _public_functions(accept):
  found = []
  for name in samtx.__all__:
    value = getattr(samtx, name)
    if inspect.isfunction(value) and accept(name, value):
      found.extend(Alias(label, name, tuple(sorted(kwargs.items())))
                   for label, kwargs
                   in VARIANTS.get(name, [(name, {})]))
  return found


ALIASES = _public_functions(
    lambda name, fn: next(iter(inspect.signature(fn).parameters), None)
    == "learning_rate")
PERTURBATIONS = _public_functions(
    lambda name, fn: name.endswith("_perturbation"))


@functools.cache
def kind(alias: Alias) -> str:
  """``"two_pass"`` (calls grad_fn), ``"one_pass"`` (holds a perturbation,
  MSAM) or ``"plain"`` (neither, e.g. amsgrad)."""
  opt = alias.build()
  state = opt.init(PARAMS)
  if samtx.unperturb(PARAMS, state) is not PARAMS:
    return "one_pass"
  called = []
  opt.update(PARAMS, state, PARAMS,
             **helpers.gradient_fns(lambda p: called.append(True) or jax.tree.map(
                 jnp.zeros_like, p)))
  return "two_pass" if called else "plain"


def test_discovery_finds_the_design_aliases():
  labels = {a.label for a in ALIASES}
  assert {"sam", "sam_momentum", "asam", "adasam", "amsgrad", "lightsam_I",
          "lightsam_II", "lightsam_III", "msam"} <= labels
  assert {"sam_perturbation", "asam_perturbation",
          "lightsam_perturbation_adam"} <= {p.label for p in PERTURBATIONS}
  assert kind(next(a for a in ALIASES if a.name == "msam")) == "one_pass"
  assert kind(next(a for a in ALIASES if a.name == "amsgrad")) == "plain"
  assert kind(next(a for a in ALIASES if a.name == "sam")) == "two_pass"


# -------------------------------------------------------- running a pipeline
class Cell(NamedTuple):
  """How one wrapper is built, driven and checked.

  Attributes:
    build: optimizer column -> the wrapped transform.
    reference: optimizer column -> the evaluation weights after each step,
      computed by hand (the wrapper's maths written out around the bare
      optimizer, grad_fn closed over).
    raises: optimizer column -> None, or (exception, message regex).
    wrap / point / evaluate: params the wrapper holds, the tree the gradient
      is taken at, and the weights to evaluate.
    before_step: (state, step) -> state, for run-time changes.
  """
  build: Callable[[Alias], Any]
  reference: Callable[[Alias], list]
  raises: Callable[[Alias], Optional[tuple]] = lambda alias: None
  # What the user's grad_fn returns, e.g. with frozen leaves zeroed.
  grad_fn_wrap: Callable = lambda grad_fn: grad_fn
  wrap: Callable = lambda params: params
  point: Callable = lambda params: params
  evaluate: Callable = lambda params, state: samtx.unperturb(params, state)
  before_step: Callable = lambda state, step: state


def run_wrapped(cell: Cell, column: Alias) -> list:
  tx = cell.build(column)
  params = cell.wrap(PARAMS)
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    grad_fn = cell.grad_fn_wrap(grad_fn_for(i))
    updates, state = tx.update(grad_fn(cell.point(params)), state, params,
                               **helpers.gradient_fns(grad_fn))
    return optax.apply_updates(params, updates), state

  weights = []
  for i in range(STEPS):
    state = cell.before_step(state, i)
    params, state = step(params, state, i)
    weights.append(cell.evaluate(params, state))
  return weights


def iterate(step, carry, evaluate, steps=STEPS):
  """Drives a hand-written reference ``step(carry, i) -> carry``."""
  weights = []
  for i in range(steps):
    carry = step(carry, i)
    weights.append(evaluate(carry))
  return weights


@functools.cache
def alias_update(alias: Alias):
  """The alias and its ``update`` with micro-batch ``i``'s grad_fn, jitted
  once per column and shared by every reference that drives the bare alias."""
  opt = alias.build()

  @jax.jit
  def update(grads, state, params, i):
    return opt.update(grads, state, params, **helpers.gradient_fns(grad_fn_for(i)))

  return opt, update


@functools.cache
def bare_run(alias: Alias) -> list:
  """The alias alone: evaluation weights after each step."""
  opt, update = alias_update(alias)

  def step(carry, i):
    x, s = carry
    u, s = update(grad_fn_for(i)(x), s, x, i)
    return tree_add(x, u), s

  return iterate(step, (PARAMS, opt.init(PARAMS)),
                 lambda c: samtx.unperturb(*c))


def pre_transformed_run(transform_gradient):
  """The alias fed ``transform_gradient(g, x)`` instead of ``g``; grad_fn's
  output reaches the alias's base untouched."""
  def reference(alias):
    opt, update = alias_update(alias)

    def step(carry, i):
      x, s = carry
      u, s = update(transform_gradient(grad_fn_for(i)(x), x), s, x, i)
      return tree_add(x, u), s

    return iterate(step, (PARAMS, opt.init(PARAMS)),
                   lambda c: samtx.unperturb(*c))
  return reference


@functools.cache
def subtree_run(alias):
  """The alias on the trainable leaves alone; the frozen leaf never moves.
  Held weights (``samtx.unperturb`` cannot see through optax.masked, see
  test_unperturb_sees_through_masked)."""
  opt = alias.build()

  @jax.jit
  def update(grads, state, params, i):
    return opt.update(grads, state, params,
                      **helpers.gradient_fns(sub_grad_fn_for(i)))

  def step(carry, i):
    x, s = carry
    u, s = update(sub_grad_fn_for(i)(x), s, x, i)
    return tree_add(x, u), s

  sub = trainable(PARAMS)
  return iterate(step, (sub, opt.init(sub)), lambda c: with_frozen(c[0]))


def multisteps_run(alias):
  """Mean of ACCUMULATE micro-batch gradients; the alias steps once with the
  grad_fn of the last micro-batch (MultiSteps forwards the call's extra args)."""
  opt, update = alias_update(alias)

  def step(carry, i):
    x, s, acc = carry
    acc = tree_add(acc, grad_fn_for(i)(x))
    if (i + 1) % ACCUMULATE:
      return x, s, acc
    u, s = update(jax.tree.map(lambda a: a / ACCUMULATE, acc), s, x, i)
    return tree_add(x, u), s, jax.tree.map(jnp.zeros_like, acc)

  zeros = jax.tree.map(jnp.zeros_like, PARAMS)
  return iterate(step, (PARAMS, opt.init(PARAMS), zeros),
                 lambda c: samtx.unperturb(c[0], c[1]))


def injected_build(alias):
  """Every numeric argument injected (flags such as momentum and eta
  included); only bools and strings stay static."""
  static = tuple(k for k, v in alias.kwargs.items()
                 if isinstance(v, (bool, str)))
  return optax.inject_hyperparams(alias.factory, static_args=static)(
      **alias.hyperparams(), **alias.kwargs)


def change_hyperparams(state, i):
  """At CHANGE_AT: halve the learning rate, double rho (the run-time change
  a user makes with inject_hyperparams)."""
  if i == CHANGE_AT:
    for name, value in (("learning_rate", LR / 2), ("rho", 2 * RHO)):
      if name in state.hyperparams:
        state.hyperparams[name] = jnp.asarray(
            value, state.hyperparams[name].dtype)
  return state


def injected_run(alias):
  """The alias called with the arrays inject_hyperparams passes (every
  numeric argument, defaults included, as a float32 array: ``1 - b2`` then
  rounds differently from Python's), then rebuilt with the new values,
  continuing from the same state."""
  arrays = injected_build(alias).init(PARAMS).hyperparams
  changed = {**arrays, "learning_rate": LR / 2, "rho": 2 * RHO}
  before, after = (
      alias.factory(**{**alias.kwargs, **{
          k: jnp.asarray(v, arrays[k].dtype) for k, v in values.items()
          if k in arrays}})
      for values in (arrays, changed))
  updates = []
  for opt in (before, after):
    updates.append(jax.jit(functools.partial(
        lambda opt, g, s, x, i: opt.update(g, s, x,
                                           **helpers.gradient_fns(grad_fn_for(i))),
        opt)))

  def step(carry, i):
    x, s = carry
    u, s = updates[i >= CHANGE_AT](grad_fn_for(i)(x), s, x, i)
    return tree_add(x, u), s

  return iterate(step, (PARAMS, before.init(PARAMS)),
                 lambda c: samtx.unperturb(*c))


def schedule_free_run(alias):
  """Schedule-free around the alias (Defazio et al. 2024), written out: the
  held weights are y = b1 x + (1 - b1) z; the alias perturbs around y and
  its step moves z; x is the lr^2-weighted average of z."""
  b1 = SCHEDULE_FREE_B1
  opt, update = alias_update(alias)

  def step(carry, i):
    x, z, s, weight_sum = carry
    y = jax.tree.map(lambda a, b: b1 * a + (1 - b1) * b, x, z)
    u, s = update(grad_fn_for(i)(y), s, y, i)
    z = tree_add(z, u)
    weight_sum = weight_sum + LR ** 2
    ck = LR ** 2 / weight_sum
    x = jax.tree.map(lambda a, b: (1 - ck) * a + ck * b, x, z)
    return x, z, s, weight_sum

  return iterate(step, (PARAMS, PARAMS, opt.init(PARAMS), 0.0),
                 lambda c: c[0])


def lookahead_run(alias):
  """Lookahead written out: every SYNC steps the slow weights move
  SLOW_STEP of the way to the clean fast weights and the fast weights
  restart there, carrying the fast state's perturbation (MSAM) again."""
  opt, update = alias_update(alias)

  def step(carry, i):
    fast, slow, s = carry
    u, s = update(grad_fn_for(i)(fast), s, fast, i)
    fast = tree_add(fast, u)
    if (i + 1) % SYNC == 0:
      clean = samtx.unperturb(fast, s)
      slow = jax.tree.map(lambda a, b: a + SLOW_STEP * (b - a), slow, clean)
      fast = jax.tree.map(lambda a, c, f: a - (c - f), slow, clean, fast)
    return fast, slow, s

  return iterate(step, (PARAMS, PARAMS, opt.init(PARAMS)), lambda c: c[1])


GPA_TRAIN, GPA_EVAL = 0.7, 0.6   # samtx.gpa (fast averaging: 8 steps)
MESA_DECAY = 0.7                 # samtx.mesa


@functools.cache
def _shifted_update(alias: Alias):
  """The bare alias's update with grad_fn evaluated at q + offset."""
  opt = alias.build()

  @jax.jit
  def update(grads, state, params, offset, i):
    return opt.update(grads, state, params, **helpers.gradient_fns(
        lambda q: grad_fn_for(i)(tree_add(q, offset))))

  return opt, update


def gpa_run(alias):
  """GPA written out, the three sequences stored: the gradient at y, the
  alias steps z (its perturbation taken around y: grad_fn shifted by y - z),
  x the EMA of z, y between them. Evaluated at x, with an MSAM alias's
  current perturbation removed (samtx.eval_params' rule)."""
  opt, update = _shifted_update(alias)

  def step(carry, i):
    x, y, z, s = carry
    offset = jax.tree.map(jnp.subtract, y, z)
    u, s = update(grad_fn_for(i)(y), s, z, offset, i)
    z = tree_add(z, u)
    x = jax.tree.map(lambda a, b: GPA_EVAL * a + (1 - GPA_EVAL) * b, x, z)
    y = jax.tree.map(lambda a, b: GPA_TRAIN * a + (1 - GPA_TRAIN) * b, x, z)
    return x, y, z, s

  return iterate(step, (PARAMS, PARAMS, PARAMS, opt.init(PARAMS)),
                 lambda c: samtx.unperturb(c[0], c[3]))


def mesa_run(alias):
  """The alias alone; the teacher is the EMA of the weights it holds after
  each step (perturbed ones for MSAM), from the initial weights."""
  opt, update = alias_update(alias)

  def step(carry, i):
    x, s, ema = carry
    u, s = update(grad_fn_for(i)(x), s, x, i)
    x = tree_add(x, u)
    ema = jax.tree.map(lambda e, a: MESA_DECAY * e + (1 - MESA_DECAY) * a,
                       ema, x)
    return x, s, ema

  return iterate(step, (PARAMS, opt.init(PARAMS), PARAMS), lambda c: c[2])
def rapp_run(alias):
  """RAPP written out: each inner step applies the alias's clean step from
  the anchor (the slow weights); the held fast weights sit below the clean
  ones by the alias's perturbation (MSAM); syncs as in Lookahead."""
  opt, update = alias_update(alias)

  def step(carry, i):
    fast, slow, s = carry
    clean_before = samtx.unperturb(fast, s)
    u, s = update(grad_fn_for(i)(fast), s, fast, i)
    moved = tree_add(fast, u)
    moved_clean = samtx.unperturb(moved, s)
    clean = jax.tree.map(lambda z, a, b: z + (a - b), slow, moved_clean,
                         clean_before)
    fast = jax.tree.map(lambda c, a, b: c - (a - b), clean, moved_clean, moved)
    if (i + 1) % SYNC == 0:
      slow = jax.tree.map(lambda a, b: a + SLOW_STEP * (b - a), slow, clean)
      fast = jax.tree.map(lambda a, c, f: a - (c - f), slow, clean, fast)
    return fast, slow, s

  return iterate(step, (PARAMS, PARAMS, opt.init(PARAMS)), lambda c: c[1])


def two_pass_raises(exception, message):
  return lambda alias: (exception, message) if kind(alias) == "two_pass" else None


MASKED_ERROR = (TypeError, r"optax\.masked.*samtx\.sam_perturbation")

WRAPPERS = {
    # Pre-transforms act on g only: for a two-pass alias they change the
    # ascent direction, not the perturbed gradient h that moves the weights.
    "chain(clip_by_global_norm, alias)": Cell(
        build=lambda a: optax.chain(optax.clip_by_global_norm(CLIP), a.build()),
        reference=pre_transformed_run(lambda g, x: hand_clip(g))),
    "chain(add_decayed_weights, alias)": Cell(
        build=lambda a: optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                                    a.build()),
        reference=pre_transformed_run(lambda g, x: jax.tree.map(
            lambda gi, xi: gi + WEIGHT_DECAY * xi, g, x))),
    "masked(alias) + masked(set_to_zero)": Cell(
        build=lambda a: optax.chain(
            optax.masked(a.build(), TRAIN_MASK),
            optax.masked(optax.set_to_zero(), FROZEN_MASK)),
        reference=subtree_run, raises=two_pass_raises(*MASKED_ERROR),
        evaluate=lambda params, state: params),
    "multi_transform": Cell(
        build=lambda a: optax.multi_transform(
            {"train": a.build(), "frozen": optax.set_to_zero()}, LABELS),
        reference=subtree_run, raises=two_pass_raises(*MASKED_ERROR),
        evaluate=lambda params, state: params),
    "MultiSteps(alias)": Cell(
        build=lambda a: optax.MultiSteps(
            a.build(), every_k_schedule=ACCUMULATE).gradient_transformation(),
        reference=multisteps_run),
    "optax.apply_if_finite": Cell(
        build=lambda a: optax.apply_if_finite(a.build(), 3),
        reference=bare_run),
    "samtx.apply_if_finite": Cell(
        build=lambda a: samtx.apply_if_finite(a.build(), 3),
        reference=bare_run),
    "inject_hyperparams": Cell(
        build=injected_build, reference=injected_run,
        before_step=change_hyperparams),
    "schedule_free": Cell(
        build=lambda a: optax.contrib.schedule_free(
            a.build(), learning_rate=LR, b1=SCHEDULE_FREE_B1),
        reference=schedule_free_run,
        evaluate=lambda params, state:
        optax.contrib.schedule_free_eval_params(state, params)),
    "samtx.lookahead": Cell(
        build=lambda a: samtx.lookahead(a.build(), SYNC, SLOW_STEP),
        reference=lookahead_run,
        wrap=optax.LookaheadParams.init_synced,
        point=lambda params: params.fast,
        evaluate=lambda params, state: params.slow),
    # Related work: the wrappers hold what the reference writes out.
    "samtx.gpa": Cell(
        build=lambda a: samtx.gpa(a.build(), train_interp=GPA_TRAIN,
                                  eval_interp=GPA_EVAL),
        reference=gpa_run, evaluate=samtx.eval_params),
    "samtx.mesa": Cell(
        build=lambda a: samtx.mesa(a.build(), decay=MESA_DECAY),
        reference=mesa_run,
        evaluate=lambda params, state: samtx.ema_params(state)),
    "samtx.rapp": Cell(
        build=lambda a: samtx.rapp(a.build(), SYNC, SLOW_STEP),
        reference=rapp_run,
        wrap=optax.LookaheadParams.init_synced,
        point=lambda params: params.fast,
        evaluate=lambda params, state: params.slow),
    # optax.lookahead's update takes no extra arguments at all.
    "optax.lookahead": Cell(
        build=lambda a: optax.lookahead(a.build(), SYNC, SLOW_STEP),
        reference=None,
        raises=lambda a: (TypeError, "unexpected keyword argument 'grad_fn'"),
        wrap=optax.LookaheadParams.init_synced,
        point=lambda params: params.fast),
}


# ------------------------------------ perturbation + another base (Table B)
def perturbation_then(descent, *, params=PARAMS, grad_fn_of=grad_fn_for,
                      place=lambda x: x, base_init=lambda x: None):
  """Reference for chain(P, <base>): the perturbation alone gives h, then
  ``descent(h, x, base_state, i) -> (update, base_state)`` by hand."""
  def reference(perturbation):
    tx = perturbation.build()

    @jax.jit
    def ascent(grads, state, params, i):
      return tx.update(grads, state, params, **helpers.gradient_fns(grad_fn_of(i)))

    def step(carry, i):
      x, s, b = carry
      h, s = ascent(grad_fn_of(i)(x), s, x, i)
      u, b = descent(h, x, b, i)
      return tree_add(x, u), s, b

    return iterate(step, (params, tx.init(params), base_init(params)),
                   lambda c: place(c[0]))
  return reference


def optax_descent(base):
  """A trusted optax base applied to h by hand (its own update, no chain)."""
  def descent(h, x, state, i):
    return base.update(h, state, x)
  return descent


def accumulated_sgd(h, x, acc, i):
  acc = tree_add(acc, h)
  if (i + 1) % ACCUMULATE:
    return jax.tree.map(jnp.zeros_like, x), acc
  return (jax.tree.map(lambda a: -LR * a / ACCUMULATE, acc),
          jax.tree.map(jnp.zeros_like, acc))


ADAMW = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
LION = optax.lion(LR / 5)

BASES = {
    "chain(P, clip_by_global_norm, sgd)": Cell(
        build=lambda p: optax.chain(p.build(), optax.clip_by_global_norm(CLIP),
                                    optax.sgd(LR)),
        reference=perturbation_then(lambda h, x, b, i: (jax.tree.map(
            lambda a: -LR * a, hand_clip(h)), b))),
    "chain(P, add_decayed_weights, sgd)": Cell(
        build=lambda p: optax.chain(p.build(),
                                    optax.add_decayed_weights(WEIGHT_DECAY),
                                    optax.sgd(LR)),
        reference=perturbation_then(lambda h, x, b, i: (jax.tree.map(
            lambda hi, xi: -LR * (hi + WEIGHT_DECAY * xi), h, x), b))),
    "chain(P, adamw)": Cell(
        build=lambda p: optax.chain(p.build(), ADAMW),
        reference=perturbation_then(optax_descent(ADAMW),
                                    base_init=ADAMW.init)),
    "chain(P, lion)": Cell(
        build=lambda p: optax.chain(p.build(), LION),
        reference=perturbation_then(optax_descent(LION), base_init=LION.init)),
    "freeze: chain(masked(zero), P, masked(zero), sgd)": Cell(
        build=lambda p: optax.chain(
            optax.masked(optax.set_to_zero(), FROZEN_MASK), p.build(),
            optax.masked(optax.set_to_zero(), FROZEN_MASK), optax.sgd(LR)),
        reference=perturbation_then(
            lambda h, x, b, i: (jax.tree.map(lambda a: -LR * a, h), b),
            params=trainable(PARAMS), grad_fn_of=sub_grad_fn_for,
            place=with_frozen),
        # The recipe zeroes the frozen leaves of grad_fn's output too: GSAM
        # and LookSAM combine g with h through n(h) and <g, h>, which a
        # frozen leaf's gradient would otherwise enter.
        grad_fn_wrap=lambda grad_fn: lambda p: jax.tree.map(
            lambda g, frozen: jnp.zeros_like(g) if frozen else g,
            grad_fn(p), FROZEN_MASK)),
    "chain(P, MultiSteps(sgd))": Cell(
        build=lambda p: optax.chain(p.build(), optax.MultiSteps(
            optax.sgd(LR), every_k_schedule=ACCUMULATE)
                                    .gradient_transformation()),
        reference=perturbation_then(
            accumulated_sgd, base_init=lambda x: jax.tree.map(jnp.zeros_like, x))),
}

# ---------------------------------------------------------------- the checks
def _tolerance(column: Alias) -> dict:
  """float32 rounding; LookSAM (and FGSAM+) rescale g_v by n(g)/n(g_v),
  which amplifies the rounding differences between a fused chain and the
  reference."""
  if column.name.startswith(("looksam", "fgsam_plus")):
    return {"rtol": 2e-4, "atol": 2e-5}
  return {"rtol": 2e-5, "atol": 2e-6}


def assert_cell(cell: Cell, column: Alias):
  expected_error = cell.raises(column)
  if expected_error is not None:
    exception, message = expected_error
    with pytest.raises(exception, match=message):
      run_wrapped(cell, column)
    return
  got = run_wrapped(cell, column)
  want = cell.reference(column)
  for t, (g, w) in enumerate(zip(got, want)):
    for path_and_leaf, w_leaf in zip(
        jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(w)):
      path, g_leaf = path_and_leaf
      np.testing.assert_allclose(
          g_leaf, w_leaf, **_tolerance(column),
          err_msg=f"step {t}, leaf {jax.tree_util.keystr(path)}")
  assert float(mean_loss(got[-1])) < float(mean_loss(PARAMS))


@pytest.mark.parametrize("alias", ALIASES, ids=lambda a: a.label)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_alias_inside_wrapper(wrapper, alias):
  assert_cell(WRAPPERS[wrapper], alias)


@pytest.mark.parametrize("alias", ALIASES, ids=lambda a: a.label)
def test_inject_hyperparams_keeps_the_state_structure(alias):
  """DESIGN.md: inject_hyperparams(alias) holds the alias's state, no more."""
  injected = injected_build(alias).init(PARAMS).inner_state
  bare = alias.build().init(PARAMS)
  assert jax.tree.structure(injected) == jax.tree.structure(bare)
  assert ([x.shape for x in jax.tree.leaves(injected)]
          == [x.shape for x in jax.tree.leaves(bare)])


@pytest.mark.parametrize("perturbation", PERTURBATIONS, ids=lambda p: p.label)
@pytest.mark.parametrize("base", BASES)
def test_perturbation_before_base(base, perturbation):
  assert_cell(BASES[base], perturbation)


@pytest.mark.parametrize("alias", ALIASES, ids=lambda a: a.label)
def test_guards_on_a_nan_at_the_perturbed_point(alias):
  """samtx.apply_if_finite skips the step (zero updates, state kept);
  optax.apply_if_finite lets a NaN from grad_fn through, so for a two-pass
  alias its updates are NaN. Aliases that never call grad_fn are unaffected."""
  nan_grad_fn = lambda p: jax.tree.map(lambda x: x * jnp.nan, p)
  grads = grad_fn_for(0)(PARAMS)
  samtx_guard = samtx.apply_if_finite(alias.build(), 3)
  state = samtx_guard.init(PARAMS)
  updates, new_state = samtx_guard.update(grads, state, PARAMS,
                                          **helpers.gradient_fns(nan_grad_fn))
  two_pass = kind(alias) == "two_pass"
  assert int(new_state.notfinite_count) == int(two_pass)
  if two_pass:
    for u in jax.tree.leaves(updates):
      np.testing.assert_array_equal(u, 0.0)
    for new, old in zip(jax.tree.leaves(new_state.inner_state),
                        jax.tree.leaves(state.inner_state)):
      np.testing.assert_array_equal(new, old)
  optax_guard = optax.apply_if_finite(alias.build(), 3)
  updates, new_state = optax_guard.update(
      grads, optax_guard.init(PARAMS), PARAMS, **helpers.gradient_fns(nan_grad_fn))
  assert int(new_state.notfinite_count) == 0
  assert all(bool(jnp.isnan(u).all()) == two_pass
             for u in jax.tree.leaves(updates))
