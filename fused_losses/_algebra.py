"""O(N) loss algebra shared by the reference backend and the fused layer.

The O(N·M) part of a loss is a handful of per-line statistics (LSEs over candidates, sums over
positives); what a loss does with them is written here once, in plain differentiable torch, so
that the dense oracle and the fused backends differ only in how they get the statistics.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def candidate_counts(mask, n_rows: int, n_cols: int, pos_cnt: torch.Tensor) -> torch.Tensor:
    """|C(i)| per row of ``mask`` (a ``kernels.PairMask``) over ``n_cols`` columns (keys, then
    extra negatives): every column, minus the row's own diagonal pair when it is excluded,
    minus its positives when decoupled (they are disjoint from the diagonal once it is
    excluded).  In the dtype of ``pos_cnt``."""
    rows = torch.arange(n_rows, device=pos_cnt.device) + mask.offset
    count = torch.full_like(pos_cnt, float(n_cols))
    if mask.exclude_diagonal:
        count = count - ((rows >= 0) & (rows < mask.n_keys)).to(pos_cnt.dtype)
    if mask.decoupled:
        count = count - pos_cnt
    return count


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012); both branches finite."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def hard_negative_anchor_loss(lse1, lse2, pos_mean, pos_cnt, n_neg, scale, tau_plus):
    """Per-anchor loss of hard-negative reweighting (Robinson et al., ICLR 2021) and of the
    debiased loss (Chuang et al., NeurIPS 2020), in log space.

    With z = s/τ over the anchor's negatives j (n_neg of them) and its positive logit z_p (the
    mean over its positives when it has several), the authors' estimator is
    ``Ng = max((n_neg·Σ_j e^{(1+β)z_j} / Σ_j e^{βz_j} − τ⁺·n_neg·e^{z_p}) / (1 − τ⁺),
    n_neg·e^{−1/τ})`` and ``loss = −log(e^{z_p} / (e^{z_p} + Ng)) = softplus(log Ng − z_p)``.
    Inputs: ``lse1 = LSE_j (1+β)z_j``, ``lse2 = LSE_j βz_j`` (None for β = 0: then log n_neg),
    ``pos_mean`` = z_p, counts, ``scale`` = 1/τ (float or 0-dim tensor, the clamp follows it),
    ``tau_plus`` ∈ [0, 1).  An anchor without a positive or without a negative has loss 0 and
    is not valid (left out of the mean).  Returns ``(loss, valid)``; NaN statistics stay NaN."""
    valid = (pos_cnt > 0) & (n_neg > 0)
    zero = torch.zeros((), dtype=lse1.dtype, device=lse1.device)
    # invalid anchors compute on finite stand-ins: no −inf − −inf, no NaN gradient
    a1 = torch.where(valid, lse1, zero)
    zp = torch.where(valid, pos_mean, zero)
    log_n = torch.log(n_neg.clamp_min(1))
    log_a = a1 if lse2 is None else log_n + a1 - torch.where(valid, lse2, zero)
    if tau_plus > 0:
        # log(A − B), B = τ⁺·n_neg·e^{z_p}; A ≤ B leaves only the clamp
        x = math.log(tau_plus) + log_n + zp - log_a
        above = x < 0
        log_unc = torch.where(above, log_a + _log1mexp(torch.where(above, x, -1.0)),
                              torch.full_like(log_a, NEG_INF)) - math.log1p(-tau_plus)
    else:
        log_unc = log_a
    log_ng = torch.maximum(log_unc, log_n - scale)
    probe = log_a + zp  # NaN when a statistic is: the loss must say so (SPEC §6)
    # log(1 + e^x) exactly (F.softplus returns x itself above its threshold of 20: off by
    # e^-20 ≈ 2e-9, visible in float64)
    x = log_ng - zp
    loss = torch.logaddexp(torch.zeros_like(x), x) + (probe - probe)
    return torch.where(valid, loss, zero), valid
