"""The compiled CPU extension ``fused_losses._C`` is built and works.

``make test`` builds the extension, so a missing ``_C`` is a failure here, not a skip: the only
way to skip is to say so explicitly with ``FUSED_LOSSES_CPU_EXT=0`` (the build switch of
setup.py), and then the reason is reported.  These tests call ``torch.ops.fused_losses_C``
directly, below the dispatch layer, so a broken build fails here with a precise message.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fused_losses import _ext

CPU_EXT_OFF = os.environ.get("FUSED_LOSSES_CPU_EXT") == "0"

pytestmark = pytest.mark.skipif(
    CPU_EXT_OFF and _ext.load_cpu_ext() is None,
    reason="FUSED_LOSSES_CPU_EXT=0: the C++ extension was deliberately not built",
)

SHAPES = [(1, 1, 1), (17, 5, 3), (64, 300, 100), (3, 1000, 769)]
OPS = ["contrastive_fwd", "contrastive_bwd", "siglip_fwd", "siglip_bwd", "ms_mine", "ms_fwd",
       "ms_mine_fwd", "ms_bwd", "softmax_matmul_fwd", "softmax_matmul_bwd", "topk", "tile_isa"]


def _row_lse(x, y, scale, bias=None):
    """Plain row logsumexp through the compiled op: LSE_j(scale·<x_i, y_j> + bias_j)."""
    m = y.shape[0]
    out = torch.ops.fused_losses_C.contrastive_fwd(
        x, y, torch.tensor(scale, dtype=x.dtype), bias,
        None, None, m, 0, False, False, True, False)  # no labels/mask, no positives, no columns
    return out[0]


def test_extension_loads():
    ext = _ext.load_cpu_ext()
    assert ext is not None, _ext.cpu_ext_unavailable_reason()
    assert _ext.cpu_ext_unavailable_reason() is None
    info = ext.build_info()
    assert set(info) >= {"compiler", "openmp", "torch_version"}, info
    # Built against the torch it runs with (an ABI mismatch would not even import, but a stale
    # build from another torch of the same ABI would).
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], info
    assert info["openmp"] == torch.backends.openmp.is_available(), info


def test_ops_registered():
    assert _ext.load_cpu_ext() is not None, _ext.cpu_ext_unavailable_reason()
    missing = [op for op in OPS if not hasattr(torch.ops.fused_losses_C, op)]
    assert not missing, f"ops not registered in torch.ops.fused_losses_C: {missing}"


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_row_lse_matches_torch(shape, with_bias):
    assert _ext.load_cpu_ext() is not None, _ext.cpu_ext_unavailable_reason()
    n, m, d = shape
    gen = torch.Generator().manual_seed(1000 * n + 10 * m + d)
    x = torch.randn(n, d, generator=gen)
    y = torch.randn(m, d, generator=gen)
    bias = torch.randn(m, generator=gen) if with_bias else None
    scale = 1.7
    out = _row_lse(x, y, scale, bias)
    z = scale * x.double() @ y.double().T
    if bias is not None:
        z = z + bias.double()
    ref = torch.logsumexp(z, dim=1)
    assert out.shape == (n,) and out.dtype == torch.float32
    err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    assert err <= 1e-5, f"row LSE {shape} bias={with_bias}: relative error {err:.3e}"


def test_row_lse_rejects_bad_input():
    assert _ext.load_cpu_ext() is not None, _ext.cpu_ext_unavailable_reason()
    x, y = torch.randn(8, 4), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _row_lse(x.half(), y.half(), 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        _row_lse(x, y.double(), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        _row_lse(torch.randn(4, 8).T, y, 1.0)
    with pytest.raises(RuntimeError, match=r"\(N,D\)"):
        _row_lse(x, torch.randn(6, 5), 1.0)
    with pytest.raises(RuntimeError, match=r"\(N,D\)"):
        _row_lse(torch.randn(8), y, 1.0)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_builds() -> list[str]:
    """The ISA builds of the tile kernels this machine can run (see csrc/cpu/kernels_*.cpp)."""
    flags = _cpu_flags()
    builds = ["generic"]
    if {"avx2", "fma"} <= flags:
        builds.append("avx2")
    if {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        builds.append("avx512")
    return builds


@pytest.mark.skipif("FUSED_LOSSES_CPU_ISA" in os.environ,
                    reason="FUSED_LOSSES_CPU_ISA is set for this run")
def test_default_isa_is_the_widest():
    assert _ext.load_cpu_ext() is not None, _ext.cpu_ext_unavailable_reason()
    assert torch.ops.fused_losses_C.tile_isa() == _isa_builds()[-1] or sys.platform != "linux"


# Losses and gradients through every op family of the cpu backend at an awkward shape, against
# the float64 reference; run in a child process with FUSED_LOSSES_CPU_ISA set (the build is
# picked once per process).
_ISA_CHILD = r"""
import sys, torch, fused_losses as FL
print("ISA", torch.ops.fused_losses_C.tile_isa())
g = torch.Generator().manual_seed(7)
x = torch.randn(45, 37, generator=g); y = torch.randn(53, 37, generator=g)
lab = torch.randint(0, 5, (45,), generator=g)
cases = {
    "clip": lambda b, x, y: FL.clip_loss(x, y[:45], 7.0, backend=b),
    "sup_con": lambda b, x, y: FL.sup_con(x, lab, temperature=0.3, backend=b),
    "info_nce_extra": lambda b, x, y: FL.info_nce(x, y[:45], extra_negatives=y[45:],
                                                 temperature=0.2, backend=b),
    "ms": lambda b, x, y: FL.multi_similarity(torch.nn.functional.normalize(x, dim=-1), lab,
                                              backend=b),
    "softmax_matmul": lambda b, x, y: FL.pairwise_softmax_matmul(x, y, y, backend=b).square().sum(),
}
worst = 0.0
for name, f in cases.items():
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    out = f("cpu", xs, ys); ref = f("reference", xr, yr)
    out.backward(); ref.backward()
    errs = [float((out.double() - ref).abs() / ref.abs().clamp_min(1e-6))]
    for a, b in ((xs.grad, xr.grad), (ys.grad, yr.grad)):
        if b is not None:
            errs.append(float((a.double() - b).norm() / b.norm().clamp_min(1e-12)))
    print(name, max(errs))
    worst = max(worst, max(errs))
sys.exit(0 if worst < 1e-4 else 1)
"""


@pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in _isa_builds(),
                                               reason=f"this CPU cannot run the {isa} build"))
    for isa in ("generic", "avx2", "avx512")])
def test_every_isa_build_matches_reference(isa):
    assert _ext.load_cpu_ext() is not None, _ext.cpu_ext_unavailable_reason()
    env = dict(os.environ, FUSED_LOSSES_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _ISA_CHILD], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ISA {isa}" in proc.stdout, proc.stdout


def test_isa_override_rejects_unknown_build():
    env = dict(os.environ, FUSED_LOSSES_CPU_ISA="sse9")
    code = ("import torch, fused_losses as FL; "
            "FL.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, backend='cpu')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "FUSED_LOSSES_CPU_ISA must be" in proc.stderr, proc.stderr
