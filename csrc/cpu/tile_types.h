// Torch-free types shared by the binding (csrc/cpu_ops.cpp) and every ISA build of the tile
// kernels (csrc/cpu/kernels_*.cpp).  Everything here is compiled for the baseline target: an
// ISA translation unit includes this header before it switches its target, so the inline
// functions below are the same code in every object file (one definition, no stray AVX-512).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace fl {

// Every vector is 64 bytes whatever the ISA: 16 floats or 8 doubles.
template <typename T>
constexpr int kLanes = static_cast<int>(64 / sizeof(T));

// cols rounded up to whole vectors of T: tiles and per-column arrays must be readable that far.
template <typename T>
constexpr int64_t padded(int64_t cols) {
  return (cols + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// Label ids are compared in integer lanes as wide as T's.
template <typename T>
using LabelOf = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// Rows of one tile at most (the tile functions keep per-row state on the stack).
constexpr int64_t kMaxTileRows = 512;


// Online-LSE state of one line: running max and sum of exp(v - max).
template <typename T>
struct Lse {
  T max = -std::numeric_limits<T>::infinity();
  T sum = 0;
  void merge(T m2, T s2) {
    if (m2 == -std::numeric_limits<T>::infinity()) return;
    if (max == -std::numeric_limits<T>::infinity()) { max = m2; sum = s2; return; }
    if (m2 > max) { sum = sum * std::exp(max - m2) + s2; max = m2; }
    else { sum += s2 * std::exp(m2 - max); }
  }
  T value() const {
    if (max == -std::numeric_limits<T>::infinity()) return max;
    return max + std::log(sum);
  }
};

// Which pairs of a tile (rows r0.., columns c0..) are candidates and positives: PairMask of
// fused_losses/kernels.py.  Labels arrive as dense ids (equal labels <=> equal ids).
template <typename T>
struct TileMask {
  const LabelOf<T>* row_ids = nullptr;  // id of each tile row; null: positives are diagonal pairs
  const LabelOf<T>* key_ids = nullptr;  // id of each tile column (with row_ids)
  int64_t cols = 0;                     // valid columns
  int64_t kend = 0;                     // columns < kend are keys, the rest extra negatives
  int64_t diag0 = 0;                    // tile column of row 0's diagonal pair (row i: diag0 + i)
  bool exclude_diagonal = false;
  bool decoupled = false;
  bool no_positives = false;

  // Tile column of row i's diagonal pair, or -1 when it is not a key column of this tile.
  int64_t diag(int64_t i) const {
    const int64_t d = diag0 + i;
    return d >= 0 && d < kend ? d : -1;
  }
};

// Column statistics of one forward tile: max and sum of exp(z - max) over candidate rows (this
// tile's, reset here), and positive sums/counts (accumulated).  Arrays of padded(cols).
template <typename T>
struct ColStats {
  T* max;
  T* sum;
  T* pos_sum;
  T* pos_cnt;
};

// What the backward of one tile needs per column (columns < kc: keys with a column LSE): the
// column LSE and upstream gradients g and g_pos, each of padded(cols) and zero past kc.
template <typename T>
struct ColGrad {
  const T* lse;
  const T* g;
  const T* g_pos;
  int64_t kc;
};

// A second row LSE over the same candidates at ratio·z (kernels.py contrastive_fwd's ratio):
// forward, the running LSE of each tile row; backward, its LSE per row and upstream gradient
// (dZ gains g·exp(ratio·z − lse)).  ratio ≥ 0; bias is absent whenever these are used.
template <typename T>
struct RowLse2 {
  T ratio;
  Lse<T>* lse;
};

template <typename T>
struct RowGrad2 {
  T ratio;
  const T* lse;
  const T* g;
};

// ------------------------------------------------------------------------ multi-similarity

// Pairs of a tile: positive (same label id, not self), negative (different id, not self).

template <typename T>
struct MsMask {
  const LabelOf<T>* row_ids;  // per tile row
  const LabelOf<T>* ref_ids;  // per tile column
  int64_t cols;
  int64_t self0;  // tile column of row 0's self pair (row i: self0 + i)
  bool exclude_self;
};

// Mining and exponents of the multi-similarity loss (SPEC §3): a positive is kept if
// s − ε < max_neg, a negative if s + ε > min_pos (all kept without mining); exponents
// u = −α(s − base) for positives, β(s − base) for negatives (α, β > 0).
template <typename T>
struct MsParams {
  T alpha, beta, base, eps;
  bool mining;
  const T* min_pos;  // per tile row (with mining)
  const T* max_neg;
};

// The tile functions of one ISA build, for T = float or double (see tile_ops.h).
template <typename T>
struct TileKernels {
  const char* isa;
  void (*lse_fwd)(T* s, int64_t ld, int64_t rows, T scale, const T* bias, const TileMask<T>& m,
                  Lse<T>* lse, T* pos_sum, T* pos_cnt, const ColStats<T>* col,
                  const RowLse2<T>* second);
  double (*lse_bwd)(const T* s, int64_t ld, int64_t rows, T scale, const T* bias,
                    const TileMask<T>& m, const T* row_lse, const T* g_row, const T* g_rowpos,
                    const ColGrad<T>* col, const RowGrad2<T>* second, T* dbias, T* ds,
                    int64_t ldd);
  void (*ms_mine)(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m, T* min_pos,
                  T* max_neg);
  void (*ms_fwd)(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m, const MsParams<T>& p,
                 Lse<T>* pos, Lse<T>* neg);
  void (*ms_sums)(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m,
                  const MsParams<T>& p, const T* shift_p, const T* shift_n, T* sum_p, T* sum_n);
  void (*ms_bwd)(const T* s, int64_t ld, int64_t rows, const MsMask<T>& m, const MsParams<T>& p,
                 const T* pos_lse, const T* neg_lse, const T* g, T* ds, int64_t ldd);
  void (*softmax_rows)(T* s, int64_t ld, int64_t rows, int64_t cols, T scale, const T* bias,
                       T* run_max, T* run_sum, T* rescale);
  void (*softmax_probs)(const T* s, int64_t ld, int64_t rows, int64_t cols, T scale,
                        const T* bias, const T* lse, T* p, int64_t ldp);
  double (*softmax_grad)(const T* s, int64_t ld, int64_t rows, int64_t cols, T scale,
                         const T* dp, int64_t lddp, const T* delta, T* p, int64_t ldp, T* dbias);
};

// The builds (csrc/cpu/kernels_*.cpp); the x86 ones exist only where they are compiled.
#define FL_DECLARE_KERNELS(ns)                 \
  namespace ns {                               \
  const TileKernels<float>* kernels(float*);   \
  const TileKernels<double>* kernels(double*); \
  }
FL_DECLARE_KERNELS(generic)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FL_X86_BUILDS 1
FL_DECLARE_KERNELS(avx2)
FL_DECLARE_KERNELS(avx512)
#endif
#undef FL_DECLARE_KERNELS

}  // namespace fl
