"""SPEC §6: a second backward through any op is either exact or a RuntimeError naming the op.

Exact (every backend): the InfoNCE family (info_nce, clip_loss, nt_xent, sup_con), siglip_loss
and the primitives (pairwise_logsumexp, pairwise_softmax_matmul, similarity_topk values).  Each
case takes the gradient with ``create_graph=True`` along a random upstream gradient ``u`` (itself
a leaf), then the gradient of ``Σ_k <grad_k, w_k>`` (random ``w``) with respect to every input and
``u``: a Hessian-vector product, compared with the float64 reference (plain autograd).

First order only on the fused backends: multi_similarity (its mining mask is re-derived by the
kernels) and swav_loss (the streamed path holds the codes' targets fixed); on every backend,
the reference included: sinkhorn (envelope-theorem gradients).  The second backward must raise a
RuntimeError naming the op, also when the only path to the op is through the normalization of
the features and ``autograd.grad`` is asked for the leaves only (autograd prunes nodes that lead
elsewhere: the error node is tied to the op's own inputs).

torch's "an autograd kernel was not registered" warning (a compiled kernel called on tensors
autograd could follow, whose result would then be a silent constant) is an error here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_within, refuses_unsupported, rel_err, seeded

import fused_losses as FL

pytestmark = pytest.mark.filterwarnings("error:.*autograd kernel was not registered")


def _feat(gen, n, d=4):
    return torch.randn(n, d, generator=gen, dtype=torch.float64)


def _scalar(v):
    return torch.tensor(float(v), dtype=torch.float64)


def _labels(gen, n, k=3):
    return torch.randint(0, k, (n,), generator=gen)


# name -> (op the backend must implement, make(gen) -> tensors, fn(backend, *tensors))
EXACT = {
    "info_nce_temperature": (
        "info_nce", lambda g: [_feat(g, 5), _feat(g, 7), _scalar(0.3)],
        lambda b, q, k, t: FL.info_nce(q, k, temperature=t, backend=b)),
    "info_nce_symmetric_logit_scale": (
        "info_nce", lambda g: [_feat(g, 6), _feat(g, 6), _scalar(4.0)],
        lambda b, q, k, s: FL.info_nce(q, k, logit_scale=s, symmetric=True, backend=b)),
    "info_nce_labels_symmetric_decoupled": (
        "info_nce", lambda g: [_feat(g, 5), _feat(g, 7), _scalar(0.5), _labels(g, 5),
                               _labels(g, 7)],
        lambda b, q, k, t, la, lb: FL.info_nce(q, k, temperature=t, labels=la, key_labels=lb,
                                               symmetric=True, decoupled=True, backend=b)),
    "info_nce_extra_negatives": (
        "info_nce", lambda g: [_feat(g, 4), _feat(g, 4), _feat(g, 3), _scalar(0.4)],
        lambda b, q, k, e, t: FL.info_nce(q, k, temperature=t, extra_negatives=e,
                                          reduction="sum", backend=b)),
    "info_nce_unnormalized_none": (
        "info_nce", lambda g: [_feat(g, 5), _feat(g, 6)],
        lambda b, q, k: FL.info_nce(q, k, temperature=2.0, normalize=False, reduction="none",
                                    backend=b)),
    # label 9 has one member: an anchor without positives (loss 0, out of the mean)
    "sup_con": (
        "info_nce", lambda g: [_feat(g, 7), torch.tensor([0, 1, 0, 1, 2, 2, 9]), _scalar(0.2)],
        lambda b, f, la, t: FL.sup_con(f, la, temperature=t, backend=b)),
    "nt_xent": (
        "info_nce", lambda g: [_feat(g, 4), _feat(g, 4)],
        lambda b, z1, z2: FL.nt_xent(z1, z2, temperature=0.5, backend=b)),
    "clip_loss_none": (
        "info_nce", lambda g: [_feat(g, 5), _feat(g, 5), _scalar(8.0)],
        lambda b, x, y, s: FL.clip_loss(x, y, s, reduction="none", backend=b)),
    "siglip_loss": (
        "siglip", lambda g: [_feat(g, 5), _feat(g, 6), _scalar(5.0), _scalar(-2.0)],
        lambda b, x, y, s, c: FL.siglip_loss(x, y, s, c, backend=b)),
    "pairwise_logsumexp_bias": (
        "pairwise_logsumexp", lambda g: [_feat(g, 5), _feat(g, 7), _feat(g, 7, 1)[:, 0],
                                         _scalar(1.5)],
        lambda b, x, y, c, s: FL.pairwise_logsumexp(x, y, scale=s, bias=c, backend=b)),
    "pairwise_logsumexp_excl_dim0": (
        "pairwise_logsumexp", lambda g: [_feat(g, 6), _feat(g, 6)],
        lambda b, x, y: FL.pairwise_logsumexp(x, y, scale=2.0, exclude_diagonal=True, dim=0,
                                              backend=b)),
    "pairwise_softmax_matmul": (
        "pairwise_softmax_matmul", lambda g: [_feat(g, 5), _feat(g, 7), _feat(g, 7, 3),
                                              _feat(g, 7, 1)[:, 0], _scalar(1.5)],
        lambda b, x, y, v, c, s: FL.pairwise_softmax_matmul(x, y, v, scale=s, bias=c,
                                                            backend=b)),
    "similarity_topk_values": (
        "similarity_topk", lambda g: [_feat(g, 5), _feat(g, 7)],
        lambda b, x, y: FL.similarity_topk(x, y, 3, backend=b)[0]),
}


def _dtype(backend):
    return torch.float64 if torch.float64 in FL.get_backend(backend).dtypes else torch.float32


def _hvp(fn, backend, tensors, dtype, gen):
    """(first-order gradients, second-order gradients) of ``fn`` at ``tensors`` (cast to
    ``dtype``), along upstream ``u`` and direction ``w`` drawn from ``gen``."""
    ins = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in tensors]
    out = fn(backend, *ins)
    diff = [t for t in ins if t.requires_grad]
    u = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    u.requires_grad_()
    first = list(torch.autograd.grad(out, diff, u, create_graph=True))
    ws = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in first]
    s = sum((f * w).sum() for f, w in zip(first, ws))
    second = torch.autograd.grad(s, diff + [u], allow_unused=True)
    second = [torch.zeros_like(t) if g is None else g for t, g in zip(diff + [u], second)]
    return first, second


def _check_hvp(backend, fn, tensors, what):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    dtype = _dtype(backend)
    # the reference sees the inputs exactly as rounded for the backend
    rounded = [t.to(dtype).double() if t.is_floating_point() else t for t in tensors]
    first, second = _hvp(fn, backend, rounded, dtype, torch.Generator().manual_seed(seed))
    first64, second64 = _hvp(fn, "reference", rounded, torch.float64,
                             torch.Generator().manual_seed(seed))
    if dtype == torch.float64:
        bounds = [1e-9] * (len(first) + len(second))
    else:
        # fp32: 10× the SPEC tolerance, or 4× what the reference itself makes of it in fp32
        # (a second derivative sums more cancelling terms than a first one)
        first32, second32 = _hvp(fn, "reference", rounded, torch.float32,
                                 torch.Generator().manual_seed(seed))
        bounds = [max(1e-4, 4 * rel_err(a, b)) for a, b in zip(first32 + second32,
                                                                first64 + second64)]
    for k, (got, want) in enumerate(zip(first + second, first64 + second64)):
        label = f"first-order grad {k}" if k < len(first) else f"second-order grad " \
                f"{k - len(first)}"
        assert_within(rel_err(got, want), bounds[k], f"{what} {label}")


@pytest.mark.parametrize("case", list(EXACT))
def test_second_order_is_exact(backend, case):
    op, make, fn = EXACT[case]
    tensors = make(seeded())
    if refuses_unsupported(backend, op, lambda: fn(backend, *tensors)):
        return
    _check_hvp(backend, fn, tensors, f"{case} on {backend}")


@pytest.mark.skipif("cpu" not in FL.available_backends(), reason="the cpu extension is not built")
def test_cpu_second_order_passes_gradgradcheck():
    """Independent of the reference: finite differences of the first-order gradient (float64)
    agree with the second-order gradient, for every differentiable input of clip_loss with a
    learnable scale, SigLIP with scale and bias, and the softmax matmul."""
    gen = seeded()
    x, y, v = (_feat(gen, 4, 3).requires_grad_() for _ in range(3))
    s, c = _scalar(3.0).requires_grad_(), _scalar(-1.0).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, y, s: FL.clip_loss(x, y, s, backend="cpu"), (x, y, s))
    assert torch.autograd.gradgradcheck(
        lambda x, y, s, c: FL.siglip_loss(x, y, s, c, backend="cpu"), (x, y, s, c))
    assert torch.autograd.gradgradcheck(
        lambda x, y, v, s: FL.pairwise_softmax_matmul(x, y, v, scale=s, backend="cpu"),
        (x, y, v, s))


# name -> (op, make, fn, backends on which it is exact; elsewhere it must raise)
FIRST_ORDER = {
    "multi_similarity": (
        "multi_similarity", lambda g: [_feat(g, 6), torch.tensor([0, 1, 0, 1, 2, 2])],
        lambda b, x, la: FL.multi_similarity(x, la, beta=10.0, backend=b), {"reference"}),
    "multi_similarity_refs_no_mining": (
        "multi_similarity", lambda g: [_feat(g, 5), _labels(g, 5), _feat(g, 6), _labels(g, 6)],
        lambda b, x, la, y, lb: FL.multi_similarity(x, la, ref_embeddings=y, ref_labels=lb,
                                                    epsilon=None, backend=b), {"reference"}),
    "swav_loss": (
        "pairwise_softmax_matmul", lambda g: [_feat(g, 6), _feat(g, 5)],
        lambda b, z, c: FL.swav_loss(torch.nn.functional.normalize(z, dim=1),
                                     torch.nn.functional.normalize(c, dim=1), backend=b),
        {"reference"}),
    "sinkhorn": (
        "ot_softmin", lambda g: [_feat(g, 5), _feat(g, 6)],
        lambda b, x, y: FL.sinkhorn(x, y, blur=0.5, backend=b), set()),
    "sinkhorn_weights": (
        "ot_softmin", lambda g: [_feat(g, 5), _feat(g, 6), torch.rand(5, generator=g,
                                                                       dtype=torch.float64)],
        lambda b, x, y, a: FL.sinkhorn(x, y, a=a / a.sum(), blur=0.5, n_iters=3, backend=b),
        set()),
}


@pytest.mark.parametrize("case", list(FIRST_ORDER))
def test_second_order_exact_or_raises_naming_the_op(backend, case):
    op, make, fn, exact_on = FIRST_ORDER[case]
    tensors = make(seeded())
    if refuses_unsupported(backend, op, lambda: fn(backend, *tensors)):
        return
    if backend in exact_on:
        _check_hvp(backend, fn, tensors, f"{case} on {backend}")
        return
    name = case.split("_refs")[0].split("_weights")[0]
    dtype = _dtype(backend)
    ins = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in tensors]
    diff = [t for t in ins if t.requires_grad]
    plain = torch.autograd.grad(fn(backend, *ins), diff)
    # first order with create_graph=True: the same numbers (up to rounding where a part of the
    # op, e.g. swav_loss's row LSE, takes the exact, differentiable path)
    first = torch.autograd.grad(fn(backend, *ins), diff, create_graph=True)
    for k, (a, b) in enumerate(zip(first, plain)):
        assert_within(rel_err(a, b), 1e-12 if dtype == torch.float64 else 1e-5,
                      f"{case} on {backend}: first-order grad {k} with create_graph")
    with pytest.raises(RuntimeError, match=rf"fused_losses\.{name}: second-order"):
        torch.autograd.grad(sum(f.pow(2).sum() for f in first), diff[:1])


@pytest.mark.skipif("cpu" not in FL.available_backends(), reason="the cpu extension is not built")
def test_raises_when_the_op_is_reached_only_through_the_normalization():
    """The issue's trap: with normalize=True the first-order gradient of the leaf depends on
    the leaf through the normalization too, so it has a graph even when the op's own part were
    a constant; a second backward must still raise, not drop the op's second derivative."""
    gen = seeded()
    x = _feat(gen, 6).requires_grad_()
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    (g,) = torch.autograd.grad(FL.multi_similarity(x, labels, backend="cpu"), x,
                               create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="multi_similarity"):
        torch.autograd.grad(g.pow(2).sum(), x)


