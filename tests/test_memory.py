"""No N×N in fused paths (non-negotiable): peak memory measured, not assumed.

Each case runs forward+backward in a fresh subprocess and compares its peak RSS growth (VmHWM,
after the inputs exist and one small warm-up call has loaded everything; see bench.PeakRSS for
why not ru_maxrss) with the size of ONE N×N fp32 matrix.  The reference backend is measured
too, as the control that shows the test can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import supports

import fused_losses as FL

N, D = 8192, 32
NN_BYTES = N * N * 4  # one N×N fp32 matrix: 256 MiB

CHILD = r"""
import json, sys, torch
import fused_losses as FL
from fused_losses.bench import PeakRSS
op, backend, n, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
x = torch.randn(n, d, requires_grad=True); y = torch.randn(n, d, requires_grad=True)
labels = torch.randint(0, 64, (n,))
def run(x, y, labels):
    if op == "clip":
        return FL.clip_loss(x, y, 10.0, backend=backend)
    if op == "supcon":
        return FL.sup_con(x, labels, backend=backend)
    if op == "siglip":
        return FL.siglip_loss(x, y, 10.0, -10.0, backend=backend)
    if op == "ms":
        return FL.multi_similarity(x, labels, backend=backend)
    if op == "swav":  # 2 crops of N/2 rows against N prototypes: B×K = N²/2 scores per crop
        return FL.swav_loss(x, y, backend=backend)
    return FL.sinkhorn(x, y, n_iters=2, backend=backend)
small = [t[:64].detach().requires_grad_() for t in (x, y)]
run(small[0], small[1], labels[:64]).backward()  # warm-up: libraries, thread pools
with PeakRSS() as mem:
    run(x, y, labels).backward()
print(json.dumps({"extra_bytes": mem.extra_bytes}))
"""


def _extra_bytes(op: str, backend: str, n: int = N, d: int = D) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, op, backend, str(n), str(d)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


OPS = {"clip": "info_nce", "supcon": "info_nce", "siglip": "siglip", "ms": "multi_similarity",
       "sinkhorn": "ot_softmin", "swav": "pairwise_softmax_matmul"}


@pytest.mark.parametrize("op", list(OPS))
def test_cpu_backend_never_holds_an_nxn_matrix(op):
    if "cpu" not in FL.available_backends():
        pytest.fail("the cpu backend must be built for this test: "
                    + str(FL.get_backend("cpu").availability()))
    assert supports("cpu", OPS[op]), f"the cpu backend must implement {OPS[op]}"
    extra = _extra_bytes(op, "cpu")
    # Inputs, their grads and per-thread O(M·D) buffers are a few MiB at D=32.
    assert extra < NN_BYTES / 8, f"{op}: peak grew by {extra / 2**20:.0f} MiB (N×N = 256 MiB)"


def test_reference_control_does_hold_nxn():
    """The measurement can fail: the reference (which materializes) exceeds one N×N."""
    extra = _extra_bytes("clip", "reference", n=4096)
    assert extra > 4096 * 4096 * 4, f"reference grew by only {extra / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gpu_backend", [
    pytest.param(b, marks=pytest.mark.skipif(b not in FL.available_backends(),
                                             reason=f"{b} backend not available"))
    for b in ("triton", "cuda")])
def test_gpu_clip_extra_memory_is_o_nd(gpu_backend):
    backend = gpu_backend
    """Issue 3's bound: clip_loss fwd+bwd at N=65536, D=512, bf16 allocates < 64 MiB beyond the
    inputs and their gradients (one N×N fp32 matrix would be 16 GiB).  Allocator peak, measured
    on the second call (the first one autotunes and compiles)."""
    n, d = 65536, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=gen).bfloat16().requires_grad_()
    y = torch.randn(n, d, device="cuda", generator=gen).bfloat16().requires_grad_()
    FL.clip_loss(x, y, 14.0, backend=backend).backward()
    x.grad = y.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    FL.clip_loss(x, y, 14.0, backend=backend).backward()
    torch.cuda.synchronize()
    grads = x.grad.numel() * x.grad.element_size() + y.grad.numel() * y.grad.element_size()
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra < 64 * 2**20, f"{backend}: {extra / 2**20:.0f} MiB beyond inputs and grads"
