# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv/ and install everything they need on the first run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint clean

$(STAMP): pyproject.toml setup.py csrc/munba_cpu.cpp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,drivers]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m munba_kernels.drivers.toy

# MUNBA_REQUIRE_CPP=1: a missing C++ extension fails the suite instead of skipping its tests.
test: setup
	MUNBA_REQUIRE_CPP=1 $(PY) -m pytest -q

test-all: setup
	MUNBA_REQUIRE_CPP=1 $(PY) -m pytest -q -m ""

lint: setup
	$(VENV)/bin/ruff check munba_kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
