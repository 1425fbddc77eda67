# Everything a fresh machine with Python 3.11 and make needs:
#   make demo   - create .venv, install samtx, run the main comparison job
#   make test   - create .venv if needed, install, run the whole test suite
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: install test test-fast demo bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

demo: $(STAMP)
	$(BIN)/python -m samtx.cli compare

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/step_time.py --quick
	$(BIN)/python benchmarks/linear_speedup.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
