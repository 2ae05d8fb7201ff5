# The two entry points of the README. Each sets up its own virtual environment on a fresh machine.
#   make demo   check + train (a few minutes) + report + diagnose of the tiny spec on the built-in corpus, offline
#   make test   the whole test suite (what CI runs)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export FORGE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build that lies on this kind of machine's disk; elsewhere any torch>=2.4.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(VENV)/bin/forge check specs/tiny.toml
	$(VENV)/bin/forge train specs/tiny.toml --run-id $(DEMO_RUN)
	$(VENV)/bin/forge report $(DEMO_RUN)
	# findings (exit 1) or an undecidable verdict (3) are the demo's result, not a make failure; bad input (2) is
	$(VENV)/bin/forge diagnose $(DEMO_RUN); test $$? -ne 2

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .cache
