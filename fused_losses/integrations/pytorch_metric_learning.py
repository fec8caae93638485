"""Drop-in pytorch-metric-learning losses: ``MultiSimilarityLoss``, ``NTXentLoss``,
``SupConLoss`` and ``MultiSimilarityMiner``, computed by this package's fused ops.

Each class subclasses pml's own (``BaseMetricLossFunction`` / ``BaseMiner``) under the same
name, so ``forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``,
reducers, embedding regularizers, ``CrossBatchMemory``, ``SelfSupervisedLoss`` and
``DistributedLossWrapper`` work as with pml: ``compute_loss`` returns pml's loss dictionary of
per-element losses with their indices (per anchor for MultiSimilarity/SupCon, per positive pair
for NTXent), so every reducer applies.

Fused (no N×M matrix): ``labels`` given, ``indices_tuple=None`` (or, for MultiSimilarityLoss,
the pairs of this module's ``MultiSimilarityMiner`` on the same embeddings), distance
``CosineSimilarity()`` or ``DotProductSimilarity()`` (power 1).  Anything else (another distance,
mined pairs from another miner, ``CrossBatchMemory``'s and ``DistributedLossWrapper(efficient=
True)``'s pair lists) runs pml's own code, with a one-line warning.

Semantics kept from pml: self-pairs are dropped when ``ref_labels is labels`` (an identity
check, as pml does); the losses are zero when pml's are (no positive or no negative pair).
Differences (documented, measured in tests/test_integrations_pml.py): NTXentLoss's value for a
hopeless pair (probability below ~1e-38 in fp32) is the exact ``softplus`` where pml stops at
``-log(tiny)``; ``MultiSimilarityMiner`` returns the same pairs as pml's but ordered by
(anchor, index) instead of by similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as FL
from ..kernels import TorchBlockKernels, acc_dtype
from ._common import require, warn_fallback

_pml = require("pytorch_metric_learning", "pml", "pytorch-metric-learning")
from pytorch_metric_learning import losses as _losses  # noqa: E402
from pytorch_metric_learning import miners as _miners  # noqa: E402
from pytorch_metric_learning.distances import DotProductSimilarity  # noqa: E402
from pytorch_metric_learning.utils import common_functions as _c_f  # noqa: E402

__all__ = ["MultiSimilarityLoss", "NTXentLoss", "SupConLoss", "MultiSimilarityMiner"]

_MINE_BLOCK_ELEMENTS = 1 << 22  # similarities per row block of the miner (16 MiB in fp32)


# --------------------------------------------------------------------------------------------
# label bookkeeping in O(N + M) (pml builds N×M match/diff matrices for it)


def _codes(labels, ref_labels):
    """int64 codes with equal codes for equal labels, across both sides (any label dtype)."""
    if ref_labels is labels:
        codes = torch.unique(labels, return_inverse=True)[1].reshape(-1)
        return codes, codes
    both = torch.cat([labels.reshape(-1), ref_labels.reshape(-1).to(labels.dtype)])
    codes = torch.unique(both, return_inverse=True)[1]
    return codes[: labels.numel()], codes[labels.numel():]


def _positive_pairs(codes, ref_codes, exclude_self):
    """All pairs (a, p) with equal codes, in pml's (row-major) order, and each anchor's number
    of same-code references (self included).  Memory O(#pairs), not O(N·M)."""
    order = torch.argsort(ref_codes, stable=True)
    sorted_codes = ref_codes[order]
    lo = torch.searchsorted(sorted_codes, codes)
    same = torch.searchsorted(sorted_codes, codes, right=True) - lo
    anchors = torch.repeat_interleave(torch.arange(codes.numel(), device=codes.device), same)
    first = torch.cumsum(same, 0) - same
    within = torch.arange(anchors.numel(), device=codes.device) - first[anchors]
    pos = order[lo[anchors] + within]
    if exclude_self:
        keep = pos != anchors
        anchors, pos = anchors[keep], pos[keep]
    return anchors, pos, same


def _pair_counts(codes, ref_codes, exclude_self):
    """(number of positive pairs, number of negative pairs), as pml's get_all_pairs_indices."""
    sorted_codes = torch.sort(ref_codes).values
    same = (torch.searchsorted(sorted_codes, codes, right=True)
            - torch.searchsorted(sorted_codes, codes))
    n_same = int(same.sum())
    n_neg = codes.numel() * ref_codes.numel() - n_same
    return n_same - (codes.numel() if exclude_self else 0), n_neg


def _distance_reason(distance) -> str | None:
    """Why pml's distance is not one the fused ops compute, or None (then normalize or not)."""
    if not isinstance(distance, DotProductSimilarity):
        return f"distance {type(distance).__name__} is not fused (only CosineSimilarity and " \
               "DotProductSimilarity are)"
    if distance.power != 1:
        return f"distance power {distance.power} is not fused (only power=1)"
    if distance.normalize_embeddings and distance.p != 2:
        return f"embeddings normalized with p={distance.p} are not fused (only p=2)"
    return None


class _Fused:
    """What the three losses share: when to fuse, and the prepared (normalized) inputs."""

    def _fused_inputs(self, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                      allow_indices=False):
        """(x, r, codes, ref_codes, exclude_self), or a string: why pml's own code runs."""
        reason = _distance_reason(self.distance)
        if reason is not None:
            return reason
        if labels is None:
            return "no labels (an indices_tuple alone is not fused)"
        if indices_tuple is not None and not allow_indices:
            return "an explicit indices_tuple (mined or wrapper pairs) is not fused"
        exclude_self = ref_labels is labels
        if exclude_self and ref_emb is not embeddings:
            return "ref_labels is labels but ref_emb is another tensor"
        x = F.normalize(embeddings, p=2, dim=1) if self.distance.normalize_embeddings \
            else embeddings
        r = x if ref_emb is embeddings else (
            F.normalize(ref_emb, p=2, dim=1) if self.distance.normalize_embeddings else ref_emb)
        codes, ref_codes = _codes(labels, ref_labels)
        return x, r, codes, ref_codes, exclude_self

    def _run(self, compute, embeddings, labels, indices_tuple, ref_emb, ref_labels, **kw):
        prepared = self._fused_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                      **kw)
        if isinstance(prepared, str):
            warn_fallback(self, prepared)
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        x, r, codes, ref_codes, exclude_self = prepared
        n_pos, n_neg = _pair_counts(codes, ref_codes, exclude_self)
        if n_pos <= 1 and n_neg <= 1:  # GenericPairLoss: no pairs to speak of
            return self.zero_losses()
        return compute(x, r, codes, ref_codes, exclude_self, n_pos, n_neg)

    def _info_nce(self, x, r, codes, ref_codes, exclude_self, decoupled=False):
        """Per-anchor InfoNCE with pml's positives (same label; self dropped when
        ``exclude_self``) at this loss's temperature."""
        return FL.info_nce(
            x, x if exclude_self else r, temperature=self.temperature, labels=codes,
            key_labels=None if exclude_self else ref_codes, exclude_diagonal=exclude_self,
            decoupled=decoupled, normalize=False, reduction="none", backend=self.fused_backend)

    @staticmethod
    def _element(losses):
        return {"loss": {"losses": losses, "indices": _c_f.torch_arange_from_size(losses),
                         "reduction_type": "element"}}


