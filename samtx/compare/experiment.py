"""The ``compare`` and ``sensitivity`` jobs, from options to files on disk.

:func:`run_compare` resolves the options against the preset
(:mod:`samtx.compare.config`), then per workload: tunes (lr, rho) on the
validation split if asked, trains the evaluation seeds, times one step of
each optimizer, and writes ``results.json``, ``tuning.json``, the PNG plots
and the per-run records (:mod:`samtx.compare.records`) to
``<out>/<dataset>-<model>/``. Problems with the user's input raise
:class:`UsageError` before any training starts where they can be known then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import signal
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence

import jax
import numpy as np

from samtx.compare import config
from samtx.compare import data as data_lib
from samtx.compare import records
from samtx.compare import report
from samtx.compare import train
from samtx.compare import tune as tune_lib
from samtx.compare.optimizers import SPECS

__all__ = ["UsageError", "CompareOptions", "SensitivityOptions",
           "run_compare", "run_sensitivity", "resolve_workloads",
           "interruptible", "INTERRUPT_MESSAGE"]

DEFAULT_DATASET = {"mlp": "digits", "cnn": "digits", "transformer": "text"}
_FALLBACK_OPTIMIZERS = {"mlp": ("sgd", "sam", "msam", "adasam"),
                        "cnn": ("sgd", "sam", "msam", "adasam"),
                        "transformer": ("adam", "adasam", "sam_adamw")}


class UsageError(Exception):
  """The user's input cannot work; the message is one line."""


INTERRUPT_MESSAGE = ("interrupted; the finished runs are kept in {out} (run "
                     "the same command again to resume)")
_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def interruptible(message: str) -> Iterator[None]:
  """Ctrl-C raises ``KeyboardInterrupt`` once, and cannot be lost.

  The first SIGINT sets a flag and raises ``KeyboardInterrupt``; should
  anything swallow it, the job still stops at the next batch of runs
  (:func:`_check_interrupt`) and the command exits 130. A second SIGINT
  prints ``message`` and ends the process at once (status 130): the job
  writes its records atomically, so nothing is left half written. Outside
  the main thread this does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _INTERRUPTED.clear()

  def handler(signum, frame):
    if _INTERRUPTED.is_set():
      sys.stderr.write(message + "\n")
      sys.stderr.flush()
      os._exit(130)  # pylint: disable=protected-access
    if _inside_gc_callback(frame):
      # An exception raised in a garbage-collector callback (jax registers
      # one) is printed as "Exception ignored ... Traceback" and dropped:
      # the signal is sent again a moment later, outside the callback.
      threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
      return
    _INTERRUPTED.set()
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGINT, handler)
  try:
    yield
    if _INTERRUPTED.is_set():  # the KeyboardInterrupt was swallowed
      raise KeyboardInterrupt
  finally:
    signal.signal(signal.SIGINT, previous)


def _inside_gc_callback(frame) -> bool:
  """True when ``frame`` runs inside one of ``gc.callbacks``."""
  codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
  codes.discard(None)
  while frame is not None:
    if frame.f_code in codes:
      return True
    frame = frame.f_back
  return False


def _check_interrupt() -> None:
  if _INTERRUPTED.is_set():
    raise KeyboardInterrupt


@dataclasses.dataclass
class CompareOptions:
  """What ``samtx compare`` was asked to do; None takes the preset's value.

  Attributes mirror the command-line flags (``samtx compare --help``).
  """
  out: str
  preset: str = "demo"
  models: Optional[List[str]] = None
  datasets: Optional[List[str]] = None
  optimizers: Optional[List[str]] = None
  noise: Optional[List[float]] = None
  seeds: Optional[int] = None
  epochs: Optional[int] = None
  batch_size: Optional[int] = None
  tune: Optional[bool] = None
  tune_seeds: Optional[int] = None
  tune_epochs: Optional[int] = None
  hparams: Optional[str] = None
  lr: Dict[str, float] = dataclasses.field(default_factory=dict)
  rho: Dict[str, float] = dataclasses.field(default_factory=dict)
  hessian_iters: Optional[int] = None
  sharpness_rho: float = 0.05
  timing_steps: Optional[int] = None
  timing_repeats: Optional[int] = None
  verify_corpus: Optional[bool] = None
  plots: bool = True
  progress: bool = True


@dataclasses.dataclass
class _Plan:
  """One workload's resolved settings."""
  workload: config.Workload
  optimizers: List[str]
  noise: List[float]
  seeds: List[int]
  tune_seeds: List[int]
  setup: train.Setup
  tune_setup: train.Setup
  tune: bool
  timing_steps: int
  timing_repeats: int
  verify_corpus: bool = False


