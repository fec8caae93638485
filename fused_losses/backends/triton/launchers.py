"""Kernel launches: the Python bodies of the custom ops (ops.py).  Each picks the tiles of the
launch arch (tiles.py), allocates the O(N + M) outputs and launches the kernels of kernels.py
through ``_K`` (their ``triton.autotune`` wrappers; scripts/triton_check.py replaces ``_K`` by
recorders to learn exactly which specializations these launchers produce).

Passes over N·M·D (GEMM-sized tile products) for symmetric CLIP forward+backward:

- fused path (default; ``deterministic()``): forward ``_lse_rowcol`` = 1 (row LSE online in
  registers; column sums Σ_i exp(z_ij − cref_j) by fp32 atomics against the per-column norm
  bound cref_j = |scale|·max_i‖x_i‖·‖y_j‖ ≥ max_i z_ij, so no cross-program max merge is
  needed and the state stays O(M); columns whose sum that bound leaves unresolved (underflow
  below 2^-64, non-finite bound) are redone exactly by ``_lse_rows`` over those columns only,
  none for well-scaled inputs); backward ``_grad_xy`` = 3 (s, dZ·Y into dx in registers,
  dZᵀ·X into dy by fp32 atomics).  Total 4 (for D ≤ 512; larger D below).  The atomics
  make the last bits depend on scheduling order.
- deterministic path (``torch.use_deterministic_algorithms(True)``, or
  ``FUSED_LOSSES_DETERMINISTIC=1``, or ``DETERMINISTIC = True`` here): forward row pass +
  column pass = 2; backward row-parallel dx pass (s, dZ·Y) + column-parallel dy pass (s, dZᵀ·X)
  = 4.  Total 6, no atomics, bit-reproducible.
Both compute every s_ij with the same tile shape and feature loop, so the LSEs of either
forward are consistent with either backward.  No pass has been timed on a GPU.

Any D: the gradient kernels split the output features into chunks of at most BLOCK_DO on the
grid's second axis; each chunk recomputes the same similarity tiles over all of D (bit-identical
s_ij, which multi-similarity's hard mining threshold needs).  Nothing of size N×M is allocated:
buffers are O(N + M) plus one fp32 partial per program for the scalar gradients (summed in
fp64)."""

from __future__ import annotations

import os

import torch
import triton

from . import kernels as kern
from . import tiles as tl_tiles

_K = {
    "lse_rows": tl_tiles.tuned("lse_rows", kern._lse_rows),
    "grad_rows": tl_tiles.tuned("grad_rows", kern._grad_rows),
    "lse_rowcol": tl_tiles.tuned("lse_rowcol", kern._lse_rowcol,
                                 ("csum_ptr", "cpsum_ptr", "cpcnt_ptr")),
    "grad_xy": tl_tiles.tuned("grad_xy", kern._grad_xy, ("dy_ptr", "dbias_ptr")),
    "siglip_fwd": tl_tiles.tuned("siglip_fwd", kern._siglip_fwd_rows),
    "siglip_grad": tl_tiles.tuned("siglip_grad", kern._siglip_grad_rows),
    "ms_mine": tl_tiles.tuned("ms_mine", kern._ms_mine_rows),
    "ms_fwd": tl_tiles.tuned("ms_fwd", kern._ms_fwd_rows),
    "ms_grad": tl_tiles.tuned("ms_grad", kern._ms_grad_rows),
    "smm_fwd": tl_tiles.tuned("smm_fwd", kern._smm_fwd_rows),
    "smm_grad": tl_tiles.tuned("smm_grad", kern._smm_grad_rows),
    "smm_dv": tl_tiles.tuned("smm_dv", kern._smm_dv_rows),
    "topk": tl_tiles.tuned("topk", kern._topk_rows),
}


