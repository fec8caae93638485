"""Argument checks shared by every public op (SPEC §6).

They run before dispatch, so no backend ever sees a malformed call.  Each error names the
argument.  Shape/dtype/device problems raise ``ValueError`` or ``TypeError``; they never reach
a kernel.  Non-finite values *inside* feature tensors are not checked (that would cost a device
sync per call): they propagate as NaN.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_features(
    name: str, t: Any, ndim: int | tuple[int, ...] = 2, min_rows: int = 1
) -> torch.Tensor:
    """A floating-point feature tensor of the given rank(s), with at least ``min_rows`` rows
    (0 only for one rank's share of a distributed batch)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have rank {want}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has unsupported dtype {t.dtype}; expected one of float16, bfloat16, "
            "float32, float64"
        )
    if t.shape[-2] < min_rows:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(
            f"{name} must have at least one feature column, got shape {tuple(t.shape)}"
        )
    return t


def check_same_dim(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"feature dimension mismatch: {a_name} has D={a.shape[-1]}, "
            f"{b_name} has D={b.shape[-1]}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise ValueError(
                f"{k} is on {v.device} but {first_name} is on {first.device}; "
                "all inputs must be on one device"
            )


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    for k, v in items[1:]:
        if v.dtype != items[0][1].dtype:
            raise TypeError(
                f"{k} has dtype {v.dtype} but {items[0][0]} has dtype {items[0][1].dtype}; "
                "feature tensors must share one dtype (inside torch.autocast they are cast to "
                "its dtype)"
            )


def _isfinite(v) -> bool:
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) a float argument
    # (a function default too) is a symbolic float, which comparisons guard on and
    # math.isfinite cannot trace.
    return v == v and v != math.inf and v != -math.inf


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _scalar_value(name: str, value: Any) -> float | None:
    """The value of a float, int, or one-element floating tensor (which may require grad), after
    its type and shape are checked; None for a CUDA tensor while a CUDA graph is being captured
    (reading it would sync with the host, which capture forbids: its value is then unchecked)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-dim tensor, got bool")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (one element), got shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        return None if _capturing(value) else float(value.detach())
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"{name} must be a number or a 0-dim tensor, got {type(value).__name__}")


def check_positive_scalar(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """A finite positive float, int, or one-element floating tensor (which may require grad)."""
    v = _scalar_value(name, value)
    if v is None:
        return
    if not _isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {v}")


def check_finite_scalar(name: str, value: Any) -> None:
    """A finite float, int, or one-element floating tensor (any sign)."""
    v = _scalar_value(name, value)
    if v is not None and not _isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")


def check_positive_per_anchor(name: str, value: Any, n: int, device: torch.device) -> bool:
    """A positive finite scalar (see :func:`check_positive_scalar`; False), or a per-anchor
    vector: a 1-D floating tensor of shape (n,), n ≠ 1, on ``device``, every entry finite and
    positive (True).  A one-element tensor is the scalar case (for n = 1 the two agree)."""
    if not (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.numel() != 1):
        check_positive_scalar(name, value)
        return False
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"{name} must be a scalar or one value per anchor, shape ({n},); got "
                         f"shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    if not _capturing(value) and n:
        v = value.detach()
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got a non-finite entry")
        if not bool((v > 0).all()):
            raise ValueError(f"{name} must be positive, got {float(v.min())}")
    return True


def check_anchor_weight(name: str, w: Any, n: int, ref: torch.Tensor) -> torch.Tensor:
    """Per-anchor loss weights: a floating tensor of shape (n,) on ``ref``'s device, finite and
    non-negative (values unchecked while a CUDA graph is captured)."""
    check_weights(name, w, (n,), ref)
    if not _capturing(w) and n:
        v = w.detach()
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got a non-finite entry")
        if bool((v < 0).any()):
            raise ValueError(f"{name} must be non-negative, got {float(v.min())}")
    return w


def check_scalar_device(name: str, value: Any, device: torch.device) -> None:
    if isinstance(value, torch.Tensor) and value.device != device and value.device.type != "cpu":
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")


def check_labels(name: str, labels: Any, n: int, device: torch.device) -> torch.Tensor:
    """Integer class labels, one per row."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of integer labels, got {type(labels).__name__}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(
            f"{name} has length {labels.shape[0]} but must have one label per row ({n})"
        )
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    return labels


def check_weights(name: str, w: Any, shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
    """Non-negative point weights of the given shape (finiteness/sign are the caller's business)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {w.dtype}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
    if w.device != ref.device:
        raise ValueError(f"{name} is on {w.device} but the points are on {ref.device}")
    return w


def check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the autocast region enabled for ``device_type``, or None (also for device
    types autocast does not know, such as ``meta``)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:
        pass
    return None


def autocast_features(*names: str) -> Callable[[Callable], Callable]:
    """Declares a public op's autocast behaviour (SPEC §6), as torch's own matmul-like ops do.

    Inside a ``torch.autocast`` region enabled for the features' device type, the feature
    arguments ``names`` that are floating point and not float64 (torch's eligibility rule) are
    cast to the region's dtype; the op then runs with autocast disabled, so it computes exactly
    what it computes on features of that dtype outside autocast (fp32 accumulation, fp32 loss).
    Outside autocast nothing is cast: mixed feature dtypes raise the usual TypeError."""

    def deco(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters)
        where = [(n, params.index(n)) for n in names]

        def features(args, kwargs):
            for name, pos in where:
                t = args[pos] if pos < len(args) else kwargs.get(name)
                if isinstance(t, torch.Tensor):
                    yield name, pos, t

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = next(features(args, kwargs), None)
            if first is None:
                return fn(*args, **kwargs)
            device_type = first[2].device.type
            dtype = _autocast_dtype(device_type)
            if dtype is None:
                return fn(*args, **kwargs)
            args, kwargs = list(args), dict(kwargs)
            for name, pos, t in list(features(args, kwargs)):
                if t.is_floating_point() and t.dtype != torch.float64 and \
                        t.device.type == device_type:
                    if pos < len(args):
                        args[pos] = t.to(dtype)
                    else:
                        kwargs[name] = t.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        return wrapper

    return deco
