"""Triton-backend specifics: custom ops under torch.compile, any D (feature-chunked gradients),
the fused (one-sweep, atomic) and deterministic contrastive paths.

On CPU these run under TRITON_INTERPRET=1 (conftest) with small shapes; on a GPU the same tests
run on CUDA tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, device_for, randn, seeded
from test_losses import _FlashSoftmaxMatmul, check_against_reference

import fused_losses as FL

pytestmark = pytest.mark.skipif("triton" not in FL.available_backends(),
                                reason="the triton backend is not available here")

DEVICE = device_for("triton")


def _tb():
    """The launchers module: the DETERMINISTIC switch and the launch functions live there."""
    from fused_losses.backends.triton import launchers

    return launchers


@pytest.fixture(params=[False, True], ids=["fused", "deterministic"])
def det_mode(request, monkeypatch):
    monkeypatch.setattr(_tb(), "DETERMINISTIC", request.param)
    return request.param


def test_deterministic_switch(monkeypatch):
    tb = _tb()
    monkeypatch.setattr(tb, "DETERMINISTIC", None)
    monkeypatch.delenv("FUSED_LOSSES_DETERMINISTIC", raising=False)
    assert tb.deterministic() is False  # default: the fused path
    monkeypatch.setenv("FUSED_LOSSES_DETERMINISTIC", "1")
    assert tb.deterministic() is True
    monkeypatch.delenv("FUSED_LOSSES_DETERMINISTIC")
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tb.deterministic() is True
    finally:
        torch.use_deterministic_algorithms(old)
    monkeypatch.setattr(tb, "DETERMINISTIC", True)
    assert tb.deterministic() is True


def test_ops_are_registered_custom_ops():
    ops = torch.ops.fused_losses_triton
    for name in ("contrastive_fwd", "contrastive_bwd", "siglip_fwd", "siglip_bwd", "ms_mine",
                 "ms_fwd", "ms_bwd", "softmax_matmul_fwd", "softmax_matmul_bwd", "topk"):
        assert hasattr(ops, name), name


def test_torch_compile_triton_fullgraph(det_mode):
    """The Triton launches are opaque custom ops with fakes: the losses (their autograd
    Functions included) trace into one graph and give the eager numbers, both paths."""
    gen = seeded()
    a = randn(40, 12, gen=gen, device=DEVICE, requires_grad=True)
    b = randn(40, 12, gen=gen, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 6, (40,), generator=gen).to(DEVICE)

    def step(a, b):
        return (FL.clip_loss(a, b, 14.0, backend="triton")
                + FL.sup_con(a, labels, backend="triton")
                + FL.multi_similarity(a, labels, backend="triton")
                + FL.siglip_loss(a, b, 10.0, -10.0, backend="triton"))

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)  # a graph break would raise
    out_c = compiled(a, b)
    out_e = step(a, b)
    assert_rel(out_c, out_e, 1e-6, "compiled value")
    for x, y in zip(torch.autograd.grad(out_c, [a, b]), torch.autograd.grad(out_e, [a, b])):
        assert_rel(x, y, 1e-5, "compiled grad")


# -------------------------------------------------------------------------- any D (chunked)

@pytest.mark.parametrize("d", [1025, 2049])
def test_large_feature_dim(d, det_mode):
    """D above the output chunk (512): the gradients are split over feature chunks, each
    recomputing the same similarity tiles."""
    gen = seeded()
    n, m = 5, 7
    q = randn(n, d, gen=gen, requires_grad=True)
    k = randn(m, d, gen=gen, requires_grad=True)
    lab = torch.randint(0, 2, (n,), generator=gen)
    temp = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    seed = gen.initial_seed()
    check_against_reference("triton", DEVICE, torch.float32,
                            lambda b, q, k, t: FL.info_nce(q, k, temperature=t, symmetric=True,
                                                           backend=b),
                            [q, k[:n], temp], f"clip D={d} seed={seed}")
    check_against_reference("triton", DEVICE, torch.float32,
                            lambda b, q, k, t: FL.info_nce(q, k, temperature=t, backend=b),
                            [q, k, temp], f"info_nce D={d} seed={seed}")
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    check_against_reference("triton", DEVICE, torch.float32,
                            lambda b, q, k, s, t: FL.siglip_loss(q, k, s, t, backend=b),
                            [q, k[:n], scale, bias], f"siglip D={d} seed={seed}")
    check_against_reference("triton", DEVICE, torch.float32,
                            lambda b, x, lb: FL.multi_similarity(x, lb, backend=b),
                            [q, lab], f"ms D={d} seed={seed}")
    x = randn(n, d, gen=gen, requires_grad=True, scale=d ** -0.5)
    y = randn(m, d, gen=gen, requires_grad=True, scale=d ** -0.5)
    v = randn(m, 3, gen=gen, requires_grad=True)
    bias_m = randn(m, gen=gen, requires_grad=True)
    check_against_reference("triton", DEVICE, torch.float32,
                            lambda b, x, y, bi: FL.pairwise_logsumexp(x, y, scale=3.0, bias=bi,
                                                                      backend=b),
                            [x, y, bias_m], f"plse D={d} seed={seed}")
    check_against_reference("triton", DEVICE, torch.float32,
                            lambda b, x, y, v, bi: FL.pairwise_softmax_matmul(
                                x, y, v, scale=2.0, bias=bi, backend=b),
                            [x, y, v, bias_m], f"psm D={d} seed={seed}",
                            alternatives=[lambda x, y, v, bi: _FlashSoftmaxMatmul.apply(
                                x, y, v, bi, 2.0)])


def test_large_feature_dim_fp16():
    gen = seeded()
    d = 1025
    q = randn(6, d, gen=gen, requires_grad=True)
    k = randn(6, d, gen=gen, requires_grad=True)
    q, k = (t.detach().div(t.detach().norm(dim=1, keepdim=True)).requires_grad_() for t in (q, k))
    check_against_reference("triton", DEVICE, torch.float16,
                            lambda b, q, k: FL.clip_loss(q, k, 10.0, normalize=False, backend=b),
                            [q, k], f"clip fp16 D={d} seed={gen.initial_seed()}")


@pytest.mark.parametrize("self_refs", [True, False])
def test_ms_planted_threshold_large_d(self_refs):
    """The planted mining ties of test_losses (coordinates k/8, ε = 1/16: every s_ij exact) with
    the four informative coordinates spread over three output feature chunks of D = 1025: every
    chunk's program must re-derive the same mining mask."""
    gen = torch.Generator().manual_seed(1235)  # fixed: ≥ 3 planted ties of each kind
    n, m, d, eps = 40, 33, 1025, 1.0 / 16
    where = torch.tensor([0, 511, 700, 1024])

    def planted(rows):
        out = torch.zeros(rows, d, dtype=torch.float64)
        out[:, where] = (torch.randint(-4, 5, (rows, 4), generator=gen) / 8.0).double()
        return out

    x = planted(n)
    lab = torch.randint(0, 3, (n,), generator=gen)
    y, rlab = (x, lab) if self_refs else (planted(m), torch.randint(0, 3, (m,), generator=gen))
    s = x @ y.T
    pos = lab[:, None] == rlab[None, :]
    neg = ~pos
    if self_refs:
        eye = torch.eye(n, dtype=torch.bool)
        pos, neg = pos & ~eye, neg & ~eye
    max_neg = s.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
    min_pos = s.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
    assert int((pos & (s - eps == max_neg)).sum()) >= 3
    assert int((neg & (s + eps == min_pos)).sum()) >= 3
    xe = x.clone().requires_grad_(True)
    ins = [xe, lab] if self_refs else [xe, lab, y.clone().requires_grad_(True), rlab]

    def fn(b, x_, lb, y_=None, rl=None):
        return FL.multi_similarity(x_, lb, ref_embeddings=y_, ref_labels=rl, epsilon=eps,
                                   alpha=2.0, beta=50.0, base=0.5, normalize=False,
                                   reduction="none", backend=b)

    check_against_reference("triton", DEVICE, torch.float32, fn, ins,
                            f"ms planted D={d} self={self_refs}")


