"""Registers the optional backends.  Each lives in its own module and registers itself on
import; a backend whose dependency is missing registers with an ``availability`` reason instead
of failing the package import."""

from __future__ import annotations

import importlib

for _module in ("fused_losses.cpu_backend", "fused_losses.triton_backend",
                "fused_losses.cuda_backend"):
    importlib.import_module(_module)
