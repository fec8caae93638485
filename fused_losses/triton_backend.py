"""The ``triton`` backend: Triton kernels for the contrastive part of the kernel contract.

Two kernels, each written once and reused for both directions of the similarity matrix:

- ``_lse_rows``: for a block of rows of A, stream over column blocks of B; per tile compute
  ``s = A_tile · B_tileᵀ`` (fp32 accumulation over a masked feature loop, so any D works),
  evaluate the pair mask from O(N + M) label vectors, and update an online logsumexp, the
  positive sum and the positive count.  Row statistics of (x, y) are ``_lse_rows(x, y)``;
  column statistics are ``_lse_rows(y, x)`` with the mask read transposed.
- ``_grad_rows``: for a block of rows of A, stream over B, recompute the tile and its dZ (the
  contract's formula, with a row-side and a column-side softmax term), and accumulate
  ``scale · dZ · B``.  ``dx`` is ``_grad_rows(x, y)``; ``dy`` is ``_grad_rows(y, x)`` transposed.

Passes over N·M·D for symmetric CLIP forward+backward: 2 (row and column LSE) + 2 (dx, dy, each
recomputing s) = 4 similarity GEMMs plus 2 gradient GEMMs.  No atomics: results are
deterministic.  Fusing the two forward directions into one bidirectional pass is future work
(see the issue notes).  Nothing of size N×M is allocated: buffers are O(N + M) plus one fp32
partial per program for dscale.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

from __future__ import annotations

import os

import torch

from .fused import register_fused_backend

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as exc:  # triton missing or broken: the backend reports why
    triton = tl = None
    _IMPORT_ERROR = exc

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _availability():
    if _IMPORT_ERROR is not None:
        return f"triton is not importable: {_IMPORT_ERROR}"
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
    return None


if triton is not None:

    @triton.jit
    def _pair_mask(rows, cols, lab_ptr, klab_ptr, n_keys, offset, TRANSPOSED: tl.constexpr,
                   HAS_LABELS: tl.constexpr, NO_POS: tl.constexpr, EXCL: tl.constexpr,
                   DECOUPLED: tl.constexpr):
        """(pos, cand) of the tile rows × cols, for the pairs (i, j) of the original problem
        (query i, key j): (rows, cols) = (i, j), or (j, i) when TRANSPOSED."""
        if TRANSPOSED:
            i = cols[None, :]
            j = rows[:, None]
        else:
            i = rows[:, None]
            j = cols[None, :]
        is_key = j < n_keys
        diag = (j == i + offset) & is_key
        if NO_POS:
            pos = diag & False
        elif HAS_LABELS:
            if TRANSPOSED:
                li = tl.load(lab_ptr + cols, mask=cols >= 0, other=-1)[None, :]
                lj = tl.load(klab_ptr + rows, mask=rows < n_keys, other=-2)[:, None]
            else:
                li = tl.load(lab_ptr + rows, mask=rows >= 0, other=-1)[:, None]
                lj = tl.load(klab_ptr + cols, mask=cols < n_keys, other=-2)[None, :]
            pos = (li == lj) & is_key
        else:
            pos = diag
        cand = diag | True
        if EXCL:
            pos = pos & (diag == 0)
            cand = diag == 0
        if DECOUPLED:
            cand = cand & (pos == 0)
        return pos, cand

    @triton.jit
    def _sim_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  ALLOW_TF32: tl.constexpr):
        """s = A[rows] · B[cols]ᵀ in fp32, over a masked feature loop (any D)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :],
                        mask=(rows[:, None] < n_a) & (ks[None, :] < d), other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :],
                        mask=(cols[:, None] < n_b) & (ks[None, :] < d), other=0.0)
            acc += tl.dot(a, tl.trans(b), allow_tf32=ALLOW_TF32)
        return acc

    @triton.jit
    def _oriented_sim(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                      TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr):
        """The similarity tile, always computed as query-rows · key-rowsᵀ (transposed in
        registers for the column-direction passes): every pass then sees bit-identical s_ij,
        which keeps exp(z − lse) consistent with the LSE at large logits (BLOCK_M == BLOCK_N
        and the same k loop, so the column passes' tiles are the forward's tiles)."""
        if TRANSPOSED:
            s = tl.trans(_sim_tile(b_ptr, a_ptr, cols, rows, n_b, n_a, d, stride_b, stride_a,
                                   BLOCK_N, BLOCK_M, BLOCK_D, ALLOW_TF32))
        else:
            s = _sim_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                          BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        return s

    @triton.jit
    def _lse_rows(a_ptr, b_ptr, scale_ptr, bias_ptr, lab_ptr, klab_ptr, lse_ptr, psum_ptr,
                  pcnt_ptr, n_a, n_b, d, stride_a, stride_b, n_keys, offset,
                  HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_LABELS: tl.constexpr,
                  NO_POS: tl.constexpr, EXCL: tl.constexpr, DECOUPLED: tl.constexpr,
                  ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        scale = tl.load(scale_ptr)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        ps = tl.zeros((BLOCK_M,), tl.float32)
        pc = tl.zeros((BLOCK_M,), tl.float32)
        nan = tl.zeros((BLOCK_M,), tl.float32)
        for c0 in range(0, n_b, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            s = _oriented_sim(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                              TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
            z = s * scale
            pos, cand = _pair_mask(rows, cols, lab_ptr, klab_ptr, n_keys, offset, TRANSPOSED,
                                   HAS_LABELS, NO_POS, EXCL, DECOUPLED)
            inb = (rows[:, None] < n_a) & (cols[None, :] < n_b)
            pos = pos & inb
            cand = cand & inb
            zb = z
            if HAS_BIAS:
                zb = z + tl.load(bias_ptr + cols, mask=cols < n_b, other=0.0)[None, :]
            zc = tl.where(cand, zb, float("-inf"))
            # tl.max skips NaN: track it, so NaN features propagate instead of looking empty.
            nan = tl.maximum(nan, tl.max(tl.where(zc != zc, 1.0, 0.0), 1))
            m_new = tl.maximum(m_i, tl.max(zc, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            # Masked entries select 0 (never exp(-inf) · 0, never inf · 0).
            p = tl.where(cand, tl.exp(zc - m_safe[:, None]), 0.0)
            l_i = l_i * tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m_safe)) + tl.sum(p, 1)
            m_i = m_new
            ps += tl.sum(tl.where(pos, z, 0.0), 1)
            pc += tl.sum(tl.where(pos, 1.0, 0.0), 1)
        lse = tl.where(m_i == float("-inf"), float("-inf"),
                       m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)))
        lse = tl.where(nan > 0, float("nan"), lse)
        ok = rows < n_a
        tl.store(lse_ptr + rows, lse, mask=ok)
        tl.store(psum_ptr + rows, ps, mask=ok)
        tl.store(pcnt_ptr + rows, pc, mask=ok)

    @triton.jit
    def _grad_rows(a_ptr, b_ptr, out_ptr, scale_ptr, biasc_ptr, biasr_ptr, lse_a, g_a, gp_a,
                   lse_b, g_b, gp_b, lab_ptr, klab_ptr, dscale_ptr, bterm_ptr, n_a, n_b, d,
                   stride_a, stride_b, stride_o, n_keys, offset,
                   HAS_BIAS_C: tl.constexpr, HAS_BIAS_R: tl.constexpr, HAS_B: tl.constexpr,
                   TRANSPOSED: tl.constexpr, HAS_LABELS: tl.constexpr, NO_POS: tl.constexpr,
                   EXCL: tl.constexpr, DECOUPLED: tl.constexpr, ALLOW_TF32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr):
        """out[rows] = scale · Σ_c dZ_rc B_c for a block of rows, with
        dZ_rc = g_a_r e^{z + biasC_c − lse_a_r} cand + g_b_c e^{z + biasR_r − lse_b_c} cand
                − pos (gp_a_r + gp_b_c).
        Also one fp32 partial of Σ dZ·s per program, and per row Σ_c of the b-side softmax term
        (the bias gradient when the rows are the columns of the original problem)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_a
        scale = tl.load(scale_ptr)
        la = tl.load(lse_a + rows, mask=rmask, other=0.0)
        ga = tl.load(g_a + rows, mask=rmask, other=0.0)
        gpa = tl.load(gp_a + rows, mask=rmask, other=0.0)
        br = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_BIAS_R:
            br = tl.load(biasr_ptr + rows, mask=rmask, other=0.0)
        dso = tl.arange(0, BLOCK_DO)
        acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
        dscale = tl.zeros((BLOCK_M,), tl.float32)
        bterm = tl.zeros((BLOCK_M,), tl.float32)
        for c0 in range(0, n_b, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            cmask = cols < n_b
            s = _oriented_sim(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                              TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
            z = s * scale
            pos, cand = _pair_mask(rows, cols, lab_ptr, klab_ptr, n_keys, offset, TRANSPOSED,
                                   HAS_LABELS, NO_POS, EXCL, DECOUPLED)
            inb = rmask[:, None] & cmask[None, :]
            cand = cand & inb
            pos = pos & inb
            za = z
            if HAS_BIAS_C:
                za = z + tl.load(biasc_ptr + cols, mask=cmask, other=0.0)[None, :]
            # Each side's positive term is subtracted from that side's softmax term first: with
            # a sharp softmax p_ii ≈ 1 and g·p − g/|P| cancels; two separate cancellations keep
            # more digits than one of their sum.
            # Select, never multiply: a side with g = 0 (no such term) may have exp() = inf.
            dz = tl.where(cand & (ga[:, None] != 0), ga[:, None] * tl.exp(za - la[:, None]),
                          0.0) - tl.where(pos, gpa[:, None], 0.0)
            if HAS_B:
                lb = tl.load(lse_b + cols, mask=cmask, other=0.0)
                gb = tl.load(g_b + cols, mask=cmask, other=0.0)
                gpb = tl.load(gp_b + cols, mask=cmask, other=0.0)
                tb = tl.where(cand & (gb[None, :] != 0),
                              gb[None, :] * tl.exp(z + br[:, None] - lb[None, :]), 0.0)
                bterm += tl.sum(tb, 1)
                dz += tb - tl.where(pos, gpb[None, :], 0.0)
            dscale += tl.sum(dz * s, 1)
            bv = tl.load(b_ptr + cols[:, None] * stride_b + dso[None, :],
                         mask=cmask[:, None] & (dso[None, :] < d), other=0.0)
            # dZ stays fp32 here: its rows nearly cancel, and rounding it to fp16/bf16 first
            # (the flash-attention speed path) costs digits; revisit with GPU measurements.
            acc += tl.dot(dz, bv.to(tl.float32), allow_tf32=ALLOW_TF32)
        tl.store(out_ptr + rows[:, None] * stride_o + dso[None, :], acc * scale,
                 mask=rmask[:, None] & (dso[None, :] < d))
        tl.store(dscale_ptr + pid, tl.sum(dscale, 0))
        tl.store(bterm_ptr + rows, bterm, mask=rmask)


def _blocks(d: int):
    """Tile sizes: small fixed ones under the interpreter; the output feature block covers D."""
    bd = max(16, min(64, triton.next_power_of_2(d)))
    bdo = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return 16, 16, bd, bdo
    return (64, 64, bd, bdo) if bdo <= 256 else (32, 32, bd, bdo)


def _tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


class TritonKernels:
    """contrastive_fwd / contrastive_bwd of the contract (kernels.py) in Triton."""

    @staticmethod
    def _labels(mask, device):
        if mask.labels is None:
            z = torch.zeros(1, dtype=torch.long, device=device)
            return z, z
        return mask.labels.contiguous(), mask.key_labels.contiguous()

    def _rows(self, a, b, scale, bias, mask, transposed):
        n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
        bm, bn, bd, _ = _blocks(d)
        lse = torch.empty(n_a, dtype=torch.float32, device=a.device)
        psum, pcnt = torch.empty_like(lse), torch.empty_like(lse)
        lab, klab = self._labels(mask, a.device)
        _lse_rows[(triton.cdiv(n_a, bm),)](
            a, b, scale, bias if bias is not None else lse, lab, klab, lse, psum, pcnt,
            n_a, n_b, d, a.stride(0), b.stride(0), mask.n_keys, mask.offset,
            HAS_BIAS=bias is not None, TRANSPOSED=transposed,
            HAS_LABELS=mask.labels is not None, NO_POS=mask.no_positives,
            EXCL=mask.exclude_diagonal, DECOUPLED=mask.decoupled, ALLOW_TF32=_tf32(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        return lse, psum, pcnt

    def contrastive_fwd(self, x, y, scale, bias, mask, want_cols):
        x, y = x.contiguous(), y.contiguous()
        scale = scale.float().reshape(1)
        b = None if bias is None else bias.float().contiguous()
        row_lse, rps, rpc = self._rows(x, y, scale, b, mask, False)
        if not want_cols:
            return row_lse, rps, rpc, None, None, None
        keys = y[: mask.n_keys]
        col_lse, cps, cpc = self._rows(keys, x, scale, None, mask, True)
        return row_lse, rps, rpc, col_lse, cps, cpc

    def _grad(self, a, b, scale, biasc, biasr, lse_a, g_a, gp_a, lse_b, g_b, gp_b, mask,
              transposed):
        n_a, n_b, d = a.shape[0], b.shape[0], a.shape[1]
        bm, bn, bd, bdo = _blocks(d)
        out = torch.empty(n_a, d, dtype=torch.float32, device=a.device)
        grid = triton.cdiv(n_a, bm)
        dscale = torch.empty(grid, dtype=torch.float32, device=a.device)
        bterm = torch.empty(n_a, dtype=torch.float32, device=a.device)
        lab, klab = self._labels(mask, a.device)
        has_b = lse_b is not None
        _grad_rows[(grid,)](
            a, b, out, scale, biasc if biasc is not None else dscale,
            biasr if biasr is not None else dscale, lse_a, g_a, gp_a,
            lse_b if has_b else lse_a, g_b if has_b else g_a, gp_b if has_b else gp_a,
            lab, klab, dscale, bterm, n_a, n_b, d, a.stride(0), b.stride(0), out.stride(0),
            mask.n_keys, mask.offset,
            HAS_BIAS_C=biasc is not None, HAS_BIAS_R=biasr is not None, HAS_B=has_b,
            TRANSPOSED=transposed, HAS_LABELS=mask.labels is not None,
            NO_POS=mask.no_positives, EXCL=mask.exclude_diagonal, DECOUPLED=mask.decoupled,
            ALLOW_TF32=_tf32(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo)
        return out, dscale, bterm

    def contrastive_bwd(self, x, y, scale, bias, mask, row_lse, g_row, g_rowpos, col_lse, g_col,
                        g_colpos):
        x, y = x.contiguous(), y.contiguous()
        scale = scale.float().reshape(1)
        _n, m, nk = x.shape[0], y.shape[0], mask.n_keys
        f32 = dict(dtype=torch.float32, device=x.device)
        b = None if bias is None else bias.float().contiguous()
        row_lse, g_row, g_rowpos = (t.float().contiguous() for t in (row_lse, g_row, g_rowpos))
        if col_lse is not None:
            # Column statistics over all M columns (extra negatives take no column term).
            pad = m - nk
            col_lse = torch.cat([col_lse.float(), torch.zeros(pad, **f32)])
            g_col = torch.cat([g_col.float(), torch.zeros(pad, **f32)])
            g_colpos = torch.cat([g_colpos.float(), torch.zeros(pad, **f32)])
        # dx: rows = queries; a-side = row statistics, b-side = column statistics.
        dx, dscale_parts, _ = self._grad(x, y, scale, b, None, row_lse, g_row, g_rowpos,
                                         col_lse, g_col, g_colpos, mask, False)
        # dy: rows = keys (and extra negatives); a-side = column statistics (zero where there
        # are none), b-side = row statistics; the row-side bias now indexes the rows.
        zeros_m = torch.zeros(m, **f32)
        a_lse = col_lse if col_lse is not None else zeros_m
        a_g = g_col if g_col is not None else zeros_m
        a_gp = g_colpos if g_colpos is not None else zeros_m
        dy, _, bterm = self._grad(y, x, scale, None, b, a_lse, a_g, a_gp, row_lse, g_row,
                                  g_rowpos, mask, True)
        dscale = dscale_parts.double().sum().float()
        return dx, dy, dscale, (bterm if bias is not None else None)


TRITON = register_fused_backend(
    "triton",
    priority=20,
    devices={"cuda", "cpu"} if INTERPRET else {"cuda"},
    dtypes={torch.float32, torch.float16, torch.bfloat16},
    kernels=TritonKernels(),
    availability=_availability,
    ops=["info_nce", "pairwise_logsumexp"],
)
