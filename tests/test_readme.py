"""The README's quickstart runs as written and does what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_quickstart_runs_and_fits(capsys):
  quickstart = _python_blocks()[0]
  namespace = {}
  exec(compile(quickstart, "README-quickstart", "exec"), namespace)  # noqa: S102
  printed = float(capsys.readouterr().out.strip().splitlines()[-1])
  assert np.isfinite(printed) and printed < 1e-3


def test_readme_shows_the_two_commands():
  text = README.read_text()
  assert "make demo" in text and "make test" in text
