"""The results pages cannot drift from the committed results.json files."""

import itertools

import numpy as np
import pytest

from samtx.compare import pages
from samtx.compare import report


def test_the_committed_pages_are_what_the_results_give(capsys):
  # Regenerates every generated block (README, getting started, compare,
  # which optimizer, paper claims) from benchmarks/results/compare/ and
  # fails on any difference.
  assert pages.main(["--check"]) == 0, capsys.readouterr().err


def test_every_generated_block_has_a_source():
  generated = pages.blocks(pages.load_results())
  for page in pages.PAGES:
    text = (pages.ROOT / page).read_text()
    names = [m.group("name") for m in pages._BLOCK.finditer(text)]
    assert names, f"{page} has no generated block"
    for name in names:
      assert name in generated, (page, name)


def _group(task, rows, base="SGD"):
  """A results group with summary rows ``name -> (mean, std, grads, time)``."""
  key = "test_bpc" if task == "language" else "test_acc"
  optimizers = {}
  for name, (mean, std, grads, time) in rows.items():
    optimizers[name] = {"summary": {
        "label": name.upper(), f"{key}_mean": mean, f"{key}_std": std,
        "grad_evals_per_step": grads, "relative_time": time,
        "relative_time_low": time, "relative_time_high": time,
        "timing_unstable": False}}
  return {"task": task, "base": base, "optimizers": optimizers, "noise": 0.0,
          "seeds": 5}


def test_the_recommendation_is_the_cheapest_optimizer_tied_with_the_best():
  group = _group("classify", {
      "sgd": (0.900, 0.010, 1, 1.0),
      "sam": (0.950, 0.010, 2, 2.0),    # best mean
      "msam": (0.942, 0.009, 1, 1.05),  # within SAM's std: tied, cheaper
      "asam": (0.930, 0.010, 2, 2.1),   # 2 points below: worse
  })
  pick, tied, best = pages.recommend(group)
  assert (pick, best) == ("msam", "sam")
  assert sorted(tied) == ["msam", "sam"]
  # Within one gradient per step, MSAM is the best and the pick.
  assert pages.recommend(group, max_grads=1.0) == ("msam", ["msam"], "msam")


def test_lower_is_better_for_bits_per_character():
  group = _group("language", {
      "adam": (2.30, 0.01, 1, 1.0), "sam_adamw": (2.25, 0.01, 2, 2.0),
      "msam_adamw": (2.31, 0.02, 1, 1.0)}, base="Adam")
  pick, tied, best = pages.recommend(group)
  assert (pick, tied, best) == ("sam_adamw", ["sam_adamw"], "sam_adamw")
  rows = pages._rows(group)
  assert pages.compare(rows["msam_adamw"], rows["adam"], "language") == "tied"
  assert pages.compare(rows["adam"], rows["sam_adamw"], "language") == "worse"


def test_an_unstable_time_is_not_used_to_break_a_tie():
  group = _group("classify", {"a": (0.9, 0.01, 1, 0.5),
                              "b": (0.9, 0.01, 1, 1.0)})
  group["optimizers"]["a"]["summary"]["timing_unstable"] = True
  assert pages.recommend(group)[0] == "b"


def test_a_time_difference_within_the_timing_spread_does_not_decide():
  # Both one gradient, tied on the metric; "b" is 0.01x faster by the
  # median but the interquartile ranges overlap: the better mean ("a")
  # is the pick. Once the ranges separate, the faster one is.
  group = _group("language", {"a": (2.173, 0.012, 1, 1.03),
                              "b": (2.183, 0.021, 1, 1.02)}, base="Adam")
  rows = group["optimizers"]
  rows["a"]["summary"].update(relative_time_low=1.01, relative_time_high=1.05)
  rows["b"]["summary"].update(relative_time_low=0.98, relative_time_high=1.03)
  assert pages.recommend(group) == ("a", ["a", "b"], "a")
  rows["b"]["summary"].update(relative_time_low=0.95, relative_time_high=1.0)
  assert pages.recommend(group)[0] == "b"
  # Fewer gradients still come first, whatever the times.
  rows["a"]["summary"].update(grad_evals_per_step=2)
  rows["b"]["summary"].update(relative_time_low=0.98, relative_time_high=1.03)
  assert pages.recommend(group)[0] == "b"


def test_render_replaces_only_the_block_bodies():
  text = ("intro 1.0\n<!-- BEGIN GENERATED t (python -m samtx.compare.pages)"
          " -->\nold 9.9\n<!-- END GENERATED t -->\noutro\n")
  assert pages.render(text, {"t": "new 2.0"}) == text.replace("old 9.9",
                                                              "new 2.0")
  with pytest.raises(KeyError, match="'t' has no source"):
    pages.render(text, {}, "page.md")


def test_pareto_labels_do_not_overlap():
  # Eight optimizers at nearly the same cost and score: the labels must
  # still land in separate places.
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  points = [(1.0 + 0.01 * i, 0.9 + 0.001 * (i % 3)) for i in range(8)]
  ax.plot(*zip(*points), "o")
  ax.margins(0.2)
  boxes = report._place_labels(ax, points, [f"Optimizer-{i}" for i in
                                            range(8)])
  plt.close(fig)
  assert len(boxes) == 8
  for a, b in itertools.combinations(boxes, 2):
    assert not a.overlaps(b)
  assert np.isfinite([b.x0 for b in boxes]).all()


def test_a_claim_to_match_holds_when_tied_and_one_to_beat_does_not():
  group = _group("classify", {
      "sgd": (0.900, 0.010, 1, 1.0), "sam": (0.930, 0.010, 2, 2.0),
      "saf": (0.925, 0.010, 1, 1.0), "friendly_sam": (0.935, 0.010, 2, 2.1),
      "mesa": (0.880, 0.010, 1, 1.1)})
  assert pages._claim_cell(group, ("saf",), ("sam",), "matches").startswith(
      "**Yes** (tied)")
  assert pages._claim_cell(group, ("mesa",), ("sam",), "matches").startswith(
      "**No** (worse)")
  assert pages._claim_cell(group, ("friendly_sam",), ("sam",),
                           "metric").startswith("**No** (tied)")
  assert pages._claim_cell(group, ("sam",), ("sgd",), "metric").startswith(
      "**Yes**:")
  kinds = {claim.split(" (")[0]: what for claim, _, _, what in pages._CLAIMS}
  assert all(what == "matches" for claim, what in kinds.items()
             if " matches " in claim)
