"""Writes docs/_inventories/*.inv, the intersphinx inventories the docs link with.

The docs build must not touch the network (CI reaches only package
registries), so intersphinx reads committed inventories instead of fetching
``objects.inv``. This script makes them from the projects' own
documentation sources at a release tag: it reads every ``.rst`` page of the
docs folder and records, for each documented Python name, the page (and
anchor) the project's Sphinx build puts it on::

  .. currentmodule:: / .. module:: / .. automodule::   set the module
                                  (the last two also document it: #module-name)
  .. autofunction:: / autoclass:: / autodata:: ...   -> page.html#module.name
  .. autosummary:: with :toctree: DIR                 -> DIR/module.name.html#module.name
  .. autosummary:: without :toctree:                  -> page.html#module.name

The object type (class or function) comes from importing the installed
package. Names a package re-exports from a private module (``nnx.Optimizer``
is documented as ``flax.nnx.optimizer.Optimizer``) are added under the public
path too. Run it from the repository root with git clones of the projects
(no network needed once they are cloned)::

  python docs/ext/make_inventories.py optax=PATH/optax jax=PATH/jax flax=PATH/flax

then commit docs/_inventories/. Update PROJECTS (tag and address) when a
new release changes the pages.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import posixpath
import re
import subprocess
import sys
import zlib

OUT = pathlib.Path(__file__).resolve().parents[1] / "_inventories"

# name: (git tag, docs folder in the repository, published address of that tag)
PROJECTS = {
    "optax": ("v0.2.8", "docs", "https://optax.readthedocs.io/en/v0.2.8/"),
    "jax": ("jax-v0.10.2", "docs", "https://docs.jax.dev/en/latest/"),
    "flax": ("v0.12.7", "docs_nnx", "https://flax.readthedocs.io/en/v0.12.7/"),
}
# Public modules whose names are re-exported from private submodules.
REEXPORTS = {"flax": ["flax.nnx"], "optax": ["optax", "optax.contrib"], "jax": []}

_DIRECTIVE = re.compile(r"^(\s*)\.\. ([\w:]+)::\s*(\S*)\s*$")


def _git(repo: pathlib.Path, *args: str) -> str:
  return subprocess.run(["git", f"--git-dir={repo}", *args], check=True,
                        capture_output=True, text=True).stdout


def _git_dir(path: pathlib.Path) -> pathlib.Path:
  return path / ".git" if (path / ".git").exists() else path


def documented_names(repo: pathlib.Path, tag: str, docs: str) -> dict[str, str]:
  """{fully qualified name: uri relative to the docs root} for one tag."""
  git_dir = _git_dir(repo)
  pages = [p for p in _git(git_dir, "ls-tree", "-r", "--name-only", tag, docs + "/").split()
           if p.endswith(".rst")]
  found: dict[str, str] = {}
  for page in pages:
    page_uri = posixpath.relpath(page[:-len(".rst")], docs) + ".html"
    page_dir = posixpath.dirname(page_uri)
    module = ""
    lines = _git(git_dir, "show", f"{tag}:{page}").splitlines()
    i = 0
    while i < len(lines):
      match = _DIRECTIVE.match(lines[i])
      i += 1
      if not match:
        continue
      indent, directive, argument = match.groups()
      directive = directive.removeprefix("py:")
      if directive in ("currentmodule", "module", "automodule"):
        module = argument
        if directive != "currentmodule":
          found.setdefault(argument, f"{page_uri}#module-{argument}")
      elif directive.startswith("auto") and directive != "autosummary" and argument:
        name = argument if argument.startswith(module + ".") or not module else (
            f"{module}.{argument}")
        found.setdefault(name, f"{page_uri}#{name}")
      elif directive == "autosummary":
        toctree = None
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
          line = lines[i].strip()
          i += 1
          if line.startswith(":toctree:"):
            toctree = line.split(":", 2)[2].strip().rstrip("/")
          elif line and not line.startswith(":") and not line.startswith(".."):
            entry = line.lstrip("~")
            name = entry if not module or entry.startswith(module + ".") else f"{module}.{entry}"
            if toctree is not None:
              found.setdefault(name, posixpath.normpath(
                  posixpath.join(page_dir, toctree, f"{name}.html")) + f"#{name}")
            else:
              found.setdefault(name, f"{page_uri}#{name}")
  return found


def _resolve(name: str):
  parts = name.split(".")
  for split in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:split]))
    except Exception:  # noqa: BLE001 - any import failure: try a shorter module
      continue
    try:
      for attribute in parts[split:]:
        obj = getattr(obj, attribute)
    except AttributeError:
      return None
    return obj
  return None


def _role(obj) -> str:
  if inspect.ismodule(obj):
    return "py:module"
  if inspect.isclass(obj):
    return "py:class"
  if callable(obj):
    return "py:function"
  return "py:data"


def inventory(project: str, names: dict[str, str]) -> bytes:
  entries = {}
  for name, uri in names.items():
    entries[name] = (_role(_resolve(name)), uri)
  for public in REEXPORTS[project]:
    module = _resolve(public)
    for name, (role, uri) in list(entries.items()):
      short = name.rsplit(".", 1)[-1]
      if (name.startswith(public + ".") and name != f"{public}.{short}"
          and getattr(module, short, None) is not None
          and getattr(module, short) is _resolve(name)):
        entries.setdefault(f"{public}.{short}", (role, uri))
  version = PROJECTS[project][0]
  header = (f"# Sphinx inventory version 2\n# Project: {project}\n# Version: {version}\n"
            "# The remainder of this file is compressed using zlib.\n")
  body = "".join(f"{name} {role} 1 {uri} -\n" for name, (role, uri) in sorted(entries.items()))
  return header.encode() + zlib.compress(body.encode(), 9)


def main(argv: list[str]) -> int:
  clones = dict(arg.split("=", 1) for arg in argv)
  if not clones or set(clones) - set(PROJECTS):
    print(__doc__.split("\n\n")[-2], file=sys.stderr)
    return 2
  OUT.mkdir(exist_ok=True)
  for project, path in clones.items():
    tag, docs, _ = PROJECTS[project]
    names = documented_names(pathlib.Path(path), tag, docs)
    (OUT / f"{project}.inv").write_bytes(inventory(project, names))
    print(f"{project} {tag}: {len(names)} names -> {OUT / (project + '.inv')}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
