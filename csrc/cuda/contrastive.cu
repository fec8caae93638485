// Contrastive kernels of the CUDA backend (kernels.py contrastive_fwd / contrastive_bwd) on the
// shared tile loop (tile_loop.cuh).  NOT YET EXECUTED ON A GPU: compiled, ptxas-checked, and
// run under the host emulation only (tile_loop.cuh says what that covers).
//
// Forward: a row pass (online LSE of z + bias per query row, positive sums/counts) and, for
// symmetric losses, a column pass over the key columns (j < n_keys).  Backward: a row pass
// (dX = scale·dZ·Y and the per-CTA fp64 partials of dscale) and a column pass (dY = scale·dZᵀ·X
// and dbias); each recomputes the tiles, bit-identical to the forward's.  So symmetric CLIP
// forward+backward costs 4 similarity GEMM passes plus 2 gradient-product passes.
#include "cuda/dispatch.cuh"

namespace flcuda {
namespace {

template <typename T>
struct ContrastiveParams : PassParams<T> {
  const float* scale;
  const float* bias;
  PairMaskArgs mask;
  float *lse, *pos_sum, *pos_cnt;
  const float *row_lse, *g_row, *g_rowpos, *col_lse, *g_col, *g_colpos;
  float* grad;
  double* dscale_part;
  float* dbias;
};

// Label of the pair's row and key (0 when unlabelled; a key label only for j < n_keys).
__device__ __forceinline__ void pair_labels(const PairMaskArgs& mk, int64_t i, int64_t j,
                                            int64_t& li, int64_t& lj) {
  li = lj = 0;
  if (mk.labels) {
    li = mk.labels[i];
    lj = j < mk.n_keys ? mk.key_labels[j] : -1;
  }
}

template <typename T, bool ROWS>
__global__ void __launch_bounds__(kThreads, 2) contrastive_lse_kernel(ContrastiveParams<T> p) {
  FL_SMEM(smem_raw);
  const Smem sm(smem_raw, 1);
  const OwnedLine o(p.n_own);
  const float scale = *p.scale;
  const bool row_bias = ROWS && p.bias != nullptr;
  Lse run = Lse::empty();
  float psum = 0.f, pcnt = 0.f;
  for (int64_t t0 = 0; t0 < p.n_stream; t0 += kTile) {
    sim_tile<T>(p.x, ROWS ? o.own0 : t0, p.y, ROWS ? t0 : o.own0, sm.stage, sm.tile0);
    // Sweep 1: max over candidates (NaN-propagating), positive sums; remember the candidates.
    float mx = neg_inf();
    unsigned cand_bits = 0;
#pragma unroll 4
    for (int t = 0; t < 16; ++t) {
      const int k = o.q + 4 * t;
      const int64_t other = t0 + k;
      if (!o.ok || other >= p.n_stream) continue;
      const int64_t i = ROWS ? o.own : other, j = ROWS ? other : o.own;
      int64_t li, lj;
      pair_labels(p.mask, i, j, li, lj);
      bool pos, cand;
      pair_mask(p.mask, i, j, li, lj, pos, cand);
      const float z = scale * tile_at<ROWS>(sm.tile0, o.line, k);
      if (pos) {
        psum += z;
        pcnt += 1.f;
      }
      if (cand) {
        mx = nan_max(mx, row_bias ? z + p.bias[j] : z);
        cand_bits |= 1u << t;
      }
    }
    mx = quad_max(mx);
    // Sweep 2: Σ exp(v − max) over the same candidates (masks select: no exp of a masked entry).
    const float shift = lse_shift(mx);
    float sum = 0.f;
#pragma unroll 4
    for (int t = 0; t < 16; ++t) {
      if (!((cand_bits >> t) & 1u)) continue;
      const int k = o.q + 4 * t;
      const float z = scale * tile_at<ROWS>(sm.tile0, o.line, k);
      sum += expf((row_bias ? z + p.bias[t0 + k] : z) - shift);
    }
    run.merge(mx, quad_sum(sum));
  }
  psum = quad_sum(psum);
  pcnt = quad_sum(pcnt);
  if (o.ok && o.q == 0) {
    p.lse[o.own] = run.value();
    p.pos_sum[o.own] = psum;
    p.pos_cnt[o.own] = pcnt;
  }
}

template <typename T, bool ROWS>
__global__ void __launch_bounds__(kThreads, 2) contrastive_grad_kernel(ContrastiveParams<T> p) {
  FL_SMEM(smem_raw);
  const Smem sm(smem_raw, 1);
  const OwnedLine o(p.n_own);
  const float scale = *p.scale;
  const bool has_col = p.col_lse != nullptr;
  double dscale = 0.0, dbias = 0.0;
  for (int64_t t0 = 0; t0 < p.n_stream; t0 += kTile) {
    sim_tile<T>(p.x, ROWS ? o.own0 : t0, p.y, ROWS ? t0 : o.own0, sm.stage, sm.tile0);
    float part = 0.f, bpart = 0.f;
#pragma unroll 2
    for (int t = 0; t < 16; ++t) {
      const int k = o.q + 4 * t;
      const int64_t other = t0 + k;
      float w = 0.f;
      if (o.ok && other < p.n_stream) {
        const int64_t i = ROWS ? o.own : other, j = ROWS ? other : o.own;
        int64_t li, lj;
        pair_labels(p.mask, i, j, li, lj);
        bool pos, cand;
        pair_mask(p.mask, i, j, li, lj, pos, cand);
        const float s = tile_at<ROWS>(sm.tile0, o.line, k);
        const float z = scale * s;
        const float zb = p.bias ? z + p.bias[j] : z;
        const bool hc = has_col && j < p.mask.n_keys;
        float row_part;
        const float dz = contrastive_dz(
            pos, cand, z, zb, p.row_lse[i], p.g_row[i], p.g_rowpos[i], hc,
            hc ? p.col_lse[j] : 0.f, hc ? p.g_col[j] : 0.f, hc ? p.g_colpos[j] : 0.f, row_part);
        w = scale * dz;
        part += dz * s;
        bpart += row_part;
      }
      tile_at<ROWS>(sm.tile0, o.line, k) = w;
    }
    dscale += part;
    dbias += bpart;
    grad_product<ROWS>(sm.tile0, p.x, p.y, t0, p.n_stream, p.grad, o.own0, p.n_own, sm.stage);
  }
  grad_pass_sums<ROWS>(dscale, dbias, o, p.dscale_part, p.dbias, sm.scratch);
}

template <typename T>
ContrastiveParams<T> make_params(const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                                 const float* scale, const float* bias,
                                 const PairMaskArgs& mask, bool cols) {
  ContrastiveParams<T> p{};
  set_pass(p, x, y, n, m, d, cols);
  p.scale = scale;
  p.bias = bias;
  p.mask = mask;
  return p;
}

}  // namespace

int64_t pass_blocks(int64_t n) { return num_blocks(n); }

cudaError_t contrastive_lse(DType dt, const void* x, const void* y, int64_t n, int64_t m,
                            int64_t d, const float* scale, const float* bias,
                            const PairMaskArgs& mask, bool cols, float* lse, float* pos_sum,
                            float* pos_cnt, cudaStream_t stream) {
  if (cols && bias) return cudaErrorInvalidValue;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(x, y, n, m, d, scale, bias, mask, cols);
    if (cols) p.n_own = mask.n_keys;  // the key columns only
    p.lse = lse;
    p.pos_sum = pos_sum;
    p.pos_cnt = pos_cnt;
    return launch(cols ? contrastive_lse_kernel<T, false> : contrastive_lse_kernel<T, true>,
                  p.n_own, 1, p, stream);
  });
}

cudaError_t contrastive_grad(DType dt, const void* x, const void* y, int64_t n, int64_t m,
                             int64_t d, const float* scale, const float* bias,
                             const PairMaskArgs& mask, bool cols, const float* row_lse,
                             const float* g_row, const float* g_rowpos, const float* col_lse,
                             const float* g_col, const float* g_colpos, float* grad,
                             double* dscale_part, float* dbias, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(x, y, n, m, d, scale, bias, mask, cols);
    p.row_lse = row_lse;
    p.g_row = g_row;
    p.g_rowpos = g_rowpos;
    p.col_lse = col_lse;
    p.g_col = g_col;
    p.g_colpos = g_colpos;
    p.grad = grad;
    p.dscale_part = dscale_part;
    p.dbias = dbias;
    return launch(cols ? contrastive_grad_kernel<T, false> : contrastive_grad_kernel<T, true>,
                  p.n_own, 1, p, stream);
  });
}

}  // namespace flcuda