# ------------------------------------------------------- fused vs deterministic contrastive

@pytest.mark.parametrize("temperature", [1e-3, 0.07, 1e3])
def test_clip_both_paths_extreme_temperature(temperature, det_mode):
    gen = seeded()
    q = randn(23, 33, gen=gen, requires_grad=True)
    k = randn(23, 33, gen=gen, requires_grad=True)
    tol = max(1e-5, 2e-8 / temperature)
    check_against_reference("triton", DEVICE, torch.float32,
                            lambda b, q, k: FL.clip_loss(q, k, 1.0 / temperature, backend=b),
                            [q, k], f"clip t={temperature} seed={gen.initial_seed()}", tol=tol)


@pytest.mark.parametrize("opts", [dict(labels=True), dict(extra=5, decoupled=True),
                                  dict(labels=True, exclude_diagonal=True)],
                         ids=["labels", "extra-decoupled", "labels-excl"])
def test_symmetric_variants_both_paths(opts, det_mode):
    gen = seeded()
    n, d = 19, 10
    q = randn(n, d, gen=gen, requires_grad=True)
    k = randn(n, d, gen=gen, requires_grad=True)
    extra = randn(opts["extra"], d, gen=gen, requires_grad=True) if "extra" in opts else None
    labels = torch.randint(0, 3, (n,), generator=gen) if opts.get("labels") else None
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    kw = dict(decoupled=opts.get("decoupled", False),
              exclude_diagonal=opts.get("exclude_diagonal", False))
    check_against_reference(
        "triton", DEVICE, torch.float32,
        lambda b, q, k, t, e, lab: FL.info_nce(q, k, temperature=t, labels=lab,
                                               extra_negatives=e, symmetric=True, backend=b,
                                               **kw),
        [q, k, temp, extra, labels], f"sym {opts} seed={gen.initial_seed()}")


