"""Drop-in sentence-transformers losses computed by this package's fused ops:
``MultipleNegativesRankingLoss`` (every ``directions`` / ``partition_mode``, hard-negative
columns, ``gather_across_devices``), ``CachedMultipleNegativesRankingLoss`` (GradCache: it
overrides ``calculate_loss``, the hook the library's mixin calls, so ``MatryoshkaLoss`` still
wraps it), the symmetric variants, and ``GISTEmbedLoss``.

Each class subclasses the library's class of the same name (so the trainer's contract holds:
``model``, ``get_config_dict``, ``citation``, ``isinstance``).  Only the loss computation is
replaced: no (batch × candidates) score matrix is formed; each softmax denominator is a streamed
row log-sum-exp (:func:`fused_losses.pairwise_logsumexp`), and the positive score is a row-wise
dot product.  ``similarity_fct`` ``cos_sim`` and ``dot_score`` (or the model's own
``similarity`` when it resolves to one of them) are fused; any other function, and
``hardness_mode``, run the library's code with a one-line warning.

``GISTEmbedLoss``'s guide masks (drop a candidate whose guide similarity exceeds the anchor's
guided positive similarity minus the margin) are evaluated tile by tile from the guide
embeddings, on this package's streaming torch kernels (``kernels.TorchBlockKernels``: O(block ×
candidates) memory; the library builds four (batch × candidates × dim) tensors).  A candidate
whose guide similarity lies within float rounding of the threshold may fall on the other side
than in the library (the library computes the guide cosine element by element, here it is a
matrix product).

Distributed (``gather_across_devices=True``): the candidates are all-gathered with gradient
(``fused_losses.distributed.all_gather_rows``: each rank's rows receive the gradients of every
rank's loss, as the library's ``all_gather_with_grad`` does), each rank's loss is the mean over
its own anchors, as in the library; uneven per-rank batches are supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import functional as FL
from ..distributed import _row_counts, all_gather_rows
from ..kernels import TorchBlockKernels, acc_dtype
from ._common import logsumexp_of, require, warn_fallback, world

require("sentence_transformers", "sentence_transformers", "sentence-transformers")
try:  # sentence-transformers >= 6: the losses live per model type
    from sentence_transformers.sentence_transformer import losses as _st_losses  # noqa: E402
except ImportError:  # pragma: no cover - older releases
    from sentence_transformers import losses as _st_losses  # noqa: E402
from sentence_transformers.base.losses.merged_forward import embed_columns  # noqa: E402
from sentence_transformers.util import batch_to_device, cos_sim, dot_score  # noqa: E402

__all__ = [
    "MultipleNegativesRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss",
]


def _normalizes(similarity_fct) -> bool | None:
    """True for cosine, False for dot product, None for a function that is not fused."""
    owner = getattr(similarity_fct, "__self__", None)
    if getattr(similarity_fct, "__name__", None) == "similarity" and \
            hasattr(owner, "similarity_fn_name"):
        from sentence_transformers.util.similarity import SimilarityFunction

        similarity_fct = SimilarityFunction.to_similarity_fn(owner.similarity_fn_name)
    if similarity_fct is cos_sim:
        return True
    if similarity_fct is dot_score:
        return False
    return None


def _gathered(local: list[torch.Tensor], gather: bool):
    """(every rank's rows of each tensor, this rank's offset); the local rows when not gathering
    or not distributed.  All tensors have this rank's batch size."""
    rank, size = world()
    if not gather or size == 1:
        return local, 0
    group = dist.group.WORLD
    (sizes,) = _row_counts(group, local[0].device, local[0].shape[0])
    return [all_gather_rows(t, group, sizes) for t in local], sum(sizes[:rank])


def _others(gathered: torch.Tensor, off: int, n: int) -> torch.Tensor:
    """The gathered rows of the other ranks (all but rows off .. off+n-1)."""
    return torch.cat([gathered[:off], gathered[off + n:]])


