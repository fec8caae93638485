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
from .kernels import acc_dtype

Scalar = Union[float, torch.Tensor]

__all__ = [
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


def _anchor_scale(temperature, logit_scale, n: int, device):
    """(scalar scale or None, per-anchor scale vector (n,) or None): ``logit_scale`` if given
    (OpenCLIP convention), else 1/temperature; either may be a float, a 0-dim tensor, or one
    value per anchor (a 1-D tensor of shape (N,)).  Tensors keep their autograd graph."""
    name, value = ("temperature", temperature) if logit_scale is None else \
        ("logit_scale", logit_scale)
    if V.check_positive_per_anchor(name, value, n, device):
        return None, (value if logit_scale is not None else 1.0 / value)
    return _as_device_scalar(_scale_from(temperature, logit_scale, device), device), None


def _weighted(loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return loss if weight is None else loss * weight.to(loss.dtype)


def _check_pairs(query, key, labels, key_labels, exclude_diagonal, extra_negatives,
                 process_group):
    """The InfoNCE family's checks of labels, exclusions and extra negatives; returns
    ``key_labels`` (defaulted to ``labels``)."""
    n, m = query.shape[0], key.shape[0]
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
    return key_labels


@V.autocast_features("query", "key", "extra_negatives", "anchor_negatives")
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
    anchor_negatives: torch.Tensor | None = None,
    exclude_diagonal: bool = False,
    weight: torch.Tensor | None = None,
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
    (Q, D) and of the anchor's own ``anchor_negatives[i]`` ((N, E, D): per-anchor negatives,
    e.g. mined hard negatives per query; O(N·E·D), their logits join the fused row LSE, no kernel
    sees them); ``decoupled`` (DCL) removes P(i) from C(i).

    ``loss_i = LSE_{j∈C(i)} z_ij − mean_{p∈P(i)} z_ip``.  An anchor with no positive (or, with
    ``decoupled``, no candidate left) has loss 0 and is left out of the mean; the mean over no
    valid anchor is 0.  ``symmetric``: (row loss + column loss)/2, the column loss taking keys as
    anchors over the queries (extra and anchor negatives play no part in it); with
    ``reduction="none"`` it needs N == M.  Returns fp32 for fp16/bf16/fp32 inputs, fp64 for fp64.

    Per-anchor temperature: ``temperature`` (or ``logit_scale``) may be a tensor of shape (N,),
    learnable: anchor i's logits are ``<q_i, k_j> / t_i`` (computed as the query row scaled by
    1/t_i, so the gradient reaches t through autograd).  With ``symmetric=True`` it needs N == M
    and each anchor uses its own pair's temperature: query i over the keys with t_i, key j over
    the queries with t_j.  ``weight`` (N,): a non-negative per-anchor rescaling of the loss, as
    torch's ``binary_cross_entropy(weight=)`` does per element: ``"none"`` gives w_i·loss_i,
    ``"sum"`` Σ w_i·loss_i, ``"mean"`` Σ w_i·loss_i / (number of valid anchors) — the
    denominator is not Σ w (divide by it yourself for a normalized weighted mean).  With
    ``symmetric`` it needs N == M: pair i's weight applies to both of its anchors.
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
    scale, anchor_scale = _anchor_scale(temperature, logit_scale, n, query.device)
    key_labels = _check_pairs(query, key, labels, key_labels, exclude_diagonal, extra_negatives,
                              process_group)
    if anchor_negatives is not None:
        V.check_features("anchor_negatives", anchor_negatives, ndim=3)
        if anchor_negatives.shape[0] != n:
            raise ValueError(f"anchor_negatives must have one set per query row ({n}), got shape "
                             f"{tuple(anchor_negatives.shape)}")
        V.check_same_dim("query", query, "anchor_negatives", anchor_negatives)
        V.check_same_device(query=query, anchor_negatives=anchor_negatives)
        V.check_same_dtype(query=query, anchor_negatives=anchor_negatives)
    if weight is not None:
        V.check_anchor_weight("weight", weight, n, query)
    if symmetric and n != m and (reduction == "none" or weight is not None
                                 or anchor_scale is not None) and process_group is None:
        what = "reduction='none'" if reduction == "none" else (
            "weight" if weight is not None else "a per-anchor temperature")
        raise ValueError(f"symmetric with {what} needs N == M (pairs), got N={n}, M={m}")

    query, key = _normalize(query, normalize), _normalize(key, normalize)
    extra_negatives = _normalize(extra_negatives, normalize)
    anchor_negatives = _normalize(anchor_negatives, normalize)
    if process_group is not None:
        from .distributed import distributed_info_nce

        return distributed_info_nce(
            query,
            key,
            scale if anchor_scale is None else anchor_scale,
            labels,
            key_labels,
            symmetric,
            decoupled,
            extra_negatives,
            exclude_diagonal,
            reduction,
            backend,
            process_group,
            weight=weight,
            anchor_negatives=anchor_negatives,
        )
    impl = resolve("info_nce", backend, (query, key, extra_negatives, anchor_negatives))
    return _info_nce_local(impl, query, key, scale, anchor_scale, labels, key_labels, symmetric,
                           decoupled, extra_negatives, anchor_negatives, exclude_diagonal,
                           weight, reduction, 0, 0)


