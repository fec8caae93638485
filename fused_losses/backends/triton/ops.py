"""torch.library custom ops: each kernel entry point is one opaque op with a fake (shapes and
dtypes only), so torch.compile(fullgraph=True) traces fused.py's autograd Functions with the
Triton launches left as single graph nodes (``torch.library.triton_op`` would let inductor see
inside, but does not trace under the interpreter; NOTES.md).  Outputs are fp32 (the acc dtype of
this backend); an absent optional output is a (0,) tensor.  The bodies are launchers.py's."""

from __future__ import annotations

from typing import Optional

import torch

from . import launchers as L

_LIB = "fused_losses_triton"
T = torch.Tensor
OptT = Optional[torch.Tensor]


def _vec(t, n):
    return t.new_empty((n,), dtype=torch.float32)


def _mat(t, shape):
    return t.new_empty(shape, dtype=torch.float32)


def _def(name, impl, fake):
    op = torch.library.custom_op(f"{_LIB}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


def _contrastive_fwd_op(x: T, y: T, scale: T, bias: OptT, labels: OptT, key_labels: OptT,
                        n_keys: int, offset: int, exclude_diagonal: bool, decoupled: bool,
                        no_positives: bool, want_cols: bool, ratio: float | None = None
                        ) -> tuple[T, T, T, T, T, T, T]:
    return L._contrastive_fwd(x, y, scale, bias, labels, key_labels, n_keys, offset,
                            exclude_diagonal, decoupled, no_positives, want_cols, ratio)


def _contrastive_fwd_fake(x, y, scale, bias, labels, key_labels, n_keys, offset,
                          exclude_diagonal, decoupled, no_positives, want_cols, ratio=None):
    n, c = x.shape[0], (n_keys if want_cols else 0)
    return (tuple(_vec(x, n) for _ in range(3)) + tuple(_vec(x, c) for _ in range(3))
            + (_vec(x, n if ratio is not None else 0),))


def _contrastive_bwd_op(x: T, y: T, scale: T, bias: OptT, labels: OptT, key_labels: OptT,
                        n_keys: int, offset: int, exclude_diagonal: bool, decoupled: bool,
                        no_positives: bool, row_lse: T, g_row: T, g_rowpos: T, col_lse: OptT,
                        g_col: OptT, g_colpos: OptT, ratio: float | None = None,
                        row_lse2: OptT = None, g_row2: OptT = None) -> tuple[T, T, T, T]:
    return L._contrastive_bwd(x, y, scale, bias, labels, key_labels, n_keys, offset,
                            exclude_diagonal, decoupled, no_positives, row_lse, g_row, g_rowpos,
                            col_lse, g_col, g_colpos, ratio, row_lse2, g_row2)


def _contrastive_bwd_fake(x, y, scale, bias, *args):
    return (_mat(x, x.shape), _mat(y, y.shape), _mat(x, ()),
            _vec(x, y.shape[0] if bias is not None else 0))


def _siglip_fwd_op(x: T, y: T, scale: T, bias: T, offset: int) -> T:
    return L._siglip_fwd(x, y, scale, bias, offset)


def _siglip_bwd_op(x: T, y: T, scale: T, bias: T, offset: int, g_row: T) -> tuple[T, T, T, T]:
    return L._siglip_bwd(x, y, scale, bias, offset, g_row)


def _ms_mine_op(x: T, y: T, labels: T, ref_labels: T, offset: int, exclude_self: bool
                ) -> tuple[T, T]:
    return L._ms_mine(x, y, labels, ref_labels, offset, exclude_self)


def _ms_fwd_op(x: T, y: T, labels: T, ref_labels: T, offset: int, exclude_self: bool,
               alpha: float, beta: float, base: float, epsilon: float | None,
               min_pos: OptT, max_neg: OptT) -> tuple[T, T]:
    return L._ms_fwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
                   min_pos, max_neg)


def _ms_bwd_op(x: T, y: T, labels: T, ref_labels: T, offset: int, exclude_self: bool,
               alpha: float, beta: float, base: float, epsilon: float | None, min_pos: OptT,
               max_neg: OptT, pos_lse: T, neg_lse: T, g: T) -> tuple[T, T]:
    return L._ms_bwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
                   min_pos, max_neg, pos_lse, neg_lse, g)


def _smm_fwd_op(x: T, y: T, v: T, scale: T, bias: OptT) -> tuple[T, T]:
    return L._softmax_matmul_fwd(x, y, v, scale, bias)


def _smm_bwd_op(x: T, y: T, v: T, scale: T, bias: OptT, out: T, lse: T, g_out: T
                ) -> tuple[T, T, T, T, T]:
    return L._softmax_matmul_bwd(x, y, v, scale, bias, out, lse, g_out)


def _topk_op(x: T, y: T, k: int, exclude_diagonal: bool) -> tuple[T, T]:
    return L._topk(x, y, k, exclude_diagonal)


def _two_rows_fake(x, y, *args):
    return _vec(x, x.shape[0]), _vec(x, x.shape[0])


def _two_grads_fake(x, y, *args):
    return _mat(x, x.shape), _mat(y, y.shape)


OPS = {
    "contrastive_fwd": _def("contrastive_fwd", _contrastive_fwd_op, _contrastive_fwd_fake),
    "contrastive_bwd": _def("contrastive_bwd", _contrastive_bwd_op, _contrastive_bwd_fake),
    "siglip_fwd": _def("siglip_fwd", _siglip_fwd_op, lambda x, *a: _vec(x, x.shape[0])),
    "siglip_bwd": _def("siglip_bwd", _siglip_bwd_op,
                       lambda x, y, *a: (_mat(x, x.shape), _mat(y, y.shape), _mat(x, ()),
                                         _mat(x, ()))),
    "ms_mine": _def("ms_mine", _ms_mine_op, _two_rows_fake),
    "ms_fwd": _def("ms_fwd", _ms_fwd_op, _two_rows_fake),
    "ms_bwd": _def("ms_bwd", _ms_bwd_op, _two_grads_fake),
    "softmax_matmul_fwd": _def(
        "softmax_matmul_fwd", _smm_fwd_op,
        lambda x, y, v, *a: (_mat(x, (x.shape[0], v.shape[1])), _vec(x, x.shape[0]))),
    "softmax_matmul_bwd": _def(
        "softmax_matmul_bwd", _smm_bwd_op,
        lambda x, y, v, scale, bias, *a: (_mat(x, x.shape), _mat(y, y.shape),
                                          _mat(v, v.shape), _mat(x, ()),
                                          _vec(x, y.shape[0] if bias is not None else 0))),
    "topk": _def("topk", _topk_op,
                 lambda x, y, k, e: (_mat(x, (x.shape[0], k)),
                                     x.new_empty((x.shape[0], k), dtype=torch.int64))),
}
