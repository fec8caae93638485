"""Public functional API (SPEC §1–§3; the Sinkhorn ops of §4 live in ``fused_losses.ot``).

Every function validates its arguments first (SPEC §6, ``_validation``), then applies what is
common to all backends (L2 normalization with its gradient, temperature → scale, reduction),
then dispatches the O(N·M) part to one backend (``_dispatch.resolve``).  Backends therefore
see canonical, already-checked arguments; see ``reference`` for the canonical signatures.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from . import _validation as V
from ._dispatch import resolve

Scalar = Union[float, torch.Tensor]

__all__ = [
    "pairwise_logsumexp",
    "pairwise_softmax_matmul",
    "similarity_topk",
    "info_nce",
    "clip_loss",
    "nt_xent",
    "sup_con",
    "siglip_loss",
    "multi_similarity",
]


# --------------------------------------------------------------------------------------------
# shared helpers


def _min_rows(process_group) -> int:
    # One rank's share of a distributed batch may be empty (the global batch may not).
    return 1 if process_group is None else 0


def _pair(x_name, x, y_name, y, process_group=None):
    V.check_features(x_name, x, min_rows=_min_rows(process_group))
    V.check_features(y_name, y, min_rows=_min_rows(process_group))
    V.check_same_dim(x_name, x, y_name, y)
    V.check_same_device(**{x_name: x, y_name: y})
    V.check_same_dtype(**{x_name: x, y_name: y})


def _normalize(t: torch.Tensor | None, normalize: bool) -> torch.Tensor | None:
    # Done here, once for every backend; O(N·D) and autograd carries its gradient.
    return F.normalize(t, dim=-1) if (normalize and t is not None) else t


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over valid anchors (0 when none is valid), sum, or the per-anchor vector."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1).to(loss.dtype)


def _scale_from(temperature: Scalar, logit_scale: Scalar | None, device) -> Scalar:
    """The logit multiplier: ``logit_scale`` if given (OpenCLIP convention), else 1/temperature.
    A tensor keeps its autograd graph, so gradients reach a learnable temperature/scale."""
    if logit_scale is not None:
        V.check_positive_scalar("logit_scale", logit_scale)
        V.check_scalar_device("logit_scale", logit_scale, device)
        return (
            logit_scale.reshape(()) if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
        )
    V.check_positive_scalar("temperature", temperature)
    V.check_scalar_device("temperature", temperature, device)
    if isinstance(temperature, torch.Tensor):
        return 1.0 / temperature.reshape(())
    return 1.0 / float(temperature)


def _as_device_scalar(v: Scalar, device) -> Scalar:
    if isinstance(v, torch.Tensor):
        return v.reshape(()).to(device)
    return v


# --------------------------------------------------------------------------------------------
# §1 primitives


@V.autocast_features("x", "y")
def pairwise_logsumexp(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: Scalar = 1.0,
    bias: torch.Tensor | None = None,
    exclude_diagonal: bool = False,
    dim: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Blockwise logsumexp of ``scale * x @ y.T + bias``.

    ``dim=1``: ``r_i = LSE_j(scale * <x_i, y_j> + bias_j)``, shape (N,), ``bias`` of shape (M,).
    ``dim=0``: ``c_j = LSE_i(scale * <x_i, y_j> + bias_i)``, shape (M,), ``bias`` of shape (N,).
    ``exclude_diagonal`` drops the pairs i == j (needs N == M); a line with nothing left gives -inf.
    Differentiable in x, y, scale (float or 0-dim tensor) and bias.  x: (N, D), y: (M, D).
    """
    _pair("x", x, "y", y)
    V.check_finite_scalar("scale", scale)
    V.check_bool("exclude_diagonal", exclude_diagonal)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1, got {dim!r}")
    if exclude_diagonal and x.shape[0] != y.shape[0]:
        raise ValueError(
            f"exclude_diagonal needs N == M, got x with {x.shape[0]} rows and y with {y.shape[0]}"
        )
    if dim == 0:  # column LSE of (x, y) is the row LSE of (y, x)
        x, y = y, x
    if bias is not None:
        V.check_weights("bias", bias, (y.shape[0],), x)
    impl = resolve("pairwise_logsumexp", backend, (x, y, bias))
    return impl(x, y, _as_device_scalar(scale, x.device), bias, exclude_diagonal)


