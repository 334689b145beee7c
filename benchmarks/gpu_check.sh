#!/usr/bin/env bash
# One-shot GPU check: install without dependencies, build the C++/CUDA extension, run the decode kernel's
# tests and then the GPU tests (fp32/fp16/bf16), `ptv2-fast bench` on every preset (serve-decode times the
# CUDA decode kernel against the naive cache-copy path) and `ptv2-fast e2e` on bert-large and llama-1b,
# writing every log and result into one folder. Stops itself inside the time budget.
#
#   benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS=420]
#
# For a machine with a GPU and no network whose Python already has torch, triton and pytest.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-420}
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $py -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -5
  $py -c "import ptv2_fast; print('ptv2_fast', ptv2_fast.__version__)"
} > "$out/env.log" 2>&1
cat "$out/env.log"

# The extension (CPU + CUDA sources, sm_80/sm_90 plus this GPU's arch), built once into a cache in $out so
# the tests' processes load it instead of compiling; then the decode kernel's tests first (they are quick).
export PTV2_FAST_EXT_CACHE="$out/ext_cache"
MAX_JOBS=${MAX_JOBS:-16} timeout 300 $py -m ptv2_fast._ext --cuda > "$out/ext_build.log" 2>&1
echo "ext build rc=$?" >> "$out/ext_build.log"
tail -n 3 "$out/ext_build.log"
timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_decode.py 2>&1 | tail -n 40 > "$out/decode_tests.log"
tail -n 3 "$out/decode_tests.log"

# GPU tests: the whole suite runs on the GPU when one is present; -m gpu adds the large shapes. The
# ahead-of-time compile test is for machines without a GPU and is skipped here. xdist if installed.
workers=$($py -c "import xdist" 2>/dev/null && echo "-n 4" || echo "")
timeout $(( $(left) * 55 / 100 )) $py -m pytest -q -p no:cacheprovider $workers tests \
  --ignore=tests/test_gpu_compile.py 2>&1 | tail -n 80 > "$out/tests.log"
echo "tests rc=${PIPESTATUS[0]}" >> "$out/tests.log"
tail -n 5 "$out/tests.log"

# Op benchmarks: every preset (JSON + PNG plots per preset), bf16, then the NLU shape in fp16.
for preset in ptv2-nlu serve-decode decoder-train; do
  [ "$(left)" -gt 60 ] || { echo "budget spent before bench $preset" | tee -a "$out/bench.log"; break; }
  timeout $(( $(left) - 30 )) $py -m ptv2_fast.cli bench --preset "$preset" --dtype bf16 --reps 20 --warmup 5 \
    --out "$out" 2>&1 | tee -a "$out/bench.log"
done
if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 30 )) $py -m ptv2_fast.cli bench --preset nlu --dtype fp16 --reps 20 --warmup 5 \
    --json "$out/bench_nlu_fp16.json" 2>&1 | tee -a "$out/bench.log"
fi

# End to end, PEFT vs patched (and the prefix-free model), at GPU sizes with random weights.
for model in bert-large llama-1b; do
  [ "$(left)" -gt 45 ] || { echo "budget spent before e2e $model" | tee -a "$out/e2e.log"; break; }
  timeout $(( $(left) - 10 )) $py -m ptv2_fast.cli e2e "$model" --dtype bf16 \
    --json "$out/e2e_${model}_bf16.json" 2>&1 | tee -a "$out/e2e.log"
done
echo "gpu_check done in $(( $(date +%s) - start )) s" | tee -a "$out/bench.log"
