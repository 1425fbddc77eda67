"""Many hosts on one machine: 2 processes x 4 CPU devices equal 1 process x 8.

The worker (``tests/multihost_worker.py``) joins a ``jax.distributed`` job on a
loopback coordinator (gloo CPU collectives), builds one global 8-device mesh
and feeds each process only its rows of every global batch
(``jax.make_array_from_process_local_data``). It trains with
``shard_map_step`` (per-device perturbations) and with ``jit_step`` on
FSDP-sharded parameters. The reference is the same script as one process
with 8 devices.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
TIMEOUT = 180  # seconds for the whole job; a stuck collective fails the test


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def launch(num_processes: int, out: pathlib.Path) -> dict:
  """Runs the worker as ``num_processes`` processes; process 0's results.

  Every process is killed if the job does not finish within ``TIMEOUT``;
  on failure the test fails with each worker's output.
  """
  port = free_port()
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)  # the worker sets its own device count
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), str(pid), str(num_processes), str(port),
       str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for pid in range(num_processes)]
  logs = [""] * num_processes
  try:
    for pid, proc in enumerate(procs):
      logs[pid], _ = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  failed = [pid for pid, proc in enumerate(procs) if proc.returncode != 0]
  if failed or not out.exists():
    report = "\n".join(f"--- process {pid} (exit {procs[pid].returncode}):\n"
                       f"{logs[pid][-3000:]}" for pid in range(num_processes))
    pytest.fail(f"multi-process job failed or timed out:\n{report}")
  with np.load(out) as data:
    return {k: data[k] for k in data.files}


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
  two = launch(2, tmp_path / "two.npz")
  one = launch(1, tmp_path / "one.npz")
  assert sorted(two) == sorted(one)
  trained = [k for k in one if not k.startswith("init/")]
  assert any(k.startswith("shard_map_adasam/") for k in trained)
  assert any(k.startswith("jit_fsdp_lightsam_II/") for k in trained)
  for key in trained:
    # float32, different reduction order across processes
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  for key in trained:  # the runs trained: the comparison is not vacuous
    if not key.endswith("/loss"):
      leaf = key.split("/")[1]
      assert np.max(np.abs(one[key] - one[f"init/{leaf}"])) > 1e-3, key
