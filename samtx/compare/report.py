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
           "time_cell", "curve_selection", "plot_curves", "plot_cost",
           "plot_heatmaps", "write_json", "Progress"]

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


def time_cell(row: dict) -> str:
  """The step-time ratio: median (IQR), or its range and '?' if unstable.

  Example:
    >>> time_cell({"relative_time": 2.013, "relative_time_low": 1.98,
    ...            "relative_time_high": 2.05, "timing_unstable": False})
    '2.01x (1.98-2.05)'
    >>> time_cell({"relative_time": 1.1, "relative_time_low": 0.61,
    ...            "relative_time_high": 1.73, "timing_unstable": True})
    '? 0.61-1.73x'
  """
  if "relative_time_low" not in row:  # results of samtx <= 0.2
    return f"{row['relative_time']:.2f}x"
  low, high = row["relative_time_low"], row["relative_time_high"]
  if row["timing_unstable"]:
    return f"? {low:.2f}-{high:.2f}x"
  return f"{row['relative_time']:.2f}x ({low:.2f}-{high:.2f})"


def _columns(task: str) -> List[Tuple[str, Callable[[dict], str]]]:
  """(header, cell) pairs of the table of a task."""
  if task == "language":
    first = [("test bits/char", lambda r: _pm(r, "test_bpc", digits=3)),
             ("next-char acc %", lambda r: _pm(r, "test_acc", 100))]
  else:
    first = [("test acc %", lambda r: _pm(r, "test_acc", 100)),
             ("train loss", lambda r: f"{r['train_loss_mean']:.3f}")]
  return first + [
      ("time/step vs base", time_cell),
      ("grads/step", lambda r: f"{r['grad_evals_per_step']:.3g}"),
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


def _rank(group: dict) -> List[str]:
  """Optimizer names, best mean test metric first."""
  key, _, _ = _headline(group["task"])
  sign = -1.0 if group["task"] == "language" else 1.0
  def score(name):
    value = group["optimizers"][name]["summary"][f"{key}_mean"]
    return -sign * value if np.isfinite(value) else np.inf
  return sorted(group["optimizers"], key=score)


def curve_selection(group: dict, limit: int = 5) -> List[str]:
  """The optimizers a learning-curve plot shows: those that matter.

  The ``limit - 1`` best by mean test metric, plus the base optimizer (the
  one step times are relative to) when it is not among them.
  """
  ranked = _rank(group)
  base = next((n for n, r in group["optimizers"].items()
               if r["summary"]["label"] == group["base"]), ranked[0])
  chosen = ranked[: limit - 1]
  if base not in chosen:
    chosen.append(base)
  elif len(ranked) >= limit:
    chosen.append(ranked[limit - 1])
  return chosen


def plot_curves(group: dict, families: Dict[str, str], path: str) -> None:
  """Test metric and train loss per epoch (mean ± std) of the best few.

  Only :func:`curve_selection`'s optimizers are drawn (the table and the
  JSON hold every one); colours follow the optimizer family.
  """
  plt = _plt()
  key, label, scale = _headline(group["task"])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  shown = curve_selection(group)
  palette = plt.get_cmap("tab10")
  finals = []
  for i, name in enumerate(shown):
    res = group["optimizers"][name]
    curves = res["curves"]
    epochs = np.arange(1, len(curves["train_loss_mean"]) + 1)
    colour = palette(i)
    for ax, metric, factor in ((axes[0], key, scale),
                               (axes[1], "train_loss", 1.0)):
      mean = factor * np.asarray(curves[f"{metric}_mean"])
      std = factor * np.asarray(curves[f"{metric}_std"])
      ax.plot(epochs, mean, "-" if families[name] != "sgd" else "--",
              marker="o" if len(epochs) < 3 else None, color=colour,
              label=res["summary"]["label"], lw=1.6)
      ax.fill_between(epochs, mean - std, mean + std, color=colour,
                      alpha=0.12)
    finals.append(np.asarray(curves["train_loss_mean"]))
  axes[0].set(xlabel="epoch", ylabel=label)
  axes[1].set(xlabel="epoch", ylabel="train loss (training labels)",
              yscale="log")
  ticker = __import__("matplotlib.ticker", fromlist=["ticker"])
  axes[1].yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
  axes[1].yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
  typical = np.median([np.nanmin(c) for c in finals])
  kept = [c for c in finals if np.all(np.isfinite(c))
          and np.max(c[-1:]) < 100 * max(typical, 1e-6)]
  if kept:
    low = max(min(float(np.min(c)) for c in kept), 1e-6)
    axes[1].set_ylim(low / 1.5, 1.5 * max(float(np.max(c)) for c in kept))
  # Zoom the metric axis on the last half of training, where they differ.
  tail = [factor_curve[len(factor_curve) // 2:] for factor_curve in
          (scale * np.asarray(group["optimizers"][n]["curves"][f"{key}_mean"])
           for n in shown)]
  values = np.concatenate(tail)
  values = values[np.isfinite(values)]
  if values.size:
    pad = 0.15 * (values.max() - values.min()) + 1e-9
    axes[0].set_ylim(values.min() - pad, values.max() + pad)
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=9)
  fig.suptitle(f"{group['workload']}, label noise {group['noise']:.0%}: the "
               f"{len(shown)} that matter of {len(group['optimizers'])} "
               f"(mean ± std over {group['seeds']} seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _place_labels(ax, points, labels, fontsize=8.5):
  """Annotates each point with its label where it overlaps nothing.

  Tries offsets around each point, nearest first, and keeps the first whose
  text box (in display coordinates) clears every label already placed and
  every marker; falls back to the least overlapping one, with a leader line.
  Returns the text boxes placed (display coordinates).
  """
  fig = ax.figure
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  marks = [ax.transData.transform(p) for p in points]
  placed = []
  radii = (6, 14, 24, 36, 50)
  angles = np.deg2rad([20, -20, 160, 200, 90, 270, 45, -45, 135, 225, 0, 180])
  order = np.argsort([-p[1] for p in points])
  for i in order:
    best, best_cost = None, np.inf
    for r in radii:
      for a in angles:
        dx, dy = r * np.cos(a), r * np.sin(a)
        ha = "left" if dx > 1 else "right" if dx < -1 else "center"
        va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
        text = ax.annotate(labels[i], points[i], xytext=(dx, dy),
                           textcoords="offset points", ha=ha, va=va,
                           fontsize=fontsize)
        box = text.get_window_extent(renderer).expanded(1.05, 1.15)
        text.remove()
        inside = ax.get_window_extent(renderer)
        cost = sum(box.overlaps(b) for b in placed) * 10
        cost += sum(box.contains(*m) for j, m in enumerate(marks)) * 5
        cost += 0 if (inside.contains(box.x0, box.y0) and
                      inside.contains(box.x1, box.y1)) else 3
        cost += r / 100.0
        if cost < best_cost:
          best, best_cost = (dx, dy, ha, va, box), cost
      if best_cost < 1:
        break
    dx, dy, ha, va, box = best
    far = np.hypot(dx, dy) > 10
    ax.annotate(labels[i], points[i], xytext=(dx, dy),
                textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5")
                if far else None)
    placed.append(box)
  return placed


def plot_cost(group: dict, families: Dict[str, str], path: str) -> None:
  """The Pareto plot: test metric against cost, one point per optimizer.

  Left: against the step time relative to the base optimizer (horizontal
  bar: interquartile range of the round-robin repeats; a hollow marker: the
  repeats disagree, see :func:`samtx.compare.train.timing_summary`); right:
  against gradient evaluations per step. Vertical bars: ± std over seeds.
  The frontier (no other point is both cheaper and better) is drawn.
  """
  plt = _plt()
  key, label, scale = _headline(group["task"])
  better = (lambda a, b: a < b) if group["task"] == "language" else (
      lambda a, b: a > b)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
  rows = [(name, res["summary"]) for name, res in group["optimizers"].items()
          if np.isfinite(res["summary"][f"{key}_mean"])]
  for ax, xkey in zip(axes, ("relative_time", "grad_evals_per_step")):
    points, labels = [], []
    for name, row in rows:
      x, y = float(row[xkey]), scale * row[f"{key}_mean"]
      colour = _COLOURS[families[name]]
      xerr = None
      unstable = xkey == "relative_time" and row.get("timing_unstable")
      if xkey == "relative_time" and "relative_time_low" in row:
        xerr = [[x - row["relative_time_low"]],
                [row["relative_time_high"] - x]]
      ax.errorbar(x, y, yerr=scale * row[f"{key}_std"], xerr=xerr, fmt="o",
                  ms=6, capsize=3, color=colour,
                  mfc="white" if unstable else colour)
      points.append((x, y))
      labels.append(row["label"] + (" (time?)" if unstable else ""))
    frontier = sorted(points)
    best_y, front = None, []
    for x, y in frontier:
      if best_y is None or better(y, best_y):
        front.append((x, y))
        best_y = y
    if len(front) > 1:
      ax.plot(*zip(*front), "-", color="0.6", lw=1, zorder=0)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.12)
    # Frame the means: one erratic optimizer's error bar may leave the plot
    # rather than squash every other point together.
    ys = np.array([p[1] for p in points])
    stds = np.array([scale * row[f"{key}_std"] for _, row in rows])
    reach = 3 * float(np.median(stds)) + 1e-9
    ax.set_ylim(ys.min() - reach, ys.max() + reach)
    _place_labels(ax, points, labels)
  axes[0].set(xlabel=f"time per step relative to {group['base']} "
                     f"(median, IQR)", ylabel=f"{label} (mean ± std)")
  axes[1].set(xlabel="gradient evaluations per step (measured)")
  names = {"sgd": "SGD-based", "adaptive": "Adam-based",
           "lightsam": "LightSAM"}
  shown = sorted({families[n] for n, _ in rows})
  axes[1].legend(handles=[
      plt.Line2D([], [], marker="o", ls="", color=_COLOURS[f],
                 label=names[f]) for f in shown], fontsize=8,
                 loc="lower right")
  direction = "lower" if group["task"] == "language" else "higher"
  fig.suptitle(f"{group['workload']}, label noise {group['noise']:.0%}, "
               f"{group['seeds']} seeds: {direction} is better, left is "
               f"cheaper; grey line: the frontier")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
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


def _line(text: str) -> None:
  # One write with its newline: print() writes the end separately, and a
  # Ctrl-C between the two would glue the interruption message to this line.
  sys.stderr.write(text + "\n")
  sys.stderr.flush()


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
      _line(text)

  def note(self, text: str) -> None:
    """A message that must be seen (e.g. that runs were resumed)."""
    if self.bar is not None:
      self.bar.write(text, file=sys.stderr)
    else:
      _line(text)

  def __call__(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