@V.autocast_features("x", "y", "v")
def pairwise_softmax_matmul(
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Scalar = 1.0,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``out_i = Σ_j softmax_j(scale * <x_i, y_j> + bias_j) v_j``, shape (N, E), without forming
    the N×M weights.  x: (N, D), y: (M, D), v: (M, E), bias: (M,).  Differentiable in all."""
    _pair("x", x, "y", y)
    V.check_features("v", v)
    if v.shape[0] != y.shape[0]:
        raise ValueError(f"v must have one row per row of y ({y.shape[0]}), got {v.shape[0]}")
    V.check_same_device(x=x, v=v)
    V.check_finite_scalar("scale", scale)
    if bias is not None:
        V.check_weights("bias", bias, (y.shape[0],), x)
    impl = resolve("pairwise_softmax_matmul", backend, (x, y, v, bias))
    return impl(x, y, v, _as_device_scalar(scale, x.device), bias)


@V.autocast_features("x", "y")
def similarity_topk(
    x: torch.Tensor,
    y: torch.Tensor,
    k: int,
    *,
    exclude_diagonal: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest ``<x_i, y_j>`` per row: ``(values (N, k), indices (N, k) int64)``, in
    descending order, ties to the smaller index.  ``exclude_diagonal`` skips j == i (N == M).
    Values are differentiable in x and y; indices are not."""
    _pair("x", x, "y", y)
    V.check_bool("exclude_diagonal", exclude_diagonal)
    if exclude_diagonal and x.shape[0] != y.shape[0]:
        raise ValueError(
            f"exclude_diagonal needs N == M, got x with {x.shape[0]} rows and y with {y.shape[0]}"
        )
    V.check_int("k", k, 1, y.shape[0] - (1 if exclude_diagonal else 0))
    impl = resolve("similarity_topk", backend, (x, y))
    return impl(x, y, k, exclude_diagonal)


# --------------------------------------------------------------------------------------------
# §2 InfoNCE family


@V.autocast_features("query", "key", "extra_negatives")
def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: Scalar = 0.07,
    logit_scale: Scalar | None = None,
    labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    symmetric: bool = False,
    decoupled: bool = False,
    extra_negatives: torch.Tensor | None = None,
    exclude_diagonal: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """InfoNCE / CLIP / SupCon / DCL loss, computed blockwise on the fused backends.

    query: (N, D) anchors; key: (M, D).  ``z_ij = <q_i, k_j> / temperature`` (or
    ``* logit_scale`` when given: it overrides ``temperature``).  Positives P(i): key i (without
    labels; needs M >= N) or every key with ``key_labels[j] == labels[i]`` (``key_labels``
    defaults to ``labels``, then M == N).  Candidates C(i): every key (minus i itself with
    ``exclude_diagonal``, which needs labels and M == N) plus every row of ``extra_negatives``
    (Q, D); ``decoupled`` (DCL) removes P(i) from C(i).

    ``loss_i = LSE_{j∈C(i)} z_ij − mean_{p∈P(i)} z_ip``.  An anchor with no positive (or, with
    ``decoupled``, no candidate left) has loss 0 and is left out of the mean; the mean over no
    valid anchor is 0.  ``symmetric``: (row loss + column loss)/2, the column loss taking keys as
    anchors over the queries (extra negatives play no part in it); with ``reduction="none"`` it
    needs N == M.  Returns fp32 for fp16/bf16/fp32 inputs, fp64 for fp64.
    """
    _pair("query", query, "key", key, process_group)
    n, m = query.shape[0], key.shape[0]
    for name, flag in (
        ("symmetric", symmetric),
        ("decoupled", decoupled),
        ("exclude_diagonal", exclude_diagonal),
        ("normalize", normalize),
    ):
        V.check_bool(name, flag)
    V.check_reduction(reduction)
    scale = _scale_from(temperature, logit_scale, query.device)
    if labels is None:
        if key_labels is not None:
            raise ValueError("key_labels was given without labels; pass labels for the queries too")
        if m < n and process_group is None:  # distributed: checked on the global counts
            raise ValueError(
                f"without labels the positive of query i is key i, so key needs at least as many "
                f"rows as query: got N={n}, M={m}"
            )
        if exclude_diagonal:
            raise ValueError(
                "exclude_diagonal without labels would exclude every anchor's only positive; "
                "pass labels (as nt_xent/sup_con do)"
            )
    else:
        V.check_labels("labels", labels, n, query.device)
        if key_labels is None:
            if m != n:
                raise ValueError(
                    f"key_labels defaults to labels, which needs N == M; got N={n}, M={m}: "
                    "pass key_labels"
                )
            key_labels = labels
        else:
            V.check_labels("key_labels", key_labels, m, query.device)
    if exclude_diagonal and n != m:
        raise ValueError(f"exclude_diagonal needs N == M, got N={n}, M={m}")
    if extra_negatives is not None:
        V.check_features("extra_negatives", extra_negatives)
        V.check_same_dim("query", query, "extra_negatives", extra_negatives)
        V.check_same_device(query=query, extra_negatives=extra_negatives)
        V.check_same_dtype(query=query, extra_negatives=extra_negatives)
    if symmetric and reduction == "none" and n != m:
        raise ValueError(f"symmetric with reduction='none' needs N == M, got N={n}, M={m}")

    query, key = _normalize(query, normalize), _normalize(key, normalize)
    extra_negatives = _normalize(extra_negatives, normalize)
    scale = _as_device_scalar(scale, query.device)
    if process_group is not None:
        from .distributed import distributed_info_nce

        return distributed_info_nce(
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
        )
    impl = resolve("info_nce", backend, (query, key, extra_negatives))
    row_loss, row_valid, col_loss, col_valid = impl(
        query,
        key,
        scale,
        labels,
        key_labels,
        symmetric,
        decoupled,
        extra_negatives,
        exclude_diagonal,
        0,
    )
    if not symmetric:
        return _reduce(row_loss, row_valid, reduction)
    if reduction == "none":
        return (row_loss + col_loss) / 2
    return (_reduce(row_loss, row_valid, reduction) + _reduce(col_loss, col_valid, reduction)) / 2


@V.autocast_features("image_features", "text_features")
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Symmetric CLIP loss: ``info_nce(image, text, logit_scale=logit_scale, symmetric=True)``.
    ``logit_scale`` is the exponentiated scale (OpenCLIP's ``logit_scale.exp()``), a float or a
    0-dim tensor that receives a gradient.  image/text: (N, D)."""
    # checked here too, so that the errors name this function's arguments; logit_scale=None
    # would make info_nce fall back to its default temperature
    _pair("image_features", image_features, "text_features", text_features, process_group)
    V.check_positive_scalar("logit_scale", logit_scale)
    if text_features.shape[0] < image_features.shape[0] and process_group is None:
        raise ValueError(
            f"text_features needs at least as many rows as image_features (the positive of "
            f"image i is text i): got {image_features.shape[0]} and {text_features.shape[0]}"
        )
    return info_nce(
        image_features,
        text_features,
        logit_scale=logit_scale,
        symmetric=True,
        normalize=normalize,
        reduction=reduction,
        backend=backend,
        process_group=process_group,
    )


def _two_view_labels(n: int, device) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    return torch.cat([idx, idx])


@V.autocast_features("z1", "z2")
def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: Scalar = 0.5,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """SimCLR NT-Xent over two views z1, z2 (N, D): ``Z = [z1; z2]``, self excluded, the positive
    of each row its other view.  ``reduction="none"`` gives the 2N per-row losses."""
    _pair("z1", z1, "z2", z2, process_group)
    if z1.shape[0] != z2.shape[0]:
        raise ValueError(
            f"z1 and z2 must have the same number of rows, got {z1.shape[0]} and {z2.shape[0]}"
        )
    z = torch.cat([z1, z2], dim=0)
    labels = _two_view_labels(z1.shape[0], z1.device)
    if process_group is not None:
        # Pair labels must be unique across the global batch: shift each rank's 0..n-1 into its
        # own range (int64 labels; 2**40 rows per rank is far beyond any batch).
        from .distributed import group_rank

        labels = labels + group_rank(process_group) * (1 << 40)
    return info_nce(
        z,
        z,
        temperature=temperature,
        labels=labels,
        exclude_diagonal=True,
        normalize=normalize,
        reduction=reduction,
        backend=backend,
        process_group=process_group,
    )


@V.autocast_features("features")
def sup_con(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: Scalar = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.): ``info_nce(F, F, labels=labels,
    exclude_diagonal=True)``.  features: (N, D), labels: (N,) integers.  Anchors without a
    positive are left out of the mean, as pytorch-metric-learning's SupConLoss does."""
    V.check_features("features", features, min_rows=_min_rows(process_group))
    return info_nce(
        features,
        features,
        temperature=temperature,
        labels=labels,
        exclude_diagonal=True,
        normalize=normalize,
        reduction=reduction,
        backend=backend,
        process_group=process_group,
    )


@V.autocast_features("image_features", "text_features")
def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar,
    *,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """SigLIP: ``−(1/N) Σ_ij log σ(σ_ij (logit_scale·s_ij + logit_bias))``, σ_ij = +1 on the
    diagonal and −1 elsewhere.  ``"mean"`` divides by N (OpenCLIP's SigLipLoss), ``"sum"`` does
    not, ``"none"`` gives the per-image sums over texts.  Gradients reach scale and bias."""
    _pair("image_features", image_features, "text_features", text_features, process_group)
    V.check_bool("normalize", normalize)
    V.check_reduction(reduction)
    V.check_positive_scalar("logit_scale", logit_scale)
    V.check_finite_scalar("logit_bias", logit_bias)
    dev = image_features.device
    V.check_scalar_device("logit_scale", logit_scale, dev)
    V.check_scalar_device("logit_bias", logit_bias, dev)
    x, y = _normalize(image_features, normalize), _normalize(text_features, normalize)
    scale, bias = _as_device_scalar(logit_scale, dev), _as_device_scalar(logit_bias, dev)
    if process_group is not None:
        from .distributed import distributed_siglip

        return distributed_siglip(x, y, scale, bias, reduction, backend, process_group)
    impl = resolve("siglip", backend, (x, y))
    per_row = impl(x, y, scale, bias, 0)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / x.shape[0]


# --------------------------------------------------------------------------------------------
# §3 multi-similarity


@V.autocast_features("embeddings", "ref_embeddings")
def multi_similarity(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float | None = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Multi-similarity loss (Wang et al., CVPR 2019) with its mining rule.

    embeddings: (N, D), labels: (N,); references default to the embeddings themselves (then the
    pairs i == j are dropped).  Mining (off with ``epsilon=None``): keep positive p of anchor i
    if ``s_ip − ε < max_n s_in``, negative n if ``s_in + ε > min_p s_ip``.
    ``loss_i = (1/α) log(1 + Σ_p exp(−α(s_ip − base))) + (1/β) log(1 + Σ_n exp(β(s_in − base)))``;
    ``"mean"`` averages over all N anchors.  Mining thresholds carry no gradient.
    """
    V.check_features("embeddings", embeddings, min_rows=_min_rows(process_group))
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    exclude_self = ref_embeddings is None
    if not exclude_self:  # the features first: a device mismatch is theirs, not the labels'
        _pair("embeddings", embeddings, "ref_embeddings", ref_embeddings, process_group)
    V.check_labels("labels", labels, embeddings.shape[0], embeddings.device)
    if exclude_self:
        ref_embeddings, ref_labels = embeddings, labels
    else:
        V.check_labels("ref_labels", ref_labels, ref_embeddings.shape[0], embeddings.device)
    V.check_positive_scalar("alpha", alpha)
    V.check_positive_scalar("beta", beta)
    V.check_finite_scalar("base", base)
    if epsilon is not None:
        V.check_positive_scalar("epsilon", epsilon, allow_zero=True)
    for name, v in (("alpha", alpha), ("beta", beta), ("base", base), ("epsilon", epsilon)):
        if isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a Python number for multi_similarity")
    V.check_bool("normalize", normalize)
    V.check_reduction(reduction)
    emb = _normalize(embeddings, normalize)
    ref = emb if exclude_self else _normalize(ref_embeddings, normalize)
    eps = None if epsilon is None else float(epsilon)
    if process_group is not None:
        from .distributed import distributed_multi_similarity

        return distributed_multi_similarity(
            emb,
            labels,
            None if exclude_self else ref,
            None if exclude_self else ref_labels,
            float(alpha),
            float(beta),
            float(base),
            eps,
            reduction,
            backend,
            process_group,
        )
    impl = resolve("multi_similarity", backend, (emb, ref))
    loss = impl(
        emb, labels, ref, ref_labels, float(alpha), float(beta), float(base), eps, exclude_self, 0
    )
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
