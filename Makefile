# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv/ and install everything they need on the first run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

# The demo's data: Debian's dataset-fashion-mnist package (idx files), installed when missing.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo toy language test test-all lint clean

$(STAMP): pyproject.toml setup.py csrc/munba_cpu.cpp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,drivers,hf]"
	touch $(STAMP)

setup: $(STAMP)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

# Fashion-MNIST, random 10% forgetting, every method vs Retrain and the relearning attack (~3 min on
# 2 free cores from an empty cache; the original and Retrain models are cached in ~/.cache/munba_kernels).
demo: setup data
	$(PY) -m munba_kernels.drivers.classify --dataset fashion_mnist --scenario random --out runs/demo

# Seconds: a small MLP on generated clusters, MUNBa vs the summed gradient.
toy: setup
	$(PY) -m munba_kernels.drivers.toy

# TOFU-style language-model unlearning on generated facts and a tiny Llama (a few minutes on 2 cores).
language: setup
	$(PY) -m munba_kernels.drivers.language --out runs/language

# MUNBA_REQUIRE_CPP=1: a missing C++ extension fails the suite instead of skipping its tests.
test: setup
	MUNBA_REQUIRE_CPP=1 $(PY) -m pytest -q

test-all: setup
	MUNBA_REQUIRE_CPP=1 $(PY) -m pytest -q -m ""

lint: setup
	$(VENV)/bin/ruff check munba_kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
