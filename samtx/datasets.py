"""Embedded datasets for ``samtx compare``: nothing is downloaded.

Two small classification sets that are generated or shipped locally:

- ``"mnist1d"``: MNIST-1D (Greydanus, 2020, https://arxiv.org/abs/2011.14439),
  built by the ``mnist1d`` package's offline generator
  (``mnist1d.data.make_dataset``; its ``get_dataset`` would download a pickle,
  so it is never called). 4000 train / 1000 test examples of length 40.
- ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 examples of 64
  pixels, shipped inside scikit-learn), scaled to ``[0, 1]``.

Symmetric label noise (:func:`symmetric_label_noise`) replaces a fraction of
the training labels by a different class drawn uniformly at random, the
setting of Foret et al. (https://arxiv.org/abs/2010.01412, Sec. 3.3).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "DATASETS", "load", "symmetric_label_noise"]

DATASETS = ("mnist1d", "digits")


class Dataset(NamedTuple):
  """A train / validation / test split with integer labels.

  Attributes:
    name: dataset name.
    x_train, y_train: training inputs (float32) and clean labels (int32).
    x_val, y_val: validation split carved from the training data.
    x_test, y_test: held-out test split (never used for tuning).
    num_classes: number of classes.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int


def _mnist1d():
  """MNIST-1D from the package's offline generator (global RNG restored)."""
  try:
    from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top
  except ImportError as err:  # pragma: no cover - exercised only without extra
    raise ImportError(
        "dataset 'mnist1d' needs the mnist1d package: pip install 'samtx[demo]'"
    ) from err
  args = mnist1d_data.get_dataset_args()
  saved = np.random.get_state()  # make_dataset reseeds numpy's global RNG
  try:
    raw = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(saved)
  return (raw["x"], raw["y"]), (raw["x_test"], raw["y_test"])


def _digits():
  """scikit-learn digits, a fixed stratified 80/20 train/test split."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as err:  # pragma: no cover
    raise ImportError(
        "dataset 'digits' needs scikit-learn: pip install 'samtx[demo]'"
    ) from err
  x, y = load_digits(return_X_y=True)
  x = x / 16.0
  rng = np.random.default_rng(0)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    test[idx[: len(idx) // 5]] = True
  return (x[~test], y[~test]), (x[test], y[test])


def load(name: str, *, val_fraction: float = 0.15) -> Dataset:
  """Loads an embedded dataset and carves a validation split from train.

  The split is deterministic (it does not depend on any run seed), so every
  optimizer and seed sees the same train, validation and test examples.

  Args:
    name: ``"mnist1d"`` or ``"digits"``.
    val_fraction: fraction of the training data held out for validation,
      in ``(0, 1)``.

  Returns:
    A :class:`Dataset` with clean labels.

  Raises:
    ValueError: unknown ``name`` or ``val_fraction`` outside ``(0, 1)``.

  Example:
    >>> ds = load("digits")
    >>> ds.x_train.shape[1], ds.num_classes
    (64, 10)
    >>> len(ds.y_train) + len(ds.y_val) + len(ds.y_test)
    1797
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}.")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  (x, y), (x_test, y_test) = _mnist1d() if name == "mnist1d" else _digits()
  perm = np.random.default_rng(1).permutation(len(y))
  n_val = int(round(val_fraction * len(y)))
  val, train = perm[:n_val], perm[n_val:]
  f32 = lambda a: np.asarray(a, np.float32)
  i32 = lambda a: np.asarray(a, np.int32)
  return Dataset(name, f32(x[train]), i32(y[train]), f32(x[val]), i32(y[val]),
                 f32(x_test), i32(y_test), int(np.max(y)) + 1)


def symmetric_label_noise(labels: np.ndarray, rate: float, num_classes: int,
                          seed: int) -> np.ndarray:
  """Replaces each label, with probability ``rate``, by a different class.

  The new class is drawn uniformly from the ``num_classes - 1`` other
  classes, so exactly the corrupted labels are wrong.

  Args:
    labels: integer labels.
    rate: corruption probability in ``[0, 1]``.
    num_classes: number of classes (``>= 2``).
    seed: seed of the corruption (each run seed gets its own noisy labels).

  Returns:
    Noisy labels, same shape and dtype.

  Raises:
    ValueError: ``rate`` outside ``[0, 1]`` or ``num_classes < 2``.

  Example:
    >>> y = np.zeros(1000, np.int32)
    >>> noisy = symmetric_label_noise(y, 0.3, 10, seed=0)
    >>> 0.25 < float(np.mean(noisy != y)) < 0.35
    True

  References:
    Foret et al., 2021, https://arxiv.org/abs/2010.01412 (Sec. 3.3)
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"label noise rate must be in [0, 1], got {rate}.")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
  rng = np.random.default_rng(seed)
  flip = rng.random(labels.shape) < rate
  shift = rng.integers(1, num_classes, labels.shape)
  return np.where(flip, (labels + shift) % num_classes, labels).astype(
      labels.dtype)