def resolve_workloads(models: Optional[Sequence[str]],
                      datasets: Optional[Sequence[str]],
                      preset: str) -> List[str]:
  """The workloads named by ``--model`` and ``--dataset``.

  Neither given: the preset's. One given: the other defaults per model
  (:data:`DEFAULT_DATASET`) or per dataset (text: the transformer; the
  classification sets: the MLP). Both given: every compatible pair; a model
  or dataset left without a partner is an error.

  Example:
    >>> resolve_workloads(["mlp", "cnn"], ["digits"], "demo")
    ['digits-mlp', 'digits-cnn']
    >>> resolve_workloads(None, ["text", "mnist1d"], "demo")
    ['text-transformer', 'mnist1d-mlp']
  """
  if models is None and datasets is None:
    return list(config.PRESETS[preset]["workloads"])
  if datasets is None:
    datasets = list(dict.fromkeys(DEFAULT_DATASET[m] for m in models))
  if models is None:
    models = list(dict.fromkeys(
        "transformer" if d == "text" else "mlp" for d in datasets))
  fits = lambda m, d: (m == "transformer") == (d == "text")
  for m in models:
    if not any(fits(m, d) for d in datasets):
      needs = "text" if m == "transformer" else "mnist1d or digits"
      raise UsageError(f"--model {m} needs --dataset {needs}")
  for d in datasets:
    if not any(fits(m, d) for m in models):
      needs = "transformer" if d == "text" else "mlp or cnn"
      raise UsageError(f"--dataset {d} needs --model {needs}")
  return [config.workload_name(d, m) for d in datasets for m in models
          if fits(m, d)]


def _plan(name: str, opts: CompareOptions) -> _Plan:
  preset = config.PRESETS[opts.preset]
  workload = config.WORKLOADS[name]
  if opts.optimizers is not None:
    optimizers = list(opts.optimizers)
  else:  # a preset may list aliases this samtx does not have yet
    listed = preset["optimizers"].get(name,
                                      _FALLBACK_OPTIMIZERS[workload.model])
    optimizers = [o for o in listed if o in SPECS]
  language = workload.dataset == "text"
  if opts.noise is not None:
    noise = list(opts.noise)
    if language and any(n != 0 for n in noise):
      raise UsageError("label noise applies to the classification datasets "
                       "only; --dataset text takes --noise 0")
  else:
    noise = list(preset["noise"].get(name, (0.0,)))
  epochs = opts.epochs or preset["epochs"].get(name, workload.epochs)
  batch_size = opts.batch_size or workload.batch_size
  hessian_iters = opts.hessian_iters or preset["hessian_iters"]
  setup = train.Setup(workload, epochs, batch_size, hessian_iters,
                      opts.sharpness_rho)
  tune_setup = dataclasses.replace(setup, epochs=opts.tune_epochs or epochs)
  return _Plan(
      workload, optimizers, noise,
      seeds=list(range(opts.seeds or _per_workload(preset, "seeds", name))),
      tune_seeds=[1000 + s for s in range(opts.tune_seeds or
                                          preset.get("tune_seeds", 3))],
      setup=setup, tune_setup=tune_setup,
      tune=preset["tune"] if opts.tune is None else opts.tune,
      timing_steps=opts.timing_steps or preset.get(
          "timing_steps", workload.timing_steps),
      timing_repeats=opts.timing_repeats or preset.get(
          "timing_repeats", workload.timing_repeats),
      verify_corpus=(preset["verify_corpus"] if opts.verify_corpus is None
                     else opts.verify_corpus))


