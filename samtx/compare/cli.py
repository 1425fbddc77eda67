"""The ``samtx`` command line: argument parsing only.

``samtx compare`` and ``samtx sensitivity`` parse their flags into
:class:`samtx.compare.experiment.CompareOptions` /
:class:`~samtx.compare.experiment.SensitivityOptions` and hand them to the
job; nothing here knows how training works. Every error in the user's input
is one line on stderr (``samtx compare: error: ...``) and exit status 2; an
interrupted job (Ctrl-C) is one line and exit status 130, and keeps what
finished.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional, Sequence

from samtx.compare import config
from samtx.compare import data as data_lib
from samtx.compare import experiment
from samtx.compare import models
from samtx.compare import tune as tune_lib
from samtx.compare.optimizers import SPECS

__all__ = ["build_parser", "main"]

HPARAMS_HELP = (
    "JSON file to take (lr, rho) from instead of the built-in tuned values: "
    "the tuning.json a --tune run writes, {\"tuning\": [{\"dataset\": "
    "\"digits\", \"model\": \"mlp\", \"noise\": 0.0, \"optimizer\": \"sam\", "
    "\"best\": [lr, rho]}, ...]}, one entry per dataset, model, noise level "
    "and optimizer; lr > 0, rho >= 0; a missing \"model\" means mlp")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except None (those flags say where theirs come from)."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
  """An ``ArgumentParser`` whose errors are one line (no usage block)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _names(choices: Sequence[str], what: str, allow_all: bool = True):
  """An argparse type: a comma-separated list drawn from ``choices``."""
  def parse(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if allow_all and names == ["all"]:
      return list(choices)
    bad = [n for n in names if n not in choices]
    if bad or not names:
      raise argparse.ArgumentTypeError(
          f"unknown {what}(s) {bad}; choose from {', '.join(choices)}"
          + (" or 'all'" if allow_all else ""))
    return list(dict.fromkeys(names))
  return parse


def _number(text: str, low: float, strict: bool, kind=float):
  try:
    value = kind(text)
  except ValueError as err:
    name = "an integer" if kind is int else "a number"
    raise argparse.ArgumentTypeError(f"not {name}: {text!r}") from err
  if not math.isfinite(value) or value < low or (strict and value == low):
    raise argparse.ArgumentTypeError(
        f"must be {'>' if strict else '>='} {low:g}, got {text}")
  return value


def _rate(text: str) -> float:
  value = _number(text, 0.0, False)
  if value >= 1:
    raise argparse.ArgumentTypeError(
        f"label noise must be in [0, 1), got {value}")
  return value


def _rates(text: str) -> List[float]:
  return [_rate(t) for t in text.split(",") if t.strip()] or [0.0]


def _positive_floats(text: str) -> List[float]:
  try:
    values = [float(t) for t in text.split(",") if t.strip()]
  except ValueError as err:
    raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}"
                                     ) from err
  if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
    raise argparse.ArgumentTypeError(
        f"need positive finite numbers, got {text!r}")
  return values


def _positive_int(text: str) -> int:
  return _number(text, 1, False, int)


def _nonneg_float(text: str) -> float:
  return _number(text, 0.0, False)


def _override(what: str, low: float, strict: bool):
  def parse(text: str):
    try:
      return tune_lib.parse_overrides(text, list(SPECS), what, low, strict)
    except tune_lib.HparamsError as err:
      raise argparse.ArgumentTypeError(str(err)) from None
  return parse


def _merge(values) -> dict:
  """Repeated ``--lr``/``--rho`` flags, later ones winning."""
  merged = {}
  for value in values or []:
    merged.update(value)
  return merged


def _optimizer_help() -> str:
  lines = []
  for name, spec in SPECS.items():
    lines.append(f"{name} ({spec.label}{': ' + spec.note if spec.note else ''})")
  return "; ".join(lines)


