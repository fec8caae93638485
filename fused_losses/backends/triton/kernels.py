"""The Triton kernels (``@triton.jit``) of the backend and their jit helpers.

Every kernel is the same tile loop: for a block of rows of A, stream over column blocks of B and
compute ``s = A_tile · B_tileᵀ`` in fp32 over a masked feature loop (any D), always in the
query·keyᵀ orientation (``_oriented_sim``: the column-direction passes transpose the tile in
registers), so every pass of an op sees bit-identical ``s_ij``.  What differs is the function
of the tile:

- ``_lse_rows``: online logsumexp of ``scale·s + bias`` with the pair masks of InfoNCE
  (labels compared in-tile from O(N + M) vectors), positive sums and counts.  Row statistics
  are ``_lse_rows(x, y)``; column statistics ``_lse_rows(y, x)`` with the mask read transposed.
- ``_grad_rows``: recompute the tile and its dZ (row- and column-side softmax terms) and
  accumulate ``scale · dZ · B``: ``dx = _grad_rows(x, y)``, ``dy = _grad_rows(y, x)``.
- ``_lse_rowcol`` / ``_grad_xy``: the fused contrastive path (one forward sweep for row and
  column statistics, one backward sweep for dx and dy; launchers.py).
- SigLIP (``_siglip_fwd_rows``, ``_siglip_grad_rows``), multi-similarity (``_ms_mine_rows``,
  ``_ms_fwd_rows`` with two online LSEs seeded with 0, ``_ms_grad_rows``: the mining thresholds
  are hard comparisons on s, hence the bit-identical tiles), the softmax-weighted matmul
  (``_smm_fwd_rows`` flash-attention style, ``_smm_grad_rows`` for dx/dy, ``_smm_dv_rows``),
  which also carries Sinkhorn's gradient and transport application (fused.py), and top-k.

What is compiled in and what is not (scripts/triton_check.py compiles every combination):

- ``tl.constexpr``: the tile shapes, the orientation ``TRANSPOSED`` and ``ALLOW_TF32``.
- Every other flag (labels, bias, exclusions, column terms, mining, row selection) is a
  runtime ``bool`` (Triton does not specialize bools): a uniform branch or a select on the
  GPU, and one compiled kernel for all the combinations a loss can ask for.
- Sizes and offsets are not specialized (``do_not_specialize``): a batch of 17 rows and one of
  16 run the same binary.  The launchers pass row strides that are multiples of 16 and 16-byte
  aligned pointers (padding D when needed), so those attributes never vary either.

Precision of the dots: the similarity tile multiplies the inputs (bf16/fp16 on tensor cores;
fp32 exactly, by FMA, unless ``ALLOW_TF32``).  The products with an fp32 left operand (dZ·B,
P·V, g·vᵀ) use TF32 tensor cores when ``ALLOW_TF32``: the launchers set it for 16-bit inputs
(a 10-bit mantissa for dZ instead of the 8 bits a bf16 dZ would keep) and for fp32 inputs only
when ``torch.backends.cuda.matmul.allow_tf32`` is on.

Imported only when triton is importable (``__init__``)."""

from __future__ import annotations

import triton
import triton.language as tl

# Sizes, offsets and counts: bounds only, never specialized (see the module docstring).
_SIZES = ("n", "m", "d", "e", "k", "n_a", "n_b", "n_i", "n_j", "n_keys", "offset", "n_sel")


def _kernel(fn):
    """``triton.jit`` with every size-like argument of ``fn`` left unspecialized."""
    import inspect

    names = [p for p in inspect.signature(fn).parameters if p in _SIZES]
    return triton.jit(fn, do_not_specialize=names)


@triton.jit
def _pair_mask(rows, cols, lab_ptr, klab_ptr, n_q, n_keys, offset, TRANSPOSED: tl.constexpr,
               has_labels, no_pos, excl, decoupled):
    """(pos, cand) of the tile rows × cols, for the pairs (i, j) of the original problem
    (query i < n_q, key j): (rows, cols) = (i, j), or (j, i) when TRANSPOSED.  The flags are
    runtime scalars; without labels the label loads are masked off (the pointers are dummies)."""
    if TRANSPOSED:
        i = cols[None, :]
        j = rows[:, None]
        li = tl.load(lab_ptr + cols, mask=(cols < n_q) & has_labels, other=-1)[None, :]
        lj = tl.load(klab_ptr + rows, mask=(rows < n_keys) & has_labels, other=-2)[:, None]
    else:
        i = rows[:, None]
        j = cols[None, :]
        li = tl.load(lab_ptr + rows, mask=(rows < n_q) & has_labels, other=-1)[:, None]
        lj = tl.load(klab_ptr + cols, mask=(cols < n_keys) & has_labels, other=-2)[None, :]
    is_key = j < n_keys
    diag = (j == i + offset) & is_key
    pos = tl.where(has_labels, (li == lj) & is_key, diag) & (no_pos == 0)
    cand = (diag & excl) == 0  # all pairs, or all but the diagonal
    pos = pos & cand
    cand = cand & ((pos & decoupled) == 0)
    return pos, cand


