#!/usr/bin/env bash
# One prepared GPU check (`make gpu-check`), for a lent GPU machine with no network: builds the
# extension in place with that machine's python3/torch, runs the GPU tests and the GPU benchmarks,
# and writes everything under $OUT (default bench/results/gpu-<date>). Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "command: make gpu-check"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

t0=$(date +%s)
timeout 300 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED (see build.log)"; tail -30 "$OUT/build.log"; }
echo "build: $(( $(date +%s) - t0 )) s"
$PY -m dualvar.kernels.info | tee "$OUT/info.txt"

# Inf-CL, the anchor of the contrastive benchmark: its wheel travels in bench/vendor/ (`make bench-vendor`
# downloads it; the GPU machine has no network). Pure Python on Triton, so no build.
if ls bench/vendor/inf_cl-*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index bench/vendor/inf_cl-*.whl > "$OUT/infcl_install.log" 2>&1 || echo "inf-cl install failed"
else
  echo "no bench/vendor/inf_cl-*.whl: the Inf-CL comparison will be left out"
fi

# GPU tests first (correctness), then the benchmark table.
timeout 150 $PY -m pytest tests -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
timeout 240 $PY -m pytest bench -q --benchmark-only -k "cuda" -p no:cacheprovider \
  --benchmark-columns=median,iqr,min,rounds --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | tail -40
echo "total: $(( $(date +%s) - t0 )) s; results in $OUT"
