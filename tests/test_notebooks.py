"""The example notebooks run (quick mode), match their generator, and ship outputs."""

import importlib.util
import pathlib
import sys

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _builder():
  spec = importlib.util.spec_from_file_location(
      "build_notebooks", NOTEBOOKS / "build_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


BUILDER = _builder()
NAMES = sorted(BUILDER.NOTEBOOKS)


def _images(nb):
  return [out for cell in nb.cells if cell.cell_type == "code"
          for out in cell.get("outputs", [])
          if "image/png" in out.get("data", {})]


def _text(nb):
  return "".join(out.get("text", "") for cell in nb.cells
                 if cell.cell_type == "code" for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_in_quick_mode(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
  executed = BUILDER.execute(nb, quick=True)  # raises on any failing cell
  assert "quick mode: True" in _text(executed)
  assert _images(executed), "the notebook should draw its plots"
  errors = [out for cell in executed.cells if cell.cell_type == "code"
            for out in cell.outputs if out.get("output_type") == "error"]
  assert not errors


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_generator_and_has_full_outputs(name):
  committed = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(committed)
  built = BUILDER.build(name)
  assert [(c.cell_type, c.source) for c in committed.cells] == [
      (c.cell_type, c.source) for c in built.cells], (
          "regenerate with: .venv/bin/python notebooks/build_notebooks.py")
  assert committed.metadata["kernelspec"]["name"] == "python3"
  assert "quick mode: False" in _text(committed)  # executed in full mode
  assert _images(committed)


def test_quickstart_compares_the_five_optimizers():
  nb = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", as_version=4)
  text = _text(nb)
  for name in ["SGD", "SAM", "AdaSAM", "LightSAM", "MSAM"]:
    assert f"{name} " in text and "test accuracy" in text


def test_notebook_kernel_is_this_python():
  """nbclient's "python3" kernel runs the interpreter running the tests (the venv)."""
  from jupyter_client import KernelManager

  command = KernelManager(kernel_name="python3").format_kernel_cmd()
  assert command[0] == sys.executable
