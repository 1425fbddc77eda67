"""The checks `make docs` runs on the built site, tested on small hand-made sites.

`docs/ext/check_html.py` must catch what would make the site need a network
(a CDN script, a remote stylesheet or font) and what would strand a reader (a
link to a missing page or anchor), and pass a site that has neither. The real
site is built and checked by `make docs` (CI); these tests take milliseconds.
"""

import pathlib
import re
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "ext"))
import check_html  # noqa: E402
import offline_mathjax  # noqa: E402

GOOD_INDEX = """<!doctype html><html><head>
<link rel="stylesheet" href="_static/site.css">
<script src="_static/mathjax/tex-mml-chtml.js"></script>
<link rel="next" href="guide/page.html">
</head><body>
<a href="#top" id="top">top</a>
<a href="guide/page.html#usage">usage</a>
<a href="guide/">guide folder</a>
<a href="https://arxiv.org/abs/2010.01412">a paper: not followed, not fetched</a>
<a href="mailto:someone@example.org">mail</a>
<img src="_images/plot.png" alt="plot">
<script>var options = {"path": "_static/x.js"};</script>
</body></html>"""

GOOD_PAGE = """<html><body><section id="usage"><h1>Usage</h1>
<a href="../index.html#top">home</a><a name="legacy-anchor"></a>
<a href="%E2%9C%93.html">a quoted file name</a></section></body></html>"""


def _site(tmp_path, index=GOOD_INDEX, css="body { color: black; }"):
  (tmp_path / "_static" / "mathjax").mkdir(parents=True)
  (tmp_path / "_static" / "site.css").write_text(css)
  (tmp_path / "_static" / "mathjax" / "tex-mml-chtml.js").write_text("")
  (tmp_path / "_images").mkdir()
  (tmp_path / "_images" / "plot.png").write_bytes(b"")
  (tmp_path / "guide").mkdir()
  (tmp_path / "guide" / "page.html").write_text(GOOD_PAGE)
  (tmp_path / "guide" / "index.html").write_text("<p>guides</p>")
  (tmp_path / "guide" / "\u2713.html").write_text("<p>ok</p>")
  (tmp_path / "index.html").write_text(index)
  return tmp_path


def test_a_self_contained_site_passes(tmp_path):
  problems, pages, checked = check_html.check_site(_site(tmp_path))
  assert problems == []
  assert pages == 4
  # index: 4 internal links (#top, page#usage, guide/, rel=next), 2 local
  # resources (css, script) and an image; page: 2 links.
  assert checked == 9


@pytest.mark.parametrize("snippet, expected", [
    ('<script src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"></script>',
     "<script> loads a remote resource: https://cdn.jsdelivr.net"),
    ('<script src="//cdn.example.org/x.js"></script>', "<script> loads a remote resource"),
    ('<link rel="stylesheet" href="https://fonts.example.org/a.css">',
     "<link> loads a remote resource"),
    ('<link rel="preload" href="http://example.org/font.woff2">',
     "<link> loads a remote resource"),
    ('<img src="https://img.shields.io/badge.svg">', "<img> loads a remote resource"),
    ('<iframe src="https://example.org/embed"></iframe>', "<iframe> loads a remote resource"),
    ('<script>require.config({paths: {a: "https://cdnjs.example.org/require.min.js"}})</script>',
     "inline script/style loads https://cdnjs.example.org/require.min.js"),
    ('<style>@import url("https://fonts.example.org/inter.css");</style>',
     "inline script/style loads https://fonts.example.org/inter.css"),
    ('<a href="guide/missing.html">gone</a>', "broken link guide/missing.html"),
    ('<a href="guide/page.html#no-such-section">x</a>',
     "broken anchor guide/page.html#no-such-section"),
    ('<a href="#nowhere">x</a>', "broken anchor #nowhere"),
    ('<script src="_static/missing.js"></script>', "broken link _static/missing.js"),
    ('<img src="_images/missing.png">', "broken link _images/missing.png"),
])
def test_each_kind_of_problem_is_reported(tmp_path, snippet, expected):
  index = GOOD_INDEX.replace("</body>", snippet + "</body>")
  problems, _, _ = check_html.check_site(_site(tmp_path, index=index))
  assert len(problems) == 1, problems
  assert problems[0].startswith("index.html: " + expected), problems


def test_a_stylesheet_with_a_remote_font_is_reported(tmp_path):
  css = "@font-face { src: url('https://fonts.example.org/a.woff2'); }"
  problems, _, _ = check_html.check_site(_site(tmp_path, css=css))
  assert problems == ["_static/site.css: stylesheet loads a remote url()"]


def test_the_command_line_fails_on_problems_and_passes_a_clean_site(tmp_path, capsys):
  site = _site(tmp_path)
  assert check_html.main([str(site)]) == 0
  assert "4 pages, 9 internal links and resources, 0 problems" in capsys.readouterr().out
  (site / "guide" / "page.html").unlink()
  assert check_html.main([str(site)]) == 1
  assert check_html.main([str(tmp_path / "not-built")]) == 2


def test_the_docs_extra_installs_the_mathjax_the_build_copies():
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())[
      "project"]["optional-dependencies"]
  names = [requirement.split(">")[0].split("=")[0] for requirement in extras["docs"]]
  assert offline_mathjax.DISTRIBUTION in names
  conf = (ROOT / "docs" / "conf.py").read_text()
  assert f'mathjax_path = "{offline_mathjax.TARGET}/{offline_mathjax.COMPONENT}"' in conf


