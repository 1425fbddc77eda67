"""Tables, plots, JSON and progress output of ``samtx compare``.

A *row* summarises one optimizer on one workload and noise level: metric
means and sample standard deviations over seeds (``<metric>_mean``,
``<metric>_std``), step time relative to the workload's base optimizer,
gradient evaluations per step and the hyper-parameters.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Dict, List, Tuple

import numpy as np

__all__ = ["mean_std", "summary_row", "format_table", "markdown_table",
           "plot_curves", "plot_cost", "plot_heatmaps", "write_json",
           "Progress"]

SUMMARY_METRICS = ("test_acc", "val_acc", "test_loss", "val_loss",
                   "train_loss", "train_acc", "top_eig", "gap", "test_bpc")


def mean_std(values) -> Tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value).

  Example:
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
  """
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values, ddof=1)
                                       if values.size > 1 else 0.0)


def summary_row(final: Dict[str, np.ndarray], **fields) -> dict:
  """A table row: ``fields`` plus mean and std of each final metric."""
  row = dict(fields)
  for key in SUMMARY_METRICS:
    if key in final:
      row[f"{key}_mean"], row[f"{key}_std"] = mean_std(final[key])
  return row


def _pm(row, key, scale=1.0, digits=1) -> str:
  return (f"{scale * row[key + '_mean']:.{digits}f} ± "
          f"{scale * row[key + '_std']:.{digits}f}")


def _columns(task: str) -> List[Tuple[str, Callable[[dict], str]]]:
  """(header, cell) pairs of the table of a task."""
  if task == "language":
    first = [("test bits/char", lambda r: _pm(r, "test_bpc", digits=3)),
             ("next-char acc %", lambda r: _pm(r, "test_acc", 100))]
  else:
    first = [("test acc %", lambda r: _pm(r, "test_acc", 100)),
             ("train loss", lambda r: f"{r['train_loss_mean']:.3f}")]
  return first + [
      ("time/step vs base", lambda r: f"{r['relative_time']:.2f}x"),
      ("grads/step", lambda r: str(r["grad_evals_per_step"])),
      ("top Hessian eig", lambda r: _pm(r, "top_eig", digits=2)),
      ("lr", lambda r: f"{r['lr']:.3g}"),
      ("rho", lambda r: f"{r['rho']:.3g}")]


def format_table(rows: List[dict], task: str = "classify") -> str:
  """The comparison table as aligned plain text, one line per optimizer."""
  columns = [("optimizer", lambda r: r["label"])] + _columns(task)
  cells = [[cell(r) for _, cell in columns] for r in rows]
  widths = [max([len(h)] + [len(c[i]) for c in cells])
            for i, (h, _) in enumerate(columns)]
  line = lambda items: " ".join(
      (s.ljust(w) if i == 0 else s.rjust(w))
      for i, (s, w) in enumerate(zip(items, widths)))
  head = line([h for h, _ in columns])
  return "\n".join([head, "-" * len(head)] + [line(c) for c in cells])


def markdown_table(rows: List[dict], task: str = "classify") -> str:
  """The comparison table in Markdown."""
  columns = [("optimizer", lambda r: r["label"])] + _columns(task)
  lines = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |"
            for r in rows]
  return "\n".join(lines)


def _plt():
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as err:  # pragma: no cover
    raise ImportError("plots need matplotlib: pip install 'samtx[demo]'"
                      ) from err
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


_COLOURS = {"sgd": "tab:blue", "adaptive": "tab:orange",
            "lightsam": "tab:green"}
_STYLES = ("-", "--", ":", "-.")


def _headline(task: str) -> Tuple[str, str, float]:
  """The curve key, its axis label and scale of a task's main metric."""
  if task == "language":
    return "test_bpc", "test bits per character", 1.0
  return "test_acc", "test accuracy % (clean labels)", 100.0