@pytest.mark.skipif("cpu" not in FL.available_backends(), reason="the cpu extension is not built")
def test_gradient_penalty_on_parameters():
    """A WGAN-GP style penalty through a module: the parameters' gradients of
    loss + ||∂loss/∂features||² equal the reference's (double backward into Linear weights)."""
    gen = seeded()
    a, b = _feat(gen, 6, 5), _feat(gen, 6, 5)
    grads = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        lin = torch.nn.Linear(5, 4).double()
        fa, fb = lin(a), lin(b)
        loss = FL.clip_loss(fa, fb, 10.0, backend=backend)
        ga, gb = torch.autograd.grad(loss, (fa, fb), create_graph=True)
        (loss + ga.pow(2).sum() + gb.pow(2).sum()).backward()
        grads[backend] = [p.grad for p in lin.parameters()]
    for k, (got, want) in enumerate(zip(grads["cpu"], grads["reference"])):
        assert_within(rel_err(got, want), 1e-9, f"parameter {k}")


CHILD = r"""
import json, sys, torch
import fused_losses as FL
from fused_losses.bench import PeakRSS
backend, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
x = torch.randn(n, d, requires_grad=True); y = torch.randn(n, d, requires_grad=True)
def run(x, y):
    loss = FL.pairwise_logsumexp(x, y, scale=10.0, backend=backend).sum()
    gx, gy = torch.autograd.grad(loss, (x, y), create_graph=True)
    (gx.pow(2).sum() + gy.pow(2).sum()).backward()
run(x[:64].detach().requires_grad_(), y[:64].detach().requires_grad_())  # warm-up
with PeakRSS() as mem:
    run(x, y)
print(json.dumps({"extra_bytes": mem.extra_bytes}))
"""


