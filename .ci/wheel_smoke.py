"""Builds samtx's wheel and proves it works installed without any extra.

Run from the repository root (``make wheel-smoke``). Steps:

1. ``pip wheel --no-deps`` builds the wheel into a temporary folder;
2. the wheel's metadata is checked: its version is ``samtx.__version__``,
   it ships ``samtx/py.typed``, and Flax is only an extra;
3. a fresh venv (no system site-packages) gets the wheel with its core
   dependencies only, and a smoke script runs there *outside* the source
   tree (so the installed copy is imported, not ``./samtx``): ``import
   samtx``, one jitted ``samtx.sam`` step, and ``import samtx.flax`` failing
   with the install hint;
4. the temporary folder, venv included, is removed whatever happened (and
   setuptools' ``./build`` staging folder, if the build created it).
"""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = r'''
import sys

import jax
import jax.numpy as jnp
import optax

import samtx

assert "flax" not in sys.modules, "import samtx pulled in flax"
for heavy in ("matplotlib", "sklearn"):
  assert heavy not in sys.modules, f"import samtx pulled in {heavy}"
assert samtx.__file__.startswith(sys.prefix), samtx.__file__

def loss(params):
  return jnp.sum((params["w"] - 1.0) ** 2)

params = {"w": jnp.zeros(3)}
opt = samtx.sam(learning_rate=0.1, rho=0.05)
state = opt.init(params)

@jax.jit
def step(params, state):
  grad_fn = jax.grad(loss)
  updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
  return optax.apply_updates(params, updates), state

new_params, state = step(params, state)
assert float(loss(new_params)) < float(loss(params))

try:
  import samtx.flax  # noqa: F401
except ImportError as error:
  assert "samtx[flax]" in str(error), str(error)
else:
  raise AssertionError("import samtx.flax worked without flax installed")
print(f"wheel smoke ok: samtx {samtx.__version__}, jax {jax.__version__}")
'''


def _source_version() -> str:
  tree = ast.parse((ROOT / "samtx" / "__init__.py").read_text())
  for node in tree.body:
    if (isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "__version__" for t in node.targets)):
      return ast.literal_eval(node.value)
  raise SystemExit("samtx/__init__.py defines no __version__")


def _check_metadata(wheel: pathlib.Path, version: str) -> None:
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = archive.read(metadata_name).decode()
  if "samtx/py.typed" not in names:
    raise SystemExit(f"{wheel.name} does not ship samtx/py.typed")
  if f"\nVersion: {version}\n" not in metadata:
    raise SystemExit(f"{wheel.name}: metadata version is not {version}")
  flax_requirements = [line for line in metadata.splitlines()
                       if line.startswith("Requires-Dist: flax")]
  if not flax_requirements or any("extra ==" not in line
                                  for line in flax_requirements):
    raise SystemExit(f"flax must be an extra only: {flax_requirements}")


def main() -> None:
  version = _source_version()
  work = pathlib.Path(tempfile.mkdtemp(prefix="samtx-wheel-smoke-"))
  # setuptools stages the build in ./build; remove it afterwards unless it
  # was there before (then it is someone else's).
  staging = ROOT / "build"
  staging_existed = staging.exists()
  try:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet",
                    "--no-deps", "--wheel-dir", str(work / "dist"), str(ROOT)],
                   check=True)
    wheel, = (work / "dist").glob("samtx-*.whl")
    if not wheel.name.startswith(f"samtx-{version}-"):
      raise SystemExit(f"{wheel.name} does not carry version {version}")
    _check_metadata(wheel, version)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                    str(wheel)], check=True)
    subprocess.run([str(python), "-c", SMOKE], check=True, cwd=work)
    print(f"{wheel.name}: metadata, py.typed and smoke test ok")
  finally:
    shutil.rmtree(work, ignore_errors=True)
    if not staging_existed:
      shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
  main()
