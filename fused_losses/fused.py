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

from ._algebra import candidate_counts, hard_negative_anchor_loss
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


# ------------------------------------------------------------------ second order (SPEC §6)
# A backward runs with grad mode on exactly when autograd records it (``create_graph=True``).
# The kernels are opaque to autograd: a gradient they return is a constant to the recorded
# graph, so a second backward through it would silently miss the op's own second derivative
# (torch only warns, from its fallback for ops without an autograd kernel: "an autograd kernel
# was not registered").  Hence a recorded backward never hands autograd a kernel's result as is:
#  - exact ops (the InfoNCE family, SigLIP, the primitives) return the kernels' first-order
#    gradient through :class:`_Gradient`, an autograd Function whose own backward (the
#    second-order pass) recomputes the gradient in plain torch, one row block of at most
#    _DIFF_BLOCK similarities at a time, and backpropagates through that block at once: no
#    N×M tensor, nothing of a block kept after it (O(block·M) at a time, O((N+M)·D) kept);
#  - the others compute it without a graph and tie it to a node that raises a RuntimeError
#    naming the op at the second backward (:func:`first_order_only`).
# The kernels themselves never see a tensor that autograd could follow.

_DIFF_BLOCK = 1 << 19  # similarities per row block of the second-order recomputation


def records_graph(*tensors) -> bool:
    """Inside a backward: is it being recorded (create_graph=True) and does any of ``tensors``
    (saved inputs, upstream gradients) carry a graph that a second backward could follow?"""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class _OrderError(torch.autograd.Function):
    """Identity on the first ``n`` tensors, tied to the rest; its backward raises."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(t.clone() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order_only(op: str, why: str, grads, tied, what: str = "second-order gradients"):
    """``grads`` (computed without a graph) tied to the tensors ``tied`` they depend on (saved
    inputs and upstream gradients), so that a backward through them raises a RuntimeError
    naming ``op`` instead of treating them as constants.  Call it when :func:`records_graph`;
    None entries stay None."""
    idx = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    tied = [t for t in tied if isinstance(t, torch.Tensor) and t.requires_grad]
    if not idx or not tied:
        return tuple(grads)
    msg = (f"fused_losses.{op}: {what} (a backward through a gradient taken with "
           f"create_graph=True) are not supported: {why}")
    outs = _OrderError.apply(msg, len(idx), *(grads[i] for i in idx), *tied)
    res = list(grads)
    for i, o in zip(idx, outs):
        res[i] = o
    return tuple(res)


class _Gradient(torch.autograd.Function):
    """An op's first-order gradient as a function autograd can differentiate once more.

    ``forward(ctx, op, kernel_grad, sweeps, *tensors)`` returns ``kernel_grad(*tensors)`` (the
    kernels; a tuple of gradient tensors).  Its backward is a vector-Jacobian product by plain
    torch: each sweep ``(fn, n, m, row_out, sum_outs)`` runs ``fn(a, b, *tensors)`` -> ``(rows
    a:b of output row_out, *the parts of outputs sum_outs)`` over row blocks a:b of ``n`` rows
    (against ``m`` columns), differentiable, and backpropagates each block at once.  The sum
    over the sweeps of those parts is the first-order gradient.  A backward of this backward
    (third order) raises."""

    @staticmethod
    def forward(ctx, op, kernel_grad, sweeps, *tensors):
        ctx.op, ctx.sweeps = op, sweeps
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)  # an unused output (dscale of a float scale): None
        return kernel_grad(*tensors)

    @staticmethod
    def backward(ctx, *cots):
        tensors = ctx.saved_tensors
        want = [ctx.needs_input_grad[3 + i] for i in range(len(tensors))]
        with torch.no_grad():
            grads = _vjp_sweeps(ctx.sweeps, tensors, want, cots)
        if records_graph(*tensors, *(c for c in cots if c is not None)):
            grads = first_order_only(ctx.op, "the second-order pass is not differentiable",
                                     grads, (*tensors, *cots), "third-order gradients")
        return (None, None, None, *grads)


def _vjp_sweeps(sweeps, tensors, want, cots):
    leaves = [t.detach().requires_grad_(w) if isinstance(t, torch.Tensor) else t
              for t, w in zip(tensors, want)]
    diff = [i for i, w in enumerate(want) if w]
    grads = [None] * len(tensors)
    for fn, n, m, row_out, sum_outs in sweeps:
        step = max(1, _DIFF_BLOCK // max(1, m))
        for a in range(0, n, step):
            b = min(a + step, n)
            with torch.enable_grad():
                outs = fn(a, b, *leaves)
                rows = cots[row_out]
                pairs = [(outs[0], None if rows is None else rows[a:b])]
                pairs += [(o, cots[k]) for o, k in zip(outs[1:], sum_outs)]
                pairs = [(o, c) for o, c in pairs
                         if o is not None and c is not None and o.requires_grad]
                if not pairs:
                    continue
                got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in diff],
                                          [c for _, c in pairs], allow_unused=True)
            for i, g in zip(diff, got):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
    return [g if g is not None or not w else torch.zeros_like(t)
            for g, w, t in zip(grads, want, tensors)]


def _exact_sum(t: torch.Tensor, acc) -> torch.Tensor:
    """Σ of an N·M tile in fp64 (as the kernel contract asks for dscale), back to ``acc``."""
    return t.sum(1).double().sum().to(acc)


def _masked_softmax(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row softmax over the kept entries, 0 elsewhere and on rows with nothing kept; its
    gradient is finite everywhere (no exp of a masked-out entry, no -inf - -inf)."""
    any_kept = keep.any(1, keepdim=True)
    z = z.masked_fill(~keep, NEG_INF).masked_fill(~any_kept, 0.0)
    return torch.softmax(z, dim=1).masked_fill(~keep, 0.0)


