# The README's commands. Each one sets up what it needs (a venv in .venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

## the main job: segment the bundled sample, write .seg.nrrd + PNG preview, print a summary
demo: setup
	$(VENV)/bin/deepseg demo --output deepseg_demo

## the test suite (what CI runs): lint, then every test not marked slow
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not slow" Testing

test-slow: setup
	$(PY) -m pytest -q -m slow Testing

bench: setup
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test,bench]"
	$(PY) Testing/Benchmarks/run_all.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) deepseg_demo .pytest_cache
