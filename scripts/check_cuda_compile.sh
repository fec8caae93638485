#!/usr/bin/env bash
# Compiles every torch-free CUDA source under csrc/cuda for sm_80 and sm_90a and fails on any
# compile error or on any register spill reported by ptxas (-Xptxas -v), so CUDA code cannot rot
# on a machine without a GPU.  Prints registers / stack / spills per kernel and architecture.
# No .cu files: nothing to do (exit 0).  No nvcc: exit 0 with a warning, except in CI (CI=true),
# where it is a failure.
#
# Two more checks, since nothing of csrc/cuda can be executed on a machine without a GPU:
# - host test of the kernels' per-element/per-line math (csrc/cuda/tile_math.h, the very
#   functions the kernels call): csrc/cuda/tests/test_tile_math.cpp, built with the host
#   compiler and run;
# - syntax check of the torch bindings (csrc/bindings_cuda.cpp) with g++ -fsyntax-only against
#   the installed torch's headers and the CUDA toolkit's include dir.  Possible because the
#   bindings include no ATen/cuda or c10/cuda header (those need a CUDA build of torch).  Needs
#   a Python with torch (.venv/bin/python, else python3); without one it is skipped with a
#   warning, except in CI, where it is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if ((${#sources[@]} == 0)); then
  echo "check_cuda_compile: no .cu files under csrc/cuda yet; nothing to compile"
  exit 0
fi
if ! command -v nvcc >/dev/null; then
  if [[ "${CI:-}" == "true" ]]; then
    echo "check_cuda_compile: ERROR: nvcc not found on the CI machine" >&2
    exit 1
  fi
  {
    echo "************************************************************************"
    echo "check_cuda_compile: nvcc NOT FOUND: the CUDA sources were NOT compiled."
    echo "(skipped outside CI; in CI this is a failure)"
    echo "************************************************************************"
  } >&2
  exit 0
fi
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
echo "check_cuda_compile: $(nvcc --version | tail -n 2 | head -n 1)"
# The same flags as setup.py's nvcc build (minus -lineinfo), so the register counts are the build's.
for src in "${sources[@]}"; do
  name=$(basename "$src" .cu)
  log="$out/$name.log"
  if ! nvcc -std=c++17 -O3 -Xptxas -v -Icsrc \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
      -c "$src" -o "$out/$name.o" >"$log" 2>&1; then
    cat "$log"
    echo "FAILED (compile error): $src"
    status=1
    continue
  fi
  # ptxas -v, per function:  Compiling entry function 'K' for 'sm_XX' / Function properties for F
  # / "N bytes stack frame, S bytes spill stores, L bytes spill loads" / Used R registers.
  # Summary lines are "  arch regs stack spill_st spill_ld kernel"; a line starting with SPILL
  # marks any function (entry or not) with non-zero spills.
  report=$(awk '
    /Compiling entry function/ { split($0, q, "'\''"); entry = q[2]; arch = q[4] }
    /Function properties for/  { fn = $NF }
    /bytes spill stores/ {
      for (i = 1; i <= NF; i++) {
        if ($(i+1) == "bytes" && $(i+2) == "stack") stack = $i
        if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) ~ /^stores/) st = $i
        if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) ~ /^loads/) ld = $i
      }
      if (st + 0 > 0 || ld + 0 > 0) printf "SPILL %s %s stores=%s loads=%s\n", arch, fn, st, ld
    }
    /Used [0-9]+ registers/ {
      for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i+1)
      printf "  %-6s %4s regs  stack %5s  spill st/ld %s/%s  %s\n", arch, regs, stack, st, ld, entry
      stack = st = ld = "-"
    }' "$log" | demangle)
  echo "$src:"
  grep -v "^SPILL" <<<"$report" | grep . || true
  if grep -q '^SPILL' <<<"$report"; then
    grep '^SPILL' <<<"$report"
    echo "FAILED (register spills): $src"
    status=1
  elif grep -q 'Compiling entry function' "$log" && ! grep -q 'bytes spill stores' "$log"; then
    echo "FAILED: kernels compiled but no ptxas spill report parsed for $src (format changed?)"
    cat "$log"
    status=1
  elif ! grep -q 'Compiling entry function' "$log"; then
    echo "ok (no kernel instantiated): $src"
  else
    echo "ok: $src"
  fi
done

# ---- host test of the tile math (executes the kernels' per-element functions on the CPU)
cxx=${CXX:-g++}
for t in csrc/cuda/tests/test_*.cpp; do  # (emulation_api.cpp: built by tests/test_cuda_emulation.py)
  exe="$out/$(basename "$t" .cpp)"
  if ! "$cxx" -std=c++17 -O2 -Wall -Wextra -Icsrc "$t" -o "$exe" >"$exe.log" 2>&1; then
    cat "$exe.log"
    echo "FAILED (host test does not compile): $t"
    status=1
  elif ! "$exe"; then
    echo "FAILED (host test): $t"
    status=1
  else
    echo "ok (host test ran): $t"
  fi
done

# ---- syntax check of the torch bindings
if [[ -f csrc/bindings_cuda.cpp ]]; then
  py=python3
  [[ -x .venv/bin/python ]] && py=.venv/bin/python
  cuda_inc=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="\(.*\)".*/\1/p' | head -n 1)
  if torch_flags=$("$py" -c 'import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-isystem " + p for p in include_paths() + [sysconfig.get_paths()["include"]]))' 2>/dev/null); then
    # shellcheck disable=SC2086
    if "$cxx" -fsyntax-only -std=c++17 -Icsrc $torch_flags $cuda_inc \
        -DTORCH_EXTENSION_NAME=_cuda -DTORCH_API_INCLUDE_EXTENSION_H csrc/bindings_cuda.cpp \
        >"$out/bindings.log" 2>&1; then
      echo "ok (g++ -fsyntax-only against $("$py" -c 'import torch; print(torch.__version__)')): csrc/bindings_cuda.cpp"
    else
      cat "$out/bindings.log"
      echo "FAILED (syntax check): csrc/bindings_cuda.cpp"
      status=1
    fi
  elif [[ "${CI:-}" == "true" ]]; then
    echo "FAILED: no Python with torch to syntax-check csrc/bindings_cuda.cpp" >&2
    status=1
  else
    echo "WARNING: csrc/bindings_cuda.cpp NOT syntax-checked (no Python with torch found)" >&2
  fi
fi
exit $status
