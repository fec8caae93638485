// Per-element and per-line math of the CUDA kernels, shared by every pass (one idea, one place).
//
// Torch-free and CUDA-free: every function is FL_HD (__host__ __device__ under nvcc, plain inline
// under a host compiler), so csrc/cuda/tests/test_tile_math.cpp runs exactly this code on the CPU
// (`make cuda-check`): the only part of the CUDA backend executed on this GPU-less machine.
//
// Semantics are those of fused_losses/kernels.py (the kernel contract): PairMask, the online
// logsumexp with -inf for an empty line and NaN propagation, multi-similarity mining.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace flcuda {

// INFINITY / NAN (not std::numeric_limits: its constexpr host functions are not callable from
// device code without --expt-relaxed-constexpr).
FL_HD float neg_inf() { return -INFINITY; }
FL_HD float pos_inf() { return INFINITY; }
FL_HD float qnan() { return NAN; }
FL_HD bool is_nan(float v) { return v != v; }

// PairMask of kernels.py for one pair (i, j), given the two label values when labelled (the
// caller reads key labels only for j < n_keys).  Columns j >= n_keys (extra negatives) are
// candidates, never positives, never diagonal.
struct PairMaskArgs {
  const int64_t* labels = nullptr;      // (N,) or null: the positive of row i is column i+offset
  const int64_t* key_labels = nullptr;  // (n_keys,)
  int64_t n_keys = 0;
  int64_t offset = 0;
  bool exclude_diagonal = false;
  bool decoupled = false;
  bool no_positives = false;
};

FL_HD void pair_mask(const PairMaskArgs& m, int64_t i, int64_t j, int64_t li, int64_t lj,
                     bool& pos, bool& cand) {
  const bool is_key = j < m.n_keys;
  const bool diag = is_key && j == i + m.offset;
  if (m.no_positives) pos = false;
  else if (m.labels) pos = is_key && li == lj;
  else pos = diag;
  cand = true;
  if (m.exclude_diagonal) {
    pos = pos && !diag;
    cand = !diag;
  }
  if (m.decoupled) cand = cand && !pos;
}

// Online logsumexp state of one line: running max m and Σ exp(v − m).  Empty: m = −inf
// (value −inf).  A NaN anywhere makes m NaN for good (value NaN): never silently dropped.
struct Lse {
  float m, s;
  FL_HD static Lse empty() { return {neg_inf(), 0.f}; }
  FL_HD static Lse seeded_zero() { return {0.f, 1.f}; }  // log(1 + Σ ...): the value 0 counted
  FL_HD void merge(float m2, float s2) {
    if (is_nan(m) || is_nan(m2)) {
      m = qnan();
      s = 1.f;
      return;
    }
    if (m2 == neg_inf()) return;
    if (m == neg_inf()) {
      m = m2;
      s = s2;
      return;
    }
    if (m2 > m) {
      s = s * expf(m - m2) + s2;
      m = m2;
    } else {
      s = s + s2 * expf(m2 - m);
    }
  }
  FL_HD float value() const {
    if (is_nan(m) || m == neg_inf()) return m;
    return m + logf(s);
  }
};

// Max over selected values with NaN propagation (a selected NaN wins).
FL_HD float nan_max(float acc, float v) { return (is_nan(acc) || is_nan(v)) ? qnan() : fmaxf(acc, v); }
FL_HD float nan_min(float acc, float v) { return (is_nan(acc) || is_nan(v)) ? qnan() : fminf(acc, v); }

// The LSE contribution of a set of values of one line in one tile: first its max (nan_max over
// the selected values), then Σ exp(v − max) over the same values.  The shift is 0 when the max
// is ±inf or NaN, so that exp never sees inf − inf (the NaN is carried by merge instead).
FL_HD float lse_shift(float mx) { return (mx == neg_inf() || is_nan(mx) || mx == pos_inf()) ? 0.f : mx; }

