"""The reference backend against independent float64 formulas (explicit per-anchor loops) and
against the peers that install on CPU (pytorch-metric-learning; OpenCLIP's loss formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_CUDA, assert_rel, randn, seeded

import fused_losses as FL
from fused_losses import _dispatch

R = "reference"


def _oracle_info_nce(q, k, t, labels=None, key_labels=None, decoupled=False, extra=None,
                     exclude_diagonal=False, normalize=True):
    """Per-anchor loop straight from SPEC §2; returns (per-anchor losses, valid flags)."""
    if normalize:
        q = q / q.norm(dim=1, keepdim=True)
        k = k / k.norm(dim=1, keepdim=True)
        extra = None if extra is None else extra / extra.norm(dim=1, keepdim=True)
    if labels is not None and key_labels is None:
        key_labels = labels
    losses, valid = [], []
    for i in range(q.shape[0]):
        pos = [j for j in range(k.shape[0])
               if ((labels is None and j == i) or
                   (labels is not None and int(key_labels[j]) == int(labels[i])))
               and not (exclude_diagonal and j == i)]
        cand = [j for j in range(k.shape[0])
                if not (exclude_diagonal and j == i) and not (decoupled and j in pos)]
        terms = [q[i] @ k[j] / t for j in cand]
        if extra is not None:
            terms += [q[i] @ e / t for e in extra]
        if not pos or not terms:
            losses.append(q.new_zeros(()) * t)
            valid.append(False)
            continue
        pos_mean = sum(q[i] @ k[j] / t for j in pos) / len(pos)
        losses.append(torch.logsumexp(torch.stack(terms), 0) - pos_mean)
        valid.append(True)
    return torch.stack(losses), torch.tensor(valid)


def _mean_valid(loss, valid):
    return loss.sum() / max(int(valid.sum()), 1)


CASES = [
    dict(n=1, m=1, d=1, normalize=False),
    dict(n=2, m=5, d=3),
    dict(n=17, m=17, d=100, labels=4),
    dict(n=17, m=17, d=3, labels=4, exclude_diagonal=True),
    dict(n=17, m=17, d=3, labels=4, exclude_diagonal=True, decoupled=True),
    dict(n=6, m=9, d=7, decoupled=True, extra=5),
    dict(n=8, m=8, d=5, labels=8, exclude_diagonal=True),  # mostly no positives
    dict(n=1, m=1, d=4, decoupled=True),  # no candidate left: excluded
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_info_nce_vs_loop_formula(case):
    c = dict(CASES[case])
    gen = seeded()
    q = randn(c["n"], c["d"], dtype=torch.float64, gen=gen, requires_grad=True)
    k = randn(c["m"], c["d"], dtype=torch.float64, gen=gen, requires_grad=True)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    e = randn(c["extra"], c["d"], dtype=torch.float64, gen=gen, requires_grad=True) \
        if c.get("extra") else None
    labels = torch.randint(0, c["labels"], (c["n"],), generator=gen) if c.get("labels") else None
    kw = dict(labels=labels, decoupled=c.get("decoupled", False), extra_negatives=e,
              exclude_diagonal=c.get("exclude_diagonal", False),
              normalize=c.get("normalize", True))
    out = FL.info_nce(q, k, temperature=t, backend=R, **kw)
    per = FL.info_nce(q, k, temperature=t, backend=R, reduction="none", **kw)
    ol, ov = _oracle_info_nce(q, k, t, labels=labels, decoupled=kw["decoupled"], extra=e,
                              exclude_diagonal=kw["exclude_diagonal"],
                              normalize=kw["normalize"])
    expect = _mean_valid(ol, ov)
    assert_rel(per, ol, 1e-12, "per-anchor")
    assert_rel(out, expect, 1e-12, "mean")
    leaves = [x for x in (q, k, t, e) if x is not None]
    g_out = torch.autograd.grad(out, leaves, allow_unused=True)
    g_exp = torch.autograd.grad(expect, leaves, allow_unused=True)
    for a, b in zip(g_out, g_exp):
        if b is None:
            continue
        assert_rel(a, b, 1e-11, "grad")


def test_symmetric_is_mean_of_both_directions():
    gen = seeded()
    q = randn(7, 5, dtype=torch.float64, gen=gen)
    k = randn(7, 5, dtype=torch.float64, gen=gen)
    lab = torch.randint(0, 3, (7,), generator=gen)
    sym = FL.info_nce(q, k, labels=lab, symmetric=True, temperature=0.3, backend=R)
    rows = FL.info_nce(q, k, labels=lab, temperature=0.3, backend=R)
    cols = FL.info_nce(k, q, labels=lab, temperature=0.3, backend=R)
    assert_rel(sym, (rows + cols) / 2, 1e-13, "symmetric")


def test_clip_loss_matches_openclip_formula():
    """OpenCLIP ClipLoss on one device: (CE(logits_per_image) + CE(logits_per_text)) / 2."""
    gen = seeded()
    img = F.normalize(randn(33, 16, dtype=torch.float64, gen=gen), dim=1).requires_grad_()
    txt = F.normalize(randn(33, 16, dtype=torch.float64, gen=gen), dim=1).requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    logits = scale * img @ txt.T
    target = torch.arange(33)
    expect = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    out = FL.clip_loss(img, txt, scale, normalize=False, backend=R)
    assert_rel(out, expect, 1e-13, "clip value")
    for a, b in zip(torch.autograd.grad(out, [img, txt, scale]),
                    torch.autograd.grad(expect, [img, txt, scale])):
        assert_rel(a, b, 1e-12, "clip grad")
    # With the default normalize=True the value on unit-norm features is the same.
    assert_rel(FL.clip_loss(img, txt, scale, backend=R), expect, 1e-12, "normalized")


def test_siglip_matches_openclip_formula():
    gen = seeded()
    img = F.normalize(randn(19, 8, dtype=torch.float64, gen=gen), dim=1).requires_grad_()
    txt = F.normalize(randn(19, 8, dtype=torch.float64, gen=gen), dim=1).requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    labels = 2 * torch.eye(19, dtype=torch.float64) - 1
    expect = -F.logsigmoid(labels * (scale * img @ txt.T + bias)).sum() / 19
    out = FL.siglip_loss(img, txt, scale, bias, normalize=False, backend=R)
    assert_rel(out, expect, 1e-13, "siglip value")
    for a, b in zip(torch.autograd.grad(out, [img, txt, scale, bias]),
                    torch.autograd.grad(expect, [img, txt, scale, bias])):
        assert_rel(a, b, 1e-12, "siglip grad")


def test_pairwise_logsumexp_formula():
    gen = seeded()
    x = randn(5, 3, dtype=torch.float64, gen=gen)
    y = randn(7, 3, dtype=torch.float64, gen=gen)
    bias = randn(7, dtype=torch.float64, gen=gen)
    out = FL.pairwise_logsumexp(x, y, scale=2.5, bias=bias, backend=R)
    expect = torch.tensor([math.log(sum(math.exp(2.5 * float(x[i] @ y[j]) + float(bias[j]))
                                        for j in range(7))) for i in range(5)],
                          dtype=torch.float64)
    assert_rel(out, expect, 1e-13, "row lse")
    col = FL.pairwise_logsumexp(x, y, scale=2.5, bias=randn(5, dtype=torch.float64, gen=gen),
                                dim=0, backend=R)
    assert col.shape == (7,)
    sq = randn(1, 3, dtype=torch.float64, gen=gen, requires_grad=True)
    lone = FL.pairwise_logsumexp(sq, sq, exclude_diagonal=True, backend=R)
    assert lone.item() == float("-inf")
    (g,) = torch.autograd.grad(lone.clamp_min(-1.0).sum(), sq)
    assert torch.all(g == 0), "an excluded-only row must not give NaN gradients"


@pytest.mark.requires_op("similarity_topk")
def test_similarity_topk_ties_go_to_smaller_index(backend, device):
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], device=device)
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.0, -1.0]],
                     device=device)
    vals, idx = FL.similarity_topk(x, y, 4, backend=backend)
    # row 1: s = (0, -1, -1, -0.5, -1, 0): the two zeros (one of them −0.0 · 1) tie as well
    assert idx.tolist() == [[1, 2, 4, 3], [0, 5, 3, 1]]
    assert vals.tolist() == [[1.0, 1.0, 1.0, 0.5], [0.0, 0.0, -0.5, -1.0]]


@pytest.mark.requires_op("similarity_topk")
def test_similarity_topk_large_k(backend, device):
    """k in the hundreds over several column tiles per row, against a sort."""
    gen = seeded()
    x = randn(5, 3, gen=gen).to(device)
    y = randn(600, 3, gen=gen).to(device)
    vals, idx = FL.similarity_topk(x, y, 200, backend=backend)
    s = x.double().cpu() @ y.double().cpu().T
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    assert_rel(vals.double().cpu(), ref.values[:, :200], 1e-6, "values")
    assert_rel(s.gather(1, idx.cpu()), ref.values[:, :200], 1e-6, "indices select the values")


@pytest.mark.requires_op("similarity_topk")
def test_similarity_topk_exact_ties_across_many_key_tiles(backend, device):
    """Integer scores (exact in fp32) with hundreds of ties spread over many key tiles (the cpu
    backend splits the keys into chunks scanned in parallel): the indices must be exactly a
    stable descending sort's (ties to the smaller key index)."""
    gen = seeded()
    interpreted = backend == "triton" and not HAS_CUDA
    n, m = 3, (300 if interpreted else 2100)  # cpu: 5 key tiles of 512, scanned as 5 chunks
    x = torch.randint(-2, 3, (n, 2), generator=gen).float()
    y = torch.randint(-3, 4, (m, 2), generator=gen).float()
    s = x.double() @ y.double().T
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    for k in (1, 7, 300):
        vals, idx = FL.similarity_topk(x.to(device), y.to(device), k, backend=backend)
        assert idx.cpu().tolist() == ref.indices[:, :k].tolist(), f"k={k}"
        assert vals.double().cpu().tolist() == ref.values[:, :k].tolist(), f"k={k}"


