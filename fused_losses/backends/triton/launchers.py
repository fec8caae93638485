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
    "lse_rows": tl_tiles.tuned(kern._lse_rows),
    "grad_rows": tl_tiles.tuned(kern._grad_rows),
    "lse_rowcol": tl_tiles.tuned(kern._lse_rowcol, ("csum_ptr", "cpsum_ptr", "cpcnt_ptr")),
    "grad_xy": tl_tiles.tuned(kern._grad_xy, ("dy_ptr", "dbias_ptr")),
    "siglip_fwd": tl_tiles.tuned(kern._siglip_fwd_rows),
    "siglip_grad": tl_tiles.tuned(kern._siglip_grad_rows),
    "ms_mine": tl_tiles.tuned(kern._ms_mine_rows),
    "ms_fwd": tl_tiles.tuned(kern._ms_fwd_rows),
    "ms_grad": tl_tiles.tuned(kern._ms_grad_rows),
    "smm_fwd": tl_tiles.tuned(kern._smm_fwd_rows),
    "smm_grad": tl_tiles.tuned(kern._smm_grad_rows),
    "smm_dv": tl_tiles.tuned(kern._smm_dv_rows),
    "topk": tl_tiles.tuned(kern._topk_rows),
}


def _tiles(d: int, x: torch.Tensor):
    """The tiles of one op on x's device and dtype (the launch arch's table)."""
    return tl_tiles.tiles(d, x.dtype, tl_tiles.arch_for(x.device))


def _tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


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
# Kernel launches (the bodies of the custom ops below).

def _labels(labels, key_labels, device):
    if labels is None:
        z = torch.zeros(1, dtype=torch.long, device=device)
        return z, z
    return labels.contiguous(), key_labels.contiguous()


def _f32(n, device):
    return torch.empty(n, dtype=torch.float32, device=device)


def _mask_kw(labels, excl, decoupled, no_pos):
    return dict(HAS_LABELS=labels is not None, NO_POS=no_pos, EXCL=excl, DECOUPLED=decoupled)


def _rows_pass(a, b, scale, bias, labels, key_labels, n_keys, offset, excl, decoupled, no_pos,
               transposed, tiles, out=None, idx=None):
    """Row statistics of a against b (TRANSPOSED: the columns of the original problem).
    ``idx``: only those rows (written into ``out`` at their own indices)."""
    n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
    bm, bd, _ = tiles
    if out is None:
        out = (_f32(n_a, a.device), _f32(n_a, a.device), _f32(n_a, a.device))
    lse, psum, pcnt = out
    lab, klab = _labels(labels, key_labels, a.device)
    n_rows = n_a if idx is None else idx.shape[0]
    _K["lse_rows"][(triton.cdiv(n_rows, bm),)](
        a, b, scale, bias if bias is not None else lse, lab, klab, lse, psum, pcnt,
        idx if idx is not None else lab, n_rows, n_a, n_b, d, a.stride(0), b.stride(0), n_keys,
        offset, HAS_BIAS=bias is not None, TRANSPOSED=transposed, HAS_IDX=idx is not None,
        ALLOW_TF32=_tf32(), BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd,
        **_mask_kw(labels, excl, decoupled, no_pos))
    return lse, psum, pcnt


def _rowcol_pass(x, y, scale, labels, key_labels, n_keys, offset, excl, decoupled, no_pos,
                 tiles):
    """Fused forward: row and column statistics in one sweep, then the exact column pass over
    only the columns whose one-sweep sum is not resolved (none, for well-scaled inputs)."""
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    bm, bd, _ = tiles
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
    _K["lse_rowcol"][(triton.cdiv(n, bm),)](
        x, y, scale, cref, lab, klab, *row, csum, cpsum, cpcnt, n, m, d, x.stride(0),
        y.stride(0), n_keys, offset, ALLOW_TF32=_tf32(), BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd,
        **_mask_kw(labels, excl, decoupled, no_pos))
    # A NaN sum is a NaN column (kept); 0/tiny sums (an empty column, or a reference far above
    # the column's max) and a non-finite reference go to the exact pass.
    col_lse = cref + torch.log(csum)
    redo = (csum < _COL_SUM_FLOOR) | torch.isinf(csum) | ~torch.isfinite(cref)
    idx = torch.nonzero(redo).flatten()  # host sync, O(M)
    if idx.numel() > 0:
        _rows_pass(keys, x, scale, None, labels, key_labels, n_keys, offset, excl, decoupled,
                   no_pos, True, tiles, out=(col_lse, cpsum, cpcnt), idx=idx)
    return (*row, col_lse, cpsum, cpcnt)