class MultiSimilarityLoss(_Fused, _losses.MultiSimilarityLoss):
    """pml's ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5, **kwargs)``, fused.  With the
    pairs of :class:`MultiSimilarityMiner` (same embeddings) it runs the mined loss in one fused
    op (``multi_similarity(..., epsilon=miner.epsilon)``)."""

    def __init__(self, alpha=2, beta=50, base=0.5, *, fused_backend="auto", **kwargs):
        super().__init__(alpha=alpha, beta=beta, base=base, **kwargs)
        self.fused_backend = fused_backend

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        mined = getattr(indices_tuple, "fused_ms_mining", None)
        epsilon = None
        if indices_tuple is not None:
            same_input = (mined is not None and mined["embeddings"] is embeddings
                          and mined["ref_emb"] is ref_emb and mined["labels"] is labels
                          and mined["ref_labels"] is ref_labels
                          and mined["normalize"] == self.distance.normalize_embeddings)
            if not same_input:
                warn_fallback(self, "an indices_tuple not mined by this module's "
                                    "MultiSimilarityMiner on these embeddings is not fused")
                return super().compute_loss(embeddings, labels, indices_tuple, ref_emb,
                                            ref_labels)
            if all(len(t) <= 1 for t in indices_tuple):
                return self.zero_losses()
            epsilon = mined["epsilon"]

        def compute(x, r, codes, ref_codes, exclude_self, n_pos, n_neg):
            losses = FL.multi_similarity(
                x, codes, ref_embeddings=None if exclude_self else r,
                ref_labels=None if exclude_self else ref_codes, alpha=float(self.alpha),
                beta=float(self.beta), base=float(self.base), epsilon=epsilon, normalize=False,
                reduction="none", backend=self.fused_backend)
            return self._element(losses.to(x.dtype))

        return self._run(compute, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                         allow_indices=True)


class SupConLoss(_Fused, _losses.SupConLoss):
    """pml's ``SupConLoss(temperature=0.1, **kwargs)``, fused (``info_nce`` with labels)."""

    def __init__(self, temperature=0.1, *, fused_backend="auto", **kwargs):
        super().__init__(temperature=temperature, **kwargs)
        self.fused_backend = fused_backend

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        def compute(x, r, codes, ref_codes, exclude_self, n_pos, n_neg):
            if n_pos == 0 or n_neg == 0:
                return self.zero_losses()
            return self._element(self._info_nce(x, r, codes, ref_codes, exclude_self)
                                 .to(x.dtype))

        return self._run(compute, embeddings, labels, indices_tuple, ref_emb, ref_labels)


