"""Embedded datasets for ``samtx compare``: nothing is downloaded.

Two small classification sets and one text corpus, generated or shipped
locally:

- ``"mnist1d"``: MNIST-1D (Greydanus, 2020, https://arxiv.org/abs/2011.14439),
  built by the ``mnist1d`` package's offline generator
  (``mnist1d.data.make_dataset``; its ``get_dataset`` would download a pickle,
  so it is never called). 4000 train / 1000 test examples of length 40.
- ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 examples of 64
  pixels, shipped inside scikit-learn), scaled to ``[0, 1]``.
- ``"text"``: a character-level language-modelling corpus, the source files of
  a fixed list of pure-Python modules of the running interpreter's standard
  library (:data:`TEXT_MODULES`: code, docstrings and comments, ASCII only;
  about 340k characters on CPython 3.11). It is cut into blocks of
  :data:`TEXT_BLOCK` characters, dealt to train / validation / test 8:1:1,
  and each split into non-overlapping windows of ``context + 1`` bytes
  (input = the first ``context``, target = the last ``context``). The
  corpus depends on the Python version: results store its SHA-256, and
  :func:`check_text_corpus` refuses a corpus other than the committed run's
  (:data:`TEXT_SHA256`, CPython 3.11.7).

Symmetric label noise (:func:`symmetric_label_noise`) replaces a fraction of
the training labels by a different class drawn uniformly at random, the
setting of Foret et al. (https://arxiv.org/abs/2010.01412, Sec. 3.3).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import sysconfig
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["Dataset", "DATASETS", "CLASSIFICATION", "TEXT_MODULES",
           "TEXT_SHA256", "CorpusMismatch", "check_text_corpus", "load",
           "symmetric_label_noise", "text_corpus", "text_sha256"]

CLASSIFICATION = ("mnist1d", "digits")
DATASETS = CLASSIFICATION + ("text",)

# Stable, mostly-prose pure-Python stdlib modules (docstrings and comments in
# English, code with long identifiers): a language with both structure and
# words, shipped with every CPython.
TEXT_MODULES = ("argparse", "textwrap", "difflib", "heapq", "fractions",
                "statistics", "calendar", "string", "shlex")
TEXT_BLOCK = 4096
TEXT_VOCAB = 128  # ASCII
# SHA-256 of text_corpus() on CPython 3.11.7, the interpreter of the committed
# runs (351,979 characters).
TEXT_SHA256 = (
    "68337d882f10b5e5ce52ab9fb9c108b30f33a739b73987b68985ed88f4d19cd1")
TEXT_PYTHON = "3.11.7"


class CorpusMismatch(ValueError):
  """The running interpreter's text corpus is not the committed runs' one."""


class Dataset(NamedTuple):
  """A train / validation / test split with integer labels.

  Attributes:
    name: dataset name.
    x_train, y_train: training inputs (float32) and clean labels (int32).
    x_val, y_val: validation split carved from the training data.
    x_test, y_test: held-out test split (never used for tuning).
    num_classes: number of classes (the vocabulary size for ``"text"``).
    input_shape: the shape of one example as the models read it (``(8, 8)``
      for digits, ``(40,)`` for MNIST-1D, ``(context,)`` for text).
    task: ``"classify"`` (one label per example) or ``"language"`` (one
      next-character label per position, integer inputs).
    source: where the data came from (stored in results).
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  input_shape: tuple = ()
  task: str = "classify"
  source: str = ""


@contextlib.contextmanager
def _needs(dataset: str):
  """Turns a failed import into an error naming the module really missing.

  ``ModuleNotFoundError.name`` is the module that could not be found, which
  may be a dependency of the package imported (scipy under scikit-learn),
  not the package itself.
  """
  try:
    yield
  except ModuleNotFoundError as err:
    raise ModuleNotFoundError(
        f"dataset {dataset!r} cannot load: Python module {err.name!r} is "
        f"missing (pip install 'samtx[demo]' installs the demo's "
        f"dependencies)", name=err.name) from err


def _mnist1d():
  """MNIST-1D from the package's offline generator (global RNG restored)."""
  with _needs("mnist1d"):
    from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top
  args = mnist1d_data.get_dataset_args()
  saved = np.random.get_state()  # make_dataset reseeds numpy's global RNG
  try:
    raw = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(saved)
  return (raw["x"], raw["y"]), (raw["x_test"], raw["y_test"])


