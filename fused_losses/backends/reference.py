"""The ``reference`` backend: plain, readable PyTorch.

It materializes whatever it likes (the full N×M similarity matrix) and is the oracle every other
backend is tested against.  Differentiable through autograd and float64-capable.

Canonical backend ops live here with the exact signatures every backend implements (the API
layer in ``functional`` has already validated and normalized the arguments):

- ``pairwise_logsumexp(x, y, scale, bias, exclude_diagonal) -> (N,)``, over j (rows).
- ``pairwise_softmax_matmul(x, y, v, scale, bias) -> (N, E)``.
- ``similarity_topk(x, y, k, exclude_diagonal) -> (values (N, k), indices (N, k))``.
- ``info_nce(query, key, scale, labels, key_labels, symmetric, decoupled, extra_negatives,
  exclude_diagonal, offset, anchor_logits=None) -> (row_loss (N,), row_valid (N,),
  col_loss (M,) | None, col_valid (M,) | None)``; ``anchor_logits`` (N, E): each anchor's own
  extra negative logits (already scaled), joining its row LSE.
- ``hard_negative_info_nce(query, key, scale, beta, tau_plus, labels, key_labels, symmetric,
  extra_negatives, exclude_diagonal, offset)`` -> as ``info_nce`` (Robinson et al. 2021;
  ``_algebra.hard_negative_anchor_loss``), the negatives of an anchor being its candidates
  that are not positives.
- ``siglip(x, y, logit_scale, logit_bias, offset) -> row_loss (N,)``.
- ``multi_similarity(emb, labels, ref_emb, ref_labels, alpha, beta, base, epsilon,
  exclude_self, offset) -> loss (N,)``.

``offset`` is the global index of query row 0 among the keys (0 in one process; the
distributed path passes the rank's offset): the "diagonal" pair of query i is key i + offset.

Precision: similarities are computed the way an eager PyTorch user would (``x @ y.T`` in the
input dtype); every reduction (exp, logsumexp, sums) runs in the accumulation dtype, float32
for fp16/bf16/fp32 inputs and float64 for float64.  Outputs are in the accumulation dtype.
"""

from __future__ import annotations

import torch

from .._algebra import hard_negative_anchor_loss
from .._dispatch import Backend, register_backend
from ..kernels import acc_dtype

REFERENCE = register_backend(
    Backend(
        name="reference",
        priority=0,
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    )
)


