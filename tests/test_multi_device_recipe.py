"""docs/guides/multi_device.md, "Writing the step yourself": the code runs as
written and every claim the section makes holds.

The block is read from the page, so the page and this test cannot drift. It
runs in a fresh process (8 CPU devices, float64 so that the comparisons are
tight) with a small tanh MLP as the user's ``loss_fn``:

* m-sharpness: the recipe equals ``parallel.shard_map_step`` (which is tested
  against a single-device reference for every alias);
* one global perturbation: the recipe equals a single-device run on the
  whole batch;
* without the ``pcast`` the run equals one global perturbation at 8 times the
  learning rate;
* without averaging the ascent statistics ``shard_map`` rejects the
  replicated ``out_specs``;
* the same body under ``jax.pmap`` gives the same numbers.
"""

import functools
import pathlib
import re

import numpy as np
import pytest

from tests import fresh_process

PAGE = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides"
        / "multi_device.md")
OPTIMIZER = 'samtx.gsam(0.05, rho=0.05, alpha=0.3, axis_name="batch")'
STEPS = 3


def recipe() -> str:
  text = PAGE.read_text()
  section = text[text.index("## Writing the step yourself"):]
  return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def compute_recipe():
  import jax
  import jax.numpy as jnp
  import optax

  import samtx
  from samtx import parallel

  jax.config.update("jax_enable_x64", True)
  n = jax.device_count()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4 * n, 6)) * np.repeat(rng.uniform(0.3, 3.0, n), 4)[
      :, None]
  y = rng.normal(size=(4 * n, 2))
  start = {"w1": jnp.asarray(0.5 * rng.normal(size=(6, 5))),
           "b1": jnp.full((5,), 0.1),
           "w2": jnp.asarray(0.5 * rng.normal(size=(5, 2)))}
  batch = (jnp.asarray(x), jnp.asarray(y))

  def loss_fn(params, batch):
    xs, ys = batch
    hidden = jnp.tanh(xs @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - ys) ** 2)

  ns = {"loss_fn": loss_fn, "params": start, "batch": batch}
  exec(compile(recipe(), "multi_device.md", "exec"), ns)  # noqa: S102
  mesh, opt = ns["mesh"], ns["opt"]
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

  def run(step, tx=opt, place=lambda t: jax.device_put(t, replicated),
          data=None, read=lambda t: t):
    data = jax.device_put(batch, split) if data is None else data
    params, state = place(start), place(tx.init(start))
    for _ in range(STEPS):
      params, state, _ = step(params, state, data)
    return read(params)

  def single_device(tx):
    """Whole batch, one device: the data axis bound with size 1."""
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))

    def update(p, s):
      updates, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, updates), s, loss_fn(p, batch)

    return jax.jit(jax.vmap(lambda p, s, b: update(p, s), in_axes=None,
                            out_axes=None, axis_name="batch", axis_size=1))

  out = {}
  flat = lambda tag, tree: out.update(
      {f"{tag}/{k}": np.asarray(v) for k, v in tree.items()})
  flat("start", start)
  flat("recipe/m", run(ns["make_step"](m_sharpness=True)))
  flat("samtx/m", run(parallel.shard_map_step(loss_fn, opt, mesh)))
  flat("recipe/global", run(ns["make_step"](m_sharpness=False)))
  flat("single/global", run(single_device(opt), place=lambda t: t,
                            data=batch))
  faster = samtx.gsam(0.05 * n, rho=0.05, alpha=0.3, axis_name="batch")
  flat("single/global_lr_x_n", run(single_device(faster), tx=faster,
                                   place=lambda t: t, data=batch))
  # A hand-written global step that averages only g: inside shard_map the
  # optimizer reads g's replicated type and averages h before the rule.
  P = jax.sharding.PartitionSpec
  vary = ns["vary"]

  def global_g_only(params, opt_state, data):
    loss, grads = jax.value_and_grad(loss_fn)(vary(params), data)
    grads = jax.lax.pmean(grads, "batch")
    grad_fn = lambda p: jax.grad(loss_fn)(vary(p), data)  # this device's h
    updates, opt_state = opt.update(grads, opt_state, params, grad_fn=grad_fn)
    return (optax.apply_updates(params, updates), opt_state,
            jax.lax.pmean(loss, "batch"))

  flat("recipe/global_g_only", run(jax.jit(jax.shard_map(
      global_g_only, mesh=mesh, in_specs=(P(), P(), P("batch")),
      out_specs=(P(), P(), P())))))
  # pmap: the same body; pcast does nothing there
  stacked = parallel.pmap_replicate
  for mode in ("m", "global"):
    body = functools.partial(ns["train_step"], m_sharpness=mode == "m")
    flat(f"pmap/{mode}", run(
        jax.pmap(body, axis_name="batch"), place=stacked,
        data=jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch),
        read=parallel.unreplicate))
  # the pitfalls
  ns["vary"] = lambda tree: tree
  flat("recipe/m_without_pcast", run(ns["make_step"](m_sharpness=True)))
  ns["vary"], ns["average_ascent_statistics"] = vary, lambda state: state
  try:
    run(ns["make_step"](m_sharpness=True))
    out["unaveraged_state_error"] = np.asarray("")
  except ValueError as err:
    out["unaveraged_state_error"] = np.asarray(str(err)[:300])
  return out


@pytest.fixture(scope="module")
def results():
  return fresh_process.run("tests.test_multi_device_recipe", "compute_recipe")


def _max_difference(out, a, b):
  keys = [k[len("start/"):] for k in out if k.startswith("start/")]
  return max(float(np.max(np.abs(out[f"{a}/{k}"] - out[f"{b}/{k}"])))
             for k in keys)


def test_the_recipe_uses_the_optimizer_this_test_assumes():
  assert OPTIMIZER in recipe()


@pytest.mark.parametrize("run,reference", [
    ("recipe/m", "samtx/m"),
    ("recipe/global", "single/global"),
    ("recipe/global_g_only", "single/global"),
    ("pmap/m", "recipe/m"),
    ("pmap/global", "recipe/global"),
])
def test_recipe_equals_its_reference(results, run, reference):
  assert _max_difference(results, run, reference) < 1e-12
  assert _max_difference(results, run, "start") > 1e-2  # it trained


def test_the_modes_differ_so_the_comparisons_mean_something(results):
  assert _max_difference(results, "recipe/m", "recipe/global") > 1e-3


def test_without_pcast_the_step_is_a_global_perturbation_at_n_times_the_lr(
    results):
  assert _max_difference(results, "recipe/m_without_pcast",
                         "single/global_lr_x_n") < 1e-12
  assert _max_difference(results, "recipe/m_without_pcast",
                         "recipe/m") > 1e-2


def test_without_averaging_the_state_shard_map_rejects_the_out_specs(results):
  message = str(results["unaveraged_state_error"])
  # out_specs[1] is the optimizer state
  assert "out_specs[1]" in message and "replication" in message, message
