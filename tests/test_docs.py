"""The documentation: runnable getting-started code, full API coverage, short README.

`make docs` checks API coverage too (docs/ext/coverage_check.py); this test
says the same thing in seconds, without Sphinx.
"""

import pathlib
import re
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

sys.path.insert(0, str(DOCS / "ext"))
import coverage_check  # noqa: E402

_DIRECTIVE = re.compile(r"^\.\. (currentmodule|autofunction|autoclass|autodata)::\s*(\S+)",
                        re.M)


def _api_entries():
  entries = set()
  for page in sorted((DOCS / "api").glob("*.rst")):
    module = "samtx"
    for kind, target in _DIRECTIVE.findall(page.read_text()):
      if kind == "currentmodule":
        module = target
      else:
        entries.add(f"{module}.{target}")
  return entries


def test_every_public_name_has_an_api_entry():
  assert coverage_check.missing_entries(_api_entries()) == []


def test_getting_started_code_runs_and_fits(capsys):
  text = (DOCS / "getting_started.md").read_text()
  first_block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
  exec(compile(first_block, "getting_started", "exec"), {})  # noqa: S102
  printed = float(capsys.readouterr().out.strip().splitlines()[-1])
  assert np.isfinite(printed) and printed < 1e-3


def test_readme_is_short_and_shows_the_two_commands_first():
  lines = README.read_text().splitlines()
  assert len(lines) <= 300
  first_screen = "\n".join(lines[:25])
  assert "make demo" in first_screen and "make test" in first_screen


def test_readme_links_into_the_docs_resolve():
  links = re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", README.read_text())
  assert links
  missing = [link for link in links if not (ROOT / link).exists()]
  assert missing == []
