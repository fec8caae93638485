"""torch.distributed support (SPEC §5): the losses of §2–§3 over a process group.

``functional`` validates and normalizes the local arguments and, when ``process_group`` is
given, calls one of the three entry points below.  The call is collective: every rank of the
group must make it, with the same arguments apart from its own rows.

How a loss is computed
----------------------
1. The per-rank row counts are all-gathered first (one small collective), so ranks may hold
   uneven batches, including none at all (the global batch must have a row).
2. The keys (with their labels; for ``symmetric`` also the queries) are all-gathered into the
   global batch, in rank order, by :func:`all_gather_rows`: the rows are padded to the largest
   rank's count, gathered, and trimmed.  Its backward **reduce-scatters (sums)** the gradient
   of the gathered rows back to the rank that owns them, so every key receives the gradient of
   every rank's anchors (pytorch-metric-learning's ``DistributedLossWrapper(efficient=True)``
   detaches them instead).
3. Each rank computes its local anchors against all keys with the same backend op the single
   process path uses (``_dispatch.resolve``), passing ``offset`` = the global index of its
   first anchor, so the positive pair (i, i + offset), ``exclude_diagonal`` and the
   self-pairs of multi-similarity are the single-process ones.  A symmetric loss (CLIP) is two
   one-directional calls: local queries against all keys (row losses) and local keys against
   all queries (column losses).
4. ``"mean"``/``"sum"``: the local sums (and valid-anchor counts) are all-reduced, so every rank
   returns the same value: the single-process loss of the concatenated batch.  ``"none"``
   returns this rank's per-anchor losses (of its local rows).

Gradient convention
-------------------
The collectives have their exact adjoints as backward: the gather reduce-scatters (sums), the
all-reduce of the loss all-reduces the upstream gradients.  Hence the backward on each rank
computes, for the tensors it owns, the gradient of ``J = Σ_ranks (what each rank
backpropagates)``.  With ``"mean"``/``"sum"`` every rank returns and backpropagates the same
loss ``L``, so ``J = world_size · L``: each rank's autograd graph stands for ``world_size ×`` its
own share of ``L``.  DistributedDataParallel then *averages* the parameter gradients over the
ranks, which gives exactly ``∇L``, the single-process gradient on the concatenated batch, for
the encoder weights and for a replicated ``logit_scale``/temperature/``logit_bias`` alike.

- Without DDP, average the gradients yourself the way DDP does (all-reduce SUM, then divide by
  the world size): :func:`fused_losses.large_batch.average_gradients`.  Do not sum them (that
  gives ``world_size · ∇L``) and do not skip the averaging (each rank alone holds a partial
  gradient).
- With ``reduction="none"`` you build the objective yourself; to keep the convention,
  backpropagate ``world_size ×`` this rank's share, e.g.
  ``per_anchor.sum() * world_size / n_global``.

Every rank must run the backward (it contains collectives), and all ranks must agree on which
inputs require grad.

``extra_negatives`` (a MoCo-style queue) stays local: each rank's anchors use its own queue,
which is not gathered.  With a queue replicated on every rank (the usual case) the result is
the single-process loss with that queue, and the queue's gradient follows the convention above.

Memory per rank: the gathered rows, O(N_global·D) (plus the padding of uneven batches to the
largest rank's count); the fused backends never hold the N_local×N_global logits (the
reference backend does, as in one process).
Not done: a ring schedule overlapping the exchange with the tile loop (future work).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._dispatch import resolve

__all__ = [
    "all_gather_rows",
    "distributed_info_nce",
    "distributed_siglip",
    "distributed_multi_similarity",
]

# torch 2.13 renames the tensor collectives (the old names warn); older torch has only the old.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------------------------
# collectives


def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group was given but torch.distributed is not initialized "
            "(call torch.distributed.init_process_group first)"
        )
    try:
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
    except (TypeError, AttributeError, RuntimeError, ValueError) as exc:
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup, got {type(group).__name__}"
        ) from exc
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    return rank, world


def group_rank(group) -> int:
    """This process's rank in ``group``, with a clear error when torch.distributed is not set up."""
    return _rank_world(group)[0]