def _lse_rows_grad(a, b, x, y, scale, bias, mask, g, gpos, ratio=None, g2=None):
    """Rows a:b of the first-order gradient of ``Σ_i g_i LSE_{j∈cand}(z_ij + bias_j) −
    gpos_i Σ_{j∈pos} z_ij [+ g2_i/r LSE_{j∈cand}(r·z_ij)]`` (the contrastive_bwd contract
    without the column term; ``g2`` is the contract's g_row2 = r·∂L/∂lse2), recomputed
    differentiably: ``(dx rows, dy, dscale, dbias)``."""
    acc = acc_dtype(x.dtype)
    xb, yf = x[a:b].to(acc), y.to(acc)
    s = xb @ yf.T
    z = scale * s
    pos, cand = mask.tile(torch.arange(a, b, device=x.device),
                          torch.arange(y.shape[0], device=x.device))
    zb = z if bias is None else z + bias[None, :]
    softmax = torch.softmax if mask.all_candidates else \
        (lambda t, dim: _masked_softmax(t, cand))
    d_row = g[a:b, None] * softmax(zb, dim=1)
    dz = d_row if mask.no_positives else d_row - torch.where(
        pos, gpos[a:b, None], torch.zeros((), dtype=acc, device=x.device))
    if ratio is not None:
        dz = dz + g2[a:b, None] * softmax(ratio * z, dim=1)
    return (scale * (dz @ yf), scale * (dz.T @ xb), _exact_sum(dz * s, acc),
            None if bias is None else d_row.sum(0))


def _first_order(op, kernel_grad, sweeps, tensors):
    """``kernel_grad(*tensors)``, through :class:`_Gradient` when this backward is recorded."""
    if records_graph(*tensors):
        return _Gradient.apply(op, kernel_grad, sweeps, *tensors)
    return kernel_grad(*tensors)


