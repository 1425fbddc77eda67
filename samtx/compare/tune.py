"""Hyper-parameters of ``samtx compare``: grids, winners, tables, overrides.

The sweep itself trains through :mod:`samtx.compare.train`; this module
builds the runs of a grid, picks the winner of each noise level by mean
validation score, reads and checks ``--hparams`` files, and parses the
``--lr`` / ``--rho`` overrides.

The ``--hparams`` file is the ``tuning.json`` a ``--tune`` run writes::

  {"tuning": [{"dataset": "digits", "model": "mlp", "noise": 0.0,
               "optimizer": "sam", "best": [0.3, 0.15], ...}, ...]}

one entry per (dataset, model, noise, optimizer); ``best`` is
``[learning rate > 0, rho >= 0]``; ``model`` may be left out (``"mlp"``, the
files of samtx <= 0.1); other keys are ignored. A bare list of entries is
accepted too.
"""

from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from samtx.compare import config

__all__ = ["HparamsError", "grid", "anchor", "tuned_hparams",
           "default_hparams", "resolve_hparams", "pick", "load_hparams",
           "parse_overrides"]

Table = Dict[str, Dict[float, Dict[str, tuple]]]


class HparamsError(ValueError):
  """A hyper-parameter file or override is malformed (one-line message)."""


def anchor(model: str, grid_key: str) -> Optional[str]:
  """The optimizer whose tuned lr a grid is relative to (None: absolute)."""
  lrs = config.GRIDS[model][grid_key][0]
  return lrs.anchor if isinstance(lrs, config.Relative) else None


def grid(model: str, grid_key: str, lr: Optional[float] = None,
         rho: Optional[float] = None,
         anchors: Optional[Dict[str, float]] = None
         ) -> List[Tuple[float, float]]:
  """The (lr, rho) points of a sweep; an override pins its axis.

  Args:
    model: model name (grids differ per model).
    grid_key: the optimizer's grid (:attr:`Spec.grid`).
    lr: if given, the only learning rate.
    rho: if given, the only rho.
    anchors: optimizer -> tuned learning rate, for grids whose learning
      rates are :class:`~samtx.compare.config.Relative` to another
      optimizer's.

  Returns:
    A list of ``(lr, rho)``, learning rate major.

  Example:
    >>> grid("mlp", "sam", lr=0.1)
    [(0.1, 0.02), (0.1, 0.05), (0.1, 0.15)]
    >>> grid("cnn", "sam", anchors={"sgd": 0.3})
    [(0.1, 0.05), (0.1, 0.15), (0.3, 0.05), (0.3, 0.15)]
  """
  lrs, rhos = config.GRIDS[model][grid_key]
  if isinstance(lrs, config.Relative):
    centre = (anchors or {}).get(lrs.anchor)
    if centre is None:
      raise KeyError(f"the {grid_key} grid of the {model} is relative to "
                     f"{lrs.anchor}'s learning rate, which is not known")
    lrs = tuple(float(f"{centre * f:.6g}") for f in lrs.factors)
  lrs = (lr,) if lr is not None else lrs
  rhos = (rho,) if rho is not None and rhos != (0.0,) else rhos
  return [(float(a), float(b)) for a in lrs for b in rhos]


