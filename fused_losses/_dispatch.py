"""Backend registry and dispatch.

Every public op validates its arguments (``_validation``), then asks :func:`resolve` for an
implementation.  A backend is a named table of op implementations plus a declaration of what it
can serve (devices, dtypes, availability).  ``backend="auto"`` takes the highest-priority backend
that can serve the call; an explicit backend that cannot serve it raises one error that says why.

Later backends (``triton``, ``cpu``, ``cuda``) register themselves through :func:`register_backend`
from their own modules; the API layer never changes when one is added.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKEND_NAMES = ("reference", "triton", "cuda", "cpu")


@dataclass
class Backend:
    """A named set of op implementations and what they support.

    ``priority``: larger wins under ``backend="auto"``.
    ``devices``: device types served (``{"cpu"}``, ``{"cuda"}``, ...).
    ``dtypes``: floating dtypes accepted as inputs.
    ``availability``: returns ``None`` when usable, else a reason (missing extension, no GPU, ...).
    ``op_priority``: optional ``(op, tensors) -> int`` overriding ``priority`` per op and inputs
    (e.g. a per-GPU-family table of which backend measured faster for that op).
    """

    name: str
    priority: int
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    availability: Callable[[], str | None] = lambda: None
    ops: dict[str, Callable] = field(default_factory=dict)
    op_priority: Callable[[str, list[torch.Tensor]], int] | None = None

    def priority_for(self, op: str, tensors: list[torch.Tensor]) -> int:
        """The priority under ``backend="auto"`` for this op on these inputs."""
        return self.priority if self.op_priority is None else self.op_priority(op, tensors)

    def implements(self, op: str) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` as this backend's implementation of ``op``."""

        def deco(fn: Callable) -> Callable:
            self.ops[op] = fn
            return fn

        return deco

    def unsupported_reason(self, op: str, tensors: Iterable[torch.Tensor]) -> str | None:
        why = self.availability()
        if why is not None:
            return why
        if op not in self.ops:
            return f"does not implement {op!r}"
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor):
                continue
            if t.device.type not in self.devices:
                return f"does not run on {t.device.type} tensors (serves {sorted(self.devices)})"
            if t.is_floating_point() and t.dtype not in self.dtypes:
                return f"does not accept {t.dtype} inputs"
        return None


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES}")
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"backend={name!r} is not registered here; registered: {sorted(_BACKENDS)}"
        ) from None


def registered_backends() -> list[str]:
    return sorted(_BACKENDS, key=lambda n: -_BACKENDS[n].priority)


def available_backends(op: str | None = None) -> list[str]:
    """Backends usable on this machine (for ``op`` when given), best first."""
    out = []
    for name in registered_backends():
        b = _BACKENDS[name]
        if b.availability() is None and (op is None or op in b.ops):
            out.append(name)
    return out


def check_backend_name(backend) -> str:
    """``backend`` is ``"auto"`` or one of BACKEND_NAMES (TypeError/ValueError otherwise)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    return backend


def resolve(op: str, backend: str, tensors: Iterable[torch.Tensor | None]) -> Callable:
    """The implementation of ``op`` that ``backend`` names (or the best one, for ``"auto"``)."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    check_backend_name(backend)
    if backend == "auto":
        reasons = []
        ranked = sorted(registered_backends(),
                        key=lambda n: -_BACKENDS[n].priority_for(op, tensors))  # stable
        for name in ranked:
            why = _BACKENDS[name].unsupported_reason(op, tensors)
            if why is None:
                return _BACKENDS[name].ops[op]
            reasons.append(f"{name}: {why}")
        raise RuntimeError(f"no backend can run {op!r} on these inputs: " + "; ".join(reasons))
    if backend not in _BACKENDS:
        raise RuntimeError(
            f"backend={backend!r} is not available in this installation "
            f"(registered: {registered_backends()})"
        )
    why = _BACKENDS[backend].unsupported_reason(op, tensors)
    if why is not None:
        raise RuntimeError(f"backend={backend!r} cannot run {op!r}: {why}")
    return _BACKENDS[backend].ops[op]
