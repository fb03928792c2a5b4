#!/usr/bin/env bash
# Create .venv (once) with everything sparsify, its tests and benchmarks need on a CPU machine.
# torch and torchvision are pinned together (a consistent pair, so a user's own torchvision and transformers code
# imports as is): an unpinned torchvision install would replace torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sparsify-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" \
    -e ".[dev,hf,demo]"
  touch "$stamp"
fi
