"""SwAV's swapped-prediction loss (fused_losses.swav_loss) against SwAV's procedure written out
densely (codes by Sinkhorn-Knopp in the scaling domain, as SwAV's code does, then
cross-entropy with log_softmax), in float64, forward and backward, on every backend that runs
the two streamed ops the loss is built from."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_rel, assert_within, randn, seeded, tol_for

import fused_losses as FL
from fused_losses import _dispatch


def _swav_codes(scores, eps, iters):
    """SwAV's Sinkhorn-Knopp (scaling domain): Q = exp(scores/ε)ᵀ / sum, rows to 1/K, columns
    to 1/B, iters times; codes B·Qᵀ."""
    q = torch.exp(scores / eps).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def _swav_dense(emb, protos, n_crops, assign, tau, eps, iters, queue=None):
    """Per-sample SwAV loss, the way SwAV's training loop computes it (dense scores)."""
    scores = (emb @ protos.T).chunk(n_crops)
    b = scores[0].shape[0]
    total = 0.0
    for qi, i in enumerate(assign):
        with torch.no_grad():
            s = scores[i]
            if queue is not None:
                s = torch.cat([queue[qi] @ protos.T, s])
            q = _swav_codes(s, eps, iters)[-b:]
        sub = 0.0
        for v in range(n_crops):
            if v != i:
                sub = sub - (q * torch.log_softmax(scores[v] / tau, dim=1)).sum(1)
        total = total + sub / (n_crops - 1)
    return total / len(assign)


CASES = [
    dict(b=1, k=3, d=1),
    dict(b=2, k=5, d=3),
    dict(b=17, k=50, d=100, n_crops=3),
    dict(b=17, k=7, d=769, assign=(1,)),
    dict(b=9, k=11, d=8, n_crops=4, assign=(0, 2), queue=6),
    dict(b=13, k=40, d=16, iters=0),
    dict(b=13, k=40, d=16, tau=0.01, eps=0.02),  # logits s/τ up to 100, codes at s/ε up to 50
]
LARGE_CASES = [dict(b=1000, k=64, d=16)]


def _inputs(c, gen):
    n_crops = c.get("n_crops", 2)
    emb = torch.nn.functional.normalize(randn(n_crops * c["b"], c["d"], dtype=torch.float64,
                                              gen=gen), dim=1)
    protos = torch.nn.functional.normalize(randn(c["k"], c["d"], dtype=torch.float64, gen=gen),
                                           dim=1)
    queue = None
    if c.get("queue"):
        n_assign = len(c.get("assign", (0, 1)))
        queue = torch.nn.functional.normalize(
            randn(n_assign, c["queue"], c["d"], dtype=torch.float64, gen=gen), dim=2)
    kw = dict(n_crops=n_crops, crops_for_assign=c.get("assign", (0, 1)),
              temperature=c.get("tau", 0.1), epsilon=c.get("eps", 0.05),
              n_iters=c.get("iters", 3))
    return emb, protos, queue, kw


def _check_against_swav(backend, device, c):
    gen = seeded()
    emb, protos, queue, kw = _inputs(c, gen)
    dtype = torch.float64 if torch.float64 in _dispatch.get_backend(backend).dtypes \
        else torch.float32
    e_ref, p_ref = emb.clone().requires_grad_(), protos.clone().requires_grad_()
    ref = _swav_dense(e_ref, p_ref, kw["n_crops"], kw["crops_for_assign"], kw["temperature"],
                      kw["epsilon"], kw["n_iters"], queue)
    g = randn(c["b"], dtype=torch.float64, gen=gen)
    ref.backward(g)

    e = emb.to(device, dtype).requires_grad_()
    p = protos.to(device, dtype).requires_grad_()
    q = None if queue is None else queue.to(device, dtype)
    out = FL.swav_loss(e, p, queue=q, reduction="none", backend=backend, **kw)
    out.backward(g.to(device, out.dtype))
    tol = 10 * tol_for(dtype)  # codes at s/ε ≤ 50 and logits s/τ ≤ 100 amplify fp32 rounding
    seed = gen.initial_seed()
    assert out.shape == (c["b"],)
    assert_rel(out, ref, tol, f"loss (seed {seed})")
    # A gradient can vanish exactly (B=1, D=1: codes and predictions both uniform, where an
    # fp32 run leaves a few ulps of its natural scale ‖g‖/τ, the size of the terms that cancel),
    # so errors are relative to the larger of its norm and 0.1·‖g‖/τ: an absolute error of
    # 10·tol·‖g‖/τ (≈ 80 ulps of that scale in fp32) is allowed there.
    floor = 0.1 * float(g.norm()) / kw["temperature"]
    for name, ours, theirs in (("d embeddings", e.grad, e_ref.grad),
                               ("d prototypes", p.grad, p_ref.grad)):
        err = float((ours.double().cpu() - theirs).norm()) / max(float(theirs.norm()), floor)
        assert_within(err, tol, f"{name} (seed {seed})")


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.requires_op("pairwise_logsumexp", "pairwise_softmax_matmul")
def test_matches_swav_value_and_gradients(backend, device, case):
    _check_against_swav(backend, device, CASES[case])


