"""Sphinx extension: the examples gallery, built from the repository's folders.

Every notebook in ``notebooks/`` and every script in ``examples/`` gets a card
on the examples page (``docs/examples.md`` includes the generated
``examples/gallery.txt``) with the command that runs it:

* a notebook is copied into ``docs/examples/`` (the site renders its
  committed outputs; nothing is executed at build time) and its card shows
  the last figure it drew as a thumbnail;
* a script gets a page ``docs/examples/<name>.md`` made from its module
  docstring (first line: title; then the description; a ``Run::`` block:
  the commands) and its full source, and its card shows the commands and the
  last lines of ``examples/<name>.out`` when that file is committed (the
  output of its first command, recorded by running it).

Nothing is listed by hand: a new file in either folder appears on the next
build. ``docs/examples/`` is generated (and git-ignored); files there whose
source is gone are removed.
"""

from __future__ import annotations

import ast
import base64
import json
import pathlib
import re
from typing import Any

DOCS = pathlib.Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
OUT = DOCS / "examples"
THUMBNAILS = OUT / "thumbnails"
OUTPUT_LINES = 6  # lines of a script's recorded output shown on its card


def _write_if_changed(path: pathlib.Path, data: bytes) -> None:
  # Rewriting an unchanged file would make Sphinx re-read the page.
  if not path.exists() or path.read_bytes() != data:
    path.write_bytes(data)


def notebook_card(path: pathlib.Path) -> dict[str, Any]:
  """Title, summary and last figure of an executed notebook."""
  notebook = json.loads(path.read_text(encoding="utf-8"))
  title, summary, image = path.stem, "", None
  for cell in notebook["cells"]:
    source = "".join(cell["source"])
    if cell["cell_type"] == "markdown" and not summary:
      lines = source.strip().splitlines()
      if lines and lines[0].startswith("# "):
        title = lines[0][2:].strip()
        paragraphs = "\n".join(lines[1:]).strip().split("\n\n")
        summary = paragraphs[0].replace("\n", " ") if paragraphs else ""
    for output in cell.get("outputs", []):
      if "image/png" in output.get("data", {}):
        image = output["data"]["image/png"]
  return {"title": title, "summary": summary, "image": image}


def script_card(path: pathlib.Path) -> dict[str, Any]:
  """Title, description and commands from a script's module docstring."""
  docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or path.stem
  title, _, body = docstring.partition("\n")
  match = re.search(r"^Run::\n\n((?:[ \t]+.*\n?|\n)+)", body, re.M)
  commands = []
  if match:
    commands = [line.strip() for line in match.group(1).splitlines() if line.strip()]
    body = body[:match.start()] + body[match.end():]
  paragraphs = [p.strip() for p in body.strip().split("\n\n") if p.strip()]
  recorded = path.with_suffix(".out")
  output = recorded.read_text(encoding="utf-8") if recorded.exists() else None
  return {"title": title.strip().rstrip("."), "paragraphs": paragraphs,
          "commands": commands or [f".venv/bin/python examples/{path.name}"],
          "output": output}


def _rst_literals_to_markdown(text: str) -> str:
  # Docstrings use reST's ``code``; MyST reads single backticks.
  return re.sub(r"``([^`]+)``", r"`\1`", text)


def _first_sentences(text: str, limit: int = 260) -> str:
  """Whole sentences of ``text`` up to about ``limit`` characters."""
  sentences = re.split(r"(?<=[.:])\s+(?=[A-Z`*])", text)
  summary = sentences[0]
  for sentence in sentences[1:]:
    if len(summary) + len(sentence) > limit:
      break
    summary += " " + sentence
  return summary


def _fence(text: str, language: str = "") -> str:
  return f"```{language}\n{text.rstrip()}\n```\n"