def test_symmetric_unnormalized_logits_1e4(det_mode, monkeypatch):
    """|z| up to ~1e4 with unnormalized rows, symmetric: the one-sweep column sums of the fused
    path resolve against the norm bound where they can and fall back to the exact column pass
    where they underflow (one huge row makes the bound loose for every other column)."""
    tb = _tb()
    redone = []
    orig = tb._rows_pass

    def spy(*args, **kw):
        if kw.get("idx") is not None:
            redone.append(int(kw["idx"].numel()))
        return orig(*args, **kw)

    monkeypatch.setattr(tb, "_rows_pass", spy)
    gen = seeded()
    q = randn(13, 16, gen=gen, scale=25.0)
    q[3] *= 40.0  # ‖q_3‖ ≈ 4000: cref_j ≈ 4000·‖k_j‖ for every column
    q.requires_grad_(True)
    k = randn(13, 16, gen=gen, scale=25.0, requires_grad=True)

    def fn(b, q, k):
        return FL.info_nce(q, k, temperature=1.0, normalize=False, symmetric=True, backend=b)

    check_against_reference("triton", DEVICE, torch.float32, fn, [q, k],
                            f"sym large logits seed={gen.initial_seed()}")
    if not det_mode:
        assert redone and redone[0] > 0, redone  # the exact fallback ran for some columns


