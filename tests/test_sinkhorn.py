"""Sinkhorn OT (SPEC §4) against GeomLoss, POT, SwAV's code and dense float64 formulas; every
backend that implements the OT kernels runs the same cases."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_rel, moved_by_an_ulp, randn, rel_err, seeded

import fused_losses as FL

geomloss = pytest.importorskip("geomloss", reason="test extra not installed")


def _geomloss(x, y, a, b, **kw):
    from geomloss import SamplesLoss

    n_dims = x.dim()
    if a is None:
        a = torch.full(x.shape[:-1], 1.0 / x.shape[-2], dtype=x.dtype)
    if b is None:
        b = torch.full(y.shape[:-1], 1.0 / y.shape[-2], dtype=y.dtype)
    out = SamplesLoss("sinkhorn", backend="tensorized", **kw)(a, x, b, y)
    return out if n_dims == 3 else out.reshape(())


def _pair(n, m, d, gen, batch=None, weights=False, zero_weight=False):
    shape_x = (n, d) if batch is None else (batch, n, d)
    shape_y = (m, d) if batch is None else (batch, m, d)
    x = randn(*shape_x, dtype=torch.float64, gen=gen, requires_grad=True)
    y = (randn(*shape_y, dtype=torch.float64, gen=gen) + 0.3).requires_grad_()
    if not weights:
        return x, y, None, None
    a = torch.rand(shape_x[:-1], generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(shape_y[:-1], generator=gen, dtype=torch.float64) + 0.1
    if zero_weight and n > 1:
        a[..., 0] = 0.0
    a = (a / a.sum(-1, keepdim=True)).requires_grad_()
    b = (b / b.sum(-1, keepdim=True)).requires_grad_()
    return x, y, a, b


CASES = [
    dict(n=17, m=23, d=3, p=2, debias=True),
    dict(n=17, m=23, d=3, p=2, debias=False),
    dict(n=17, m=23, d=3, p=1, debias=True),
    dict(n=9, m=5, d=1, p=1, debias=False),
    dict(n=1, m=2, d=3, p=2, debias=True),
    dict(n=2, m=17, d=100, p=2, debias=True, blur=0.5),
    dict(n=12, m=12, d=4, p=2, debias=True, weights=True, zero_weight=True),
    dict(n=8, m=11, d=2, p=2, debias=True, batch=3, weights=True),
    dict(n=20, m=20, d=2, p=2, debias=True, scaling=0.9),
]


def _case_inputs(case):
    """(case, generator, (x, y, a, b) in float64, sinkhorn keyword arguments) of CASES[case]."""
    c = dict(CASES[case])
    gen = seeded()
    pts = _pair(c["n"], c["m"], c["d"], gen, c.get("batch"), c.get("weights", False),
                c.get("zero_weight", False))
    kw = dict(p=c["p"], blur=c.get("blur", 0.1), scaling=c.get("scaling", 0.5),
              debias=c["debias"])
    return c, gen, pts, kw


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.requires_op("ot_softmin")
@pytest.mark.requires_dtype(torch.float64)
def test_matches_geomloss_value_and_gradients(backend, device, case):
    c, gen, (x, y, a, b), kw = _case_inputs(case)
    theirs = _geomloss(x, y, a, b, **kw)
    dev = [t.to(device) if t is not None else None for t in (x, y, a, b)]
    leaves = [t for t in dev if t is not None]
    leaves = [t.detach().requires_grad_() for t in leaves]
    xs, ys = leaves[0], leaves[1]
    as_, bs = (leaves[2], leaves[3]) if a is not None else (None, None)
    ours = FL.sinkhorn(xs, ys, a=as_, b=bs, reduction="sum", backend=backend, **kw)
    what = f"{c} seed={gen.initial_seed()}"
    assert_rel(ours, theirs.sum(), 1e-10, what + " value")
    ref_leaves = [t for t in (x, y, a, b) if t is not None]
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, leaves),
                                torch.autograd.grad(theirs.sum(), ref_leaves)):
        assert_rel(g_ours, g_theirs, 1e-9, what + " grad")


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.requires_op("ot_softmin")
def test_fp32_matches_geomloss(backend, device, case):
    """Every case in fp32 (the only precision of the GPU backends), against GeomLoss in fp64.
    Bound: 1e-4, or GeomLoss's own fp32 noise floor where that is larger (p=1's
    ‖x‖²−2⟨x,y⟩+‖y‖² cancels in fp32 for any implementation)."""
    c, gen, (x, y, a, b), kw = _case_inputs(case)
    theirs = _geomloss(x, y, a, b, **kw)
    leaves = [t.detach().float().to(device).requires_grad_() for t in (x, y, a, b)
              if t is not None]
    as_, bs = (leaves[2], leaves[3]) if a is not None else (None, None)
    ours = FL.sinkhorn(leaves[0], leaves[1], a=as_, b=bs, reduction="sum", backend=backend,
                       **kw)
    assert ours.dtype == torch.float32
    what = f"{c} seed={gen.initial_seed()}"
    ref_leaves = [t for t in (x, y, a, b) if t is not None]
    theirs_grads = torch.autograd.grad(theirs.sum(), ref_leaves)
    # GeomLoss's own fp32 noise floor: its plain fp32 run (2×) and 8 runs on inputs moved by one
    # fp32 ulp (4×), the worst of them: one run alone can be luckily accurate.
    pgen = torch.Generator().manual_seed(gen.initial_seed() + 1)
    floor_value, floor_grads = 0.0, [0.0] * len(ref_leaves)
    for r in range(9):
        leaves32 = [t.detach().float() for t in ref_leaves]
        if r:
            leaves32 = [moved_by_an_ulp(t, pgen) for t in leaves32]
        leaves32 = [t.requires_grad_() for t in leaves32]
        eager = _geomloss(*(leaves32[:2] + ([None, None] if a is None else leaves32[2:])),
                          **kw).sum()
        factor = 2.0 if r == 0 else 4.0
        floor_value = max(floor_value, factor * rel_err(eager, theirs.sum()))
        for k, (g_eager, g_theirs) in enumerate(zip(torch.autograd.grad(eager, leaves32),
                                                    theirs_grads)):
            floor_grads[k] = max(floor_grads[k], factor * rel_err(g_eager, g_theirs))
    assert_rel(ours, theirs.sum(), max(1e-4, floor_value), what + " fp32 value")
    for k, (g_ours, g_theirs) in enumerate(zip(torch.autograd.grad(ours, leaves), theirs_grads)):
        assert_rel(g_ours, g_theirs, max(1e-4, floor_grads[k]), what + f" fp32 grad {k}")


@pytest.mark.requires_op("ot_softmin")
def test_fp32_within_spec_of_geomloss(backend, device):
    gen = seeded()
    x, y, _, _ = _pair(40, 33, 5, gen)
    theirs = _geomloss(x, y, None, None, p=2, blur=0.05)
    x32 = x.detach().float().to(device).requires_grad_()
    y32 = y.detach().float().to(device).requires_grad_()
    ours = FL.sinkhorn(x32, y32, blur=0.05, backend=backend)
    assert ours.dtype == torch.float32
    assert_rel(ours, theirs, 1e-4, "fp32 value")
    for go, gt in zip(torch.autograd.grad(ours, [x32, y32]), torch.autograd.grad(theirs, [x, y])):
        assert_rel(go, gt, 1e-4, "fp32 grad")


def test_potentials_match_geomloss():
    from geomloss import SamplesLoss

    gen = seeded()
    x, y, _, _ = _pair(13, 7, 3, gen)
    for debias in (True, False):
        f, g = FL.sinkhorn_potentials(x, y, blur=0.1, debias=debias)
        F_, G_ = SamplesLoss("sinkhorn", blur=0.1, debias=debias, potentials=True,
                             backend="tensorized")(x, y)
        assert_rel(f, F_.reshape(-1), 1e-10, "f")
        assert_rel(g, G_.reshape(-1), 1e-10, "g")


def _dense_loop(x, y, blur, p, scaling):
    """Independent float64 loop (OT_ε, no debias) written from SPEC §4."""
    def cost(u, v):
        sq = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return sq / 2 if p == 2 else torch.sqrt(torch.clamp_min(sq, 1e-8))

    def softmin(eps, c, h):
        return -eps * torch.logsumexp(h[None, :] - c / eps, dim=1)

    n, m = x.shape[0], y.shape[0]
    a_log = torch.full((n,), -math.log(n), dtype=x.dtype)
    b_log = torch.full((m,), -math.log(m), dtype=x.dtype)
    cxy, cyx = cost(x, y), cost(y, x)
    pts = torch.cat([x, y])
    diam = float((pts.max(0).values - pts.min(0).values).norm())
    eps_list = [diam**p] + [math.exp(e) for e in
                            torch.arange(p * math.log(diam), p * math.log(blur),
                                         p * math.log(scaling), dtype=torch.float64).tolist()]
    eps_list += [blur**p]
    f, g = softmin(eps_list[0], cxy, b_log), softmin(eps_list[0], cyx, a_log)
    for eps in eps_list:
        f, g = 0.5 * (f + softmin(eps, cxy, b_log + g / eps)), \
            0.5 * (g + softmin(eps, cyx, a_log + f / eps))
    eps = blur**p
    f, g = softmin(eps, cxy, b_log + g / eps), softmin(eps, cyx, a_log + f / eps)
    return f.mean() + g.mean()


def test_independent_dense_formula():
    gen = seeded()
    x, y, _, _ = _pair(15, 19, 2, gen)
    for p in (1, 2):
        ours = FL.sinkhorn(x, y, p=p, blur=0.2, debias=False, backend="reference")
        assert_rel(ours, _dense_loop(x.detach(), y.detach(), 0.2, p, 0.5), 1e-12, f"p={p}")


def test_approaches_exact_ot_as_blur_shrinks():
    """POT's exact OT (emd2) with cost ½‖x−y‖² is the blur → 0 limit of the debiased value."""
    ot = pytest.importorskip("ot", reason="POT not installed")
    gen = seeded()
    x, y, _, _ = _pair(30, 30, 2, gen)
    xd, yd = x.detach(), y.detach()
    exact = ot.emd2(torch.full((30,), 1 / 30, dtype=torch.float64),
                    torch.full((30,), 1 / 30, dtype=torch.float64),
                    ((xd[:, None] - yd[None]) ** 2).sum(-1) / 2)
    ours = FL.sinkhorn(xd, yd, blur=0.01, scaling=0.9, backend="reference")
    # A sanity bound (entropic bias and the finite schedule remain at blur 0.01); the exact
    # agreement is with GeomLoss above.
    assert abs(float(ours) - float(exact)) <= 0.1 * float(exact), (ours, exact)


