#!/usr/bin/env bash
# Download the wheels that the GPU machine's image lacks (it has torch, torchvision, timm, transformers, peft),
# for Python 3.12 manylinux, at the versions installed in .venv (run ./scripts/setup.sh first):
#   .whl/        pydantic & co., torch-pruning, rich & co.           (benchmarks/h200/llm.sh, benchmarks/speed.py)
#   .whl/cifar/  pydantic & co., torch-pruning, rich, torch-kirigami  (benchmarks/h200/cifar.sh; lean: with the data
#                and the dense model it must fit the 64 MiB carry — rich imports pygments & markdown-it lazily)
# On the device: python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no .venv: run ./scripts/setup.sh first"; exit 2; }
version() { .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
BASE="pydantic pydantic-core annotated-types typing-inspection torch-pruning rich markdown-it-py mdurl pygments"
CIFAR="pydantic pydantic-core annotated-types typing-inspection torch-pruning rich torch-kirigami"
fetch() {  # fetch DEST NAME...
  local dest=$1; shift
  mkdir -p "$dest"
  local specs=()
  for name in "$@"; do specs+=("$name==$(version "$name")"); done
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$dest" "${specs[@]}"
}
# shellcheck disable=SC2086
fetch .whl $BASE
# shellcheck disable=SC2086
fetch .whl/cifar $CIFAR
# NVIDIA ModelOpt, the optional LLM peer (benchmarks/llm_lib/peers.py): not installed in .venv, pinned here;
# PuLP < 3 (PuLP 4 imports orloge and cpsat_logutils); antlr4-python3-runtime (omegaconf's dependency) is a
# source archive only: built into a wheel here
if [ -n "${MODELOPT:-}" ]; then
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
    nvidia-modelopt==0.47.0 torchprofile==0.0.4 "pulp<3" omegaconf==2.3.0 requests urllib3 idna certifi charset-normalizer
  .venv/bin/python -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
fi
du -sh .whl .whl/cifar