def _digits():
  """scikit-learn digits, a fixed stratified 80/20 train/test split."""
  with _needs("digits"):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  x, y = load_digits(return_X_y=True)
  x = x / 16.0
  rng = np.random.default_rng(0)
  test = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    test[idx[: len(idx) // 5]] = True
  return (x[~test], y[~test]), (x[test], y[test])


def text_corpus() -> str:
  """The ``"text"`` corpus: :data:`TEXT_MODULES`' sources, ASCII only.

  Read from the running interpreter's standard library directory (no import,
  no network), joined in the fixed order of :data:`TEXT_MODULES`; non-ASCII
  characters are dropped so that one byte is one character.

  Returns:
    The corpus as one string.

  Example:
    >>> corpus = text_corpus()
    >>> corpus.isascii(), "class ArgumentParser" in corpus
    (True, True)
  """
  stdlib = sysconfig.get_paths()["stdlib"]
  parts = []
  for module in TEXT_MODULES:
    with open(os.path.join(stdlib, module + ".py"), encoding="utf-8") as f:
      parts.append(f.read())
  return "\n".join(parts).encode("ascii", "ignore").decode("ascii")


def text_sha256(corpus: Optional[str] = None) -> str:
  """SHA-256 (hex) of the text corpus (default: :func:`text_corpus`)."""
  corpus = text_corpus() if corpus is None else corpus
  return hashlib.sha256(corpus.encode("ascii")).hexdigest()


def check_text_corpus(corpus: Optional[str] = None) -> str:
  """Returns the corpus hash; raises if it is not :data:`TEXT_SHA256`.

  Results on another corpus cannot be compared with the committed ones, so
  a job that reproduces them checks first.

  Raises:
    CorpusMismatch: the running interpreter's standard library gives another
      corpus (another CPython version); the message is one line.
  """
  digest = text_sha256(corpus)
  if digest != TEXT_SHA256:
    version = ".".join(map(str, sys.version_info[:3]))
    raise CorpusMismatch(
        f"the text corpus of this Python (CPython {version}, "
        f"{sysconfig.get_paths()['stdlib']}) has SHA-256 {digest[:12]}..., "
        f"not {TEXT_SHA256[:12]}... (CPython {TEXT_PYTHON}, the committed "
        f"runs): its numbers would not be comparable; run under CPython "
        f"{TEXT_PYTHON} or pass --no-verify-corpus")
  return digest


def _text(context: int):
  """Train / validation / test windows of the text corpus (see module doc)."""
  codes = np.frombuffer(text_corpus().encode("ascii"), np.uint8)
  blocks = np.arange(len(codes)) // TEXT_BLOCK
  splits = []
  for residues in ((0, 1, 2, 3, 4, 5, 6, 7), (8,), (9,)):
    part = codes[np.isin(blocks % 10, residues)]
    count = (len(part) - 1) // context
    windows = np.lib.stride_tricks.sliding_window_view(
        part[: count * context + 1], context + 1)[::context]
    splits.append((windows[:, :-1], windows[:, 1:]))
  return splits


def load(name: str, *, val_fraction: float = 0.15,
         context: int = 64) -> Dataset:
  """Loads an embedded dataset with train, validation and test splits.

  The splits are deterministic (they do not depend on any run seed), so
  every optimizer and seed sees the same examples. The classification sets
  carve the validation split from their training data; ``"text"`` deals
  corpus blocks to the three splits (module docstring).

  Args:
    name: ``"mnist1d"``, ``"digits"`` or ``"text"``.
    val_fraction: fraction of the training data held out for validation,
      in ``(0, 1)`` (classification sets).
    context: characters per example of ``"text"`` (``>= 1``).

  Returns:
    A :class:`Dataset` with clean labels.

  Raises:
    ValueError: unknown ``name``, ``val_fraction`` outside ``(0, 1)`` or
      ``context < 1``.
    ModuleNotFoundError: a module the dataset needs is not installed (the
      message names it).

  Example:
    >>> ds = load("digits")
    >>> ds.x_train.shape[1], ds.num_classes, ds.input_shape
    (64, 10, (8, 8))
    >>> len(ds.y_train) + len(ds.y_val) + len(ds.y_test)
    1797
    >>> text = load("text", context=32)
    >>> text.x_train.shape[1], text.y_train.shape[1], text.task
    (32, 32, 'language')
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}.")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  if context < 1:
    raise ValueError(f"context must be >= 1, got {context}.")
  i32 = lambda a: np.asarray(a, np.int32)
  if name == "text":
    (x, y), (x_val, y_val), (x_test, y_test) = _text(context)
    version = ".".join(map(str, sys.version_info[:3]))
    return Dataset(name, i32(x), i32(y), i32(x_val), i32(y_val), i32(x_test),
                   i32(y_test), TEXT_VOCAB, (context,), "language",
                   f"CPython {version} stdlib sources: "
                   + ", ".join(m + ".py" for m in TEXT_MODULES)
                   + f" (sha256 {text_sha256()})")
  if name == "mnist1d":
    (x, y), (x_test, y_test) = _mnist1d()
    shape, source = (40,), "mnist1d.data.make_dataset (offline generator)"
  else:
    (x, y), (x_test, y_test) = _digits()
    shape, source = (8, 8), "sklearn.datasets.load_digits (shipped)"
  perm = np.random.default_rng(1).permutation(len(y))
  n_val = int(round(val_fraction * len(y)))
  val, train = perm[:n_val], perm[n_val:]
  f32 = lambda a: np.asarray(a, np.float32)
  return Dataset(name, f32(x[train]), i32(y[train]), f32(x[val]), i32(y[val]),
                 f32(x_test), i32(y_test), int(np.max(y)) + 1, shape,
                 "classify", source)


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