class _ContrastiveStats(torch.autograd.Function):
    """The contrastive kernels' line statistics as differentiable outputs; every loss of the
    InfoNCE family is O(N) torch algebra on them (``_anchor_loss``, ``_algebra``), under
    autograd, so the losses' algebra is written once and the kernels never see it.

    Outputs: ``row_lse`` (LSE over candidates), ``row_pos_sum`` (Σ of the positives' z),
    ``row_pos_cnt`` (not differentiable), ``row_lse2`` (the LSE at ``ratio``·z, or (0,)), and
    with ``want_cols`` the same three for the key columns (else (0,) tensors).  ``op`` names
    the public op in second-order errors."""

    @staticmethod
    def forward(ctx, op, kernels, mask, want_cols, ratio, x, y, scale):
        if ratio is None:
            row_lse, rps, rpc, col_lse, cps, cpc = kernels.contrastive_fwd(
                x, y, scale, None, mask, want_cols)
            lse2 = row_lse.new_empty(0)
        else:
            row_lse, rps, rpc, col_lse, cps, cpc, lse2 = kernels.contrastive_fwd(
                x, y, scale, None, mask, False, ratio=ratio)
        if not want_cols:
            col_lse, cps, cpc = (row_lse.new_empty(0) for _ in range(3))
        ctx.op, ctx.kernels, ctx.mask, ctx.want_cols, ctx.ratio = op, kernels, mask, want_cols, \
            ratio
        ctx.save_for_backward(x, y, scale, *(_finite_or_zero(t) for t in (row_lse, col_lse,
                                                                           lse2)),
                              *(t == NEG_INF for t in (row_lse, col_lse, lse2)))
        ctx.mark_non_differentiable(rpc, cpc)
        return row_lse, rps, rpc, lse2, col_lse, cps, cpc

    @staticmethod
    def backward(ctx, g_lse, g_ps, _g_pc, g_lse2, g_col, g_cps, _g_cc):
        x, y, scale, row_lse, col_lse, lse2, *empty = ctx.saved_tensors
        kernels, mask, ratio = ctx.kernels, ctx.mask, ctx.ratio
        # an empty line (−inf LSE, saved as 0) takes g = 0 (the contract); autograd gives the
        # positive sums' gradient, the contract subtracts g_rowpos on every positive
        g_row = g_lse.masked_fill(empty[0], 0.0).contiguous()
        tensors = [x, y, scale, g_row, (-g_ps).contiguous()]
        if ratio is not None:
            tensors.append((ratio * g_lse2.masked_fill(empty[2], 0.0)).contiguous())
        if ctx.want_cols:
            tensors += [g_col.masked_fill(empty[1], 0.0).contiguous(), (-g_cps).contiguous()]
        has2, cols = ratio is not None, ctx.want_cols

        def kernel_grad(x, y, scale, g_row, g_rowpos, *rest):
            g2 = rest[0] if has2 else None
            g_col, g_colpos = rest[-2:] if cols else (None, None)
            extra = dict(ratio=ratio, row_lse2=lse2, g_row2=g2) if has2 else {}
            return kernels.contrastive_bwd(x, y, scale, None, mask, row_lse, g_row, g_rowpos,
                                           col_lse if cols else None, g_col, g_colpos,
                                           **extra)[:3]

        # second order: the row statistics over row blocks of the queries, the column ones as
        # the row statistics of the transposed problem (keys as anchors over the queries)
        sweeps = [(lambda a, b, x, y, s, gr, grp, *rest: _lse_rows_grad(
            a, b, x, y, s, None, mask, gr, grp, ratio, rest[0] if has2 else None)[:3],
            x.shape[0], y.shape[0], 0, (1, 2))]
        if cols:
            mask_t = mask.transposed(x.shape[0])
            sweeps.append((lambda a, b, x, y, s, *rest: _lse_rows_grad(
                a, b, y, x, s, None, mask_t, rest[-2], rest[-1])[:3], mask.n_keys, x.shape[0],
                1, (0, 2)))
        dx, dy, dscale = _first_order(ctx.op, kernel_grad, sweeps, tuple(tensors))
        return (None, None, None, None, None, dx.to(x.dtype), dy.to(y.dtype),
                dscale if ctx.needs_input_grad[7] else None)


def contrastive_stats(op, kernels, mask, want_cols, x, y, scale, ratio=None):
    """``_ContrastiveStats`` on contiguous inputs with a tensor scale: ``(row_lse, row_pos_sum,
    row_pos_cnt, row_lse2, col_lse, col_pos_sum, col_pos_cnt)``, the absent ones None."""
    acc = acc_dtype(x.dtype)
    out = _ContrastiveStats.apply(op, kernels, mask, want_cols, ratio, x.contiguous(),
                                  y.contiguous(), _scale_tensor(scale, acc, x.device))
    out = list(out)
    if ratio is None:
        out[3] = None
    if not want_cols:
        out[4:] = [None] * 3
    return tuple(out)


