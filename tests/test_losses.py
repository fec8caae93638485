"""Every backend against the float64 reference: forward and every gradient (SPEC §7).

Parametrized by conftest over the available backends; the reference itself is checked here for
precision (fp32/low precision vs fp64) and against independent formulas in test_oracles.py.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from helpers import (
    assert_rel,
    assert_within,
    cases,
    dtypes_for,
    kernel_inputs,
    leaf64,
    moved_by_an_ulp,
    randn,
    rel_err,
    seed_hint,
    seeded,
    shapes_for,
    supports,
    tol_for,
)

import fused_losses as FL


def _grad_of(out, inputs, g):
    """Gradients of <out, g> wrt the inputs that require grad (zeros where unused)."""
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(
        out, inputs, g.to(device=out.device, dtype=out.dtype), allow_unused=True, retain_graph=True
    )
    return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]


def _to(t, device, dtype):
    """Move a test input: features to ``dtype``; 0-dim hyperparameters stay at least fp32 (a
    temperature rounded to fp16 would change the problem, not test the kernel)."""
    if not isinstance(t, torch.Tensor):
        return t
    if not t.is_floating_point():
        return t.to(device)
    want = dtype
    if t.dim() == 0 and dtype in (torch.float16, torch.bfloat16):
        want = torch.float32
    return t.detach().to(device=device, dtype=want).requires_grad_(t.requires_grad)


def _perturbed(tensors, gen):
    """``tensors`` with every floating input below fp64 moved by about one ulp of its dtype."""
    return [moved_by_an_ulp(t, gen).requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            else t
            for t in tensors]


def check_against_reference(backend, device, dtype, fn, tensors, what, tol=None,
                            alternatives=(), out_atol=0.0, grad_atol=0.0):
    """Run ``fn(backend, *tensors)`` on ``backend`` (inputs in ``dtype`` on ``device``) and the
    reference in float64 on the same (rounded) inputs; compare the outputs and the gradient of
    every input that requires grad.

    Bound (SPEC §7, with the flash-attention rule applied to every non-fp64 dtype): the SPEC
    tolerance, or 2× the error of the reference run eagerly in the same dtype, or 4× the worst
    error of the eager reference over a few equally valid realizations (inputs moved by one
    ulp), whichever is largest.  The last two measure what precision the dtype leaves to any
    code for this output: cancellation-prone outputs (near-zero losses, a softmax bias gradient
    that sums to zero, the temperature gradient) have fewer digits than 1e-5/2e-2, and one
    eager run alone can be luckily accurate.  ``alternatives``: other fp32 formulations of the
    same function, as valid as autograd's (e.g. flash-attention's backward), whose errors count
    towards that floor too: the kernel implements one of them.  ``out_atol``: an absolute error
    of the outputs that any code in this dtype may make (a loss LSE − logit near 0 keeps its
    value only to an ulp of the LSE, whatever the inputs' rounding: perturbing them cannot
    reveal it).  ``grad_atol``: the same for the gradients (e.g. a saturated softmax, whose
    gradient is a cancellation that keeps only its rounding in any fp32 code)."""
    what = f"{what}{seed_hint()}"
    ins = [_to(t, device, dtype) for t in tensors]
    # The oracle sees the inputs exactly as the kernel does (already rounded to ``dtype``), so
    # the comparison measures the computation, not the input quantization.
    ins64 = [
        leaf64(t)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
        else (t.cpu() if isinstance(t, torch.Tensor) else t)
        for t in ins
    ]
    out = fn(backend, *ins)
    ref = fn("reference", *ins64)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    tol = tol if tol is not None else tol_for(dtype)
    eager = dtype != torch.float64 and backend != "reference"
    lowp_reference = backend == "reference" and dtype != torch.float64

    def as_tuple(o):
        return o if isinstance(o, tuple) else (o,)

    # fp64 has no lower-precision eager run to compare with; an absolute floor of 1e-12 absorbs
    # pure cancellation (a loss of e^-30 from logits of 30) while an fp32 slip (~1e-6) still fails.
    # Below fp64, values under 2^-100 (e.g. a SigLIP gradient of e^-90) are exempt: fp32 holds
    # them only as (near-)denormals, which vectorized CPU code flushes to zero.
    atol = 1e-12 if dtype == torch.float64 else 2.0**-100

    def abs_err(a, b):
        diff = a.detach().double().cpu() - b.detach().double().cpu()
        return float(torch.linalg.vector_norm(diff))

    def check(label, got, want, bound):
        assert_within(rel_err(got, want), bound, f"{what} {label}",
                      exempt=abs_err(got, want) <= atol)

    wants_grad = outs[0].requires_grad
    # The upstream gradient is drawn from a generator seeded by the case description (which
    # names the test's seed), so FUSED_LOSSES_TEST_SEED reproduces a failure exactly.
    g = torch.randn(outs[0].shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(zlib.crc32(what.encode())))
    # Hyperparameter (0-dim) gradients are checked under a same-sign upstream gradient
    # (|g| + 0.1), as in training where the loss is a mean: with random signs they are sums of
    # sign-mixed per-anchor terms whose relative error measures only cancellation.
    scalar = [t.dim() == 0 for t in ins if isinstance(t, torch.Tensor) and t.requires_grad]

    def grads_along(o, inputs, direction=g):
        """Gradients of <o, direction> (of <o, |direction| + 0.1> for 0-dim inputs)."""
        if not wants_grad:
            return []
        along = _grad_of(o, inputs, direction)
        if not any(scalar):
            return along
        along_pos = _grad_of(o, inputs, direction.abs() + 0.1)
        return [p if s else a for s, a, p in zip(scalar, along, along_pos)]

    grads = grads_along(outs[0], ins)
    grads64 = grads_along(refs[0], ins64)

    # The dtype's noise floor for each output and gradient, measured (see the docstring): the
    # plain eager run along g (2×), then eager runs on perturbed inputs (4×), along g and along a
    # fresh upstream direction.  Both matter: a hyperparameter gradient's cancellation depends on
    # g, and near a one-hot softmax g·(p − 1) keeps only a few digits in any fp32 code, by an
    # amount that depends on g and on the rounding pattern, so one run can be luckily accurate
    # where the kernel is not (and vice versa).
    out_floor = [0.0] * len(outs)
    grad_floor = [0.0] * len(grads)
    if eager:
        pgen = torch.Generator().manual_seed(zlib.crc32(what.encode()) + 1)
        for r in range(6):
            ins_eager = [_to(t, device, dtype) for t in tensors]
            factor = 2.0 if r == 0 else 4.0
            if r:
                ins_eager = _perturbed(ins_eager, pgen)
            fresh = torch.randn(g.shape, dtype=torch.float64, generator=pgen) if r else None
            # the fp64 gradients along the fresh direction, once for every formulation
            fresh64 = grads_along(refs[0], ins64, fresh) if r and wants_grad else None
            for run in (lambda *a: fn("reference", *a), *alternatives):
                eager_outs = as_tuple(run(*ins_eager))
                for k, (o, w) in enumerate(zip(eager_outs, refs)):
                    if o.is_floating_point():
                        out_floor[k] = max(out_floor[k], factor * rel_err(o, w))
                if not wants_grad:
                    continue
                pairs = [(grads_along(eager_outs[0], ins_eager), grads64)]
                if r:
                    pairs.append((grads_along(eager_outs[0], ins_eager, fresh), fresh64))
                for got, want in pairs:
                    for k, (ge, gw) in enumerate(zip(got, want)):
                        grad_floor[k] = max(grad_floor[k], factor * rel_err(ge, gw))

    for k, (o, r) in enumerate(zip(outs, refs)):
        if not o.is_floating_point() or lowp_reference:
            continue  # the reference against itself in low precision: finiteness only
        bound = max(tol, out_floor[k])
        if dtype != torch.float64 and out_atol and abs_err(o, r) <= out_atol:
            bound = max(bound, rel_err(o, r))  # within the representation floor
        check(f"output {k}", o, r, bound)
    if lowp_reference:
        return
    for k, (gr, g64) in enumerate(zip(grads, grads64)):
        bound = max(tol, grad_floor[k])
        if dtype != torch.float64 and grad_atol and abs_err(gr, g64) <= grad_atol:
            bound = max(bound, rel_err(gr, g64))  # within the stated rounding floor
        if gr.dim() == 0 and dtype != torch.float64:
            # A temperature/scale/bias gradient is one sum of N·M terms: documented looser bound
            # for these scalars only, 10× the SPEC tolerance.
            bound = max(bound, 10 * tol)
        check(f"grad {k}", gr, g64, bound)


def _labels(n, classes, gen):
    return torch.randint(0, classes, (n,), generator=gen)


INFO_NCE_VARIANTS = [
    dict(),
    dict(symmetric=True),
    dict(decoupled=True),
    dict(labels=True),
    dict(labels=True, exclude_diagonal=True),
    dict(labels=True, exclude_diagonal=True, decoupled=True),
    dict(labels=True, symmetric=True),
    dict(extra_negatives=7),
    dict(extra_negatives=3, symmetric=True, decoupled=True),
    dict(normalize=False, temperature=1.0),
]


@pytest.mark.parametrize("variant", range(len(INFO_NCE_VARIANTS)))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.requires_op("info_nce")
def test_info_nce(backend, device, variant, reduction):
    opts = dict(INFO_NCE_VARIANTS[variant])
    gen = seeded()
    for (n, m, d), dtype in cases(backend):
        if opts.get("exclude_diagonal") or (opts.get("labels") and not opts.get("key_labels")):
            m = n
        if m < n:
            m = n
        if opts.get("symmetric") and reduction == "none":
            m = n
        q = randn(n, d, gen=gen, requires_grad=True)
        k = randn(m, d, gen=gen, requires_grad=True)
        temp = torch.tensor(opts.get("temperature", 0.1), dtype=torch.float64, requires_grad=True)
        extra = (
            randn(opts["extra_negatives"], d, gen=gen, requires_grad=True)
            if opts.get("extra_negatives")
            else None
        )
        norm, (q, k) = kernel_inputs(dtype, d, q, k)
        if extra is not None:
            _, (extra,) = kernel_inputs(dtype, d, extra)
        labels = _labels(n, 3, gen) if opts.get("labels") else None
        kw = {
            k2: v
            for k2, v in opts.items()
            if k2 not in ("labels", "extra_negatives", "temperature")
        }
        if kw.get("normalize", True):
            kw["normalize"] = norm

        # A near-zero loss (one-hot softmax) is LSE − positive logit: fp32 keeps it to a few ulps
        # of the LSE, |LSE| ≤ max |logit| + log(M), per anchor (twice for symmetric); the norm of
        # the per-anchor errors grows as √N, a mean's does not.
        feats = [t.detach().double() for t in (q, k, extra) if t is not None]
        if kw.get("normalize", True):
            feats = [torch.nn.functional.normalize(t, dim=1) for t in feats]
        logit_max = float((feats[0] @ torch.cat(feats[1:]).T).abs().max()) / float(temp)
        out_atol = 8 * torch.finfo(torch.float32).eps * (logit_max + math.log(m + 8))
        if reduction == "none":
            out_atol *= n**0.5

        def fn(b, q, k, t, e, lab, kw=kw):
            return FL.info_nce(
                q,
                k,
                temperature=t,
                labels=lab,
                extra_negatives=e,
                reduction=reduction,
                backend=b,
                **kw,
            )

        alternatives = []
        if opts == dict(symmetric=True):
            def norm_bound(q, k, t, e, lab, kw=kw):
                return _norm_bound_symmetric_info_nce(q, k, t, kw["normalize"], reduction)

            alternatives.append(norm_bound)
        check_against_reference(
            backend,
            device,
            dtype,
            fn,
            [q, k, temp, extra, labels],
            f"info_nce {opts} {reduction} N={n} M={m} D={d} {dtype}",
            out_atol=out_atol,
            alternatives=alternatives,
        )


class _NormBoundColumnLSE(torch.autograd.Function):
    """Column LSE of z as the fused one-sweep CLIP forward computes it: sums of exp(z − c_j)
    against an upper bound c_j ≥ max_i z_ij known before the sweep (Cauchy–Schwarz: |scale| ·
    max_i ‖x_i‖ · ‖y_j‖), LSE_j = c_j + log Σ_i exp(z_ij − c_j), and the backward's softmax
    recomputed as exp(z − LSE).  Exact in real arithmetic; in fp32 the LSE's rounding grows with
    c_j − max_i z_ij (an ulp of |c_j| + |log Σ|), which a one-hot column's gradient p − 1 keeps."""

    @staticmethod
    def forward(ctx, z, c):
        lse = c + torch.log(torch.exp(z - c).sum(0))
        ctx.save_for_backward(z, lse)
        return lse

    @staticmethod
    def backward(ctx, g):
        z, lse = ctx.saved_tensors
        return g * torch.exp(z - lse), None