def _tiles(x: torch.Tensor) -> tl_tiles.Tiles:
    """The tiles of one op on x (its padded width, dtype and device: the launch arch's)."""
    return tl_tiles.tiles(x.shape[1], x.dtype, tl_tiles.arch_for(x.device))


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (then nothing may wait
    for the device)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _tf32(x: torch.Tensor) -> bool:
    """ALLOW_TF32 of the kernels: fp32 inputs use TF32 tensor cores only when PyTorch's own
    switch allows it for matmuls (SPEC §7; exact FMA dots otherwise).  For 16-bit inputs the
    similarity tile is a 16-bit MMA whatever the flag, and the fp32 products (dZ·B, P·V) use
    TF32: a 10-bit mantissa for dZ, more than a bf16/fp16 dZ would keep."""
    return x.dtype != torch.float32 or bool(torch.backends.cuda.matmul.allow_tf32)


# --------------------------------------------------------------------------------------------
# Deterministic or fused contrastive passes.

#: ``None`` (default): deterministic only when ``torch.use_deterministic_algorithms(True)`` is
#: on or the environment sets ``FUSED_LOSSES_DETERMINISTIC=1``; ``True``/``False`` force it.
DETERMINISTIC: bool | None = None


def deterministic() -> bool:
    """Which contrastive path runs (read at each call, inside the ops).

    - fused (default): forward = 1 similarity sweep (row LSE in registers, column sums by
      atomics against a norm-bound reference, plus an exact pass over only the columns that
      bound could not resolve); backward = 1 sweep with 3 GEMM-sized products (s, dZ·Y,
      dZᵀ·X with atomic dy).  Symmetric CLIP forward+backward: 4 N·M·D matmul passes.
      Run-to-run differences are fp32 atomic-order rounding only (well inside SPEC §7).
    - deterministic: forward = row pass + column pass (2 similarity GEMMs); backward = a
      row-parallel dx pass and a column-parallel dy pass, each recomputing s (4 GEMMs): 6
      passes, no atomics, bit-reproducible.
    The default follows PyTorch's own convention (atomics unless deterministic algorithms are
    requested).  Neither path has been timed on a GPU."""
    if DETERMINISTIC is not None:
        return bool(DETERMINISTIC)
    if os.environ.get("FUSED_LOSSES_DETERMINISTIC", "") not in ("", "0"):
        return True
    return torch.are_deterministic_algorithms_enabled()


# One-sweep column sums below this are re-done exactly: then every term that matters is a
# normal fp32 number (terms flushed below 2^-126 lose at most N·2^-126, relative ≤ N·2^-62).
_COL_SUM_FLOOR = 2.0 ** -64


# --------------------------------------------------------------------------------------------
# Kernel launches (the bodies of the custom ops, ops.py).
#
# What the kernels see is normalized here so that one compiled kernel serves every call (and
# scripts/triton_check.py can compile all of them): inputs contiguous with 16-byte aligned data
# (a copy only when the caller's view is not), matrices padded with zero features to a width
# that is a multiple of 16 (a copy only when D is not; zeros change no dot product, and every
# pass of an op sees the same padded rows), gradient outputs allocated padded and cut back.