@pytest.mark.requires_op("similarity_topk")
def test_similarity_topk_nan_ranks_first_like_torch_topk(backend, device):
    """A NaN key gives NaN scores; torch.topk ranks NaN above every number, and so do we."""
    gen = seeded()
    x = randn(4, 3, gen=gen)
    y = randn(700, 3, gen=gen)  # cpu: the NaN key is in the second of two key chunks
    y[600, 1] = float("nan")
    vals, idx = FL.similarity_topk(x.to(device), y.to(device), 5, backend=backend)
    assert (idx[:, 0].cpu() == 600).all()
    assert torch.isnan(vals[:, 0]).all() and not torch.isnan(vals[:, 1:]).any()
    s = x.double() @ y.double().T
    s[:, 600] = float("-inf")
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    assert idx[:, 1:].cpu().tolist() == ref.indices[:, :4].tolist()


# ---------------------------------------------------------------- pytorch-metric-learning

pml = pytest.importorskip("pytorch_metric_learning", reason="test extra not installed")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402


def _compare_with_grads(ours, theirs, leaves, tol, what):
    assert_rel(ours, theirs, tol, what + " value")
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves)):
        assert_rel(a, b, tol * 10, what + " grad")


@pytest.mark.parametrize("n,d", [(2, 3), (17, 16), (64, 33)])
def test_nt_xent_matches_pml(n, d):
    gen = seeded()
    z1 = randn(n, d, dtype=torch.float64, gen=gen, requires_grad=True)
    z2 = randn(n, d, dtype=torch.float64, gen=gen, requires_grad=True)
    labels = torch.arange(n).repeat(2)
    theirs = pml_losses.NTXentLoss(temperature=0.5)(torch.cat([z1, z2]), labels)
    ours = FL.nt_xent(z1, z2, temperature=0.5, backend=R)
    _compare_with_grads(ours, theirs, [z1, z2], 1e-10, "NTXent")


