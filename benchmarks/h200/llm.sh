#!/usr/bin/env bash
# Issue #20 on the H200 in one ≤ 10-minute command: train the LLaMA-style and the MoE decoder on the
# offline corpus (token budgets: deterministic), then the pruning sweep on each (benchmarks/llm.py).
# Needs lmdata/corpus (python -m benchmarks.llm_lib.corpus) and the wheels the GPU image lacks in .whl/
# (MODELOPT=1 ./scripts/device_wheels.sh). Carry lmdata/corpus and .whl only (lmdata/ also holds the corpus's
# source wheels: 41 MB).
set -uo pipefail
OUT=${OUT:-out/h200}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
LLAMA_TOKENS=${LLAMA_TOKENS:-40000000}
MOE_TOKENS=${MOE_TOKENS:-24000000}
LLAMA_METHODS=${LLAMA_METHODS:-activation,magnitude,taylor,fluctuation,depth,hidden,tp_magnitude,tp_taylor,modelopt}
MOE_METHODS=${MOE_METHODS:-experts,depth,activation,tp_magnitude}
python3 -m benchmarks.llm_train --model llama --minutes 0 --tokens "$LLAMA_TOKENS" --out out/lm/llama \
  > "$OUT/train_llama.log" 2>&1 &
llama=$!
python3 -m benchmarks.llm_train --model moe --minutes 0 --tokens "$MOE_TOKENS" --out out/lm/moe \
  > "$OUT/train_moe.log" 2>&1 &
moe=$!
wait $llama; wait $moe
tail -3 "$OUT/train_llama.log" "$OUT/train_moe.log"
python3 -m benchmarks.llm --model-dir out/lm/llama --out out/llm/llama --device cuda --max-minutes "${LLAMA_MINUTES:-2.5}" \
  --methods "$LLAMA_METHODS" --results-json "$OUT/llm_llama.json" > "$OUT/llm_llama.log" 2>&1
python3 -m benchmarks.llm --model-dir out/lm/moe --out out/llm/moe --device cuda --max-minutes "${MOE_MINUTES:-2.5}" \
  --methods "$MOE_METHODS" --results-json "$OUT/llm_moe.json" > "$OUT/llm_moe.log" 2>&1
cp out/llm/llama/report.md "$OUT/llm_llama.md"; cp out/llm/moe/report.md "$OUT/llm_moe.md"
cp out/lm/llama/training.json "$OUT/training_llama.json"; cp out/lm/moe/training.json "$OUT/training_moe.json"
tar czf "$OUT/llm_runs.tgz" out/llm
if [ -n "${KEEP_LLAMA:-}" ]; then tar cf - out/lm/llama | split -b 15M - "$OUT/llama_model.tar.part"; fi
ls -la "$OUT"