def _compare_parser(sub) -> None:
  fmt = _Formatter
  preset_default = "(default: from --preset)"
  cmp = sub.add_parser(
      "compare", formatter_class=fmt,
      help="train MLP, CNN and transformer workloads with every optimizer "
           "and compare them",
      description=(
          "Train small models (an MLP, a BatchNorm CNN, a causal "
          "transformer language model) on embedded data (no download) with "
          "samtx's optimizers and optax baselines; print one table per "
          "workload and label-noise level (test accuracy or bits per "
          "character, mean ± std over seeds, step time relative to the "
          "base optimizer with the interquartile range of its repeats - "
          "'?' when they disagree -, gradient evaluations per step, top "
          "Hessian eigenvalue) and write results.json, tuning.json, PNG "
          "plots and per-run records to --out/<dataset>-<model>/. A job "
          "interrupted (Ctrl-C: exit status 130) or killed and restarted "
          "with the same --out resumes from the finished runs. Without "
          "--tune, values not tuned for a pair come from the same model on "
          "the other dataset, else the centre of the grid (a note says "
          "which). "
          "--preset demo is the quick default (make demo); --preset full is "
          "the committed run. Optimizers: " + _optimizer_help() + "."))
  cmp.add_argument("--preset", choices=sorted(config.PRESETS), default="demo",
                   help="defaults for every flag left out: demo (quick, "
                        "built-in tuned values) or full (the committed "
                        "results: tuning sweep with 3 seeds, 5 seeds)")
  cmp.add_argument("--model", type=_names(models.MODELS, "model"),
                   default=None, dest="models",
                   help="comma-separated models: mlp, cnn, transformer "
                        "(the transformer trains on --dataset text) "
                        + preset_default)
  cmp.add_argument("--dataset", type=_names(data_lib.DATASETS, "dataset"),
                   default=None, dest="datasets",
                   help="comma-separated datasets: mnist1d, digits, text "
                        "or all " + preset_default)
  cmp.add_argument("--noise", type=_rates, default=None,
                   help="comma-separated symmetric label-noise rates in "
                        "[0, 1) applied to the train and validation labels "
                        "of the classification datasets (test labels stay "
                        "clean; text takes 0 only) " + preset_default)
  cmp.add_argument("--seeds", type=_positive_int, default=None,
                   help="evaluation seeds (0..N-1) per optimizer and noise "
                        "level; a seed sets init, batch order, dropout and "
                        "label noise " + preset_default)
  cmp.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs per run (default: the preset's, "
                        "per workload)")
  cmp.add_argument("--batch-size", type=_positive_int, default=None,
                   help="minibatch size (default: per workload)")
  cmp.add_argument("--optimizers",
                   type=_names(list(SPECS), "optimizer"), default=None,
                   help="comma-separated optimizers, or all: "
                        + ", ".join(SPECS) + " (default: the preset's, per "
                        "workload)")
  cmp.add_argument("--tune", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="run the (lr, rho) tuning sweep on the validation "
                        "split first (per workload and noise level) instead "
                        "of using the built-in tuned values " + preset_default)
  cmp.add_argument("--tune-seeds", type=_positive_int, default=None,
                   help="seeds per grid point in the tuning sweep (seeds "
                        "1000.., distinct from the evaluation seeds; "
                        "default 3)")
  cmp.add_argument("--tune-epochs", type=_positive_int, default=None,
                   help="epochs per tuning run (default: the same as the "
                        "evaluation runs)")
  cmp.add_argument("--hparams", default=None, metavar="JSON",
                   help=HPARAMS_HELP)
  cmp.add_argument("--lr", type=_override("lr", 0.0, True), action="append",
                   default=None, metavar="NAME=LR,...",
                   help="learning-rate overrides per optimizer, e.g. "
                        "sam=0.3,adasam=1e-3 (with --tune: the sweep keeps "
                        "this lr); may be repeated")
  cmp.add_argument("--rho", type=_override("rho", 0.0, False),
                   action="append", default=None, metavar="NAME=RHO,...",
                   help="rho overrides per optimizer, e.g. sam=0.1 (with "
                        "--tune: the sweep keeps this rho); may be repeated")
  cmp.add_argument("--hessian-iters", type=_positive_int, default=None,
                   help="Lanczos iterations for the top Hessian eigenvalue "
                        + preset_default)
  cmp.add_argument("--sharpness-rho", type=_nonneg_float, default=0.05,
                   help="radius of the perturbed-loss gap stored in the JSON")
  cmp.add_argument("--timing-steps", type=_positive_int, default=None,
                   help="steps per timed call of the jitted step loop "
                        "(default: the preset's or the workload's)")
  cmp.add_argument("--timing-repeats", type=_positive_int, default=None,
                   help="timed round-robin repeats, the median is reported "
                        "(default: the preset's or the workload's)")
  cmp.add_argument("--verify-corpus", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="refuse a text corpus other than the committed runs' "
                        "(it is read from this Python's standard library; its "
                        "SHA-256 is checked) " + preset_default)
  cmp.add_argument("--out", default="samtx-results/compare",
                   help="output folder; each workload writes to "
                        "OUT/<dataset>-<model>/")
  cmp.add_argument("--no-plots", action="store_true",
                   help="skip the PNG plots")
  cmp.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar")
  cmp.set_defaults(func=_compare)


