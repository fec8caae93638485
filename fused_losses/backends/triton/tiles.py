"""Tile shapes and autotune configurations, per GPU architecture.

Which table applies (``arch_for``): on a CUDA device its compute capability (``sm_90`` for 9.x
and above, ``sm_80`` below); under ``TRITON_INTERPRET=1`` the small ``interpret`` table, or the
table named by ``FUSED_LOSSES_TRITON_ARCH=sm_80|sm_90`` (so the shapes a GPU runs are run on
CPU); ``FORCED_ARCH`` (set by scripts/triton_check.py) overrides both.

Tiles are not autotuned per kernel on purpose: every pass of one op must see the same tile shape
and feature loop, or s_ij differs in the last bits between passes (LSE consistency at large
logits, multi-similarity mining).  ``triton.autotune`` varies only num_warps/num_stages, and
offers for each arch only the configs listed for it (``prune``)."""

from __future__ import annotations

import os

import torch
import triton

from . import INTERPRET

ARCHS = ("sm_80", "sm_90")
#: Set by the ahead-of-time compile check to the arch it compiles for.
FORCED_ARCH: str | None = None

# The output feature chunk of the gradient kernels: D > _MAX_BLOCK_DO is split over the grid's
# second axis (each chunk recomputes the similarity tiles: (⌈D/512⌉ + 1)·N·M·D per gradient
# pass instead of 2·N·M·D, in exchange for a (BLOCK_M, 512) fp32 accumulator at most).
_MAX_BLOCK_DO = 512


def interpreter_arch() -> str:
    """The table the interpreter uses: ``FUSED_LOSSES_TRITON_ARCH`` or ``interpret``."""
    arch = os.environ.get("FUSED_LOSSES_TRITON_ARCH", "") or "interpret"
    if arch not in ARCHS + ("interpret",):
        raise ValueError(f"FUSED_LOSSES_TRITON_ARCH={arch!r}: expected one of {', '.join(ARCHS)}")
    return arch


def arch_for(device: torch.device) -> str:
    if FORCED_ARCH is not None:
        return FORCED_ARCH
    if INTERPRET or device.type != "cuda":
        return interpreter_arch()
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


def tiles(d: int, dtype: torch.dtype, arch: str):
    """(BLOCK_M = BLOCK_N, BLOCK_D, BLOCK_DO) for one op, keyed on D (and dtype)."""
    p2 = triton.next_power_of_2(d)
    bd = max(16, min(64, p2))
    bdo = max(16, min(p2, _MAX_BLOCK_DO))
    if arch == "interpret":
        return 16, bd, bdo
    wide = dtype in (torch.float16, torch.bfloat16)
    # fp32 operands take twice the shared memory per tile: a shorter feature step.
    bd = max(16, min(64 if wide else 32, p2))
    return (64 if bdo <= 256 else 32), bd, bdo


def _arch_configs(arch):
    if arch == "interpret":
        return [(4, 1)]
    stages = (2, 3, 4) if arch == "sm_90" else (2, 3)
    return [(w, st) for w in (4, 8) for st in stages]


#: Every config any arch offers; ``prune`` keeps the launch arch's.
ALL_CONFIGS = [triton.Config({}, num_warps=w, num_stages=st)
               for w, st in sorted({c for a in ARCHS + ("interpret",) for c in _arch_configs(a)})]


def prune(configs, named_args, **kwargs):
    """``early_config_prune``: the configs of the arch of the launch (one under the
    interpreter, where warps and stages change nothing and benchmarking cannot run)."""
    dev = next(v.device for v in named_args.values() if isinstance(v, torch.Tensor))
    arch = arch_for(dev)
    want = _arch_configs(arch)
    out = [c for c in configs if (c.num_warps, c.num_stages) in want]
    return out[:1] if INTERPRET else out


def tuned(fn, reset=()):
    """``triton.autotune`` keyed on D (the kernel argument ``d``; Triton adds the tensor dtypes
    to the key).  ``reset``: the outputs a kernel accumulates into atomically, zeroed before
    every benchmarked run."""
    return triton.autotune(configs=ALL_CONFIGS, key=["d"], reset_to_zero=list(reset) or None,
                           prune_configs_by={"early_config_prune": prune})(fn)
