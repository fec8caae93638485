#!/usr/bin/env bash
# GPU check: run on a machine with an NVIDIA GPU and its own CUDA build of torch (no venv is
# created and torch is not installed: the machine's torch is used).  Builds the extensions in
# place, runs the whole test suite on the GPU, runs the GPU benchmark, and writes logs, JUnit
# XML, JSON results and summary.md into OUTDIR.  Every step runs even if an earlier one fails.
#   usage: scripts/gpu_check.sh OUTDIR
set -u
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
summary="$out/summary.md"
echo "# fused-losses GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))" > "$summary"

run() {  # run NAME CMD...: log to $out/NAME.log, record rc and seconds
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "- $name: rc=$rc, $((SECONDS - t0)) s (\`$*\`)" >> "$summary"
  tail -n 5 "$out/$name.log"
  return 0
}

run env bash -c 'nvidia-smi; python -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; python -c "import triton; print(\"triton\", triton.__version__)"; nvcc --version'
# FUSED_LOSSES_CUDA=1: build fused_losses._cuda (csrc/cuda, sm_80 + sm_90a) or fail loudly.
run build env FUSED_LOSSES_CUDA=1 python -m pip install -e . --no-build-isolation --no-deps
run build_info python -c "import fused_losses, fused_losses._C as C; print(C.build_info()); print('backends:', fused_losses.available_backends()); import fused_losses._cuda as G; print('cuda ext:', G.build_info()); print('cuda backend:', fused_losses.get_backend('cuda').availability() or 'available')"
run tests python -m pytest -q -ra -m "not slow" --junitxml="$out/tests.xml"
run tests_gpu_marked python -m pytest -q -ra -m gpu --junitxml="$out/tests_gpu.xml"
cuda_ok=0
python -c "import fused_losses, sys; sys.exit(fused_losses.get_backend('cuda').availability() is not None)" 2>/dev/null && cuda_ok=1
if ((cuda_ok)); then
  # The suite for the cuda backend alone (test ids carry the backend: "[cuda-..." / "-cuda]").
  run tests_cuda python -m pytest -q -ra tests -k "cuda" --junitxml="$out/tests_cuda.xml"
  # compute-sanitizer is 10-100x slower: the small cuda smoke cases only (every kernel, fp32 and
  # bf16, one partial tile with unaligned rows and several tiles with cp.async-aligned rows),
  # bounded in time.  memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory
  # hazards (the tile loop's barriers).
  for tool in memcheck racecheck; do
    run "sanitizer_$tool" timeout "${SANITIZER_TIMEOUT:-600}" compute-sanitizer --tool "$tool" \
      --error-exitcode 99 python -m pytest -q -x tests/test_cuda_backend.py -k "cuda_small"
  done
else
  echo "- tests_cuda, sanitizers: SKIPPED (cuda backend not available: see build.log)" >> "$summary"
fi
if python -c "import fused_losses.bench" 2>/dev/null; then
  run bench python -m fused_losses.bench --device cuda --out "$out"
  # cuda vs triton vs reference on the ops the cuda backend implements (bench.py takes any
  # registered backend name); these figures are what fused_losses/backends/cuda.py MEASURED_FASTER is filled from.
  if ((cuda_ok)); then
    run bench_cuda python -m fused_losses.bench --device cuda --ops clip supcon ms sinkhorn \
      --backends reference triton cuda --out "$out/cuda_vs_triton"
  fi
else
  echo "- bench: fused_losses.bench not present in this tree" >> "$summary"
fi
grep -hE "^(FAILED|ERROR)|passed|failed" "$out"/tests*.log >> "$summary" 2>/dev/null
cat "$summary"
