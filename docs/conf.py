"""Sphinx configuration for the samtx documentation (`make docs`)."""

from __future__ import annotations

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "ext"))

# Importing samtx for autodoc must not grab 8 virtual devices or a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import samtx  # noqa: E402

project = "samtx"
author = "The samtx authors"
copyright = "2026, the samtx authors"  # noqa: A001
release = samtx.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",  # Markdown pages (MyST) and the committed notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style Args:/Returns: sections
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "coverage_check",  # fails the build when a public name has no API entry
    "offline_mathjax",  # copies MathJax into _static/: maths renders offline
    "gallery",  # docs/examples/: every notebook and examples/ script, with cards
]

# MathJax 3 from the docs extra, served from the built site (offline_mathjax);
# never a CDN (docs/ext/check_html.py fails the build on remote scripts).
mathjax_path = "mathjax/tex-mml-chtml.js"

# The notebooks are committed executed (notebooks/build_notebooks.py); the
# build renders their stored outputs and never runs them.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "ext"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No intersphinx: the build must work offline (CI reaches only package
# registries), and a fetched inventory would make it depend on the network.

html_theme = "furo"
html_title = f"samtx {release}"
html_static_path = ["_static"]
html_css_files = ["samtx.css"]
html_theme_options = {"navigation_with_keys": True}
