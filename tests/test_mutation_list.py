"""The hand-made mutants of ``tools/mutate.py`` still match the source.

Each mutant names a piece of rule text that must occur exactly once in its
file. When an edit moves or rewrites that text, this test fails, so the
mutant list is updated with the code instead of silently mutating nothing.
(The mutation run itself is slow and is not part of the suite; see
``docs/development.md``.)
"""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mutate_module():
  spec = importlib.util.spec_from_file_location("mutate",
                                                ROOT / "tools" / "mutate.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_every_mutant_original_occurs_exactly_once():
  mutate = _mutate_module()
  assert len(mutate.MUTANTS) >= 30
  assert mutate.check_mutants() == []


def test_every_rule_module_has_mutants_and_a_quick_one():
  mutate = _mutate_module()
  covered = {m.path for m in mutate.MUTANTS}
  for module in ("_common", "moments", "msam", "perturbations", "wrappers",
                 "guards", "parallel"):
    assert f"samtx/{module}.py" in covered
  assert {m.path for m in mutate.MUTANTS if m.quick} >= {
      "samtx/_common.py", "samtx/moments.py", "samtx/msam.py",
      "samtx/perturbations.py", "samtx/wrappers.py", "samtx/guards.py"}


def test_check_reports_a_stale_mutant(tmp_path):
  mutate = _mutate_module()
  (tmp_path / "rule.py").write_text("x = a + b\ny = a + b\n")
  stale = [mutate.Mutant("twice", "rule.py", "a + b", "a - b", (), "dup"),
           mutate.Mutant("gone", "rule.py", "a * b", "a / b", (), "moved"),
           mutate.Mutant("noop", "rule.py", "x =", "x =", (), "same")]
  problems = mutate.check_mutants(stale, tmp_path)
  assert any("twice: original text found 2 times" in p for p in problems)
  assert any("gone: original text found 0 times" in p for p in problems)
  assert any("noop: the mutant changes nothing" in p for p in problems)
