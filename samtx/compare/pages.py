"""The results pages, generated from the committed ``results.json`` files.

Every number on the results pages and in the README's results table comes
from here: ``python -m samtx.compare.pages`` reads
``benchmarks/results/compare/<workload>/results.json`` and rewrites each
generated block of the pages in :data:`PAGES`, the Markdown between::

  <!-- BEGIN GENERATED name (python -m samtx.compare.pages) -->
  <!-- END GENERATED name -->

The prose around the blocks is written by hand and carries no measured
number. ``--check`` rewrites nothing and exits 1 when a page differs from
what the results give (the test suite runs it); ``--plots`` also redraws the
Pareto and learning-curve PNGs from the JSON.

The rules that turn numbers into words are here too, so the pages cannot
disagree with each other: two optimizers are *tied* when their mean test
metrics differ by less than the larger of their two seed standard
deviations (:func:`compare`); the *recommendation* of a regime is the
cheapest optimizer tied with the best mean (:func:`recommend`).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["PAGES", "WORKLOADS", "load_results", "compare", "recommend",
           "render", "main"]

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = pathlib.Path("benchmarks") / "results" / "compare"
# The workloads of the committed results, in the order the pages list them.
WORKLOADS = ("text-transformer", "mnist1d-cnn", "digits-mlp")
# Pages holding generated blocks (relative to the repository root).
PAGES = ("README.md", "docs/getting_started.md", "docs/results/compare.md",
         "docs/results/which_optimizer.md", "docs/results/paper_claims.md")

_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED (?P<name>[\w:.-]+) \(python -m "
    r"samtx\.compare\.pages\) -->\n)(?P<body>.*?)(<!-- END GENERATED "
    r"(?P=name) -->)", re.S)

_KIND = {"text-transformer": "small transformer LM",
         "mnist1d-cnn": "BatchNorm CNN",
         "digits-mlp": "MLP"}
_DATA = {"text-transformer": "Python source characters",
         "mnist1d-cnn": "MNIST-1D", "digits-mlp": "8x8 digits"}


def load_results(root: pathlib.Path = ROOT) -> Dict[str, dict]:
  """``workload -> results.json`` for every committed workload."""
  out = {}
  for name in WORKLOADS:
    path = root / RESULTS / name / "results.json"
    if path.exists():
      with open(path) as f:
        out[name] = json.load(f)
  return out


# ---------------------------------------------------------------- numbers


def _headline(task: str) -> Tuple[str, float, int, str]:
  """Metric key, display scale, decimals and unit of a task."""
  if task == "language":
    return "test_bpc", 1.0, 3, " bits/char"
  return "test_acc", 100.0, 1, " %"


def _pm(row: dict, task: str, unit: bool = False) -> str:
  key, scale, digits, suffix = _headline(task)
  return (f"{scale * row[key + '_mean']:.{digits}f} ± "
          f"{scale * row[key + '_std']:.{digits}f}" + (suffix if unit else ""))


def _lower_is_better(task: str) -> bool:
  return task == "language"


def compare(a: dict, b: dict, task: str) -> str:
  """``"better"``, ``"worse"`` or ``"tied"``: row ``a`` against row ``b``.

  Tied when the means differ by less than the larger of the two seed
  standard deviations.

  Example:
    >>> a = {"test_acc_mean": 0.95, "test_acc_std": 0.01}
    >>> b = {"test_acc_mean": 0.93, "test_acc_std": 0.01}
    >>> compare(a, b, "classify"), compare(b, a, "classify")
    ('better', 'worse')
  """
  key = _headline(task)[0]
  diff = a[key + "_mean"] - b[key + "_mean"]
  if _lower_is_better(task):
    diff = -diff
  spread = max(a[key + "_std"], b[key + "_std"])
  if not math.isfinite(diff):
    return "worse" if not math.isfinite(a[key + "_mean"]) else "better"
  if abs(diff) <= spread:
    return "tied"
  return "better" if diff > 0 else "worse"


def _rows(group: dict) -> Dict[str, dict]:
  return {name: res["summary"] for name, res in group["optimizers"].items()}


def _ranked(group: dict) -> List[str]:
  key = _headline(group["task"])[0]
  sign = 1.0 if _lower_is_better(group["task"]) else -1.0
  rows = _rows(group)
  return sorted(rows, key=lambda n: (sign * rows[n][key + "_mean"]
                                     if math.isfinite(rows[n][key + "_mean"])
                                     else math.inf))


# The analysis form of AdaSAM is measured, never recommended (its note says
# so in every table).
_NOT_RECOMMENDED = frozenset({"adasam_delayed"})


def _cost(row: dict) -> Tuple[float, float]:
  """Sort key of the cost of a step: gradients first, then measured time."""
  time = row["relative_time"] if not row.get("timing_unstable") else math.inf
  return round(row["grad_evals_per_step"], 2), time


def _same_time(a: dict, b: dict) -> bool:
  """Whether two step times cannot be told apart: their interquartile
  ranges overlap (a time whose repeats disagree is never equal)."""
  if a.get("timing_unstable") or b.get("timing_unstable"):
    return False
  return (a["relative_time_low"] <= b["relative_time_high"]
          and b["relative_time_low"] <= a["relative_time_high"])


def recommend(group: dict, max_grads: Optional[float] = None
              ) -> Tuple[str, List[str], str]:
  """The recommendation of a regime: ``(pick, tied, best)``.

  ``best`` has the best mean test metric among the optimizers within the
  gradient budget ``max_grads`` (all without one; the analysis form of
  AdaSAM is never recommended); ``tied`` are those tied
  with it (:func:`compare`), ``best`` included; ``pick`` is the cheapest of
  ``tied``: fewest gradient evaluations per step, then the shortest
  measured step time, where step times whose interquartile ranges overlap
  count as equal and the better mean decides among them (a time
  difference the repeats cannot resolve does not outrank the metric).
  """
  rows = _rows(group)
  names = [n for n in _ranked(group) if n not in _NOT_RECOMMENDED and (
      max_grads is None or rows[n]["grad_evals_per_step"] <= max_grads)]
  best = names[0]
  tied = [n for n in names
          if compare(rows[n], rows[best], group["task"]) != "worse"]
  fastest = min(tied, key=lambda n: _cost(rows[n]))
  # ``tied`` is in order of the mean metric, best first.
  pick = next(n for n in tied if n == fastest or (
      _cost(rows[n])[0] == _cost(rows[fastest])[0]
      and _same_time(rows[n], rows[fastest])))
  return pick, tied, best


def _cost_text(row: dict, base: str) -> str:
  """Gradients per step and the step time relative to the base."""
  grads = row["grad_evals_per_step"]
  gradients = f"{grads:.3g} gradient{'' if grads == 1 else 's'}"
  if row.get("timing_unstable"):
    return (f"{gradients}; time vs {base} not measured (its repeats "
            f"disagree: {row['relative_time_low']:.2f}-"
            f"{row['relative_time_high']:.2f}x)")
  return f"{row['relative_time']:.2f}x {base}'s step, {gradients}"


def _label(group: dict, name: str) -> str:
  return group["optimizers"][name]["summary"]["label"]


def _named(group: dict, name: str, unit: bool = False) -> str:
  """``"<label> <mean ± std>"`` of one optimizer of a group."""
  return (f"{_label(group, name)} "
          f"{_pm(_rows(group)[name], group['task'], unit)}")


def _detail(result: dict, group: dict) -> str:
  """What sets a regime apart within its workload: the label noise, or the
  training length of the language model."""
  if group["task"] == "language":
    return f"{result['settings']['steps']} steps"
  return "clean labels" if group["noise"] == 0 else (
      f"{group['noise']:.0%} label noise")


def _regime(result: dict, group: dict) -> str:
  return f"{_KIND[result['workload']]}, {_detail(result, group)}"


def _groups(results: Dict[str, dict]):
  for name in WORKLOADS:
    if name in results:
      for group in results[name]["groups"]:
        yield results[name], group


# ---------------------------------------------------------------- blocks


def _block_recommendations(results: Dict[str, dict]) -> str:
  lines = [
      "| model, regime | use | test metric (mean ± std) | cost per step "
      "| tied with the best (within spread) | best mean | best with one "
      "gradient per step |",
      "|---|---|---|---|---|---|---|"]
  for result, group in _groups(results):
    rows = _rows(group)
    pick, tied, best = recommend(group)
    one_pick, _, _ = recommend(group, max_grads=1.0)
    lines.append(
        f"| {_regime(result, group)} ({group['seeds']} seeds) "
        f"| **{_label(group, pick)}** "
        f"| {_pm(rows[pick], group['task'], True)} "
        f"| {_cost_text(rows[pick], group['base'])} "
        f"| {', '.join(_label(group, n) for n in tied)} "
        f"| {_named(group, best)} | {_named(group, one_pick)} |")
  return "\n".join(lines)


def _block_readme(results: Dict[str, dict]) -> str:
  lines = ["| workload, regime | use: test metric (mean ± std) | cost per "
           "step | base optimizer |", "|---|---|---|---|"]
  for result, group in _groups(results):
    rows = _rows(group)
    pick, _, _ = recommend(group)
    base = next(n for n, r in rows.items() if r["label"] == group["base"])
    lines.append(
        f"| {_KIND[result['workload']]} on {_DATA[result['workload']]}, "
        f"{_detail(result, group)} "
        f"| {_named(group, pick, True)} "
        f"| {_cost_text(rows[pick], group['base'])} "
        f"| {_named(group, base)} |")
  return "\n".join(lines)


def _block_choice(results: Dict[str, dict]) -> str:
  lines = []
  for result, group in _groups(results):
    rows = _rows(group)
    pick, tied, _ = recommend(group)
    others = [n for n in tied if n != pick]
    lines.append(
        f"- {_regime(result, group)}: **{_label(group, pick)}** "
        f"({_pm(rows[pick], group['task'], True)}, "
        f"{_cost_text(rows[pick], group['base'])})"
        + (f"; tied: {', '.join(_label(group, n) for n in others)}"
           if others else ""))
  return "\n".join(lines)


def _block_workloads(results: Dict[str, dict]) -> str:
  lines = ["| workload | model | parameters | training | label noise | "
           "seeds (tune / eval) | optimizers | protocol time |",
           "|---|---|---|---|---|---|---|---|"]
  for name in WORKLOADS:
    if name not in results:
      continue
    r = results[name]
    s = r["settings"]
    w = s["workload"]
    options = ", ".join(f"{k} {v}" for k, v in w["model_options"])
    schedule = ("constant lr" if w.get("schedule", "constant") == "constant"
                else "5% warm-up, cosine to lr/10")
    steps = s.get("steps")
    training = (f"{s['epochs']} epochs" + (f" = {steps} steps" if steps
                                           else "")
                + f", batch {s['batch_size']}, {schedule}")
    noise = ", ".join(f"{n:.0%}" for n in s["noise"])
    seconds = r.get("protocol_seconds", r["wall_seconds"])
    lines.append(
        f"| `{name}` | {w['model']} ({options}) "
        f"| {r.get('parameters', '–')} | {training} | {noise} "
        f"| {len(s['tune_seeds'])} / {len(s['seeds'])} "
        f"| {len(r['groups'][0]['optimizers'])} "
        f"| {seconds / 60:.0f} min |")
  return "\n".join(lines)


def _fmt(x: float) -> str:
  return f"{x:.3g}"


def _block_protocol(result: dict) -> str:
  """Tuning grids tried and winners, per optimizer and noise level."""
  task = result["task"]
  lines = [f"Tuning: validation {'loss' if task == 'language' else 'accuracy'}"
           f" at the last epoch, mean of {len(result['settings']['tune_seeds'])}"
           f" seeds; a winner on the edge of its grid is marked ⚠.", "",
           "| optimizer | label noise | learning rates tried | rho (λ) tried "
           "| winner (lr, rho) |", "|---|---|---|---|---|"]
  labels = {n: res["summary"]["label"] for n, res in
            result["groups"][0]["optimizers"].items()}
  for entry in result["tuning"]:
    lrs = sorted({g["lr"] for g in entry["grid"]})
    rhos = sorted({g["rho"] for g in entry["grid"]})
    lr, rho = entry["best"]
    edge = ((len(lrs) > 1 and lr in (lrs[0], lrs[-1])) or
            (len(rhos) > 1 and rho in (rhos[0], rhos[-1])))
    lines.append(
        f"| {labels.get(entry['optimizer'], entry['optimizer'])} "
        f"| {entry['noise']:.0%} | {', '.join(map(_fmt, lrs))} "
        f"| {', '.join(map(_fmt, rhos))} "
        f"| {_fmt(lr)}, {_fmt(rho)}{' ⚠' if edge else ''} |")
  if not result["tuning"]:
    lines = ["No sweep in this run: the committed tuned values were used."]
  return "\n".join(lines)


def _block_tables(result: dict) -> str:
  parts = []
  folder = f"../../{RESULTS.as_posix()}/{result['workload']}"
  for group in result["groups"]:
    parts.append(f"**{_regime(result, group)}**, {group['seeds']} seeds, "
                 f"time per step relative to {group['base']} (median and "
                 f"interquartile range of the round-robin repeats; `?`: the "
                 f"repeats disagree):")
    parts.append("")
    parts.append(group["markdown"])
    parts.append("")
    parts.append(f"![Pareto plot]({folder}/{group['plots']['cost']})")
    parts.append(f"![learning curves]({folder}/{group['plots']['curves']})")
    parts.append("")
  notes = result.get("notes", {})
  labels = {n: res["summary"]["label"] for n, res in
            result["groups"][0]["optimizers"].items()}
  for name, note in notes.items():
    parts.append(f"- {labels.get(name, name)}: {note}")
  return "\n".join(parts).rstrip()


def _block_run(result: dict) -> str:
  env = result["environment"]
  argv = " ".join(["samtx"] + env["argv"][1:])
  seconds = result.get("protocol_seconds", result["wall_seconds"])
  resumed = len(result.get("resumed", []))
  return (f"```\n{argv}\n```\n\n"
          f"Protocol time: {seconds / 60:.0f} min of training and timing on "
          f"{env['backend'].upper()} (jax {env['jax']}, Python "
          f"{env['python']}), summed over every batch of runs"
          + (f" ({resumed} batches were resumed from earlier invocations of "
             f"the same command; the last invocation took "
             f"{result['wall_seconds'] / 60:.0f} min)" if resumed else "")
          + f". Data: {result['data_source']}.")


def _find(group: dict, *names: str) -> Optional[str]:
  return next((n for n in names if n in group["optimizers"]), None)


# (claim, method names, baseline names, what it compares: "metric" (the
# method beats the baseline), "matches" (it is tied or better), "sharpness")
_CLAIMS = (
    ("SAM generalises better than its base optimizer (Foret et al., "
     "[2010.01412](https://arxiv.org/abs/2010.01412))",
     ("sam", "sam_adamw"), ("sgd", "adamw"), "metric"),
    ("SAM finds flatter minima (smaller top Hessian eigenvalue)",
     ("sam", "sam_adamw"), ("sgd", "adamw"), "sharpness"),
    ("MSAM matches or beats SAM with one gradient per step (Becker et al., "
     "[2401.12033](https://arxiv.org/abs/2401.12033))",
     ("msam", "msam_adamw"), ("sam", "sam_adamw"), "matches"),
    ("AdaSAM beats its base rule and Adam (Sun et al., "
     "[2303.00565](https://arxiv.org/abs/2303.00565))",
     ("adasam",), ("amsgrad", "adam", "adamw"), "metric"),
    ("LookSAM matches SAM at 1 + 1/k gradients per step (Liu et al., "
     "[2203.02714](https://arxiv.org/abs/2203.02714))",
     ("looksam", "looksam_adamw"), ("sam", "sam_adamw"), "matches"),
    ("Friendly-SAM beats SAM (Li et al., "
     "[2403.12350](https://arxiv.org/abs/2403.12350))",
     ("friendly_sam",), ("sam",), "metric"),
    ("SAF matches SAM at the base optimizer's cost (Du et al., "
     "[2205.14083](https://arxiv.org/abs/2205.14083))",
     ("saf",), ("sam",), "matches"),
    ("MESA matches SAM at the base optimizer's cost (Du et al., "
     "[2205.14083](https://arxiv.org/abs/2205.14083))",
     ("mesa", "mesa_adamw"), ("sam", "sam_adamw"), "matches"),
    ("GPA beats AdamW (Defazio et al., "
     "[2512.17131](https://arxiv.org/abs/2512.17131))",
     ("gpa",), ("adamw",), "metric"),
)

_VERDICT = {"better": "**Yes**", "tied": "**No** (tied)",
            "worse": "**No** (worse)"}
# A claim that a method *matches* its baseline holds when the seeds cannot
# tell them apart, and when the method is better.
_MATCHES = {"better": "**Yes** (better)", "tied": "**Yes** (tied)",
            "worse": "**No** (worse)"}


def _claim_cell(group: dict, methods, bases, what: str) -> Optional[str]:
  method, base = _find(group, *methods), _find(group, *bases)
  if method is None or base is None:
    return None
  rows = _rows(group)
  a, b = rows[method], rows[base]
  if what == "sharpness":
    verdict = ("**Yes**" if a["top_eig_mean"] + a["top_eig_std"]
               < b["top_eig_mean"] - b["top_eig_std"] else "**No**")
    return (f"{verdict}: {a['label']} {a['top_eig_mean']:.3g} ± "
            f"{a['top_eig_std']:.2g} vs {b['label']} {b['top_eig_mean']:.3g}"
            f" ± {b['top_eig_std']:.2g}")
  verdict = (_MATCHES if what == "matches" else _VERDICT)[
      compare(a, b, group["task"])]
  return (f"{verdict}: {a['label']} {_pm(a, group['task'])} vs "
          f"{b['label']} {_pm(b, group['task'])}")


def _block_claims(results: Dict[str, dict]) -> str:
  regimes = list(_groups(results))
  head = "| claim | " + " | ".join(_regime(r, g) for r, g in regimes) + " |"
  lines = [head, "|---" * (len(regimes) + 1) + "|"]
  for claim, methods, bases, what in _CLAIMS:
    cells = [_claim_cell(g, methods, bases, what) for _, g in regimes]
    if all(c is None for c in cells):
      continue
    lines.append(f"| {claim} | " + " | ".join(c or "not run" for c in cells)
                 + " |")
  return "\n".join(lines)


def blocks(results: Dict[str, dict]) -> Dict[str, str]:
  """Every generated block's Markdown, by name."""
  out = {"recommendations": _block_recommendations(results),
         "readme-results": _block_readme(results),
         "choice": _block_choice(results),
         "workloads": _block_workloads(results),
         "claims": _block_claims(results)}
  for name, result in results.items():
    out[f"protocol:{name}"] = _block_protocol(result)
    out[f"tables:{name}"] = _block_tables(result)
    out[f"run:{name}"] = _block_run(result)
  return out