def _in(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _w16(w: int) -> int:
    return max(16, -(-w // 16) * 16)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (R, W) input as the kernels take it: W padded with zeros to a multiple of 16."""
    w = t.shape[1]
    if w % 16 == 0:
        return _in(t)
    out = t.new_zeros((t.shape[0], _w16(w)))
    out[:, :w] = t
    return out


def _out(n: int, w: int, device) -> torch.Tensor:
    """An fp32 (n, W16) output; ``_cut`` returns its first w columns."""
    return torch.empty(n, _w16(w), dtype=torch.float32, device=device)


def _cut(t: torch.Tensor, w: int) -> torch.Tensor:
    return t if t.shape[1] == w else t[:, :w].contiguous()


def _labels(labels, key_labels, device):
    if labels is None:
        z = torch.zeros(1, dtype=torch.long, device=device)
        return z, z
    return _in(labels), _in(key_labels)


def _f32(n, device):
    return torch.empty(n, dtype=torch.float32, device=device)


def _vecs(*ts):
    """fp32, contiguous, aligned vectors (None stays None)."""
    return tuple(None if t is None else _in(t.float()) for t in ts)


def _mask_kw(labels, excl, decoupled, no_pos):
    return dict(has_labels=labels is not None, no_pos=no_pos, excl=excl, decoupled=decoupled)


def _kw(t: tl_tiles.Tiles, x: torch.Tensor):
    return dict(ALLOW_TF32=_tf32(x), BLOCK_M=t.bm, BLOCK_N=t.bm, BLOCK_D=t.bd)


def _rows_pass(a, b, scale, bias, labels, key_labels, n_keys, offset, excl, decoupled, no_pos,
               transposed, tiles, out=None, idx=None, flags=None, ratio=None):
    """Row statistics of a against b (TRANSPOSED: the columns of the original problem).
    Only some rows, written into ``out`` at their own indices: ``idx`` (int32, the rows) or
    ``flags`` (int32 per row, nonzero = do it; no host sync).  ``ratio``: also the second row
    LSE at ratio·z, returned fourth."""
    n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
    if out is None:
        out = (_f32(n_a, a.device), _f32(n_a, a.device), _f32(n_a, a.device))
    lse, psum, pcnt = out
    lse2 = _f32(n_a if ratio is not None else 0, a.device)
    lab, klab = _labels(labels, key_labels, a.device)
    sel = idx if idx is not None else flags
    n_sel = n_a if idx is None else idx.shape[0]
    if sel is None:
        sel = torch.zeros(1, dtype=torch.int32, device=a.device)
    _K["lse_rows"][(triton.cdiv(n_sel, tiles.bm),)](
        a, b, scale, bias if bias is not None else lse, lab, klab, lse, psum, pcnt, sel,
        lse2 if ratio is not None else lse, n_sel, n_a, n_b, d, a.stride(0), b.stride(0),
        n_keys, offset, 0.0 if ratio is None else float(ratio), bias is not None,
        labels is not None, no_pos, excl, decoupled, idx is not None, flags is not None,
        HAS2=ratio is not None, TRANSPOSED=transposed, **_kw(tiles, a))
    return (lse, psum, pcnt) if ratio is None else (lse, psum, pcnt, lse2)


def _rowcol_pass(x, y, scale, labels, key_labels, n_keys, offset, excl, decoupled, no_pos,
                 tiles):
    """Fused forward: row and column statistics in one sweep, then the exact column pass over
    only the columns whose one-sweep sum is not resolved (none, for well-scaled inputs): by
    their indices (one host sync, O(M)), or, while a CUDA graph is being captured, by a flag
    per column (no sync; every row block with a flagged column redoes its columns)."""
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    dev = x.device
    keys = y[:n_keys]
    # cref_j = |scale| · max_i ‖x_i‖ · ‖y_j‖ ≥ max_i z_ij (Cauchy–Schwarz), inflated by 2^-9
    # relative so that rounding of s (tf32 included) never puts a term above it.
    xmax = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).max()
    cref = (scale.abs() * xmax * torch.linalg.vector_norm(keys, dim=1, dtype=torch.float32)
            * (1.0 + 2.0 ** -9)).contiguous()
    row = (_f32(n, dev), _f32(n, dev), _f32(n, dev))
    csum, cpsum, cpcnt = (torch.zeros(n_keys, dtype=torch.float32, device=dev)
                          for _ in range(3))
    lab, klab = _labels(labels, key_labels, dev)
    _K["lse_rowcol"][(triton.cdiv(n, tiles.bm),)](
        x, y, scale, cref, lab, klab, *row, csum, cpsum, cpcnt, n, m, d, x.stride(0),
        y.stride(0), n_keys, offset, **_mask_kw(labels, excl, decoupled, no_pos),
        **_kw(tiles, x))
    # A NaN sum is a NaN column (kept); 0/tiny sums (an empty column, or a reference far above
    # the column's max) and a non-finite reference go to the exact pass.
    col_lse = cref + torch.log(csum)
    redo = (csum < _COL_SUM_FLOOR) | torch.isinf(csum) | ~torch.isfinite(cref)
    rest = dict(out=(col_lse, cpsum, cpcnt))
    if capturing():
        rest["flags"] = redo.to(torch.int32)
    else:
        idx = torch.nonzero(redo).flatten().to(torch.int32)  # host sync, O(M)
        if idx.numel() == 0:
            return (*row, col_lse, cpsum, cpcnt)
        rest["idx"] = idx
    _rows_pass(keys, x, scale, None, labels, key_labels, n_keys, offset, excl, decoupled,
               no_pos, True, tiles, **rest)
    return (*row, col_lse, cpsum, cpcnt)


def _contrastive_fwd(x, y, scale, bias, labels, key_labels, n_keys, offset, excl, decoupled,
                     no_pos, want_cols, ratio=None):
    """Row (and column) statistics; the seventh output is the second row LSE at ratio·z
    ((0,) without ``ratio``)."""
    x, y = _rows(x), _rows(y)
    (scale,) = _vecs(scale.reshape(1))
    tiles = _tiles(x)
    none = _f32(0, x.device)
    if want_cols and not deterministic():
        return (*_rowcol_pass(x, y, scale, labels, key_labels, n_keys, offset, excl, decoupled,
                              no_pos, tiles), none)
    (b,) = _vecs(bias)
    row = _rows_pass(x, y, scale, b, labels, key_labels, n_keys, offset, excl, decoupled, no_pos,
                     False, tiles, ratio=ratio)
    if ratio is not None:
        return (*row[:3], *(_f32(0, x.device) for _ in range(3)), row[3])
    if not want_cols:
        return (*row, *(_f32(0, x.device) for _ in range(3)), none)
    col = _rows_pass(y[:n_keys], x, scale, None, labels, key_labels, n_keys, offset, excl,
                     decoupled, no_pos, True, tiles)
    return (*row, *col, none)


def _grad_pass(a, b, scale, biasc, biasr, lse_a, g_a, gp_a, lse_b, g_b, gp_b, labels,
               key_labels, n_keys, offset, excl, decoupled, no_pos, transposed, tiles,
               second=None):
    """``second``: (ratio, row_lse2, g_row2) of the query rows (the rows, or the columns
    when ``transposed``), or None."""
    n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
    out = _out(n_a, d, a.device)
    grid = triton.cdiv(n_a, tiles.bm)
    dscale = _f32(grid, a.device)
    bterm = _f32(n_a, a.device)
    lab, klab = _labels(labels, key_labels, a.device)
    has_b = lse_b is not None
    ratio, lse2, g2 = second if second is not None else (0.0, lse_a, g_a)
    _K["grad_rows"][(grid, triton.cdiv(d, tiles.bdo))](
        a, b, out, scale, biasc if biasc is not None else dscale,
        biasr if biasr is not None else dscale, lse_a, g_a, gp_a,
        lse_b if has_b else lse_a, g_b if has_b else g_a, gp_b if has_b else gp_a,
        lab, klab, dscale, bterm, lse2, g2, n_a, n_b, d, a.stride(0), b.stride(0),
        out.stride(0), n_keys, offset, float(ratio), biasc is not None, biasr is not None,
        has_b, **_mask_kw(labels, excl, decoupled, no_pos), HAS2=second is not None,
        TRANSPOSED=transposed, BLOCK_DO=tiles.bdo, **_kw(tiles, a))
    return out, dscale, bterm


def _grad_xy_spills(x, second) -> bool:
    """The one-sweep backward with the second row LSE in exact fp32 on sm_90 needs more than
    255 registers (make triton-check: 24 spill stores); the two-pass backward (_grad_rows)
    compiles there without spills, so that launch takes it (one more similarity recompute)."""
    return (second is not None and tl_tiles.arch_for(x.device) == "sm_90"
            and tl_tiles.kind(x.dtype, _tf32(x)) == "fp32")


def _contrastive_bwd(x, y, scale, bias, labels, key_labels, n_keys, offset, excl, decoupled,
                     no_pos, row_lse, g_row, g_rowpos, col_lse, g_col, g_colpos, ratio=None,
                     row_lse2=None, g_row2=None):
    d0 = x.shape[1]
    x, y = _rows(x), _rows(y)
    (scale,) = _vecs(scale.reshape(1))
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    b, row_lse, g_row, g_rowpos = _vecs(bias, row_lse, g_row, g_rowpos)
    second = None
    if ratio is not None:
        second = (float(ratio), *_vecs(row_lse2, g_row2))
    if col_lse is not None:
        # Column statistics over all M columns (extra negatives take no column term).
        pad = torch.zeros(m - n_keys, **f32)
        col_lse, g_col, g_colpos = (torch.cat([t.float(), pad])
                                    for t in (col_lse, g_col, g_colpos))
    mk = dict(labels=labels, key_labels=key_labels, n_keys=n_keys, offset=offset, excl=excl,
              decoupled=decoupled, no_pos=no_pos)
    if not deterministic() and not _grad_xy_spills(x, second):
        grid = (triton.cdiv(n, tiles.bm), triton.cdiv(d, tiles.bdo_xy))
        dx = _out(n, d, x.device)
        dy = torch.zeros(m, d, **f32)
        parts = torch.empty(grid[0], **f32)
        dbias = torch.zeros(m if b is not None else 0, **f32)
        has_col = col_lse is not None
        lab, klab = _labels(labels, key_labels, x.device)
        ratio2, lse2, g2 = second if second is not None else (0.0, row_lse, g_row)
        _K["grad_xy"][grid](
            x, y, dx, dy, scale, b if b is not None else parts, row_lse, g_row, g_rowpos,
            col_lse if has_col else row_lse, g_col if has_col else g_row,
            g_colpos if has_col else g_rowpos, lab, klab, parts,
            dbias if b is not None else parts, lse2, g2, n, m, d, x.stride(0), y.stride(0),
            dx.stride(0), dy.stride(0), n_keys, offset, ratio2, b is not None, has_col,
            **_mask_kw(labels, excl, decoupled, no_pos), HAS2=second is not None,
            BLOCK_DO=tiles.bdo_xy, BLOCK_DY=tiles.bdy, **_kw(tiles, x))
        return _cut(dx, d0), _cut(dy, d0), parts.double().sum().float(), dbias
    # dx: rows = queries; a-side = row statistics, b-side = column statistics.
    dx, dscale_parts, _ = _grad_pass(x, y, scale, b, None, row_lse, g_row, g_rowpos, col_lse,
                                     g_col, g_colpos, transposed=False, tiles=tiles,
                                     second=second, **mk)
    # dy: rows = keys (and extra negatives); a-side = column statistics (zero where there
    # are none), b-side = row statistics; the row-side bias now indexes the rows.
    zeros_m = torch.zeros(m, **f32)
    a_lse = col_lse if col_lse is not None else zeros_m
    a_g = g_col if g_col is not None else zeros_m
    a_gp = g_colpos if g_colpos is not None else zeros_m
    dy, _, bterm = _grad_pass(y, x, scale, None, b, a_lse, a_g, a_gp, row_lse, g_row, g_rowpos,
                              transposed=True, tiles=tiles, second=second, **mk)
    dscale = dscale_parts.double().sum().float()
    return (_cut(dx, d0), _cut(dy, d0), dscale,
            (bterm if b is not None else _f32(0, x.device)))


def _siglip_fwd(x, y, scale, bias, offset):
    x, y = _rows(x), _rows(y)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(x)
    out = _f32(n, x.device)
    scale, bias = _vecs(scale.reshape(1), bias.reshape(1))
    _K["siglip_fwd"][(triton.cdiv(n, tiles.bm),)](
        x, y, scale, bias, out, n, m, d, x.stride(0), y.stride(0), offset, **_kw(tiles, x))
    return out


def _siglip_bwd(x, y, scale, bias, offset, g_row):
    d0 = x.shape[1]
    x, y = _rows(x), _rows(y)
    scale, bias, g = _vecs(scale.reshape(1), bias.reshape(1), g_row)
    d = x.shape[1]
    tiles = _tiles(x)
    outs = []
    for a, b, transposed in ((x, y, False), (y, x, True)):
        grid = triton.cdiv(a.shape[0], tiles.bm)
        out = _out(a.shape[0], d, a.device)
        parts = torch.empty(grid, 2, dtype=torch.float32, device=a.device)
        _K["siglip_grad"][(grid, triton.cdiv(d, tiles.bdo))](
            a, b, out, scale, bias, g, parts, a.shape[0], b.shape[0], d, a.stride(0),
            b.stride(0), out.stride(0), x.shape[0], offset, TRANSPOSED=transposed,
            BLOCK_DO=tiles.bdo, **_kw(tiles, x))
        outs.append((out, parts))
    # per-program fp32 partials, summed in fp64 (the contract's rule for these scalars)
    sums = outs[0][1].double().sum(0)
    return _cut(outs[0][0], d0), _cut(outs[1][0], d0), sums[0].float(), sums[1].float()


def _ms_consts(alpha, beta, base, epsilon):
    return (float(alpha), float(beta), float(base),
            0.0 if epsilon is None else float(epsilon), epsilon is not None)


def _ms_mine(x, y, labels, ref_labels, offset, exclude_self):
    x, y = _rows(x), _rows(y)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(x)
    min_pos, max_neg = _f32(n, x.device), _f32(n, x.device)
    _K["ms_mine"][(triton.cdiv(n, tiles.bm),)](
        x, y, _in(labels), _in(ref_labels), min_pos, max_neg, n, m, d, x.stride(0),
        y.stride(0), offset, exclude_self, **_kw(tiles, x))
    return min_pos, max_neg


def _ms_fwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
            min_pos, max_neg):
    x, y = _rows(x), _rows(y)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(x)
    pos_lse, neg_lse = _f32(n, x.device), _f32(n, x.device)
    mp, mn = _vecs(min_pos, max_neg)
    _K["ms_fwd"][(triton.cdiv(n, tiles.bm),)](
        x, y, _in(labels), _in(ref_labels), pos_lse if mp is None else mp,
        pos_lse if mn is None else mn, pos_lse, neg_lse, n, m, d, x.stride(0), y.stride(0),
        offset, *_ms_consts(alpha, beta, base, epsilon), exclude_self, **_kw(tiles, x))
    return pos_lse, neg_lse


def _ms_bwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
            min_pos, max_neg, pos_lse, neg_lse, g):
    d0 = x.shape[1]
    x, y = _rows(x), _rows(y)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(x)
    g, pos_lse, neg_lse, mp, mn = _vecs(g, pos_lse, neg_lse, min_pos, max_neg)
    mp = pos_lse if mp is None else mp
    mn = pos_lse if mn is None else mn
    labels, ref_labels = _in(labels), _in(ref_labels)
    grads = []
    for a, b, transposed in ((x, y, False), (y, x, True)):
        out = _out(a.shape[0], d, x.device)
        _K["ms_grad"][(triton.cdiv(a.shape[0], tiles.bm), triton.cdiv(d, tiles.bdo))](
            a, b, out, labels, ref_labels, mp, mn, pos_lse, neg_lse, g, a.shape[0], b.shape[0],
            d, a.stride(0), b.stride(0), out.stride(0), n, m, offset,
            *_ms_consts(alpha, beta, base, epsilon), exclude_self, TRANSPOSED=transposed,
            BLOCK_DO=tiles.bdo, **_kw(tiles, x))
        grads.append(_cut(out, d0))
    return grads[0], grads[1]


