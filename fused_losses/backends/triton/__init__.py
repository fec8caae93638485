"""The ``triton`` backend: Triton kernels for the fused-kernel contract (fused_losses/kernels.py).

Layout by role:

- ``kernels.py``: the ``@triton.jit`` kernels and their jit helpers (one tile loop, bit-identical
  s_ij in every pass of an op);
- ``tiles.py``: per-architecture tile tables and autotune configurations (``sm_80``, ``sm_90``;
  a small ``interpret`` table under ``TRITON_INTERPRET=1`` unless ``FUSED_LOSSES_TRITON_ARCH``
  names a GPU arch);
- ``launchers.py``: the Python launch functions (tiles, O(N + M) buffers, grids, the fused or
  deterministic contrastive paths);
- ``ops.py``: the ``torch.library`` custom ops (``fused_losses_triton::*``) over the launchers,
  with fakes, so the losses trace under ``torch.compile(fullgraph=True)``;
- this file: :class:`TritonKernels` (the contract over those ops) and the backend registration.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
``scripts/triton_check.py`` (``make triton-check``) compiles every specialization the launchers
produce for sm_80 and sm_90a ahead of time, with no GPU, and fails on register spills.
"""

from __future__ import annotations

import os

import torch

from ...fused import register_fused_backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: the backend reports why
    _IMPORT_ERROR = exc

if _IMPORT_ERROR is None:
    from .ops import OPS
else:
    OPS = {}


def _availability():
    if _IMPORT_ERROR is not None:
        return f"triton is not importable: {_IMPORT_ERROR}"
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
    return None


def _mask_args(mask):
    return (mask.labels, mask.key_labels, mask.n_keys, mask.offset, mask.exclude_diagonal,
            mask.decoupled, mask.no_positives)


class TritonKernels:
    """The kernel contract (kernels.py) over the ``fused_losses_triton::*`` custom ops."""

    def contrastive_fwd(self, x, y, scale, bias, mask, want_cols, ratio=None):
        out = OPS["contrastive_fwd"](x, y, scale, bias, *_mask_args(mask), want_cols,
                                     ratio=ratio)
        if ratio is not None:
            return (*out[:3], None, None, None, out[6])
        if not want_cols:
            return (*out[:3], None, None, None)
        return tuple(out[:6])

    def contrastive_bwd(self, x, y, scale, bias, mask, row_lse, g_row, g_rowpos, col_lse, g_col,
                        g_colpos, ratio=None, row_lse2=None, g_row2=None):
        dx, dy, dscale, dbias = OPS["contrastive_bwd"](
            x, y, scale, bias, *_mask_args(mask), row_lse, g_row, g_rowpos, col_lse, g_col,
            g_colpos, ratio=ratio, row_lse2=row_lse2, g_row2=g_row2)
        return dx, dy, dscale, (dbias if bias is not None else None)

    def siglip_fwd(self, x, y, scale, bias, offset):
        return OPS["siglip_fwd"](x, y, scale, bias, offset)

    def siglip_bwd(self, x, y, scale, bias, offset, g_row):
        return tuple(OPS["siglip_bwd"](x, y, scale, bias, offset, g_row))

    def ms_mine(self, x, y, labels, ref_labels, offset, exclude_self):
        return tuple(OPS["ms_mine"](x, y, labels, ref_labels, offset, exclude_self))

    def ms_fwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg):
        return tuple(OPS["ms_fwd"](x, y, labels, ref_labels, offset, exclude_self, float(alpha),
                                   float(beta), float(base),
                                   None if epsilon is None else float(epsilon), min_pos,
                                   max_neg))

    def ms_bwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg, pos_lse, neg_lse, g):
        return tuple(OPS["ms_bwd"](x, y, labels, ref_labels, offset, exclude_self, float(alpha),
                                   float(beta), float(base),
                                   None if epsilon is None else float(epsilon), min_pos,
                                   max_neg, pos_lse, neg_lse, g))

    def softmax_matmul_fwd(self, x, y, v, scale, bias):
        return tuple(OPS["softmax_matmul_fwd"](x, y, v, scale, bias))

    def softmax_matmul_bwd(self, x, y, v, scale, bias, out, lse, g_out):
        dx, dy, dv, dscale, dbias = OPS["softmax_matmul_bwd"](x, y, v, scale, bias, out, lse,
                                                              g_out)
        return dx, dy, dv, dscale, (dbias if bias is not None else None)

    def topk(self, x, y, k, exclude_diagonal):
        # values are made differentiable by fused.py (_GatheredDots), not by this op
        return tuple(OPS["topk"](x.detach(), y.detach(), k, exclude_diagonal))


TRITON = register_fused_backend(
    "triton",
    priority=20,
    devices={"cuda", "cpu"} if INTERPRET else {"cuda"},
    dtypes={torch.float32, torch.float16, torch.bfloat16},
    kernels=TritonKernels(),
    availability=_availability,
    ops=["info_nce", "hard_negative_info_nce", "pairwise_logsumexp", "siglip",
         "multi_similarity", "pairwise_softmax_matmul", "similarity_topk", "ot_softmin",
         "ot_grad", "ot_plan_matmul"],
)