def _per_workload(preset: dict, key: str, workload: str):
  """A preset value that may be one value or a per-workload dict."""
  value = preset[key]
  if isinstance(value, dict):
    return value.get(workload, preset[f"default_{key}"])
  return value


def _prepare_out(path: str) -> None:
  """Creates the output folder or raises a one-line :class:`UsageError`."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"--out {path} is a file, not a folder")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".samtx-write-test")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as err:
    raise UsageError(f"--out {path} is not writable: "
                     f"{err.strerror or err}") from None


def _load(name: str) -> data_lib.Dataset:
  try:
    return data_lib.load(name)
  except ModuleNotFoundError as err:
    raise UsageError(str(err)) from None


def _check_plan(plan: _Plan, data: data_lib.Dataset) -> None:
  """Fails early on an optimizer that cannot train this workload."""
  for name in plan.optimizers:
    if SPECS[name].trajectory == "saf" and data.task != "classify":
      raise UsageError(f"{name} keeps a per-example logits memory: it needs "
                       f"a classification dataset (mnist1d or digits)")


class _Job:
  """State shared by the stages of one workload."""

  def __init__(self, plan: _Plan, data: data_lib.Dataset, folder: str,
               progress: report.Progress):
    self.plan, self.data, self.folder = plan, data, folder
    self.progress = progress
    self.reused: List[str] = []
    self.seconds = 0.0  # training time of every batch, reused ones included

  def runs(self, phase: str, name: str, setup: train.Setup, lrs, rhos,
           seeds, noises, final: bool) -> dict:
    """Trains (or reloads the record of) one batch of runs."""
    _check_interrupt()
    path = os.path.join(self.folder, "runs", f"{phase}-{name}.npz")
    spec = SPECS[name]
    key = {"optimizer": name, "settings": [list(i) for i in spec.settings],
           "trajectory": spec.trajectory, "dataset": self.data.name,
           "source": self.data.source, "setup": dataclasses.asdict(setup),
           "lrs": list(lrs), "rhos": list(rhos), "seeds": list(seeds),
           "noise": list(noises), "final": final}
    self.progress.describe(f"{phase} {self.plan.workload.name} {name} "
                           f"({len(seeds)} runs)")
    result, reused = records.cached(path, key, lambda: train.train_runs(
        SPECS[name], self.data, setup, lrs, rhos, seeds, noises,
        self.progress, final=final))
    self.seconds += float(result.get("meta", {}).get("seconds", 0.0))
    if reused:
      self.reused.append(os.path.relpath(path, self.folder))
      self.progress.note(f"resume: {path} is already "
                         f"finished, skipping those {len(seeds)} runs")
      self.progress(setup.epochs)
    return result


def _order(names: Sequence[str], model: str) -> List[str]:
  """``names`` with every grid's anchor before the optimizers tuned around it."""
  ordered: List[str] = []
  def visit(name):
    if name in ordered:
      return
    anchor = tune_lib.anchor(model, SPECS[name].grid)
    if anchor in names:
      visit(anchor)
    ordered.append(name)
  for name in names:
    visit(name)
  return ordered


def _tune(job: _Job, name: str, opts: CompareOptions,
          anchors: Dict[float, Dict[str, float]]) -> list:
  plan = job.plan
  points = {noise: tune_lib.grid(plan.workload.model, SPECS[name].grid,
                                 opts.lr.get(name), opts.rho.get(name),
                                 anchors[noise]) for noise in plan.noise}
  runs = [(lr, rho, n, s) for n in plan.noise for lr, rho in points[n]
          for s in plan.tune_seeds]
  out = job.runs("tune", name, plan.tune_setup, [r[0] for r in runs],
                 [r[1] for r in runs], [r[3] for r in runs],
                 [r[2] for r in runs], final=False)
  language = job.data.task == "language"
  score = out["curves"]["val_loss" if language else "val_acc"][:, -1]
  finite = np.isfinite(out["curves"]["train_loss"][:, -1])
  entries, offset = [], 0
  for noise in plan.noise:
    size = len(points[noise]) * len(plan.tune_seeds)
    part = slice(offset, offset + size)
    entries += tune_lib.pick(points[noise], [noise], plan.tune_seeds,
                             score[part], finite[part],
                             higher_is_better=not language)
    offset += size
  return entries


