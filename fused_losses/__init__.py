"""fused-losses: blockwise pairwise losses (InfoNCE/CLIP/SupCon/SigLIP, multi-similarity,
Sinkhorn OT) that never materialize the N×M similarity matrix on the fused backends.

Every op takes ``backend="auto" | "reference" | "triton" | "cuda" | "cpu"``; see
``available_backends()`` for what this installation can run.
"""

from . import backends as _backends  # noqa: F401  (registers every backend)
from ._dispatch import available_backends, get_backend, registered_backends
from .functional import (
    clip_loss,
    hard_negative_info_nce,
    hard_negative_nt_xent,
    info_nce,
    mochi_info_nce,
    multi_similarity,
    nt_xent,
    pairwise_logsumexp,
    pairwise_softmax_matmul,
    siglip_loss,
    similarity_topk,
    sup_con,
)
from .modules import (
    ClipLoss,
    HardNegativeInfoNCELoss,
    HardNegativeNTXentLoss,
    InfoNCELoss,
    MoCHiLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    SigLipLoss,
    SinkhornLoss,
    SupConLoss,
    SwAVLoss,
)
from .ot import sinkhorn, sinkhorn_knopp, sinkhorn_potentials, transport_apply
from .swav import swav_loss

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "get_backend",
    "registered_backends",
    "pairwise_logsumexp",
    "pairwise_softmax_matmul",
    "similarity_topk",
    "info_nce",
    "clip_loss",
    "nt_xent",
    "sup_con",
    "hard_negative_info_nce",
    "hard_negative_nt_xent",
    "mochi_info_nce",
    "siglip_loss",
    "multi_similarity",
    "sinkhorn",
    "sinkhorn_potentials",
    "transport_apply",
    "sinkhorn_knopp",
    "swav_loss",
    "InfoNCELoss",
    "HardNegativeInfoNCELoss",
    "HardNegativeNTXentLoss",
    "MoCHiLoss",
    "ClipLoss",
    "NTXentLoss",
    "SupConLoss",
    "SigLipLoss",
    "MultiSimilarityLoss",
    "SinkhornLoss",
    "SwAVLoss",
]
