"""`samtx compare` as a new user meets it: one-line errors, overrides, resume."""

import dataclasses
import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from samtx import cli
from samtx.compare import config
from samtx.compare import data as data_lib
from samtx.compare import experiment
from samtx.compare import optimizers
from samtx.compare import train
from samtx.compare import tune

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


@pytest.mark.parametrize("workload", sorted(config.WORKLOADS))
def test_every_pair_has_values_for_every_optimizer_without_a_sweep(workload):
  # Every (model, dataset) pair the command line accepts, with every
  # registered optimizer: tuned, borrowed or the grid's centre, never an
  # error. What is not tuned for the pair says where it came from.
  w = config.WORKLOADS[workload]
  for name, spec in optimizers.SPECS.items():
    anchors = {}
    anchor = tune.anchor(w.model, spec.grid)
    if anchor is not None:
      anchors[anchor] = tune.resolve_hparams(
          workload, w.model, 0.25, anchor, optimizers.SPECS[anchor].grid)[0]
    lr, rho, source = tune.resolve_hparams(workload, w.model, 0.25, name,
                                           spec.grid, None, anchors)
    assert lr > 0 and rho >= 0
    own = config.TUNED.get(workload, {})
    if any(name in level for level in own.values()):
      assert source == "tuned"
    elif source.startswith("borrowed:"):
      borrowed = config.BORROW[workload]
      assert (lr, rho) == tune.tuned_hparams(borrowed, 0.25, name)
    else:
      assert source == "default"
      assert (lr, rho) == tune.default_hparams(w.model, spec.grid, anchors)


def test_the_grid_centre_is_the_documented_default():
  lrs, rhos = config.GRIDS["mlp"]["sam"]
  assert tune.default_hparams("mlp", "sam") == (lrs[1], rhos[1])
  # A grid relative to SGD's learning rate centres on it.
  assert tune.default_hparams("cnn", "msam", {"sgd": 0.3}) == (
      0.3, config.GRIDS["cnn"]["msam"][1][0])


TINY_WORKLOADS = {
    "mnist1d-mlp": dict(model_options=(("hidden", (16,)),)),
    "digits-mlp": dict(model_options=(("hidden", (16,)),)),
    "mnist1d-cnn": dict(model_options=(("channels", (2, 4)), ("kernel", 3),
                                       ("dropout", 0.1)),
                        hessian_examples=32),
    "digits-cnn": dict(model_options=(("channels", (2, 4)), ("kernel", 3),
                                      ("dropout", 0.1)),
                       hessian_examples=32),
    "text-transformer": dict(model_options=(("width", 8), ("depth", 1),
                                            ("heads", 2)),
                             eval_examples=16, hessian_examples=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("workload", sorted(TINY_WORKLOADS))
def test_every_pair_runs_without_tune(workload, tmp_path, capsys,
                                      monkeypatch):
  # The pair's own default optimizers, tiny sizes: it trains, and says
  # which values were not tuned for it (digits-cnn: none are).
  dataset, model = workload.split("-")
  w = dataclasses.replace(config.WORKLOADS[workload], train_examples=96,
                          **TINY_WORKLOADS[workload])
  monkeypatch.setitem(config.WORKLOADS, workload, w)
  names = experiment._plan(workload, experiment.CompareOptions(
      out="")).optimizers
  cli.main(["compare", "--model", model, "--dataset", dataset, "--seeds",
            "1", "--epochs", "1", "--batch-size", "16", "--optimizers",
            names[0], "--timing-steps", "2", "--timing-repeats", "1",
            "--hessian-iters", "2", "--no-progress", "--no-plots", "--out",
            str(tmp_path)])
  with open(tmp_path / workload / "results.json") as f:
    result = json.load(f)
  source = result["hparams_source"][names[0]]
  out = capsys.readouterr().out
  if source == "tuned":
    assert "hparams_note" not in result
  else:
    assert result["hparams_note"] in out
    assert names[0] in result["hparams_note"]
  if workload == "digits-cnn":
    assert source == "borrowed:mnist1d-cnn"
    assert "mnist1d-cnn's tuned values" in result["hparams_note"]


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
  if not path.exists():
    # No sweep under the current protocol yet: the values must say where
    # they come from (an earlier protocol's committed sweep).
    assert workload in config.EARLIER_SWEEPS and workload in config.TUNED
    return
  raw = json.loads(path.read_text())
  entries = raw.get("tuning", raw)
  for entry in entries:
    got = config.TUNED[workload][float(entry["noise"])][entry["optimizer"]]
    assert tuple(got) == tuple(entry["best"]), entry["optimizer"]
  # Noise levels the sweep does not cover come from an earlier one, named.
  swept = {float(entry["noise"]) for entry in entries}
  if set(config.TUNED[workload]) - swept:
    assert workload in config.EARLIER_SWEEPS, workload
  else:
    assert workload not in config.EARLIER_SWEEPS, (
        f"{workload} has its own sweep now: drop it from EARLIER_SWEEPS")


def test_a_corpus_other_than_the_committed_one_is_refused(tmp_path, capsys,
                                                          monkeypatch):
  assert data_lib.check_text_corpus() == data_lib.TEXT_SHA256
  monkeypatch.setattr(data_lib, "TEXT_SHA256", "0" * 64)
  with pytest.raises(data_lib.CorpusMismatch, match="--no-verify-corpus"):
    data_lib.check_text_corpus()
  line = _error(["compare", "--preset", "full", "--model", "transformer",
                 "--dataset", "text", "--out", str(tmp_path)], capsys)
  assert "the text corpus of this Python" in line
  assert f"has SHA-256 {data_lib.text_sha256()[:12]}" in line
  assert not (tmp_path / "text-transformer").exists()


def test_grids_relative_to_the_base_are_tuned_after_it():
  order = experiment._order(["sam", "msam", "looksam", "sgd"], "cnn")
  assert order.index("sgd") < min(order.index(n) for n in ("sam", "msam"))
  order = experiment._order(["adasam", "sam_adamw", "adamw"], "transformer")
  assert order[0] == "adamw"
  assert tune.grid("transformer", "adasam", anchors={"adamw": 0.01}) == [
      (0.00333333, 0.05), (0.01, 0.05)]
  assert tune.grid("transformer", "adamw_family", anchors={"adamw": 0.01}) == [
      (0.01, 0.02), (0.01, 0.1)]


# Ctrl-C during a job (issue 21, item 10): one line, exit 130, finished runs
# kept. Each case interrupts a real `samtx compare` process at one point.
JOB = ["compare", "--model", "mlp", "--dataset", "digits", "--optimizers",
       "sgd,sam,msam", "--seeds", "2", "--epochs", "30", "--timing-steps",
       "200", "--timing-repeats", "50", "--no-progress", "--no-plots"]


def _job(point):
  """The job each case interrupts: the timing case trains 2 epochs only
  (its interrupt lands in the 50 timing repeats that follow)."""
  return JOB + ["--epochs", "2"] if point == "timing" else JOB


def _interrupt(out, ready, job=JOB, timeout=300):
  """Starts ``job``, sends SIGINT once ``ready(stderr so far, out)``;
  returns (returncode, stderr)."""
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
  proc = subprocess.Popen([sys.executable, "-m", "samtx.cli", *job, "--out",
                           str(out)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stderr),
                            daemon=True)
  reader.start()
  start = time.monotonic()
  while not ready("".join(lines), out):
    assert proc.poll() is None, f"the job ended first: {''.join(lines)}"
    assert time.monotonic() - start < timeout
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=timeout)
  reader.join(timeout=10)
  return proc.returncode, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["training", "between batches", "timing"])
