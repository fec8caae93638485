// Multi-similarity kernels of the CUDA backend (kernels.py ms_mine / ms_fwd / ms_bwd) on the
// shared tile loop (tile_loop.cuh).  NOT YET EXECUTED ON A GPU: compiled, ptxas-checked, and
// run under the host emulation only (tile_loop.cuh says what that covers).
//
// Three passes (mining, the two online LSEs seeded with 0, gradient as a row and a column pass)
// all take s_ij from the same sim_tile with the same tile origins, and apply the mining rule with
// the same expression (tile_math.h ms_kept): a pair at the threshold cannot flip between them.
#include "cuda/dispatch.cuh"

namespace flcuda {
namespace {

template <typename T>
struct MsParams : PassParams<T> {
  MsArgs a;
  const float *min_pos_in, *max_neg_in, *pos_lse_in, *neg_lse_in, *g;
  float *min_pos, *max_neg, *pos_lse, *neg_lse;
  float* grad;
};

// Classes of pair (i, j) after mining (kept positive / kept negative).
__device__ __forceinline__ void ms_pair(const MsArgs& a, const float* min_pos,
                                        const float* max_neg, int64_t i, int64_t j, float s,
                                        bool& kp, bool& kn) {
  ms_classes(a, i, j, a.labels[i], a.ref_labels[j], kp, kn);
  if (a.mining) ms_kept(a, s, min_pos[i], max_neg[i], kp, kn);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) ms_mine_kernel(MsParams<T> p) {
  FL_SMEM(smem_raw);
  const Smem sm(smem_raw, 1);
  const OwnedLine o(p.n_own);
  const int64_t i = o.own;
  float lo = pos_inf(), hi = neg_inf();
  for (int64_t t0 = 0; t0 < p.n_stream; t0 += kTile) {
    sim_tile<T>(p.x, o.own0, p.y, t0, sm.stage, sm.tile0);
#pragma unroll 4
    for (int t = 0; t < 16; ++t) {
      const int k = o.q + 4 * t;
      const int64_t j = t0 + k;
      if (!o.ok || j >= p.n_stream) continue;
      bool pos, neg;
      ms_classes(p.a, i, j, p.a.labels[i], p.a.ref_labels[j], pos, neg);
      const float s = tile_at<true>(sm.tile0, o.line, k);
      if (pos) lo = nan_min(lo, s);
      if (neg) hi = nan_max(hi, s);
    }
  }
  lo = quad_min(lo);
  hi = quad_max(hi);
  if (o.ok && o.q == 0) {
    p.min_pos[i] = lo;
    p.max_neg[i] = hi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) ms_fwd_kernel(MsParams<T> p) {
  FL_SMEM(smem_raw);
  const Smem sm(smem_raw, 1);
  const OwnedLine o(p.n_own);
  const int64_t i = o.own;
  Lse lp = Lse::seeded_zero(), ln = Lse::seeded_zero();  // log(1 + Σ exp(u))
  for (int64_t t0 = 0; t0 < p.n_stream; t0 += kTile) {
    sim_tile<T>(p.x, o.own0, p.y, t0, sm.stage, sm.tile0);
    float mp = neg_inf(), mn = neg_inf();
    unsigned pbits = 0, nbits = 0;
#pragma unroll 4
    for (int t = 0; t < 16; ++t) {
      const int k = o.q + 4 * t;
      const int64_t j = t0 + k;
      if (!o.ok || j >= p.n_stream) continue;
      const float s = tile_at<true>(sm.tile0, o.line, k);
      bool kp, kn;
      ms_pair(p.a, p.min_pos_in, p.max_neg_in, i, j, s, kp, kn);
      if (kp) {
        mp = nan_max(mp, ms_u_pos(p.a, s));
        pbits |= 1u << t;
      }
      if (kn) {
        mn = nan_max(mn, ms_u_neg(p.a, s));
        nbits |= 1u << t;
      }
    }
    mp = quad_max(mp);
    mn = quad_max(mn);
    const float sp = lse_shift(mp), sn = lse_shift(mn);
    float sum_p = 0.f, sum_n = 0.f;
#pragma unroll 4
    for (int t = 0; t < 16; ++t) {
      const float s = tile_at<true>(sm.tile0, o.line, o.q + 4 * t);
      if ((pbits >> t) & 1u) sum_p += expf(ms_u_pos(p.a, s) - sp);
      if ((nbits >> t) & 1u) sum_n += expf(ms_u_neg(p.a, s) - sn);
    }
    lp.merge(mp, quad_sum(sum_p));
    ln.merge(mn, quad_sum(sum_n));
  }
  if (o.ok && o.q == 0) {
    p.pos_lse[i] = lp.value();
    p.neg_lse[i] = ln.value();
  }
}

template <typename T, bool ROWS>
__global__ void __launch_bounds__(kThreads, 2) ms_grad_kernel(MsParams<T> p) {
  FL_SMEM(smem_raw);
  const Smem sm(smem_raw, 1);
  const OwnedLine o(p.n_own);
  for (int64_t t0 = 0; t0 < p.n_stream; t0 += kTile) {
    sim_tile<T>(p.x, ROWS ? o.own0 : t0, p.y, ROWS ? t0 : o.own0, sm.stage, sm.tile0);
#pragma unroll 2
    for (int t = 0; t < 16; ++t) {
      const int k = o.q + 4 * t;
      const int64_t other = t0 + k;
      float w = 0.f;
      if (o.ok && other < p.n_stream) {
        const int64_t i = ROWS ? o.own : other, j = ROWS ? other : o.own;
        const float s = tile_at<ROWS>(sm.tile0, o.line, k);
        bool kp, kn;
        ms_pair(p.a, p.min_pos_in, p.max_neg_in, i, j, s, kp, kn);
        w = ms_grad(p.a, s, kp, kn, p.pos_lse_in[i], p.neg_lse_in[i], p.g[i]);
      }
      tile_at<ROWS>(sm.tile0, o.line, k) = w;
    }
    grad_product<ROWS>(sm.tile0, p.x, p.y, t0, p.n_stream, p.grad, o.own0, p.n_own, sm.stage);
  }
}

template <typename T>
MsParams<T> make_params(const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                        const MsArgs& args, const float* min_pos, const float* max_neg,
                        bool cols) {
  MsParams<T> p{};
  set_pass(p, x, y, n, m, d, cols);
  p.a = args;
  p.min_pos_in = min_pos;
  p.max_neg_in = max_neg;
  return p;
}

}  // namespace

cudaError_t ms_mine(DType dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                    const MsArgs& args, float* min_pos, float* max_neg, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(x, y, n, m, d, args, nullptr, nullptr, false);
    p.min_pos = min_pos;
    p.max_neg = max_neg;
    return launch(ms_mine_kernel<T>, p.n_own, 1, p, stream);
  });
}

cudaError_t ms_fwd(DType dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                   const MsArgs& args, const float* min_pos, const float* max_neg,
                   float* pos_lse, float* neg_lse, cudaStream_t stream) {
  if (args.mining && (!min_pos || !max_neg)) return cudaErrorInvalidValue;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(x, y, n, m, d, args, min_pos, max_neg, false);
    p.pos_lse = pos_lse;
    p.neg_lse = neg_lse;
    return launch(ms_fwd_kernel<T>, p.n_own, 1, p, stream);
  });
}

cudaError_t ms_grad(DType dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                    const MsArgs& args, const float* min_pos, const float* max_neg,
                    const float* pos_lse, const float* neg_lse, const float* g, bool cols,
                    float* grad, cudaStream_t stream) {
  if (args.mining && (!min_pos || !max_neg)) return cudaErrorInvalidValue;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(x, y, n, m, d, args, min_pos, max_neg, cols);
    p.pos_lse_in = pos_lse;
    p.neg_lse_in = neg_lse;
    p.g = g;
    p.grad = grad;
    return launch(cols ? ms_grad_kernel<T, false> : ms_grad_kernel<T, true>, p.n_own, 1, p,
                  stream);
  });
}

}  // namespace flcuda
