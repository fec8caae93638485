"""The GPU tile tables, run here: ``FUSED_LOSSES_TRITON_ARCH=sm_80|sm_90`` makes the interpreted
Triton backend use that architecture's tiles and autotune configs (tiles.py) instead of the small
interpreter tiles, so the shapes a GPU launches (64 × 64 similarity tiles for 16-bit inputs,
32 × 32 for fp32, output chunks of 128/256 features, the padded feature widths, top-k's blocked
fallback) are checked against the float64 reference, forward and backward, on CPU.

Small cases per op, fp32 and fp16 (bf16 dots are wrong under the interpreter: NOTES.md); shapes
chosen so that every kernel runs several row and column tiles, a partial tile, a padded feature
width and more than one output-feature chunk.  On a GPU the variable is ignored (the device's
capability picks the table) and these run as ordinary GPU tests."""

from __future__ import annotations

import pytest
import torch
from helpers import device_for, kernel_inputs, randn, seeded
from test_losses import _FlashSoftmaxMatmul, check_against_reference

import fused_losses as FL

pytestmark = pytest.mark.skipif("triton" not in FL.available_backends(),
                                reason="the triton backend is not available here")

DEVICE = device_for("triton")
ARCHS = ["sm_80", "sm_90"]
DTYPES = [torch.float32, torch.float16]


def _launchers():
    from fused_losses.backends.triton import launchers

    return launchers


@pytest.fixture(params=ARCHS)
def arch(request, monkeypatch):
    """Selects the arch's tables and checks that they were used: every launch of the test
    records its kernel and constexprs, and the tiles must be that arch's (not the interpreter
    table's).  Yields (arch, launches)."""
    from fused_losses.backends.triton import tiles

    monkeypatch.setenv("FUSED_LOSSES_TRITON_ARCH", request.param)
    L = _launchers()
    seen = []

    class Spy:
        def __init__(self, name, tuner):
            self.name, self.tuner = name, tuner

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((self.name, args[0], kw))
                return self.tuner[grid](*args, **kw)
            return launch

    for name, tuner in list(L._K.items()):
        monkeypatch.setitem(L._K, name, Spy(name, tuner))
    yield request.param, seen
    if DEVICE.type != "cpu":
        return
    differs = False
    for name, x, kw in seen:
        d = x.shape[1]
        want = tiles.tiles(d, x.dtype, request.param)
        interp = tiles.tiles(d, x.dtype, "interpret")
        if name == "topk":
            assert (kw["BLOCK_M"], kw["BLOCK_D"]) == (16, want.bd), (name, kw)
            differs |= kw["BLOCK_K"] == 64  # the interpreter table: 32 for k = 20
            continue
        assert (kw["BLOCK_M"], kw["BLOCK_D"]) == (want.bm, want.bd), (name, kw)
        assert kw.get("BLOCK_DO", want.bdo) in (want.bdo, want.bdo_xy), (name, kw)
        differs |= kw["BLOCK_M"] != interp.bm
    assert not seen or differs, "the arch's tiles are the interpreter's: nothing was tested"


@pytest.fixture(params=DTYPES, ids=["fp32", "fp16"])
def dtype(request):
    return request.param


def _d(dtype):
    # fp32: 32-wide tiles, chunks of 128 → D = 130 (padded to 144) needs two chunks; 16-bit:
    # 64-wide tiles, chunks of 256 (sm_90; the fused backward 128 on sm_80) → D = 260.
    return 130 if dtype == torch.float32 else 260


def _xy(dtype, n=70, m=75, gen=None):
    d = _d(dtype)
    x = randn(n, d, gen=gen, requires_grad=True)
    y = randn(m, d, gen=gen, requires_grad=True)
    return d, x, y


@pytest.mark.parametrize("det", [False, True], ids=["fused", "deterministic"])
def test_clip(arch, dtype, det, monkeypatch):
    arch, _ = arch
    monkeypatch.setattr(_launchers(), "DETERMINISTIC", det)
    gen = seeded()
    d, x, y = _xy(dtype, n=70, m=70, gen=gen)
    norm, (x, y) = kernel_inputs(dtype, d, x, y)
    t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, q, k, t: FL.info_nce(q, k, temperature=t, symmetric=True, normalize=norm,
                                       backend=b),
        [x, y, t], f"clip {arch} seed={gen.initial_seed()}")


