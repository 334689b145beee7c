#!/usr/bin/env bash
# One-shot GPU check, under a time budget, in order of what matters most:
#   0. the profile probe (benchmarks/gpu_probe.py: the op at the BERT-large layer shape as HF calls it, dropout 0
#      and 0.1, and a warm BERT-large training step and inference pass, PEFT vs patched; at most 240 s);
#   1. the GPU tests (Triton kernels and the sdpa backend in fp32/fp16/bf16, torch.compile/CUDA graphs, the HF
#      patch on the GPU);
#      meanwhile the C++/CUDA extension builds in the background, then the decode kernel's tests run;
#   2. `ptv2-fast e2e bert-large` (50 training steps, PEFT vs patched);
#   3. `ptv2-fast bench --preset ptv2-nlu` (bf16);
#   4. `ptv2-fast e2e llama-1b` (50 training steps);
#   5. `ptv2-fast bench --preset decoder-train`, then `serve-decode` (needs the CUDA extension).
# Every log, JSON and plot goes into OUT_DIR/run/, which is packed into OUT_DIR/gpu_check.tgz at the end;
# OUT_DIR/summary.log holds the headline lines as they come.
#
#   benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS=420]
#
# STAGES (default: all) picks a subset: probe tests ext e2e-bert-large bench-ptv2-nlu e2e-llama-1b
# bench-decoder-train bench-serve-decode. Failures are also appended to run/failures.log as they happen.
#
# For a machine with a GPU and no network whose Python already has torch, triton, transformers, peft and pytest.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-420}
run="$out/run"
mkdir -p "$run"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$out/summary.log"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
py=${PYTHON:-python3}
stages=" ${STAGES:-probe tests ext e2e-bert-large bench-ptv2-nlu e2e-llama-1b bench-decoder-train bench-serve-decode} "
want() { [[ "$stages" == *" $1 "* ]]; }
export PTV2_FAST_FAILURE_LOG="$(cd "$run" && pwd)/failures.log"
pack() { tar -C "$out" -czf "$out/gpu_check.tgz" --exclude=run/ext_cache run 2>/dev/null; say "packed"; }
trap pack EXIT

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1
  $py -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  $py -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -5
  $py -c "import ptv2_fast; print('ptv2_fast', ptv2_fast.__version__)"
} > "$run/env.log" 2>&1
cat "$run/env.log" | tee -a "$out/summary.log"

# The extension (CPU + CUDA sources) builds in the background into a cache in $run, then the decode tests.
export PTV2_FAST_EXT_CACHE="$run/ext_cache"
ext_pid=
if want ext; then (
  MAX_JOBS=6 timeout 300 $py -m ptv2_fast._ext --cuda > "$run/ext_build.log" 2>&1
  echo "ext build rc=$?" >> "$run/ext_build.log"
  timeout 150 $py -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_decode.py > "$run/decode_tests.log" 2>&1
  echo "decode tests rc=$?" >> "$run/decode_tests.log"
  if grep -q "Segmentation fault" "$run/decode_tests.log" && command -v cuda-gdb > /dev/null; then
    timeout 120 cuda-gdb -q -batch -ex run -ex bt --args $py -m pytest -q -p no:cacheprovider tests/test_decode.py \
      -k "checks_its_inputs" > "$run/decode_segv_bt.log" 2>&1
  fi
) &
  ext_pid=$!
fi

# 0. The profile probe: where the time of a call and of a BERT-large step goes (device time, kernels, syncs).
if want probe && [ "$(left)" -gt 30 ]; then
  PTV2_FAST_DISABLE_EXT=1 timeout $(( $(left) < 240 ? $(left) : 240 )) $py -m ptv2_fast.benchmarks.gpu_probe "$run/probe" \
    > "$run/probe.log" 2>&1
  say "probe rc=$?"; grep -v '^USDT' "$run/probe.log" | tail -n 20 | tee -a "$out/summary.log"
fi

# 1. GPU tests. The tests that only exercise the CPU extension, packaging or the CPU training loop ran in CI;
# they are left out here, and the extension is off for these processes (the background build owns it).
workers=$($py -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-8}" || echo "")
if want tests; then
  # the gpu-marked matrix first (fp32/fp16/bf16 against fp64, large shapes): Triton compiles on a fresh machine
  # took over 180 s for the whole selection on the H100, so what matters most runs before the budget is spent
  tests_end=$(( $(date +%s) + $(left) * ${TESTS_SHARE:-45} / 100 ))
  files="tests/test_prefix_attention.py tests/test_sdpa_backend.py tests/test_dropout.py tests/test_merge.py
    tests/test_checks.py tests/test_torch_integration.py tests/test_hf_patch.py tests/test_hf_peft.py
    tests/test_reference_backend.py"
  for sel in "gpu" "not gpu"; do
    PTV2_FAST_DISABLE_EXT=1 timeout $(( tests_end - $(date +%s) > 10 ? tests_end - $(date +%s) : 10 )) \
      $py -m pytest -q -p no:cacheprovider $workers -rfE --tb=short -m "$sel" $files > "$run/tests_${sel// /_}.log" 2>&1
    say "gpu tests (-m '$sel') rc=$? $(tail -n 1 "$run/tests_${sel// /_}.log")"
  done
fi
[ -f "$run/failures.log" ] && say "$(grep -c '^===' "$run/failures.log") failures: $(grep '^===' "$run/failures.log" | head -n 40)"

e2e() {  # model: 50 training (and inference) steps, PEFT vs patched
  want "e2e-$1" || return
  [ "$(left)" -gt 60 ] || { say "budget spent before e2e $1"; return; }
  timeout $(( $(left) - 20 )) $py -m ptv2_fast.cli e2e "$1" --dtype bf16 --steps 50 --variants peft,patched \
    --json "$run/e2e_${1}_h100.json" > "$run/e2e_${1}.log" 2>&1
  say "e2e $1 rc=$?"; tail -n 9 "$run/e2e_${1}.log" | tee -a "$out/summary.log"
}
bench() {  # preset
  want "bench-$1" || return
  [ "$(left)" -gt 60 ] || { say "budget spent before bench $1"; return; }
  timeout $(( $(left) - 20 )) $py -m ptv2_fast.cli bench --preset "$1" --dtype bf16 --reps 20 --warmup 5 \
    --out "$run" > "$run/bench_$1.log" 2>&1
  say "bench $1 rc=$?"; tail -n 30 "$run/bench_$1.log" | tee -a "$out/summary.log"
}
e2e bert-large
bench ptv2-nlu
e2e llama-1b
bench decoder-train
if [ -n "$ext_pid" ]; then
  wait "$ext_pid"
  say "$(tail -n 1 "$run/ext_build.log")"; say "$(grep -v '^  ' "$run/decode_tests.log" | tail -n 3 | tr '\n' ' ')"
fi
bench serve-decode
say "gpu_check done in $(( $(date +%s) - start )) s"