@pytest.mark.parametrize("n,d,classes", [(2, 3, 2), (17, 16, 4), (64, 33, 20)])
def test_sup_con_matches_pml(n, d, classes):
    gen = seeded()
    f = randn(n, d, dtype=torch.float64, gen=gen, requires_grad=True)
    labels = torch.randint(0, classes, (n,), generator=gen)
    theirs = pml_losses.SupConLoss(temperature=0.1)(f, labels)
    ours = FL.sup_con(f, labels, temperature=0.1, backend=R)
    # PML divides by (count + 1.2e-38): identical in float64 to within rounding.
    if float(theirs.detach()) == 0.0:
        assert float(ours) == 0.0
        return
    _compare_with_grads(ours, theirs, [f], 1e-10, "SupCon")


@pytest.mark.parametrize("epsilon", [0.1, 0.5, None])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.requires_op("multi_similarity")
def test_multi_similarity_matches_pml(backend, device, epsilon, with_ref):
    """PML's MultiSimilarityLoss + MultiSimilarityMiner in float64 against every backend, in
    float64 where the backend takes it (1e-10), else float32 (1e-5; gradients 1e-4)."""
    gen = seeded()
    n, m, d = 40, 31, 8
    dtype = torch.float64 if torch.float64 in _dispatch.get_backend(backend).dtypes else (
        torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    e = randn(n, d, dtype=torch.float64, gen=gen, requires_grad=True)
    labels = torch.randint(0, 5, (n,), generator=gen)
    loss_fn = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    r = randn(m, d, dtype=torch.float64, gen=gen, requires_grad=True)
    rl = torch.randint(0, 5, (m,), generator=gen)
    if with_ref:
        tup = pml_miners.MultiSimilarityMiner(epsilon)(e, labels, r, rl) if epsilon else None
        theirs = loss_fn(e, labels, tup, r, rl)
        leaves = [e, r]
    else:
        tup = pml_miners.MultiSimilarityMiner(epsilon)(e, labels) if epsilon else None
        theirs = loss_fn(e, labels, tup)
        leaves = [e]
    mine = [t.detach().to(device, dtype).requires_grad_() for t in leaves]
    lab_d, rl_d = labels.to(device), rl.to(device)
    if with_ref:
        ours = FL.multi_similarity(mine[0], lab_d, ref_embeddings=mine[1], ref_labels=rl_d,
                                   epsilon=epsilon, backend=backend)
    else:
        ours = FL.multi_similarity(mine[0], lab_d, epsilon=epsilon, backend=backend)
    what = f"MS eps={epsilon} ref={with_ref} {dtype}"
    assert_rel(ours.double().cpu(), theirs, tol, what + " value")
    for a, b in zip(torch.autograd.grad(ours, mine), torch.autograd.grad(theirs, leaves)):
        assert_rel(a.double().cpu(), b, tol * 10, what + " grad")
