#!/usr/bin/env bash
# GPU check for a lent GPU machine: vLLM (teacher path, adapter served direct / merged, start failure),
# the transformers fallback and the training benchmark; prints one table (see bench/gpu_check.py).
# Uses the vLLM contract environment (.venv-vllm: vllm==0.33.0 + this project), made by `make` if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s .venv-vllm/.installed
exec .venv-vllm/bin/python bench/gpu_check.py "$@"
