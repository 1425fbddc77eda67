"""`samtx compare` as a new user meets it: one-line errors, overrides, resume."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from samtx import cli
from samtx.compare import experiment
from samtx.compare import optimizers
from samtx.compare import train

# A tiny job: digits MLP, 2 epochs, 2 seeds x 2 noise levels (the compiled
# programs are those of tests/test_cli.py when both run in one process).
BASE = ["compare", "--seeds", "2", "--epochs", "2", "--timing-steps", "2",
        "--timing-repeats", "1", "--no-progress", "--no-plots"]
TINY = BASE + ["--model", "mlp", "--dataset", "digits", "--noise", "0,0.3"]


def _error(argv, capsys):
  """Runs ``samtx`` expecting exit status 2; returns the one stderr line."""
  with pytest.raises(SystemExit) as err:
    cli.main(argv)
  assert err.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


def _hparams(tmp_path, content):
  path = tmp_path / "hparams.json"
  path.write_text(content if isinstance(content, str) else
                  json.dumps(content))
  return str(path)


GOOD_ENTRY = {"dataset": "digits", "model": "mlp", "noise": 0.0,
              "optimizer": "sam", "best": [0.1, 0.05]}


@pytest.mark.parametrize("content,message", [
    ({"runs": []}, 'expected {"tuning": [entries]}'),
    ("{not json", "cannot read JSON"),
    ([{"dataset": "digits", "optimizer": "sam", "best": [0.1, 0.05]}],
     "entry 0: missing key(s) noise"),
    ({"tuning": [GOOD_ENTRY, {**GOOD_ENTRY, "best": [0.1]}]},
     "entry 1: 'best' must be [lr, rho]"),
    ({"tuning": [{**GOOD_ENTRY, "best": [0.1, -0.05]}]},
     "entry 0: rho must be >= 0, got -0.05"),
    ({"tuning": [{**GOOD_ENTRY, "best": [0.0, 0.05]}]},
     "learning rate must be > 0"),
    ({"tuning": [{**GOOD_ENTRY, "best": ["fast", 0.05]}]},
     "expected a number, got 'fast'"),
])
def test_a_bad_hparams_file_is_a_one_line_error(content, message, tmp_path,
                                                capsys):
  path = _hparams(tmp_path, content)
  line = _error(TINY + ["--optimizers", "sam", "--hparams", path, "--out",
                        str(tmp_path / "out")], capsys)
  assert line.startswith("samtx compare: error: --hparams ")
  assert message in line
  assert not (tmp_path / "out").exists()  # nothing ran


def test_a_missing_hparams_file_is_a_one_line_error(tmp_path, capsys):
  line = _error(TINY + ["--hparams", str(tmp_path / "nope.json"), "--out",
                        str(tmp_path)], capsys)
  assert "nope.json: no such file" in line


def test_out_pointing_at_a_file_or_below_one_is_a_one_line_error(tmp_path,
                                                                 capsys):
  a_file = tmp_path / "results.txt"
  a_file.write_text("x")
  assert "is a file, not a folder" in _error(
      TINY + ["--out", str(a_file)], capsys)
  # Below a file nothing can be created, whoever runs the test (even root).
  assert "is not writable" in _error(
      TINY + ["--out", str(a_file / "sub")], capsys)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "sam=fast"], "--lr sam: not a number: 'fast'"),
    (["--lr", "sam=-0.1"], "--lr sam: must be > 0"),
    (["--rho", "sam=-0.1"], "--rho sam: must be >= 0"),
    (["--rho", "nosuch=0.1"], "unknown optimizer 'nosuch'"),
    (["--lr", "sam"], "expected name=value"),
    (["--model", "transformer", "--dataset", "digits"],
     "--model transformer needs --dataset text"),
    (["--model", "cnn", "--dataset", "text"],
     "--model cnn needs --dataset mnist1d or digits"),
    (["--model", "mlp", "--dataset", "digits,text"],
     "--dataset text needs --model transformer"),
    (["--dataset", "text", "--noise", "0.2"],
     "classification datasets only"),
])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
  line = _error(BASE + argv + ["--out", str(tmp_path)], capsys)
  assert message in line, line


def test_no_tuned_values_and_no_sweep_is_a_one_line_error(tmp_path, capsys):
  # Nothing is tuned for AdamW on the MNIST-1D MLP in the built-in table.
  line = _error(["compare", "--model", "mlp", "--dataset", "mnist1d",
                 "--optimizers", "adamw", "--out", str(tmp_path)], capsys)
  assert "no tuned hyper-parameters for adamw on mnist1d-mlp" in line
  assert "--tune" in line


def test_the_console_script_gives_one_line_errors(tmp_path):
  script = os.path.join(os.path.dirname(sys.executable), "samtx")
  assert os.path.exists(script), "pip install -e . installs the samtx script"
  a_file = tmp_path / "f"
  a_file.write_text("x")
  proc = subprocess.run([script, "compare", "--out", str(a_file)],
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"samtx compare: error: --out {a_file} is a file, not a folder"]


def test_the_analysis_form_of_adasam_is_labelled_as_such(capsys):
  label = ("the analysis form of the AdaSAM proof (experimental, not "
           "Algorithm 1, not recommended)")
  assert optimizers.SPECS["adasam_delayed"].note == label
  with pytest.raises(SystemExit):
    cli.main(["compare", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert f"adasam_delayed (AdaSAM-delayed*: {label})" in text


def test_msam_adamw_is_registered_exactly_when_samtx_has_it():
  import samtx  # pylint: disable=g-import-not-at-top
  assert ("msam_adamw" in optimizers.SPECS) == hasattr(samtx, "msam_adamw")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("resume")
  cli.main(TINY + ["--optimizers", "sgd,sam", "--out", str(out)])
  with open(out / "digits-mlp" / "results.json") as f:
    return out, json.load(f)


def test_a_restarted_job_resumes_from_the_finished_runs(first_run, capsys,
                                                        monkeypatch):
  out, first = first_run
  assert first["resumed"] == []
  # Lose one record, as if the job had been killed before SAM finished.
  os.remove(out / "digits-mlp" / "runs" / "eval-sam.npz")
  trained = []
  real = train.train_runs

  def counting(spec, *args, **kwargs):
    trained.append(spec.label)
    return real(spec, *args, **kwargs)

  monkeypatch.setattr(train, "train_runs", counting)
  capsys.readouterr()
  cli.main(TINY + ["--optimizers", "sgd,sam", "--out", str(out)])
  assert trained == ["SAM"]  # SGD's runs were not trained again
  captured = capsys.readouterr()
  assert "resume: " in captured.err and "eval-sgd.npz" in captured.err
  assert "resumed: 1 finished run batches reused" in captured.out
  with open(out / "digits-mlp" / "results.json") as f:
    second = json.load(f)
  assert second["resumed"] == [os.path.join("runs", "eval-sgd.npz")]
  # The reused and the retrained runs give the numbers of the first job.
  for name in ("sgd", "sam"):
    np.testing.assert_allclose(
        second["groups"][0]["optimizers"][name]["per_seed"]["test_acc"],
        first["groups"][0]["optimizers"][name]["per_seed"]["test_acc"],
        rtol=1e-6)


def test_a_changed_setting_is_not_resumed(first_run, monkeypatch):
  out, _ = first_run
  trained = []
  monkeypatch.setattr(train, "train_runs",
                      lambda spec, *a, **k: trained.append(spec.label) or
                      pytest.fail("stop after the check"))
  # A different learning rate for SGD: its record no longer applies.
  with pytest.raises(pytest.fail.Exception):
    cli.main(TINY + ["--optimizers", "sgd", "--lr", "sgd=0.05", "--out",
                     str(out)])
  assert trained == ["SGD"]


def test_resolve_workloads_pairs_models_with_their_data():
  assert experiment.resolve_workloads(["transformer"], None, "demo") == [
      "text-transformer"]
  assert experiment.resolve_workloads(
      ["mlp", "cnn", "transformer"], ["digits", "text"], "demo") == [
          "digits-mlp", "digits-cnn", "text-transformer"]


def test_a_dataset_whose_module_is_missing_names_that_module(tmp_path, capsys,
                                                             monkeypatch):
  real_import = __import__

  def fake_import(name, *args, **kwargs):
    if name == "sklearn.datasets":  # scikit-learn present, scipy missing
      raise ModuleNotFoundError("No module named 'scipy'", name="scipy")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr("builtins.__import__", fake_import)
  line = _error(TINY + ["--out", str(tmp_path)], capsys)
  assert "dataset 'digits' cannot load: Python module 'scipy' is missing" in line
  assert "scikit-learn" not in line.split("missing")[0]


@pytest.mark.parametrize("workload", ["digits-mlp", "mnist1d-cnn",
                                      "text-transformer"])
def test_tuned_table_matches_the_committed_sweep(workload):
  """config.TUNED (used without --tune) holds exactly the winners of the
  committed tuning.json, so a rerun of a sweep cannot leave it stale."""
  from samtx.compare import config
  path = (pathlib.Path(__file__).parents[1] / "benchmarks" / "results"
          / "compare" / workload / "tuning.json")
  raw = json.loads(path.read_text())
  for entry in raw.get("tuning", raw):
    got = config.TUNED[workload][float(entry["noise"])][entry["optimizer"]]
    assert tuple(got) == tuple(entry["best"]), entry["optimizer"]