def plot_curves(group: dict, families: Dict[str, str], path: str) -> None:
  """Main test metric and train loss per epoch (mean ± std over seeds)."""
  plt = _plt()
  key, label, scale = _headline(group["task"])
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  seen: Dict[str, int] = {}
  finals = []
  for name, res in group["optimizers"].items():
    family = families[name]
    style = _STYLES[seen.get(family, 0) % len(_STYLES)]
    seen[family] = seen.get(family, 0) + 1
    curves = res["curves"]
    epochs = np.arange(1, len(curves["train_loss_mean"]) + 1)
    for ax, metric, factor in ((axes[0], key, scale),
                               (axes[1], "train_loss", 1.0)):
      mean = factor * np.asarray(curves[f"{metric}_mean"])
      std = factor * np.asarray(curves[f"{metric}_std"])
      ax.plot(epochs, mean, style, marker="o" if len(epochs) < 3 else None,
              color=_COLOURS[family], label=res["summary"]["label"], lw=1.4)
      ax.fill_between(epochs, mean - std, mean + std, color=_COLOURS[family],
                      alpha=0.08)
    finals.append(np.asarray(curves["train_loss_mean"]))
  axes[0].set(xlabel="epoch", ylabel=label)
  axes[1].set(xlabel="epoch", ylabel="train loss (training labels)",
              yscale="log")
  # Keep the loss axis readable when some runs diverged (their curves leave
  # the plot; the table and JSON still report them).
  typical = np.median([np.nanmin(c) for c in finals])
  kept = [c for c in finals if np.all(np.isfinite(c))
          and np.max(c[-1:]) < 100 * max(typical, 1e-6)]
  if kept:
    low = max(min(float(np.min(c)) for c in kept), 1e-6)
    axes[1].set_ylim(low / 1.5, 1.5 * max(float(np.max(c)) for c in kept))
  axes[0].legend(fontsize=8, ncol=2)
  fig.suptitle(f"{group['workload']}, label noise {group['noise']:.0%}, "
               f"{group['seeds']} seeds (mean ± std)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_cost(group: dict, families: Dict[str, str], path: str) -> None:
  """Main test metric (mean ± std) against step time relative to the base."""
  plt = _plt()
  key, label, scale = _headline(group["task"])
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for name, res in group["optimizers"].items():
    row = res["summary"]
    y = scale * row[f"{key}_mean"]
    ax.errorbar(row["relative_time"], y, yerr=scale * row[f"{key}_std"],
                fmt="o", capsize=3, color=_COLOURS[families[name]])
    ax.annotate(row["label"], (row["relative_time"], y),
                textcoords="offset points", xytext=(5, 4), fontsize=8)
  ax.set(xlabel=f"wall-clock per step relative to {group['base']}",
         ylabel=f"{label} (mean ± std)",
         title=f"{group['workload']}, label noise {group['noise']:.0%}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_heatmaps(result: dict, path: str) -> None:
  """One heat map of test accuracy over (lr, rho) per optimizer."""
  plt = _plt()
  items = list(result["optimizers"].values())
  fig, axes = plt.subplots(1, len(items), figsize=(5.2 * len(items), 4.2),
                           squeeze=False)
  fig.subplots_adjust(wspace=0.45)
  for ax, res in zip(axes[0], items):
    mean = 100 * np.asarray(res["test_acc_mean"])
    im = ax.imshow(mean, origin="lower", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(res["rho"])),
                  [f"{r:.2g}" for r in res["rho"]], rotation=45)
    ax.set_yticks(range(len(res["lr"])), [f"{r:.2g}" for r in res["lr"]])
    for i in range(mean.shape[0]):
      for j in range(mean.shape[1]):
        ax.text(j, i, f"{mean[i, j]:.0f}", ha="center", va="center",
                color="w" if mean[i, j] < 60 else "k", fontsize=8)
    ax.set(xlabel="rho", ylabel="learning rate",
           title=f"{res['label']}: spread {100 * res['spread']:.1f} pts")
  fig.colorbar(im, ax=axes[0].tolist(), label="test accuracy %")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def write_json(obj, path: str) -> None:
  """Writes ``obj`` (numpy values allowed) as indented JSON."""
  def default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
    raise TypeError(type(o))
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, default=default)


class Progress:
  """A tqdm bar over epochs of all runs (plain messages without tqdm or off).

  Args:
    total: epochs of all runs of the job.
    enabled: show the bar; when off, only ``describe`` and ``note`` print.
  """

  def __init__(self, total: int, enabled: bool):
    self.bar = None
    self.enabled = enabled
    if enabled:
      try:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True,
                        file=sys.stderr)
      except ImportError:  # pragma: no cover
        self.bar = None

  def describe(self, text: str) -> None:
    """Names the current stage."""
    if self.bar is not None:
      self.bar.set_description(text)
    else:
      print(text, file=sys.stderr, flush=True)

  def note(self, text: str) -> None:
    """A message that must be seen (e.g. that runs were resumed)."""
    if self.bar is not None:
      self.bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def __call__(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