@triton.jit
def _tf32(x, ALLOW_TF32: tl.constexpr):
    """An fp32 operand of a TF32 dot rounded to TF32 (10 mantissa bits, to nearest, ties away
    from zero, as cvt.rna; NaN kept): the tensor cores would just ignore its 13 low bits, a
    truncation biased toward zero that doubles the error.  Other dtypes, or ALLOW_TF32 off:
    unchanged."""
    if ALLOW_TF32:
        if x.dtype == tl.float32:
            bits = x.to(tl.int32, bitcast=True)
            r = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = 0xFFFFE000
            x = tl.where(x == x, r, x)
    return x


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
        acc += tl.dot(_tf32(a, ALLOW_TF32), tl.trans(_tf32(b, ALLOW_TF32)),
                      allow_tf32=ALLOW_TF32)
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
def _online_lse_step(m_i, l_i, zc, keep):
    """One tile of the row-wise online logsumexp over the kept entries of zc (−inf
    elsewhere).  Masked entries select 0 (never exp(−inf)·0, never inf·0); a kept NaN makes
    the sum NaN (whether or not the max skips it), and a NaN sum stays NaN.  Returns the new
    (max, sum) and the tile's (rescale of the old sum, probabilities)."""
    m_new = tl.maximum(m_i, tl.max(zc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - m_safe))
    p = tl.where(keep, tl.exp(zc - m_safe[:, None]), 0.0)
    return m_new, l_i * rescale + tl.sum(p, 1), rescale, p


@triton.jit
def _online_lse_result(m_i, l_i):
    """The LSE of an online reduction: −inf for an empty row, NaN if any entry was NaN."""
    lse = tl.where(m_i == float("-inf"), float("-inf"),
                   m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)))
    return tl.where(l_i != l_i, float("nan"), lse)


@triton.jit
def _second_logits(z, cand, ratio):
    """ratio·z over the candidates, −inf elsewhere (select, never multiply: ratio 0 times a
    masked −inf is NaN): the second LSE's logits, formed alike in its forward and backward so
    that a fused multiply-add cannot round them differently in one pass."""
    return tl.where(cand, ratio * z, float("-inf"))


