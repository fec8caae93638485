// C entry points of the CUDA kernels' host API (csrc/cuda/api.h) for the host-emulation build
// (csrc/cuda/host_emulation.h): compiled with -DFL_HOST_EMULATION together with csrc/cuda/*.cu
// into a shared library that tests/test_cuda_emulation.py loads with ctypes, passing CPU
// tensors' pointers.  Tests only; the GPU build never compiles this file.
#include <cstdint>

#include "cuda/api.h"

using namespace flcuda;

namespace {
PairMaskArgs mask_of(const int64_t* labels, const int64_t* key_labels, int64_t n_keys,
                     int64_t offset, int excl, int dec, int nopos) {
  PairMaskArgs m;
  m.labels = labels;
  m.key_labels = key_labels;
  m.n_keys = n_keys;
  m.offset = offset;
  m.exclude_diagonal = excl != 0;
  m.decoupled = dec != 0;
  m.no_positives = nopos != 0;
  return m;
}
MsArgs ms_of(const int64_t* labels, const int64_t* ref_labels, int64_t offset, int exclude_self,
             double alpha, double beta, double base, double eps, int mining) {
  MsArgs a;
  a.labels = labels;
  a.ref_labels = ref_labels;
  a.offset = offset;
  a.exclude_self = exclude_self != 0;
  a.alpha = static_cast<float>(alpha);
  a.beta = static_cast<float>(beta);
  a.base = static_cast<float>(base);
  a.eps = static_cast<float>(eps);
  a.mining = mining != 0;
  return a;
}
DType dt_of(int dt) { return static_cast<DType>(dt); }
}  // namespace

extern "C" {

int64_t fl_pass_blocks(int64_t n) { return pass_blocks(n); }

int fl_contrastive_lse(int dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                       const float* scale, const float* bias, const int64_t* labels,
                       const int64_t* key_labels, int64_t n_keys, int64_t offset, int excl,
                       int dec, int nopos, int cols, float* lse, float* ps, float* pc) {
  return contrastive_lse(dt_of(dt), x, y, n, m, d, scale, bias,
                         mask_of(labels, key_labels, n_keys, offset, excl, dec, nopos), cols != 0,
                         lse, ps, pc, nullptr);
}

int fl_contrastive_grad(int dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
                        const float* scale, const float* bias, const int64_t* labels,
                        const int64_t* key_labels, int64_t n_keys, int64_t offset, int excl,
                        int dec, int nopos, int cols, const float* row_lse, const float* g_row,
                        const float* g_rowpos, const float* col_lse, const float* g_col,
                        const float* g_colpos, float* grad, double* parts, float* dbias) {
  return contrastive_grad(dt_of(dt), x, y, n, m, d, scale, bias,
                          mask_of(labels, key_labels, n_keys, offset, excl, dec, nopos),
                          cols != 0, row_lse, g_row, g_rowpos, col_lse, g_col, g_colpos, grad,
                          parts, dbias, nullptr);
}

int fl_ms_mine(int dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
               const int64_t* labels, const int64_t* ref_labels, int64_t offset,
               int exclude_self, float* min_pos, float* max_neg) {
  return ms_mine(dt_of(dt), x, y, n, m, d,
                 ms_of(labels, ref_labels, offset, exclude_self, 2, 50, 0.5, 0, 0), min_pos,
                 max_neg, nullptr);
}

int fl_ms_fwd(int dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
              const int64_t* labels, const int64_t* ref_labels, int64_t offset, int exclude_self,
              double alpha, double beta, double base, double eps, int mining,
              const float* min_pos, const float* max_neg, float* pos_lse, float* neg_lse) {
  return ms_fwd(dt_of(dt), x, y, n, m, d,
                ms_of(labels, ref_labels, offset, exclude_self, alpha, beta, base, eps, mining),
                min_pos, max_neg, pos_lse, neg_lse, nullptr);
}

int fl_ms_grad(int dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d,
               const int64_t* labels, const int64_t* ref_labels, int64_t offset,
               int exclude_self, double alpha, double beta, double base, double eps, int mining,
               const float* min_pos, const float* max_neg, const float* pos_lse,
               const float* neg_lse, const float* g, int cols, float* grad) {
  return ms_grad(dt_of(dt), x, y, n, m, d,
                 ms_of(labels, ref_labels, offset, exclude_self, alpha, beta, base, eps, mining),
                 min_pos, max_neg, pos_lse, neg_lse, g, cols != 0, grad, nullptr);
}

int fl_smm_out(int dt, const void* x, const void* y, const void* v, int64_t n, int64_t m,
               int64_t d, int64_t e, const float* scale, const float* bias, const float* lse,
               float* out) {
  return softmax_matmul_out(dt_of(dt), x, y, v, n, m, d, e, scale, bias, lse, out, nullptr);
}

int fl_smm_grad(int dt, const void* x, const void* y, int64_t n, int64_t m, int64_t d, int64_t e,
                const float* scale, const float* bias, const float* lse, const float* delta,
                const float* g_out, const float* vf, int cols, float* grad, double* parts,
                float* dv, float* dbias) {
  return softmax_matmul_grad(dt_of(dt), x, y, n, m, d, e, scale, bias, lse, delta, g_out, vf,
                             cols != 0, grad, parts, dv, dbias, nullptr);
}

}  // extern "C"