def render(text: str, generated: Dict[str, str], page: str = "",
           allow_missing: bool = False) -> str:
  """``text`` with each generated block's body replaced.

  Raises:
    KeyError: a block names nothing the results can fill (unless
      ``allow_missing``: then it says so).
  """
  def replace(match):
    name = match.group("name")
    if name not in generated and allow_missing:
      return (match.group(1) + "*No committed results for this block yet.*\n"
              + match.group(4))
    if name not in generated:
      raise KeyError(f"{page}: generated block {name!r} has no source (is "
                     f"its results.json committed?)")
    return match.group(1) + generated[name].rstrip("\n") + "\n" + match.group(4)
  return _BLOCK.sub(replace, text)


def redraw_plots(results: Dict[str, dict], root: pathlib.Path = ROOT) -> None:
  """Redraws each workload's Pareto and learning-curve PNGs from its JSON."""
  from samtx.compare import report  # pylint: disable=g-import-not-at-top
  for name, result in results.items():
    families = {n: _family(n) for n in result["groups"][0]["optimizers"]}
    for group in result["groups"]:
      folder = root / RESULTS / name
      report.plot_cost(group, families, str(folder / group["plots"]["cost"]))
      report.plot_curves(group, families,
                         str(folder / group["plots"]["curves"]))