@pytest.mark.large_shape
@pytest.mark.parametrize("case", range(len(LARGE_CASES)))
@pytest.mark.requires_op("pairwise_logsumexp", "pairwise_softmax_matmul")
def test_matches_swav_large(backend, device, case):
    _check_against_swav(backend, device, LARGE_CASES[case])


@pytest.mark.requires_op("pairwise_logsumexp", "pairwise_softmax_matmul")
def test_reductions_and_module(backend, device):
    gen = seeded()
    emb, protos, _, kw = _inputs(dict(b=6, k=9, d=5), gen)
    dtype = torch.float64 if torch.float64 in _dispatch.get_backend(backend).dtypes \
        else torch.float32
    emb, protos = emb.to(device, dtype), protos.to(device, dtype)
    per = FL.swav_loss(emb, protos, reduction="none", backend=backend, **kw)
    assert_rel(FL.swav_loss(emb, protos, reduction="sum", backend=backend, **kw), per.sum(),
               1e-6, "sum")
    mean = FL.SwAVLoss(backend=backend, **kw)(emb, protos)
    assert_rel(mean, per.mean(), 1e-6, "module mean")


def test_streamed_path_with_reference_kernels_matches_dense():
    """The streamed algebra itself (row masses, targets, prototype gradient), checked with the
    reference kernels in float64, tighter than any backend test can be."""
    from fused_losses import swav

    gen = seeded()
    emb, protos, queue, kw = _inputs(dict(b=9, k=11, d=8, n_crops=3, queue=4), gen)
    assign, tau, eps = kw["crops_for_assign"], kw["temperature"], kw["epsilon"]
    e1, p1 = emb.clone().requires_grad_(), protos.clone().requires_grad_()
    dense = _swav_dense(e1, p1, 3, assign, tau, eps, 3, queue)
    dense.sum().backward()
    e2, p2 = emb.clone().requires_grad_(), protos.clone().requires_grad_()
    streamed = swav._streamed_swav(list(e2.chunk(3)), p2, assign, tau, eps, 3, queue,
                                   "reference")
    streamed.sum().backward()
    assert_rel(streamed, dense, 1e-10, "loss")
    assert_rel(e2.grad, e1.grad, 1e-10, "d embeddings")
    assert_rel(p2.grad, p1.grad, 1e-10, "d prototypes")


def test_codes_carry_no_gradient_and_no_grad_mode_is_respected():
    gen = seeded()
    emb, protos, _, kw = _inputs(dict(b=4, k=6, d=3), gen)
    with torch.no_grad():
        out = FL.swav_loss(emb.requires_grad_(), protos, backend="cpu"
                           if "cpu" in FL.available_backends() else "reference", **kw)
    assert not out.requires_grad
    assert torch.is_grad_enabled()


BAD = [
    (lambda: FL.swav_loss(torch.randn(5, 3), torch.randn(4, 3)), ValueError, "multiple"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 2)), ValueError, "dimension"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), n_crops=1), ValueError,
     "n_crops"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), crops_for_assign=(0, 2)),
     ValueError, "crops_for_assign"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), crops_for_assign=(0, 0)),
     ValueError, "crops_for_assign"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), crops_for_assign=1),
     TypeError, "crops_for_assign"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0), ValueError,
     "temperature"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), epsilon=float("nan")),
     ValueError, "epsilon"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), n_iters=-1), ValueError,
     "n_iters"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), queue=torch.randn(1, 2, 3)),
     ValueError, "queue"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3).double()), TypeError, "dtype"),
    (lambda: FL.swav_loss(torch.randn(4, 3), torch.randn(4, 3), reduction="avg"), ValueError,
     "reduction"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