def _info_nce(kernels):
    def info_nce(query, key, scale, labels, key_labels, symmetric, decoupled, extra_negatives,
                 exclude_diagonal, offset, anchor_logits=None):
        n_keys = key.shape[0]
        y = key if extra_negatives is None else torch.cat([key, extra_negatives], dim=0)
        mask = PairMask(n_keys=n_keys, labels=labels, key_labels=key_labels, offset=offset,
                        exclude_diagonal=exclude_diagonal, decoupled=decoupled)
        row_lse, rps, rpc, _, col_lse, cps, cpc = contrastive_stats(
            "info_nce", kernels, mask, symmetric, query, y, scale)
        if anchor_logits is not None:  # per-anchor extra negatives: one more LSE term
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(anchor_logits.to(row_lse.dtype),
                                                               dim=1))
        row_loss, row_valid = _anchor_loss(row_lse, rps, rpc)
        if not symmetric:
            return row_loss, row_valid, None, None
        col_loss, col_valid = _anchor_loss(col_lse, cps, cpc)
        return row_loss, row_valid, col_loss, col_valid

    return info_nce


def _hard_negative_info_nce(kernels):
    def hard_negative_info_nce(query, key, scale, beta, tau_plus, labels, key_labels,
                               symmetric, extra_negatives, exclude_diagonal, offset):
        n, n_keys = query.shape[0], key.shape[0]
        y = key if extra_negatives is None else torch.cat([key, extra_negatives], dim=0)
        mask = PairMask(n_keys=n_keys, labels=labels, key_labels=key_labels, offset=offset,
                        exclude_diagonal=exclude_diagonal, decoupled=True)

        def direction(mask, x, y):
            # the LSEs of the negatives at (1+β)/τ and β/τ: scale (1+β)/τ, ratio β/(1+β)
            ratio = beta / (1.0 + beta) if beta > 0 else None
            lse1, ps, cnt, lse2, *_ = contrastive_stats(
                "hard_negative_info_nce", kernels, mask, False, x, y, (1.0 + beta) * scale,
                ratio)
            n_neg = candidate_counts(mask, x.shape[0], y.shape[0], cnt)
            pos_mean = ps / ((1.0 + beta) * cnt.clamp_min(1))  # mean positive logit at 1/τ
            return hard_negative_anchor_loss(lse1, lse2, pos_mean, cnt, n_neg, scale, tau_plus)

        row_loss, row_valid = direction(mask, query, y)
        if not symmetric:
            return row_loss, row_valid, None, None
        col_loss, col_valid = direction(mask.transposed(n), key, query)
        return row_loss, row_valid, col_loss, col_valid

    return hard_negative_info_nce


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
        lse = lse.masked_fill(empty, 0.0)
        kernels, mask = ctx.kernels, ctx.mask

        def kernel_grad(x, y, scale, g, bias=None):
            out = kernels.contrastive_bwd(x, y, scale, bias, mask, lse, g, torch.zeros_like(g),
                                          None, None, None)
            return out if bias is not None else out[:3]

        # (no positives: the mask selects no pair for the gpos term, g stands in for it)
        sweeps = [(lambda a, b, x, y, s, g, *bias: _lse_rows_grad(
            a, b, x, y, s, bias[0] if bias else None, mask, g, g)[:3 + len(bias)],
            x.shape[0], y.shape[0], 0, (1, 2, 3))]
        tensors = (x, y, scale, g) + ((bias,) if bias is not None else ())
        dx, dy, dscale, *dbias = _first_order("pairwise_logsumexp", kernel_grad, sweeps, tensors)
        dbias = dbias[0] if dbias else None
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


def _siglip_rows_grad(a, b, x, y, scale, bias, offset, g_row):
    """Rows a:b of the siglip_bwd contract, differentiable: (dx rows, dy, dscale, dbias)."""
    acc = acc_dtype(x.dtype)
    xb, yf = x[a:b].to(acc), y.to(acc)
    s = xb @ yf.T
    cols = torch.arange(y.shape[0], device=x.device)
    sign = 2.0 * (cols[None, :] == torch.arange(a, b, device=x.device)[:, None] + offset) - 1.0
    g = -g_row[a:b, None] * sign * torch.sigmoid(-sign * (scale * s + bias))
    return scale * (g @ yf), scale * (g.T @ xb), _exact_sum(g * s, acc), _exact_sum(g, acc)


