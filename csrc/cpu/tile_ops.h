// Torch-free tile math for the compiled CPU backend.
//
// The binding (csrc/cpu_ops.cpp) streams over (row block × column block) tiles: it computes the
// similarity tile S = X_blk · Y_blkᵀ with a GEMM and hands the tile to the functions here, which
// do everything elementwise while the tile is hot: pair masks, online logsumexp merges,
// gradient tiles.  Semantics are those of fused_losses/kernels.py (the contract).
//
// Hot loops are written so GCC vectorizes them; FL_MULTIVERSION clones them for AVX2 with a
// portable fallback chosen at load time (no -march flags in the wheel).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FL_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define FL_MULTIVERSION
#endif

namespace fl {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp for float, < 1 ulp over the normal range and correct through the denormal range
// (Cephes polynomial, Cody-Waite reduction, 2^n applied in two halves), written with selects
// only so loops over it vectorize.  exp(-inf) = 0, exp(nan) = nan, overflow -> inf.
__attribute__((always_inline)) inline float exp_f(float x) {
  const float hi = 88.3762626647949f, lo = -103.972084045410f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // Round to nearest by integer conversion (vectorizes; std::floor would be a libm call).
  const float t = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float fx = static_cast<float>(n);
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t n1 = n / 2, n2 = n - n1;  // 2^n = 2^n1 · 2^n2, each a normal float
  union { int32_t i; float f; } p1, p2;
  p1.i = (n1 + 127) << 23;
  p2.i = (n2 + 127) << 23;
  float out = (y * p1.f) * p2.f;
  out = x < lo ? 0.0f : out;
  out = x > hi ? std::numeric_limits<float>::infinity() : out;
  return x != x ? x : out;
}
__attribute__((always_inline)) inline double exp_f(double x) { return std::exp(x); }

// Which pairs are positives/candidates (PairMask in fused_losses/kernels.py).
struct PairMask {
  const int64_t* labels = nullptr;      // (N) or null: the positive of row i is column i+offset
  const int64_t* key_labels = nullptr;  // (n_keys)
  int64_t n_keys = 0;                   // columns >= n_keys: extra negatives
  int64_t offset = 0;
  bool exclude_diagonal = false;
  bool decoupled = false;
  bool no_positives = false;
};

// Per-tile row/column views of the mask: row i (global gi), column j (global gj).
// bit 0: candidate, bit 1: positive.
inline int pair_flags(const PairMask& m, int64_t gi, int64_t gj) {
  const bool is_key = gj < m.n_keys;
  const bool diag = is_key && (gj == gi + m.offset);
  bool pos = false;
  if (!m.no_positives) {
    pos = m.labels ? (is_key && m.labels[gi] == m.key_labels[gj]) : diag;
  }
  bool cand = true;
  if (m.exclude_diagonal && diag) { pos = false; cand = false; }
  if (m.decoupled && pos) cand = false;
  return (cand ? 1 : 0) | (pos ? 2 : 0);
}

#if defined(__GNUC__)
#define FL_INLINE inline __attribute__((always_inline))
#else
#define FL_INLINE inline
#endif

// Flags of a tile (rows r0.., cols c0..), row-major with leading dimension ldf.
FL_INLINE void tile_flags(const PairMask& m, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                          uint8_t* flags, int64_t ldf) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t gi = r0 + i;
    uint8_t* f = flags + i * ldf;
    const int64_t diag = gi + m.offset;  // global column of this row's diagonal pair
    if (m.no_positives || !m.labels) {
      for (int64_t j = 0; j < cols; ++j) f[j] = 1;
      if (diag >= c0 && diag < c0 + cols && diag < m.n_keys)
        f[diag - c0] = static_cast<uint8_t>(pair_flags(m, gi, diag));
    } else {
      const int64_t li = m.labels[gi];
      const int64_t kend = m.n_keys - c0;  // local columns [0, kend) are keys
      for (int64_t j = 0; j < cols; ++j) {
        const bool pos = j < kend && m.key_labels[c0 + j] == li;
        f[j] = static_cast<uint8_t>(pos ? (m.decoupled ? 2 : 3) : 1);
      }
      if (m.exclude_diagonal && diag >= c0 && diag < c0 + cols && diag < m.n_keys)
        f[diag - c0] = 0;
    }
  }
}

// Online-LSE state of one line: running max and sum of exp(v - max).
template <typename T>
struct Lse {
  T max = -std::numeric_limits<T>::infinity();
  T sum = 0;
  void merge(T m2, T s2) {
    if (m2 == -std::numeric_limits<T>::infinity()) return;
    if (max == -std::numeric_limits<T>::infinity()) { max = m2; sum = s2; return; }
    if (m2 > max) { sum = sum * exp_f(max - m2) + s2; max = m2; }
    else { sum += s2 * exp_f(m2 - max); }
  }
  T value() const {
    if (max == -std::numeric_limits<T>::infinity()) return max;
    return max + std::log(sum);
  }
};

