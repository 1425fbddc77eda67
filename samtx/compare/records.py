"""Per-run records on disk, so that a killed ``samtx compare`` resumes.

Each batch of runs (one optimizer's tuning sweep or evaluation seeds on one
workload) is stored as ``<out>/<workload>/runs/<phase>-<optimizer>.npz``
together with the key that defines it (optimizer, grid, seeds, noise levels,
training settings). A later job with the same ``--out`` reuses a record when
its key is identical and trains it otherwise; a record is written atomically
(temporary file, then rename), so a job killed mid-write leaves no half
record.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Tuple

import numpy as np

__all__ = ["cached"]

_KEY = "__key__"


def _encode(key: dict) -> str:
  return json.dumps(key, sort_keys=True, default=str)


def load(path: str, key: dict) -> Optional[dict]:
  """The stored result at ``path`` if its key equals ``key``, else None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as stored:
      if str(stored[_KEY]) != _encode(key):
        return None
      out: dict = {}
      for name in stored.files:
        if name != _KEY:
          group, metric = name.split("/", 1)
          out.setdefault(group, {})[metric] = stored[name]
      return out
  except (OSError, ValueError, KeyError):  # unreadable: train again
    return None


def save(path: str, key: dict, result: dict) -> None:
  """Writes ``result`` (``group -> metric -> array``) with its key."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  flat = {f"{group}/{metric}": np.asarray(value)
          for group, metrics in result.items()
          for metric, value in metrics.items()}
  tmp = path + ".tmp.npz"
  try:
    np.savez(tmp, **{_KEY: np.asarray(_encode(key))}, **flat)
    os.replace(tmp, path)
  except BaseException:  # interrupted mid-write: leave no partial file
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def cached(path: str, key: dict, compute: Callable[[], dict]
           ) -> Tuple[dict, bool]:
  """``compute()``'s result, from ``path`` when a record with ``key`` exists.

  Args:
    path: the record file (``.npz``).
    key: JSON-serialisable description of the runs.
    compute: trains the runs; returns ``group -> metric -> array``.

  Returns:
    ``(result, reused)``.

  Example:
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "eval-sgd.npz")
    >>> compute = lambda: {"final": {"acc": np.array([0.5, 0.75])}}
    >>> cached(path, {"lr": 0.1}, compute)[1]
    False
    >>> result, reused = cached(path, {"lr": 0.1}, compute)
    >>> reused, result["final"]["acc"].tolist()
    (True, [0.5, 0.75])
  """
  stored = load(path, key)
  if stored is not None:
    return stored, True
  result = compute()
  save(path, key, result)
  return result, False