class _Lse:
    """Row log-sum-exps of ``scale · <x_i, y_j>`` on one backend."""

    def __init__(self, scale, backend):
        self.scale, self.backend = scale, backend

    def __call__(self, x, y, exclude_diagonal=False):
        return FL.pairwise_logsumexp(x, y, scale=self.scale, exclude_diagonal=exclude_diagonal,
                                     backend=self.backend)

    def without_own(self, x, own_blocks, others):
        """LSE of row i over ``own_blocks`` (this rank's b×b blocks: pair (i, i) excluded from
        each) and ``others`` (the other ranks' rows, none excluded)."""
        terms = [self(x, own, exclude_diagonal=True) for own in own_blocks]
        if others.shape[0] > 0:
            terms.append(self(x, others))
        return logsumexp_of(terms)


def mnrl_loss(queries, docs, *, scale, normalize, directions, partition_mode, gather, backend):
    """MultipleNegativesRankingLoss on embeddings (queries (b, D), docs: positives then hard
    negatives, each (b, D)), as the library computes it, without the score matrix."""
    if normalize:
        queries = F.normalize(queries, p=2, dim=-1)
        docs = [F.normalize(d, p=2, dim=-1) for d in docs]
    b = queries.shape[0]
    (q_all, *d_all), off = _gathered([queries, *docs], gather)
    lse = _Lse(scale, backend)
    pos_docs = docs[0]
    terms = {"query_to_doc": lse(queries, torch.cat(d_all))}
    if "query_to_query" in directions:
        terms["query_to_query"] = lse.without_own(queries, [queries], _others(q_all, off, b))
    if "doc_to_query" in directions:
        terms["doc_to_query"] = lse(pos_docs, q_all)
    if "doc_to_doc" in directions:  # all documents but those of the same query
        others = torch.cat([_others(d, off, b) for d in d_all])
        terms["doc_to_doc"] = lse.without_own(pos_docs, docs, others)
    positive = scale * (queries * pos_docs).sum(-1)
    if partition_mode == "joint":
        log_z = logsumexp_of([terms[k] for k in terms])
    else:
        log_z = sum(terms.values()) / len(terms)
    return (log_z - positive).mean()


class MultipleNegativesRankingLoss(_st_losses.MultipleNegativesRankingLoss):
    """The library's ``MultipleNegativesRankingLoss(model, scale=20.0, similarity_fct=cos_sim,
    gather_across_devices=False, directions=("query_to_doc",), partition_mode="joint",
    hardness_mode=None, hardness_strength=0.0)``, fused; plus ``fused_backend``."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 gather_across_devices: bool = False, directions=("query_to_doc",),
                 partition_mode="joint", hardness_mode=None, hardness_strength: float = 0.0,
                 *, fused_backend: str = "auto"):
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        self.fused_backend = fused_backend

    def fallback_reason(self) -> str | None:
        """Why this configuration runs the library's code, or None (fused)."""
        if _normalizes(self.similarity_fct) is None:
            return f"similarity_fct {getattr(self.similarity_fct, '__name__', '?')} is not " \
                   "fused (cos_sim and dot_score are)"
        if self.hardness_mode is not None and self.hardness_strength > 0.0:
            return f"hardness_mode={self.hardness_mode!r} is not fused"
        return None

    def compute_loss_from_embeddings(self, embeddings, labels):
        reason = self.fallback_reason()
        if reason is not None:
            warn_fallback(self, reason)
            return super().compute_loss_from_embeddings(embeddings, labels)
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        return mnrl_loss(embeddings[0], list(embeddings[1:]), scale=self.scale,
                         normalize=_normalizes(self.similarity_fct), directions=self.directions,
                         partition_mode=self.partition_mode, gather=self.gather_across_devices,
                         backend=self.fused_backend)


