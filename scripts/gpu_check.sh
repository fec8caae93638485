#!/usr/bin/env bash
# GPU check: one call of at most 8 minutes on an H100/H200 with its own CUDA build of torch (no
# venv is created and torch is not installed: the machine's torch is used).  In order, each step
# bounded by what is left of the budget (GPU_CHECK_BUDGET seconds, 470 by default) and by its own
# share, and every step runs even if an earlier one fails:
#   env, peers (the peers' wheels carried in .whl/, installed offline into a target dir),
#   build (the extensions in place), gpu tests (everything that runs on the GPU: the triton and
#   cuda cases of the suite, the tests marked gpu incl. the memory test and CUDA-graph capture,
#   the Triton tile-table and TF32 tests), sanitizers (compute-sanitizer memcheck on the cuda
#   and triton smoke cases, racecheck on the cuda ones), bench (ours and the peers on CLIP).
# Logs, JUnit XML, JSON results and summary.md go to OUTDIR.
#   usage: scripts/gpu_check.sh OUTDIR
# Rehearsal without a GPU: GPU_CHECK_REHEARSE=1 scripts/gpu_check.sh OUTDIR runs every step that
# can run here (the pytest selections are collected, not run; the bench runs one tiny CPU case;
# the build is skipped) and the same bookkeeping, so the script's selections and budget logic
# are checked on a CPU machine.
set -u
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
budget=${GPU_CHECK_BUDGET:-470}
rehearse=${GPU_CHECK_REHEARSE:-0}
py=${PYTHON:-python}
t_start=$SECONDS
summary="$out/summary.md"
echo "# fused-losses GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))$( ((rehearse)) && echo ' — REHEARSAL, no GPU')" > "$summary"

run() {  # run NAME SHARE CMD...: at most SHARE seconds and never past the budget
  local name=$1 share=$2; shift 2
  local left=$((budget - (SECONDS - t_start)))
  local limit=$((share < left ? share : left))
  if ((limit < 5)); then
    echo "- $name: SKIPPED (budget of $budget s spent)" >> "$summary"
    return 0
  fi
  local t0=$SECONDS
  echo "=== $name (≤ $limit s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=" TIMED OUT at $limit s"
  echo "- $name: rc=$rc, $((SECONDS - t0)) s$note (\`$*\`)" >> "$summary"
  tail -n 5 "$out/$name.log"
  return 0
}

pytest_run() {  # pytest_run NAME SHARE ARGS...: collected only when rehearsing
  local name=$1 share=$2; shift 2
  if ((rehearse)); then
    run "$name" "$share" "$py" -m pytest -q --collect-only "$@"
  else
    run "$name" "$share" "$py" -m pytest -q -ra --junitxml="$out/$name.xml" "$@"
  fi
}

run env 15 bash -c "nvidia-smi || echo 'no nvidia-smi'; $py -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'; $py -c 'import triton; print(\"triton\", triton.__version__)'; nvcc --version | tail -n 2"

# The peers (inf-cl, siglip-kernel, flash-sinkhorn, …) as wheels carried in .whl/ (no network
# there): installed without dependencies into a target directory on PYTHONPATH.
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
  if ((rehearse)); then
    run peers 30 "$py" -m pip install -q --dry-run --no-index --no-deps "${wheels[@]}"
  else
    run peers 30 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/fused_losses_peers "${wheels[@]}"
    export PYTHONPATH=/tmp/fused_losses_peers${PYTHONPATH:+:$PYTHONPATH}
  fi
else
  echo "- peers: no wheels in .whl/ (the benchmark shows the peers it finds installed)" >> "$summary"
fi

# FUSED_LOSSES_CUDA=1: build fused_losses._cuda (csrc/cuda, sm_80 + sm_90a) or fail loudly.
if ((rehearse)); then
  echo "- build: skipped (rehearsal: the CPU venv's build is the CI's)" >> "$summary"
else
  run build 120 env FUSED_LOSSES_CUDA=1 MAX_JOBS=16 "$py" -m pip install -e . --no-build-isolation --no-deps
fi
run build_info 20 "$py" -c "import fused_losses, fused_losses._C as C; print(C.build_info()); print('backends:', fused_losses.available_backends()); import importlib.util as u; print('cuda ext:', bool(u.find_spec('fused_losses._cuda'))); print('cuda backend:', fused_losses.get_backend('cuda').availability() or 'available'); print('triton backend:', fused_losses.get_backend('triton').availability() or 'available')"

# Everything that runs on the GPU: the backend-parametrized cases of triton and cuda (their ids
# carry the backend), the tests marked gpu (the O(N·D) memory test, CUDA-graph capture), the
# tile-table and TF32 files; the CPU-only backends are CI's.
pytest_run tests 170 tests -m "not slow" -k "triton or cuda or gpu"

# compute-sanitizer is 10-100x slower: the small smoke cases only, bounded in time.
# memcheck: out-of-bounds and misaligned accesses of both GPU backends' kernels; racecheck:
# shared-memory hazards of the cuda backend's hand-written tile loop (cp.async, barriers).
smoke=(tests/test_cuda_backend.py tests/test_triton_backend.py
       -k "cuda_small or agrees_with_deterministic or nan_propagates")
if ((rehearse)); then
  run sanitizer_memcheck 30 "$py" -m pytest -q --collect-only "${smoke[@]}"
  run sanitizer_racecheck 30 "$py" -m pytest -q --collect-only tests/test_cuda_backend.py -k cuda_small
else
  run sanitizer_memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 99 \
    "$py" -m pytest -q -x -p no:cacheprovider "${smoke[@]}"
  run sanitizer_racecheck 30 compute-sanitizer --tool racecheck --error-exitcode 99 \
    "$py" -m pytest -q -x -p no:cacheprovider tests/test_cuda_backend.py -k cuda_small
fi

# Benchmark: ours and the peers found (carried wheels) on CLIP at one size (each backend in a
# fresh process: a few seconds of start-up each).
if ((rehearse)); then
  run bench 60 "$py" -m fused_losses.bench --device cpu --ops clip --sizes 256 --repeats 1 \
    --out "$out/bench"
else
  run bench 90 "$py" -m fused_losses.bench --device cuda --ops clip --sizes 32768 --out "$out/bench"
fi

grep -hE "^(FAILED|ERROR)|passed|failed|tests collected|selected" "$out"/tests*.log "$out"/sanitizer*.log >> "$summary" 2>/dev/null
echo "- total: $((SECONDS - t_start)) s of a $budget s budget" >> "$summary"
cat "$summary"