// Multi-similarity (SPEC §3).  Pair classes of (i, j) with labels li, lj.
struct MsArgs {
  const int64_t* labels = nullptr;      // (N,)
  const int64_t* ref_labels = nullptr;  // (M,)
  int64_t offset = 0;
  bool exclude_self = false;
  float alpha = 2.f, beta = 50.f, base = 0.5f, eps = 0.1f;
  bool mining = true;
};

FL_HD void ms_classes(const MsArgs& a, int64_t i, int64_t j, int64_t li, int64_t lj, bool& pos,
                      bool& neg) {
  const bool self = a.exclude_self && j == i + a.offset;
  pos = !self && li == lj;
  neg = !self && li != lj;
}

// Mining: a positive is kept if s − ε < max_neg, a negative if s + ε > min_pos.  The very same
// expression in every pass (s is bit-identical there: csrc/cuda/tile_loop.cuh).
FL_HD void ms_kept(const MsArgs& a, float s, float min_pos, float max_neg, bool& pos, bool& neg) {
  if (!a.mining) return;
  pos = pos && (s - a.eps < max_neg);
  neg = neg && (s + a.eps > min_pos);
}

// Exponents of the two terms: u_pos = −α(s − base), u_neg = β(s − base).
FL_HD float ms_u_pos(const MsArgs& a, float s) { return -a.alpha * (s - a.base); }
FL_HD float ms_u_neg(const MsArgs& a, float s) { return a.beta * (s - a.base); }

// dL/ds of one pair (g: the anchor's upstream gradient), from the forward's LSEs.
FL_HD float ms_grad(const MsArgs& a, float s, bool kp, bool kn, float pos_lse, float neg_lse,
                    float g) {
  float d = 0.f;
  if (kn) d += expf(ms_u_neg(a, s) - neg_lse);
  if (kp) d -= expf(ms_u_pos(a, s) - pos_lse);
  return g * d;
}

// Contrastive dZ of one pair (kernels.py contrastive_bwd).  z = scale·s; bias_j folded into zb.
// Returns dZ; row_part receives the row softmax term (what dbias sums).  has_col: a column
// LSE exists for this column (j < n_keys and the call has column statistics).
FL_HD float contrastive_dz(bool pos, bool cand, float z, float zb, float row_lse, float g_row,
                           float g_rowpos, bool has_col, float col_lse, float g_col,
                           float g_colpos, float& row_part) {
  row_part = cand ? g_row * expf(zb - row_lse) : 0.f;
  float dz = row_part;
  if (pos) dz -= g_rowpos;
  if (has_col) {
    if (cand) dz += g_col * expf(z - col_lse);
    if (pos) dz -= g_colpos;
  }
  return dz;
}

// ------------------------------------------------------------------------ mma fragment layout
// Coordinates of the register fragments of mma.sync.aligned.m16n8k16.row.col (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"), for lane (0..31); g = lane/4,
// t = lane%4.  A (16×16, row-major): register r (0..3) holds A[row][k], A[row][k+1].
// B (16×8, k × n): register r (0..1) holds B[k][n], B[k+1][n].  C (16×8): element i (0..3).
// Used by TileAcc (tile_loop.cuh) and checked against a transcription of the ISA tables by
// csrc/cuda/tests/test_tile_math.cpp (a host emulation of the warp-level tile product).
FL_HD int mma_a_row(int lane, int r) { return (lane >> 2) + 8 * (r & 1); }
FL_HD int mma_a_k(int lane, int r) { return 2 * (lane & 3) + 8 * (r >> 1); }
FL_HD int mma_b_k(int lane, int r) { return 2 * (lane & 3) + 8 * r; }
FL_HD int mma_b_n(int lane) { return lane >> 2; }
FL_HD int mma_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
FL_HD int mma_c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }
// Warp tiling of the 64×64 similarity tile (8 warps as 4 × 2): warp w owns rows
// warp_row0(w)..+16 and columns warp_col0(w)..+32, i.e. four m16n8 accumulators.
FL_HD int warp_row0(int warp) { return (warp & 3) * 16; }
FL_HD int warp_col0(int warp) { return (warp >> 2) * 32; }

}  // namespace flcuda
