#!/usr/bin/env bash
# The GPU check, in one command on a fresh CUDA machine without internet access:
#   build (no downloads), the GPU tests, the Triton kernel tests on the device, the GPU benchmarks.
# Every stage has its own time limit; together they stay under 9 minutes. Logs, gpu.json and
# gpu_table.md (the figures for benchmarks/RESULTS.md) go to $OUT (default ./gpu_out).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PYTHON="${PYTHON:-python3}"
started=$(date +%s)
status=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local begin=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - begin )) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || status=1
  return 0
}

: >"$OUT/summary.txt"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1
} >"$OUT/device.txt"
cat "$OUT/device.txt"

stage build 110 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
stage gpu-tests 160 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider
stage kernel-tests 100 "$PYTHON" -m pytest -q tests/test_triton_kernels.py tests/test_triton_lint.py -p no:cacheprovider
stage benchmarks 135 "$PYTHON" benchmarks/bench_gpu.py --out "$OUT" --budget-s 95

echo "total: $(( $(date +%s) - started )) s" | tee -a "$OUT/summary.txt"
for name in gpu-tests kernel-tests; do
  echo "--- $name (tail)"
  tail -n 15 "$OUT/$name.log"
done
echo "--- benchmarks"
[ -f "$OUT/gpu_table.md" ] && cat "$OUT/gpu_table.md" || tail -n 20 "$OUT/benchmarks.log"
exit $status