def _norm_bound_symmetric_info_nce(q, k, t, normalize, reduction):
    """info_nce(symmetric=True) with the column LSE of the fused one-sweep path (fp32 math)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, t = q.to(dtype), k.to(dtype), t.to(dtype)
    if normalize:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    scale = 1.0 / t
    z = scale * (q @ k.T)
    bound = (scale.abs() * torch.linalg.vector_norm(q, dim=1).max()
             * torch.linalg.vector_norm(k, dim=1) * (1.0 + 2.0 ** -9)).detach()
    n = z.shape[0]
    pos = torch.diagonal(z)  # keys beyond the N queries have no positive: no column loss
    rows = torch.logsumexp(z, 1) - pos
    cols = _NormBoundColumnLSE.apply(z, bound)[:n] - pos
    return 0.5 * (rows + cols) if reduction == "none" else 0.5 * (rows.mean() + cols.mean())


@pytest.mark.parametrize("temperature", [1e-3, 0.05, 1e3])
@pytest.mark.requires_op("info_nce")
def test_info_nce_extreme_temperature(backend, device, temperature):
    gen = seeded()
    for dtype in dtypes_for(backend):
        q = randn(17, 33, gen=gen, requires_grad=True)
        k = randn(17, 33, gen=gen, requires_grad=True)

        def fn(b, q, k):
            return FL.clip_loss(q, k, 1.0 / temperature, backend=b)

        # Logits reach 1/t; their fp32 spacing (6e-8/t) bounds what any fp32 kernel can
        # reach, so the fp32 tolerance grows with it (2e-5 at t=1e-3, the SPEC 1e-5 above it).
        tol = max(tol_for(dtype), 2e-8 / temperature) if dtype == torch.float32 else None
        check_against_reference(
            backend,
            device,
            dtype,
            fn,
            [q, k],
            f"clip t={temperature} {dtype} seed={gen.initial_seed()}",
            tol=tol,
        )


@pytest.mark.requires_op("info_nce")
def test_info_nce_unnormalized_large_logits(backend, device):
    """|z| up to 1e4 without overflow: no fixed max of 1/τ may be assumed."""
    gen = seeded()
    q = randn(9, 16, gen=gen, scale=25.0, requires_grad=True)
    k = randn(11, 16, gen=gen, scale=25.0, requires_grad=True)

    def fn(b, q, k):
        return FL.info_nce(q, k, temperature=1.0, normalize=False, symmetric=False, backend=b)

    check_against_reference(
        backend, device, torch.float32, fn, [q, k], f"large logits seed={gen.initial_seed()}"
    )


@pytest.mark.requires_op("info_nce")
def test_info_nce_no_positives(backend, device):
    """Anchors whose label has no match are excluded; all-excluded gives 0, not NaN."""
    gen = seeded()
    q = randn(6, 8, gen=gen, requires_grad=True, device=device)
    labels = torch.arange(6, device=device)  # every class appears once: no positive anywhere
    out = FL.sup_con(q, labels, backend=backend)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, q)
    assert torch.all(g == 0)
    per = FL.sup_con(q, labels, backend=backend, reduction="none")
    assert torch.all(per == 0)


def test_nt_xent_sup_con_siglip(backend, device):
    gen = seeded()
    for (n, _, d), dtype in cases(backend):
        z1 = randn(n, d, gen=gen, requires_grad=True)
        z2 = randn(n, d, gen=gen, requires_grad=True)
        lab = torch.randint(0, 4, (n,), generator=gen)
        norm, (z1, z2) = kernel_inputs(dtype, d, z1, z2)
        if supports(backend, "info_nce"):
            check_against_reference(
                backend,
                device,
                dtype,
                lambda b, a, c: FL.nt_xent(a, c, temperature=0.3, normalize=norm, backend=b),
                [z1, z2],
                f"nt_xent N={n} D={d} {dtype}",
            )
            check_against_reference(
                backend,
                device,
                dtype,
                lambda b, a, lb: FL.sup_con(a, lb, temperature=0.2, normalize=norm, backend=b),
                [z1, lab],
                f"sup_con N={n} D={d} {dtype}",
            )
        if supports(backend, "siglip"):
            scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
            bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
            check_against_reference(
                backend,
                device,
                dtype,
                lambda b, a, c, s, t: FL.siglip_loss(a, c, s, t, normalize=norm, backend=b),
                [z1, z2, scale, bias],
                f"siglip N={n} D={d} {dtype}",
            )


@pytest.mark.parametrize("epsilon", [0.1, None])
@pytest.mark.requires_op("multi_similarity")
def test_multi_similarity(backend, device, epsilon):
    gen = seeded()
    for (n, m, d), dtype in cases(backend):
        e = randn(n, d, gen=gen, requires_grad=True)
        lab = torch.randint(0, 3, (n,), generator=gen)
        norm, (e,) = kernel_inputs(dtype, d, e)
        check_against_reference(
            backend,
            device,
            dtype,
            lambda b, x, lb: FL.multi_similarity(
                x, lb, epsilon=epsilon, normalize=norm, backend=b
            ),
            [e, lab],
            f"ms self N={n} D={d} {dtype}",
        )
        r = randn(m, d, gen=gen, requires_grad=True)
        rlab = torch.randint(0, 3, (m,), generator=gen)
        _, (r,) = kernel_inputs(dtype, d, r)
        check_against_reference(
            backend,
            device,
            dtype,
            lambda b, x, lb, y, rl: FL.multi_similarity(
                x,
                lb,
                ref_embeddings=y,
                ref_labels=rl,
                epsilon=epsilon,
                beta=50.0,
                normalize=norm,
                reduction="none",
                backend=b,
            ),
            [e, lab, r, rlab],
            f"ms ref N={n} M={m} D={d} {dtype}",
        )


@pytest.mark.parametrize("self_refs", [True, False])
@pytest.mark.requires_op("multi_similarity")
def test_multi_similarity_pairs_planted_at_the_mining_threshold(backend, device, self_refs):
    """Mining is a hard comparison on s_ij.  Coordinates k/8 (D=4) make every s_ij a multiple
    of 1/64, exact in any dtype and accumulation order, and ε = 1/16 puts many pairs exactly on
    a threshold (s_ip − ε == max_neg_i or s_in + ε == min_pos_i: not kept).  The forward, the
    mining pass and the backward must all drop exactly those pairs, as the float64 reference
    does: a pass that kept them (≤ for <), or recomputed s differently, changes value or
    gradient."""
    gen = torch.Generator().manual_seed(1234)  # fixed: the planted ties are asserted below
    n, m, d, eps = 120, 101, 4, 1.0 / 16
    x = (torch.randint(-4, 5, (n, d), generator=gen) / 8.0).double()
    lab = torch.randint(0, 3, (n,), generator=gen)
    if self_refs:
        y, rlab = x, lab
    else:
        y = (torch.randint(-4, 5, (m, d), generator=gen) / 8.0).double()
        rlab = torch.randint(0, 3, (m,), generator=gen)
    s = x @ y.T
    pos = lab[:, None] == rlab[None, :]
    neg = ~pos
    if self_refs:
        eye = torch.eye(n, dtype=torch.bool)
        pos, neg = pos & ~eye, neg & ~eye
    max_neg = s.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
    min_pos = s.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
    planted_pos = int((pos & (s - eps == max_neg)).sum())
    planted_neg = int((neg & (s + eps == min_pos)).sum())
    assert planted_pos >= 5 and planted_neg >= 5, (planted_pos, planted_neg)
    for dtype in dtypes_for(backend):
        xe = x.clone().requires_grad_(True)
        ins = [xe, lab] if self_refs else [xe, lab, y.clone().requires_grad_(True), rlab]

        def fn(b, x_, lb, y_=None, rl=None):
            return FL.multi_similarity(x_, lb, ref_embeddings=y_, ref_labels=rl, epsilon=eps,
                                       alpha=2.0, beta=50.0, base=0.5, normalize=False,
                                       reduction="none", backend=b)

        check_against_reference(backend, device, dtype, fn, ins,
                                f"ms planted self={self_refs} {dtype}")


@pytest.mark.parametrize("exclude_diagonal", [False, True])
@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.requires_op("pairwise_logsumexp")
def test_pairwise_logsumexp(backend, device, exclude_diagonal, dim):
    gen = seeded()
    for (n, m, d), dtype in cases(backend):
        if exclude_diagonal:
            m = n
            if n == 1:
                continue  # the only entry is excluded: -inf, checked in test_oracles
        # Rows of norm ≈ 1 keep logits O(scale); huge logits are test_..._large_logits' job.
        x = randn(n, d, gen=gen, requires_grad=True, scale=d**-0.5)
        y = randn(m, d, gen=gen, requires_grad=True, scale=d**-0.5)
        bias = randn(m if dim == 1 else n, gen=gen, requires_grad=True)
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        check_against_reference(
            backend,
            device,
            dtype,
            lambda b, x, y, s, bi: FL.pairwise_logsumexp(
                x, y, scale=s, bias=bi, exclude_diagonal=exclude_diagonal, dim=dim, backend=b
            ),
            [x, y, scale, bias],
            f"plse N={n} M={m} D={d} {dtype} seed={gen.initial_seed()}",
        )


@pytest.mark.requires_op("pairwise_softmax_matmul")
def test_pairwise_softmax_matmul(backend, device):
    gen = seeded()
    for (n, m, d), dtype in cases(backend):
        x = randn(n, d, gen=gen, requires_grad=True, scale=d**-0.5)
        y = randn(m, d, gen=gen, requires_grad=True, scale=d**-0.5)
        v = randn(m, 5, gen=gen, requires_grad=True)
        bias = randn(m, gen=gen, requires_grad=True)
        check_against_reference(
            backend,
            device,
            dtype,
            lambda b, x, y, v, bi: FL.pairwise_softmax_matmul(
                x, y, v, scale=2.0, bias=bi, backend=b
            ),
            [x, y, v, bias],
            f"psm N={n} M={m} D={d} {dtype}",
            alternatives=[lambda x, y, v, bi: _FlashSoftmaxMatmul.apply(x, y, v, bi, 2.0)],
        )


class _FlashSoftmaxMatmul(torch.autograd.Function):
    """softmax(scale·x yᵀ + bias) @ v with flash-attention's backward: P recomputed from the row
    LSE, delta = rowsum(dO ∘ O), dS = P ∘ (dO vᵀ − delta).  As valid in fp32 as autograd's
    dS = P ∘ (dP − rowsum(P ∘ dP)), but near a one-hot softmax dP_j − delta cancels without
    sharing dP_j's rounding (measured: 10× autograd's error at N=M=2 for a few seeds in 150).
    Every fused backend computes this form: it needs no second pass over the tiles."""

    @staticmethod
    def forward(ctx, x, y, v, bias, scale):
        dtype = x.dtype
        # fp32 accumulation for fp16/bf16 inputs, as the kernels do
        x, y, v, bias = (t.to(torch.promote_types(dtype, torch.float32)) for t in (x, y, v, bias))
        z = scale * (x @ y.T) + bias
        lse = torch.logsumexp(z, 1, keepdim=True)
        out = torch.exp(z - lse) @ v
        ctx.save_for_backward(x, y, v, bias, lse, out)
        ctx.scale, ctx.dtype = scale, dtype
        return out.to(dtype)

    @staticmethod
    def backward(ctx, g_out):
        x, y, v, bias, lse, out = ctx.saved_tensors
        g_out = g_out.to(out.dtype)
        p = torch.exp(ctx.scale * (x @ y.T) + bias - lse)
        ds = p * (g_out @ v.T - (g_out * out).sum(1, keepdim=True))
        grads = ctx.scale * ds @ y, ctx.scale * ds.T @ x, p.T @ g_out, ds.sum(0)
        return (*(gr.to(ctx.dtype) for gr in grads), None)


@pytest.mark.parametrize("exclude_diagonal", [False, True])
@pytest.mark.requires_op("similarity_topk")
def test_similarity_topk(backend, device, exclude_diagonal):
    gen = seeded()
    for n, m, d in shapes_for(backend):
        if exclude_diagonal:
            m = n
        kmax = m - (1 if exclude_diagonal else 0)
        if kmax < 1:
            continue
        x = randn(n, d, gen=gen, device=device)
        y = randn(m, d, gen=gen, device=device)
        for k in sorted({1, min(3, kmax), kmax}):
            vals, idx = FL.similarity_topk(
                x, y, k, exclude_diagonal=exclude_diagonal, backend=backend
            )
            s = (x.double() @ y.double().T).cpu()
            if exclude_diagonal:
                s.fill_diagonal_(float("-inf"))
            ref = torch.sort(s, dim=1, descending=True, stable=True)
            assert_rel(vals, ref.values[:, :k], 1e-5, f"topk values N={n} M={m} k={k}")
            # Indices must select the values (ties among near-equal floats may differ).
            picked = s.gather(1, idx.cpu())
            assert_rel(picked, ref.values[:, :k], 1e-5, f"topk indices N={n} M={m} k={k}")
