# One entry point for people and CI. Every target installs what it needs
# first (idempotently), so each works on a fresh Debian machine.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: setup test lint demo up bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (3.11+)"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=25

demo: setup
	$(VENV)/bin/stratus demo

up: setup
	$(VENV)/bin/stratus up

bench: setup
	$(PY) -m stratus.ops.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
