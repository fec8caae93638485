"""Loading of the compiled extensions, once, with a clear reason when one is missing.

Importing this module never raises: a missing extension only makes its backend unavailable
(``backend="auto"`` then skips it; an explicit request raises with the reason below).
"""

from __future__ import annotations

import importlib
from types import ModuleType

_cache: dict[str, tuple[ModuleType | None, str | None]] = {}

_HOW = ("reinstall with `pip install -e . --no-build-isolation` (or `make test`), which needs a "
        "C++17 compiler")


def _load(name: str, what: str) -> tuple[ModuleType | None, str | None]:
    if name not in _cache:
        try:
            _cache[name] = (importlib.import_module(name), None)
        except Exception as exc:  # ImportError, or an ABI mismatch (OSError/undefined symbol)
            _cache[name] = (None, f"the compiled extension {name} ({what}) is not available: "
                                  f"{exc.__class__.__name__}: {exc}; {_HOW}")
    return _cache[name]


def load_cpu_ext() -> ModuleType | None:
    return _load("fused_losses._C", "C++ CPU kernels")[0]


def cpu_ext_unavailable_reason() -> str | None:
    return _load("fused_losses._C", "C++ CPU kernels")[1]


def load_cuda_ext() -> ModuleType | None:
    return _load("fused_losses._cuda", "CUDA kernels")[0]


def cuda_ext_unavailable_reason() -> str | None:
    return _load("fused_losses._cuda", "CUDA kernels")[1]
