"""Sphinx extension: inline code that names an API links to its documentation.

Pages and docstrings write names as inline code (```optax.chain```,
```samtx.unperturb```, ```nnx.Optimizer```) rather than with roles. This
post-transform turns an inline literal into a cross-reference when its whole
text (less a trailing ``()``) is a documented Python name: samtx's own API
entries, or a name in the committed intersphinx inventories of jax, optax
and flax (docs/_inventories/, made by make_inventories.py: the build never
fetches one). The short spellings ``jnp.``, ``nnx.`` and ``linen.`` are read
as ``jax.numpy.``, ``flax.nnx.`` and ``flax.linen.``. Anything else, a call
with arguments or an unknown name, stays plain code, so nothing can warn.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.transforms.post_transforms import SphinxPostTransform

ALIASES = {"jnp.": "jax.numpy.", "nnx.": "flax.nnx.", "linen.": "flax.linen."}
PREFIXES = ("samtx.", "optax.", "jax.", "flax.", *ALIASES)
_NAME = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+$")


def target(text: str) -> str | None:
  """The dotted name an inline literal spells, if it spells only one."""
  text = text.strip()
  if text.endswith("()"):
    text = text[:-2]
  if not text.startswith(PREFIXES) or not _NAME.match(text):
    return None
  for short, full in ALIASES.items():
    if text.startswith(short):
      return full + text[len(short):]
  return text


class LinkLiterals(SphinxPostTransform):
  """Wraps each inline literal naming a known object in a pending_xref."""

  default_priority = 5  # before ReferencesResolver (10) resolves them

  def run(self, **kwargs: Any) -> None:
    known = self._known()
    for literal in list(self.document.findall(nodes.literal)):
      if isinstance(literal.parent, (nodes.reference, addnodes.pending_xref,
                                     addnodes.desc_signature)):
        continue
      if "xref" in literal.get("classes", []):
        continue  # already produced by a role
      name = target(literal.astext())
      if name is None or name not in known:
        continue
      xref = addnodes.pending_xref(
          "", refdomain="py", reftype="obj", reftarget=name, refexplicit=True,
          refwarn=False, refdoc=self.env.docname)
      literal.replace_self(xref)
      xref += literal

  def _known(self) -> set[str]:
    names = set(self.env.get_domain("py").objects)
    inventory = getattr(self.env, "intersphinx_inventory", {})
    for role, objects in inventory.items():
      if role.startswith("py:"):
        names.update(objects)
    return names


def setup(app: Any) -> dict[str, Any]:
  app.add_post_transform(LinkLiterals)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