def _row_counts(group, device, *counts: int) -> list[list[int]]:
    """All-gather the local row counts: ``out[k][r]`` is the k-th count of rank r."""
    _, world = _rank_world(group)
    local = torch.tensor(counts, dtype=torch.int64, device=device)
    out = torch.empty(world * len(counts), dtype=torch.int64, device=device)
    _all_gather_single(out, local, group=group)
    return out.view(world, len(counts)).t().tolist()


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    world, most = len(sizes), max(sizes)
    even = all(s == most for s in sizes)
    if even:
        src = x.contiguous()
    else:
        src = x.new_zeros((most,) + tuple(x.shape[1:]))
        src[: x.shape[0]] = x
    out = x.new_empty((world * most,) + tuple(x.shape[1:]))
    _all_gather_single(out, src, group=group)
    if even:
        return out
    return torch.cat([out[r * most : r * most + s] for r, s in enumerate(sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Gather rows of uneven count; backward = reduce-scatter (sum) back to the owner.

    Each collective's backward is the other collective as an autograd Function, so a recorded
    backward (create_graph=True) is differentiable again and second-order gradients stay exact
    (every rank must then run the second backward too: it contains collectives)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatterRows.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    """The adjoint of :class:`_AllGatherRows`: each gathered row's gradient summed over the
    ranks, delivered to the rank that owns the row; backward = all-gather."""

    @staticmethod
    def forward(ctx, grad, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        world, most = len(sizes), max(sizes)
        grad = grad.contiguous()
        if all(s == most for s in sizes):
            padded = grad
        else:
            padded = grad.new_zeros((world * most,) + tuple(grad.shape[1:]))
            start = 0
            for r, s in enumerate(sizes):
                padded[r * most : r * most + s] = grad[start : start + s]
                start += s
        out = grad.new_empty((most,) + tuple(grad.shape[1:]))
        _reduce_scatter_single(out, padded, op=dist.ReduceOp.SUM, group=group)
        return out[: sizes[rank]]

    @staticmethod
    def backward(ctx, grad):
        return _AllGatherRows.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward all-reduces the upstream gradients (the exact adjoint)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None  # self-adjoint


def all_gather_rows(x: torch.Tensor, process_group, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate the rows of ``x`` from every rank of ``process_group`` (in rank order; per-rank
    row counts may differ).  Differentiable: the gradient of each gathered row is summed over
    the ranks and delivered to the rank that owns the row (reduce-scatter).  Collective, in the
    backward too.  ``sizes`` (every rank's row count) skips the exchange of the counts."""
    rank, _ = _rank_world(process_group)
    if sizes is None:
        sizes = _row_counts(process_group, x.device, x.shape[0])[0]
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGatherRows.apply(x, sizes, rank, process_group)
    return _gather_padded(x.detach(), sizes, process_group)


def _gather_labels(labels: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    return _gather_padded(labels.contiguous(), sizes, group)


def _global_sums(values: list[torch.Tensor], group) -> list[torch.Tensor]:
    """All-reduce several 0-dim tensors in one collective (differentiable)."""
    dtype = values[0].dtype
    packed = torch.stack([v.to(dtype) for v in values])
    return list(_AllReduceSum.apply(packed, group).unbind(0))


class _ZeroTiedTo(torch.autograd.Function):
    """A 0-dim zero that depends on ``tensors`` (their gradient: zeros).

    A rank without local anchors computes no loss term, but its backward must still run the
    reduce-scatter of every gathered tensor (the other ranks wait on it) and give DDP a gradient
    for every parameter the loss reaches (``logit_scale``), as the other ranks do."""

    @staticmethod
    def forward(ctx, dtype, *tensors):
        ctx.like = [(t.shape, t.dtype, t.device) for t in tensors]
        return torch.zeros((), dtype=dtype, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad):
        return (None, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.like))


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    # The ops return fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (functional's contract).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _no_anchors(like: torch.Tensor, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty per-anchor losses and valid flags for a rank with no local anchors, tied to the
    tensors the anchors would have met (see :class:`_ZeroTiedTo`)."""
    tied = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    dtype = _loss_dtype(like)
    loss = like.new_zeros(0, dtype=dtype)
    if tied and torch.is_grad_enabled():
        loss = loss + _ZeroTiedTo.apply(dtype, *tied)
    return loss, torch.zeros(0, dtype=torch.bool, device=like.device)


def _check_global_rows(**counts: list[int]) -> None:
    # Every rank holds the same gathered counts, so every rank raises (no rank left waiting).
    for name, sizes in counts.items():
        if sum(sizes) == 0:
            raise ValueError(f"{name} has no rows on any rank of process_group")


# --------------------------------------------------------------------------------------------
# the losses


def distributed_info_nce(
    query,
    key,
    scale,
    labels,
    key_labels,
    symmetric,
    decoupled,
    extra_negatives,
    exclude_diagonal,
    reduction,
    backend,
    process_group,
    weight=None,
    anchor_negatives=None,
):
    """InfoNCE over ``process_group``; the arguments are ``functional.info_nce``'s after its
    validation and normalization (``key_labels`` already defaulted to ``labels``).  ``scale``
    is a scalar or a per-anchor vector over this rank's queries (then, with ``symmetric``,
    every rank holds as many keys as queries and key j uses the scale of query j)."""
    from .functional import anchor_logits

    group = process_group
    rank, _ = _rank_world(group)
    n_q, n_k = _row_counts(group, query.device, query.shape[0], key.shape[0])
    _check_global_rows(query=n_q, key=n_k)
    if labels is None and sum(n_k) < sum(n_q):
        raise ValueError(
            "without labels the positive of query i is key i, so the global batch needs at "
            f"least as many keys as queries: got N={sum(n_q)}, M={sum(n_k)}"
        )
    per_anchor = isinstance(scale, torch.Tensor) and scale.dim() == 1
    if symmetric and (per_anchor or weight is not None) and n_q != n_k:
        what = "a per-anchor temperature" if per_anchor else "weight"
        raise ValueError(f"symmetric with {what} needs as many keys as queries on every rank "
                         f"(pairs), got {n_q} queries and {n_k} keys per rank")
    q_off, k_off = sum(n_q[:rank]), sum(n_k[:rank])
    # a per-anchor scale multiplies the anchor rows (each direction's own), the op's is 1
    op_scale = 1.0 if per_anchor else scale

    def anchors(rows):
        return rows * scale.to(rows.dtype)[:, None] if per_anchor else rows

    keys = all_gather_rows(key, group, n_k)
    all_key_labels = None if labels is None else _gather_labels(key_labels, n_k, group)
    if query.shape[0] > 0:
        impl = resolve("info_nce", backend, (query, keys, extra_negatives, anchor_negatives))
        rows = anchors(query)
        row_loss, row_valid, _, _ = impl(
            rows,
            keys,
            op_scale,
            labels,
            all_key_labels,
            False,
            decoupled,
            extra_negatives,
            exclude_diagonal,
            q_off,
            anchor_logits(rows, anchor_negatives, None if per_anchor else scale),
        )
    else:
        row_loss, row_valid = _no_anchors(query, query, keys, scale, extra_negatives,
                                          anchor_negatives)
    col_loss = col_valid = None
    if symmetric:
        # Column losses: this rank's keys as anchors over every query.
        queries = all_gather_rows(query, group, n_q)
        all_labels = None if labels is None else _gather_labels(labels, n_q, group)
        if key.shape[0] > 0:
            impl = resolve("info_nce", backend, (key, queries))
            col_loss, col_valid, _, _ = impl(
                anchors(key),
                queries,
                op_scale,
                key_labels,
                all_labels,
                False,
                decoupled,
                None,
                exclude_diagonal,
                k_off,
            )
        else:
            col_loss, col_valid = _no_anchors(key, key, queries, scale)
    if weight is not None:
        row_loss = row_loss * weight.to(row_loss.dtype)
        if symmetric:
            col_loss = col_loss * weight.to(col_loss.dtype)

    if reduction == "none":
        return row_loss if not symmetric else (row_loss + col_loss) / 2
    parts = [row_loss.sum(), row_valid.sum()]
    if symmetric:
        parts += [col_loss.sum(), col_valid.sum()]
    sums = _global_sums(parts, group)
    if reduction == "sum":
        row, col = sums[0], (sums[2] if symmetric else None)
    else:
        row = sums[0] / sums[1].clamp_min(1)
        col = sums[2] / sums[3].clamp_min(1) if symmetric else None
    return row if not symmetric else (row + col) / 2


def distributed_siglip(x, y, scale, bias, reduction, backend, process_group):
    """SigLIP over ``process_group``: local images against every text (offset = this rank's
    first image); ``"mean"`` divides by the global number of images."""
    group = process_group
    rank, _ = _rank_world(group)
    n_x, n_y = _row_counts(group, x.device, x.shape[0], y.shape[0])
    _check_global_rows(image_features=n_x, text_features=n_y)
    texts = all_gather_rows(y, group, n_y)
    if x.shape[0] > 0:
        impl = resolve("siglip", backend, (x, texts))
        per_row = impl(x, texts, scale, bias, sum(n_x[:rank]))
    else:
        per_row, _ = _no_anchors(x, x, texts, scale, bias)
    if reduction == "none":
        return per_row
    (total,) = _global_sums([per_row.sum()], group)
    return total if reduction == "sum" else total / sum(n_x)


def distributed_multi_similarity(
    emb,
    labels,
    ref_emb,
    ref_labels,
    alpha,
    beta,
    base,
    epsilon,
    reduction,
    backend,
    process_group,
    weight=None,
):
    """Multi-similarity over ``process_group``.  ``ref_emb is None``: the references are the
    gathered embeddings themselves and the self-pairs (global index i + offset) are dropped;
    else the gathered ``ref_emb``.  ``"mean"`` averages over the global anchors."""
    group = process_group
    rank, _ = _rank_world(group)
    exclude_self = ref_emb is None
    if exclude_self:
        (n_e,) = _row_counts(group, emb.device, emb.shape[0])
        _check_global_rows(embeddings=n_e)
        refs = all_gather_rows(emb, group, n_e)
        all_ref_labels = _gather_labels(labels, n_e, group)
    else:
        n_e, n_r = _row_counts(group, emb.device, emb.shape[0], ref_emb.shape[0])
        _check_global_rows(embeddings=n_e, ref_embeddings=n_r)
        refs = all_gather_rows(ref_emb, group, n_r)
        all_ref_labels = _gather_labels(ref_labels, n_r, group)
    if emb.shape[0] > 0:
        impl = resolve("multi_similarity", backend, (emb, refs))
        loss = impl(
            emb,
            labels,
            refs,
            all_ref_labels,
            alpha,
            beta,
            base,
            epsilon,
            exclude_self,
            sum(n_e[:rank]),
        )
    else:
        loss, _ = _no_anchors(emb, emb, refs)
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    if reduction == "none":
        return loss
    (total,) = _global_sums([loss.sum()], group)
    return total if reduction == "sum" else total / sum(n_e)