def _contrastive_fwd(x, y, scale, bias, labels, key_labels, n_keys, offset, excl, decoupled,
                     no_pos, want_cols):
    x, y = x.contiguous(), y.contiguous()
    scale = scale.float().reshape(1)
    tiles = _tiles(x.shape[1], x)
    if want_cols and not deterministic():
        return _rowcol_pass(x, y, scale, labels, key_labels, n_keys, offset, excl, decoupled,
                            no_pos, tiles)
    b = None if bias is None else bias.float().contiguous()
    row = _rows_pass(x, y, scale, b, labels, key_labels, n_keys, offset, excl, decoupled, no_pos,
                     False, tiles)
    if not want_cols:
        return (*row, *(_f32(0, x.device) for _ in range(3)))
    col = _rows_pass(y[:n_keys], x, scale, None, labels, key_labels, n_keys, offset, excl,
                     decoupled, no_pos, True, tiles)
    return (*row, *col)


def _grad_pass(a, b, scale, biasc, biasr, lse_a, g_a, gp_a, lse_b, g_b, gp_b, labels,
               key_labels, n_keys, offset, excl, decoupled, no_pos, transposed, tiles):
    n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
    bm, bd, bdo = tiles
    out = torch.empty(n_a, d, dtype=torch.float32, device=a.device)
    grid = triton.cdiv(n_a, bm)
    dscale = _f32(grid, a.device)
    bterm = _f32(n_a, a.device)
    lab, klab = _labels(labels, key_labels, a.device)
    has_b = lse_b is not None
    _K["grad_rows"][(grid, triton.cdiv(d, bdo))](
        a, b, out, scale, biasc if biasc is not None else dscale,
        biasr if biasr is not None else dscale, lse_a, g_a, gp_a,
        lse_b if has_b else lse_a, g_b if has_b else g_a, gp_b if has_b else gp_a,
        lab, klab, dscale, bterm, n_a, n_b, d, a.stride(0), b.stride(0), out.stride(0),
        n_keys, offset, HAS_BIAS_C=biasc is not None, HAS_BIAS_R=biasr is not None,
        HAS_B=has_b, TRANSPOSED=transposed, ALLOW_TF32=_tf32(), BLOCK_M=bm, BLOCK_N=bm,
        BLOCK_D=bd, BLOCK_DO=bdo, **_mask_kw(labels, excl, decoupled, no_pos))
    return out, dscale, bterm


def _contrastive_bwd(x, y, scale, bias, labels, key_labels, n_keys, offset, excl, decoupled,
                     no_pos, row_lse, g_row, g_rowpos, col_lse, g_col, g_colpos):
    x, y = x.contiguous(), y.contiguous()
    scale = scale.float().reshape(1)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(d, x)
    f32 = dict(dtype=torch.float32, device=x.device)
    b = None if bias is None else bias.float().contiguous()
    row_lse, g_row, g_rowpos = (t.float().contiguous() for t in (row_lse, g_row, g_rowpos))
    if col_lse is not None:
        # Column statistics over all M columns (extra negatives take no column term).
        pad = m - n_keys
        col_lse = torch.cat([col_lse.float(), torch.zeros(pad, **f32)])
        g_col = torch.cat([g_col.float(), torch.zeros(pad, **f32)])
        g_colpos = torch.cat([g_colpos.float(), torch.zeros(pad, **f32)])
    mk = dict(labels=labels, key_labels=key_labels, n_keys=n_keys, offset=offset, excl=excl,
              decoupled=decoupled, no_pos=no_pos)
    if not deterministic():
        bm, bd, bdo = tiles
        grid = (triton.cdiv(n, bm), triton.cdiv(d, bdo))
        dx = torch.empty(n, d, **f32)
        dy = torch.zeros(m, d, **f32)
        parts = torch.empty(grid[0], **f32)
        dbias = torch.zeros(m if b is not None else 0, **f32)
        has_col = col_lse is not None
        lab, klab = _labels(labels, key_labels, x.device)
        _K["grad_xy"][grid](
            x, y, dx, dy, scale, b if b is not None else parts, row_lse, g_row, g_rowpos,
            col_lse if has_col else row_lse, g_col if has_col else g_row,
            g_colpos if has_col else g_rowpos, lab, klab, parts,
            dbias if b is not None else parts, n, m, d, x.stride(0), y.stride(0), dx.stride(0),
            dy.stride(0), n_keys, offset, HAS_BIAS=b is not None, HAS_COL=has_col,
            ALLOW_TF32=_tf32(), BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd, BLOCK_DO=bdo,
            **_mask_kw(labels, excl, decoupled, no_pos))
        return dx, dy, parts.double().sum().float(), dbias
    # dx: rows = queries; a-side = row statistics, b-side = column statistics.
    dx, dscale_parts, _ = _grad_pass(x, y, scale, b, None, row_lse, g_row, g_rowpos, col_lse,
                                     g_col, g_colpos, transposed=False, tiles=tiles, **mk)
    # dy: rows = keys (and extra negatives); a-side = column statistics (zero where there
    # are none), b-side = row statistics; the row-side bias now indexes the rows.
    zeros_m = torch.zeros(m, **f32)
    a_lse = col_lse if col_lse is not None else zeros_m
    a_g = g_col if g_col is not None else zeros_m
    a_gp = g_colpos if g_colpos is not None else zeros_m
    dy, _, bterm = _grad_pass(y, x, scale, None, b, a_lse, a_g, a_gp, row_lse, g_row, g_rowpos,
                              transposed=True, tiles=tiles, **mk)
    dscale = dscale_parts.double().sum().float()
    return dx, dy, dscale, (bterm if b is not None else _f32(0, x.device))