def similarities(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y.T`` in the input dtype, returned in the accumulation dtype."""
    return (x @ y.transpose(-1, -2)).to(acc_dtype(x.dtype))


def diagonal_mask(n: int, m: int, offset: int, device: torch.device) -> torch.Tensor:
    """Boolean (n, m) mask of the pairs (i, i + offset)."""
    rows = torch.arange(n, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    return cols == rows + offset


def masked_logsumexp(z: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """LSE over the kept entries; -inf where nothing is kept.

    Gradient-safe: an all-masked line would backpropagate exp(-inf - (-inf)) = NaN even through
    a later ``torch.where``, so such lines are reduced over zeros and then replaced by -inf."""
    any_kept = keep.any(dim=dim, keepdim=True)
    z = z.masked_fill(~keep, float("-inf")).masked_fill(~any_kept, 0.0)
    lse = torch.logsumexp(z, dim=dim)
    return lse.masked_fill(~any_kept.squeeze(dim), float("-inf"))


@REFERENCE.implements("pairwise_logsumexp")
def pairwise_logsumexp(x, y, scale, bias, exclude_diagonal):
    z = scale * similarities(x, y)
    if bias is not None:
        z = z + bias.to(z.dtype)[None, :]
    keep = torch.ones_like(z, dtype=torch.bool)
    if exclude_diagonal:
        keep = ~diagonal_mask(z.shape[0], z.shape[1], 0, z.device)
    return masked_logsumexp(z, keep, dim=1)


@REFERENCE.implements("pairwise_softmax_matmul")
def pairwise_softmax_matmul(x, y, v, scale, bias):
    z = scale * similarities(x, y)
    if bias is not None:
        z = z + bias.to(z.dtype)[None, :]
    return torch.softmax(z, dim=1) @ v.to(z.dtype)


@REFERENCE.implements("similarity_topk")
def similarity_topk(x, y, k, exclude_diagonal):
    s = similarities(x, y)
    order_key = s.detach()
    if exclude_diagonal:
        order_key = order_key.masked_fill(
            diagonal_mask(s.shape[0], s.shape[1], 0, s.device), float("-inf")
        )
    # A stable descending sort keeps ties in index order: ties go to the smaller index.
    indices = torch.sort(order_key, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, indices), indices


@REFERENCE.implements("info_nce")
def info_nce(
    query,
    key,
    scale,
    labels,
    key_labels,
    symmetric,
    decoupled,
    extra_negatives,
    exclude_diagonal,
    offset,
    anchor_logits=None,
):
    z, pos, cand, row_terms, row_keep = _pairs(query, key, scale, labels, key_labels, decoupled,
                                               extra_negatives, exclude_diagonal, offset)
    if anchor_logits is not None:
        row_terms = torch.cat([row_terms, anchor_logits.to(z.dtype)], dim=1)
        row_keep = torch.cat([row_keep, torch.ones_like(anchor_logits, dtype=torch.bool)], dim=1)
    row_lse = masked_logsumexp(row_terms, row_keep, dim=1)
    row_loss, row_valid = _anchor_losses(row_lse, z, pos, dim=1)
    if not symmetric:
        return row_loss, row_valid, None, None
    col_lse = masked_logsumexp(z, cand, dim=0)
    col_loss, col_valid = _anchor_losses(col_lse, z, pos, dim=0)
    return row_loss, row_valid, col_loss, col_valid


def _pairs(query, key, scale, labels, key_labels, decoupled, extra_negatives, exclude_diagonal,
           offset):
    """z (N, M), the masks pos and cand, and the row problem (z with the extra negatives'
    logits appended, and which of them are candidates)."""
    z = scale * similarities(query, key)  # (N, M)
    n, m = z.shape
    diag = diagonal_mask(n, m, offset, z.device)
    if labels is None:
        pos = diag
    else:
        pos = labels[:, None] == key_labels[None, :]
    cand = torch.ones_like(pos)
    if exclude_diagonal:
        pos = pos & ~diag
        cand = cand & ~diag
    if decoupled:
        cand = cand & ~pos
    row_terms, row_keep = z, cand
    if extra_negatives is not None:
        z_extra = scale * similarities(query, extra_negatives)
        row_terms = torch.cat([z, z_extra], dim=1)
        row_keep = torch.cat([cand, torch.ones_like(z_extra, dtype=torch.bool)], dim=1)
    return z, pos, cand, row_terms, row_keep


@REFERENCE.implements("hard_negative_info_nce")
def hard_negative_info_nce(query, key, scale, beta, tau_plus, labels, key_labels, symmetric,
                           extra_negatives, exclude_diagonal, offset):
    z, pos, cand, row_terms, row_keep = _pairs(query, key, scale, labels, key_labels, True,
                                               extra_negatives, exclude_diagonal, offset)

    def direction(terms, keep, pos, dim):
        lse1 = masked_logsumexp((1.0 + beta) * terms, keep, dim=dim)
        lse2 = masked_logsumexp(beta * terms, keep, dim=dim) if beta > 0 else None
        count = pos.sum(dim).to(z.dtype)
        pos_mean = torch.where(pos, z, torch.zeros_like(z)).sum(dim) / count.clamp_min(1)
        return hard_negative_anchor_loss(lse1, lse2, pos_mean, count, keep.sum(dim).to(z.dtype),
                                         scale, tau_plus)

    row_loss, row_valid = direction(row_terms, row_keep, pos, 1)
    if not symmetric:
        return row_loss, row_valid, None, None
    col_loss, col_valid = direction(z, cand, pos, 0)
    return row_loss, row_valid, col_loss, col_valid


def _anchor_losses(lse, z, pos, dim):
    """loss = LSE over candidates - mean over positives; 0 (and invalid) for an anchor with no
    positive or no candidate."""
    count = pos.sum(dim)
    pos_mean = torch.where(pos, z, torch.zeros_like(z)).sum(dim) / count.clamp_min(1)
    # No candidate gives -inf; a NaN (from NaN features) must stay valid and propagate.
    valid = (count > 0) & (lse != float("-inf"))
    safe_lse = torch.where(valid, lse, torch.zeros_like(lse))
    loss = torch.where(valid, safe_lse - pos_mean, torch.zeros_like(lse))
    return loss, valid


@REFERENCE.implements("siglip")
def siglip(x, y, logit_scale, logit_bias, offset):
    logits = logit_scale * similarities(x, y) + logit_bias
    sign = 2.0 * diagonal_mask(logits.shape[0], logits.shape[1], offset, logits.device) - 1.0
    return -torch.nn.functional.logsigmoid(sign * logits).sum(dim=1)


@REFERENCE.implements("multi_similarity")
def multi_similarity(
    emb, labels, ref_emb, ref_labels, alpha, beta, base, epsilon, exclude_self, offset
):
    s = similarities(emb, ref_emb)
    pos = labels[:, None] == ref_labels[None, :]
    neg = ~pos
    if exclude_self:
        self_pair = diagonal_mask(s.shape[0], s.shape[1], offset, s.device)
        pos = pos & ~self_pair
        neg = neg & ~self_pair
    if epsilon is not None:
        # Mining thresholds are hard and carry no gradient.
        sd = s.detach()
        max_neg = sd.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
        min_pos = sd.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
        pos = pos & (sd - epsilon < max_neg)
        neg = neg & (sd + epsilon > min_pos)
    pos_term = _log1p_sum_exp(-alpha * (s - base), pos) / alpha
    neg_term = _log1p_sum_exp(beta * (s - base), neg) / beta
    return pos_term + neg_term


def _log1p_sum_exp(u, keep):
    """log(1 + Σ_kept exp(u)) as an LSE seeded with the value 0 (overflow-safe)."""
    zero = torch.zeros(u.shape[0], 1, dtype=u.dtype, device=u.device)
    return torch.logsumexp(torch.cat([zero, u.masked_fill(~keep, float("-inf"))], dim=1), dim=1)
