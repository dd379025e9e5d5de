# Two commands matter: `make run` (set up, then serve the default model on the embedded default)
# and `make test` (the test suite, exactly what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test lint

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/pixelcam serve

test:
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
