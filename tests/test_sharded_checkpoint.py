"""Checkpointing sharded state with orbax, by the recipe in docs/guides/checkpointing.md.

In a fresh process with 8 CPU devices, parameters FSDP-sharded over the mesh
axis and the optimizer state laid out by ``parallel.init_sharded``: train 2
steps, save and restore with the page's sharded-state code block (read from
the page, so the two cannot drift), train 2 more steps, and compare with an
uninterrupted run of 4 steps, bit for bit. The optimizers cover scalar-only
states (SAM), parameter-shaped buffers (AdaSAM, MSAM's momentum), integer
leaves (every step count), LookSAM's stored direction and norm, and
``samtx.lookahead``, whose parameters are an ``optax.LookaheadParams`` pair
(``parallel.state_specs`` and ``init_sharded`` used to fail on it).

The target the page used to recommend, ``opt.init(params)``, restores the
scalar leaves on one device; the next step then fails, which is checked too.
"""

import pathlib
import re

import numpy as np
import pytest

from tests import fresh_process

PAGE = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides"
        / "checkpointing.md")
NAMES = ["sam", "adasam", "msam", "looksam", "lookahead"]
BATCH, DIN, HIDDEN, DOUT = 32, 8, 16, 4


def sharded_recipe() -> str:
  text = PAGE.read_text()
  section = text[text.index("## Sharded state"):]
  return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def compute_resume(directory):
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import AxisType, Mesh, PartitionSpec as P

  import samtx
  from samtx import parallel

  # Auto axes: the hand-written Lookahead step below lets XLA lay out the
  # matmuls over FSDP-sharded contracting dimensions.
  mesh = Mesh(np.array(jax.devices()), ("batch",),
              axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(0)
  init = {"w1": rng.normal(size=(DIN, HIDDEN)) / 3,
          "b1": rng.normal(size=HIDDEN) / 10,
          "w2": rng.normal(size=(HIDDEN, DOUT)) / 4}
  init = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), init)
  specs = {"w1": P("batch", None), "b1": P("batch"), "w2": P("batch", None)}
  batches = [tuple(jnp.asarray(rng.normal(size=(BATCH, d)), jnp.float32)
                   for d in (DIN, DOUT)) for _ in range(4)]

  def loss(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
                     - y) ** 2)

  def build(name):
    """The optimizer, its initial params and a step (params, state, t)."""
    params = parallel.shard(init, mesh, specs)
    if name == "lookahead":
      opt = samtx.lookahead(samtx.sam(0.05, rho=0.1, momentum=0.9),
                            sync_period=2, slow_step_size=0.3)

      @jax.jit
      def hand_step(params, state, batch):
        grad_fn = jax.grad(lambda p: loss(p, batch))
        updates, state = opt.update(grad_fn(params.fast), state, params,
                                    grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

      return (opt, optax.LookaheadParams.init_synced(params),
              lambda p, s, t: hand_step(p, s, batches[t]))
    opt = {"sam": samtx.sam(0.05, rho=0.1),
           "adasam": samtx.adasam(0.01, rho=0.1),
           "msam": samtx.msam(0.05, rho=0.1),
           "looksam": samtx.looksam(0.05, rho=0.1, k=2, momentum=0.9)}[name]
    step = parallel.jit_step(loss, opt, mesh)
    return opt, params, lambda p, s, t: step(
        p, s, parallel.shard_batch(batches[t], mesh))[:2]

  def flat(tag, tree):
    return {f"{tag}/{jax.tree_util.keystr(k)}": np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  def spec_text(tree):
    return {f"{jax.tree_util.keystr(k)}": str(v.sharding.spec)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  out = {}
  for name in NAMES:
    opt, params, step = build(name)
    state = parallel.init_sharded(opt, params, mesh)
    for t in range(2):
      params, state = step(params, state, t)
    saved = (params, state)
    for t in range(2, 4):
      params, state = step(params, state, t)
    out.update(flat(f"{name}/uninterrupted", (params, state)))
    # the page's block: save what step 2 left, restore into its target
    page = {"path": pathlib.Path(directory) / name, "params": saved[0],
            "opt_state": saved[1], "opt": opt, "mesh": mesh}
    exec(compile(sharded_recipe(), "checkpointing.md", "exec"), page)  # noqa: S102
    restored = (page["params"], page["opt_state"])
    out.update(flat(f"{name}/saved", saved))
    out.update(flat(f"{name}/restored", restored))
    want = spec_text(saved[1])
    got = spec_text(restored[1])
    out[f"{name}/specs_equal"] = np.asarray(got == want)
    out[f"{name}/sharded_leaves"] = np.asarray(
        sum(spec != "P()" for spec in got.values()))
    out[f"{name}/on_mesh"] = np.asarray(all(
        len(x.sharding.device_set) == len(jax.devices())
        for x in jax.tree.leaves(restored)))
    params, state = restored
    for t in range(2, 4):
      params, state = step(params, state, t)
    out.update(flat(f"{name}/resumed", (params, state)))
  # The old target: scalars restored on one device, the next step fails.
  opt, params, step = build("adasam")
  state = parallel.init_sharded(opt, params, mesh)
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  path = pathlib.Path(directory) / "old_target"
  checkpointer.save(path, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params, "opt_state": opt.init(params)})
  restored = checkpointer.restore(path, abstract)
  try:
    step(restored["params"], restored["opt_state"], 0)
    out["old_target_error"] = np.asarray("")
  except ValueError as err:
    out["old_target_error"] = np.asarray(str(err)[:300])
  return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  directory = tmp_path_factory.mktemp("sharded_checkpoints")
  return fresh_process.run("tests.test_sharded_checkpoint", "compute_resume",
                           str(directory))


def _pairs(out, name, a, b):
  keys = [k[len(f"{name}/{a}/"):] for k in out if k.startswith(f"{name}/{a}/")]
  assert keys
  return [(k, out[f"{name}/{a}/{k}"], out[f"{name}/{b}/{k}"]) for k in keys]


@pytest.mark.parametrize("name", NAMES)
def test_sharded_resume_is_bit_identical(results, name):
  for key, got, want in _pairs(results, name, "restored", "saved"):
    np.testing.assert_array_equal(got, want, err_msg=f"restored {key}")
  for key, got, want in _pairs(results, name, "resumed", "uninterrupted"):
    np.testing.assert_array_equal(got, want, err_msg=f"resumed {key}")


@pytest.mark.parametrize("name", NAMES)
def test_restored_state_keeps_the_sharded_layout(results, name):
  assert bool(results[f"{name}/specs_equal"])
  assert bool(results[f"{name}/on_mesh"])
  # SAM keeps scalars only; the others hold FSDP-sharded buffers
  assert (int(results[f"{name}/sharded_leaves"]) > 0) == (name != "sam")


def test_restoring_into_a_plain_init_breaks_the_next_sharded_step(results):
  assert "incompatible devices" in str(results["old_target_error"])
