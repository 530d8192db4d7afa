# dbr-builder: every target installs what it needs first (stamp files), so each works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU/CUDA torch wheels; override e.g. TORCH_PKGS="torch==2.14.0 torchvision==0.29.0" to match vLLM.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
WORKDIR ?= work/domainbed
DEMO_WORKDIR ?= work/demo
PYTEST_ARGS ?=

.PHONY: help install install-vllm test test-fast test-vllm demo build-dataset train eval bench lint clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PKGS)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

$(VENV)/.installed-vllm: $(VENV)/.installed
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,vllm]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project with dev extras

install-vllm: $(VENV)/.installed-vllm  ## also install the vLLM engine (GPU machines)

test: $(VENV)/.installed  ## run the test suite (offline, CPU; GPU tests skip without a GPU)
	$(BIN)/pytest -q -m "not gpu" $(PYTEST_ARGS)

# The contract test's own environment: the real vLLM 0.33.0 (its pip takes torch 2.14.0 with it),
# never mixed into $(VENV); no GPU needed (see tests/contract/test_vllm_contract.py).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check vllm==0.33.0
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

test-vllm: $(VLLM_VENV)/.installed  ## contract test against the real vLLM 0.33.0 (own venv .venv-vllm, CPU)
	DBR_CONTRACT_OUT=work/vllm_contract.json $(VLLM_VENV)/bin/pytest -q -p no:cacheprovider -rs tests/contract $(PYTEST_ARGS)

test-fast: $(VENV)/.installed  ## the suite without tests marked slow
	$(BIN)/pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

demo: $(VENV)/.installed  ## the whole pipeline offline on the embedded SynthShapes benchmark (CPU, minutes)
	$(BIN)/dbr run pipelines/demo.yaml --workdir $(DEMO_WORKDIR)

build-dataset: $(VENV)/.installed-vllm  ## build DomainBed-Reasoning (GPU + vLLM); pushes when DBR_HUB_REPO is set
	$(BIN)/dbr run pipelines/domainbed_reasoning.yaml --workdir $(WORKDIR)

train: $(VENV)/.installed  ## fine-tune students with MTCT + SARR (paper recipe, GPU)
	$(BIN)/dbr train --config pipelines/train_mtct_sarr.yaml --workdir $(WORKDIR)

eval: $(VENV)/.installed  ## evaluate the students trained by `make train`
	$(BIN)/dbr eval --config pipelines/eval.yaml --workdir $(WORKDIR)

bench: $(VENV)/.installed  ## CPU benchmarks (numbers printed; recorded in docs/PERFORMANCE.md)
	@for b in bench/bench_*.py; do case $$b in *_gpu.py) continue;; esac; echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: $(VENV)/.installed  ## ruff
	$(BIN)/ruff check .

clean:  ## remove work/ outputs (keeps .venv)
	rm -rf work .pytest_cache .ruff_cache