def anchor_logits(query: torch.Tensor, anchor_negatives: torch.Tensor | None, scale):
    """(N, E) logits of each query row against its own negatives, ``scale`` times the dot
    products (O(N·E·D), differentiable)."""
    if anchor_negatives is None:
        return None
    dots = torch.einsum("nd,ned->ne", query, anchor_negatives.to(query.dtype))
    return dots if scale is None else dots * scale


def _info_nce_local(impl, query, key, scale, anchor_scale, labels, key_labels, symmetric,
                    decoupled, extra_negatives, anchor_negatives, exclude_diagonal, weight,
                    reduction, q_off, k_off):
    """One process's InfoNCE given an implementation of the op: a scalar ``scale`` runs the op
    once (row and column losses from one sweep); a per-anchor ``anchor_scale`` (n,) scales the
    anchor rows, query rows for the row loss and, for symmetric, key rows for the column loss
    (two directional calls: each anchor keeps its own temperature)."""
    if anchor_scale is None:
        logits = anchor_logits(query, anchor_negatives, scale)
        row_loss, row_valid, col_loss, col_valid = impl(
            query, key, scale, labels, key_labels, symmetric, decoupled, extra_negatives,
            exclude_diagonal, q_off, logits)
    else:
        s = anchor_scale.to(query.dtype)[:, None]
        rows = query * s
        row_loss, row_valid, _, _ = impl(
            rows, key, 1.0, labels, key_labels, False, decoupled, extra_negatives,
            exclude_diagonal, q_off, anchor_logits(rows, anchor_negatives, None))
        col_loss = col_valid = None
        if symmetric:
            col_loss, col_valid, _, _ = impl(
                key * s, query, 1.0, key_labels, labels, False, decoupled, None,
                exclude_diagonal, k_off, None)
    row_loss = _weighted(row_loss, weight)
    if symmetric:
        col_loss = _weighted(col_loss, weight)
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
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Symmetric CLIP loss: ``info_nce(image, text, logit_scale=logit_scale, symmetric=True)``.
    ``logit_scale`` is the exponentiated scale (OpenCLIP's ``logit_scale.exp()``), a float or a
    0-dim tensor that receives a gradient, or one scale per pair, shape (N,) (then N == M: pair
    i's scale is used by image i over the texts and by text i over the images).  ``weight``
    (N,): per-pair loss weights (see ``info_nce``).  image/text: (N, D)."""
    # checked here too, so that the errors name this function's arguments; logit_scale=None
    # would make info_nce fall back to its default temperature
    _pair("image_features", image_features, "text_features", text_features, process_group)
    V.check_positive_per_anchor("logit_scale", logit_scale, image_features.shape[0],
                                image_features.device)
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
        weight=weight,
        normalize=normalize,
        reduction=reduction,
        backend=backend,
        process_group=process_group,
    )


def _two_view_labels(n: int, device) -> torch.Tensor:
    idx = torch.arange(n, device=device)
    return torch.cat([idx, idx])


def _two_views(z1, z2, process_group):
    """NT-Xent's rows ``[z1; z2]`` and pair labels (unique across a distributed batch)."""
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
    return z, labels


@V.autocast_features("z1", "z2")
def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: Scalar = 0.5,
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """SimCLR NT-Xent over two views z1, z2 (N, D): ``Z = [z1; z2]``, self excluded, the positive
    of each row its other view.  ``reduction="none"`` gives the 2N per-row losses; ``weight``
    (2N,) weights those rows (see ``info_nce``)."""
    z, labels = _two_views(z1, z2, process_group)
    V.check_positive_scalar("temperature", temperature)
    return info_nce(
        z,
        z,
        temperature=temperature,
        labels=labels,
        exclude_diagonal=True,
        weight=weight,
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
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.): ``info_nce(F, F, labels=labels,
    exclude_diagonal=True)``.  features: (N, D), labels: (N,) integers.  Anchors without a
    positive are left out of the mean, as pytorch-metric-learning's SupConLoss does.
    ``temperature`` may be one per anchor, shape (N,) (anchor i's logits are s_ij / t_i);
    ``weight`` (N,): per-anchor loss weights (see ``info_nce``)."""
    V.check_features("features", features, min_rows=_min_rows(process_group))
    return info_nce(
        features,
        features,
        temperature=temperature,
        labels=labels,
        exclude_diagonal=True,
        weight=weight,
        normalize=normalize,
        reduction=reduction,
        backend=backend,
        process_group=process_group,
    )


# --------------------------------------------------------------------------------------------
# §2 variants: which negatives count, and how much


def _check_plain_float(name: str, value, lo: float, hi: float | None = None,
                       hi_open: bool = False) -> float:
    """A Python number in [lo, hi] (or [lo, hi)): a hyperparameter the kernels take as a
    constant (no gradient)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    if not V._isfinite(v) or v < lo or (hi is not None and (v >= hi if hi_open else v > hi)):
        upper = "" if hi is None else f", {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in [{lo}{upper or ', ∞)'}, got {value}")
    return v


@V.autocast_features("query", "key", "extra_negatives")
def hard_negative_info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: Scalar = 0.5,
    beta: float = 1.0,
    tau_plus: float = 0.1,
    labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    symmetric: bool = False,
    extra_negatives: torch.Tensor | None = None,
    exclude_diagonal: bool = False,
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Hard-negative reweighting (HCL, Robinson et al., ICLR 2021) with debiasing (Chuang et al.,
    NeurIPS 2020), fused: the N×M matrix is never formed and the cost is one plain InfoNCE pass.

    Positives P(i) and candidates as in ``info_nce``; the negatives of anchor i are its
    candidates that are not positives (n_i of them; ``extra_negatives`` are always negatives).
    With ``z = s/τ`` and ``z_p`` the positive's logit (the mean over P(i) when there are
    several), the authors' estimator of the negatives' mass

    ``Ng_i = max((n_i·Σ_j e^{(1+β)z_ij} / Σ_j e^{βz_ij} − τ⁺·n_i·e^{z_p}) / (1 − τ⁺),
    n_i·e^{−1/τ})``

    (the reweighted sum Σ_j w_ij e^{z_ij} / mean_j w_ij with w = e^{βz}; the clamp follows τ and
    its gradient) gives ``loss_i = −log(e^{z_p} / (e^{z_p} + Ng_i))``.  ``beta=0``: the debiased
    loss; ``beta=0, tau_plus=0``: plain InfoNCE (the positive stays in the denominator).
    Computed in log space from two streamed LSEs of the same negatives (stable at τ = 0.01,
    β = 10).  ``beta`` ≥ 0 and ``tau_plus`` ∈ [0, 1) are Python numbers; ``temperature`` a
    float or a 0-dim tensor (its gradient is computed).  Anchors without a positive or without
    a negative have loss 0 and leave the mean.  ``symmetric``: the column loss with the keys as
    anchors (two streamed passes); ``weight`` (N,) as in ``info_nce``.  The NT-Xent pairing of
    the authors' code (2N − 2 negatives per row) is ``hard_negative_nt_xent``.
    """
    _pair("query", query, "key", key)
    n, m = query.shape[0], key.shape[0]
    for name, flag in (("symmetric", symmetric), ("exclude_diagonal", exclude_diagonal),
                       ("normalize", normalize)):
        V.check_bool(name, flag)
    V.check_reduction(reduction)
    scale = _as_device_scalar(_scale_from(temperature, None, query.device), query.device)
    beta = _check_plain_float("beta", beta, 0.0)
    tau_plus = _check_plain_float("tau_plus", tau_plus, 0.0, 1.0, hi_open=True)
    key_labels = _check_pairs(query, key, labels, key_labels, exclude_diagonal, extra_negatives,
                              None)
    if weight is not None:
        V.check_anchor_weight("weight", weight, n, query)
    if symmetric and n != m and (reduction == "none" or weight is not None):
        what = "reduction='none'" if reduction == "none" else "weight"
        raise ValueError(f"symmetric with {what} needs N == M (pairs), got N={n}, M={m}")
    query, key = _normalize(query, normalize), _normalize(key, normalize)
    extra_negatives = _normalize(extra_negatives, normalize)
    impl = resolve("hard_negative_info_nce", backend, (query, key, extra_negatives))
    row_loss, row_valid, col_loss, col_valid = impl(
        query, key, scale, beta, tau_plus, labels, key_labels, symmetric, extra_negatives,
        exclude_diagonal, 0)
    row_loss = _weighted(row_loss, weight)
    if not symmetric:
        return _reduce(row_loss, row_valid, reduction)
    col_loss = _weighted(col_loss, weight)
    if reduction == "none":
        return (row_loss + col_loss) / 2
    return (_reduce(row_loss, row_valid, reduction) + _reduce(col_loss, col_valid, reduction)) / 2


@V.autocast_features("z1", "z2")
def hard_negative_nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    temperature: Scalar = 0.5,
    beta: float = 1.0,
    tau_plus: float = 0.1,
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """HCL / debiased loss in the pairing of the authors' code (SimCLR): ``Z = [z1; z2]``, the
    positive of each row its other view, its 2N − 2 negatives every other row
    (``hard_negative_info_nce(Z, Z, labels=pair ids, exclude_diagonal=True)``); their defaults
    τ = 0.5, β = 1, τ⁺ = 0.1.  ``beta=0`` is the debiased contrastive loss of Chuang et al.
    ``weight`` (2N,) weights the rows; ``reduction="none"`` gives the 2N row losses."""
    z, labels = _two_views(z1, z2, None)
    return hard_negative_info_nce(z, z, temperature=temperature, beta=beta, tau_plus=tau_plus,
                                  labels=labels, exclude_diagonal=True, weight=weight,
                                  normalize=normalize, reduction=reduction, backend=backend)


_MIX_CHUNK = 1 << 22  # elements of the gathered rows one step of the mixing norms holds


def _mixing_logits(q, pool, top_vals, top_idx, n_mix, n_query_mix, generator):
    """The logits <q_i, h> of MoCHi's synthetic negatives (Kalantidis et al., NeurIPS 2020,
    §4.1–4.2), without forming them: unit rows q (differentiable), a detached unit ``pool``,
    the top-k hardest ``top_vals`` = <q_i, pool_j> (differentiable in q) and their pool indices.

    Draws from ``generator``, in this order: pair indices a (N, s) ∈ [0, k) and b (N, s) ∈ [0, k)
    with b ≠ a, coefficients α (N, s) ~ U[0, 1), query-mix indices c (N, s′) ∈ [0, k) and
    coefficients β (N, s′) ~ U[0, 0.5).  Synthetic points (detached, as in the paper):
    h = normalize(α·n_a + (1 − α)·n_b) and h′ = normalize(β·q_i + (1 − β)·n_c) with n the
    i-th query's k hardest negatives in decreasing similarity.  Since they are constants,
    <q_i, h> = (α<q_i, n_a> + (1 − α)<q_i, n_b>) / ‖α n_a + (1 − α) n_b‖ and
    <q_i, h′> = (β<q_i, q̄_i> + (1 − β)<q_i, n_c>) / ‖β q̄_i + (1 − β) n_c‖ (q̄: q detached):
    O(N·(s + s′)) memory; the norms take one dot <n_a, n_b> per pair, O(N·s·D), in chunks."""
    n, k = top_idx.shape
    dev = q.device
    parts = []
    if n_mix:
        a = torch.randint(0, k, (n, n_mix), generator=generator, device=dev)
        b = torch.randint(0, k - 1, (n, n_mix), generator=generator, device=dev)
        b = b + (b >= a).to(b.dtype)
        alpha = torch.rand((n, n_mix), generator=generator, device=dev, dtype=torch.float64)
        ia, ib = top_idx.gather(1, a), top_idx.gather(1, b)
        ab = torch.empty((n, n_mix), dtype=q.dtype, device=dev)
        step = max(1, _MIX_CHUNK // max(1, n_mix * q.shape[1]))
        for r0 in range(0, n, step):  # <n_a, n_b>, O(step·s·D) at a time
            ab[r0:r0 + step] = (pool[ia[r0:r0 + step]] * pool[ib[r0:r0 + step]]).sum(-1)
        alpha = alpha.to(q.dtype)
        norm = torch.sqrt(alpha**2 + (1 - alpha)**2 + 2 * alpha * (1 - alpha) * ab)
        parts.append((alpha * top_vals.gather(1, a) + (1 - alpha) * top_vals.gather(1, b))
                     / norm)
    if n_query_mix:
        c = torch.randint(0, k, (n, n_query_mix), generator=generator, device=dev)
        beta = 0.5 * torch.rand((n, n_query_mix), generator=generator, device=dev,
                                dtype=torch.float64)
        beta = beta.to(q.dtype)
        qq = (q * q.detach()).sum(1, keepdim=True)  # <q_i, q̄_i>: its gradient is q̄_i
        vc = top_vals.gather(1, c)
        norm = torch.sqrt(beta**2 * qq.detach() + (1 - beta)**2
                          + 2 * beta * (1 - beta) * vc.detach())
        parts.append((beta * qq + (1 - beta) * vc) / norm)
    return torch.cat(parts, dim=1)


@V.autocast_features("query", "key", "queue")
def mochi_info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    queue: torch.Tensor | None = None,
    temperature: Scalar = 0.2,
    n_hard: int = 64,
    n_mix: int = 32,
    n_query_mix: int = 16,
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE with hard negative mixing (MoCHi, Kalantidis et al., NeurIPS 2020).

    query, key: (N, D), the positive of query i is key i.  Negatives: the ``queue`` (Q, D) when
    given (MoCo, as in the paper: ``loss_i = −log e^{z_ii} / (e^{z_ii} + Σ_queue e^{z} +
    Σ_synthetic e^{z})``), else the other keys (in-batch, as ``info_nce``).  For each query, its
    ``n_hard`` hardest negatives (the streamed ``similarity_topk``, no N×Q matrix) give
    ``n_mix`` synthetic negatives mixed from pairs of them, normalize(α n_a + (1 − α) n_b),
    α ~ U(0, 1), and ``n_query_mix`` mixed with the query, normalize(β q + (1 − β) n_c),
    β ~ U(0, 0.5); they join that query's denominator only, carry no gradient (as in the paper;
    the query's gradient sees them as constants) and are never formed: O(N·(n_mix + n_query_mix))
    memory.  The features and the pool are L2-normalized for the mixing (the paper's unit
    features).  ``generator``: the random draws (order: see ``_mixing_logits``).  ``weight``
    (N,) as in ``info_nce``.
    """
    _pair("query", query, "key", key)
    n, m = query.shape[0], key.shape[0]
    if m < n:
        raise ValueError(f"key needs at least as many rows as query (the positive of query i "
                         f"is key i): got N={n}, M={m}")
    if queue is not None:
        V.check_features("queue", queue)
        V.check_same_dim("query", query, "queue", queue)
        V.check_same_device(query=query, queue=queue)
        V.check_same_dtype(query=query, queue=queue)
    V.check_bool("normalize", normalize)
    V.check_reduction(reduction)
    scale = _as_device_scalar(_scale_from(temperature, None, query.device), query.device)
    V.check_int("n_mix", n_mix, 0)
    V.check_int("n_query_mix", n_query_mix, 0)
    pool_rows = queue.shape[0] if queue is not None else m - 1
    least = 2 if n_mix else 1  # a pair of distinct hardest negatives per mixed point
    if pool_rows < least:
        what = "queue rows" if queue is not None else "keys besides the positive"
        raise ValueError(f"mochi_info_nce needs at least {least} negative(s) to mix (n_hard >= "
                         f"{least}), got {pool_rows} {what}")
    V.check_int("n_hard", n_hard, least, pool_rows)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if weight is not None:
        V.check_anchor_weight("weight", weight, n, query)
    q, k = _normalize(query, normalize), _normalize(key, normalize)
    queue = _normalize(queue, normalize)
    acc = acc_dtype(q.dtype)
    logits = None
    if n_mix or n_query_mix:
        qu = F.normalize(q, dim=-1)  # unit rows for the mixing (a no-op after normalize)
        pool = F.normalize((k if queue is None else queue).detach(), dim=-1)
        if queue is not None:
            top_vals, top_idx = similarity_topk(qu, pool, n_hard, backend=backend)
        else:  # in-batch: the n_hard hardest keys other than the query's own positive
            vals, idx = similarity_topk(qu, pool, min(n_hard + 1, m), backend=backend)
            keep = idx != torch.arange(n, device=idx.device)[:, None]
            keep = keep & (keep.cumsum(1) <= n_hard)
            top_vals, top_idx = vals[keep].view(n, n_hard), idx[keep].view(n, n_hard)
        logits = _mixing_logits(qu.to(acc), pool.to(acc), top_vals.to(acc), top_idx, n_mix,
                                n_query_mix, generator)
        if not normalize:  # <q, h> = ‖q‖·<q/‖q‖, h>
            logits = logits * q.to(acc).norm(dim=1, keepdim=True)
        logits = logits * scale
    if queue is None:
        impl = resolve("info_nce", backend, (q, k))
        row_loss, row_valid, _, _ = impl(q, k, scale, None, None, False, False, None, False, 0,
                                         logits)
        return _reduce(_weighted(row_loss, weight), row_valid, reduction)
    # MoCo: the positive and the synthetic logits are per-anchor terms, the queue is streamed
    pos = scale * (q.to(acc) * k[:n].to(acc)).sum(1)
    terms = pos[:, None] if logits is None else torch.cat([pos[:, None], logits], dim=1)
    lse_queue = pairwise_logsumexp(q, queue, scale=scale, backend=backend)
    loss = torch.logaddexp(lse_queue, torch.logsumexp(terms, dim=1)) - pos
    return _reduce(_weighted(loss, weight), torch.ones_like(loss, dtype=torch.bool), reduction)


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
    weight: torch.Tensor | None = None,
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
    ``"mean"`` averages over all N anchors.  Mining thresholds carry no gradient.  ``weight``
    (N,): non-negative per-anchor loss weights (``"mean"`` is Σ w_i·loss_i / N, as torch's
    ``binary_cross_entropy(weight=)``).
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
    if weight is not None:
        V.check_anchor_weight("weight", weight, embeddings.shape[0], embeddings)
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
            weight=weight,
        )
    impl = resolve("multi_similarity", backend, (emb, ref))
    loss = _weighted(impl(
        emb, labels, ref, ref_labels, float(alpha), float(beta), float(base), eps, exclude_self, 0
    ), weight)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