class NTXentLoss(_Fused, _losses.NTXentLoss):
    """pml's ``NTXentLoss(temperature=0.07, **kwargs)``, fused.  One loss per positive pair
    (a, p): ``−log(e^{z_ap} / (e^{z_ap} + Σ_{n ∈ negatives(a)} e^{z_an}))``, the negatives'
    log-sum-exp streamed (``info_nce(..., decoupled=True)``), the positive pairs listed in
    O(#pairs) memory (pml lists every negative pair too, and builds a #pos × #neg matrix)."""

    def __init__(self, temperature=0.07, *, fused_backend="auto", **kwargs):
        super().__init__(temperature=temperature, **kwargs)
        self.fused_backend = fused_backend

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        def compute(x, r, codes, ref_codes, exclude_self, n_pos, n_neg):
            if n_pos == 0 or n_neg == 0:
                return self.zero_losses()
            a1, p, same = _positive_pairs(codes, ref_codes, exclude_self)
            # loss_a = LSE_{negatives} z − mean_{positives} z (DCL's candidates: no positives)
            out = self._info_nce(x, r, codes, ref_codes, exclude_self, decoupled=True)
            acc = out.dtype
            z = (x[a1].to(acc) * r[p].to(acc)).sum(1) / self.temperature
            n_pos_a = same - (1 if exclude_self else 0)
            mean_pos = torch.zeros_like(out).index_add(0, a1, z) / n_pos_a.clamp_min(1).to(acc)
            neg_lse = out + mean_pos
            no_negative = (same == r.shape[0])
            neg_lse = torch.where(no_negative, torch.full_like(neg_lse, float("-inf")), neg_lse)
            losses = torch.logaddexp(neg_lse[a1] - z, torch.zeros_like(z))
            return {"loss": {"losses": losses.to(x.dtype), "indices": (a1, p),
                             "reduction_type": "pos_pair"}}

        return self._run(compute, embeddings, labels, indices_tuple, ref_emb, ref_labels)


class _MinedPairs(tuple):
    """pml's (a1, p, a2, n), remembering the mining rule and its inputs, so that this module's
    MultiSimilarityLoss can run the mined loss fused instead of reading the pair lists."""

    fused_ms_mining: dict | None = None


class MultiSimilarityMiner(_miners.MultiSimilarityMiner):
    """pml's ``MultiSimilarityMiner(epsilon=0.1, **kwargs)``: the same pairs, mined over row
    blocks (O(block·M) memory; pml sorts two N×M matrices), ordered by (anchor, index)."""

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        reason = _distance_reason(self.distance)
        if reason is None and ref_labels is labels and ref_emb is not embeddings:
            reason = "ref_labels is labels but ref_emb is another tensor"
        if reason is not None:
            warn_fallback(self, reason)
            return super().mine(embeddings, labels, ref_emb, ref_labels)
        normalize = self.distance.normalize_embeddings
        x = F.normalize(embeddings, p=2, dim=1) if normalize else embeddings
        exclude_diag = embeddings is ref_emb
        r = x if exclude_diag else (F.normalize(ref_emb, p=2, dim=1) if normalize else ref_emb)
        codes, ref_codes = _codes(labels, ref_labels)
        n_pos, n_neg = _pair_counts(codes, ref_codes, ref_labels is labels)
        # Two passes over the row blocks: count the kept pairs, then write them into lists of
        # exactly that size (the lists are the miner's output, O(#pairs): on untrained
        # embeddings nearly every negative pair is "hard").
        found = [torch.empty(0, dtype=torch.long, device=labels.device) for _ in range(4)]
        if n_pos > 0 and n_neg > 0:
            m = r.shape[0]
            spec = TorchBlockKernels(block=max(1, _MINE_BLOCK_ELEMENTS // max(m, 1)))
            eps = float(self.epsilon)
            min_pos, max_neg = spec.ms_mine(x, r, codes, ref_codes, 0, exclude_diag)
            cols = torch.arange(m, device=x.device)
            acc = acc_dtype(x.dtype)

            def kept_blocks():
                for a, b, rows in spec._blocks(x.shape[0], x.device):
                    s = x[a:b].to(acc) @ r.to(acc).T
                    yield a, spec._ms_kept(s, a, b, rows, cols, codes, ref_codes, 0,
                                           exclude_diag, eps, min_pos, max_neg)

            sizes = [0, 0]
            for _, kept in kept_blocks():
                sizes[0] += int(kept[0].sum())
                sizes[1] += int(kept[1].sum())
            found = [torch.empty(sizes[k // 2], dtype=torch.long, device=labels.device)
                     for k in range(4)]
            at = [0, 0]
            for a, kept in kept_blocks():
                for k in (0, 1):
                    i, j = kept[k].nonzero(as_tuple=True)
                    found[2 * k][at[k]:at[k] + len(i)] = i + a
                    found[2 * k + 1][at[k]:at[k] + len(i)] = j
                    at[k] += len(i)
        out = _MinedPairs(found)
        out.fused_ms_mining = dict(epsilon=float(self.epsilon), embeddings=embeddings,
                                   ref_emb=ref_emb, labels=labels, ref_labels=ref_labels,
                                   normalize=normalize)
        return out
