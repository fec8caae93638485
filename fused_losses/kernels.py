"""The fused-kernel contract: the few streaming reductions every fused backend implements.

The losses are not written per backend.  ``fused.py`` builds every op (InfoNCE family, SigLIP,
multi-similarity, the primitives, Sinkhorn's c-transforms) once, as autograd Functions over the
kernels below; a fused backend (``triton``, ``cpu``, ``cuda``) supplies only these kernels.  The
class :class:`TorchBlockKernels` at the bottom is their executable specification: plain torch,
streaming over row blocks (it never holds more than ``block × M`` similarities), used by the
tests to check the fused layer itself.

Conventions for every kernel
----------------------------
- ``x`` (N, D) and ``y`` (M, D): contiguous, one floating dtype (fp16/bf16/fp32/fp64).
  ``s_ij = <x_i, y_j>`` accumulated in fp32 (fp64 for fp64 inputs): "acc dtype" below.
- ``scale``: 0-dim tensor of the acc dtype on the inputs' device (a tensor, not a float, so that
  no device sync and no graph break is needed).  ``z_ij = scale * s_ij``.
- Outputs are in the acc dtype.  Index outputs are int64.  Nothing of size N×M is allocated.
- Masks are described by :class:`PairMask` and evaluated per tile from O(N + M) vectors.
- ``dscale`` (and SigLIP's ``dbias``) are sums of N·M cancelling terms: accumulate per-row
  partials in fp32 and sum those in fp64 (one scalar per tile), or the temperature gradient
  loses digits at large N.
- Masks select, they never multiply: an ``exp`` of a masked-out entry may overflow, and
  ``inf · 0`` is NaN.
- A kernel must compute ``s_ij`` the same way (same blocking and accumulation order) in every
  pass of one op: the multi-similarity mining threshold is a hard comparison on ``s_ij``.

Kernels
-------
``contrastive_fwd(x, y, scale, bias, mask, want_cols)`` -> ``(row_lse, row_pos_sum, row_pos_cnt,
col_lse, col_pos_sum, col_pos_cnt)``
    Row i: ``row_lse_i = LSE_{j: cand_ij} (z_ij + bias_j)`` (−inf if no candidate),
    ``row_pos_sum_i = Σ_{j: pos_ij} z_ij`` (no bias), ``row_pos_cnt_i = |{j: pos_ij}|`` (acc
    dtype).  ``bias``: (M,) acc dtype or None.  With ``want_cols`` (bias is then None), for the
    key columns j < ``mask.n_keys``: ``col_lse_j = LSE_{i: cand_ij} z_ij``, and the column
    positive sums/counts likewise; else the three col outputs are None.
``contrastive_fwd(x, y, scale, None, mask, False, ratio=r)`` -> the six outputs and ``row_lse2``
    A second row LSE from the same tiles (rows only: ``bias`` None, ``want_cols`` False):
    ``row_lse2_i = LSE_{j: cand_ij} (r·z_ij)``, ``r`` a Python float ≥ 0 (−inf if no candidate).
    Hard-negative reweighting (Robinson et al. 2021) needs the LSEs of the same negatives at
    (1+β)/τ and β/τ: ``scale`` = (1+β)/τ and ``r`` = β/(1+β), one sweep.  Only passed when
    not None (a backend without it serves every other op).
``contrastive_bwd(x, y, scale, bias, mask, row_lse, g_row, g_rowpos, col_lse, g_col, g_colpos)``
-> ``(dx, dy, dscale, dbias)``
    With ``dZ_ij = g_row_i·exp(z_ij + bias_j − row_lse_i)·cand_ij
    + [j < n_keys]·g_col_j·exp(z_ij − col_lse_j)·cand_ij − pos_ij·(g_rowpos_i + g_colpos_j)``:
    ``dx = scale·dZ @ y`` (N, D), ``dy = scale·dZᵀ @ x`` (M, D), ``dscale = Σ_ij dZ_ij s_ij``
    (0-dim), ``dbias_j = Σ_i (row part of dZ)_ij`` ((M,) or None when bias is None).
    ``col_lse``/``g_col``/``g_colpos`` may be None (no column term).  The caller passes finite
    LSEs (an empty line's −inf replaced by 0, with its g set to 0).  With ``ratio=r,
    row_lse2=, g_row2=`` (keywords, rows only, ``bias`` None): ``dZ_ij`` gains
    ``g_row2_i·exp(r·z_ij − row_lse2_i)·cand_ij``, so the caller passes ``g_row2 = r·∂L/∂lse2``
    and ``dscale`` stays ``∂L/∂scale`` for a fixed ``r``.
``siglip_fwd(x, y, scale, bias, offset)`` -> ``row_loss`` (N,)
    ``Σ_j softplus(−σ_ij (z_ij + bias))``, ``σ_ij = +1`` if j == i + offset else −1;
    ``bias`` a 0-dim acc-dtype tensor.
``siglip_bwd(x, y, scale, bias, offset, g_row)`` -> ``(dx, dy, dscale, dbias)``
    ``G_ij = −g_row_i σ_ij sigmoid(−σ_ij (z_ij + bias))``; ``dx = scale·G@y``,
    ``dy = scale·Gᵀ@x``, ``dscale = Σ G∘s``, ``dbias = Σ G`` (0-dim).
``ms_mine(x, y, labels, ref_labels, offset, exclude_self)`` -> ``(min_pos, max_neg)`` (N,)
    Over the anchor's (unmined) positives / negatives; +inf / −inf when the set is empty.
    Self pairs (j == i + offset) are neither when ``exclude_self``.
``ms_fwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon, min_pos,
max_neg)`` -> ``(pos_lse, neg_lse)`` (N,)
    ``pos_lse_i = log(1 + Σ_{kept p} exp(−α(s_ip − base)))``, ``neg_lse_i = log(1 + Σ_{kept n}
    exp(β(s_in − base)))``, an online LSE seeded with 0.  Kept: positive if ``epsilon is None``
    or ``s_ip − ε < max_neg_i``; negative if ``epsilon is None`` or ``s_in + ε > min_pos_i``.
    ``alpha, beta, base`` floats, ``epsilon`` float or None (then min_pos/max_neg are None).
``ms_mine_fwd(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon)``
-> ``(min_pos, max_neg, pos_lse, neg_lse)`` — optional: ``ms_mine`` then ``ms_fwd`` in one
    call, for a backend that can do both in one pass over the tiles (the cpu backend does).
``ms_bwd(<ms_fwd args>, pos_lse, neg_lse, g)`` -> ``(dx, dy)``
    ``dL/ds_ij = g_i (−exp(−α(s_ij − base) − pos_lse_i)·kept_pos_ij
    + exp(β(s_ij − base) − neg_lse_i)·kept_neg_ij)``; ``dx = dS @ y``, ``dy = dSᵀ @ x``.
``softmax_matmul_fwd(x, y, v, scale, bias)`` -> ``(out (N, E), lse (N,))``
    ``out_i = Σ_j softmax_j(z_ij + bias_j) v_j``; v (M, E) in the inputs' dtype.
``softmax_matmul_bwd(x, y, v, scale, bias, out, lse, g_out)`` -> ``(dx, dy, dv, dscale, dbias)``
    ``P = softmax``, ``dP = g_out vᵀ``, ``dZ = P ∘ (dP − rowsum(g_out ∘ out))``; ``dv = Pᵀ g_out``;
    the rest as in contrastive_bwd (``dbias`` None when bias is None).
``topk(x, y, k, exclude_diagonal)`` -> ``(values (N, k) acc dtype, indices (N, k) int64)``
    Largest ``s_ij`` per row, descending, ties to the smaller j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class PairMask:
    """Which pairs (i, j) are positives and candidates, evaluated per tile.

    ``labels`` (N,) / ``key_labels`` (n_keys,): int64, or both None (then the positive of row i
    is column i + offset).  Columns j >= ``n_keys`` (extra negatives appended after the keys) are
    always candidates, never positives, never "diagonal", and take no part in column reductions.
    ``exclude_diagonal``: the pair (i, i + offset) is neither candidate nor positive.
    ``decoupled``: positives are not candidates.  ``no_positives``: no pair is positive
    (plain logsumexp).
    """

    n_keys: int
    labels: torch.Tensor | None = None
    key_labels: torch.Tensor | None = None
    offset: int = 0
    exclude_diagonal: bool = False
    decoupled: bool = False
    no_positives: bool = False

    def tile(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pos, cand) boolean masks of the tile rows × cols (index vectors)."""
        is_key = cols[None, :] < self.n_keys
        diag = (cols[None, :] == rows[:, None] + self.offset) & is_key
        if self.no_positives:
            pos = torch.zeros_like(diag)
        elif self.labels is None:
            pos = diag.clone()
        else:
            kl = self.key_labels[cols.clamp_max(self.n_keys - 1)]
            pos = (self.labels[rows][:, None] == kl[None, :]) & is_key
        cand = torch.ones_like(diag)
        if self.exclude_diagonal:
            pos = pos & ~diag
            cand = cand & ~diag
        if self.decoupled:
            cand = cand & ~pos
        return pos, cand

    @property
    def all_candidates(self) -> bool:
        """Every pair is a candidate (``tile``'s cand is all True)."""
        return not (self.exclude_diagonal or self.decoupled)

    def transposed(self, n_rows: int) -> PairMask:
        """The mask of the column problem: the keys (j < n_keys) as rows over the ``n_rows``
        anchors as columns, so that ``transposed(N).tile(j, i)`` is ``tile(i, j)`` transposed."""
        return PairMask(n_keys=n_rows, labels=self.key_labels, key_labels=self.labels,
                        offset=-self.offset, exclude_diagonal=self.exclude_diagonal,
                        decoupled=self.decoupled, no_positives=self.no_positives)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logaddexp that keeps -inf + -inf = -inf (no NaN)."""
    m = torch.maximum(a, b)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = m_safe + torch.log(torch.exp(a - m_safe) + torch.exp(b - m_safe))
    return torch.where(m == NEG_INF, m, out)


def _masked_lse(z: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    z = z.masked_fill(~keep, NEG_INF)
    m = z.amax(dim=dim, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = (m_safe + torch.log(torch.exp(z - m_safe).sum(dim=dim, keepdim=True))).squeeze(dim)
    return torch.where(m.squeeze(dim) == NEG_INF, m.squeeze(dim), out)


class TorchBlockKernels:
    """Executable specification of the kernel contract, streaming over row blocks in torch.

    Memory: O(block·M) per step, never N×M.  Slow-ish (it is torch, not fused), but it makes
    the fused layer testable anywhere and states the semantics in code."""

    def __init__(self, block: int = 64):
        self.block = block

    def _blocks(self, n: int, device):
        for start in range(0, n, self.block):
            stop = min(start + self.block, n)
            yield start, stop, torch.arange(start, stop, device=device)

    @staticmethod
    def _sims(xb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        acc = acc_dtype(xb.dtype)
        return xb.to(acc) @ y.to(acc).T

    def contrastive_fwd(self, x, y, scale, bias, mask, want_cols, ratio=None):
        n, m = x.shape[0], y.shape[0]
        acc = acc_dtype(x.dtype)
        cols = torch.arange(m, device=x.device)
        row_lse = torch.empty(n, dtype=acc, device=x.device)
        row_pos_sum = torch.empty_like(row_lse)
        row_pos_cnt = torch.empty_like(row_lse)
        row_lse2 = None if ratio is None else torch.empty_like(row_lse)
        nk = mask.n_keys
        if want_cols:
            col_lse = torch.full((nk,), NEG_INF, dtype=acc, device=x.device)
            col_pos_sum = torch.zeros(nk, dtype=acc, device=x.device)
            col_pos_cnt = torch.zeros(nk, dtype=acc, device=x.device)
        for a, b, rows in self._blocks(n, x.device):
            z = scale * self._sims(x[a:b], y)
            pos, cand = mask.tile(rows, cols)
            zb = z if bias is None else z + bias[None, :]
            row_lse[a:b] = _masked_lse(zb, cand, dim=1)
            if ratio is not None:
                row_lse2[a:b] = _masked_lse(ratio * z, cand, dim=1)
            row_pos_sum[a:b] = torch.where(pos, z, torch.zeros_like(z)).sum(1)
            row_pos_cnt[a:b] = pos.sum(1).to(acc)
            if want_cols:
                zk, ck, pk = z[:, :nk], cand[:, :nk], pos[:, :nk]
                col_lse = _lse_merge(col_lse, _masked_lse(zk, ck, dim=0))
                col_pos_sum += torch.where(pk, zk, torch.zeros_like(zk)).sum(0)
                col_pos_cnt += pk.sum(0).to(acc)
        if ratio is not None:
            return row_lse, row_pos_sum, row_pos_cnt, None, None, None, row_lse2
        if not want_cols:
            return row_lse, row_pos_sum, row_pos_cnt, None, None, None
        return row_lse, row_pos_sum, row_pos_cnt, col_lse, col_pos_sum, col_pos_cnt

    def contrastive_bwd(self, x, y, scale, bias, mask, row_lse, g_row, g_rowpos, col_lse, g_col,
                        g_colpos, ratio=None, row_lse2=None, g_row2=None):
        n, m = x.shape[0], y.shape[0]
        acc = acc_dtype(x.dtype)
        cols = torch.arange(m, device=x.device)
        yf = y.to(acc)
        dx = torch.empty(n, x.shape[1], dtype=acc, device=x.device)
        dy = torch.zeros(m, y.shape[1], dtype=acc, device=x.device)
        dscale = torch.zeros((), dtype=torch.float64, device=x.device)  # see contract
        dbias = None if bias is None else torch.zeros(m, dtype=acc, device=x.device)
        nk = mask.n_keys
        for a, b, rows in self._blocks(n, x.device):
            xb = x[a:b].to(acc)
            s = xb @ yf.T
            z = scale * s
            pos, cand = mask.tile(rows, cols)
            zb = z if bias is None else z + bias[None, :]
            zero = torch.zeros((), dtype=acc, device=x.device)
            p = torch.where(cand, torch.exp(zb - row_lse[a:b, None]), zero)
            d_row = g_row[a:b, None] * p
            dz = d_row - torch.where(pos, g_rowpos[a:b, None], zero)
            if ratio is not None:
                dz = dz + g_row2[a:b, None] * torch.where(
                    cand, torch.exp(ratio * z - row_lse2[a:b, None]), zero)
            if col_lse is not None:
                q = torch.where(cand[:, :nk], torch.exp(z[:, :nk] - col_lse[None, :]), zero)
                dz[:, :nk] += g_col[None, :] * q - torch.where(pos[:, :nk], g_colpos[None, :],
                                                               zero)
            dx[a:b] = scale * (dz @ yf)
            dy += scale * (dz.T @ xb)
            dscale += (dz * s).sum(1).double().sum()
            if dbias is not None:
                dbias += d_row.sum(0)
        return dx, dy, dscale.to(acc), dbias

    def siglip_fwd(self, x, y, scale, bias, offset):
        out = torch.empty(x.shape[0], dtype=acc_dtype(x.dtype), device=x.device)
        cols = torch.arange(y.shape[0], device=x.device)
        for a, b, rows in self._blocks(x.shape[0], x.device):
            sign = 2.0 * (cols[None, :] == rows[:, None] + offset) - 1.0
            logits = scale * self._sims(x[a:b], y) + bias
            # logsigmoid, not F.softplus: softplus returns x itself above 20 (2e-9 off)
            out[a:b] = -torch.nn.functional.logsigmoid(sign * logits).sum(1)
        return out

    def siglip_bwd(self, x, y, scale, bias, offset, g_row):
        acc = acc_dtype(x.dtype)
        yf = y.to(acc)
        cols = torch.arange(y.shape[0], device=x.device)
        dx = torch.empty(x.shape, dtype=acc, device=x.device)
        dy = torch.zeros(y.shape, dtype=acc, device=x.device)
        dscale = torch.zeros((), dtype=torch.float64, device=x.device)  # see contract
        dbias = torch.zeros((), dtype=acc, device=x.device)
        for a, b, rows in self._blocks(x.shape[0], x.device):
            xb = x[a:b].to(acc)
            s = xb @ yf.T
            sign = 2.0 * (cols[None, :] == rows[:, None] + offset) - 1.0
            g = -g_row[a:b, None] * sign * torch.sigmoid(-sign * (scale * s + bias))
            dx[a:b] = scale * (g @ yf)
            dy += scale * (g.T @ xb)
            dscale += (g * s).sum(1).double().sum()
            dbias += g.sum()
        return dx, dy, dscale.to(acc), dbias

    def _ms_masks(self, rows, cols, labels, ref_labels, offset, exclude_self):
        pos = labels[rows][:, None] == ref_labels[None, :]
        neg = ~pos
        if exclude_self:
            self_pair = cols[None, :] == rows[:, None] + offset
            pos, neg = pos & ~self_pair, neg & ~self_pair
        return pos, neg

    def ms_mine(self, x, y, labels, ref_labels, offset, exclude_self):
        acc = acc_dtype(x.dtype)
        min_pos = torch.empty(x.shape[0], dtype=acc, device=x.device)
        max_neg = torch.empty_like(min_pos)
        cols = torch.arange(y.shape[0], device=x.device)
        for a, b, rows in self._blocks(x.shape[0], x.device):
            s = self._sims(x[a:b], y)
            pos, neg = self._ms_masks(rows, cols, labels, ref_labels, offset, exclude_self)
            min_pos[a:b] = s.masked_fill(~pos, float("inf")).amin(1)
            max_neg[a:b] = s.masked_fill(~neg, NEG_INF).amax(1)
        return min_pos, max_neg

    def _ms_kept(self, s, a, b, rows, cols, labels, ref_labels, offset, exclude_self, epsilon,
                 min_pos, max_neg):
        pos, neg = self._ms_masks(rows, cols, labels, ref_labels, offset, exclude_self)
        if epsilon is not None:
            pos = pos & (s - epsilon < max_neg[a:b, None])
            neg = neg & (s + epsilon > min_pos[a:b, None])
        return pos, neg

    def ms_fwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg):
        acc = acc_dtype(x.dtype)
        pos_lse = torch.empty(x.shape[0], dtype=acc, device=x.device)
        neg_lse = torch.empty_like(pos_lse)
        cols = torch.arange(y.shape[0], device=x.device)
        for a, b, rows in self._blocks(x.shape[0], x.device):
            s = self._sims(x[a:b], y)
            kp, kn = self._ms_kept(s, a, b, rows, cols, labels, ref_labels, offset, exclude_self,
                                   epsilon, min_pos, max_neg)
            zero = torch.zeros(b - a, 1, dtype=acc, device=x.device)
            one = torch.ones_like(zero, dtype=torch.bool)
            pos_lse[a:b] = _masked_lse(torch.cat([zero, -alpha * (s - base)], 1),
                                       torch.cat([one, kp], 1), dim=1)
            neg_lse[a:b] = _masked_lse(torch.cat([zero, beta * (s - base)], 1),
                                       torch.cat([one, kn], 1), dim=1)
        return pos_lse, neg_lse

    def ms_bwd(self, x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base, epsilon,
               min_pos, max_neg, pos_lse, neg_lse, g):
        acc = acc_dtype(x.dtype)
        yf = y.to(acc)
        dx = torch.empty(x.shape, dtype=acc, device=x.device)
        dy = torch.zeros(y.shape, dtype=acc, device=x.device)
        cols = torch.arange(y.shape[0], device=x.device)
        for a, b, rows in self._blocks(x.shape[0], x.device):
            xb = x[a:b].to(acc)
            s = xb @ yf.T
            kp, kn = self._ms_kept(s, a, b, rows, cols, labels, ref_labels, offset, exclude_self,
                                   epsilon, min_pos, max_neg)
            zero = torch.zeros((), dtype=acc, device=x.device)
            ds = g[a:b, None] * (
                torch.where(kn, torch.exp(beta * (s - base) - neg_lse[a:b, None]), zero)
                - torch.where(kp, torch.exp(-alpha * (s - base) - pos_lse[a:b, None]), zero))
            dx[a:b] = ds @ yf
            dy += ds.T @ xb
        return dx, dy

    def softmax_matmul_fwd(self, x, y, v, scale, bias):
        acc = acc_dtype(x.dtype)
        vf = v.to(acc)
        out = torch.empty(x.shape[0], v.shape[1], dtype=acc, device=x.device)
        lse = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for a, b, _ in self._blocks(x.shape[0], x.device):
            z = scale * self._sims(x[a:b], y)
            if bias is not None:
                z = z + bias[None, :]
            lse[a:b] = torch.logsumexp(z, dim=1)
            out[a:b] = torch.exp(z - lse[a:b, None]) @ vf
        return out, lse

    def softmax_matmul_bwd(self, x, y, v, scale, bias, out, lse, g_out):
        acc = acc_dtype(x.dtype)
        yf, vf = y.to(acc), v.to(acc)
        dx = torch.empty(x.shape, dtype=acc, device=x.device)
        dy = torch.zeros(y.shape, dtype=acc, device=x.device)
        dv = torch.zeros(v.shape, dtype=acc, device=x.device)
        dscale = torch.zeros((), dtype=torch.float64, device=x.device)  # see contract
        dbias = None if bias is None else torch.zeros(y.shape[0], dtype=acc, device=x.device)
        delta = (g_out * out).sum(1)
        for a, b, _ in self._blocks(x.shape[0], x.device):
            xb = x[a:b].to(acc)
            s = xb @ yf.T
            z = scale * s if bias is None else scale * s + bias[None, :]
            p = torch.exp(z - lse[a:b, None])
            dv += p.T @ g_out[a:b]
            dz = p * (g_out[a:b] @ vf.T - delta[a:b, None])
            dx[a:b] = scale * (dz @ yf)
            dy += scale * (dz.T @ xb)
            dscale += (dz * s).sum(1).double().sum()
            if dbias is not None:
                dbias += dz.sum(0)
        return dx, dy, dv, dscale.to(acc), dbias

    def topk(self, x, y, k, exclude_diagonal):
        acc = acc_dtype(x.dtype)
        vals = torch.empty(x.shape[0], k, dtype=acc, device=x.device)
        idx = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
        cols = torch.arange(y.shape[0], device=x.device)
        for a, b, rows in self._blocks(x.shape[0], x.device):
            s = self._sims(x[a:b], y)
            if exclude_diagonal:
                s = s.masked_fill(cols[None, :] == rows[:, None], NEG_INF)
            order = torch.sort(s, dim=1, descending=True, stable=True)
            vals[a:b], idx[a:b] = order.values[:, :k], order.indices[:, :k]
        return vals, idx
