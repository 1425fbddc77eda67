"""Packaging: one version, a typed wheel, and a core that needs no extra."""

import pathlib
import subprocess
import sys

import pytest

import samtx

ROOT = pathlib.Path(__file__).resolve().parents[1]

try:
  import tomllib
except ImportError:  # Python 3.10
  tomllib = pytest.importorskip("tomli")


def _pyproject():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_single_sourced_from_the_package():
  config = _pyproject()
  assert "version" not in config["project"]
  assert "version" in config["project"]["dynamic"]
  assert config["tool"]["setuptools"]["dynamic"]["version"] == {
      "attr": "samtx.__version__"}
  assert samtx.__version__.count(".") == 2


def test_wheel_is_marked_typed():
  assert (ROOT / "samtx" / "py.typed").is_file()
  assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["samtx"]


def test_flax_is_an_extra_included_where_it_is_used():
  project = _pyproject()["project"]
  assert not any(dep.startswith("flax") for dep in project["dependencies"])
  extras = project["optional-dependencies"]
  assert any(dep.startswith("flax") for dep in extras["flax"])
  for extra in ("demo", "notebooks", "test", "docs"):
    assert any("flax" in dep for dep in extras[extra]), extra


# Runs in a fresh interpreter whose import system refuses the optional
# packages, as on a machine where only the core dependencies are installed.
_WITHOUT_EXTRAS = r'''
import importlib.abc
import sys

BLOCKED = {"flax", "matplotlib", "sklearn", "mnist1d", "tqdm", "scipy"}

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None

sys.meta_path.insert(0, Block())

import jax, jax.numpy as jnp, optax, samtx

params = {"w": jnp.zeros(2)}
opt = samtx.sam(0.1, rho=0.05)
grad_fn = jax.grad(lambda p: jnp.sum((p["w"] - 1.0) ** 2))
updates, _ = jax.jit(lambda p, s: opt.update(grad_fn(p), s, p, grad_fn=grad_fn))(
    params, opt.init(params))
assert float(updates["w"][0]) > 0  # towards the minimum at 1
try:
  import samtx.flax
except ImportError as error:
  print(error)
else:
  raise SystemExit("samtx.flax imported without flax")
'''


def test_core_imports_and_steps_without_extras_and_flax_module_says_how_to_install():
  out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS], capture_output=True,
                       text=True, check=True, cwd=ROOT)
  assert "pip install 'samtx[flax]'" in out.stdout
