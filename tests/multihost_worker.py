"""One process of the many-host check (launched by tests/test_multihost.py).

Usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

With NUM_PROCESSES > 1 every process owns 8 / NUM_PROCESSES CPU devices and
joins a ``jax.distributed`` job on a loopback coordinator (gloo
collectives); with 1 it is the single-process, 8-device reference. Both
train the same model on the same global batches with

* ``samtx.parallel.shard_map_step`` (AdaSAM, m-sharpness: per-device
  perturbations, so the device layout matters) and
* ``samtx.parallel.jit_step`` with FSDP-sharded parameters (LightSAM-II),

feeding each process only its own rows of every global batch through
``jax.make_array_from_process_local_data``. Process 0 writes the trained
parameters (gathered to the host) to OUT.npz.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import samtx
from samtx import parallel as par

DEVICES = 8
GLOBAL_BATCH, DIN, HIDDEN, STEPS = 32, 6, 16, 3


def loss_fn(params, batch):
  x, y = batch
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((hidden @ params["w2"] - y) ** 2)


def global_batches():
  """The same global batches in every process (a real input pipeline would
  read only this process's rows)."""
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    x = rng.normal(size=(GLOBAL_BATCH, DIN)).astype(np.float32)
    x *= np.repeat(rng.uniform(0.3, 3.0, (DEVICES, 1)), GLOBAL_BATCH // DEVICES,
                   0).astype(np.float32)
    yield x, rng.normal(size=(GLOBAL_BATCH, 1)).astype(np.float32)


def local_rows(batch):
  """This process's contiguous rows of a global batch."""
  rows = GLOBAL_BATCH // jax.process_count()
  start = jax.process_index() * rows
  return jax.tree.map(lambda a: a[start:start + rows], batch)


def start(process_id: int, num_processes: int, port: int) -> None:
  """Configures this process's devices and joins the job (before any JAX
  computation: the device count is fixed when the backend starts)."""
  jax.config.update("jax_num_cpu_devices", DEVICES // num_processes)
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
        process_id=process_id, initialization_timeout=60,
        heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)


def main(argv):
  process_id, num_processes, port = (int(a) for a in argv[:3])
  start(process_id, num_processes, port)
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = jax.make_mesh((DEVICES,), ("batch",))
  data_sharding = NamedSharding(mesh, P("batch"))
  rng = np.random.default_rng(1)
  init = {"w1": rng.normal(size=(DIN, HIDDEN)).astype(np.float32) / 2,
          "b1": np.zeros(HIDDEN, np.float32),
          "w2": rng.normal(size=(HIDDEN, 1)).astype(np.float32) / 4}
  fsdp = {"w1": P(None, "batch"), "b1": P("batch"), "w2": P("batch", None)}
  runs = {
      "shard_map_adasam": (
          samtx.adasam(0.01, 0.1, axis_name="batch"), None,
          lambda opt: par.shard_map_step(loss_fn, opt, mesh)),
      "jit_fsdp_lightsam_II": (
          samtx.lightsam(0.05, 0.1, variant="adagrad"), fsdp,
          lambda opt: par.jit_step(loss_fn, opt, mesh, param_specs=fsdp,
                                   donate=True)),
  }
  results = {f"init/{key}": value for key, value in init.items()}
  for name, (opt, specs, build) in runs.items():
    # Every process passes the same host values: par.shard places each
    # process's part of them on its own devices.
    params = par.shard(init, mesh, P() if specs is None else specs)
    state = par.init_sharded(opt, params, mesh)
    step = build(opt)
    for batch in global_batches():
      sharded = jax.tree.map(
          lambda a: jax.make_array_from_process_local_data(data_sharding, a),
          local_rows(batch))
      params, state, metrics = step(params, state, sharded)
    gathered = multihost_utils.process_allgather(params, tiled=True)
    for key, value in gathered.items():
      results[f"{name}/{key}"] = np.asarray(value)
    # replicated: this process's copy is the value
    results[f"{name}/loss"] = np.asarray(metrics["loss"].addressable_data(0))
  if jax.process_index() == 0:
    np.savez(argv[3], **results)
  print(f"process {jax.process_index()} of {jax.process_count()}: done",
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
