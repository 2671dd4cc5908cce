# Shorthands for developers who have make. The README's commands do not need it:
#   bash tools/quickstart.sh   (make run)      bash tools/test.sh   (make test)
SHELL := /bin/bash

.PHONY: run test lint lock bench clean

run:
	@bash tools/quickstart.sh

test:
	@bash tools/test.sh

lint:
	@bash tools/bootstrap.sh && .venv/bin/ruff check . && .venv/bin/mypy

lock:
	@bash tools/lock.sh

bench:
	@WITH_BENCH=1 bash tools/bootstrap.sh
	.venv/bin/python bench/policyd_bench.py
	.venv/bin/python bench/milter_bench.py

clean:
	rm -rf .venv run *.egg-info