@triton.jit
def _contrastive_tile(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b, scale,
                      lab_ptr, klab_ptr, n_keys, offset, has_labels, no_pos, excl, decoupled,
                      TRANSPOSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """One contrastive tile: (s, z = scale·s, pos, cand), the masks limited to in-bounds
    pairs; every contrastive pass starts here, so all compute s_ij identically."""
    s = _oriented_sim(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                      TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
    n_q = n_b if TRANSPOSED else n_a
    pos, cand = _pair_mask(rows, cols, lab_ptr, klab_ptr, n_q, n_keys, offset, TRANSPOSED,
                           has_labels, no_pos, excl, decoupled)
    inb = (rows[:, None] < n_a) & (cols[None, :] < n_b)
    return s, s * scale, pos & inb, cand & inb


@triton.jit
def _acc_rows_times(acc, w, b_ptr, cols, cmask, d, d0, stride_b, BLOCK_DO: tl.constexpr,
                    ALLOW_TF32: tl.constexpr):
    """acc + w · B[cols, d0 : d0 + BLOCK_DO]: the product step of every gradient kernel
    (w stays fp32).  The output features are split over the grid's second axis in chunks of
    BLOCK_DO; every chunk's program recomputes the same similarity tiles over all of D, so s_ij
    is bit-identical in every chunk and pass."""
    dso = d0 + tl.arange(0, BLOCK_DO)
    bv = tl.load(b_ptr + cols[:, None] * stride_b + dso[None, :],
                 mask=cmask[:, None] & (dso[None, :] < d), other=0.0)
    return tl.dot(_tf32(w, ALLOW_TF32), _tf32(bv, ALLOW_TF32).to(tl.float32), acc,
                  allow_tf32=ALLOW_TF32)


@triton.jit
def _store_rows(out_ptr, val, rows, rmask, d, d0, stride_o, BLOCK_DO: tl.constexpr):
    dso = d0 + tl.arange(0, BLOCK_DO)
    tl.store(out_ptr + rows[:, None] * stride_o + dso[None, :], val,
             mask=rmask[:, None] & (dso[None, :] < d))


@_kernel
def _lse_rows(a_ptr, b_ptr, scale_ptr, bias_ptr, lab_ptr, klab_ptr, lse_ptr, psum_ptr,
              pcnt_ptr, sel_ptr, lse2_ptr, n_sel, n_a, n_b, d, stride_a, stride_b, n_keys,
              offset, ratio, has_bias, has_labels, no_pos, excl, decoupled, sel_idx, sel_flag,
              HAS2: tl.constexpr, TRANSPOSED: tl.constexpr, ALLOW_TF32: tl.constexpr,
              BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online LSE (+ positive sums and counts) of a block of rows.  Which rows (the exact
    redo of the columns the one-sweep forward could not resolve): ``sel_idx``, the rows listed
    in the int32 vector ``sel_ptr`` (n_sel of them); ``sel_flag``, the rows whose entry of
    ``sel_ptr`` (one per row) is nonzero (no host sync: CUDA-graph capture); else all.  A
    program with no row to do skips the column loop.  ``HAS2`` (no bias): a second online LSE
    of ``ratio``·z over the same candidates into ``lse2_ptr`` (hard-negative reweighting)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    if sel_idx:
        rows = tl.load(sel_ptr + rows, mask=rows < n_sel, other=n_a)
    live = rows < n_a
    if sel_flag:
        live = live & (tl.load(sel_ptr + rows, mask=live, other=0) != 0)
    n_loop = tl.where(tl.max(live.to(tl.int32), 0) > 0, n_b, 0)
    scale = tl.load(scale_ptr)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    ps = tl.zeros((BLOCK_M,), tl.float32)
    pc = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l2 = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_loop, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s, z, pos, cand = _contrastive_tile(
            a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b, scale,
            lab_ptr, klab_ptr, n_keys, offset, has_labels, no_pos, excl, decoupled, TRANSPOSED,
            BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        zb = z + tl.load(bias_ptr + cols, mask=(cols < n_b) & has_bias, other=0.0)[None, :]
        zc = tl.where(cand, zb, float("-inf"))
        m_i, l_i, _, _ = _online_lse_step(m_i, l_i, zc, cand)
        if HAS2:
            m2, l2, _, _ = _online_lse_step(m2, l2, _second_logits(z, cand, ratio), cand)
        ps += tl.sum(tl.where(pos, z, 0.0), 1)
        pc += tl.sum(pos.to(tl.float32), 1)
    lse = _online_lse_result(m_i, l_i)
    tl.store(lse_ptr + rows, lse, mask=live)
    if HAS2:
        tl.store(lse2_ptr + rows, _online_lse_result(m2, l2), mask=live)
    tl.store(psum_ptr + rows, ps, mask=live)
    tl.store(pcnt_ptr + rows, pc, mask=live)


@_kernel
def _grad_rows(a_ptr, b_ptr, out_ptr, scale_ptr, biasc_ptr, biasr_ptr, lse_a, g_a, gp_a,
               lse_b, g_b, gp_b, lab_ptr, klab_ptr, dscale_ptr, bterm_ptr, lse2_ptr, g2_ptr,
               n_a, n_b, d, stride_a, stride_b, stride_o, n_keys, offset, ratio, has_bias_c,
               has_bias_r, has_b, has_labels, no_pos, excl, decoupled, HAS2: tl.constexpr,
               TRANSPOSED: tl.constexpr, ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """out[rows] = scale · Σ_c dZ_rc B_c for a block of rows, with
    dZ_rc = g_a_r e^{z + biasC_c − lse_a_r} cand + g_b_c e^{z + biasR_r − lse_b_c} cand
            − pos (gp_a_r + gp_b_c) [+ g2_i e^{ratio·z − lse2_i} cand, i the query].
    Also one fp32 partial of Σ dZ·s per program, and per row Σ_c of the b-side softmax term
    (the bias gradient when the rows are the columns of the original problem)."""
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_DO  # feature chunk of the output
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_a
    scale = tl.load(scale_ptr)
    la = tl.load(lse_a + rows, mask=rmask, other=0.0)
    ga = tl.load(g_a + rows, mask=rmask, other=0.0)
    gpa = tl.load(gp_a + rows, mask=rmask, other=0.0)
    br = tl.load(biasr_ptr + rows, mask=rmask & has_bias_r, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    bterm = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_b, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_b
        s, z, pos, cand = _contrastive_tile(
            a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b, scale,
            lab_ptr, klab_ptr, n_keys, offset, has_labels, no_pos, excl, decoupled, TRANSPOSED,
            BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        za = z + tl.load(biasc_ptr + cols, mask=cmask & has_bias_c, other=0.0)[None, :]
        # Each side's positive term is subtracted from that side's softmax term first: with
        # a sharp softmax p_ii ≈ 1 and g·p − g/|P| cancels; two separate cancellations keep
        # more digits than one of their sum.
        # Select, never multiply: a side with g = 0 (no such term) may have exp() = inf.
        dz = tl.where(cand & (ga[:, None] != 0), ga[:, None] * tl.exp(za - la[:, None]),
                      0.0) - tl.where(pos, gpa[:, None], 0.0)
        if has_b:
            lb = tl.load(lse_b + cols, mask=cmask, other=0.0)
            gb = tl.load(g_b + cols, mask=cmask, other=0.0)
            gpb = tl.load(gp_b + cols, mask=cmask, other=0.0)
            tb = tl.where(cand & (gb[None, :] != 0),
                          gb[None, :] * tl.exp(z + br[:, None] - lb[None, :]), 0.0)
            bterm += tl.sum(tb, 1)
            dz += tb - tl.where(pos, gpb[None, :], 0.0)
        if HAS2:  # the second LSE of the query rows (rows here, or columns when TRANSPOSED)
            n_q = n_b if TRANSPOSED else n_a
            l2 = _anchor_vec(lse2_ptr, rows, cols, n_q, TRANSPOSED)
            g2 = _anchor_vec(g2_ptr, rows, cols, n_q, TRANSPOSED)
            dz += tl.where(cand & (g2 != 0), g2 * tl.exp(_second_logits(z, cand, ratio) - l2),
                           0.0)
        dscale += tl.sum(dz * s, 1)
        acc = _acc_rows_times(acc, dz, b_ptr, cols, cmask, d, d0, stride_b, BLOCK_DO,
                              ALLOW_TF32)
    _store_rows(out_ptr, acc * scale, rows, rmask, d, d0, stride_o, BLOCK_DO)
    if d0 == 0:  # the scalar partials once per row block, not once per feature chunk
        tl.store(dscale_ptr + pid, tl.sum(dscale, 0))
        tl.store(bterm_ptr + rows, bterm, mask=rmask)


# ----------------------------------------------------------------------------------------
# The fused contrastive path (default unless deterministic): one forward sweep for row and
# column statistics, one backward sweep for dx and dy.

@_kernel
def _lse_rowcol(x_ptr, y_ptr, scale_ptr, cref_ptr, lab_ptr, klab_ptr, lse_ptr, psum_ptr,
                pcnt_ptr, csum_ptr, cpsum_ptr, cpcnt_ptr, n, m, d, stride_x, stride_y,
                n_keys, offset, has_labels, no_pos, excl, decoupled, ALLOW_TF32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row and column statistics in one sweep over the tiles (rows = queries).

    Rows: the online LSE of ``_lse_rows``.  Key columns j: Σ_i exp(z_ij − cref_j) over the
    candidates, added atomically across row blocks, with the fixed per-column reference
    cref_j ≥ max_i z_ij (the norm bound, computed on the device), so no running max has to be
    merged across programs; plus the column positive sums and counts."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    scale = tl.load(scale_ptr)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    ps = tl.zeros((BLOCK_M,), tl.float32)
    pc = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s, z, pos, cand = _contrastive_tile(
            x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, scale,
            lab_ptr, klab_ptr, n_keys, offset, has_labels, no_pos, excl, decoupled, False,
            BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        zc = tl.where(cand, z, float("-inf"))
        m_i, l_i, _, _ = _online_lse_step(m_i, l_i, zc, cand)
        zp = tl.where(pos, z, 0.0)
        ps += tl.sum(zp, 1)
        pf = pos.to(tl.float32)
        pc += tl.sum(pf, 1)
        kmask = cols < n_keys
        cref = tl.load(cref_ptr + cols, mask=kmask, other=0.0)
        # NaN z stays NaN in the sum (selected, not multiplied away).
        q = tl.where(cand, tl.exp(z - cref[None, :]), 0.0)
        tl.atomic_add(csum_ptr + cols, tl.sum(q, 0), mask=kmask, sem="relaxed")
        tl.atomic_add(cpsum_ptr + cols, tl.sum(zp, 0), mask=kmask, sem="relaxed")
        tl.atomic_add(cpcnt_ptr + cols, tl.sum(pf, 0), mask=kmask, sem="relaxed")
    lse = _online_lse_result(m_i, l_i)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(psum_ptr + rows, ps, mask=rmask)
    tl.store(pcnt_ptr + rows, pc, mask=rmask)


@_kernel
def _grad_xy(x_ptr, y_ptr, dx_ptr, dy_ptr, scale_ptr, bias_ptr, lse_r, g_r, gp_r, lse_c,
             g_c, gp_c, lab_ptr, klab_ptr, dscale_ptr, dbias_ptr, lse2_ptr, g2_ptr, n, m, d,
             stride_x, stride_y, stride_dx, stride_dy, n_keys, offset, ratio, has_bias,
             has_col, has_labels, no_pos, excl, decoupled, HAS2: tl.constexpr,
             ALLOW_TF32: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DO: tl.constexpr, BLOCK_DY: tl.constexpr):
    """dx and dy in one sweep (rows = queries; output feature chunk d0 on axis 1).

    Per tile: s (the forward's tile, bit-identical), dZ as in ``_grad_rows`` (with the
    second row LSE's term when ``HAS2``), dx[rows] += dZ·Y in registers, dy[cols] += dZᵀ·X by
    fp32 atomic adds (order-dependent in the last bits), Σ dZ∘s per program, and the bias
    gradient Σ_i (row softmax term) per column."""
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_DO
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n
    scale = tl.load(scale_ptr)
    la = tl.load(lse_r + rows, mask=rmask, other=0.0)
    ga = tl.load(g_r + rows, mask=rmask, other=0.0)
    gpa = tl.load(gp_r + rows, mask=rmask, other=0.0)
    if HAS2:
        l2 = tl.load(lse2_ptr + rows, mask=rmask, other=0.0)
        g2 = tl.load(g2_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < m
        s, z, pos, cand = _contrastive_tile(
            x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, scale,
            lab_ptr, klab_ptr, n_keys, offset, has_labels, no_pos, excl, decoupled, False,
            BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        za = z + tl.load(bias_ptr + cols, mask=cmask & has_bias, other=0.0)[None, :]
        trow = tl.where(cand & (ga[:, None] != 0), ga[:, None] * tl.exp(za - la[:, None]),
                        0.0)
        dz = trow - tl.where(pos, gpa[:, None], 0.0)
        if has_col:
            lb = tl.load(lse_c + cols, mask=cmask, other=0.0)
            gb = tl.load(g_c + cols, mask=cmask, other=0.0)
            gpb = tl.load(gp_c + cols, mask=cmask, other=0.0)
            dz += (tl.where(cand & (gb[None, :] != 0),
                            gb[None, :] * tl.exp(z - lb[None, :]), 0.0)
                   - tl.where(pos, gpb[None, :], 0.0))
        if HAS2:
            dz += tl.where(cand & (g2[:, None] != 0),
                           g2[:, None] * tl.exp(_second_logits(z, cand, ratio) - l2[:, None]),
                           0.0)
        dscale += tl.sum(dz * s, 1)
        if has_bias:
            if d0 == 0:
                tl.atomic_add(dbias_ptr + cols, tl.sum(trow, 0), mask=cmask, sem="relaxed")
        acc = _acc_rows_times(acc, dz, y_ptr, cols, cmask, d, d0, stride_y, BLOCK_DO,
                              ALLOW_TF32)
        # dy[cols] += scale·dZᵀ·X[rows], BLOCK_DY output features at a time (fewer live
        # registers than the whole chunk at once)
        dzt = tl.trans(_tf32(dz, ALLOW_TF32))
        for h in range(0, BLOCK_DO, BLOCK_DY):
            dsh = d0 + h + tl.arange(0, BLOCK_DY)
            hmask = dsh < d
            xo = tl.load(x_ptr + rows[:, None] * stride_x + dsh[None, :],
                         mask=rmask[:, None] & hmask[None, :], other=0.0)
            xo = _tf32(xo, ALLOW_TF32).to(tl.float32)
            dyt = tl.dot(dzt, xo, allow_tf32=ALLOW_TF32) * scale
            tl.atomic_add(dy_ptr + cols[:, None] * stride_dy + dsh[None, :], dyt,
                          mask=cmask[:, None] & hmask[None, :], sem="relaxed")
    _store_rows(dx_ptr, acc * scale, rows, rmask, d, d0, stride_dx, BLOCK_DO)
    if d0 == 0:
        tl.store(dscale_ptr + pid, tl.sum(dscale, 0))


# ----------------------------------------------------------------------------------------
# SigLIP, multi-similarity, softmax-weighted matmul: the same tile loop (``_oriented_sim``,
# so every pass of an op sees bit-identical s_ij), a different function of the tile.

@triton.jit
def _anchor_vec(ptr, rows, cols, n_i, TRANSPOSED: tl.constexpr):
    """A vector over the anchors i of the original problem, shaped to broadcast over the
    tile: i runs along the rows, or along the columns when TRANSPOSED."""
    if TRANSPOSED:
        v = tl.load(ptr + cols, mask=cols < n_i, other=0.0)[None, :]
    else:
        v = tl.load(ptr + rows, mask=rows < n_i, other=0.0)[:, None]
    return v


@triton.jit
def _is_diag(rows, cols, offset, TRANSPOSED: tl.constexpr):
    """(i, j) with j == i + offset, for the tile in its orientation."""
    if TRANSPOSED:
        d = rows[:, None] == cols[None, :] + offset
    else:
        d = cols[None, :] == rows[:, None] + offset
    return d


@triton.jit
def _softplus(t):
    # log(1 + e^t) = max(t, 0) + log1p(e^{-|t|}); log1p by its series where e^{-|t|} is tiny.
    e = tl.exp(-tl.abs(t))
    return tl.maximum(t, 0.0) + tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@_kernel
def _siglip_fwd_rows(x_ptr, y_ptr, scale_ptr, bias_ptr, out_ptr, n, m, d, stride_x,
                     stride_y, offset, ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_i = Σ_j softplus(−σ_ij (scale·s_ij + bias)), σ = +1 on the pair (i, i + offset)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s = _oriented_sim(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, False,
                          BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        sign = tl.where(_is_diag(rows, cols, offset, False), 1.0, -1.0)
        inb = (rows[:, None] < n) & (cols[None, :] < m)
        acc += tl.sum(tl.where(inb, _softplus(-sign * (s * scale + bias)), 0.0), 1)
    tl.store(out_ptr + rows, acc, mask=rows < n)


@_kernel
def _siglip_grad_rows(a_ptr, b_ptr, out_ptr, scale_ptr, bias_ptr, g_ptr, part_ptr, n_a, n_b,
                      d, stride_a, stride_b, stride_o, n_i, offset, TRANSPOSED: tl.constexpr,
                      ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """out[rows] = scale · Σ_c G_rc B_c with G_ij = −g_i σ_ij sigmoid(−σ_ij (z_ij + bias));
    per program, the partials Σ G∘s and Σ G (for dscale and dbias)."""
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_DO  # feature chunk of the output
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_a
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    ds = tl.zeros((BLOCK_M,), tl.float32)
    db = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_b, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_b
        s = _oriented_sim(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                          TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        sign = tl.where(_is_diag(rows, cols, offset, TRANSPOSED), 1.0, -1.0)
        g = _anchor_vec(g_ptr, rows, cols, n_i, TRANSPOSED)
        t = -sign * (s * scale + bias)
        # sigmoid(t) without overflow on either side
        e = tl.exp(-tl.abs(t))
        sig = tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        G = tl.where(rmask[:, None] & cmask[None, :], -g * sign * sig, 0.0)
        ds += tl.sum(G * s, 1)
        db += tl.sum(G, 1)
        acc = _acc_rows_times(acc, G, b_ptr, cols, cmask, d, d0, stride_b, BLOCK_DO,
                              ALLOW_TF32)
    _store_rows(out_ptr, acc * scale, rows, rmask, d, d0, stride_o, BLOCK_DO)
    if d0 == 0:
        tl.store(part_ptr + 2 * pid, tl.sum(ds, 0))
        tl.store(part_ptr + 2 * pid + 1, tl.sum(db, 0))


@triton.jit
def _ms_pairs(rows, cols, lab_ptr, rlab_ptr, n_a, n_b, n_i, n_j, offset, excl_self,
              TRANSPOSED: tl.constexpr):
    """(pos, neg) of multi-similarity for the in-bounds tile: same / different label, the
    self pair (j == i + offset) neither when ``excl_self`` (a runtime flag)."""
    if TRANSPOSED:
        li = tl.load(lab_ptr + cols, mask=cols < n_i, other=-1)[None, :]
        lj = tl.load(rlab_ptr + rows, mask=rows < n_j, other=-1)[:, None]
    else:
        li = tl.load(lab_ptr + rows, mask=rows < n_i, other=-1)[:, None]
        lj = tl.load(rlab_ptr + cols, mask=cols < n_j, other=-1)[None, :]
    inb = (rows[:, None] < n_a) & (cols[None, :] < n_b)
    inb = inb & ((_is_diag(rows, cols, offset, TRANSPOSED) & excl_self) == 0)
    same = li == lj
    return same & inb, (same == 0) & inb


@_kernel
def _ms_mine_rows(x_ptr, y_ptr, lab_ptr, rlab_ptr, minp_ptr, maxn_ptr, n, m, d, stride_x,
                  stride_y, offset, excl_self, ALLOW_TF32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """min over the positives and max over the negatives of s_ij, per anchor (±inf when
    the set is empty; NaN when a NaN similarity is among them)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    minp = tl.full((BLOCK_M,), float("inf"), tl.float32)
    maxn = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    nan = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s = _oriented_sim(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, False,
                          BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        pos, neg = _ms_pairs(rows, cols, lab_ptr, rlab_ptr, n, m, n, m, offset, excl_self,
                             False)
        nan = tl.maximum(nan, tl.max(tl.where((pos | neg) & (s != s), 1.0, 0.0), 1))
        minp = tl.minimum(minp, tl.min(tl.where(pos, s, float("inf")), 1))
        maxn = tl.maximum(maxn, tl.max(tl.where(neg, s, float("-inf")), 1))
    ok = rows < n
    tl.store(minp_ptr + rows, tl.where(nan > 0, float("nan"), minp), mask=ok)
    tl.store(maxn_ptr + rows, tl.where(nan > 0, float("nan"), maxn), mask=ok)


@triton.jit
def _ms_kept(s, pos, neg, rows, cols, minp_ptr, maxn_ptr, n_i, epsilon, has_eps,
             TRANSPOSED: tl.constexpr):
    """The mined pairs: the hard thresholds on s_ij (same s in every pass, see above).
    Without mining (``has_eps`` false) the threshold loads are masked off (±inf)."""
    if TRANSPOSED:
        keep = (cols < n_i) & has_eps
        minp = tl.load(minp_ptr + cols, mask=keep, other=float("-inf"))[None, :]
        maxn = tl.load(maxn_ptr + cols, mask=keep, other=float("inf"))[None, :]
    else:
        keep = (rows < n_i) & has_eps
        minp = tl.load(minp_ptr + rows, mask=keep, other=float("-inf"))[:, None]
        maxn = tl.load(maxn_ptr + rows, mask=keep, other=float("inf"))[:, None]
    # Without mining every pair is kept: s − ε < +inf and s + ε > −inf hold for finite s, and
    # a NaN s (not kept either way) makes the row NaN through the mining pass.
    kp = pos & ((s - epsilon < maxn) | (has_eps == 0))
    kn = neg & ((s + epsilon > minp) | (has_eps == 0))
    return kp, kn


@_kernel
def _ms_fwd_rows(x_ptr, y_ptr, lab_ptr, rlab_ptr, minp_ptr, maxn_ptr, plse_ptr, nlse_ptr,
                 n, m, d, stride_x, stride_y, offset, alpha, beta, base, epsilon, has_eps,
                 excl_self, ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Two online LSEs per anchor seeded with the term 0 (the "1 +"): over the kept
    positives of −α(s − base) and the kept negatives of β(s − base)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mp = tl.zeros((BLOCK_M,), tl.float32)  # running max, seeded by the term 0
    lp = tl.full((BLOCK_M,), 1.0, tl.float32)
    mn = tl.zeros((BLOCK_M,), tl.float32)
    ln = tl.full((BLOCK_M,), 1.0, tl.float32)
    nan = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s = _oriented_sim(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, False,
                          BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        pos, neg = _ms_pairs(rows, cols, lab_ptr, rlab_ptr, n, m, n, m, offset, excl_self,
                             False)
        nan = tl.maximum(nan, tl.max(tl.where((pos | neg) & (s != s), 1.0, 0.0), 1))
        kp, kn = _ms_kept(s, pos, neg, rows, cols, minp_ptr, maxn_ptr, n, epsilon, has_eps,
                          False)
        tp = tl.where(kp, -alpha * (s - base), float("-inf"))
        m_new = tl.maximum(mp, tl.max(tp, 1))
        lp = lp * tl.exp(mp - m_new) + tl.sum(tl.where(kp, tl.exp(tp - m_new[:, None]), 0.0), 1)
        mp = m_new
        tn = tl.where(kn, beta * (s - base), float("-inf"))
        m_new = tl.maximum(mn, tl.max(tn, 1))
        ln = ln * tl.exp(mn - m_new) + tl.sum(tl.where(kn, tl.exp(tn - m_new[:, None]), 0.0), 1)
        mn = m_new
    ok = rows < n
    tl.store(plse_ptr + rows, tl.where(nan > 0, float("nan"), mp + tl.log(lp)), mask=ok)
    tl.store(nlse_ptr + rows, tl.where(nan > 0, float("nan"), mn + tl.log(ln)), mask=ok)


@_kernel
def _ms_grad_rows(a_ptr, b_ptr, out_ptr, lab_ptr, rlab_ptr, minp_ptr, maxn_ptr, plse_ptr,
                  nlse_ptr, g_ptr, n_a, n_b, d, stride_a, stride_b, stride_o, n_i, n_j,
                  offset, alpha, beta, base, epsilon, has_eps, excl_self,
                  TRANSPOSED: tl.constexpr, ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    """out[rows] = Σ_c dS_rc B_c, dS_ij = g_i (e^{β(s−base) − nlse_i}·kept_neg
    − e^{−α(s−base) − plse_i}·kept_pos): dx (rows = anchors) or dy (TRANSPOSED)."""
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_DO  # feature chunk of the output
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_a
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for c0 in range(0, n_b, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_b
        s = _oriented_sim(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                          TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        pos, neg = _ms_pairs(rows, cols, lab_ptr, rlab_ptr, n_a, n_b, n_i, n_j, offset,
                             excl_self, TRANSPOSED)
        kp, kn = _ms_kept(s, pos, neg, rows, cols, minp_ptr, maxn_ptr, n_i, epsilon,
                          has_eps, TRANSPOSED)
        g = _anchor_vec(g_ptr, rows, cols, n_i, TRANSPOSED)
        plse = _anchor_vec(plse_ptr, rows, cols, n_i, TRANSPOSED)
        nlse = _anchor_vec(nlse_ptr, rows, cols, n_i, TRANSPOSED)
        dS = (tl.where(kn, g * tl.exp(beta * (s - base) - nlse), 0.0)
              - tl.where(kp, g * tl.exp(-alpha * (s - base) - plse), 0.0))
        acc = _acc_rows_times(acc, dS, b_ptr, cols, cmask, d, d0, stride_b, BLOCK_DO,
                              ALLOW_TF32)
    _store_rows(out_ptr, acc, rows, rmask, d, d0, stride_o, BLOCK_DO)


@_kernel
def _smm_fwd_rows(x_ptr, y_ptr, v_ptr, scale_ptr, bias_ptr, out_ptr, lse_ptr, n, m, d, e,
                  stride_x, stride_y, stride_v, stride_o, has_bias, ALLOW_TF32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    """out[rows, e-block] = softmax_j(scale·s_ij + bias_j) v_j, online (flash-attention
    style); the second grid axis splits the value columns (each recomputes the softmax)."""
    pid = tl.program_id(0)
    pe = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    es = pe * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < n
    scale = tl.load(scale_ptr)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for c0 in range(0, m, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < m
        s = _oriented_sim(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, False,
                          BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        z = s * scale + tl.load(bias_ptr + cols, mask=cmask & has_bias, other=0.0)[None, :]
        inb = rmask[:, None] & cmask[None, :]
        z = tl.where(inb, z, float("-inf"))
        m_i, l_i, rescale, p = _online_lse_step(m_i, l_i, z, inb & (z > float("-inf")))
        vt = tl.load(v_ptr + cols[:, None] * stride_v + es[None, :],
                     mask=cmask[:, None] & (es[None, :] < e), other=0.0)
        acc = tl.dot(_tf32(p, ALLOW_TF32), _tf32(vt, ALLOW_TF32).to(tl.float32),
                     acc * rescale[:, None], allow_tf32=ALLOW_TF32)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    lse = tl.where(l_i != l_i, float("nan"), lse)
    # A row with no finite logit (every bias −inf) has no softmax: NaN, as in the reference.
    out = acc / tl.where(l_i > 0, l_i, float("nan"))[:, None]
    tl.store(out_ptr + rows[:, None] * stride_o + es[None, :], out,
             mask=rmask[:, None] & (es[None, :] < e))
    if pe == 0:
        tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _smm_dz(s, rows, cols, scale_ptr, biasv, lse_ptr, delta_ptr, g_ptr, v_ptr, n, m, e,
            stride_g, stride_v, TRANSPOSED: tl.constexpr, ALLOW_TF32: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """(P, dZ) of the tile: P_ij = e^{z_ij − lse_i}, dZ = P ∘ (g_out_i·v_j − delta_i), the
    dot g_out_i·v_j over a masked E loop (i = x rows, j = y rows; swapped if TRANSPOSED)."""
    z = s * tl.load(scale_ptr) + biasv
    lse = _anchor_vec(lse_ptr, rows, cols, n, TRANSPOSED)
    delta = _anchor_vec(delta_ptr, rows, cols, n, TRANSPOSED)
    if TRANSPOSED:
        gv = _sim_tile(v_ptr, g_ptr, rows, cols, m, n, e, stride_v, stride_g, BLOCK_M,
                       BLOCK_N, BLOCK_E, ALLOW_TF32)
        inb = (rows[:, None] < m) & (cols[None, :] < n)
    else:
        gv = _sim_tile(g_ptr, v_ptr, rows, cols, n, m, e, stride_g, stride_v, BLOCK_M,
                       BLOCK_N, BLOCK_E, ALLOW_TF32)
        inb = (rows[:, None] < n) & (cols[None, :] < m)
    p = tl.where(inb & (z > float("-inf")), tl.exp(z - lse), 0.0)
    return p, tl.where(inb, p * (gv - delta), 0.0)


@_kernel
def _smm_grad_rows(a_ptr, b_ptr, out_ptr, scale_ptr, bias_ptr, lse_ptr, delta_ptr, g_ptr,
                   v_ptr, part_ptr, n, m, d, e, stride_a, stride_b, stride_o, stride_g,
                   stride_v, has_bias, TRANSPOSED: tl.constexpr, ALLOW_TF32: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr, BLOCK_E: tl.constexpr):
    """dx (rows = x; B = y) or, TRANSPOSED, dy (rows = y; B = x): out = scale · dZ @ B.
    Per program the partial Σ dZ∘s (dscale); per row Σ_c dZ (dbias, TRANSPOSED only)."""
    pid = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_DO  # feature chunk of the output
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    if TRANSPOSED:
        n_a = m
        n_b = n
    else:
        n_a = n
        n_b = m
    rmask = rows < n_a
    scale = tl.load(scale_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    ds = tl.zeros((BLOCK_M,), tl.float32)
    dbias = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_b, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_b
        s = _oriented_sim(a_ptr, b_ptr, rows, cols, n_a, n_b, d, stride_a, stride_b,
                          TRANSPOSED, BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        # the bias is indexed by the y rows j
        if TRANSPOSED:
            biasv = tl.load(bias_ptr + rows, mask=rmask & has_bias, other=0.0)[:, None]
        else:
            biasv = tl.load(bias_ptr + cols, mask=cmask & has_bias, other=0.0)[None, :]
        _p, dz = _smm_dz(s, rows, cols, scale_ptr, biasv, lse_ptr, delta_ptr, g_ptr, v_ptr,
                         n, m, e, stride_g, stride_v, TRANSPOSED, ALLOW_TF32, BLOCK_M,
                         BLOCK_N, BLOCK_E)
        ds += tl.sum(dz * s, 1)
        dbias += tl.sum(dz, 1)
        acc = _acc_rows_times(acc, dz, b_ptr, cols, cmask, d, d0, stride_b, BLOCK_DO,
                              ALLOW_TF32)
    _store_rows(out_ptr, acc * scale, rows, rmask, d, d0, stride_o, BLOCK_DO)
    if d0 == 0:
        tl.store(part_ptr + pid, tl.sum(ds, 0))
        if TRANSPOSED:
            tl.store(part_ptr + tl.num_programs(0) + rows, dbias, mask=rmask)


@_kernel
def _smm_dv_rows(x_ptr, y_ptr, out_ptr, scale_ptr, bias_ptr, lse_ptr, g_ptr, n, m, d, e,
                 stride_x, stride_y, stride_o, stride_g, has_bias, ALLOW_TF32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """dv[rows = y rows, e-block] = Σ_i P_ij g_out_i (the tile in the TRANSPOSED
    orientation, so s is the forward's)."""
    pid = tl.program_id(0)
    pe = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    es = pe * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < m
    scale = tl.load(scale_ptr)
    biasr = tl.load(bias_ptr + rows, mask=rmask & has_bias, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < n
        s = _oriented_sim(y_ptr, x_ptr, rows, cols, m, n, d, stride_y, stride_x, True,
                          BLOCK_M, BLOCK_N, BLOCK_D, ALLOW_TF32)
        z = s * scale + biasr[:, None]
        lse = tl.load(lse_ptr + cols, mask=cmask, other=0.0)[None, :]
        p = tl.where(rmask[:, None] & cmask[None, :] & (z > float("-inf")),
                     tl.exp(z - lse), 0.0)
        gt = tl.load(g_ptr + cols[:, None] * stride_g + es[None, :],
                     mask=cmask[:, None] & (es[None, :] < e), other=0.0)
        acc = tl.dot(_tf32(p, ALLOW_TF32), _tf32(gt, ALLOW_TF32), acc, allow_tf32=ALLOW_TF32)
    tl.store(out_ptr + rows[:, None] * stride_o + es[None, :], acc,
             mask=rmask[:, None] & (es[None, :] < e))


@_kernel
def _topk_rows(x_ptr, y_ptr, val_ptr, idx_ptr, n, m, d, k, stride_x, stride_y, excl,
               ALLOW_TF32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The k largest s_ij per row, streamed over column tiles of width BLOCK_K ≥ k.

    Each (value, column) is one int64 key: the fp32 bits made order-preserving in the high
    half, ``2³²−1 − j`` in the low half (ties go to the smaller j).  The running best keys
    are kept sorted descending; a tile sorted ascending is merged by an elementwise max,
    which holds exactly the top BLOCK_K of the union (bitonic merge), then re-sorted."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    lowest = tl.full((BLOCK_M, BLOCK_K), -9223372036854775808, tl.int64)
    best = lowest
    for c0 in range(0, m, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        s = _sim_tile(x_ptr, y_ptr, rows, cols, n, m, d, stride_x, stride_y, BLOCK_M,
                      BLOCK_K, BLOCK_D, ALLOW_TF32) + 0.0  # −0.0 → +0.0
        s = tl.where((cols[None, :] == rows[:, None]) & excl, float("-inf"), s)
        bits = s.to(tl.int32, bitcast=True)
        hi = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        key = hi * 4294967296 + (4294967295 - cols[None, :].to(tl.int64))
        key = tl.where(cols[None, :] < m, key, lowest)
        best = tl.sort(tl.maximum(best, tl.sort(key, 1)), 1, descending=True)
    hi = (best >> 32).to(tl.int32)
    val = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    idx = 4294967295 - (best & 4294967295)
    ks = tl.arange(0, BLOCK_K)
    out = rows[:, None] * k + ks[None, :]
    ok = (rows[:, None] < n) & (ks[None, :] < k)
    tl.store(val_ptr + out, val, mask=ok)
    tl.store(idx_ptr + out, idx, mask=ok)
