"""Every script in examples/ runs (its smoke run), and the gallery lists it.

Each script's module docstring has a ``Run::`` block; the line marked
``# a smoke run`` is a short run that this test executes in a fresh process.
A script whose last printed line is a JSON summary can have a check below
that reads it. The gallery (docs/ext/gallery.py) is built from the same
docstrings and folders; its tests here use a temporary folder and no Sphinx.
"""

import base64
import json
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
sys.path.insert(0, str(ROOT / "docs" / "ext"))
import gallery  # noqa: E402


def smoke_command(script):
  """The docstring's ``# a smoke run`` command, run by this Python."""
  commands = gallery.script_card(script)["commands"]
  smoke = [c for c in commands if c.endswith("# a smoke run")]
  assert len(smoke) == 1, (
      f"{script.name}: its docstring's Run:: block needs one command ending "
      "in '# a smoke run' (a run of seconds that the test suite executes)")
  argv = shlex.split(smoke[0].split("#")[0])
  assert argv[0].endswith("python") and argv[1] == f"examples/{script.name}", argv
  return [sys.executable, *argv[1:]]


def _check_sharded_cnn(summary):
  """8 devices train (the test loss falls) and stay identical."""
  assert summary["devices"] == 8
  assert summary["replica_spread"] == 0.0
  assert summary["test_loss_after"] < summary["test_loss_before"] - 0.1


CHECKS = {"sharded_cnn.py": _check_sharded_cnn}


def test_there_are_examples_and_each_known_check_has_its_script():
  assert EXAMPLES
  assert set(CHECKS) <= {script.name for script in EXAMPLES}


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.name)
def test_example_smoke_run(script):
  proc = subprocess.run(smoke_command(script), cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  assert lines, "an example should print what it did"
  if script.name in CHECKS:
    CHECKS[script.name](json.loads(lines[-1]))


def test_recorded_outputs_belong_to_scripts_and_end_like_a_run():
  for recorded in (ROOT / "examples").glob("*.out"):
    script = recorded.with_suffix(".py")
    assert script.exists(), f"{recorded.name} has no script"
    if script.name in CHECKS:  # the recorded full run passes the same check
      CHECKS[script.name](json.loads(recorded.read_text().strip().splitlines()[-1]))


_NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "metadata": {},
         "source": ["# A title\n", "\n", "First sentence. Second one.\n", "\n", "More."]},
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": ["plot()"],
         "outputs": [{"output_type": "display_data", "metadata": {},
                      "data": {"image/png": base64.b64encode(b"PNG-1").decode()}}]},
        {"cell_type": "code", "metadata": {}, "execution_count": 2, "source": ["plot()"],
         "outputs": [{"output_type": "display_data", "metadata": {},
                      "data": {"image/png": base64.b64encode(b"PNG-2").decode()}}]},
    ],
    "metadata": {}, "nbformat": 4, "nbformat_minor": 5}

_SCRIPT = '''"""Trains a thing on two devices.

Uses ``samtx.sam`` on a tiny model.

Run::

  .venv/bin/python examples/thing.py              # the full run
  .venv/bin/python examples/thing.py --steps 2    # a smoke run

Prints a summary.
"""
print("hi")
'''


def test_gallery_lists_every_notebook_and_script_with_its_command(tmp_path):
  notebooks, examples, out = tmp_path / "nb", tmp_path / "ex", tmp_path / "out"
  notebooks.mkdir(), examples.mkdir()
  (notebooks / "07_demo.ipynb").write_text(json.dumps(_NOTEBOOK))
  (examples / "thing.py").write_text(_SCRIPT)
  (examples / "thing.out").write_text("\n".join(f"line {i}" for i in range(10)))
  out.mkdir()
  (out / "gone.md").write_text("a page whose script was deleted")

  markdown = gallery.build_gallery(notebooks, examples, out)

  assert "**[A title](examples/07_demo.ipynb)**" in markdown
  assert "First sentence. Second one." in markdown and "More." not in markdown
  assert ".venv/bin/python notebooks/build_notebooks.py 07_demo.ipynb" in markdown
  # The thumbnail is the notebook's last figure.
  assert "[![A title](examples/thumbnails/07_demo.png)](examples/07_demo.ipynb)" in markdown
  assert (out / "thumbnails" / "07_demo.png").read_bytes() == b"PNG-2"
  assert (out / "07_demo.ipynb").read_bytes() == (notebooks / "07_demo.ipynb").read_bytes()

  assert "**[Trains a thing on two devices](examples/thing.md)**" in markdown
  assert "Uses `samtx.sam` on a tiny model." in markdown
  assert "examples/thing.py --steps 2    # a smoke run" in markdown
  assert "line 9" in markdown and "line 3" not in markdown  # the output's last lines
  page = (out / "thing.md").read_text()
  assert page.startswith("# Trains a thing on two devices\n")
  assert "```{literalinclude} ../../examples/thing.py" in page
  assert "Prints a summary." in page and "line 0" in page
  assert not (out / "gone.md").exists()


def test_gallery_lists_the_repository_examples(tmp_path):
  markdown = gallery.build_gallery(ROOT / "notebooks", ROOT / "examples", tmp_path)
  for path in [*EXAMPLES, *sorted((ROOT / "notebooks").glob("*.ipynb"))]:
    assert path.name in markdown, path
