#!/usr/bin/env bash
# Compiles every torch-free CUDA source under csrc/cuda for sm_80 and sm_90a and fails on any
# error or on register spills (ptxas -v), so CUDA code cannot rot on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if ((${#sources[@]} == 0)); then
  echo "check_cuda_compile: no .cu files under csrc/cuda yet; nothing to compile"
  exit 0
fi
if ! command -v nvcc >/dev/null; then
  if [[ "${CI:-}" == "true" ]]; then echo "nvcc not found on the CI machine" >&2; exit 1; fi
  echo "check_cuda_compile: nvcc not found; skipped (this is an error in CI)"; exit 0
fi
out=$(mktemp -d)
status=0
for src in "${sources[@]}"; do
  log="$out/$(basename "$src").log"
  if ! nvcc -std=c++17 -O3 -Xptxas -v -Icsrc \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -c "$src" -o "$out/$(basename "$src").o" >"$log" 2>&1; then
    cat "$log"; echo "FAILED: $src"; status=1; continue
  fi
  if grep -E "bytes spill (stores|loads)" "$log" | grep -vqE " 0 bytes spill stores, 0 bytes spill loads"; then
    grep -B2 -E "[1-9][0-9]* bytes spill" "$log" || true
    echo "SPILLS: $src"; status=1
  fi
  grep -E "Compiling entry|Used [0-9]+ registers" "$log" | paste - - | \
    sed -E "s/.*entry function '([^']+)'.*for '(sm_[0-9a]+)'.*Used ([0-9]+) registers.*/  \2 \3 regs \1/" || true
  echo "ok: $src"
done
exit $status
