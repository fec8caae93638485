"""What the drop-in modules share: importing the library, one-line fall-back warnings, and the
two gradient adapters that reproduce other libraries' distributed gradient conventions."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch
import torch.distributed as dist


def require(module: str, extra: str, library: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"fused_losses.integrations needs {library} for this module "
            f"(pip install \"fused-losses[{extra}]\"): {exc}"
        ) from exc


def warn_fallback(owner: object, reason: str) -> None:
    """One line, once per instance: this call runs the library's own (N×M) code, and why."""
    if getattr(owner, "_fused_losses_warned", False):
        return
    object.__setattr__(owner, "_fused_losses_warned", True)
    warnings.warn(
        f"fused_losses: {type(owner).__name__} runs the original library's code (it builds the "
        f"full similarity matrix): {reason}",
        stacklevel=3,
    )


def world(process_group=None) -> tuple[int, int]:
    """(rank, world size) in ``process_group`` (the default group when None); (0, 1) when
    torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward; its gradient multiplied by ``factor`` in the backward."""
    if factor == 1.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ScaleGrad.apply(x, factor)


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity whose backward replaces the gradient by its mean over the ranks (collective)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.detach().clone().contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def mean_grad_over_ranks(x, group):
    """A replicated tensor (``logit_scale``) whose gradient on every rank becomes the mean of the
    ranks' gradients: with this package's convention (each rank holds ``world ×`` its share of
    the gradient) that is the full gradient on every rank, what a library that computes the
    whole loss on every rank (OpenCLIP) gives.  Every rank must run the backward."""
    if not (isinstance(x, torch.Tensor) and torch.is_grad_enabled() and x.requires_grad):
        return x
    return _MeanGradOverRanks.apply(x, group)


def logsumexp_of(terms: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise LSE of several per-row LSE vectors (a softmax over their union)."""
    if len(terms) == 1:
        return terms[0]
    return torch.logsumexp(torch.stack(terms), dim=0)