def test_grad_mode_is_left_alone():
    x, y = torch.randn(6, 2, requires_grad=True), torch.randn(7, 2)
    with torch.no_grad():
        v = FL.sinkhorn(x, y)
        assert not torch.is_grad_enabled()
    assert v.grad_fn is None
    assert torch.is_grad_enabled()
    out = FL.sinkhorn(x, y)
    # The graph is one node (the envelope-gradient Function), not a graph of the loop.
    assert type(out.grad_fn).__name__.startswith("SelectBackward") or "Sinkhorn" in str(
        out.grad_fn.next_functions)
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_degenerate_inputs():
    one = torch.randn(1, 3, dtype=torch.float64)
    assert torch.isfinite(FL.sinkhorn(one, one))
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    same = FL.sinkhorn(x, x.detach().clone())
    assert torch.isfinite(same) and abs(float(same.detach())) < 1e-8
    (g,) = torch.autograd.grad(same, x)
    assert torch.isfinite(g).all()
    pts = torch.zeros(5, 2, dtype=torch.float64)  # diameter 0
    assert torch.isfinite(FL.sinkhorn(pts, pts.clone()))
    a = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    assert torch.isfinite(FL.sinkhorn(torch.randn(3, 2, dtype=torch.float64),
                                      torch.randn(4, 2, dtype=torch.float64), a=a))
    v = FL.sinkhorn(torch.randn(5, 2), torch.randn(6, 2), diameter=10.0, n_iters=5)
    assert torch.isfinite(v)


