# The two README commands: `make run` (the pipeline on the embedded default) and `make test` (the test suite).
# Both start with `make setup`, which is idempotent: Debian packages (when root), the venv from the lock file,
# the project itself, and Horovod built with the project's patch (cached by key; see scripts/build-horovod.sh).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the pipeline needs: Open MPI (ranks, mpi4py and Horovod build against it), a C++ toolchain
# and CMake (the Horovod build), git (runs are tagged with the commit), venv/dev headers for a system Python.
APT_PACKAGES := libopenmpi-dev openmpi-bin g++ cmake make git patch python3-venv python3-dev
# Open MPI refuses to start as root unless told; CI and containers run as root, clusters do not.
ifeq ($(shell id -u),0)
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
endif
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup system-packages run test lint clean
.DEFAULT_GOAL := run

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages: $$missing (run: sudo apt-get install $$missing)"; exit 1; fi; \
	fi

$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml scripts/build-horovod.sh scripts/horovod-0.28.1-torch2.14.patch
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==25.3"
	$(BIN)/python -m pip install -q -r requirements.txt -c requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	scripts/build-horovod.sh --python $(BIN)/python
	touch $@

run: setup
	$(BIN)/snakemake $(SNAKEMAKE_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
