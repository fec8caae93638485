"""The backends: each implements the kernel contract of ``fused_losses.kernels`` (or, for the
``reference`` oracle, the ops directly) and registers itself with ``fused_losses._dispatch`` on
import.

- ``reference``: plain PyTorch that materializes the N×M matrix; the oracle every other backend
  is tested against.
- ``cpu``: the compiled C++ extension ``fused_losses._C``.
- ``triton``: Triton kernels (GPU; CPU under ``TRITON_INTERPRET=1``).
- ``cuda``: the compiled CUDA extension ``fused_losses._cuda``.

A backend whose dependency is missing registers with an ``availability`` reason instead of
failing the package import.
"""

from __future__ import annotations

from . import cpu, cuda, reference, triton  # noqa: F401  (each registers itself)
