"""benchmarks/accelerator.py: its optimizer list, its counts, a smoke run.

No test here times anything: the smoke run checks that the script builds,
compiles, runs and reports every column on all three model families, data
parallel over two host devices; CI runs ``--quick`` with every optimizer.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accelerator  # noqa: E402


def test_every_samtx_optimizer_has_an_entry_with_a_base():
  """Each optimizer samtx exports is benchmarked (new ones show up as
  unbenchmarked), names are unique and every base is benchmarked too."""
  assert accelerator.unbenchmarked() == []
  entries = accelerator.entries()
  names = [e.name for e in entries]
  assert len(names) == len(set(names))
  assert all(e.base is None or e.base in names for e in entries)
  for alias in ("sam", "adasam", "lightsam", "gsam", "wsam", "friendly_sam",
                "looksam", "msam", "msam_adamw", "lookahead"):
    assert any(f"samtx.{alias}" in n for n in names), alias


def _expected_gradients(entry):
  if entry.name == accelerator.SCHEDULED_ZERO:
    return 1.0  # rho_t = 0 on every step: no second pass
  if entry.name == accelerator.LOOKSAM:
    return 1.0 + 1.0 / accelerator.LOOKSAM_K
  return 2.0 if entry.two_pass else 1.0


@pytest.mark.slow
def test_gradient_evaluations_are_counted_at_run_time():
  """The grads/step column, from a host callback in the loss: one for
  one-pass optimizers and scheduled SAM at rho_t = 0, 1 + 1/k for LookSAM,
  two for every other two-pass step."""
  for entry in accelerator.entries():
    assert accelerator.gradient_evaluations(entry) == pytest.approx(
        _expected_gradients(entry)), entry.name


@pytest.mark.slow
def test_smoke_run_reports_every_column_data_parallel(tmp_path):
  """``--smoke`` on all three families, SAM and what it is compared with,
  the batch sharded over two host devices, in a fresh process."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=(
      "--xla_force_host_platform_device_count=2"
      # compile fast: the smoke run checks the script, not its numbers
      " --xla_backend_optimization_level=0"
      " --xla_llvm_disable_expensive_passes=true"))
  prefix = tmp_path / "accelerator_smoke"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--smoke",
       "--only", "samtx.sam", "--out", str(prefix)],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  payload = json.loads(prefix.with_suffix(".json").read_text())
  assert payload["devices"] == 2 and payload["size"] == "smoke"
  assert [r["model"] for r in payload["results"]] == [
      "resnet18", "vit_ti", "gpt2_small"]
  for result in payload["results"]:
    rows = result["optimizers"]
    assert set(rows) == {accelerator.SGD, accelerator.CONTRIB_SAM,
                         accelerator.SAM}
    for name, row in rows.items():
      assert "error" not in row, (name, row.get("error"))
      assert row["time"]["median_ms"] > 0
      assert row["memory"]["temp_size_in_bytes"] is not None
      assert row["state_bytes"] > 0 and row["compile_s"] > 0
    assert rows[accelerator.SAM]["grads_per_step"] == 2.0
    assert rows[accelerator.SAM]["vs_base"]["ratio"] > 0
    assert "temp_target_holds" in rows[accelerator.SAM]
    labels = {t["label"] for t in result["targets"]}
    assert {"SAM / base SGD", "samtx SAM / optax.contrib.sam"} <= labels
  markdown = prefix.with_suffix(".md").read_text()
  assert "## Targets" in markdown and "gpt2_small" in markdown


def _fake_compiled(name, fn=None, *, bound=0, state_bytes=0, temp=0):
  entry = {e.name: e for e in accelerator.entries()}[name]
  return accelerator.Compiled(entry, fn or (lambda p, c, b: (p, c)), {
      "state_bytes": state_bytes,
      "memory": {"live_bytes_bound": bound, "temp_size_in_bytes": temp}})


def test_peaks_are_read_one_step_at_a_time_in_ascending_order():
  """The device's high-water mark cannot be reset: steps run alone, the
  smallest estimate first, and a step that does not raise the mark is
  reported as an upper bound (a GPU-only path, driven here by a fake
  device whose mark each step raises to its scripted peak)."""
  stats = {"peak_bytes_in_use": 100}
  order = []

  class Device:
    def memory_stats(self):
      return dict(stats)

  def step(name, peak):
    def fn(params, carry, batch):
      order.append(name)
      stats["peak_bytes_in_use"] = max(stats["peak_bytes_in_use"], peak)
      return params, carry
    return fn

  compiled = [
      _fake_compiled(accelerator.SAM, step(accelerator.SAM, 500), bound=300),
      _fake_compiled(accelerator.SGD, step(accelerator.SGD, 200), bound=100),
      _fake_compiled("samtx.gsam", step("samtx.gsam", 150), bound=200)]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",))
  accelerator.measure_peaks(compiled, {"w": jnp.ones(3)}, {}, None, mesh,
                            log=lambda *a: None, device=Device())
  assert order == [accelerator.SGD, "samtx.gsam", accelerator.SAM]
  got = {c.entry.name: (c.record["peak_bytes"], c.record["peak_is_upper_bound"])
         for c in compiled}
  assert got == {accelerator.SGD: (200, False), "samtx.gsam": (200, True),
                 accelerator.SAM: (500, False)}


def test_steps_that_do_not_fit_are_timed_in_groups_sharing_a_base():
  names = [accelerator.SGD, accelerator.CONTRIB_SAM, accelerator.SAM,
           "optax.adamw", "samtx.msam_adamw", "samtx.lookahead(samtx.sam)"]
  compiled = [_fake_compiled(n, state_bytes=10, temp=5) for n in names]
  group_names = lambda groups: sorted(
      sorted(c.entry.name for c in g) for g in groups)
  assert group_names(accelerator.timing_groups(compiled, 10, None)) == [
      sorted(names)]
  assert group_names(accelerator.timing_groups(compiled, 10, 10**6)) == [
      sorted(names)]
  split = [sorted(["optax.adamw", "samtx.msam_adamw"]),
           sorted([accelerator.SGD, accelerator.CONTRIB_SAM, accelerator.SAM,
                   "samtx.lookahead(samtx.sam)"])]
  assert group_names(accelerator.timing_groups(compiled, 10, 100)) == split
  assert group_names(accelerator.timing_groups(
      compiled, 10, None, split=True)) == split
