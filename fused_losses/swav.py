"""SwAV's swapped-prediction loss, streamed: the N×K scores and codes are never stored.

SwAV (Caron et al. 2020) scores every crop's embedding against K prototypes, turns the scores of
the crops used for assignment into codes ``q`` by Sinkhorn-Knopp (no gradient), and asks every
other crop to predict them::

    loss = mean_{i ∈ crops_for_assign} mean_{v ≠ i} mean_b −Σ_k q^i_bk · log_softmax_k(s^v_bk / τ)

With ``log q^i_bk = s^i_bk/ε + u_k + w_b + log n`` (the potentials of :func:`ot.knopp_potentials`)
and ``r_b = Σ_k q^i_bk`` (1 after one Sinkhorn-Knopp iteration), the sum over k splits into

    −Σ_k q_bk log p_bk = r_b · LSE_k(s^v_bk/τ) − (1/τ) <z^v_b, t_b>,   t_b = Σ_k q_bk c_k,

so a crop pair costs one differentiable row LSE (``pairwise_logsumexp``) and one streamed
softmax-weighted sum of prototypes (``pairwise_softmax_matmul``) for the targets ``t``; the
prototype gradient of the second term, ``Σ_b g_b q_bk z^v_b / τ``, is one more streamed softmax
matmul in the other direction.  Every step is an existing streamed op, so every backend that
implements those runs this loss in O((B + K)·D) memory — DINOv2-scale K (65k–131k prototypes)
included.  ``backend="reference"`` computes SwAV's dense procedure literally (the oracle).
"""

from __future__ import annotations

import math

import torch

from . import _validation as V
from .functional import pairwise_logsumexp, pairwise_softmax_matmul
from .fused import first_order_only, records_graph
from .kernels import acc_dtype
from .ot import knopp_potentials, sinkhorn_knopp


def _check(embeddings, prototypes, n_crops, crops_for_assign, temperature, epsilon, n_iters,
           queue):
    V.check_features("embeddings", embeddings)
    V.check_features("prototypes", prototypes)
    V.check_same_dim("embeddings", embeddings, "prototypes", prototypes)
    V.check_same_device(embeddings=embeddings, prototypes=prototypes)
    V.check_same_dtype(embeddings=embeddings, prototypes=prototypes)
    n_crops = V.check_int("n_crops", n_crops, 2)
    if embeddings.shape[0] % n_crops:
        raise ValueError(f"embeddings must stack n_crops={n_crops} crops of one batch: "
                         f"{embeddings.shape[0]} rows is not a multiple of {n_crops}")
    try:
        assign = tuple(int(i) for i in crops_for_assign)
    except TypeError:
        raise TypeError("crops_for_assign must be a sequence of crop indices") from None
    if not assign or len(set(assign)) != len(assign) or not all(0 <= i < n_crops for i in assign):
        raise ValueError(f"crops_for_assign must be distinct indices in [0, {n_crops}), "
                         f"got {tuple(crops_for_assign)!r}")
    V.check_positive_scalar("temperature", temperature)
    V.check_positive_scalar("epsilon", epsilon)
    n_iters = V.check_int("n_iters", n_iters, 0)
    if queue is not None:
        if not isinstance(queue, torch.Tensor):
            raise TypeError(f"queue must be a tensor or None, got {type(queue).__name__}")
        if queue.dim() != 3 or queue.shape[0] != len(assign) or queue.shape[2] != \
                embeddings.shape[1]:
            raise ValueError(f"queue must have shape (len(crops_for_assign)={len(assign)}, Q, "
                             f"D={embeddings.shape[1]}), got {tuple(queue.shape)}")
        V.check_same_device(embeddings=embeddings, queue=queue)
        V.check_same_dtype(embeddings=embeddings, queue=queue)
    return n_crops, assign, float(temperature), float(epsilon), n_iters


def _dense_swav(crops, prototypes, assign, tau, eps, n_iters, queue):
    """SwAV's loop, literally: dense (B, K) scores and codes.  The oracle."""
    acc = acc_dtype(crops[0].dtype)
    c = prototypes.to(acc)
    scores = [z.to(acc) @ c.T for z in crops]
    b = crops[0].shape[0]
    total = 0.0
    for qi, i in enumerate(assign):
        with torch.no_grad():
            s = scores[i]
            if queue is not None:
                s = torch.cat([queue[qi].to(acc) @ c.T, s])
            q = sinkhorn_knopp(s, epsilon=eps, n_iters=n_iters)[-b:]
        sub = 0.0
        for v, sv in enumerate(scores):
            if v != i:
                sub = sub - (q * torch.log_softmax(sv / tau, dim=1)).sum(1)
        total = total + sub / (len(crops) - 1)
    return total / len(assign)


