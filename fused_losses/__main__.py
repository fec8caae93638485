"""``python -m fused_losses``: load (compiling now, whatever FUSED_LOSSES_JIT says, when missing
or built for another torch) the compiled extensions, and report what this installation runs.

Useful to build ahead of time where the first use must not wait (a Docker image, a cluster job
before its ranks start), and as the fix command named by an unavailable backend's reason.
"""

from __future__ import annotations

import os
import sys

import torch

import fused_losses
from fused_losses import _ext


def main() -> int:
    os.environ["FUSED_LOSSES_JIT"] = "1"
    print(f"fused-losses {fused_losses.__version__}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda or 'none'}")
    ok = True
    for name in ("_C", "_cuda"):
        module, why = _ext.load(name)
        print(f"fused_losses.{name}: " + (f"loaded from {module.__file__}" if module else why))
        ok &= module is not None or name == "_cuda"
    print("available backends:", fused_losses.available_backends())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