def _kw(tiles):
    bm, bd, _ = tiles
    return dict(ALLOW_TF32=_tf32(), BLOCK_M=bm, BLOCK_N=bm, BLOCK_D=bd)


def _siglip_fwd(x, y, scale, bias, offset):
    x, y = x.contiguous(), y.contiguous()
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(d, x)
    out = _f32(n, x.device)
    _K["siglip_fwd"][(triton.cdiv(n, tiles[0]),)](
        x, y, scale.float().reshape(1), bias.float().reshape(1), out, n, m, d, x.stride(0),
        y.stride(0), offset, **_kw(tiles))
    return out


def _siglip_bwd(x, y, scale, bias, offset, g_row):
    x, y = x.contiguous(), y.contiguous()
    scale, bias = scale.float().reshape(1), bias.float().reshape(1)
    g = g_row.float().contiguous()
    d = x.shape[1]
    tiles = _tiles(d, x)
    bm, _, bdo = tiles
    outs = []
    for a, b, transposed in ((x, y, False), (y, x, True)):
        grid = triton.cdiv(a.shape[0], bm)
        out = torch.empty(a.shape[0], d, dtype=torch.float32, device=a.device)
        parts = torch.empty(grid, 2, dtype=torch.float32, device=a.device)
        _K["siglip_grad"][(grid, triton.cdiv(d, bdo))](
            a, b, out, scale, bias, g, parts, a.shape[0], b.shape[0], d, a.stride(0),
            b.stride(0), out.stride(0), x.shape[0], offset, TRANSPOSED=transposed,
            BLOCK_DO=bdo, **_kw(tiles))
        outs.append((out, parts))
    # per-program fp32 partials, summed in fp64 (the contract's rule for these scalars)
    sums = outs[0][1].double().sum(0)
    return outs[0][0], outs[1][0], sums[0].float(), sums[1].float()


def _ms_consts(alpha, beta, base, epsilon):
    return dict(alpha=float(alpha), beta=float(beta), base=float(base),
                epsilon=0.0 if epsilon is None else float(epsilon), HAS_EPS=epsilon is not None)


def _ms_mine(x, y, labels, ref_labels, offset, exclude_self):
    x, y = x.contiguous(), y.contiguous()
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(d, x)
    min_pos, max_neg = _f32(n, x.device), _f32(n, x.device)
    _K["ms_mine"][(triton.cdiv(n, tiles[0]),)](
        x, y, labels.contiguous(), ref_labels.contiguous(), min_pos, max_neg, n, m, d,
        x.stride(0), y.stride(0), offset, EXCL_SELF=exclude_self, **_kw(tiles))
    return min_pos, max_neg


def _ms_fwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
            min_pos, max_neg):
    x, y = x.contiguous(), y.contiguous()
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(d, x)
    pos_lse, neg_lse = _f32(n, x.device), _f32(n, x.device)
    mp = pos_lse if min_pos is None else min_pos
    mn = pos_lse if max_neg is None else max_neg
    _K["ms_fwd"][(triton.cdiv(n, tiles[0]),)](
        x, y, labels.contiguous(), ref_labels.contiguous(), mp, mn, pos_lse, neg_lse, n, m, d,
        x.stride(0), y.stride(0), offset, EXCL_SELF=exclude_self,
        **_ms_consts(alpha, beta, base, epsilon), **_kw(tiles))
    return pos_lse, neg_lse


