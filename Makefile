# The two set-up commands of the README: `make run` (the suite, on a fresh Debian 12, as root) and
# `make test` (the whole test suite against real Postfix and Redis). Both are idempotent.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3

.PHONY: run test deps venv lint bench clean

deps:
	@bash tools/install-system-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

run: deps venv
	@bash tools/quickstart.sh

test: deps venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	@WITH_BENCH=1 bash tools/install-system-deps.sh
	$(VENV)/bin/python bench/policyd_bench.py

clean:
	rm -rf $(VENV) run *.egg-info