class _CodeDot(torch.autograd.Function):
    """``(1/τ) <z_b, t_b>`` with ``t_b = Σ_k q_bk c_k`` and the codes q held fixed, differentiable
    in z and the prototypes c; q is given by its potentials and recomputed, never stored."""

    @staticmethod
    def forward(ctx, z, prototypes, targets, z_assign, w, u, log_n, eps, tau, backend):
        ctx.save_for_backward(z, prototypes, targets, z_assign, w, u)
        ctx.log_n, ctx.eps, ctx.tau, ctx.backend = log_n, eps, tau, backend
        return (z.to(targets.dtype) * targets).sum(1) / tau

    @staticmethod
    def backward(ctx, g):
        z, prototypes, targets, z_assign, w, u = ctx.saved_tensors
        with torch.no_grad():
            grads = _CodeDot._grads(ctx, g, z, prototypes, targets, z_assign, w, u)
        if records_graph(z, prototypes, g):
            grads = first_order_only(
                "swav_loss", "the streamed path holds the codes' targets fixed; "
                "backend='reference' differentiates it twice", grads, (z, prototypes, g))
        return (*grads, None, None, None, None, None, None, None, None)

    @staticmethod
    def _grads(ctx, g, z, prototypes, targets, z_assign, w, u):
        dz = dc = None
        if ctx.needs_input_grad[0]:
            dz = (g[:, None] * targets / ctx.tau).to(z.dtype)
        if ctx.needs_input_grad[1]:
            # Σ_b g_b q_bk z_b = exp(u_k + log n + LSE_b(s_bk/ε + w_b)) · softmax-matmul_k
            weighted = (g[:, None] * z.to(g.dtype)).to(z.dtype)
            col_lse = pairwise_logsumexp(prototypes, z_assign, scale=1.0 / ctx.eps, bias=w,
                                         backend=ctx.backend)
            mix = pairwise_softmax_matmul(prototypes, z_assign, weighted, scale=1.0 / ctx.eps,
                                          bias=w, backend=ctx.backend)
            mass = torch.exp(u + ctx.log_n + col_lse)
            dc = (mass[:, None] * mix.to(mass.dtype) / ctx.tau).to(prototypes.dtype)
        return dz, dc


def _streamed_swav(crops, prototypes, assign, tau, eps, n_iters, queue, backend):
    b = crops[0].shape[0]
    total = 0.0
    for qi, i in enumerate(assign):
        with torch.no_grad():
            z_sk = crops[i].detach()
            if queue is not None:
                z_sk = torch.cat([queue[qi].detach(), z_sk])
            u, w, row_lse = knopp_potentials(z_sk, prototypes.detach(), eps, n_iters, backend)
            log_n = math.log(z_sk.shape[0])
            u, w, row_lse = u, w[-b:], row_lse[-b:]
            z_i = crops[i].detach()
            row_mass = torch.exp(w + log_n + row_lse)  # r_b = Σ_k q_bk
            # t_b = Σ_k q_bk c_k = r_b · softmax-matmul_b (softmax over k of s/ε + u)
            targets = pairwise_softmax_matmul(z_i, prototypes.detach(), prototypes.detach(),
                                              scale=1.0 / eps, bias=u, backend=backend)
            targets = row_mass[:, None] * targets.to(row_mass.dtype)
        sub = 0.0
        for v, z in enumerate(crops):
            if v == i:
                continue
            lse = pairwise_logsumexp(z, prototypes, scale=1.0 / tau, backend=backend)
            dot = _CodeDot.apply(z, prototypes, targets, z_i, w, u, log_n, eps, tau, backend)
            sub = sub + row_mass * lse.to(row_mass.dtype) - dot
        total = total + sub / (len(crops) - 1)
    return total / len(assign)


@V.autocast_features("embeddings", "prototypes", "queue")
def swav_loss(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    n_crops: int = 2,
    crops_for_assign=(0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    n_iters: int = 3,
    queue: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """SwAV's swapped-prediction loss without the (B, K) scores or codes.

    ``embeddings``: ``(n_crops·B, D)``, the crops stacked as SwAV's ``output`` (crop c is rows
    ``c·B … (c+1)·B``), L2-normalized by the caller as in SwAV; ``prototypes``: ``(K, D)`` (the
    prototype layer's weight, also normalized by the caller).  Codes come from Sinkhorn-Knopp
    (``epsilon``, ``n_iters``; :func:`fused_losses.sinkhorn_knopp`) on the crops in
    ``crops_for_assign``, optionally over ``queue`` ``(len(crops_for_assign), Q, D)`` of past
    embeddings stacked before the batch (SwAV's queue; its rows only shape the codes).  Each other
    crop predicts them through ``softmax(scores / temperature)``.  Gradients flow to
    ``embeddings`` and ``prototypes``, never through the codes.  ``reduction``: ``"mean"`` (SwAV's
    loss), ``"sum"``, or ``"none"`` (per sample of the batch, ``(B,)``).  Single process: the
    Sinkhorn-Knopp sums run over this batch only (SwAV all-reduces them across ranks).
    """
    n_crops, assign, tau, eps, n_iters = _check(embeddings, prototypes, n_crops, crops_for_assign,
                                                 temperature, epsilon, n_iters, queue)
    reduction = V.check_reduction(reduction)
    crops = list(embeddings.chunk(n_crops))
    if backend == "reference":
        per_sample = _dense_swav(crops, prototypes, assign, tau, eps, n_iters, queue)
    else:
        per_sample = _streamed_swav(crops, prototypes, assign, tau, eps, n_iters, queue, backend)
    per_sample = per_sample.to(acc_dtype(embeddings.dtype))
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