def test_ctrl_c_is_one_line_exit_130_and_the_job_resumes(point, tmp_path):
  runs = tmp_path / "digits-mlp" / "runs"
  ready = {
      "training": lambda err, out: "eval digits-mlp sgd" in err,
      "between batches": lambda err, out: (runs / "eval-sgd.npz").exists(),
      "timing": lambda err, out: "time digits-mlp" in err,
  }[point]
  code, err = _interrupt(tmp_path, ready, _job(point))
  message = ("samtx compare: interrupted; the finished runs are kept in "
             f"{tmp_path} (run the same command again to resume)")
  assert code == 130, err
  assert "Traceback" not in err
  assert [l for l in err.splitlines() if "interrupted" in l] == [message]
  assert err.rstrip().endswith(message)
  kept = sorted(p.name for p in runs.glob("*.npz")) if runs.exists() else []
  assert not list(runs.glob("*.tmp*")) if runs.exists() else True
  if point == "timing":
    assert kept == ["eval-msam.npz", "eval-sam.npz", "eval-sgd.npz"]
    # Resume: the same command trains nothing again.
    proc = subprocess.run(
        [sys.executable, "-m", "samtx.cli", *_job(point), "--timing-repeats", "3",
         "--out", str(tmp_path)], capture_output=True, text=True,
        timeout=600, check=False,
        env={**os.environ,
             "PYTHONPATH": str(pathlib.Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert "resumed: 3 finished run batches reused" in proc.stdout
  elif point == "between batches":
    assert "eval-sgd.npz" in kept


def test_a_swallowed_interrupt_still_stops_the_job(monkeypatch, capsys,
                                                   tmp_path):
  # Whatever catches the KeyboardInterrupt (a library's broad except), the
  # job stops at its next batch of runs and the command exits 130.
  def swallowing(*args, **kwargs):
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    except KeyboardInterrupt:
      pass
    return {"curves": {}, "final": {}}

  monkeypatch.setattr(train, "train_runs", swallowing)
  with pytest.raises(SystemExit) as err:
    cli.main(TINY + ["--optimizers", "sgd,sam", "--out", str(tmp_path)])
  assert err.value.code == 130
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1].startswith("samtx compare: interrupted;")


def test_ctrl_c_inside_a_gc_callback_is_sent_again_outside_it(monkeypatch):
  # jax runs Python in a garbage-collector callback; a KeyboardInterrupt
  # raised there is printed as "Exception ignored ... Traceback" and
  # dropped. The handler sends the signal again, so it lands after the
  # callback, in the job's own code.
  from samtx.compare import experiment
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  sent = []

  def callback(phase, info):
    del info
    if phase == "start" and not sent:
      sent.append(True)
      os.kill(os.getpid(), signal.SIGINT)
      sum(range(1000))  # the handler runs here, inside the callback

  reached_the_end = False
  gc.callbacks.append(callback)
  try:
    with pytest.raises(KeyboardInterrupt):
      with experiment.interruptible("interrupted"):
        gc.collect()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
          time.sleep(0.01)
        reached_the_end = True
  finally:
    gc.callbacks.remove(callback)
  assert sent and unraisable == [] and not reached_the_end