def test_home_page_code_runs_and_fits(capsys):
  text = (ROOT / "docs" / "index.md").read_text()
  first_block = text.split("```python\n", 1)[1].split("```", 1)[0]
  exec(compile(first_block, "index.md", "exec"), {})  # noqa: S102
  printed = capsys.readouterr().out.strip().splitlines()[-1]
  assert printed.startswith("loss ")
  assert float(printed.split()[1]) < 1e-3, printed


def test_every_guide_is_listed_once_in_the_guides_index():
  index = (ROOT / "docs" / "guides" / "index.md").read_text()
  toctree = index.split("```{toctree}", 1)[1].split("```", 1)[0]
  listed = [line.strip() for line in toctree.splitlines()[2:] if line.strip()]
  guides = sorted(p.stem for p in (ROOT / "docs" / "guides").glob("*.md") if p.stem != "index")
  assert sorted(listed) == guides and len(set(listed)) == len(listed)
  for name in listed:  # and each has its line in the tables above
    assert index.count(f"{{doc}}`{name}`") == 1, name


def test_intersphinx_reads_committed_inventories_only():
  """No inventory is fetched: every mapping points at a committed file that
  holds the names the docs use most."""
  import runpy
  import zlib

  conf = runpy.run_path(str(ROOT / "docs" / "conf.py"))
  mapping = conf["intersphinx_mapping"]
  assert set(mapping) == {"jax", "optax", "flax"}
  expected = {"jax": ["jax.jit", "jax.shard_map", "jax.sharding.Mesh", "jax.lax.pmean"],
              "optax": ["optax.chain", "optax.GradientTransformationExtraArgs",
                        "optax.lookahead", "optax.MultiSteps"],
              "flax": ["flax.nnx.Optimizer", "flax.training.train_state.TrainState"]}
  for name, (url, inventory) in mapping.items():
    assert url.startswith("https://") and url.endswith("/")
    path = pathlib.Path(inventory)
    assert path.is_file() and path.is_relative_to(ROOT / "docs" / "_inventories")
    header, _, body = path.read_bytes().partition(b"zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2")
    names = {line.split()[0] for line in zlib.decompress(body).decode().splitlines()}
    assert set(expected[name]) <= names, name


@pytest.mark.parametrize("text, expected", [
    ("optax.chain", "optax.chain"),
    ("optax.chain()", "optax.chain"),
    ("samtx.unperturb", "samtx.unperturb"),
    ("jnp.full_like", "jax.numpy.full_like"),
    ("nnx.Optimizer", "flax.nnx.Optimizer"),
    ("samtx.sam(0.1, rho=0.05)", None),  # a call, not a name
    ("optax.chain(a, b)", None),
    ("numpy.zeros", None),  # not a project the docs link to
    ("grad_fn", None),
    ("optax", None),
])
def test_inline_code_that_spells_a_name_is_linked(text, expected):
  import autolink_literals

  assert autolink_literals.target(text) == expected


def _accidental_lists(text):
  """Lines where a wrapped sentence starts with "1." or "1)": Markdown reads
  them as a numbered list that interrupts the paragraph (and drops the
  list's number from the text)."""
  found, fenced, previous = [], False, ""
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith(("```", "~~~")):
      fenced = not fenced
    elif not fenced and re.match(r"^1[.)] ", line) and previous.strip() and not re.match(
        r"^\s*([-*+]|\d+[.)])\s", previous) and not previous.startswith(("|", "#", "<")):
      found.append((number, line))
    previous = "" if fenced else line
  return found


def test_no_wrapped_sentence_turns_into_a_numbered_list():
  assert _accidental_lists("so it costs\n1. The two\n") == [(2, "1. The two")]
  assert _accidental_lists("Steps:\n\n1. first\n2. second\n") == []
  problems = {str(page.relative_to(ROOT)): _accidental_lists(page.read_text())
              for page in sorted((ROOT / "docs").rglob("*.md")) if "_build" not in page.parts}
  assert {page: found for page, found in problems.items() if found} == {}


def _numbers_and_words(text):
  """Decimal numbers as floats, everything else (`nan` included) as words."""
  number = r"[-+]?\d+\.\d+(?:e[-+]?\d+)?"
  return [float(token) if re.fullmatch(number, token) else token
          for token in re.findall(number + r"|[^\s\d]+|\d+", text)]


@pytest.mark.slow
@pytest.mark.parametrize("page", ["sam", "adasam", "lightsam", "msam"])
def test_optimizer_page_example_prints_what_the_page_shows(page, capsys):
  """The "Try it" code of an optimizer page runs, and prints the output the
  page shows under it (numbers to 2%: another CPU may round differently)."""
  text = (ROOT / "docs" / "optimizers" / f"{page}.md").read_text()
  section = text.split("\n## Try it\n", 1)[1]
  code = section.split("```python\n", 1)[1].split("```", 1)[0]
  shown = section.split("```text\n", 1)[1].split("```", 1)[0]
  exec(compile(code, f"{page}.md", "exec"), {})  # noqa: S102
  printed = capsys.readouterr().out
  got, expected = _numbers_and_words(printed), _numbers_and_words(shown)
  assert len(got) == len(expected), (printed, shown)
  for a, b in zip(got, expected):
    if isinstance(b, float):
      assert isinstance(a, float) and abs(a - b) <= 0.02 * abs(b) + 0.002, (printed, shown)
    else:
      assert a == b, (printed, shown)
