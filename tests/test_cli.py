"""`samtx compare` / `samtx sensitivity` on tiny configurations."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import samtx
from samtx import cli
from samtx import datasets
from samtx.compare import config
from samtx.compare import models
from samtx.compare import train
from samtx.compare import tune
from samtx.compare.optimizers import SPECS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS_MLP = config.WORKLOADS["digits-mlp"]
# Every direct trainer call trains 4 runs of 2 epochs on digits with this
# setup, so the compiled programs (cached in samtx.compare.train) are shared.
SETUP = train.Setup(DIGITS_MLP, epochs=2, batch_size=128)


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def digits():
  return datasets.load("digits")


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("compare")
  argv = ["compare", "--model", "mlp", "--dataset", "digits", "--noise",
          "0,0.3", "--seeds", "2", "--epochs", "2", "--optimizers",
          "sgd,sam,msam", "--lr", "msam=0.05", "--rho", "msam=0.2",
          "--timing-steps", "3", "--timing-repeats", "2", "--out", str(out),
          "--no-progress"]
  cli.main(argv)
  with open(out / "digits-mlp" / "results.json") as f:
    return out / "digits-mlp", json.load(f)


def test_compare_writes_table_json_and_plots(compare_run):
  out, result = compare_run
  assert [(g["workload"], g["noise"]) for g in result["groups"]] == [
      ("digits-mlp", 0.0), ("digits-mlp", 0.3)]
  for group in result["groups"]:
    assert list(group["optimizers"]) == ["sgd", "sam", "msam"]
    for name, res in group["optimizers"].items():
      row = res["summary"]
      accs = np.asarray(res["per_seed"]["test_acc"])
      assert accs.shape == (2,)
      # The table's mean +- std is the sample statistic of the seeds.
      assert row["test_acc_mean"] == pytest.approx(accs.mean())
      assert row["test_acc_std"] == pytest.approx(accs.std(ddof=1))
      expected = ((0.05, 0.2) if name == "msam" else
                  tune.tuned_hparams("digits-mlp", group["noise"], name))
      assert (row["lr"], row["rho"]) == pytest.approx(expected)
      assert len(res["curves"]["test_acc_mean"]) == 2
    for plot in group["plots"].values():
      assert _is_png(out / plot)
    assert "SGD" in group["table"] and "MSAM" in group["table"]


def test_compare_counts_gradient_evaluations_and_relative_time(compare_run):
  _, result = compare_run
  timing = result["timing"]
  assert {k: v["grad_evals_per_step"] for k, v in timing.items()} == {
      "sgd": 1, "sam": 2, "msam": 1}
  rows = {r: result["groups"][0]["optimizers"][r]["summary"]
          for r in result["groups"][0]["optimizers"]}
  assert rows["sgd"]["relative_time"] == 1.0
  # The ratio is the median of the per-round ratios (each round timed SAM
  # and SGD back to back), its spread their interquartile range.
  ratios = np.divide(timing["sam"]["times"], timing["sgd"]["times"])
  assert rows["sam"]["relative_time"] == pytest.approx(np.median(ratios))
  assert rows["sam"]["relative_time_low"] == pytest.approx(
      np.percentile(ratios, 25))
  assert rows["sam"]["relative_time_high"] == pytest.approx(
      np.percentile(ratios, 75))


def test_a_run_does_not_depend_on_the_runs_vmapped_beside_it(digits):
  spec = SPECS["msam"]
  first = train.train_runs(spec, digits, SETUP, [0.1, 0.05, 0.2, 0.1],
                           [0.3, 1.0, 0.1, 0.3], [0, 1, 2, 3],
                           [0.0, 0.3, 0.0, 0.3])
  moved = train.train_runs(spec, digits, SETUP, [0.3, 0.3, 0.01, 0.05],
                           [0.5, 0.5, 0.5, 1.0], [5, 6, 7, 1],
                           [0.1, 0.1, 0.1, 0.3])
  for key in ("test_acc", "train_loss", "val_acc", "top_eig"):
    np.testing.assert_allclose(first["final"][key][1], moved["final"][key][3],
                               rtol=1e-4)


def test_training_matches_a_plain_python_loop(digits):
  # Two epochs of SAM in the vmapped, scanned trainer equal a hand-written
  # loop over the same minibatches with the NNX model, samtx.sam and
  # optax.apply_updates.
  seed, lr, rho = 3, 0.1, 0.05
  got = train.train_runs(SPECS["sam"], digits, SETUP, [lr, 0.2, 0.2, 0.2],
                         [rho, 0.1, 0.1, 0.1], [seed, 0, 1, 2], [0.0] * 4)

  key = jax.random.key(seed)
  mlp = models.MLP((64, 128, 10),
                   rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
  graphdef, params, rest = nnx.split(mlp, nnx.Param, ...)
  params = nnx.as_pure(params)
  apply = lambda p, xb: nnx.merge(graphdef, p, rest)(xb)
  opt = samtx.sam(lr, rho, momentum=0.9)
  state = opt.init(params)
  x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)

  def loss_at(xb, yb):
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p, xb), yb).mean()

  @jax.jit
  def step(params, state, idx):
    loss = loss_at(x[idx], y[idx])
    updates, state = opt.update(jax.grad(loss)(params), state, params,
                                grad_fn=jax.grad(loss))
    return optax.apply_updates(params, updates), state

  n, b = len(digits.y_train), SETUP.batch_size
  for epoch_key in jax.random.split(jax.random.fold_in(key, 1), 2):
    order_key, _ = jax.random.split(epoch_key)
    perm = np.asarray(jax.random.permutation(order_key, n))
    for i in range(n // b):
      params, state = step(params, state, perm[i * b:(i + 1) * b])
  test_x, test_y = jnp.asarray(digits.x_test), jnp.asarray(digits.y_test)
  acc = float(jnp.mean(jnp.argmax(apply(params, test_x), -1) == test_y))
  full = float(loss_at(x, y)(params))
  assert float(got["final"]["test_acc"][0]) == pytest.approx(acc, abs=1e-6)
  assert float(got["final"]["train_loss"][0]) == pytest.approx(full, rel=1e-4)


def test_tune_picks_the_best_mean_validation_accuracy(tmp_path):
  cli.main(["compare", "--model", "mlp", "--dataset", "digits", "--noise",
            "0.2", "--seeds", "4", "--epochs", "2", "--optimizers", "sgd",
            "--tune", "--tune-seeds", "1", "--timing-steps", "2",
            "--timing-repeats", "1", "--out", str(tmp_path), "--no-progress",
            "--no-plots"])
  folder = tmp_path / "digits-mlp"
  with open(folder / "tuning.json") as f:
    tuning = json.load(f)["tuning"]
  (entry,) = tuning
  grid = entry["grid"]
  assert [g["lr"] for g in grid] == list(config.GRIDS["mlp"]["sgd"][0])
  best = max(grid, key=lambda g: g["score"])
  assert entry["best"] == [best["lr"], best["rho"]]
  with open(folder / "results.json") as f:
    result = json.load(f)
  row = result["groups"][0]["optimizers"]["sgd"]["summary"]
  assert [row["lr"], row["rho"]] == entry["best"]
  # The winner's score is the mean final validation accuracy of its runs,
  # read back from the per-run record.
  record = np.load(folder / "runs" / "tune-sgd.npz")
  val = record["curves/val_acc"][:, -1]
  assert best["score"] == pytest.approx(
      float(val[grid.index(best)]), abs=1e-6)
  # The tuning file feeds later runs.
  table = tune.load_hparams(str(folder / "tuning.json"))
  assert tune.tuned_hparams("digits-mlp", 0.25, "sgd", table) == tuple(
      entry["best"])


def test_sensitivity_grid_spread_and_heatmap(tmp_path):
  cli.main(["sensitivity", "--dataset", "digits", "--seeds", "1", "--epochs",
            "2", "--optimizers", "sam", "--factors", "0.1,10", "--out",
            str(tmp_path), "--no-progress"])
  with open(tmp_path / "digits_noise00.json") as f:
    res = json.load(f)["optimizers"]["sam"]
  lr0, rho0 = tune.tuned_hparams("digits-mlp", 0.0, "sam")
  np.testing.assert_allclose(res["lr"], [lr0 * 0.1, lr0 * 10])
  np.testing.assert_allclose(res["rho"], [rho0 * 0.1, rho0 * 10])
  mean = np.asarray(res["test_acc_mean"])
  assert mean.shape == (2, 2)
  assert res["spread"] == pytest.approx(mean.max() - mean.min())
  assert _is_png(tmp_path / "digits_noise00_heatmap.png")


def test_label_noise_flips_the_requested_fraction_to_other_classes():
  y = np.random.default_rng(0).integers(0, 10, 20000).astype(np.int32)
  noisy = datasets.symmetric_label_noise(y, 0.3, 10, seed=1)
  flipped = noisy != y
  assert abs(flipped.mean() - 0.3) < 0.015
  # The new labels are spread uniformly over the 9 other classes.
  shift = (noisy[flipped] - y[flipped]) % 10
  counts = np.bincount(shift, minlength=10)
  assert counts[0] == 0
  assert counts[1:].min() > 0.8 * counts[1:].mean()
  assert np.array_equal(datasets.symmetric_label_noise(y, 0.0, 10, 1), y)


@pytest.mark.parametrize("name,width,total", [("digits", 64, 1797),
                                              ("mnist1d", 40, 5000)])
def test_embedded_datasets_load_offline_with_disjoint_splits(name, width,
                                                             total):
  ds = datasets.load(name)
  assert ds.x_train.shape[1] == width and ds.num_classes == 10
  assert len(ds.y_train) + len(ds.y_val) + len(ds.y_test) == total
  assert set(np.unique(ds.y_train)) == set(range(10))
  assert not os.path.exists("mnist1d_data.pkl")  # nothing was downloaded


@pytest.mark.parametrize("argv,message", [
    (["compare", "--noise", "1.5"], "label noise must be in"),
    (["compare", "--optimizers", "sgd,adamx"], "unknown optimizer"),
    (["compare", "--dataset", "cifar10"], "unknown dataset"),
    (["compare", "--model", "resnet"], "unknown model"),
    (["compare", "--seeds", "0"], "must be >= 1"),
    (["compare", "--epochs", "two"], "not an integer"),
    (["sensitivity", "--factors", "1,-2"], "positive finite"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_gives_a_clear_error(argv, message, capsys):
  with pytest.raises(SystemExit) as err:
    cli.main(argv)
  assert err.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0]


def test_batch_larger_than_the_data_is_rejected(tmp_path, capsys):
  with pytest.raises(SystemExit) as err:
    cli.main(["compare", "--dataset", "digits", "--batch-size", "100000",
              "--out", str(tmp_path), "--no-progress"])
  assert err.value.code == 2
  assert "exceeds the" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
  parser = cli.build_parser()
  for command in ("compare", "sensitivity"):
    with pytest.raises(SystemExit):
      parser.parse_args([command, "--help"])
    text = capsys.readouterr().out
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
      assert action.help, action.option_strings
      for option in action.option_strings:
        assert option in text
