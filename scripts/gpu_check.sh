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
run build python -m pip install -e . --no-build-isolation --no-deps
run build_info python -c "import fused_losses, fused_losses._C as C; print(C.build_info()); print('backends:', fused_losses.available_backends())"
run tests python -m pytest -q -ra -m "not slow" --junitxml="$out/tests.xml"
run tests_gpu_marked python -m pytest -q -ra -m gpu --junitxml="$out/tests_gpu.xml"
# memcheck is 10-100x slower: only the small-shape CUDA tests, and bounded in time.  rc=5 means
# no test matched (fine); the log says which ran.
if python -c "import fused_losses, sys; sys.exit(fused_losses.get_backend('cuda').availability() is not None)" 2>/dev/null; then
  run sanitizer timeout "${SANITIZER_TIMEOUT:-600}" compute-sanitizer --tool memcheck \
    --error-exitcode 99 python -m pytest -q -x tests -k "cuda and small"
else
  echo "- sanitizer: skipped (cuda backend not available)" >> "$summary"
fi
if python -c "import fused_losses.bench" 2>/dev/null; then
  run bench python -m fused_losses.bench --device cuda --out "$out"
else
  echo "- bench: fused_losses.bench not present in this tree" >> "$summary"
fi
grep -hE "^(FAILED|ERROR)|passed|failed" "$out"/tests*.log >> "$summary" 2>/dev/null
cat "$summary"