def _hparams(job: _Job, table, opts: CompareOptions, result: dict) -> dict:
  """(lr, rho) per (noise, optimizer): swept or looked up, then overridden.

  Without a sweep, each value comes from ``--hparams``, the committed
  tuned values, the same model's on the other dataset, or the grid's centre
  (:func:`samtx.compare.tune.resolve_hparams`); ``result["hparams_source"]``
  records which, and a one-line note names what was not tuned here.
  """
  plan, chosen = job.plan, {}
  model = plan.workload.model
  sources: Dict[str, str] = {}
  anchors: Dict[float, Dict[str, float]] = {n: {} for n in plan.noise}

  def lookup(name, noise):
    if name in opts.lr and (name in opts.rho or config.GRIDS[model][
        SPECS[name].grid][1] == (0.0,)):
      return opts.lr[name], opts.rho.get(name, 0.0), "command line"
    anchor = tune_lib.anchor(model, SPECS[name].grid)
    if anchor is not None and anchor not in anchors[noise]:
      anchors[noise][anchor] = lookup(anchor, noise)[0]
    lr, rho, source = tune_lib.resolve_hparams(
        plan.workload.name, model, noise, name, SPECS[name].grid, table,
        anchors[noise])
    return opts.lr.get(name, lr), opts.rho.get(name, rho), source

  for name in _order(plan.optimizers, model):
    if plan.tune:
      for noise in plan.noise:
        anchor = tune_lib.anchor(model, SPECS[name].grid)
        if anchor is not None and anchor not in anchors[noise]:
          anchors[noise][anchor], _, source = lookup(anchor, noise)
          sources[f"{anchor} (centre of {name}'s grid)"] = source
      for entry in _tune(job, name, opts, anchors):
        result["tuning"].append({"dataset": job.data.name,
                                 "model": model, "optimizer": name, **entry})
        chosen[entry["noise"], name] = tuple(entry["best"])
        anchors[entry["noise"]][name] = entry["best"][0]
      sources[name] = "tuned here"
      continue
    for noise in plan.noise:
      lr, rho, source = lookup(name, noise)
      chosen[noise, name] = (lr, rho)
      anchors[noise].setdefault(name, lr)
      sources[name] = source
  result["hparams_source"] = sources
  untuned: Dict[str, List[str]] = {}
  for name, source in sources.items():
    if source not in ("tuned", "tuned here", "command line"):
      untuned.setdefault(source, []).append(name)
  if untuned:
    parts = [f"{', '.join(names)}: "
             + (f"{source.split(':', 1)[1]}'s tuned values"
                if source.startswith("borrowed:") else
                "documented defaults (the centre of the grid)")
             for source, names in untuned.items()]
    result["hparams_note"] = (f"{plan.workload.name} has no tuned values "
                              f"for every optimizer; used " + "; ".join(parts))
    job.progress.note(result["hparams_note"])
  return chosen


def _base(names: Sequence[str]) -> str:
  """The optimizer step times are relative to: SGD, else Adam(W), else first."""
  return next((b for b in ("sgd", "adam", "adamw") if b in names), names[0])


