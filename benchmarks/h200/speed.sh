#!/usr/bin/env bash
# Issue #19 on the H200: benchmarks/speed.py's h200 preset, one model per ≤ 10-minute command, results in $OUT.
#
#   bash benchmarks/h200/speed.sh resnet50 [RUN]   # RUN (default 1) names the files: speed_resnet50_run1.json …
#   bash benchmarks/h200/speed.sh gpu-tests        # the CUDA-only tests of deploy fusion and layer timing
#   bash benchmarks/h200/speed.sh depth resnet50 1 # the 3x latency target alone, depth where widths miss
#   BUDGET=230 bash benchmarks/h200/speed.sh resnet50 3   # a shorter run (later MACs targets skipped first)
#   bash benchmarks/h200/speed.sh all 1            # the three models, one command, shorter budgets
#
# The goal's two separate runs are the same command twice, on a fresh machine or at least a fresh process and a
# fresh layer-timing cache (SPARSIFY_CACHE_DIR per run, so the second run times every layer again), then
#   python -m benchmarks.speed_compare run1.json run2.json
# Carry .whl (./scripts/device_wheels.sh: pydantic & co., torch-pruning, rich; .whl/test: pytest for gpu-tests).
# One model takes ~5 minutes of the 380 s budget on the H200 (ResNet-50, 2026-12-04: 277 s).
set -uo pipefail
OUT=${OUT:-out/h200}
BUDGET=${BUDGET:-380}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -d /tmp/site/pydantic ]; then  # once per machine (the next command finds it installed)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    $(ls .whl/test/*.whl 2> /dev/null)
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/card.txt"
case "${1:-}" in
  gpu-tests)
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/deploy/test_fusion.py \
      tests/measure/test_layer_context.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
    ;;
  resnet50|mobilenet_v2|vit_b_16)
    run=${2:-1}
    SPARSIFY_CACHE_DIR=/tmp/sparsify_cache_$1_run$run timeout $((BUDGET + ${PAD:-90})) python3 -m benchmarks.speed \
      --preset h200 --time-budget "$BUDGET" --models "$1" --out "$OUT/speed_$1_run$run.json" \
      > "$OUT/speed_$1_run$run.log" 2>&1
    echo "rc=$?"
    grep -E "│|total" "$OUT/speed_$1_run$run.log" | cut -c1-170 | tail -30
    ;;
  all)  # one run of the three models in one command (~9.5 min): RUN; budgets fitted to 2026-12-04's times
    run=${2:-1}
    for spec in resnet50:190 mobilenet_v2:190 vit_b_16:100; do
      PAD=40 BUDGET=${spec#*:} bash "$0" "${spec%%:*}" "$run" | tail -3  # hard limits sum to 600 s
    done
    ;;
  depth)  # the 3x latency target alone, with --depth (residual branches go where widths miss): MODEL RUN [FLAGS]
    run=${3:-1}  # ViT-B/16 (heads) needs more: BUDGET_DEPTH=430 … depth vit_b_16 1 --latency-iterations 3
    SPARSIFY_CACHE_DIR=/tmp/sparsify_cache_depth_$2_run$run timeout $((${BUDGET_DEPTH:-200} + 60)) python3 -m \
      benchmarks.speed --preset h200 --models "$2" --ratios 2 --arms ours+round --no-tp --latency-targets 3 \
      --modes cuda-graph+bf16 --reference-modes --time-budget "${BUDGET_DEPTH:-200}" "${@:4}" \
      --out "$OUT/depth_$2_run$run.json" > "$OUT/depth_$2_run$run.log" 2>&1
    echo "rc=$?"
    grep -E "│|total" "$OUT/depth_$2_run$run.log" | cut -c1-170 | tail -5
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