def _topk(x, y, k, exclude_diagonal):
    x, y = _rows(x), _rows(y)
    n, m = x.shape[0], y.shape[0]
    arch = tl_tiles.arch_for(x.device)
    tk = tl_tiles.topk_tiles(k, x.shape[1], x.dtype, arch)
    if tk is None:  # k above what one program keeps in registers
        return _topk_blocked(x, y, k, exclude_diagonal)
    bm, bk, bd = tk
    vals = torch.empty(n, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    _K["topk"][(triton.cdiv(n, bm),)](
        x, y, vals, idx, n, m, x.shape[1], k, x.stride(0), y.stride(0), exclude_diagonal,
        ALLOW_TF32=_tf32(x), BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd)
    return vals, idx


#: Elements of one block of similarities in the large-k top-k (rows × M, fp32).
_TOPK_BLOCK_ELEMS = 1 << 24


def _topk_blocked(x, y, k, exclude_diagonal):
    """top-k for k above the kernel's register budget: rows in blocks of at most
    _TOPK_BLOCK_ELEMS similarities (never N×M), each block sorted stably (ties to the smaller
    index, NaN first, as the kernel).  −0.0 compares equal to +0.0 as in the kernel."""
    n, m = x.shape[0], y.shape[0]
    vals = torch.empty(n, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    yf = y.float()
    step = max(1, _TOPK_BLOCK_ELEMS // max(m, 1))
    for r0 in range(0, n, step):
        s = x[r0:r0 + step].float() @ yf.T
        if exclude_diagonal:
            r = torch.arange(r0, r0 + s.shape[0], device=x.device)
            s[r - r0, r] = float("-inf")
        sv, si = torch.sort(s, dim=1, descending=True, stable=True)
        vals[r0:r0 + step] = sv[:, :k] + 0.0
        idx[r0:r0 + step] = si[:, :k]
    return vals, idx


def _softmax_matmul_fwd(x, y, v, scale, bias):
    e0 = v.shape[1]
    x, y, v = _rows(x), _rows(y), _rows(v)
    n, m, d, e = x.shape[0], y.shape[0], x.shape[1], v.shape[1]
    tiles = _tiles(x)
    be = tl_tiles.block_e(e, x.dtype, tl_tiles.arch_for(x.device))
    out = _out(n, e, x.device)
    lse = _f32(n, x.device)
    scale, b = _vecs(scale.reshape(1), bias)
    _K["smm_fwd"][(triton.cdiv(n, tiles.bm), triton.cdiv(e, be))](
        x, y, v, scale, b if b is not None else lse, out, lse, n, m, d, e,
        x.stride(0), y.stride(0), v.stride(0), out.stride(0), b is not None,
        BLOCK_E=be, **_kw(tiles, x))
    return _cut(out, e0), lse


def _softmax_matmul_bwd(x, y, v, scale, bias, out, lse, g_out):
    d0 = x.shape[1]
    x, y = _rows(x), _rows(y)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    e0 = v.shape[1]
    tiles = _tiles(x)
    arch = tl_tiles.arch_for(x.device)
    # fp32, padded: O(M·E) and O(N·E); the g_out·v tile then dots fp32 with fp32
    v, g = _rows(v.float()), _rows(g_out.float())
    e = v.shape[1]
    scale, b, lse = _vecs(scale.reshape(1), bias, lse)
    delta = (g_out.float() * out.float()).sum(1)  # O(N·E)
    ek = tl_tiles.e_step(x.dtype, arch)
    grads, parts = [], []
    for a, bb, transposed in ((x, y, False), (y, x, True)):
        grid = triton.cdiv(a.shape[0], tiles.bm)
        o = _out(a.shape[0], d, x.device)
        part = torch.empty(grid + (m if transposed else 0), dtype=torch.float32,
                           device=x.device)
        _K["smm_grad"][(grid, triton.cdiv(d, tiles.bdo))](
            a, bb, o, scale, b if b is not None else lse, lse, delta, g, v, part, n, m, d, e,
            a.stride(0), bb.stride(0), o.stride(0), g.stride(0), v.stride(0), b is not None,
            TRANSPOSED=transposed, BLOCK_DO=tiles.bdo, BLOCK_E=ek, **_kw(tiles, x))
        grads.append(_cut(o, d0))
        parts.append((grid, part))
    be = tl_tiles.block_e(e, x.dtype, arch)
    dv = _out(m, e, x.device)
    _K["smm_dv"][(triton.cdiv(m, tiles.bm), triton.cdiv(e, be))](
        x, y, dv, scale, b if b is not None else lse, lse, g, n, m, d, e, x.stride(0),
        y.stride(0), dv.stride(0), g.stride(0), b is not None, BLOCK_E=be, **_kw(tiles, x))
    grid_y, part_y = parts[1]
    dscale = parts[0][1].double().sum().float()
    dbias = part_y[grid_y:].clone() if b is not None else _f32(0, x.device)
    return grads[0], grads[1], _cut(dv, e0), dscale, dbias
