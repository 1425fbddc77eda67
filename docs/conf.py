"""Sphinx configuration for the samtx documentation (`make docs`)."""

from __future__ import annotations

import os
import pathlib
import re
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
    "sphinx.ext.intersphinx",
    "autolink_literals",  # inline code naming an API object links to its entry
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
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "ext", "_inventories"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Links to jax, optax and flax names. The build must work offline (CI reaches
# only package registries): intersphinx reads committed inventories
# (docs/_inventories/, written by docs/ext/make_inventories.py from each
# project's docs at a release tag) and never fetches one.
intersphinx_mapping = {
    name: (url, str(DOCS / "_inventories" / f"{name}.inv"))
    for name, url in [
        ("jax", "https://docs.jax.dev/en/latest/"),
        ("optax", "https://optax.readthedocs.io/en/v0.2.8/"),
        ("flax", "https://flax.readthedocs.io/en/v0.12.7/"),
    ]
}

html_theme = "furo"
html_title = f"samtx {release}"
html_static_path = ["_static"]
html_css_files = ["samtx.css"]
# The repository link (every page's header and footer) comes from
# pyproject.toml's [project.urls], the one place it is written.
# (A regular expression, not tomllib: the docs build on Python 3.10 too.)
REPOSITORY = re.search(r'^Repository = "([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                       re.M).group(1)
html_theme_options = {
    "navigation_with_keys": True,
    "source_repository": REPOSITORY + "/",
    "source_branch": "main",
    "source_directory": "docs/",
    "footer_icons": [{
        "name": "Repository",
        "url": REPOSITORY,
        "html": '<svg stroke="currentColor" fill="currentColor" stroke-width="0" '
                'viewBox="0 0 16 16"><path fill-rule="evenodd" d="M8 0C3.58 0 0 3.58 0 '
                '8c0 3.54 2.29 6.53 5.47 7.59.4.07.55-.17.55-.38 0-.19-.01-.82-.01-1.49-2.01'
                '.37-2.53-.49-2.69-.94-.09-.23-.48-.94-.82-1.13-.28-.15-.68-.52-.01-.53.63-.01 '
                '1.08.58 1.23.82.72 1.21 1.87.87 2.33.66.07-.52.28-.87.51-1.07-1.78-.2-3.64-.89'
                '-3.64-3.95 0-.87.31-1.59.82-2.15-.08-.2-.36-1.02.08-2.12 0 0 .67-.21 2.2.82.64'
                '-.18 1.32-.27 2-.27.68 0 1.36.09 2 .27 1.53-1.04 2.2-.82 2.2-.82.44 1.1.16 1.92'
                '.08 2.12.51.56.82 1.27.82 2.15 0 3.07-1.87 3.75-3.65 3.95.29.25.54.73.54 1.48 '
                '0 1.07-.01 1.93-.01 2.2 0 .21.15.46.55.38A8.013 8.013 0 0016 8c0-4.42-3.58-8'
                '-8-8z"></path></svg>',
        "class": "",
    }],
}
