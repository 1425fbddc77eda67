"""Sphinx extension: serve MathJax from the built site, never from a CDN.

``sphinx.ext.mathjax`` loads MathJax from a CDN by default, so a reader
without a network sees raw LaTeX. The ``docs`` extra installs MathJax 3 from
PyPI (the ``sphinx-mathjax-offline`` distribution ships MathJax's ``es5``
build); this extension copies it into ``_static/mathjax/`` of every HTML build
and ``conf.py`` points ``mathjax_path`` there. The CHTML output's web fonts,
the TeX extensions MathJax autoloads and the accessibility components are
copied with it, so nothing is fetched at reading time
(``docs/ext/check_html.py`` fails the build if a page references a remote
script or stylesheet).
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import shutil
from typing import Any

DISTRIBUTION = "sphinx-mathjax-offline"
PACKAGE_DIR = "sphinx-mathjax-offline/static/mathjax"
# The combined component conf.py loads (TeX and MathML in, CommonHTML out);
# the other combined builds and the SVG output are never loaded by it.
COMPONENT = "tex-mml-chtml.js"
TARGET = "mathjax"  # under _static/


def source_dir() -> pathlib.Path:
  """Where the installed MathJax ``es5`` build lives."""
  from sphinx.errors import ExtensionError
  try:
    dist = importlib.metadata.distribution(DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError as e:
    raise ExtensionError(
        f"the docs serve MathJax locally: install {DISTRIBUTION} "
        "(pip install -e '.[docs]')") from e
  path = pathlib.Path(str(dist.locate_file(PACKAGE_DIR)))
  if not (path / COMPONENT).is_file():
    raise ExtensionError(f"{DISTRIBUTION} has no {PACKAGE_DIR}/{COMPONENT}")
  return path


def _ignore(directory: str, names: list[str]) -> set[str]:
  top = pathlib.Path(directory) == source_dir()
  skipped = {name for name in names
             if top and name.endswith(".js") and name != COMPONENT}
  if top:
    skipped |= {"node-main.js", "adaptors"}
  if pathlib.Path(directory).name == "output":
    skipped |= {"svg", "svg.js"}
  return skipped & set(names)


def _check(app: Any) -> None:
  if app.builder.format == "html":
    source_dir()  # fail before reading any page, not after writing them all


def _copy(app: Any, exception: Exception | None) -> None:
  if exception is None and app.builder.format == "html":
    shutil.copytree(source_dir(), pathlib.Path(app.outdir) / "_static" / TARGET,
                    ignore=_ignore, dirs_exist_ok=True)


def setup(app: Any) -> dict[str, Any]:
  app.connect("builder-inited", _check)
  app.connect("build-finished", _copy)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
