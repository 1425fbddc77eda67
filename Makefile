# Everything a fresh machine with Python 3.11 and make needs:
#   make demo   - create .venv, install samtx, run the main comparison job
#   make test   - create .venv if needed, install, run the whole test suite
# and for CI (.ci/run) and contributors:
#   make docs        - the Sphinx site in docs/_build/html (warnings are errors),
#                      then a check of the built HTML (offline, no broken links)
#   make lint        - ruff (configuration in pyproject.toml)
#   make typecheck   - mypy on samtx/
#   make wheel-smoke - build the wheel, install it without extras in a fresh
#                      venv, import and step it there, remove the venv
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2
DOCS_STAMP := $(VENV)/.docs-stamp
LINT_STAMP := $(VENV)/.lint-stamp
SPHINXOPTS ?= -j 1 -W --keep-going

.PHONY: install test test-fast demo bench-quick bench-accelerator-quick docs lint typecheck wheel-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# --dist loadfile: a test file's tests share one worker, so a module-scoped
# fixture (many compute their references in one fresh process) runs once.
test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q

demo: $(STAMP)
	$(BIN)/python -m samtx.cli compare

# The docs and lint tools come from their own extras, so `make test` stays lean.
$(DOCS_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

$(LINT_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[lint]"
	touch $@

# Then the built site is checked: no CDN or other remote script/stylesheet,
# every internal link and anchor resolves (docs/ext/check_html.py).
docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx $(SPHINXOPTS) -b html docs docs/_build/html
	$(BIN)/python docs/ext/check_html.py docs/_build/html

lint: $(LINT_STAMP)
	$(BIN)/python -m ruff check .

typecheck: $(LINT_STAMP)
	$(BIN)/python -m mypy

wheel-smoke: $(LINT_STAMP)
	$(BIN)/python .ci/wheel_smoke.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/step_time.py --quick
	$(BIN)/python benchmarks/linear_speedup.py --quick

# The accelerator benchmark at tiny widths on ResNet/ViT/GPT, as CI runs it:
# SAM, scheduled SAM at rho_t = 0, their base and optax.contrib.sam (12
# compiled steps, about a minute on 2 cores; every optimizer's entry is built
# and stepped by tests/test_accelerator_benchmark.py, and the committed CPU
# table comes from the whole --quick run). Results go to a scratch directory,
# so CI leaves the committed results alone.
bench-accelerator-quick: $(STAMP)
	$(BIN)/python benchmarks/accelerator.py --quick --only "samtx.sam,samtx.sam [rho schedule at 0]" --out "$$(mktemp -d)/accelerator_quick"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache docs/_build docs/examples dist build