def test_transport_apply_matches_dense_plan():
    gen = seeded()
    x, y, _, _ = _pair(11, 13, 3, gen)
    x, y = x.detach(), y.detach()
    f, g = FL.sinkhorn_potentials(x, y, blur=0.3, debias=False)
    v = randn(13, 4, dtype=torch.float64, gen=gen)
    out = FL.transport_apply(f, g, x, y, v, blur=0.3)
    c = ((x[:, None] - y[None]) ** 2).sum(-1) / 2
    plan = (1 / 11) * (1 / 13) * torch.exp((f[:, None] + g[None, :] - c) / 0.09)
    assert_rel(out, plan @ v, 1e-12, "pi v")
    # At convergence (many iterations at a large ε, where the loop contracts fast) the plan's
    # row marginal is a.
    f, g = FL.sinkhorn_potentials(x, y, blur=1.0, debias=False, n_iters=300)
    ones = FL.transport_apply(f, g, x, y, torch.ones(13, 1, dtype=torch.float64), blur=1.0)
    assert_rel(ones[:, 0], torch.full((11,), 1 / 11, dtype=torch.float64), 1e-6, "marginal")


def _swav(scores, eps, iters):
    q = torch.exp(scores / eps).T
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).T


@pytest.mark.parametrize("n,k", [(17, 5), (128, 300)])
def test_sinkhorn_knopp_matches_swav(n, k):
    gen = seeded()
    scores = torch.nn.functional.normalize(randn(n, k, dtype=torch.float64, gen=gen), dim=1)
    codes = FL.sinkhorn_knopp(scores, epsilon=0.05, n_iters=3)
    assert_rel(codes, _swav(scores, 0.05, 3), 1e-10, "codes")
    assert_rel(codes.sum(1), torch.ones(n, dtype=torch.float64), 1e-10, "rows sum to 1")


