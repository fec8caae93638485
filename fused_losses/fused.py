"""The fused layer: every op, once, as autograd Functions over the kernel contract.

A fused backend is ``register_fused_backend(name, ..., kernels)`` where ``kernels`` implements
``kernels.py``'s contract.  The losses' algebra (validity of anchors, means over positives,
symmetric halves, chain rule to temperature/bias/extra negatives) lives here and nowhere else;
the kernels do the O(N·M) streaming.  Forward saves only O(N + M) vectors (LSEs, counts); the
backward recomputes similarity tiles (flash-attention style).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._dispatch import Backend, register_backend
from .kernels import PairMask, acc_dtype

NEG_INF = float("-inf")


def _scale_tensor(scale, acc, device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale.reshape(()).to(device=device, dtype=acc)
    return torch.tensor(float(scale), dtype=acc, device=device)


def _finite_or_zero(t: torch.Tensor | None) -> torch.Tensor | None:
    """An empty line's LSE is -inf; the kernels want finite LSEs (that line's g is 0)."""
    if t is None:
        return None
    return t.masked_fill(t == NEG_INF, 0.0)


def _anchor_loss(lse, pos_sum, pos_cnt):
    """LSE over candidates − mean over positives; invalid (loss 0) without positive/candidate.
    A NaN LSE (NaN features) stays valid and propagates."""
    valid = (pos_cnt > 0) & (lse != NEG_INF)
    loss = torch.where(valid, lse - pos_sum / pos_cnt.clamp_min(1), torch.zeros_like(lse))
    return loss, valid


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, mask, want_cols, x, y, scale):
        row_lse, rps, rpc, col_lse, cps, cpc = kernels.contrastive_fwd(
            x, y, scale, None, mask, want_cols)
        row_loss, row_valid = _anchor_loss(row_lse, rps, rpc)
        if want_cols:
            col_loss, col_valid = _anchor_loss(col_lse, cps, cpc)
        else:
            col_loss, col_lse, cpc = (row_loss.new_empty(0) for _ in range(3))
            col_valid = row_valid.new_empty(0)
        ctx.kernels, ctx.mask, ctx.want_cols = kernels, mask, want_cols
        ctx.save_for_backward(x, y, scale, _finite_or_zero(row_lse), rpc, row_valid,
                              _finite_or_zero(col_lse), cpc, col_valid)
        ctx.mark_non_differentiable(row_valid, col_valid)
        return row_loss, row_valid, col_loss, col_valid

    @staticmethod
    def backward(ctx, g_row_loss, _g_rv, g_col_loss, _g_cv):
        x, y, scale, row_lse, rpc, row_valid, col_lse, cpc, col_valid = ctx.saved_tensors
        g_row = torch.where(row_valid, g_row_loss, torch.zeros_like(g_row_loss))
        g_rowpos = g_row / rpc.clamp_min(1)
        if ctx.want_cols:
            g_col = torch.where(col_valid, g_col_loss, torch.zeros_like(g_col_loss))
            g_colpos = g_col / cpc.clamp_min(1)
        else:
            col_lse = g_col = g_colpos = None
        dx, dy, dscale, _ = ctx.kernels.contrastive_bwd(
            x, y, scale, None, ctx.mask, row_lse, g_row, g_rowpos, col_lse, g_col, g_colpos)
        return (None, None, None, dx.to(x.dtype), dy.to(y.dtype),
                dscale if ctx.needs_input_grad[5] else None)


def _info_nce(kernels):
    def info_nce(query, key, scale, labels, key_labels, symmetric, decoupled, extra_negatives,
                 exclude_diagonal, offset):
        acc = acc_dtype(query.dtype)
        n_keys = key.shape[0]
        y = key if extra_negatives is None else torch.cat([key, extra_negatives], dim=0)
        mask = PairMask(n_keys=n_keys, labels=labels, key_labels=key_labels, offset=offset,
                        exclude_diagonal=exclude_diagonal, decoupled=decoupled)
        row_loss, row_valid, col_loss, col_valid = _InfoNCE.apply(
            kernels, mask, symmetric, query.contiguous(), y.contiguous(),
            _scale_tensor(scale, acc, query.device))
        if not symmetric:
            return row_loss, row_valid, None, None
        return row_loss, row_valid, col_loss, col_valid

    return info_nce


class _RowLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, mask, x, y, scale, bias):
        lse, *_ = kernels.contrastive_fwd(x, y, scale, bias, mask, False)
        ctx.kernels, ctx.mask, ctx.has_bias = kernels, mask, bias is not None
        ctx.save_for_backward(x, y, scale, bias, lse)
        return lse

    @staticmethod
    def backward(ctx, g):
        x, y, scale, bias, lse = ctx.saved_tensors
        empty = lse == NEG_INF
        g = g.masked_fill(empty, 0.0)
        dx, dy, dscale, dbias = ctx.kernels.contrastive_bwd(
            x, y, scale, bias, ctx.mask, lse.masked_fill(empty, 0.0), g, torch.zeros_like(g),
            None, None, None)
        return (None, None, dx.to(x.dtype), dy.to(y.dtype),
                dscale if ctx.needs_input_grad[4] else None,
                dbias if ctx.has_bias and ctx.needs_input_grad[5] else None)


def _pairwise_logsumexp(kernels):
    def pairwise_logsumexp(x, y, scale, bias, exclude_diagonal):
        acc = acc_dtype(x.dtype)
        mask = PairMask(n_keys=y.shape[0], exclude_diagonal=exclude_diagonal, no_positives=True)
        b = None if bias is None else bias.to(acc)
        return _RowLSE.apply(kernels, mask, x.contiguous(), y.contiguous(),
                             _scale_tensor(scale, acc, x.device), b)

    return pairwise_logsumexp


class _SigLip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, offset, x, y, scale, bias):
        ctx.kernels, ctx.offset = kernels, offset
        ctx.save_for_backward(x, y, scale, bias)
        return kernels.siglip_fwd(x, y, scale, bias, offset)

    @staticmethod
    def backward(ctx, g_row):
        x, y, scale, bias = ctx.saved_tensors
        dx, dy, dscale, dbias = ctx.kernels.siglip_bwd(x, y, scale, bias, ctx.offset, g_row)
        return (None, None, dx.to(x.dtype), dy.to(y.dtype),
                dscale if ctx.needs_input_grad[4] else None,
                dbias if ctx.needs_input_grad[5] else None)


def _siglip(kernels):
    def siglip(x, y, logit_scale, logit_bias, offset):
        acc = acc_dtype(x.dtype)
        return _SigLip.apply(kernels, offset, x.contiguous(), y.contiguous(),
                             _scale_tensor(logit_scale, acc, x.device),
                             _scale_tensor(logit_bias, acc, x.device))

    return siglip


class _MultiSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, labels, ref_labels, offset, exclude_self, alpha, beta, base,
                epsilon, x, y):
        # y is None: the references are the anchors themselves (one tensor input, which
        # torch.compile requires of an autograd Function; its gradient is dx + dy).
        ctx.same = y is None
        y = x if y is None else y
        ref_labels = labels if ref_labels is None else ref_labels  # the same: passed once
        if hasattr(kernels, "ms_mine_fwd"):  # optional: mining and forward in one pass
            min_pos, max_neg, pos_lse, neg_lse = kernels.ms_mine_fwd(
                x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon)
            if epsilon is None:
                min_pos = max_neg = None
        else:
            min_pos = max_neg = None
            if epsilon is not None:
                min_pos, max_neg = kernels.ms_mine(x, y, labels, ref_labels, offset,
                                                   exclude_self)
            pos_lse, neg_lse = kernels.ms_fwd(x, y, labels, ref_labels, offset, exclude_self,
                                              alpha, beta, base, epsilon, min_pos, max_neg)
        args = (labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon, min_pos,
                max_neg)
        ctx.kernels, ctx.args = kernels, args
        ctx.save_for_backward(x, None if ctx.same else y, pos_lse, neg_lse)
        return pos_lse / alpha + neg_lse / beta

    @staticmethod
    def backward(ctx, g):
        x, y, pos_lse, neg_lse = ctx.saved_tensors
        y = x if ctx.same else y
        dx, dy = ctx.kernels.ms_bwd(x, y, *ctx.args, pos_lse, neg_lse, g.contiguous())
        if ctx.same:
            return (None,) * 9 + ((dx + dy).to(x.dtype), None)
        return (None,) * 9 + (dx.to(x.dtype), dy.to(y.dtype))


def _multi_similarity(kernels):
    def multi_similarity(emb, labels, ref_emb, ref_labels, alpha, beta, base, epsilon,
                         exclude_self, offset):
        x = emb.contiguous()
        y = None if ref_emb is emb else ref_emb.contiguous()
        ref = None if ref_labels is labels else ref_labels
        return _MultiSimilarity.apply(kernels, labels, ref, offset, exclude_self, alpha, beta,
                                      base, epsilon, x, y)

    return multi_similarity


class _SoftmaxMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, y, v, scale, bias):
        out, lse = kernels.softmax_matmul_fwd(x, y, v, scale, bias)
        ctx.kernels, ctx.has_bias = kernels, bias is not None
        ctx.save_for_backward(x, y, v, scale, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, y, v, scale, bias, out, lse = ctx.saved_tensors
        dx, dy, dv, dscale, dbias = ctx.kernels.softmax_matmul_bwd(
            x, y, v, scale, bias, out, lse, g_out.contiguous())
        return (None, dx.to(x.dtype), dy.to(y.dtype), dv.to(v.dtype),
                dscale if ctx.needs_input_grad[4] else None,
                dbias if ctx.has_bias and ctx.needs_input_grad[5] else None)


def _pairwise_softmax_matmul(kernels):
    def pairwise_softmax_matmul(x, y, v, scale, bias):
        acc = acc_dtype(x.dtype)
        b = None if bias is None else bias.to(acc)
        return _SoftmaxMatmul.apply(kernels, x.contiguous(), y.contiguous(), v.contiguous(),
                                    _scale_tensor(scale, acc, x.device), b)

    return pairwise_softmax_matmul


class _GatheredDots(torch.autograd.Function):
    """values_ik = <x_i, y_{idx_ik}> given by the kernel; backward scatters through idx."""

    @staticmethod
    def forward(ctx, values, idx, x, y):
        ctx.save_for_backward(idx, x, y)
        return values

    @staticmethod
    def backward(ctx, g):
        idx, x, y = ctx.saved_tensors
        acc = g.dtype
        dx = torch.zeros(x.shape, dtype=acc, device=x.device)
        dy = torch.zeros(y.shape, dtype=acc, device=y.device)
        chunk = max(1, (1 << 22) // max(1, idx.shape[1] * x.shape[1]))  # bound N·k·D temporaries
        for a in range(0, x.shape[0], chunk):
            b = min(a + chunk, x.shape[0])
            gi, ii = g[a:b], idx[a:b]
            dx[a:b] = torch.einsum("nk,nkd->nd", gi, y[ii].to(acc))
            dy.index_add_(0, ii.reshape(-1),
                          (gi[:, :, None] * x[a:b, None, :].to(acc)).reshape(-1, x.shape[1]))
        return None, None, dx.to(x.dtype), dy.to(y.dtype)


def _similarity_topk(kernels):
    def similarity_topk(x, y, k, exclude_diagonal):
        values, idx = kernels.topk(x.contiguous(), y.contiguous(), k, exclude_diagonal)
        if x.requires_grad or y.requires_grad:
            values = _GatheredDots.apply(values, idx, x, y)
        return values, idx

    return similarity_topk


# ----------------------------------------------------------------------------- Sinkhorn kernels
# For p=2, -C_ij/ε = (s_ij − ½‖y_j‖²)/ε − ½‖x_i‖²/ε, and for cosine -C_ij/ε = (s_ij − 1)/ε:
# the soft c-transform is a dot-product LSE with a column bias (contrastive_fwd), and the
# softmax-weighted sums of the gradient and of π·v are softmax_matmul_fwd.  p=1 (‖x − y‖) is not
# a dot product: it runs as row blocks of an explicit cost tile (O(block·M), never N×M).

_OT_BLOCK = 256


def _ot_bias(y, h, eps, cost):
    if cost == "p2":
        return h - 0.5 * (y * y).sum(-1) / eps
    return h - 1.0 / eps  # cosine


def _p1_cost_rows(x, y):
    """Row blocks of (start, x block, sq, dist) for the p=1 cost, GeomLoss's
    dist = sqrt(clamp_min(sq, 1e-8)).  sq is summed from the coordinate differences (cdist
    without the matmul expansion, O(block·M) memory): ‖x‖² − 2x·y + ‖y‖² would cancel to noise for
    nearby points (a self-pair of the debiased terms came out 3e-4 instead of 1e-4 in fp32,
    measured 2e-4 relative error in the gradient), and p=1 has no dot-product form to keep."""
    for a in range(0, x.shape[0], _OT_BLOCK):
        xb = x[a:a + _OT_BLOCK]
        sq = torch.cdist(xb, y, compute_mode="donot_use_mm_for_euclid_dist").square()
        yield a, xb, sq, torch.sqrt(torch.clamp_min(sq, 1e-8))


def _p1_rows(x, y, h, eps):
    """Row blocks of (start, x block, softmax weights, dist, sq) for the p=1 cost."""
    for a, xb, sq, dist in _p1_cost_rows(x, y):
        yield a, xb, torch.softmax(h[None, :] - dist / eps, dim=1), dist, sq


def _ot_softmin(kernels):
    def ot_softmin(x, y, h, eps, cost):
        out = []
        for xb, yb, hb in zip(x, y, h):
            if cost == "p1":
                f = torch.empty(xb.shape[0], dtype=xb.dtype, device=xb.device)
                for a, _xa, _sq, dist in _p1_cost_rows(xb, yb):
                    f[a:a + _OT_BLOCK] = -eps * torch.logsumexp(hb[None, :] - dist / eps, dim=1)
                out.append(f)
                continue
            scale = torch.tensor(1.0 / eps, dtype=xb.dtype, device=xb.device)
            mask = PairMask(n_keys=yb.shape[0], no_positives=True)
            lse = kernels.contrastive_fwd(xb.contiguous(), yb.contiguous(), scale,
                                          _ot_bias(yb, hb, eps, cost).contiguous(), mask,
                                          False)[0]
            f = -eps * lse
            if cost == "p2":
                f = f + 0.5 * (xb * xb).sum(-1)
            out.append(f)
        return torch.stack(out)

    return ot_softmin


def _ot_weighted(kernels, x, y, h, eps, cost, v):
    scale = torch.tensor(1.0 / eps, dtype=x.dtype, device=x.device)
    return kernels.softmax_matmul_fwd(x.contiguous(), y.contiguous(), v.contiguous(), scale,
                                      _ot_bias(y, h, eps, cost).contiguous())[0]


def _ot_grad(kernels):
    def ot_grad(x, y, h, eps, cost):
        out = []
        for xb, yb, hb in zip(x, y, h):
            if cost == "p1":
                g = torch.empty_like(xb)
                for a, xa, w, _dist, sq in _p1_rows(xb, yb, hb, eps):
                    inv = torch.where(sq > 1e-8, torch.rsqrt(torch.clamp_min(sq, 1e-8)),
                                      torch.zeros_like(sq))
                    wi = w * inv
                    g[a:a + xa.shape[0]] = wi.sum(-1, keepdim=True) * xa - wi @ yb
                out.append(g)
                continue
            wy = _ot_weighted(kernels, xb, yb, hb, eps, cost, yb)
            out.append(xb - wy if cost == "p2" else -wy)
        return torch.stack(out)

    return ot_grad


def _ot_plan_matmul(kernels):
    def ot_plan_matmul(x, y, h, eps, cost, v):
        out = []
        for xb, yb, hb, vb in zip(x, y, h, v):
            if cost == "p1":
                o = torch.empty(xb.shape[0], vb.shape[1], dtype=xb.dtype, device=xb.device)
                for a, xa, w, _dist, _sq in _p1_rows(xb, yb, hb, eps):
                    o[a:a + xa.shape[0]] = w @ vb
                out.append(o)
                continue
            out.append(_ot_weighted(kernels, xb, yb, hb, eps, cost, vb))
        return torch.stack(out)

    return ot_plan_matmul


OP_BUILDERS: dict[str, Callable] = {
    "info_nce": _info_nce,
    "pairwise_logsumexp": _pairwise_logsumexp,
    "siglip": _siglip,
    "multi_similarity": _multi_similarity,
    "pairwise_softmax_matmul": _pairwise_softmax_matmul,
    "similarity_topk": _similarity_topk,
    "ot_softmin": _ot_softmin,
    "ot_grad": _ot_grad,
    "ot_plan_matmul": _ot_plan_matmul,
}


def make_fused_ops(kernels, ops: list[str] | None = None) -> dict[str, Callable]:
    """The op table of a fused backend whose kernels implement the contract (all ops, or the
    named subset while a backend is partial)."""
    names = list(OP_BUILDERS) if ops is None else ops
    return {name: OP_BUILDERS[name](kernels) for name in names}


def register_fused_backend(name: str, priority: int, devices, dtypes, kernels,
                           availability=lambda: None, ops: list[str] | None = None) -> Backend:
    backend = Backend(name=name, priority=priority, devices=frozenset(devices),
                      dtypes=frozenset(dtypes), availability=availability)
    backend.ops.update(make_fused_ops(kernels, ops))
    return register_backend(backend)