def test_info_nce_flags(arch, dtype):
    """The runtime mask flags of the contrastive kernels: labels, decoupled positives and extra
    negatives (row statistics); labels with the diagonal excluded, symmetric (row and column
    statistics in one sweep) and SupCon."""
    arch, _ = arch
    gen = seeded()
    d, x, y = _xy(dtype, n=70, m=70, gen=gen)
    extra = randn(9, d, gen=gen, requires_grad=True)
    norm, (x, y, extra) = kernel_inputs(dtype, d, x, y, extra)
    labels = torch.randint(0, 5, (70,), generator=gen)
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, q, k, e: FL.info_nce(q, k, temperature=0.2, labels=labels.to(q.device),
                                       extra_negatives=e, decoupled=True, symmetric=False,
                                       normalize=norm, backend=b),
        [x, y, extra], f"info_nce flags {arch} seed={gen.initial_seed()}")
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, q, k: FL.info_nce(q, k, temperature=0.2, labels=labels.to(q.device),
                                    exclude_diagonal=True, symmetric=True, normalize=norm,
                                    backend=b),
        [x, y], f"info_nce labels excl sym {arch} seed={gen.initial_seed()}")
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, q: FL.sup_con(q, labels.to(q.device), temperature=0.1, normalize=norm,
                                backend=b),
        [x], f"sup_con {arch} seed={gen.initial_seed()}")


def test_siglip(arch, dtype):
    arch, _ = arch
    gen = seeded()
    d, x, y = _xy(dtype, n=70, m=70, gen=gen)
    norm, (x, y) = kernel_inputs(dtype, d, x, y)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, q, k, s, t: FL.siglip_loss(q, k, s, t, normalize=norm, backend=b),
        [x, y, scale, bias], f"siglip {arch} seed={gen.initial_seed()}")


def test_multi_similarity(arch, dtype):
    arch, _ = arch
    gen = seeded()
    d, x, y = _xy(dtype, n=70, m=75, gen=gen)
    norm, (x, y) = kernel_inputs(dtype, d, x, y)
    lab = torch.randint(0, 4, (70,), generator=gen)
    rlab = torch.randint(0, 4, (75,), generator=gen)
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, e, r: FL.multi_similarity(e, lab.to(e.device), ref_embeddings=r,
                                            ref_labels=rlab.to(e.device), normalize=norm,
                                            backend=b),
        [x, y], f"ms refs {arch} seed={gen.initial_seed()}")
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, e: FL.multi_similarity(e, lab.to(e.device), normalize=norm, backend=b),
        [x], f"ms self {arch} seed={gen.initial_seed()}")


def test_pairwise_primitives(arch, dtype):
    """pairwise_logsumexp with a column bias, the softmax-weighted matmul (its value width E
    padded and split into several BLOCK_E chunks) and its gradients."""
    arch, _ = arch
    gen = seeded()
    d = _d(dtype)
    x = randn(70, d, gen=gen, requires_grad=True, scale=d ** -0.5)
    y = randn(75, d, gen=gen, requires_grad=True, scale=d ** -0.5)
    v = randn(75, 140, gen=gen, requires_grad=True)
    bias = randn(75, gen=gen, requires_grad=True)
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, x, y, bi: FL.pairwise_logsumexp(x, y, scale=3.0, bias=bi, backend=b),
        [x, y, bias], f"plse {arch} seed={gen.initial_seed()}")
    check_against_reference(
        "triton", DEVICE, dtype,
        lambda b, x, y, v, bi: FL.pairwise_softmax_matmul(x, y, v, scale=2.0, bias=bi,
                                                          backend=b),
        [x, y, v, bias], f"psm {arch} seed={gen.initial_seed()}",
        alternatives=[lambda x, y, v, bi: _FlashSoftmaxMatmul.apply(x, y, v, bi, 2.0)])


@pytest.mark.parametrize("k", [20, 70])
def test_similarity_topk(arch, dtype, k):
    """k = 20 in the kernel (64 columns per step; the interpreter table takes 32); k = 70 above
    the GPU tables' TOPK_MAX (the blocked torch path, no kernel)."""
    arch, seen = arch
    gen = seeded()
    d = _d(dtype)
    x = randn(20, d, gen=gen).to(dtype)
    y = randn(100, d, gen=gen).to(dtype)
    vals, idx = FL.similarity_topk(x.to(DEVICE), y.to(DEVICE), k, backend="triton")
    assert any(name == "topk" for name, _, _ in seen) == (k <= 64)
    s = x.double() @ y.double().T
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert torch.allclose(vals.double().cpu(), ref.values[:, :k], rtol=tol, atol=tol * 10)
    picked = s.gather(1, idx.cpu())
    assert torch.allclose(picked, ref.values[:, :k], rtol=tol, atol=tol * 10)
