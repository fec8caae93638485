"""The ``cpu`` backend: the compiled C++ kernels of ``fused_losses._C`` (csrc/cpu_ops.cpp).

Implements the kernel contract of ``kernels.py``; ``fused.py`` builds the ops on top.  fp32 and
fp64 run natively; fp16/bf16 inputs are upcast to fp32 (O((N+M)·D) copies) and computed in fp32.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..fused import register_fused_backend


def _ops():
    return torch.ops.fused_losses_C


def _native(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.contiguous()


def _mask_args(mask):
    return (mask.labels, mask.key_labels, mask.n_keys, mask.offset, mask.exclude_diagonal,
            mask.decoupled, mask.no_positives)


def _c(t):
    return None if t is None else t.contiguous()


class CpuKernels:
    """Kernel contract over torch.ops.fused_losses_C.*."""

    def contrastive_fwd(self, x, y, scale, bias, mask, want_cols, ratio=None):
        x, y = _native(x), _native(y)
        out = _ops().contrastive_fwd(x, y, scale, _c(bias), *_mask_args(mask), want_cols,
                                     ratio=ratio)
        if ratio is not None:
            return (*out[:3], None, None, None, out[3])
        if want_cols:
            return tuple(out)
        return (*out, None, None, None)

    def contrastive_bwd(self, x, y, scale, bias, mask, row_lse, g_row, g_rowpos, col_lse, g_col,
                        g_colpos, ratio=None, row_lse2=None, g_row2=None):
        x, y = _native(x), _native(y)
        out = _ops().contrastive_bwd(x, y, scale, _c(bias), *_mask_args(mask), row_lse,
                                     g_row.contiguous(), g_rowpos.contiguous(), _c(col_lse),
                                     _c(g_col), _c(g_colpos), ratio=ratio, row_lse2=_c(row_lse2),
                                     g_row2=_c(g_row2))
        dx, dy, dscale = out[0], out[1], out[2]
        return dx, dy, dscale, (out[3] if bias is not None else None)


    def siglip_fwd(self, x, y, scale, bias, offset):
        return _ops().siglip_fwd(_native(x), _native(y), scale, bias, offset)[0]

    def siglip_bwd(self, x, y, scale, bias, offset, g_row):
        return tuple(_ops().siglip_bwd(_native(x), _native(y), scale, bias, offset, g_row))

    def ms_mine(self, x, y, labels, ref_labels, offset, exclude_self):
        return tuple(_ops().ms_mine(_native(x), _native(y), labels.contiguous(),
                                    ref_labels.contiguous(), offset, exclude_self))

    def ms_fwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg):
        return tuple(_ops().ms_fwd(_native(x), _native(y), labels.contiguous(),
                                   ref_labels.contiguous(), offset, exclude_self, alpha, beta,
                                   base, epsilon, min_pos, max_neg))

    def ms_mine_fwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base,
                    epsilon):
        return tuple(_ops().ms_mine_fwd(_native(x), _native(y), labels.contiguous(),
                                        ref_labels.contiguous(), offset, exclude_self, alpha,
                                        beta, base, epsilon))

    def ms_bwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg, pos_lse, neg_lse, g):
        return tuple(_ops().ms_bwd(_native(x), _native(y), labels.contiguous(),
                                   ref_labels.contiguous(), offset, exclude_self, alpha, beta,
                                   base, epsilon, min_pos, max_neg, pos_lse, neg_lse, g))


    def softmax_matmul_fwd(self, x, y, v, scale, bias):
        x, y = _native(x), _native(y)
        return tuple(_ops().softmax_matmul_fwd(x, y, v.to(x.dtype).contiguous(), scale,
                                               _c(bias)))

    def softmax_matmul_bwd(self, x, y, v, scale, bias, out, lse, g_out):
        x, y = _native(x), _native(y)
        res = _ops().softmax_matmul_bwd(x, y, v.to(x.dtype).contiguous(), scale, _c(bias),
                                        out.contiguous(), lse.contiguous(),
                                        g_out.to(x.dtype).contiguous())
        return res[0], res[1], res[2], res[3], (res[4] if bias is not None else None)


    def topk(self, x, y, k, exclude_diagonal):
        return tuple(_ops().topk(_native(x), _native(y), k, exclude_diagonal))


def _availability():
    why = _ext.cpu_ext_unavailable_reason()  # loads (or compiles) fused_losses._C, once
    if why is None and not _fakes_registered:
        _register_fakes()
    return why


def _op_priority(op, tensors):
    """Under ``backend="auto"`` the cpu backend ranks first on CPU tensors; a call it cannot
    take because its extension is unavailable falls to slower code: say so, once."""
    why = _availability()
    if why is not None and op in CPU.ops and any(t.device.type == "cpu" for t in tensors):
        _ext.fallback_notice("cpu", op, why)
    return CPU.priority


# Fake (meta) implementations of the compiled kernels: output shapes and dtypes only, so that
# torch.compile can trace through fused.py's autograd Functions with these ops left opaque.
def _vec(t, n):
    return t.new_empty((n,))


def _fake_contrastive_fwd(x, y, scale, bias, labels, key_labels, n_keys, offset,
                          exclude_diagonal, decoupled, no_positives, want_cols, ratio=None):
    n = x.shape[0]
    out = [_vec(x, n), _vec(x, n), _vec(x, n)]
    if ratio is not None:
        out.append(_vec(x, n))
    elif want_cols:
        out += [_vec(x, n_keys), _vec(x, n_keys), _vec(x, n_keys)]
    return out


def _fake_contrastive_bwd(x, y, scale, bias, labels, key_labels, n_keys, offset,
                          exclude_diagonal, decoupled, no_positives, row_lse, g_row, g_rowpos,
                          col_lse, g_col, g_colpos, ratio=None, row_lse2=None, g_row2=None):
    out = [torch.empty_like(x), torch.empty_like(y), x.new_empty(())]
    return out + ([_vec(x, y.shape[0])] if bias is not None else [])


def _fake_pair_rows(x, y, *args):  # (N,) × 2: ms_mine, ms_fwd
    return [_vec(x, x.shape[0]), _vec(x, x.shape[0])]


def _fake_ms_mine_fwd(x, y, *args):
    return [_vec(x, x.shape[0]) for _ in range(4)]


def _fake_grads(x, y, *args):  # ms_bwd
    return [torch.empty_like(x), torch.empty_like(y)]


def _fake_siglip_fwd(x, y, scale, bias, offset):
    return [_vec(x, x.shape[0])]


def _fake_siglip_bwd(x, y, scale, bias, offset, g_row):
    return [torch.empty_like(x), torch.empty_like(y), x.new_empty(()), x.new_empty(())]


def _fake_softmax_matmul_fwd(x, y, v, scale, bias):
    return [x.new_empty((x.shape[0], v.shape[1])), _vec(x, x.shape[0])]


def _fake_softmax_matmul_bwd(x, y, v, scale, bias, out, lse, g_out):
    res = [torch.empty_like(x), torch.empty_like(y), x.new_empty(v.shape), x.new_empty(())]
    return res + ([_vec(x, y.shape[0])] if bias is not None else [])


def _fake_topk(x, y, k, exclude_diagonal):
    return [x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)]


_FAKES = {
    "contrastive_fwd": _fake_contrastive_fwd, "contrastive_bwd": _fake_contrastive_bwd,
    "siglip_fwd": _fake_siglip_fwd, "siglip_bwd": _fake_siglip_bwd,
    "ms_mine": _fake_pair_rows, "ms_fwd": _fake_pair_rows, "ms_mine_fwd": _fake_ms_mine_fwd,
    "ms_bwd": _fake_grads, "softmax_matmul_fwd": _fake_softmax_matmul_fwd,
    "softmax_matmul_bwd": _fake_softmax_matmul_bwd, "topk": _fake_topk,
}


_fakes_registered = False


@torch.compiler.disable
def _register_fakes():  # once the extension is loaded (its ops exist)
    global _fakes_registered
    _fakes_registered = True
    for name, fn in _FAKES.items():
        torch.library.register_fake(f"fused_losses_C::{name}", fn)


if _ext.preload("_C") is not None:  # already built for this torch: its ops exist from import on
    _register_fakes()


CPU = register_fused_backend(
    "cpu",
    priority=30,
    devices={"cpu"},
    dtypes={torch.float32, torch.float64, torch.float16, torch.bfloat16},
    kernels=CpuKernels(),
    availability=_availability,
    ops=["info_nce", "hard_negative_info_nce", "pairwise_logsumexp", "siglip",
         "multi_similarity", "pairwise_softmax_matmul", "similarity_topk", "ot_softmin",
         "ot_grad", "ot_plan_matmul"],
)
CPU.op_priority = _op_priority