def _compare(args) -> None:
  experiment.run_compare(experiment.CompareOptions(
      out=args.out, preset=args.preset, models=args.models,
      datasets=args.datasets, optimizers=args.optimizers, noise=args.noise,
      seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
      tune=args.tune, tune_seeds=args.tune_seeds,
      tune_epochs=args.tune_epochs, hparams=args.hparams,
      lr=_merge(args.lr), rho=_merge(args.rho),
      hessian_iters=args.hessian_iters, sharpness_rho=args.sharpness_rho,
      timing_steps=args.timing_steps, timing_repeats=args.timing_repeats,
      verify_corpus=args.verify_corpus, plots=not args.no_plots,
      progress=not args.no_progress))


def _sensitivity_parser(sub) -> None:
  fmt = _Formatter
  sen = sub.add_parser(
      "sensitivity", formatter_class=fmt,
      help="test accuracy over a (lr, rho) grid for SAM vs LightSAM",
      description=(
          "Train over a grid of learning rates and rho values (the tuned "
          "values times --factors, two orders of magnitude by default), draw "
          "heat maps of test accuracy and report each optimizer's spread "
          "(max - min mean accuracy over the grid)."))
  sen.add_argument("--dataset", choices=data_lib.CLASSIFICATION,
                   default="mnist1d", help="dataset")
  sen.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="model")
  sen.add_argument("--noise", type=_rate, default=0.0,
                   help="symmetric label-noise rate in [0, 1)")
  sen.add_argument("--seeds", type=_positive_int, default=2,
                   help="seeds per grid point")
  sen.add_argument("--epochs", type=_positive_int, default=30,
                   help="training epochs per run")
  sen.add_argument("--batch-size", type=_positive_int, default=128,
                   help="minibatch size")
  sen.add_argument("--optimizers", type=_names(list(SPECS), "optimizer",
                                               allow_all=False),
                   default=["sam", "lightsam_i", "lightsam_ii",
                            "lightsam_iii"],
                   help="comma-separated optimizers with a rho")
  sen.add_argument("--factors", type=_positive_floats,
                   default=[0.1, 0.316, 1.0, 3.16, 10.0],
                   help="multipliers of the tuned lr and rho")
  sen.add_argument("--hparams", default=None, metavar="JSON",
                   help="tuning.json to take the centre (lr, rho) from (the "
                        "format of samtx compare --hparams)")
  sen.add_argument("--out", default="samtx-results/sensitivity",
                   help="output folder")
  sen.add_argument("--no-plots", action="store_true", help="skip the PNG")
  sen.add_argument("--no-progress", action="store_true",
                   help="hide the progress bar")
  sen.set_defaults(func=_sensitivity)


def _sensitivity(args) -> None:
  experiment.run_sensitivity(experiment.SensitivityOptions(
      out=args.out, dataset=args.dataset, model=args.model, noise=args.noise,
      seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
      optimizers=args.optimizers, factors=args.factors, hparams=args.hparams,
      plots=not args.no_plots, progress=not args.no_progress))


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of the ``samtx`` command."""
  parser = _Parser(prog="samtx",
                   description="samtx: sharpness-aware optimizers for optax.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                              parser_class=_Parser)
  _compare_parser(sub)
  _sensitivity_parser(sub)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Runs the ``samtx`` command (``compare`` when no command is given).

  Args:
    argv: the arguments (default ``sys.argv[1:]``).

  Raises:
    SystemExit: with status 2 and a one-line message on stderr when the
      input cannot work (bad flag, unusable ``--out`` or ``--hparams``, a
      dataset whose module is missing); with status 130 and one line when
      the job is interrupted (Ctrl-C): the finished runs stay on disk and
      the same command resumes.
  """
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv:
    argv = ["compare"]
  args = parser.parse_args(argv)
  if args.command is None:
    parser.error("choose a command: compare or sensitivity")
  if args.command == "compare":
    message = "samtx compare: " + experiment.INTERRUPT_MESSAGE.format(
        out=args.out)
  else:  # the sensitivity grid keeps no per-run records
    message = f"samtx {args.command}: interrupted; nothing was written"
  try:
    with experiment.interruptible(message):
      args.func(args)
  except (experiment.UsageError, tune_lib.HparamsError) as err:
    sys.stderr.write(f"samtx {args.command}: error: {err}\n")
    raise SystemExit(2) from None
  except KeyboardInterrupt:
    sys.stderr.write(message + "\n")
    raise SystemExit(130) from None
