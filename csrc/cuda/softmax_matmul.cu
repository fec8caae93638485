// Softmax-weighted matmul kernels of the CUDA backend (kernels.py softmax_matmul_fwd / _bwd),
// which also carry Sinkhorn's gradient and transport application (fused.py ot_grad,
// ot_plan_matmul), on the shared tile loop (tile_loop.cuh).  NOT YET EXECUTED ON A GPU:
// compiled, ptxas-checked, and run under the host emulation only (see tile_loop.cuh).
//
// Forward = the row LSE (contrastive_lse, no positives) then one row pass
// out += exp(z + b − lse)·V.  (A one-pass flash-attention form with a rescaled accumulator saves
// one similarity pass; it is future work, to be measured against this.)  Backward: a row pass
// (dX, dscale partials) and a column pass (dV, dY, dbias), each recomputing S and the second
// tile dP = g_out·Vᵀ (fp32 operands: the fp32 tile path).
#include "cuda/dispatch.cuh"

namespace flcuda {
namespace {

template <typename T>
struct SmmParams : PassParams<T> {
  const T* v;
  Operand<float> gout, vf;
  int64_t e;
  const float *scale, *bias, *lse, *delta;
  float *out, *grad, *dv, *dbias;
  double* dscale_part;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) smm_out_kernel(SmmParams<T> p) {
  FL_SMEM(smem_raw);
  const Smem sm(smem_raw, 1);
  const OwnedLine o(p.n_own);
  const int64_t i = o.own;
  const float scale = *p.scale;
  const float lse = o.ok ? p.lse[i] : 0.f;
  for (int64_t t0 = 0; t0 < p.n_stream; t0 += kTile) {
    sim_tile<T>(p.x, o.own0, p.y, t0, sm.stage, sm.tile0);
#pragma unroll 4
    for (int t = 0; t < 16; ++t) {
      const int k = o.q + 4 * t;
      const int64_t j = t0 + k;
      float w = 0.f;
      if (o.ok && j < p.n_stream) {
        const float z = scale * tile_at<true>(sm.tile0, o.line, k);
        w = expf((p.bias ? z + p.bias[j] : z) - lse);
      }
      tile_at<true>(sm.tile0, o.line, k) = w;
    }
    product<true>(sm.tile0, p.v, p.e, t0, block_extent(p.n_stream, t0), p.e, p.out, p.e, o.own0,
                  block_extent(p.n_own, o.own0), sm.stage);
  }
}

template <typename T, bool ROWS>
__global__ void __launch_bounds__(kThreads, 2) smm_grad_kernel(SmmParams<T> p) {
  FL_SMEM(smem_raw);
  const Smem sm(smem_raw, 2);
  const OwnedLine o(p.n_own);
  const float scale = *p.scale;
  double dscale = 0.0, dbias = 0.0;
  // P_ij of the tile entry (line, k) from s (tile0); 0 outside the problem.
  auto prob = [&](int64_t t0, int k, int64_t& i, float& s) -> float {
    const int64_t other = t0 + k;
    if (!o.ok || other >= p.n_stream) return -1.f;  // marks "invalid"
    i = ROWS ? o.own : other;
    const int64_t j = ROWS ? other : o.own;
    s = tile_at<ROWS>(sm.tile0, o.line, k);
    const float z = scale * s;
    return expf((p.bias ? z + p.bias[j] : z) - p.lse[i]);
  };
  for (int64_t t0 = 0; t0 < p.n_stream; t0 += kTile) {
    const int64_t r0 = ROWS ? o.own0 : t0, c0 = ROWS ? t0 : o.own0;
    sim_tile<T>(p.x, r0, p.y, c0, sm.stage, sm.tile0);
    if (!ROWS) {  // dV += Pᵀ·g_out, with P in tile1
#pragma unroll 4
      for (int t = 0; t < 16; ++t) {
        const int k = o.q + 4 * t;
        int64_t i;
        float s;
        const float pr = prob(t0, k, i, s);
        tile_at<false>(sm.tile1, o.line, k) = pr < 0.f ? 0.f : pr;
      }
      product<false>(sm.tile1, p.gout.p, p.gout.ld, r0, block_extent(p.n_stream, t0), p.e, p.dv,
                     p.e, o.own0, block_extent(p.n_own, o.own0), sm.stage);
    }
    sim_tile<float>(p.gout, r0, p.vf, c0, sm.stage, sm.tile1);  // dP
    float part = 0.f, bpart = 0.f;
#pragma unroll 2
    for (int t = 0; t < 16; ++t) {
      const int k = o.q + 4 * t;
      int64_t i = 0;
      float s = 0.f;
      const float pr = prob(t0, k, i, s);
      float w = 0.f;
      if (!(pr < 0.f)) {  // valid (a NaN probability is valid and propagates)
        const float dz = pr * (tile_at<ROWS>(sm.tile1, o.line, k) - p.delta[i]);
        w = scale * dz;
        part += dz * s;
        bpart += dz;
      }
      tile_at<ROWS>(sm.tile1, o.line, k) = w;
    }
    dscale += part;
    dbias += bpart;
    grad_product<ROWS>(sm.tile1, p.x, p.y, t0, p.n_stream, p.grad, o.own0, p.n_own, sm.stage);
  }
  grad_pass_sums<ROWS>(dscale, dbias, o, p.dscale_part, p.dbias, sm.scratch);
}

template <typename T>
SmmParams<T> make_params(const void* x, const void* y, int64_t n, int64_t m, int64_t d, int64_t e,
                         const float* scale, const float* bias, const float* lse, bool cols) {
  SmmParams<T> p{};
  set_pass(p, x, y, n, m, d, cols);
  p.e = e;
  p.scale = scale;
  p.bias = bias;
  p.lse = lse;
  return p;
}

}  // namespace

cudaError_t softmax_matmul_out(DType dt, const void* x, const void* y, const void* v, int64_t n,
                               int64_t m, int64_t d, int64_t e, const float* scale,
                               const float* bias, const float* lse, float* out,
                               cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(x, y, n, m, d, e, scale, bias, lse, false);
    p.v = static_cast<const T*>(v);
    p.out = out;
    return launch(smm_out_kernel<T>, p.n_own, 1, p, stream);
  });
}

cudaError_t softmax_matmul_grad(DType dt, const void* x, const void* y, int64_t n, int64_t m,
                                int64_t d, int64_t e, const float* scale, const float* bias,
                                const float* lse, const float* delta, const float* g_out,
                                const float* vf, bool cols, float* grad, double* dscale_part,
                                float* dv, float* dbias, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(x, y, n, m, d, e, scale, bias, lse, cols);
    p.gout = make_operand<float>(g_out, n, e, e);
    p.vf = make_operand<float>(vf, m, e, e);
    p.delta = delta;
    p.grad = grad;
    p.dscale_part = dscale_part;
    p.dv = dv;
    p.dbias = dbias;
    return launch(cols ? smm_grad_kernel<T, false> : smm_grad_kernel<T, true>, p.n_own, 2, p,
                  stream);
  });
}

}  // namespace flcuda