def _run_workload(plan: _Plan, data: data_lib.Dataset, opts: CompareOptions,
                  table, progress: report.Progress) -> dict:
  start = time.perf_counter()
  folder = os.path.join(opts.out, plan.workload.name)
  job = _Job(plan, data, folder, progress)
  result = {"workload": plan.workload.name, "task": data.task,
            "data_source": data.source, "environment": environment(),
            "parameters": train.parameter_count(data, plan.setup),
            "settings": {"workload": dataclasses.asdict(plan.workload),
                         "epochs": plan.setup.epochs,
                         "steps": plan.setup.epochs * (
                             len(data.y_train) // plan.setup.batch_size),
                         "batch_size": plan.setup.batch_size,
                         "seeds": plan.seeds, "tune": plan.tune,
                         "tune_seeds": plan.tune_seeds if plan.tune else [],
                         "tune_epochs": plan.tune_setup.epochs,
                         "noise": plan.noise,
                         "hessian_iters": plan.setup.hessian_iters,
                         "timing_steps": plan.timing_steps,
                         "timing_repeats": plan.timing_repeats,
                         "optimizers": {n: dict(SPECS[n].settings)
                                        for n in plan.optimizers}},
            "notes": {n: SPECS[n].note for n in plan.optimizers
                      if SPECS[n].note},
            "tuning": [], "groups": []}
  chosen = _hparams(job, table, opts, result)
  runs = [(noise, seed) for noise in plan.noise for seed in plan.seeds]
  trained = {}
  for name in plan.optimizers:
    trained[name] = job.runs(
        "eval", name, plan.setup, [chosen[n, name][0] for n, _ in runs],
        [chosen[n, name][1] for n, _ in runs], [s for _, s in runs],
        [n for n, _ in runs], final=True)
  progress.describe(f"time {plan.workload.name} (round-robin)")
  timing_start = time.perf_counter()
  timing = train.step_costs(
      {name: chosen[plan.noise[0], name] for name in plan.optimizers}, SPECS,
      data, plan.setup, plan.timing_steps, plan.timing_repeats)
  base = _base(plan.optimizers)
  result["timing"] = timing
  families = {name: SPECS[name].family for name in plan.optimizers}
  for i, noise in enumerate(plan.noise):
    result["groups"].append(_group(
        plan, data, trained, chosen, timing, base, noise,
        slice(i * len(plan.seeds), (i + 1) * len(plan.seeds))))
    group = result["groups"][-1]
    if opts.plots:
      for kind, plot in (("curves", report.plot_curves),
                         ("cost", report.plot_cost)):
        plot(group, families, os.path.join(folder, group["plots"][kind]))
  result["resumed"] = job.reused
  result["wall_seconds"] = time.perf_counter() - start
  # The compute of the whole protocol, resumed batches included: each run
  # record keeps the seconds it took when it was trained.
  result["protocol_seconds"] = job.seconds + (time.perf_counter() -
                                              timing_start)
  if result["tuning"]:
    report.write_json({"tuning": result["tuning"]},
                      os.path.join(folder, "tuning.json"))
  report.write_json(result, os.path.join(folder, "results.json"))
  return result


def _group(plan, data, trained, chosen, timing, base, noise, rows) -> dict:
  """One (workload, noise) table: summaries, per-seed values and curves."""
  group = {"workload": plan.workload.name, "dataset": data.name,
           "model": plan.workload.model, "task": data.task, "noise": noise,
           "seeds": len(plan.seeds), "base": SPECS[base].label,
           "optimizers": {}}
  summaries = []
  for name, res in trained.items():
    final = {k: v[rows] for k, v in res["final"].items()}
    final["test_bpc"] = train.bits(final["test_loss"])
    curves = {k: v[rows] for k, v in res["curves"].items()}
    curves["test_bpc"] = train.bits(curves["test_loss"])
    lr, rho = chosen[noise, name]
    cost = train.timing_summary(timing, name, base)
    row = report.summary_row(
        final, optimizer=name, label=SPECS[name].label, lr=lr, rho=rho,
        relative_time=cost["ratio"], relative_time_low=cost["low"],
        relative_time_high=cost["high"], timing_unstable=cost["unstable"],
        seconds_per_step=timing[name]["seconds_per_step"],
        grad_evals_per_step=timing[name]["grad_evals_per_step"],
        diverged=int(np.sum(~np.isfinite(final["train_loss"]))))
    summaries.append(row)
    group["optimizers"][name] = {
        "summary": row, "per_seed": final,
        "curves": {f"{k}_{stat}": fn(v, axis=0) for k, v in curves.items()
                   for stat, fn in (("mean", np.mean), ("std", np.std))}}
  stem = f"{plan.workload.name}_noise{int(round(100 * noise)):02d}"
  group["table"] = report.format_table(summaries, data.task)
  group["markdown"] = report.markdown_table(summaries, data.task)
  group["plots"] = {"curves": f"{stem}_curves.png", "cost": f"{stem}_cost.png"}
  return group


def _load_all(plans: List[_Plan], opts: CompareOptions) -> dict:
  """The datasets of the plans, checked against them (one-line errors)."""
  loaded: Dict[str, data_lib.Dataset] = {}
  for plan in plans:
    name = plan.workload.dataset
    loaded[name] = loaded.get(name) or _load(name)
    if name == "text" and plan.verify_corpus:
      try:
        data_lib.check_text_corpus()
      except data_lib.CorpusMismatch as err:
        raise UsageError(str(err)) from None
    _check_plan(plan, loaded[name])
    if plan.setup.batch_size > len(loaded[name].y_train):
      raise UsageError(
          f"--batch-size {plan.setup.batch_size} exceeds the "
          f"{len(loaded[name].y_train)} training examples of {name}")
  return loaded


def run_compare(opts: CompareOptions) -> dict:
  """The ``compare`` job; returns ``{workload: results}`` (also on disk).

  Raises:
    UsageError: the input cannot work (before anything trains).
    KeyboardInterrupt: the job was interrupted; every finished batch of
      runs is on disk, so the same command resumes.
  """
  names = resolve_workloads(opts.models, opts.datasets, opts.preset)
  plans = [_plan(name, opts) for name in names]
  table = tune_lib.load_hparams(opts.hparams) if opts.hparams else None
  loaded = _load_all(plans, opts)
  _prepare_out(opts.out)
  total = sum(len(p.optimizers) * (p.setup.epochs + (p.tune_setup.epochs
                                                     if p.tune else 0))
              for p in plans)
  progress = report.Progress(total, opts.progress)
  results = {}
  try:
    for plan in plans:
      data = loaded[plan.workload.dataset]
      if plan.workload.train_examples:
        n = plan.workload.train_examples
        data = data._replace(x_train=data.x_train[:n],
                             y_train=data.y_train[:n])
      results[plan.workload.name] = _run_workload(plan, data, opts, table,
                                                  progress)
  finally:
    progress.close()
  for result in results.values():
    for group in result["groups"]:
      print(f"\n{group['workload']}, label noise {group['noise']:.0%}, "
            f"{group['seeds']} seeds, {result['settings']['epochs']} epochs "
            f"({result['settings']['steps']} steps), step time relative to "
            f"{group['base']}")
      print(group["table"])
      for name, note in result["notes"].items():
        print(f"  {SPECS[name].label}: {note}")
      if any(row["summary"]["timing_unstable"]
             for row in group["optimizers"].values()):
        print(f"  ?: the repeats of this time ratio disagree (interquartile "
              f"range wider than {train.TIMING_SPREAD_LIMIT:.0%} of the "
              f"median): not a measurement; rerun with more "
              f"--timing-repeats on a quieter machine")
    if result.get("hparams_note"):
      print(result["hparams_note"])
    if result["resumed"]:
      print(f"(resumed: {len(result['resumed'])} finished run batches "
            f"reused from {opts.out})")
    print(f"{result['workload']}: {result['wall_seconds']:.0f} s wall-clock "
          f"({result['protocol_seconds']:.0f} s for the whole protocol, "
          f"resumed runs included); wrote "
          f"{os.path.join(opts.out, result['workload'])}")
  return results


def environment() -> dict:
  """The software and hardware a result was measured on."""
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "python": platform.python_version(), "argv": sys.argv}