def default_hparams(model: str, grid_key: str,
                    anchors: Optional[Dict[str, float]] = None
                    ) -> Tuple[float, float]:
  """The documented default of an untuned optimizer: its grid's centre.

  The middle learning rate and the middle rho of the model's grid (the
  lower middle of an even count); a grid relative to another optimizer
  takes that optimizer's learning rate (the factor nearest 1).

  Example:
    >>> default_hparams("cnn", "sgd")
    (0.1, 0.0)
    >>> default_hparams("cnn", "msam", anchors={"sgd": 0.1})
    (0.1, 0.3)
  """
  points = grid(model, grid_key, anchors=anchors)
  lrs = sorted({p[0] for p in points})
  rhos = sorted({p[1] for p in points})
  lr = lrs[(len(lrs) - 1) // 2]
  relative = config.GRIDS[model][grid_key][0]
  if isinstance(relative, config.Relative):
    factor = min(relative.factors, key=lambda f: abs(math.log(f)))
    lr = float(f"{anchors[relative.anchor] * factor:.6g}")
  return lr, rhos[(len(rhos) - 1) // 2]


def tuned_hparams(workload: str, noise: float, name: str,
                  table: Optional[Table] = None) -> Tuple[float, float]:
  """``(lr, rho)`` of an optimizer from ``table`` (default ``config.TUNED``).

  Args:
    workload: ``"<dataset>-<model>"``.
    noise: label-noise rate; the nearest level at which ``name`` is tuned
      is used.
    name: optimizer key of :data:`samtx.compare.optimizers.SPECS`.
    table: ``workload -> noise -> name -> (lr, rho)``.

  Returns:
    ``(lr, rho)`` as floats.

  Raises:
    KeyError: nothing tuned for this workload or optimizer.

  Example:
    >>> table = {"digits-mlp": {0.0: {"sam": (0.1, 0.05)},
    ...                         0.25: {"sam": (0.3, 0.1)}}}
    >>> tuned_hparams("digits-mlp", 0.3, "sam", table)
    (0.3, 0.1)
    >>> table["digits-mlp"][0.0]["msam"] = (0.1, 0.3)  # tuned at 0 only
    >>> tuned_hparams("digits-mlp", 0.3, "msam", table)
    (0.1, 0.3)
  """
  table = config.TUNED if table is None else table
  by_noise = table.get(workload)
  if not by_noise:
    raise KeyError(f"no tuned hyper-parameters for {workload}; run with "
                   f"--tune or pass --lr/--rho")
  levels = {float(k): v for k, v in by_noise.items() if name in v}
  if not levels:
    raise KeyError(f"no tuned hyper-parameters for {name} on {workload}; "
                   f"run with --tune or pass --lr/--rho")
  nearest = min(levels, key=lambda level: abs(level - noise))
  lr, rho = levels[nearest][name]
  return float(lr), float(rho)


def resolve_hparams(workload: str, model: str, noise: float, name: str,
                    grid_key: str, table: Optional[Table] = None,
                    anchors: Optional[Dict[str, float]] = None
                    ) -> Tuple[float, float, str]:
  """``(lr, rho, source)`` of an optimizer when no sweep is run.

  In order: ``table`` (an ``--hparams`` file) if given, the committed
  tuned values (``config.TUNED``) of this workload, those of the same model
  on the other dataset (``config.BORROW``), and last the grid's centre
  (:func:`default_hparams`). ``source`` says which: ``"tuned"``,
  ``"borrowed:<workload>"`` or ``"default"``.

  Example:
    >>> resolve_hparams("digits-cnn", "cnn", 0.0, "sgd", "sgd")[2]
    'borrowed:mnist1d-cnn'
  """
  candidates = [("tuned", workload, config.TUNED)]
  if table is not None:
    candidates.insert(0, ("tuned", workload, table))
  if workload in config.BORROW:
    borrowed = config.BORROW[workload]
    candidates.append((f"borrowed:{borrowed}", borrowed, config.TUNED))
  for source, key, lookup in candidates:
    try:
      lr, rho = tuned_hparams(key, noise, name, lookup)
    except KeyError:
      continue
    return lr, rho, source
  lr, rho = default_hparams(model, grid_key, anchors)
  return lr, rho, "default"


def pick(points: Sequence[Tuple[float, float]], noises: Sequence[float],
         seeds: Sequence[int], final_score, finite,
         higher_is_better: bool) -> list:
  """The winner of each noise level by mean validation score over seeds.

  Runs are ordered noise major, then grid point, then seed. A diverged run
  (``finite`` false) scores the worst possible value.

  Args:
    points: the grid.
    noises: noise levels.
    seeds: tuning seeds.
    final_score: the validation score of each run (accuracy or loss).
    finite: whether each run's final train loss is finite.
    higher_is_better: accuracy (True) or loss (False).

  Returns:
    One ``{"noise", "best": [lr, rho], "grid": [{"lr", "rho", "score",
    "score_std"}]}`` per noise level.

  Example:
    >>> out = pick([(0.1, 0.0), (0.3, 0.0)], [0.0], [0, 1],
    ...            np.array([0.5, 0.7, 0.9, 0.8]), np.ones(4, bool), True)
    >>> out[0]["best"]
    [0.3, 0.0]
  """
  shape = (len(noises), len(points), len(seeds))
  worst = -np.inf if higher_is_better else np.inf
  score = np.where(np.asarray(finite).reshape(shape),
                   np.asarray(final_score, np.float64).reshape(shape), worst)
  score = np.nan_to_num(score, nan=worst, posinf=worst if not
                        higher_is_better else np.inf)
  result = []
  for noise, per_point in zip(noises, score):
    means = per_point.mean(1)
    best = int(np.argmax(means) if higher_is_better else np.argmin(means))
    result.append({"noise": float(noise), "best": list(points[best]),
                   "grid": [{"lr": lr, "rho": rho, "score": float(m),
                             "score_std": float(sd)}
                            for (lr, rho), m, sd in zip(points, means,
                                                        per_point.std(1))]})
  return result


def _number(entry, index, where) -> float:
  value = entry[index]
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise HparamsError(f"{where}: expected a number, got {value!r}")
  return float(value)


def load_hparams(path: str) -> Table:
  """Reads and checks a ``--hparams`` file (format in the module docstring).

  Args:
    path: the JSON file.

  Returns:
    A ``workload -> noise -> optimizer -> (lr, rho)`` table.

  Raises:
    HparamsError: the file is missing, not JSON or not of that shape, or a
      value is out of range; the message names the file and the entry.
  """
  try:
    with open(path) as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise HparamsError(f"--hparams {path}: no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise HparamsError(f"--hparams {path}: cannot read JSON ({err})") from None
  entries = raw.get("tuning") if isinstance(raw, dict) else raw
  if not isinstance(entries, list) or not entries:
    raise HparamsError(
        f"--hparams {path}: expected {{\"tuning\": [entries]}} as written by "
        f"--tune (see samtx compare --help)")
  table: Table = {}
  for i, entry in enumerate(entries):
    where = f"--hparams {path}: entry {i}"
    if not isinstance(entry, dict):
      raise HparamsError(f"{where}: expected an object, got {entry!r}")
    missing = [k for k in ("dataset", "noise", "optimizer", "best")
               if k not in entry]
    if missing:
      raise HparamsError(f"{where}: missing key(s) {', '.join(missing)}")
    best = entry["best"]
    if not isinstance(best, (list, tuple)) or len(best) != 2:
      raise HparamsError(f"{where}: 'best' must be [lr, rho], got {best!r}")
    lr, rho = (_number(best, j, where) for j in (0, 1))
    noise = _number(entry, "noise", where)
    if not (lr > 0 and math.isfinite(lr)):
      raise HparamsError(f"{where}: learning rate must be > 0, got {lr}")
    if not (rho >= 0 and math.isfinite(rho)):
      raise HparamsError(f"{where}: rho must be >= 0, got {rho}")
    name = config.workload_name(str(entry["dataset"]),
                                str(entry.get("model", "mlp")))
    table.setdefault(name, {}).setdefault(noise, {})[
        str(entry["optimizer"])] = (lr, rho)
  return table


def parse_overrides(text: str, names: Sequence[str], what: str,
                    low: float, strict: bool) -> Dict[str, float]:
  """Parses ``name=value,name=value`` (an ``--lr`` or ``--rho`` flag).

  Args:
    text: the flag's value.
    names: valid optimizer names.
    what: ``"lr"`` or ``"rho"`` (for messages).
    low: smallest allowed value.
    strict: whether ``low`` itself is excluded.

  Returns:
    ``name -> value``.

  Raises:
    HparamsError: malformed text, unknown name or value out of range.

  Example:
    >>> parse_overrides("sam=0.3,adasam=1e-3", ["sam", "adasam"], "lr", 0.0,
    ...                 True)
    {'sam': 0.3, 'adasam': 0.001}
  """
  out = {}
  for item in (t.strip() for t in text.split(",")):
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
      raise HparamsError(f"--{what}: expected name=value, got {item!r}")
    name = name.strip()
    if name not in names:
      raise HparamsError(f"--{what}: unknown optimizer {name!r}")
    try:
      number = float(value)
    except ValueError:
      raise HparamsError(f"--{what} {name}: not a number: {value!r}") from None
    if not math.isfinite(number) or number < low or (strict and
                                                     number == low):
      raise HparamsError(f"--{what} {name}: must be {'>' if strict else '>='}"
                         f" {low:g}, got {value}")
    out[name] = number
  return out
