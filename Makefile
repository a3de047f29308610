SHELL := /bin/bash

VENV        := .venv
PYTHON      := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test bench clean

# Mount the sample stack in layers/ and show what overlaypc does.
demo:
	bash scripts/bootstrap.sh
	$(PYTHON) examples/demo.py

# Run the test suite; pass extra pytest arguments with PYTEST_ARGS="...".
test:
	bash scripts/bootstrap.sh test
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench:
	bash scripts/bootstrap.sh bench
	$(PYTHON) benchmarks/run.py

# --one-file-system: never descend into something still mounted below these dirs.
clean:
	rm -rf --one-file-system $(VENV) .demo-state build dist .pytest_cache .hypothesis *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