class _SigLip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, offset, x, y, scale, bias):
        ctx.kernels, ctx.offset = kernels, offset
        ctx.save_for_backward(x, y, scale, bias)
        return kernels.siglip_fwd(x, y, scale, bias, offset)

    @staticmethod
    def backward(ctx, g_row):
        x, y, scale, bias = ctx.saved_tensors
        kernels, offset = ctx.kernels, ctx.offset
        sweeps = [(lambda a, b, x, y, s, c, g: _siglip_rows_grad(a, b, x, y, s, c, offset, g),
                   x.shape[0], y.shape[0], 0, (1, 2, 3))]
        dx, dy, dscale, dbias = _first_order(
            "siglip_loss", lambda x, y, s, c, g: tuple(kernels.siglip_bwd(x, y, s, c, offset, g)),
            sweeps, (x, y, scale, bias, g_row))
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
        with torch.no_grad():
            dx, dy = ctx.kernels.ms_bwd(x, x if ctx.same else y, *ctx.args, pos_lse, neg_lse,
                                        g.contiguous())
            if ctx.same:
                grads = ((dx + dy).to(x.dtype), None)
            else:
                grads = (dx.to(x.dtype), dy.to(y.dtype))
        if records_graph(x, y, g):
            grads = first_order_only(
                "multi_similarity", "its mining mask is re-derived by the kernels; "
                "backend='reference' differentiates it twice", grads, (x, y, g))
        return (None,) * 9 + grads


def _multi_similarity(kernels):
    def multi_similarity(emb, labels, ref_emb, ref_labels, alpha, beta, base, epsilon,
                         exclude_self, offset):
        x = emb.contiguous()
        y = None if ref_emb is emb else ref_emb.contiguous()
        ref = None if ref_labels is labels else ref_labels
        return _MultiSimilarity.apply(kernels, labels, ref, offset, exclude_self, alpha, beta,
                                      base, epsilon, x, y)

    return multi_similarity


def _smm_rows_grad(a, b, x, y, v, scale, bias, g_out):
    """Rows a:b of the softmax_matmul_bwd contract, differentiable (the softmax and ``out``
    recomputed in the block): (dx rows, dy, dv, dscale, dbias)."""
    acc = acc_dtype(x.dtype)
    xb, yf, vf, gb = x[a:b].to(acc), y.to(acc), v.to(acc), g_out[a:b].to(acc)
    s = xb @ yf.T
    z = scale * s
    p = torch.softmax(z if bias is None else z + bias[None, :], dim=1)
    delta = (gb * (p @ vf)).sum(1, keepdim=True)
    dz = p * (gb @ vf.T - delta)
    return (scale * (dz @ yf), scale * (dz.T @ xb), p.T @ gb, _exact_sum(dz * s, acc),
            None if bias is None else dz.sum(0))


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
        kernels = ctx.kernels

        def kernel_grad(x, y, v, scale, g_out, bias=None):
            res = kernels.softmax_matmul_bwd(x, y, v, scale, bias, out, lse, g_out.contiguous())
            return tuple(res) if bias is not None else tuple(res[:4])

        sweeps = [(lambda a, b, x, y, v, s, g, *bias: _smm_rows_grad(
            a, b, x, y, v, s, bias[0] if bias else None, g)[:4 + len(bias)],
            x.shape[0], y.shape[0], 0, (1, 2, 3, 4))]
        tensors = (x, y, v, scale, g_out) + ((bias,) if bias is not None else ())
        dx, dy, dv, dscale, *dbias = _first_order("pairwise_softmax_matmul", kernel_grad, sweeps,
                                                  tensors)
        dbias = dbias[0] if dbias else None
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
    """values_ik = <x_i, y_{idx_ik}> given by the kernel; backward scatters through idx, in
    plain torch: differentiable again (exact second order; a recorded backward keeps O(N·k·D))."""

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
        # detached: a kernel never sees a tensor autograd could follow (see "second order")
        values, idx = kernels.topk(x.detach().contiguous(), y.detach().contiguous(), k,
                                   exclude_diagonal)
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
    "hard_negative_info_nce": _hard_negative_info_nce,
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
