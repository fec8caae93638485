"""``nn.Module`` wrappers over the functional API (same arguments, same semantics)."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as FL


class InfoNCELoss(nn.Module):
    """``info_nce`` as a module.  With ``learnable_temperature=True`` the module owns the
    temperature as ``log_logit_scale`` (a parameter, initialized to ``log(1/temperature)``);
    ``max_logit_scale`` clamps it as OpenCLIP does (100)."""

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        learnable_temperature: bool = False,
        max_logit_scale: float = 100.0,
        symmetric: bool = False,
        decoupled: bool = False,
        exclude_diagonal: bool = False,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.temperature = temperature
        self.max_logit_scale = max_logit_scale
        self.symmetric, self.decoupled = symmetric, decoupled
        self.exclude_diagonal, self.normalize = exclude_diagonal, normalize
        self.reduction, self.backend, self.process_group = reduction, backend, process_group
        if learnable_temperature:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.register_parameter("log_logit_scale", None)

    def logit_scale(self) -> torch.Tensor | None:
        if self.log_logit_scale is None:
            return None
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, query, key, labels=None, key_labels=None, extra_negatives=None,
                anchor_negatives=None, weight=None):
        return FL.info_nce(
            query,
            key,
            temperature=self.temperature,
            logit_scale=self.logit_scale(),
            labels=labels,
            key_labels=key_labels,
            symmetric=self.symmetric,
            decoupled=self.decoupled,
            extra_negatives=extra_negatives,
            anchor_negatives=anchor_negatives,
            exclude_diagonal=self.exclude_diagonal,
            weight=weight,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )


class ClipLoss(nn.Module):
    """Symmetric CLIP loss.  ``forward(image, text, logit_scale=None)``: pass the model's
    (exponentiated) ``logit_scale`` as OpenCLIP does, or let the module own a learnable one
    (``init_logit_scale``, clamped at ``max_logit_scale``)."""

    def __init__(
        self,
        *,
        init_logit_scale: float | None = 1 / 0.07,
        max_logit_scale: float = 100.0,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.max_logit_scale = max_logit_scale
        self.normalize, self.reduction = normalize, reduction
        self.backend, self.process_group = backend, process_group
        if init_logit_scale is not None:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        else:
            self.register_parameter("log_logit_scale", None)

    def forward(self, image_features, text_features, logit_scale=None, weight=None):
        if logit_scale is None:
            if self.log_logit_scale is None:
                raise ValueError("logit_scale must be passed when the module owns none")
            logit_scale = self.log_logit_scale.exp().clamp(max=self.max_logit_scale)
        return FL.clip_loss(
            image_features,
            text_features,
            logit_scale,
            weight=weight,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )


class NTXentLoss(nn.Module):
    """SimCLR NT-Xent; ``forward(z1, z2)``."""

    def __init__(
        self,
        temperature: float = 0.5,
        *,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.temperature, self.normalize, self.reduction = temperature, normalize, reduction
        self.backend, self.process_group = backend, process_group

    def forward(self, z1, z2, weight=None):
        return FL.nt_xent(
            z1,
            z2,
            temperature=self.temperature,
            weight=weight,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )


class SupConLoss(nn.Module):
    """Supervised contrastive loss; ``forward(features, labels)``."""

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.temperature, self.normalize, self.reduction = temperature, normalize, reduction
        self.backend, self.process_group = backend, process_group

    def forward(self, features, labels, weight=None):
        return FL.sup_con(
            features,
            labels,
            temperature=self.temperature,
            weight=weight,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )


class HardNegativeInfoNCELoss(nn.Module):
    """``hard_negative_info_nce`` as a module (HCL, Robinson et al. 2021; ``beta=0``: the
    debiased loss of Chuang et al. 2020).  ``forward(query, key, labels=None, key_labels=None,
    extra_negatives=None, weight=None)``."""

    def __init__(
        self,
        temperature: float = 0.5,
        beta: float = 1.0,
        tau_plus: float = 0.1,
        *,
        symmetric: bool = False,
        exclude_diagonal: bool = False,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(temperature=temperature, beta=beta, tau_plus=tau_plus,
                           symmetric=symmetric, exclude_diagonal=exclude_diagonal,
                           normalize=normalize, reduction=reduction, backend=backend)

    def forward(self, query, key, labels=None, key_labels=None, extra_negatives=None,
                weight=None):
        return FL.hard_negative_info_nce(query, key, labels=labels, key_labels=key_labels,
                                         extra_negatives=extra_negatives, weight=weight,
                                         **self.kwargs)


class HardNegativeNTXentLoss(nn.Module):
    """``hard_negative_nt_xent`` as a module: HCL / debiased in the SimCLR pairing of the
    authors' code; ``forward(z1, z2, weight=None)``."""

    def __init__(
        self,
        temperature: float = 0.5,
        beta: float = 1.0,
        tau_plus: float = 0.1,
        *,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(temperature=temperature, beta=beta, tau_plus=tau_plus,
                           normalize=normalize, reduction=reduction, backend=backend)

    def forward(self, z1, z2, weight=None):
        return FL.hard_negative_nt_xent(z1, z2, weight=weight, **self.kwargs)


class MoCHiLoss(nn.Module):
    """``mochi_info_nce`` as a module (hard negative mixing, Kalantidis et al. 2020);
    ``forward(query, key, queue=None, weight=None)``.  ``generator``: the random draws (a
    ``torch.Generator`` on the features' device; None: torch's default one)."""

    def __init__(
        self,
        temperature: float = 0.2,
        *,
        n_hard: int = 64,
        n_mix: int = 32,
        n_query_mix: int = 16,
        generator: torch.Generator | None = None,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.generator = generator
        self.kwargs = dict(temperature=temperature, n_hard=n_hard, n_mix=n_mix,
                           n_query_mix=n_query_mix, normalize=normalize, reduction=reduction,
                           backend=backend)

    def forward(self, query, key, queue=None, weight=None):
        return FL.mochi_info_nce(query, key, queue=queue, weight=weight,
                                 generator=self.generator, **self.kwargs)


class SigLipLoss(nn.Module):
    """SigLIP loss with learnable ``logit_scale`` (stored as its log, init log 10) and
    ``logit_bias`` (init −10), as in the SigLIP paper; or pass both to ``forward``."""

    def __init__(
        self,
        *,
        init_logit_scale: float = 10.0,
        init_logit_bias: float = -10.0,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.normalize, self.reduction = normalize, reduction
        self.backend, self.process_group = backend, process_group

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None):
        scale = self.log_logit_scale.exp() if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        return FL.siglip_loss(
            image_features,
            text_features,
            scale,
            bias,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss with mining; ``forward(embeddings, labels, ref_embeddings=None,
    ref_labels=None)``."""

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float | None = 0.1,
        *,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.normalize, self.reduction = normalize, reduction
        self.backend, self.process_group = backend, process_group

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None, weight=None):
        return FL.multi_similarity(
            embeddings,
            labels,
            ref_embeddings=ref_embeddings,
            ref_labels=ref_labels,
            weight=weight,
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            epsilon=self.epsilon,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )


class SinkhornLoss(nn.Module):
    """Debiased Sinkhorn divergence (``fused_losses.sinkhorn``).

    ``forward(x, y, a=None, b=None)``."""

    def __init__(
        self,
        *,
        blur: float = 0.05,
        p: int = 2,
        scaling: float = 0.5,
        diameter: float | None = None,
        n_iters: int | None = None,
        debias: bool = True,
        cost: str = "sqeuclidean",
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(
            blur=blur,
            p=p,
            scaling=scaling,
            diameter=diameter,
            n_iters=n_iters,
            debias=debias,
            cost=cost,
            reduction=reduction,
            backend=backend,
        )

    def forward(self, x, y, a=None, b=None):
        from .ot import sinkhorn

        return sinkhorn(x, y, a=a, b=b, **self.kwargs)


class SwAVLoss(nn.Module):
    """SwAV's swapped-prediction loss, streamed (``fused_losses.swav_loss``).

    ``forward(embeddings, prototypes, queue=None)``: ``embeddings`` the ``n_crops`` crops stacked
    ``(n_crops·B, D)``, ``prototypes`` ``(K, D)`` (e.g. a prototype layer's weight)."""

    def __init__(
        self,
        *,
        n_crops: int = 2,
        crops_for_assign=(0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        n_iters: int = 3,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.kwargs = dict(n_crops=n_crops, crops_for_assign=tuple(crops_for_assign),
                           temperature=temperature, epsilon=epsilon, n_iters=n_iters,
                           reduction=reduction, backend=backend)

    def forward(self, embeddings, prototypes, queue=None):
        from .swav import swav_loss

        return swav_loss(embeddings, prototypes, queue=queue, **self.kwargs)