def _ms_bwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
            min_pos, max_neg, pos_lse, neg_lse, g):
    x, y = x.contiguous(), y.contiguous()
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(d, x)
    bm, _, bdo = tiles
    g = g.float().contiguous()
    mp = pos_lse if min_pos is None else min_pos
    mn = pos_lse if max_neg is None else max_neg
    labels, ref_labels = labels.contiguous(), ref_labels.contiguous()
    grads = []
    for a, b, transposed in ((x, y, False), (y, x, True)):
        out = torch.empty(a.shape[0], d, dtype=torch.float32, device=x.device)
        _K["ms_grad"][(triton.cdiv(a.shape[0], bm), triton.cdiv(d, bdo))](
            a, b, out, labels, ref_labels, mp, mn, pos_lse, neg_lse, g, a.shape[0], b.shape[0],
            d, a.stride(0), b.stride(0), out.stride(0), n, m, offset, EXCL_SELF=exclude_self,
            TRANSPOSED=transposed, BLOCK_DO=bdo, **_ms_consts(alpha, beta, base, epsilon),
            **_kw(tiles))
        grads.append(out)
    return grads[0], grads[1]


def _topk(x, y, k, exclude_diagonal):
    x, y = x.contiguous(), y.contiguous()
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    tiles = _tiles(d, x)
    kw = _kw(tiles)
    kw.pop("BLOCK_N")
    bk = max(16, triton.next_power_of_2(k))
    bm = kw["BLOCK_M"]
    if tl_tiles.arch_for(x.device) != "interpret":
        kw["BLOCK_M"] = min(bm, max(1, 4096 // bk), 16)  # keys: BM × BK int64
    vals = torch.empty(n, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    _K["topk"][(triton.cdiv(n, kw["BLOCK_M"]),)](
        x, y, vals, idx, n, m, d, k, x.stride(0), y.stride(0), EXCL=exclude_diagonal,
        BLOCK_K=bk, **kw)
    return vals, idx


def _block_e(e):
    return max(16, min(64, triton.next_power_of_2(e)))


def _softmax_matmul_fwd(x, y, v, scale, bias):
    x, y, v = x.contiguous(), y.contiguous(), v.contiguous()
    n, m, d, e = x.shape[0], y.shape[0], x.shape[1], v.shape[1]
    tiles = _tiles(d, x)
    be = _block_e(e)
    out = torch.empty(n, e, dtype=torch.float32, device=x.device)
    lse = _f32(n, x.device)
    b = None if bias is None else bias.float().contiguous()
    _K["smm_fwd"][(triton.cdiv(n, tiles[0]), triton.cdiv(e, be))](
        x, y, v, scale.float().reshape(1), b if b is not None else lse, out, lse, n, m, d, e,
        x.stride(0), y.stride(0), v.stride(0), out.stride(0), HAS_BIAS=b is not None,
        BLOCK_E=be, **_kw(tiles))
    return out, lse


def _softmax_matmul_bwd(x, y, v, scale, bias, out, lse, g_out):
    x, y = x.contiguous(), y.contiguous()
    n, m, d, e = x.shape[0], y.shape[0], x.shape[1], v.shape[1]
    tiles = _tiles(d, x)
    bm, _, bdo = tiles
    be = _block_e(e)
    v = v.float().contiguous()  # O(M·E): the g_out·v tile then dots fp32 with fp32
    scale = scale.float().reshape(1)
    b = None if bias is None else bias.float().contiguous()
    g = g_out.float().contiguous()
    lse = lse.float().contiguous()
    delta = (g * out.float()).sum(1)  # O(N·E)
    grads, parts = [], []
    for a, bb, transposed in ((x, y, False), (y, x, True)):
        grid = triton.cdiv(a.shape[0], bm)
        o = torch.empty(a.shape[0], d, dtype=torch.float32, device=x.device)
        part = torch.empty(grid + (m if transposed else 0), dtype=torch.float32,
                           device=x.device)
        _K["smm_grad"][(grid, triton.cdiv(d, bdo))](
            a, bb, o, scale, b if b is not None else lse, lse, delta, g, v, part, n, m, d, e,
            a.stride(0), bb.stride(0), o.stride(0), g.stride(0), v.stride(0),
            HAS_BIAS=b is not None, TRANSPOSED=transposed, BLOCK_DO=bdo, BLOCK_E=be,
            **_kw(tiles))
        grads.append(o)
        parts.append((grid, part))
    dv = torch.empty(m, e, dtype=torch.float32, device=x.device)
    _K["smm_dv"][(triton.cdiv(m, bm), triton.cdiv(e, be))](
        x, y, dv, scale, b if b is not None else lse, lse, g, n, m, d, e, x.stride(0),
        y.stride(0), dv.stride(0), g.stride(0), HAS_BIAS=b is not None, BLOCK_E=be,
        **_kw(tiles))
    grid_y, part_y = parts[1]
    dscale = parts[0][1].double().sum().float()
    dbias = part_y[grid_y:].clone() if b is not None else _f32(0, x.device)
    return grads[0], grads[1], dv, dscale, dbias

