"""Tile shapes and autotune configurations, per GPU architecture.

Which table applies (``arch_for``): on a CUDA device its compute capability (``sm_90`` for 9.x
and above, ``sm_80`` below; only sm_80 and sm_90a are compiled and checked by
``make triton-check``: other capabilities run the nearest table unchecked; the sm_80 table's
shared memory, ≤ 32 KB per block, also fits sm_86/sm_89); under ``TRITON_INTERPRET=1`` the
small ``interpret`` table, or the
table named by ``FUSED_LOSSES_TRITON_ARCH=sm_80|sm_90`` (so the shapes a GPU runs are run on
CPU); ``FORCED_ARCH`` (set by scripts/triton_check.py) overrides both.

Tiles are not autotuned on purpose: every pass of one op must see the same tile shape and
feature loop, or s_ij differs in the last bits between passes (LSE consistency at large logits,
multi-similarity mining).  ``triton.autotune`` varies only num_warps/num_stages, and offers for
each arch only the configs listed for it here (``prune``), each of which
``make triton-check`` compiles for that arch and proves free of register spills."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from . import INTERPRET

ARCHS = ("sm_80", "sm_90")
#: Set by the ahead-of-time compile check to the arch it compiles for.
FORCED_ARCH: str | None = None


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


@dataclass(frozen=True)
class Tiles:
    """The tiles of one op: ``bm`` rows × ``bm`` columns per similarity tile (BLOCK_M =
    BLOCK_N), ``bd`` features per step of its k loop (BLOCK_D), ``bdo`` output features per
    program of the gradient kernels (BLOCK_DO; D > bdo is split over the grid's second axis,
    each chunk recomputing the same tiles); the fused backward (``_grad_xy``, which holds dX
    and produces dY per tile) takes ``bdo_xy`` output features per program, ``bdy`` of them at
    a time for dY."""
    bm: int
    bd: int
    bdo: int
    bdo_xy: int
    bdy: int


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _wide(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def tiles(d: int, dtype: torch.dtype, arch: str) -> Tiles:
    """The tiles of an op with (padded) feature width d: a similarity tile for tensor cores
    (16-bit inputs, 64 × 64, k step 64) or for FMA (fp32: 32 × 32, k step 32), and an output
    chunk of 128 features (256 for 16-bit inputs wider than 128)."""
    p2 = _p2(d)
    if arch == "interpret":
        bdo = max(16, min(p2, 512))
        return Tiles(16, max(16, min(64, p2)), bdo, bdo, min(bdo, 32))
    if _wide(dtype):
        bdo = 128 if d <= 128 else 256
        if arch == "sm_90":
            return Tiles(64, 64, bdo, bdo, min(bdo, 128))
        return Tiles(64, 64, bdo, 128, 64)
    return Tiles(32, 32, 128, 128, 128)


def block_e(e: int, dtype: torch.dtype, arch: str) -> int:
    """BLOCK_E: value columns per program of the softmax-weighted matmul (forward and dv)."""
    p2 = _p2(e)
    if arch == "interpret":
        return max(16, min(64, p2))
    return 64 if e <= 64 or not _wide(dtype) else 128


def e_step(dtype: torch.dtype, arch: str) -> int:
    """The k step over E of the g_out·vᵀ tile (fp32 operands) in the softmax-matmul gradient."""
    return 16 if arch == "interpret" else 32


#: top-k: the most columns one program keeps per row (BLOCK_K); larger k is sorted in row
#: blocks by torch (launchers._topk_blocked).
TOPK_MAX = {"interpret": 64, "sm_80": 64, "sm_90": 64}


def topk_tiles(k: int, d: int, dtype: torch.dtype, arch: str):
    """(BLOCK_M, BLOCK_K, BLOCK_D) of top-k, or None when k > TOPK_MAX[arch]."""
    bk = 16 if k <= 16 else 64
    if arch == "interpret":
        bk = max(16, _p2(k))
    if bk > TOPK_MAX[arch] or k > bk:
        return None
    t = tiles(d, dtype, arch)
    return 16, bk, t.bd


# ------------------------------------------------------------------------------ configs

#: (num_warps, num_stages, maxnreg) per arch, keyed by (kernel, kind) with "*" wildcards
#: (looked up most specific first); kind: "16" (fp16/bf16 inputs), "fp32" (exact FMA dots),
#: "tf32" (fp32 inputs, TF32 dots).  Each entry is what ``make triton-check`` compiles for that
#: arch without spills.  maxnreg: without a .maxnreg, ptxas caps some kernels' registers for
#: occupancy (64 or 128 at 8 warps) and spills to get there; with one, it fits them (set only
#: where that happens: an unneeded .maxnreg lets ptxas use more registers than it needs).
#: One config per entry for now (nothing measured on a GPU to choose between several): the
#: autotuner then never benchmarks, so a first launch inside a CUDA-graph capture is safe.  A
#: second config per entry makes it benchmark them at the first launch of each D (warm up
#: before capturing), and adds its specializations to the gate.
_CONFIGS = {
    "interpret": {("*", "*"): [(4, 1, None)]},
    "sm_80": {("*", "*"): [(8, 2, None)], ("topk", "*"): [(8, 2, 128)],
              ("grad_xy", "*"): [(8, 2, 255)], ("smm_dv", "*"): [(8, 2, 255)],
              ("smm_grad", "*"): [(8, 2, 255)], ("lse_rows", "tf32"): [(8, 2, 128)]},
    # exact fp32 (FMA dots): no software pipelining (at 3 stages ptxas holds the prefetched
    # operands in registers: 226 instead of 74 for _lse_rows)
    "sm_90": {("*", "*"): [(8, 3, None)], ("*", "fp32"): [(8, 1, None)],
              ("ms_mine", "fp32"): [(8, 1, 96)], ("siglip_grad", "tf32"): [(8, 3, 160)],
              ("lse_rows", "tf32"): [(8, 3, 128)], ("grad_rows", "tf32"): [(8, 3, 168)]},
}


def kind(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "16" if _wide(dtype) else ("tf32" if allow_tf32 else "fp32")


def arch_configs(name: str, arch: str, kind: str) -> list[tuple[int, int, int | None]]:
    table = _CONFIGS[arch]
    for key in ((name, kind), (name, "*"), ("*", kind), ("*", "*")):
        if key in table:
            return table[key]
    raise KeyError((arch, name, kind))


def _key(c):
    return (c.num_warps, c.num_stages, c.maxnreg)


#: Every config any arch offers; ``prune`` keeps the launch's.
ALL_CONFIGS = [triton.Config({}, num_warps=w, num_stages=st, maxnreg=r)
               for w, st, r in sorted({c for t in _CONFIGS.values() for cs in t.values()
                                       for c in cs}, key=str)]


def _pruner(name):
    def prune(configs, named_args, **kwargs):
        """``early_config_prune``: the configs of the launch's arch and tiles (one under the
        interpreter, where warps and stages change nothing and benchmarking cannot run)."""
        x = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
        want = arch_configs(name, arch_for(x.device), kind(x.dtype, kwargs["ALLOW_TF32"]))
        out = [c for c in configs if _key(c) in want]
        return out[:1] if INTERPRET else out
    return prune


def tuned(name, fn, reset=()):
    """``triton.autotune`` keyed on D (the kernel argument ``d``; Triton adds the tensor dtypes
    to the key).  ``reset``: the outputs a kernel accumulates into atomically, zeroed before
    every benchmarked run."""
    return triton.autotune(configs=ALL_CONFIGS, key=["d"], reset_to_zero=list(reset) or None,
                           prune_configs_by={"early_config_prune": _pruner(name)})(fn)
