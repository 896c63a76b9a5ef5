#!/usr/bin/env bash
# One prepared GPU check (`make gpu-check`), for a lent GPU machine with no network: builds the
# extension in place with that machine's python3/torch, runs the GPU tests and the GPU benchmarks,
# and writes everything under $OUT (default bench/results/gpu-<date>). Budget: under 8 minutes, kept
# by giving each stage at most what is left of it; every stage's exit status goes to status.txt and
# the script exits non-zero if any stage failed. Carry bench/vendor (the Inf-CL wheel) to the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1  # no network there: never let pip try
t0=$(date +%s)
rc=0
: > "$OUT/status.txt"

# stage NAME CAP_S COMMAND...: runs COMMAND under min(CAP_S, time left), records its exit status.
stage() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - t0) ))
  (( left < cap )) && cap=$left
  if (( cap < 10 )); then
    echo "$name: not run (budget spent)" | tee -a "$OUT/status.txt"; rc=1; return 1
  fi
  local s=$(date +%s)
  timeout "$cap" "$@"
  local st=$?
  echo "$name: exit $st in $(( $(date +%s) - s )) s (limit $cap s)$([ $st = 124 ] && echo ', TIMED OUT')" \
    | tee -a "$OUT/status.txt"
  (( st != 0 )) && rc=1
  return $st
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "command: make gpu-check"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if ! stage build 200 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log); stopping"; tail -30 "$OUT/build.log"; exit 1
fi
stage info 30 $PY -m dualvar.kernels.info > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"
# Without a visible GPU every gpu test skips and pytest exits 0: fail here instead.
stage cuda_visible 30 $PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" \
  >> "$OUT/info.txt" 2>&1

# Inf-CL, the anchor of the contrastive benchmark: its wheel travels in bench/vendor/ (`make bench-vendor`
# downloads it). Pure Python on Triton, so no build.
if ls bench/vendor/inf_cl-*.whl >/dev/null 2>&1; then
  stage infcl 60 $PY -m pip install --no-deps --no-index bench/vendor/inf_cl-*.whl > "$OUT/infcl_install.log" 2>&1
else
  echo "no bench/vendor/inf_cl-*.whl: the Inf-CL comparison will be left out" | tee -a "$OUT/status.txt"
fi

# GPU tests first (correctness), then the benchmarks, one file at a time so that a timeout in one
# keeps the others' JSON. `-m gpu` selects every test that needs a GPU (tests/conftest.py marks each
# needs_gpu test) and the GPU-relevant ones that also run elsewhere (the fp16 backward scaling of the
# contrastive kernels, the check that the CUDA kernels were built).
stage gpu_tests 200 $PY -m pytest tests -q -m gpu -p no:cacheprovider -rs > "$OUT/gpu_tests.txt" 2>&1
tail -15 "$OUT/gpu_tests.txt"
for b in permute_frames shuffle_rank contrastive; do
  stage "bench_$b" 150 $PY -m pytest "bench/test_bench_$b.py" -q --benchmark-only -k cuda -p no:cacheprovider \
    --benchmark-columns=median,iqr,min,rounds --benchmark-json="$OUT/bench_$b.json" > "$OUT/bench_$b.txt" 2>&1
  tail -20 "$OUT/bench_$b.txt"
done
# A short pretraining of R(2+1)D-10 (bf16, channels_last_3d, fused kernels) on a generated synthetic set:
# the whole training path on the GPU. It decodes real video files, so it needs decord or PyAV there.
if $PY -c "import decord" 2>/dev/null || $PY -c "import av" 2>/dev/null; then
  stage gpu_train 120 $PY bench/gpu_train.py --out "$OUT/gpu_train.json" > "$OUT/gpu_train.txt" 2>&1
  tail -15 "$OUT/gpu_train.txt"
else
  echo "gpu_train: not run (neither decord nor av imports on this machine)" | tee -a "$OUT/status.txt"
fi
# Memory vs global batch (R(2+1)D-10, 16x112x112, bf16): the largest batch that fits one card with (a) plain
# torch losses and (b) the fused ones, then (c) fused + gradient caching at 16,384 clips. Last: what is left
# of the budget decides how much of it runs (each stage records its exit status).
stage memory_ab 120 $PY bench/memory_vs_batch.py --device cuda --backbone r2plus1d_10 --frames 16 --crop 112 \
  --precision bf16 --modes ab --search --start 64 --resolution 32 --max 8192 --repeat 1 \
  --out "$OUT/memory_vs_batch_gpu.md" > "$OUT/memory_ab.txt" 2>&1
stage memory_c 150 $PY bench/memory_vs_batch.py --device cuda --backbone r2plus1d_10 --frames 16 --crop 112 \
  --precision bf16 --modes c --chunk 32 --batches 16384 --repeat 0 --timeout 140 \
  --out "$OUT/memory_vs_batch_gpu.md" --append > "$OUT/memory_c.txt" 2>&1
tail -20 "$OUT/memory_vs_batch_gpu.md" 2>/dev/null
echo "total: $(( $(date +%s) - t0 )) s; results in $OUT; overall exit $rc"
cat "$OUT/status.txt"
exit $rc