@dataclasses.dataclass
class SensitivityOptions:
  """What ``samtx sensitivity`` was asked to do (mirrors its flags)."""
  out: str
  dataset: str = "mnist1d"
  model: str = "mlp"
  noise: float = 0.0
  seeds: int = 2
  epochs: int = 30
  batch_size: int = 128
  optimizers: Sequence[str] = ("sam", "lightsam_i", "lightsam_ii",
                               "lightsam_iii")
  factors: Sequence[float] = (0.1, 0.316, 1.0, 3.16, 10.0)
  hparams: Optional[str] = None
  plots: bool = True
  progress: bool = True


def run_sensitivity(opts: SensitivityOptions) -> dict:
  """The ``sensitivity`` job; returns everything written to its JSON."""
  (name,) = resolve_workloads([opts.model], [opts.dataset], "demo")
  table = tune_lib.load_hparams(opts.hparams) if opts.hparams else None
  centres = {}
  for opt_name in opts.optimizers:
    try:
      centres[opt_name] = tune_lib.tuned_hparams(name, opts.noise, opt_name,
                                                 table)
    except KeyError as err:
      raise UsageError(err.args[0]) from None
    if centres[opt_name][1] == 0:
      raise UsageError(f"{opt_name} has no rho")
  _prepare_out(opts.out)
  data = _load(opts.dataset)
  setup = train.Setup(config.WORKLOADS[name], opts.epochs, opts.batch_size)
  seeds = list(range(opts.seeds))
  factors = list(opts.factors)
  progress = report.Progress(len(opts.optimizers) * opts.epochs,
                             opts.progress)
  result = {"config": dataclasses.asdict(opts), "optimizers": {}}
  try:
    for opt_name in opts.optimizers:
      lr0, rho0 = centres[opt_name]
      lrs = [lr0 * f for f in factors]
      rhos = [rho0 * f for f in factors]
      runs = [(lr, rho, s) for lr in lrs for rho in rhos for s in seeds]
      progress.describe(f"sensitivity {opt_name} ({len(runs)} runs)")
      out = train.train_runs(SPECS[opt_name], data, setup,
                             [r[0] for r in runs], [r[1] for r in runs],
                             [r[2] for r in runs], [opts.noise] * len(runs),
                             progress)
      acc = out["final"]["test_acc"].reshape(len(lrs), len(rhos), len(seeds))
      finite = np.isfinite(out["final"]["train_loss"]).reshape(acc.shape)
      acc = np.where(finite, acc, 1.0 / data.num_classes)
      mean = acc.mean(-1)
      middle = len(factors) // 2
      result["optimizers"][opt_name] = {
          "label": SPECS[opt_name].label, "lr": lrs, "rho": rhos,
          "test_acc_mean": mean, "test_acc_std": acc.std(-1),
          "diverged_runs": int((~finite).sum()),
          "spread": float(mean.max() - mean.min()),
          "best": float(mean.max()), "worst": float(mean.min()),
          "spread_lr_at_tuned_rho": float(np.ptp(mean[:, middle])),
          "spread_rho_at_tuned_lr": float(np.ptp(mean[middle, :]))}
  finally:
    progress.close()

  print(f"\n{name}, label noise {opts.noise:.0%}, {len(seeds)} seeds, "
        f"{opts.epochs} epochs; lr and rho = tuned x {factors}")
  head = (f"{'optimizer':14s} {'best %':>7s} {'worst %':>8s} {'spread':>7s} "
          f"{'spread(lr)':>10s} {'spread(rho)':>11s}")
  print(head + "\n" + "-" * len(head))
  for res in result["optimizers"].values():
    print(f"{res['label']:14s} {100 * res['best']:7.1f} "
          f"{100 * res['worst']:8.1f} {100 * res['spread']:7.1f} "
          f"{100 * res['spread_lr_at_tuned_rho']:10.1f} "
          f"{100 * res['spread_rho_at_tuned_lr']:11.1f}")
  stem = f"{opts.dataset}_noise{int(round(100 * opts.noise)):02d}"
  if opts.plots:
    report.plot_heatmaps(result, os.path.join(opts.out, f"{stem}_heatmap.png"))
  report.write_json(result, os.path.join(opts.out, f"{stem}.json"))
  print(f"\nwrote {stem}.json and {stem}_heatmap.png to "
        f"{os.path.abspath(opts.out)}")
  return result
