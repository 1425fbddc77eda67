"""Sphinx extension: fail the build when a public samtx name has no API entry.

The public surface is ``samtx.__all__`` plus the ``__all__`` of each public
submodule (:data:`PUBLIC_SUBMODULES`). Every such name must be documented as a
Python object (``autofunction``, ``autoclass``, ``autodata`` ...) under its
public path, ``samtx.NAME`` or ``samtx.SUBMODULE.NAME``, in ``docs/api/``.

The check runs on ``env-check-consistency``, i.e. after every page has been
read, inside the normal ``make docs`` build (no second Sphinx run, unlike a
separate builder). It reports one warning per missing entry, so ``make docs``
(``-W --keep-going``) lists them all, then fails.
"""

from __future__ import annotations

import importlib
from typing import Any


# Submodules users import by name; their names are documented under their own
# path. Core modules (perturbations, moments, aliases, msam, guards, wrappers)
# are private in effect: their names are re-exported in samtx.__all__.
PUBLIC_SUBMODULES = ("parallel", "flax", "sharpness")


def public_names() -> set[str]:
  """Every public name, fully qualified, that must have an API entry."""
  import samtx
  names = {f"samtx.{name}" for name in samtx.__all__}
  for submodule in PUBLIC_SUBMODULES:
    module = importlib.import_module(f"samtx.{submodule}")
    names |= {f"samtx.{submodule}.{name}" for name in module.__all__}
  return names


def missing_entries(documented: set[str]) -> list[str]:
  return sorted(public_names() - documented)


def _check(app: Any, env: Any) -> None:
  # Imported here so tests/test_docs.py can use public_names() without the
  # docs extra installed.
  from sphinx.util import logging
  logger = logging.getLogger(__name__)
  documented = set(env.get_domain("py").objects)
  for name in missing_entries(documented):
    logger.warning(
        "public name %s has no API entry: add it to the autosummary table and "
        "an autofunction/autoclass/autodata entry on its family's page in "
        "docs/api/", name, type="samtx", subtype="api_coverage",
        location="api/index")


def setup(app: Any) -> dict[str, Any]:
  app.connect("env-check-consistency", _check)
  return {"version": "1.0", "parallel_read_safe": True,
          "parallel_write_safe": True}