def _family(name: str) -> str:
  from samtx.compare.optimizers import SPECS  # pylint: disable=g-import-not-at-top
  return SPECS[name].family if name in SPECS else "adaptive"


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Regenerates (or, with ``--check``, checks) the generated blocks."""
  parser = argparse.ArgumentParser(
      prog="python -m samtx.compare.pages",
      description="Regenerate the results pages from the committed "
                  "results.json files.")
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if a page is stale")
  parser.add_argument("--plots", action="store_true",
                      help="also redraw the PNG plots from the JSON")
  parser.add_argument("--root", default=str(ROOT),
                      help="repository root")
  parser.add_argument("--allow-missing", action="store_true",
                      help="fill the blocks of workloads without results "
                           "with a placeholder (while a run is going)")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  results = load_results(root)
  generated = blocks(results)
  stale = []
  for page in PAGES:
    path = root / page
    text = path.read_text()
    new = render(text, generated, page, args.allow_missing)
    if new != text:
      stale.append(page)
      if not args.check:
        path.write_text(new)
  if args.plots and not args.check:
    redraw_plots(results, root)
  if args.check and stale:
    sys.stderr.write("stale generated blocks in " + ", ".join(stale)
                     + ": run python -m samtx.compare.pages\n")
    return 1
  for page in stale if not args.check else []:
    print(f"updated {page}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
