"""examples/fgsam_gcn.py runs in quick mode and prints a sane summary."""

import json
import subprocess
import sys

import pytest

from tests import fresh_process


@pytest.mark.slow
def test_fgsam_gcn_example_quick():
  """The GCN / peer-MLP example trains Adam, SAM, FGSAM and FGSAM+ well above
  chance, times each step and the two gradients, and its JSON summary
  parses (numbers are not pinned: they belong to the committed output)."""
  root = fresh_process.ROOT
  proc = subprocess.run(
      [sys.executable, str(root / "examples" / "fgsam_gcn.py"), "--quick"],
      cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  names = ("adam", "sam", "fgsam", "fgsam+")
  assert all(any(line.startswith(name + " ") for line in lines)
             for name in names)
  seeds = summary["config"]["seeds"]
  for name in names:
    accuracies = summary["accuracies"][name]
    assert len(accuracies) == seeds
    # Four classes: chance is 0.25; the GCN gets well past it.
    assert min(accuracies) > 1.6 * summary["chance"], (name, accuracies)
    assert summary["step_ms"][name] > 0
    median, low, high, fastest = summary["step_vs_adam"][name]
    assert low <= median <= high and fastest > 0
  assert summary["step_vs_adam"]["adam"][0] == 1.0
  assert 0 < summary["mlp_gradient_ms"] and 0 < summary["gcn_gradient_ms"]
