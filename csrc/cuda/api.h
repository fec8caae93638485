// Host API of the CUDA kernels (csrc/cuda/*.cu): torch-free, raw device pointers, int64 sizes,
// an explicit cudaStream_t.  Every input matrix is row-major and contiguous (row stride = its
// column count); vectors are fp32 unless said otherwise; every output is fp32 and, for the
// gradient outputs, must be zero-initialized by the caller (the kernels accumulate into them).
// Each function launches its kernel(s) on `stream` and returns the launch status.
//
// NOT YET EXECUTED ON A GPU (see csrc/cuda/tile_loop.cuh for what has run, and where).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/tile_math.h"

namespace flcuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// CTAs of a pass over n owned lines (the length of a per-CTA partial-sum buffer).
int64_t pass_blocks(int64_t n);

// ---- contrastive (kernels.py contrastive_fwd / contrastive_bwd), z = scale·s.
// Row pass (cols=false): for each x row i < n: lse_i = LSE_{j<m: cand} (z_ij + bias_j),
// pos_sum_i, pos_cnt_i.  Column pass (cols=true, bias must be null): the same for each key
// column j < mask.n_keys over the rows i < n.
cudaError_t contrastive_lse(DType dt, const void* x, const void* y, int64_t n, int64_t m,
                            int64_t d, const float* scale, const float* bias,
                            const PairMaskArgs& mask, bool cols, float* lse, float* pos_sum,
                            float* pos_cnt, cudaStream_t stream);
// Row pass: grad (n×d) += scale·dZ·y, dscale_part[b] = Σ over CTA b of dZ·s (fp64), one per
// pass_blocks(n).  Column pass: grad (m×d) += scale·dZᵀ·x, dbias (m, may be null) = Σ_i of the
// row softmax part of dZ.  col_lse/g_col/g_colpos: (n_keys,) or all null (no column term).
cudaError_t contrastive_grad(DType dt, const void* x, const void* y, int64_t n, int64_t m,
                             int64_t d, const float* scale, const float* bias,
                             const PairMaskArgs& mask, bool cols, const float* row_lse,
                             const float* g_row, const float* g_rowpos, const float* col_lse,
                             const float* g_col, const float* g_colpos, float* grad,
                             double* dscale_part, float* dbias, cudaStream_t stream);

// ---- multi-similarity (kernels.py ms_mine / ms_fwd / ms_bwd); labels in MsArgs.
cudaError_t ms_mine(DType dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                    const MsArgs& args, float* min_pos, float* max_neg, cudaStream_t stream);
// min_pos/max_neg: null when !args.mining.
cudaError_t ms_fwd(DType dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                   const MsArgs& args, const float* min_pos, const float* max_neg,
                   float* pos_lse, float* neg_lse, cudaStream_t stream);
// Row pass: grad (n×d) += dS·y; column pass: grad (m×d) += dSᵀ·x.
cudaError_t ms_grad(DType dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                    const MsArgs& args, const float* min_pos, const float* max_neg,
                    const float* pos_lse, const float* neg_lse, const float* g, bool cols,
                    float* grad, cudaStream_t stream);

// ---- softmax-weighted matmul (kernels.py softmax_matmul_fwd / _bwd).
// lse: from contrastive_lse (row pass, no_positives).  out (n×e) += softmax(z + bias)·v;
// v (m×e) in the inputs' dtype.
cudaError_t softmax_matmul_out(DType dt, const void* x, const void* y, const void* v, int64_t n,
                               int64_t m, int64_t d, int64_t e, const float* scale,
                               const float* bias, const float* lse, float* out,
                               cudaStream_t stream);
// P = softmax, dP = g_out·vᵀ (g_out (n×e) and vf (m×e) both fp32), dZ = P∘(dP − delta).
// Row pass: grad (n×d) += scale·dZ·y, dscale_part per CTA.  Column pass: grad (m×d) +=
// scale·dZᵀ·x, dv (m×e) += Pᵀ·g_out, dbias (m, may be null) = Σ_i dZ.
cudaError_t softmax_matmul_grad(DType dt, const void* x, const void* y, int64_t n, int64_t m,
                                int64_t d, int64_t e, const float* scale, const float* bias,
                                const float* lse, const float* delta, const float* g_out,
                                const float* vf, bool cols, float* grad, double* dscale_part,
                                float* dv, float* dbias, cudaStream_t stream);

}  // namespace flcuda