def _extra_bytes(backend, n, d=32):
    # Buffers of 64 KiB and more come from mmap, so that the peak RSS counts the buffers alive
    # at once: by default glibc serves them from its heap once a few have been freed (dynamic
    # mmap threshold) and keeps the freed heap memory, which adds a bounded slack (measured: 80
    # MiB at N=8192, flat over the blocks) that says nothing about what the code holds.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", CHILD, backend, str(n), str(d)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.skipif("cpu" not in FL.available_backends(), reason="the cpu extension is not built")
def test_double_backward_never_holds_an_nxn_matrix():
    """The exact second-order path keeps O((N+M)·D) in the recorded graph and O(block·M) while
    it runs: a gradient penalty on pairwise_logsumexp (the row sweep every InfoNCE-family op
    runs) at N=8192, D=32 grows the peak RSS by less than a quarter of one N×N fp32 matrix
    (256 MiB); the reference, as the control, by more than one N×N."""
    n = 8192
    extra = _extra_bytes("cpu", n)
    assert extra < n * n * 4 / 4, f"peak grew by {extra / 2**20:.0f} MiB (N×N = 256 MiB)"
    ref_n = 2048
    ref = _extra_bytes("reference", ref_n)
    assert ref > ref_n * ref_n * 4, f"reference grew by only {ref / 2**20:.0f} MiB"



@pytest.mark.skipif("cpu" not in FL.available_backends(), reason="the cpu extension is not built")
def test_third_order_raises_naming_the_op():
    gen = seeded()
    x, y = (_feat(gen, 4).requires_grad_() for _ in range(2))
    (g,) = torch.autograd.grad(FL.clip_loss(x, y, 5.0, backend="cpu"), x, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"fused_losses\.info_nce: third-order"):
        torch.autograd.grad(h.pow(2).sum(), x)