class CachedMultipleNegativesRankingLoss(_st_losses.CachedMultipleNegativesRankingLoss):
    """The library's ``CachedMultipleNegativesRankingLoss`` (GradCache), same arguments plus
    ``fused_backend``.  Its ``calculate_loss`` (the hook the GradCache mixin and MatryoshkaLoss
    call) computes the loss over the whole batch in one fused call: the library chunks the
    score matrix by ``mini_batch_size`` rows; here there is no score matrix to chunk."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None,
                 gather_across_devices: bool = False, directions=("query_to_doc",),
                 partition_mode="joint", show_progress_bar: bool = False, hardness_mode=None,
                 hardness_strength: float = 0.0, *, fused_backend: str = "auto"):
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, show_progress_bar=show_progress_bar,
                         hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        self.loss = MultipleNegativesRankingLoss(
            model, scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength, fused_backend=fused_backend)

    def calculate_loss(self, reps, labels=None, *, with_backward: bool = False):
        reason = self.loss.fallback_reason()
        if reason is not None:
            warn_fallback(self, reason)
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        embeddings = [torch.cat(column) for column in reps]
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """The library's (deprecated) symmetric MNRL: ``directions=("query_to_doc",
    "doc_to_query")``, ``partition_mode="per_direction"``."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 gather_across_devices: bool = False, *, fused_backend: str = "auto"):
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"),
                         partition_mode="per_direction", fused_backend=fused_backend)


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """The library's (deprecated) cached symmetric MNRL (see the class above)."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim,
                 mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None,
                 gather_across_devices: bool = False, show_progress_bar: bool = False,
                 *, fused_backend: str = "auto"):
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"),
                         partition_mode="per_direction", show_progress_bar=show_progress_bar,
                         fused_backend=fused_backend)


# --------------------------------------------------------------------------------------------
# GISTEmbedLoss: a softmax whose candidates are chosen, pair by pair, by a guide model


@dataclass(frozen=True)
class _GuideMask:
    """The kernel contract's mask (``kernels.PairMask``'s ``tile``), from guide embeddings:
    candidate (i, j) is dropped when ``<g_i, h_j> > threshold_i``, except column
    ``protect_i``.  No pair is a positive (the positive score is added by the caller)."""

    n_keys: int
    guide_q: torch.Tensor
    guide_k: torch.Tensor
    threshold: torch.Tensor
    protect: torch.Tensor | None = None

    def tile(self, rows, cols):
        sims = self.guide_q[rows] @ self.guide_k[cols].T
        drop = sims > self.threshold[rows, None]
        if self.protect is not None:
            drop &= cols[None, :] != self.protect[rows, None]
        return torch.zeros_like(drop), ~drop


class _GuidedLSE(torch.autograd.Function):
    """``LSE_{j kept} scale·<x_i, y_j>`` per row (−inf when nothing is kept), streamed."""

    @staticmethod
    def forward(ctx, kernels, mask, x, y, scale):
        lse = kernels.contrastive_fwd(x, y, scale, None, mask, False)[0]
        ctx.kernels, ctx.mask = kernels, mask
        ctx.save_for_backward(x, y, scale, lse)
        return lse

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, lse = ctx.saved_tensors
        kept = lse != float("-inf")
        grad = torch.where(kept, grad, torch.zeros_like(grad))
        dx, dy, dscale, _ = ctx.kernels.contrastive_bwd(
            x, y, scale, None, ctx.mask, torch.where(kept, lse, torch.zeros_like(lse)), grad,
            torch.zeros_like(grad), None, None, None)
        return None, None, dx.to(x.dtype), dy.to(y.dtype), dscale


_GUIDE_BLOCK_ELEMENTS = 1 << 22  # similarities per row block (16 MiB in fp32)


def _guided_lse(x, y, guide_q, guide_k, threshold, scale, protect=None):
    acc = acc_dtype(x.dtype)
    mask = _GuideMask(y.shape[0], guide_q.to(acc), guide_k.to(acc), threshold.to(acc), protect)
    kernels = TorchBlockKernels(block=max(1, _GUIDE_BLOCK_ELEMENTS // max(y.shape[0], 1)))
    scale_t = torch.tensor(scale, dtype=acc, device=x.device)
    return _GuidedLSE.apply(kernels, mask, x.contiguous(), y.contiguous(), scale_t)


class GISTEmbedLoss(_st_losses.GISTEmbedLoss):
    """The library's ``GISTEmbedLoss(model, guide, temperature=0.01, margin_strategy="absolute",
    margin=0.0, contrast_anchors=True, contrast_positives=True, gather_across_devices=False)``,
    streamed (see the module docstring); plus ``fused_backend`` (unused: the guide masks run on
    the torch streaming kernels, kept for a uniform signature)."""

    def __init__(self, model, guide, temperature: float = 0.01, margin_strategy="absolute",
                 margin: float = 0.0, contrast_anchors: bool = True,
                 contrast_positives: bool = True, gather_across_devices: bool = False,
                 *, fused_backend: str = "auto"):
        super().__init__(model, guide, temperature=temperature, margin_strategy=margin_strategy,
                         margin=margin, contrast_anchors=contrast_anchors,
                         contrast_positives=contrast_positives,
                         gather_across_devices=gather_across_devices)
        self.fused_backend = fused_backend

    def _guide_features(self, feature):
        """The guide's inputs for one column: the model's, or (different tokenizer) the text
        decoded and tokenized again by the guide."""
        if not self.must_retokenize:
            return dict(feature)
        ids = feature["input_ids"]
        if "cu_seq_lens_q" in feature:  # flattened batch: split it back into sequences
            bounds = feature["cu_seq_lens_q"].tolist()
            flat = ids[0].tolist()
            ids = [flat[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return batch_to_device(self.guide.preprocess(texts), self.guide.device)

    def forward(self, sentence_features, labels):
        features = list(sentence_features)
        guide_inputs = [dict(f) for f in features]  # before the model writes into the dicts
        embeddings = embed_columns(self.model, features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_inputs = [self._guide_features(f) for f in features]
            guides = embed_columns(self.guide, guide_inputs)
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        return self.compute_loss_from_embeddings(embeddings, guides)

    def compute_loss_from_embeddings(self, embeddings, guides):
        """The GIST loss of the model's embeddings (anchor, positive[, negative]) with the guide's
        embeddings of the same columns."""
        emb = [F.normalize(e, p=2, dim=-1) for e in embeddings]
        gde = [F.normalize(g, p=2, dim=-1) for g in guides]
        anchor, positive = emb[0], emb[1]
        g_anchor, g_positive = gde[0], gde[1]
        gathered, off = _gathered(emb[1:] + gde[1:], self.gather_across_devices)
        k = len(emb) - 1
        cand, g_cand = gathered[:k], gathered[k:]
        positive_all, g_positive_all = cand[0], g_cand[0]
        b = anchor.shape[0]
        guided_pos = (g_anchor * g_positive).sum(-1)  # the guide's cosine of each true pair
        if self.margin_strategy == "absolute":
            threshold = guided_pos - self.margin
        else:
            threshold = guided_pos - guided_pos.abs() * self.margin
        keys, g_keys = [positive_all], [g_positive_all]
        if self.contrast_anchors:
            keys.append(anchor)
            g_keys.append(g_anchor)
        if k == 2:
            keys.append(cand[1])
            g_keys.append(g_cand[1])
        scale = 1.0 / self.temperature
        protect = torch.arange(off, off + b, device=anchor.device)
        terms = [_guided_lse(anchor, torch.cat(keys), g_anchor, torch.cat(g_keys), threshold,
                             scale, protect)]
        if self.contrast_positives:
            terms.append(_guided_lse(positive, positive_all, g_positive, g_positive_all,
                                     threshold, scale))
        positive_score = scale * (anchor * positive).sum(-1)
        return (logsumexp_of(terms) - positive_score).mean()
