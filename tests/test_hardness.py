"""The InfoNCE variants of issue 18 against float64 transcriptions of the authors' formulas.

Every transcription below is written from the paper (and, for HCL/debiased, the authors'
published criterion), dense and in float64, without any fused_losses code: hard-negative
reweighting (HCL, Robinson et al., ICLR 2021), the debiased contrastive loss (Chuang et al.,
NeurIPS 2020), per-anchor temperature, per-anchor weights, and hard negative mixing (MoCHi,
Kalantidis et al., NeurIPS 2020).  Each op runs on every backend that serves it (the Triton one
interpreted, on small shapes), in float64 where the backend has it (tight bound) and in float32
(bound: the SPEC tolerance, or 4x the error of the same transcription run in float32 on the same
inputs, which is what float32 leaves to any code at that temperature).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within, moved_by_an_ulp, randn, rel_err, seeded

import fused_losses as FL
from fused_losses import _dispatch

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# float64 transcriptions (no fused_losses code)


def hcl_rows(sim, pos, neg, tau, beta, tau_plus):
    """Robinson et al.'s estimator per anchor row (their criterion, estimator='hard'; with
    beta=0 Chuang et al.'s debiased one): ``sim`` (N, M) cosine similarities, ``pos``/``neg``
    (N, M) boolean masks (the positive logit is the mean over ``pos``; one positive in the
    authors' code).  With N_i = |neg_i|:

        imp = e^{beta s/tau};  reweight = sum(imp * e^{s/tau}) / mean(imp)
        Ng = max((-tau_plus * N_i * pos + reweight) / (1 - tau_plus), N_i * e^{-1/tau})
        loss = -log(pos / (pos + Ng))

    All of pos, e^{s/tau} and the clamp carry a common per-row factor e^{-c_i} (it cancels in
    pos / (pos + Ng)) and imp a factor e^{-beta c'_i} (it cancels in reweight), so that
    tau = 0.01, beta = 10 stay inside float64's range.  Rows without a positive or a negative
    are dropped: returns (losses of the kept rows, kept mask)."""
    sim = sim / tau
    keep = pos.any(1) & neg.any(1)
    out = []
    for i in torch.nonzero(keep).flatten().tolist():
        s_neg = sim[i][neg[i]]
        s_pos = sim[i][pos[i]].mean()
        n_neg = s_neg.numel()
        c = torch.maximum(s_neg.max(), s_pos)
        e_neg = torch.exp(s_neg - c)
        e_pos = torch.exp(s_pos - c)
        if beta > 0:
            imp = torch.exp(beta * (s_neg - s_neg.max()))
            reweight = (imp * e_neg).sum() / imp.mean()
        else:
            reweight = e_neg.sum()
        ng = (-tau_plus * n_neg * e_pos + reweight) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n_neg * torch.exp(-1.0 / tau - c))
        out.append(-torch.log(e_pos / (e_pos + ng)))
    return (torch.stack(out) if out else sim.new_zeros(0)), keep


def _rows(t, normalize):
    return F.normalize(t, dim=1) if normalize else t


def hcl_authors_nt_xent(out_1, out_2, tau, beta, tau_plus, normalize=True):
    """The authors' SimCLR pairing: out = [out_1; out_2] (unit rows), positive of row i its
    other view, negatives the 2N - 2 other rows; mean over the 2N rows."""
    n = out_1.shape[0]
    out = torch.cat([_rows(out_1, normalize), _rows(out_2, normalize)])
    idx = torch.arange(2 * n)
    pos = idx[:, None] == ((idx + n) % (2 * n))[None, :]
    neg = ~pos & (idx[:, None] != idx[None, :])
    loss, _ = hcl_rows(out @ out.T, pos, neg, tau, beta, tau_plus)
    return loss.mean()


def hcl_query_key(q, k, tau, beta, tau_plus, labels=None, extra=None, symmetric=False,
                  normalize=True):
    """The same estimator for queries against keys (CLIP form: positive of query i is key i;
    label form: every key of the same label), extra negatives appended to every row."""
    q, k = _rows(q, normalize), _rows(k, normalize)
    n, m = q.shape[0], k.shape[0]
    if labels is None:
        pos = torch.arange(n)[:, None] == torch.arange(m)[None, :]
    else:
        pos = labels[:, None] == labels[None, :]
    sim = q @ k.T
    rows_sim, rows_pos = sim, pos
    if extra is not None:
        e = _rows(extra, normalize)
        rows_sim = torch.cat([sim, q @ e.T], 1)
        rows_pos = torch.cat([pos, torch.zeros(n, e.shape[0], dtype=torch.bool)], 1)
    row, keep = hcl_rows(rows_sim, rows_pos, ~rows_pos, tau, beta, tau_plus)
    row = row.mean() if keep.any() else row.sum()
    if not symmetric:
        return row
    col, keep = hcl_rows(sim.T, pos.T, ~pos.T, tau, beta, tau_plus)
    return (row + (col.mean() if keep.any() else col.sum())) / 2


def info_nce_per_anchor_t(q, k, t, symmetric=False, weight=None, labels=None, self_excl=False):
    """Cross-entropy with anchor i's logits <q_i, k_j> / t_i (unit rows); ``labels``: the
    supervised-contrastive form (mean log-probability of the positives, self excluded), the
    mean over the anchors with a positive, each row's loss times ``weight``."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)

    def rows(a, b):
        logits = a @ b.T / t[:, None]
        n = a.shape[0]
        if labels is None:
            return F.cross_entropy(logits, torch.arange(n), reduction="none"), \
                torch.ones(n, dtype=torch.bool)
        pos = labels[:, None] == labels[None, :]
        if self_excl:
            eye = torch.eye(n, dtype=torch.bool)
            logits = logits.masked_fill(eye, NEG_INF)
            pos = pos & ~eye
        logp = logits.log_softmax(1)
        cnt = pos.sum(1)
        loss = -torch.where(pos, logp, torch.zeros_like(logp)).sum(1) / cnt.clamp_min(1)
        return torch.where(cnt > 0, loss, torch.zeros_like(loss)), cnt > 0

    def reduce(loss, valid):
        if weight is not None:
            loss = loss * weight.to(loss.dtype)
        return loss.sum() / valid.sum().clamp_min(1)

    out = reduce(*rows(q, k))
    if symmetric:
        out = (out + reduce(*rows(k, q))) / 2
    return out


def mochi_transcription(q, k, queue, tau, n_hard, n_mix, n_query_mix, seed):
    """MoCHi (Kalantidis et al. 2020, §4): for each query its n_hard hardest negatives in
    decreasing similarity, n_mix points h = normalize(a n_i + (1 - a) n_j) from random pairs
    i != j of them, a ~ U(0, 1), n_query_mix points h' = normalize(b q + (1 - b) n_c),
    b ~ U(0, 0.5), all detached, appended to that query's logits; cross-entropy with the
    positive key.  The random draws follow the order ``mochi_info_nce`` documents (a, b
    indices, a coefficients, c indices, b coefficients) from ``torch.Generator(seed)``.
    Without a queue the negatives are the other keys."""
    gen = torch.Generator().manual_seed(seed)
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    n = q.shape[0]
    if queue is not None:
        pool = F.normalize(queue, dim=1)
        sim_pool = q.detach() @ pool.T
    else:
        pool = k.detach()
        sim_pool = (q.detach() @ pool.T).masked_fill(
            torch.arange(n)[:, None] == torch.arange(k.shape[0])[None, :], NEG_INF)
    hard = sim_pool.topk(n_hard, dim=1).indices  # hardest first
    hards = pool[hard]  # (N, k, D)
    synth = []
    if n_mix:
        a = torch.randint(0, n_hard, (n, n_mix), generator=gen)
        b = torch.randint(0, n_hard - 1, (n, n_mix), generator=gen)
        b = b + (b >= a).long()
        alpha = torch.rand((n, n_mix), generator=gen, dtype=torch.float64)[..., None].to(q.dtype)
        na = hards.gather(1, a[..., None].expand(-1, -1, q.shape[1]))
        nb = hards.gather(1, b[..., None].expand(-1, -1, q.shape[1]))
        synth.append(F.normalize(alpha * na + (1 - alpha) * nb, dim=2))
    if n_query_mix:
        c = torch.randint(0, n_hard, (n, n_query_mix), generator=gen)
        beta = (0.5 * torch.rand((n, n_query_mix), generator=gen, dtype=torch.float64))[
            ..., None].to(q.dtype)
        nc = hards.gather(1, c[..., None].expand(-1, -1, q.shape[1]))
        synth.append(F.normalize(beta * q.detach()[:, None, :] + (1 - beta) * nc, dim=2))
    negs = [q @ k.T] if queue is None else [(q * k[:n]).sum(1, keepdim=True), q @ pool.T]
    if synth:
        negs.append(torch.einsum("nd,nsd->ns", q, torch.cat(synth, 1)))
    logits = torch.cat(negs, 1) / tau
    target = torch.arange(n) if queue is None else torch.zeros(n, dtype=torch.long)
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------------------------
# comparison


def _dtypes(backend):
    """float64 where the backend has it; float32 for the fused backends (the reference's own
    float32 run is the noise floor of theirs, see ``compare``)."""
    have = _dispatch.get_backend(backend).dtypes
    want = (torch.float64,) if backend == "reference" else (torch.float64, torch.float32)
    return [d for d in want if d in have]


def compare(backend, device, ours, theirs, tensors, what, dtype, max_logit=1.0):
    """ours(backend, *inputs) against theirs(*inputs64): the loss and the gradient of every
    input that requires grad.  The bound is the dtype's tolerance (1e-9 in float64; in
    float32 the SPEC 1e-5 or the logits' spacing, 2e-8 x ``max_logit``, as test_losses'
    extreme temperature test; 10x for a 0-dim temperature gradient, one sum of N·M terms, as
    check_against_reference) or the noise floor of the dtype, measured as SPEC §7 does,
    whichever is larger: 4x how far ``theirs`` (float64) moves when the inputs move by an ulp
    of ``dtype`` (the formula's conditioning: HCL's debiasing A − B cancels; at tau = 0.01,
    beta = 10 a logit of 1100 keeps 1e-4 in float32), in float64 also when they move by
    eps·``max_logit`` (what rounding a logit of that size does to any float64 code), and
    below float64 2x / 4x the error of
    the reference backend run eagerly in ``dtype`` on the same / the moved inputs.  An
    absolute error of at most 1e-12 (float64) / 1e-7 (float32) passes (a gradient that is
    zero up to rounding, e.g. of unit 1-D rows).  No valid anchor: both sides 0."""
    def leaf(t, like):
        return t.detach().requires_grad_(like.requires_grad)

    def cast(ts, **kw):
        return [leaf(t.to(**kw), t) if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t for t in ts]

    ins = [t.detach().to(device=device, dtype=dtype).requires_grad_(t.requires_grad)
           if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]
    ins64 = cast(ins, dtype=torch.float64, device="cpu")
    grad_of = [i for i, t in enumerate(ins) if isinstance(t, torch.Tensor) and t.requires_grad]

    def run(fn, args):
        out = fn(*args)
        gs = torch.autograd.grad(out, [args[i] for i in grad_of]) if grad_of else ()
        return (out, *gs)

    got = run(lambda *a: ours(backend, *a), ins)
    if not got[0].requires_grad or not theirs(*ins64).requires_grad:  # no valid anchor
        assert got[0].item() == 0.0 and theirs(*ins64).item() == 0.0, what
        return
    ref = run(theirs, ins64)
    assert all(torch.isfinite(r).all() for r in ref), what
    floors = [0.0] * len(ref)

    def floor(factor, outs):
        for j, (a, b) in enumerate(zip(outs, ref)):
            if torch.isfinite(a).all():
                floors[j] = max(floors[j], factor * rel_err(a, b))

    pgen = torch.Generator().manual_seed(len(what))
    eager = dtype != torch.float64 and backend != "reference"
    if eager:
        floor(2, run(lambda *a: ours("reference", *a), cast(ins, device="cpu")))
    for _ in range(4):
        moved = [leaf(moved_by_an_ulp(t, pgen), t)
                 if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ins]
        floor(4, run(theirs, cast(moved, dtype=torch.float64, device="cpu")))
        if eager:
            floor(4, run(lambda *a: ours("reference", *a), cast(moved, device="cpu")))
        if dtype == torch.float64:
            # float64 code rounds a logit of size L by ~eps·L, far more than an ulp of the
            # inputs moves it: probe the formula with inputs moved by eps·L (relative)
            step = torch.finfo(torch.float64).eps * max(1.0, max_logit)
            moved = [leaf(t.detach() * (1 + step * torch.randn(t.shape, generator=pgen,
                                                                dtype=t.dtype)), t)
                     if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in ins64]
            floor(4, run(theirs, moved))
    tol = 1e-9 if dtype == torch.float64 else max(1e-5, 2e-8 * max_logit)
    atol = 1e-12 if dtype == torch.float64 else 1e-7
    for j, (a, b) in enumerate(zip(got, ref)):
        label = "loss" if j == 0 else f"grad {grad_of[j - 1]}"
        bound = max(tol * (10 if a.dim() == 0 and j and dtype != torch.float64 else 1),
                    floors[j])
        exempt = float((a.detach().double().cpu() - b.detach()).norm()) <= atol
        assert_within(rel_err(a, b), bound,
                      f"{backend}: {what} {dtype} {label}",
                      exempt=exempt)


def _max_sim(*rows, normalize=True):
    """max(1, largest |<a, b>|) over the rows given (normalized or not): the logits' scale."""
    r = torch.cat([t.detach() for t in rows])
    r = F.normalize(r, dim=1) if normalize else r
    return max(1.0, float((r @ r.T).abs().max()))


def _unit(n, d, gen, requires_grad=True):
    """Random rows, normalized by the op.  D=1 rows are passed unnormalized (normalize=False
    in the HCL tests), at norm < ~1.5: unit 1-D features are ±1, every similarity ±1, which
    sits exactly on HCL's clamp N·e^{-1/tau} (a tie, where the two sides' subgradients may
    differ)."""
    return randn(n, d, gen=gen, dtype=torch.float64, requires_grad=requires_grad,
                 scale=0.5 if d == 1 else 1.0)


# --------------------------------------------------------------------------------------------
# HCL / debiased


HCL_PARAMS = [  # (tau, beta, tau_plus): the authors' defaults, debiased, extremes
    (0.5, 1.0, 0.1), (0.5, 0.0, 0.1), (0.5, 0.0, 0.0), (0.01, 10.0, 0.1), (0.01, 0.0, 0.5),
    (0.2, 10.0, 1e-6), (0.1, 3.0, 0.9), (1.0, 0.5, 0.99),
]


@pytest.mark.parametrize("tau,beta,tau_plus", HCL_PARAMS)
@pytest.mark.requires_op("hard_negative_info_nce")
def test_hcl_nt_xent_against_authors(backend, device, tau, beta, tau_plus):
    gen = seeded()
    # N=1 has no negative (2N - 2 = 0): test_hcl_without_negatives
    shapes = [(2, 3), (3, 1), (9, 100)] if backend == "triton" else \
        [(2, 3), (3, 1), (17, 100), (40, 3)]
    for n, d in shapes:
        z1, z2 = _unit(n, d, gen), _unit(n, d, gen)
        t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)

        ml = (1 + beta) / tau * _max_sim(z1, z2, normalize=d > 1)

        def ours(b, z1, z2, t):
            return FL.hard_negative_nt_xent(z1, z2, temperature=t, beta=beta,
                                            tau_plus=tau_plus, normalize=d > 1, backend=b)

        def theirs(z1, z2, t):
            return hcl_authors_nt_xent(z1, z2, t, beta, tau_plus, normalize=d > 1)

        for dtype in _dtypes(backend):
            compare(backend, device, ours, theirs, [z1, z2, t],
                    f"hcl nt_xent tau={tau} beta={beta} tau+={tau_plus} N={n} D={d}", dtype,
                    max_logit=ml)


@pytest.mark.parametrize("form", ["clip", "labels", "extra", "symmetric"])
@pytest.mark.requires_op("hard_negative_info_nce")
def test_hcl_query_key_forms(backend, device, form):
    gen = seeded()
    shapes = [(2, 5, 3), (7, 7, 1)] if backend == "triton" else \
        [(1, 4, 3), (2, 2, 1), (17, 17, 100), (17, 40, 3)]
    for tau, beta, tau_plus in [(0.5, 1.0, 0.1), (0.01, 10.0, 0.3), (0.1, 0.0, 0.05)]:
        for n, m, d in shapes:
            if form in ("labels", "symmetric") and n != m:
                continue
            q, k = _unit(n, d, gen), _unit(m, d, gen)
            extra = _unit(5, d, gen) if form == "extra" else None
            labels = torch.randint(0, 3, (n,), generator=gen) if form == "labels" else None
            t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
            tensors = [q, k, t] + ([extra] if extra is not None else [])

            ml = (1 + beta) / tau * _max_sim(q, k, *([extra] if extra is not None else []),
                                             normalize=d > 1)

            def ours(b, q, k, t, *e):
                return FL.hard_negative_info_nce(
                    q, k, temperature=t, beta=beta, tau_plus=tau_plus, labels=labels,
                    extra_negatives=e[0] if e else None, symmetric=form == "symmetric",
                    normalize=d > 1, backend=b)

            def theirs(q, k, t, *e):
                return hcl_query_key(q, k, t, beta, tau_plus, labels=labels,
                                     extra=e[0] if e else None, symmetric=form == "symmetric",
                                     normalize=d > 1)

            for dtype in _dtypes(backend):
                compare(backend, device, ours, theirs, tensors,
                        f"hcl {form} tau={tau} beta={beta} tau+={tau_plus} N={n} M={m} D={d}",
                        dtype, max_logit=ml)


@pytest.mark.requires_op("hard_negative_info_nce")
def test_hcl_without_negatives(backend, device):
    """N=1 in the NT-Xent pairing has no negative: no valid anchor, loss 0 (the mean over none),
    finite gradients (zero)."""
    z1 = torch.randn(1, 3, device=device, requires_grad=True)
    z2 = torch.randn(1, 3, device=device, requires_grad=True)
    loss = FL.hard_negative_nt_xent(z1, z2, backend=backend)
    assert loss.item() == 0.0
    rows = FL.hard_negative_nt_xent(z1, z2, reduction="none", backend=backend)
    assert rows.shape == (2,) and (rows == 0).all()


@pytest.mark.requires_op("hard_negative_info_nce", "info_nce")
def test_hcl_reduces_to_info_nce(backend, device):
    """beta = 0, tau_plus = 0 is plain InfoNCE (the issue's statement), as long as the clamp
    n_neg·e^{-1/tau} stays below the negatives' mass (true for unit rows)."""
    gen = seeded()
    q, k = _unit(9, 4, gen).float(), _unit(9, 4, gen).float()
    a = FL.hard_negative_info_nce(q, k, temperature=0.3, beta=0.0, tau_plus=0.0, backend=backend)
    b = FL.info_nce(q, k, temperature=0.3, backend=backend)
    assert_within(rel_err(a, b), 1e-6, "hcl(beta=0, tau+=0) vs info_nce")


# --------------------------------------------------------------------------------------------
# per-anchor temperature and per-anchor weights


@pytest.mark.parametrize("op", ["info_nce", "clip_sym", "sup_con"])
@pytest.mark.requires_op("info_nce")
def test_per_anchor_temperature(backend, device, op):
    gen = seeded()
    shapes = [(2, 3), (7, 1)] if backend == "triton" else [(1, 3), (2, 1), (17, 100)]
    for n, d in shapes:
        q, k = _unit(n, d, gen), _unit(n, d, gen)
        # 0.01 .. 1: one anchor at the extreme temperature
        t = (0.01 + torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_(True)
        w = torch.rand(n, generator=gen, dtype=torch.float64) * 2
        labels = torch.randint(0, 2, (n,), generator=gen)
        if op == "info_nce":
            def ours(b, q, k, t):
                return FL.info_nce(q, k, temperature=t, weight=w.to(q), backend=b)

            def theirs(q, k, t):
                return info_nce_per_anchor_t(q, k, t, weight=w)
        elif op == "clip_sym":
            def ours(b, q, k, t):
                return FL.clip_loss(q, k, 1.0 / t, weight=w.to(q), backend=b)

            def theirs(q, k, t):
                return info_nce_per_anchor_t(q, k, t, symmetric=True, weight=w)
        else:
            def ours(b, q, t):
                return FL.sup_con(q, labels, temperature=t, weight=w.to(q), backend=b)

            def theirs(q, t):
                return info_nce_per_anchor_t(q, q, t, labels=labels, self_excl=True, weight=w)
        tensors = [q, t] if op == "sup_con" else [q, k, t]
        for dtype in _dtypes(backend):
            compare(backend, device, ours, theirs, tensors, f"{op} per-anchor t N={n} D={d}",
                    dtype, max_logit=1 / 0.01)


@pytest.mark.requires_op("info_nce")
def test_anchor_negatives(backend, device):
    """info_nce(anchor_negatives=(N, E, D)): each query's own negatives join its denominator
    (what MoCHi's synthetic points use): cross-entropy over [q_i·K, q_i·A_i] / tau."""
    gen = seeded()
    for n, m, e, d in [(1, 3, 1, 3), (5, 7, 4, 100)]:
        q, k, a = _unit(n, d, gen), _unit(m, d, gen), randn(n, e, d, gen=gen,
                                                           dtype=torch.float64,
                                                           requires_grad=True)

        def ours(b, q, k, a):
            return FL.info_nce(q, k, temperature=0.1, anchor_negatives=a, backend=b)

        def theirs(q, k, a):
            q, k, a = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(a, dim=2)
            logits = torch.cat([q @ k.T, torch.einsum("nd,ned->ne", q, a)], 1) / 0.1
            return F.cross_entropy(logits, torch.arange(q.shape[0]))

        for dtype in _dtypes(backend):
            compare(backend, device, ours, theirs, [q, k, a],
                    f"anchor_negatives N={n} M={m} E={e} D={d}", dtype, max_logit=10.0)


@pytest.mark.requires_op("hard_negative_info_nce")
def test_hcl_weight(backend, device):
    gen = seeded()
    z1, z2 = _unit(5, 3, gen), _unit(5, 3, gen)
    w = torch.rand(10, generator=gen, dtype=torch.float64)
    dtype = _dtypes(backend)[0]
    z1, z2, w = (t.detach().to(device=device, dtype=dtype) for t in (z1, z2, w))
    rows = FL.hard_negative_nt_xent(z1, z2, temperature=0.2, reduction="none", backend=backend)
    got = FL.hard_negative_nt_xent(z1, z2, temperature=0.2, weight=w, backend=backend)
    assert_within(rel_err(got, (rows * w).mean()), 1e-6, "hcl weight= is w·loss averaged")


@pytest.mark.cpu_device
def test_multi_similarity_weight():
    gen = seeded()
    e = randn(12, 5, gen=gen)
    labels = torch.randint(0, 3, (12,), generator=gen)
    w = torch.rand(12, generator=gen)
    rows = FL.multi_similarity(e, labels, reduction="none", backend="reference")
    got = FL.multi_similarity(e, labels, weight=w, backend="reference")
    assert_within(rel_err(got, (rows * w).mean()), 1e-6, "multi_similarity weight=")


# --------------------------------------------------------------------------------------------
# MoCHi


@pytest.mark.parametrize("with_queue", [True, False])
@pytest.mark.requires_op("info_nce", "similarity_topk", "pairwise_logsumexp")
def test_mochi_against_transcription(backend, device, with_queue):
    gen = seeded()
    shapes = [(3, 4, 5)] if backend == "triton" else [(2, 3, 3), (9, 17, 100)]
    for n, d, qn in shapes:
        q, k = _unit(n, d, gen), _unit(n, d, gen)
        queue = _unit(qn, d, gen, requires_grad=False) if with_queue else None
        pool = qn if with_queue else n - 1
        for n_hard, n_mix, n_query_mix in [(2, 3, 2), (min(pool, 4), 0, 5), (pool, 6, 0)]:
            if n_hard > pool or n_hard < (2 if n_mix else 1):
                continue
            seed = int(torch.randint(0, 2**31, (1,), generator=gen))

            def ours(b, q, k, *qu):
                g = torch.Generator(device=q.device).manual_seed(seed)
                return FL.mochi_info_nce(q, k, queue=qu[0] if qu else None, temperature=0.07,
                                         n_hard=n_hard, n_mix=n_mix, n_query_mix=n_query_mix,
                                         generator=g, backend=b)

            def theirs(q, k, *qu):
                return mochi_transcription(q, k, qu[0] if qu else None, 0.07, n_hard, n_mix,
                                           n_query_mix, seed)

            for dtype in _dtypes(backend):
                compare(backend, device, ours, theirs, [q, k] + ([queue] if with_queue else []),
                        f"mochi queue={with_queue} N={n} D={d} k={n_hard} s={n_mix} "
                        f"s'={n_query_mix}", dtype, max_logit=1 / 0.07)


# --------------------------------------------------------------------------------------------
# bad inputs


def _bad_cases():
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    hcl = FL.hard_negative_info_nce
    return [
        ("beta", lambda: hcl(q, k, beta=-1.0)),
        ("beta", lambda: hcl(q, k, beta=float("inf"))),
        ("tau_plus", lambda: hcl(q, k, tau_plus=1.0)),
        ("tau_plus", lambda: hcl(q, k, tau_plus=-0.1)),
        ("temperature", lambda: hcl(q, k, temperature=0.0)),
        ("weight", lambda: hcl(q, k, weight=torch.ones(5))),
        ("weight", lambda: FL.hard_negative_nt_xent(q, k, weight=-torch.ones(8))),
        ("temperature", lambda: FL.info_nce(q, k, temperature=torch.ones(5))),
        ("temperature", lambda: FL.info_nce(q, k, temperature=torch.tensor([1.0, 1, 0, 1]))),
        ("logit_scale", lambda: FL.clip_loss(q, k, torch.tensor([1.0, -1, 1, 1]))),
        ("temperature", lambda: FL.sup_con(q, torch.arange(4), temperature=torch.ones(3))),
        ("weight", lambda: FL.info_nce(q, k, weight=torch.tensor([1.0, float("nan"), 1, 1]))),
        ("weight", lambda: FL.multi_similarity(q, torch.arange(4), weight=torch.ones(3))),
        ("anchor_negatives", lambda: FL.info_nce(q, k, anchor_negatives=torch.randn(3, 2, 3))),
        ("n_hard", lambda: FL.mochi_info_nce(q, k, n_hard=4)),
        ("n_hard", lambda: FL.mochi_info_nce(q, k, queue=torch.randn(6, 3), n_hard=7)),
        ("n_mix", lambda: FL.mochi_info_nce(q, k, n_hard=2, n_mix=-1)),
        ("queue", lambda: FL.mochi_info_nce(q, k, queue=torch.randn(6, 2))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_name_the_argument(case):
    name, call = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_generator_type_error():
    q = torch.randn(4, 3)
    with pytest.raises(TypeError, match="generator"):
        FL.mochi_info_nce(q, q, n_hard=2, generator=1)


def test_clamp_is_active_somewhere():
    """The extreme cases above do reach the clamp branch of Ng (else they could not fail on
    it): tau_plus near 1 with a positive near the negatives drives the debiased sum below
    N·e^{-1/tau}."""
    z = F.normalize(torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator()
                                .manual_seed(0)), dim=1)
    tau, tau_plus = 1.0, 0.99
    sim = z @ z.T / tau
    n = 3
    idx = torch.arange(2 * n)
    pos = idx[:, None] == ((idx + n) % (2 * n))[None, :]
    neg = ~pos & (idx[:, None] != idx[None, :])
    e_pos = sim[pos].exp()
    unc = (-tau_plus * (2 * n - 2) * e_pos + torch.where(neg, sim.exp(), 0).sum(1)) / (1 - tau_plus)
    assert (unc < (2 * n - 2) * math.exp(-1 / tau)).any()