def test_sinkhorn_knopp_log_domain_and_streamed_form():
    gen = seeded()
    z = randn(40, 8, dtype=torch.float64, gen=gen)
    protos = randn(30, 8, dtype=torch.float64, gen=gen)
    dense = FL.sinkhorn_knopp(z @ protos.T, epsilon=0.05)
    streamed = FL.sinkhorn_knopp(z=z, prototypes=protos, epsilon=0.05)
    assert_rel(streamed, dense, 1e-10, "streamed vs dense")
    big = FL.sinkhorn_knopp(torch.full((6, 4), 50.0) + torch.randn(6, 4, generator=gen),
                            epsilon=0.05)  # scores/ε = 1e3: exp overflows in the scaling domain
    assert torch.isfinite(big).all()


BAD = [
    (lambda: FL.sinkhorn(torch.randn(3), torch.randn(3, 2)), ValueError, "x"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 3)), ValueError, "dimension"),
    (lambda: FL.sinkhorn(torch.randn(2, 3, 2), torch.randn(3, 3, 2)), ValueError, "batch"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), p=3), ValueError, "p must"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), blur=0.0), ValueError, "blur"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), blur=math.inf), ValueError,
     "blur"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), scaling=1.0), ValueError,
     "scaling"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), n_iters=0), ValueError,
     "n_iters"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), cost="l1"), ValueError, "cost"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), a=torch.ones(2)), ValueError,
     "a"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), a=-torch.ones(3)), ValueError,
     "non-negative"),
    (lambda: FL.sinkhorn(torch.randn(3, 2), torch.randn(3, 2), reduction="x"), ValueError,
     "reduction"),
    (lambda: FL.sinkhorn_knopp(torch.randn(3, 2), epsilon=0.0), ValueError, "epsilon"),
    (lambda: FL.sinkhorn_knopp(), ValueError, "scores"),
    (lambda: FL.sinkhorn_knopp(z=torch.randn(3, 2)), ValueError, "prototypes"),
    (lambda: FL.transport_apply(torch.zeros(3), torch.zeros(4), torch.randn(3, 2),
                                torch.randn(4, 2), torch.randn(5, 1)), ValueError, "v must"),
]


@pytest.mark.parametrize("call", range(len(BAD)))
def test_bad_input(call):
    fn, exc, frag = BAD[call]
    with pytest.raises(exc, match=frag):
        fn()