// Forward of one tile: z = scale*s in place; row LSE over candidates of z+bias merged into
// lse[i]; positive sums/counts; with col_* non-null, column max/sum over candidates for the
// first kc (key) columns: cmax/csum are this tile's, for the caller to merge.
template <typename T>
FL_INLINE void fwd_tile(T* z, int64_t ld, int64_t rows, int64_t cols, T scale, const T* bias,
                        const uint8_t* flags, int64_t ldf, T* scratch, Lse<T>* lse, T* pos_sum,
                        T* pos_cnt, int64_t kc, T* cmax, T* csum, T* cps, T* cpc) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    T* zi = z + i * ld;
    const uint8_t* fi = flags + i * ldf;
    T mx = ninf, ps = 0, pc = 0;
    int nan = 0;
    // omp simd: lets the compiler vectorize these reductions (it may reassociate them).
#pragma omp simd reduction(max : mx) reduction(+ : ps, pc) reduction(| : nan)
    for (int64_t j = 0; j < cols; ++j) {
      const T v = zi[j] * scale;
      zi[j] = v;
      T vb = bias ? v + bias[j] : v;
      nan |= vb != vb;
      vb = (fi[j] & 1) ? vb : ninf;
      scratch[j] = vb;
      mx = vb > mx ? vb : mx;
      const bool p = fi[j] & 2;
      ps += p ? v : T(0);
      pc += p ? T(1) : T(0);
    }
    pos_sum[i] += ps;
    pos_cnt[i] += pc;
    if (nan) { lse[i].merge(std::numeric_limits<T>::quiet_NaN(), T(1)); continue; }
    if (mx == ninf) continue;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += exp_f(scratch[j] - mx);
    lse[i].merge(mx, sum);
  }
  if (!cmax) return;
  for (int64_t j = 0; j < kc; ++j) { cmax[j] = ninf; csum[j] = 0; }
  for (int64_t i = 0; i < rows; ++i) {
    const T* zi = z + i * ld;
    const uint8_t* fi = flags + i * ldf;
#pragma omp simd
    for (int64_t j = 0; j < kc; ++j) {
      const T v = (fi[j] & 1) ? zi[j] : ninf;
      cmax[j] = v > cmax[j] ? v : cmax[j];
      const bool p = fi[j] & 2;
      cps[j] += p ? zi[j] : T(0);
      cpc[j] += p ? T(1) : T(0);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* zi = z + i * ld;
    const uint8_t* fi = flags + i * ldf;
#pragma omp simd
    for (int64_t j = 0; j < kc; ++j) {
      const T v = (fi[j] & 1) ? zi[j] : ninf;
      const T m = cmax[j] == ninf ? T(0) : cmax[j];
      csum[j] += exp_f(v - m);
    }
  }
}

// Backward of one tile: dZ (see kernels.py contrastive_bwd) from the similarity tile s.
// Returns the tile's Σ dZ·s.  That sum cancels (softmax weights minus positive weights), so it
// is formed per line as g·Σ p·s − g_pos·Σ_pos s from fp32 partial sums combined in double.
// Adds the row part of dZ to dbias.  col_ps/col_qs: scratch of kc entries.
template <typename T>
FL_INLINE double bwd_tile(const T* s, int64_t ld, int64_t rows, int64_t cols, T scale,
                          const T* bias, const uint8_t* flags, int64_t ldf, const T* row_lse,
                          const T* g_row, const T* g_rowpos, int64_t kc, const T* col_lse,
                          const T* g_col, const T* g_colpos, T* dz, int64_t ldz, T* dbias,
                          T* col_qs, T* col_ps) {
  double total = 0.0;
  for (int64_t j = 0; j < kc; ++j) { col_qs[j] = 0; col_ps[j] = 0; }
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * ld;
    const uint8_t* fi = flags + i * ldf;
    T* dzi = dz + i * ldz;
    const T lse = row_lse[i], gr = g_row[i], grp = g_rowpos[i];
    T ps_sum = 0, pos_s = 0;
#pragma omp simd reduction(+ : ps_sum, pos_s)
    for (int64_t j = 0; j < cols; ++j) {
      const T z = scale * si[j];
      const T zb = bias ? z + bias[j] : z;
      const T p = (fi[j] & 1) ? exp_f(zb - lse) : T(0);
      const bool pos = fi[j] & 2;
      dzi[j] = gr * p - (pos ? grp : T(0));
      ps_sum += p * si[j];
      pos_s += pos ? si[j] : T(0);
    }
    if (bias) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) dbias[j] += (dzi[j] + ((fi[j] & 2) ? grp : T(0)));
    }
    total += static_cast<double>(gr) * ps_sum - static_cast<double>(grp) * pos_s;
    if (col_lse) {
#pragma omp simd
      for (int64_t j = 0; j < kc; ++j) {
        const T z = scale * si[j];
        const T q = (fi[j] & 1) ? exp_f(z - col_lse[j]) : T(0);
        const bool pos = fi[j] & 2;
        dzi[j] += g_col[j] * q - (pos ? g_colpos[j] : T(0));
        col_qs[j] += q * si[j];
        col_ps[j] += pos ? si[j] : T(0);
      }
    }
  }
  if (col_lse) {
    for (int64_t j = 0; j < kc; ++j)
      total += static_cast<double>(g_col[j]) * col_qs[j] -
               static_cast<double>(g_colpos[j]) * col_ps[j];
  }
  return total;
}

}  // namespace fl