def test_fused_path_agrees_with_deterministic(monkeypatch):
    """Same inputs, both paths: values and gradients agree to fp32 rounding."""
    tb = _tb()
    gen = seeded()
    q = randn(37, 20, gen=gen, device=DEVICE)
    k = randn(37, 20, gen=gen, device=DEVICE)
    res = {}
    for det in (True, False):
        monkeypatch.setattr(tb, "DETERMINISTIC", det)
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = FL.clip_loss(a, b, 20.0, backend="triton")
        res[det] = (out, *torch.autograd.grad(out, [a, b]))
    for x, y in zip(res[True], res[False]):
        assert_rel(x, y, 2e-6, "fused vs deterministic")


def test_symmetric_nan_propagates(det_mode):
    gen = seeded()
    q = randn(9, 8, gen=gen, device=DEVICE)
    k = randn(9, 8, gen=gen, device=DEVICE)
    q[2, 3] = float("nan")
    out = FL.info_nce(q, k, temperature=0.1, symmetric=True, reduction="none", backend="triton")
    assert torch.isnan(out).any()
    ref = FL.info_nce(q.double(), k.double(), temperature=0.1, symmetric=True, reduction="none",
                      backend="reference")
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref))


# ------------------------------------------------------------------- CUDA-graph capture path

def test_capturing_is_false_outside_a_capture():
    assert _tb().capturing() is False


def test_fused_forward_redo_without_host_sync_while_capturing(monkeypatch):
    """While a CUDA graph is being captured (``launchers.capturing()``), the fused forward's
    exact column redo goes by a flag per column (every row block with a flagged column redoes
    it) instead of ``torch.nonzero`` (a host sync, which capture forbids); same values."""
    import sys

    tb = _tb()
    monkeypatch.setattr(tb, "DETERMINISTIC", False)
    monkeypatch.setattr(tb, "capturing", lambda: True)
    callers = []
    nonzero = torch.nonzero

    def spy_nonzero(*a, **kw):
        callers.append(sys._getframe(1).f_globals.get("__name__"))
        return nonzero(*a, **kw)

    monkeypatch.setattr(torch, "nonzero", spy_nonzero)
    redone = []
    orig = tb._rows_pass

    def spy(*args, **kw):
        if kw.get("flags") is not None:
            redone.append(int((kw["flags"] != 0).sum()))
        assert kw.get("idx") is None
        return orig(*args, **kw)

    monkeypatch.setattr(tb, "_rows_pass", spy)
    gen = seeded()
    q = randn(13, 16, gen=gen, scale=25.0)
    q[3] *= 40.0  # as test_symmetric_unnormalized_logits_1e4: some columns need the redo
    q.requires_grad_(True)
    k = randn(13, 16, gen=gen, scale=25.0, requires_grad=True)
    check_against_reference(
        "triton", DEVICE, torch.float32,
        lambda b, q, k: FL.info_nce(q, k, temperature=1.0, normalize=False, symmetric=True,
                                    backend=b),
        [q, k], f"sym large logits, capturing seed={gen.initial_seed()}")
    assert redone and redone[0] > 0, redone
    assert tb.__name__ not in callers, "torch.nonzero (a host sync) ran in the launchers"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scale", [14.0, 2000.0], ids=["resolved", "redo"])
def test_cuda_graph_capture_of_fused_contrastive_forward(scale, monkeypatch):
    """The kernel contract's fused CLIP forward (row and column statistics) captured into a
    CUDA graph and replayed gives the eager values; at a huge logit scale the column redo runs
    inside the graph."""
    from fused_losses.backends.triton import TritonKernels
    from fused_losses.kernels import PairMask

    monkeypatch.setattr(_tb(), "DETERMINISTIC", False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 64, device="cuda", generator=gen)
    y = torch.randn(300, 64, device="cuda", generator=gen)
    x[7] *= 50.0
    s = torch.tensor(scale, device="cuda")
    kern, mask = TritonKernels(), PairMask(n_keys=300)
    eager = kern.contrastive_fwd(x, y, s, None, mask, True)  # also compiles and autotunes
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kern.contrastive_fwd(x, y, s, None, mask, True)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, eager):
        assert_rel(a, b, 1e-6, "captured vs eager")
