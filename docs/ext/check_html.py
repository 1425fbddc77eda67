"""Checks the built HTML site: nothing loads from the network, no link is broken.

Usage (``make docs`` runs it after Sphinx)::

  python docs/ext/check_html.py docs/_build/html

Fails (exit status 1, one line per problem) when

* a page loads a remote resource: a ``<script src>``, a stylesheet or other
  ``<link>`` that the browser fetches, an ``<img>``, ``<iframe>``, ``<source>``,
  ``<embed>`` or ``<object>`` whose address has a scheme or starts with
  ``//``, or a ``.js``/``.css`` address inside an inline ``<script>`` or
  ``<style>``; or a stylesheet under ``_static/`` imports or uses a remote
  ``url()``: the site must read the same without a network;
* an internal link or local resource points at a file that is not in the
  build, or at an anchor (``#id``) that the target page does not define.

Links to other sites (``<a href="https://...">``) are not followed. Only the
standard library is used, so the check runs anywhere in about a second.
"""

from __future__ import annotations

import html.parser
import pathlib
import re
import sys
import urllib.parse

# Elements and attributes whose address the browser fetches while rendering.
_FETCHED = {
    "script": "src", "img": "src", "iframe": "src", "source": "src",
    "embed": "src", "object": "data", "audio": "src", "video": "src",
    "track": "src", "input": "src",
}
# <link rel=...> values that make the browser fetch the href.
_FETCHED_LINK_RELS = {"stylesheet", "preload", "modulepreload", "icon",
                      "manifest", "prefetch", "apple-touch-icon"}
_REMOTE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")
_INLINE_REMOTE = re.compile(r"""(?:https?:)?//[^\s"'`)]+\.(?:m?js|css)\b""")
_CSS_REMOTE = re.compile(r"""(?:@import\s+(?:url\()?|url\()\s*["']?\s*(?:https?:)?//""")
# Addresses with these schemes are neither fetched at render time nor internal.
_OTHER_SCHEMES = ("mailto:", "tel:", "javascript:", "data:")


class _Page(html.parser.HTMLParser):
  """Collects a page's anchors, links and fetched resources in one pass."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.ids: set[str] = set()
    self.links: list[str] = []      # <a href>, <area href>: internal ones checked
    self.fetched: list[tuple[str, str]] = []  # (tag, address) loaded on render
    self.inline: list[str] = []     # text of inline <script> and <style>
    self._in_inline = False

  def handle_starttag(self, tag, attrs):
    attributes = dict(attrs)
    for key in ("id", "name"):
      if attributes.get(key) and (key == "id" or tag == "a"):
        self.ids.add(attributes[key])
    if tag in ("a", "area") and attributes.get("href") is not None:
      self.links.append(attributes["href"])
    elif tag == "link" and attributes.get("href"):
      rels = set((attributes.get("rel") or "").lower().split())
      if rels & _FETCHED_LINK_RELS:
        self.fetched.append(("link", attributes["href"]))
      else:  # rel=next/prev/index/search: navigation, checked like <a>
        self.links.append(attributes["href"])
    elif tag in _FETCHED and attributes.get(_FETCHED[tag]):
      self.fetched.append((tag, attributes[_FETCHED[tag]]))
    self._in_inline = tag in ("script", "style") and not attributes.get("src")

  def handle_endtag(self, tag):
    if tag in ("script", "style"):
      self._in_inline = False

  def handle_data(self, data):
    if self._in_inline:
      self.inline.append(data)


def _parse(path: pathlib.Path) -> _Page:
  page = _Page()
  page.feed(path.read_text(encoding="utf-8", errors="replace"))
  page.close()
  return page


def check_site(root: pathlib.Path) -> tuple[list[str], int, int]:
  """Returns (problems, pages checked, internal references checked)."""
  root = root.resolve()
  pages = {path: _parse(path) for path in sorted(root.rglob("*.html"))}
  problems: list[str] = []
  checked = 0

  def local_target(page_path: pathlib.Path, address: str):
    parsed = urllib.parse.urlsplit(address)
    if not parsed.path:
      return page_path, parsed.fragment
    target = (page_path.parent / urllib.parse.unquote(parsed.path)).resolve()
    if address.endswith("/") or target.is_dir():
      target = target / "index.html"
    return target, parsed.fragment

  for path, page in pages.items():
    name = path.relative_to(root).as_posix()
    for tag, address in page.fetched:
      if _REMOTE.match(address) and not address.startswith("data:"):
        problems.append(f"{name}: <{tag}> loads a remote resource: {address}")
    for text in page.inline:
      for match in _INLINE_REMOTE.findall(text):
        problems.append(f"{name}: inline script/style loads {match}")
    addresses = page.links + [a for _, a in page.fetched if not _REMOTE.match(a)]
    for address in addresses:
      if _REMOTE.match(address) or address.startswith(_OTHER_SCHEMES):
        continue
      target, fragment = local_target(path, address)
      checked += 1
      if not target.exists():
        problems.append(f"{name}: broken link {address} (no file "
                        f"{target.relative_to(root) if target.is_relative_to(root) else target})")
      elif fragment and target.suffix == ".html":
        fragment = urllib.parse.unquote(fragment)
        if target not in pages:  # outside the site root
          continue
        if fragment not in pages[target].ids:
          problems.append(f"{name}: broken anchor {address} "
                          f"({target.relative_to(root).as_posix()} has no id {fragment!r})")
  for css in sorted((root / "_static").rglob("*.css")) if (root / "_static").exists() else []:
    text = css.read_text(encoding="utf-8", errors="replace")
    if _CSS_REMOTE.search(text):
      problems.append(f"{css.relative_to(root).as_posix()}: stylesheet loads a remote url()")
  return problems, len(pages), checked


def main(argv: list[str] | None = None) -> int:
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 1:
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2
  root = pathlib.Path(args[0])
  if not (root / "index.html").is_file():
    print(f"{root}: no index.html, build the site first", file=sys.stderr)
    return 2
  problems, pages, checked = check_site(root)
  for problem in problems:
    print(problem)
  print(f"check_html: {pages} pages, {checked} internal links and resources, "
        f"{len(problems)} problems")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