def _script_page(path: pathlib.Path, card: dict[str, Any]) -> str:
  parts = [f"# {card['title']}\n",
           f"`examples/{path.name}` in the repository.\n"]
  parts += [_rst_literals_to_markdown(p) + "\n" for p in card["paragraphs"]]
  parts += ["## Run it\n", _fence("\n".join(card["commands"]), "bash")]
  if card["output"] is not None:
    parts += [f"Output of `{card['commands'][0].split('#')[0].strip()}` "
              f"(`examples/{path.stem}.out`):\n", _fence(card["output"], "text")]
  parts += ["## Source\n",
            f"```{{literalinclude}} ../../examples/{path.name}\n:language: python\n```\n"]
  return "\n".join(parts)


def _card(link: str, title: str, summary: str, command: str, *, image: str | None = None,
          output: str | None = None) -> str:
  kind = "samtx-gallery-card samtx-with-thumbnail" if image else "samtx-gallery-card"
  lines = [f":::{{container}} {kind}\n"]
  if image:
    lines.append(f"[![{title}]({image})]({link})\n")
  lines.append(f"**[{title}]({link})**\n")
  if summary:
    lines.append(_rst_literals_to_markdown(_first_sentences(summary)) + "\n")
  lines.append(_fence(command, "bash"))
  if output:
    lines.append(_fence(output, "text"))
  lines.append(":::\n")
  return "\n".join(lines)


def build_gallery(notebooks_dir: pathlib.Path, examples_dir: pathlib.Path,
                  out: pathlib.Path) -> str:
  """Writes the generated pages under ``out``; returns the gallery Markdown."""
  thumbnails = out / "thumbnails"
  thumbnails.mkdir(parents=True, exist_ok=True)
  expected: set[pathlib.Path] = set()
  notebook_cards, script_cards = [], []
  for notebook in sorted(notebooks_dir.glob("*.ipynb")):
    target = out / notebook.name
    _write_if_changed(target, notebook.read_bytes())
    card = notebook_card(notebook)
    image = None
    if card["image"]:
      thumbnail = thumbnails / f"{notebook.stem}.png"
      _write_if_changed(thumbnail, base64.b64decode(card["image"]))
      expected.add(thumbnail)
      image = f"examples/thumbnails/{thumbnail.name}"
    expected.add(target)
    notebook_cards.append(_card(
        f"examples/{notebook.name}", card["title"], card["summary"],
        f".venv/bin/python notebooks/build_notebooks.py {notebook.name}",
        image=image))
  for script in sorted(examples_dir.glob("*.py")):
    card = script_card(script)
    page = out / f"{script.stem}.md"
    _write_if_changed(page, _script_page(script, card).encode())
    expected.add(page)
    output = None
    if card["output"] is not None:
      output = "\n".join(card["output"].rstrip().splitlines()[-OUTPUT_LINES:])
    summary = card["paragraphs"][0] if card["paragraphs"] else ""
    script_cards.append(_card(f"examples/{script.stem}.md", card["title"], summary,
                              "\n".join(card["commands"]), output=output))
  for stale in list(out.glob("*.ipynb")) + list(out.glob("*.md")) + list(thumbnails.glob("*")):
    if stale not in expected:
      stale.unlink()
  sections = ["## Notebooks\n",
              "Executed notebooks, committed with their outputs: the command "
              "rewrites and re-executes one (`notebooks/build_notebooks.py`; "
              "`make test` runs each in quick mode).\n",
              "::::{container} samtx-gallery\n", *notebook_cards, "::::\n",
              "## Scripts\n",
              "Scripts in `examples/`; `make test` runs each one's smoke run "
              "(`tests/test_examples.py`).\n",
              "::::{container} samtx-gallery\n", *script_cards, "::::\n"]
  return "\n".join(sections)


def _generate(app: Any, config: Any) -> None:
  del app, config
  markdown = build_gallery(ROOT / "notebooks", ROOT / "examples", OUT)
  # Included by docs/examples.md ({include} records the dependency, so the
  # page is re-read when the gallery changes). Not a source: .txt.
  _write_if_changed(OUT / "gallery.txt", markdown.encode())


def setup(app: Any) -> dict[str, Any]:
  app.connect("config-inited", _generate)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
