"""Runs a function of a test module in a fresh Python process (8 CPU devices).

Why a fresh process: on a machine with few cores, XLA:CPU with 8 virtual
devices can abort a process that has already run collective programs when
a later one starts ("Termination timeout for all reduce"). Tests that run
many collective programs do them in one child process and compare its
results in the parent, where pytest reports them.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import importlib
import numpy as np
module = importlib.import_module(sys.argv[1])
results = getattr(module, sys.argv[2])(*sys.argv[4:])
np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in results.items()})
"""


def run(module: str, function: str, *args: str,
        timeout: float = 300) -> dict:
  """``module.function(*args)`` in a child process; its ``dict`` of arrays.

  Args:
    module: a module importable from the repository root (``tests.x``).
    function: a function of it returning a flat ``dict`` name -> array.
    *args: string arguments passed to the function.
    timeout: seconds before the child is killed and the test fails.

  Returns:
    The dict, values as NumPy arrays.
  """
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "results.npz"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
      proc = subprocess.run(
          [sys.executable, "-c", CHILD, module, function, str(out), *args],
          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
      pytest.fail(f"{module}.{function}{args} timed out after {timeout} s:\n"
                  f"{(err.stderr or '')[-4000:]}")
    if proc.returncode:
      pytest.fail(f"{module}.{function}{args} failed (exit {proc.returncode}):\n"
                  f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    with np.load(out) as data:
      return {k: data[k] for k in data.files}
