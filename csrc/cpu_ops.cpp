// Compiled CPU backend: the streaming loops of the kernel contract (fused_losses/kernels.py).
//
// Each op walks (row block × column block) tiles.  A tile's similarities come from one GEMM into
// a per-thread buffer (ATen/MKL, single-threaded inside the parallel region); the elementwise
// work is done by the torch-free functions of cpu/tile_ops.h while the tile is in cache.  Row
// blocks run in parallel (at::parallel_for); column reductions and dY accumulate in per-thread
// buffers merged at the end.  Extra memory: O(threads·(M·D + tile)), never N×M.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "cpu/tile_ops.h"

namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 512;

// A per-row/per-column vector argument read through a raw pointer: it must have exactly the
// length the loops index (these ops are public in torch.ops, so a bad call must not read past it).
void check_vector(const Tensor& t, int64_t len, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == len, name,
              " must be a CPU vector of length ", len, ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_bias(const optional<Tensor>& bias, const Tensor& x, const Tensor& y) {
  if (bias.has_value()) check_vector(*bias, y.size(0), x.scalar_type(), "bias");
}

fl::PairMask make_mask(const Tensor& x, const Tensor& y, const optional<Tensor>& labels,
                       const optional<Tensor>& key_labels, int64_t n_keys, int64_t offset,
                       bool exclude_diagonal, bool decoupled, bool no_positives) {
  TORCH_CHECK(n_keys >= 0 && n_keys <= y.size(0), "n_keys must be in [0, M]");
  fl::PairMask m;
  if (labels.has_value()) {
    TORCH_CHECK(key_labels.has_value(), "key_labels required with labels");
    check_vector(*labels, x.size(0), at::kLong, "labels");
    check_vector(*key_labels, n_keys, at::kLong, "key_labels");
    m.labels = labels->data_ptr<int64_t>();
    m.key_labels = key_labels->data_ptr<int64_t>();
  }
  m.n_keys = n_keys;
  m.offset = offset;
  m.exclude_diagonal = exclude_diagonal;
  m.decoupled = decoupled;
  m.no_positives = no_positives;
  return m;
}

void check_pair(const Tensor& x, const Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "x (N,D), y (M,D)");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the compiled CPU kernels take float32 or float64");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
}

int64_t num_blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }

// Multiversioned entry points: the always-inline tile bodies are compiled once per target.
#define FL_FWD_TILE(T)                                                                        \
  FL_MULTIVERSION void fwd_tile_##T(T* z, int64_t ld, int64_t rows, int64_t cols, T scale,     \
                                    const T* bias, const uint8_t* flags, int64_t ldf,          \
                                    T* scratch, fl::Lse<T>* lse, T* ps, T* pc, int64_t kc,     \
                                    T* cmax, T* csum, T* cps, T* cpc) {                        \
    fl::fwd_tile<T>(z, ld, rows, cols, scale, bias, flags, ldf, scratch, lse, ps, pc, kc,     \
                    cmax, csum, cps, cpc);                                                     \
  }                                                                                            \
  FL_MULTIVERSION double bwd_tile_##T(const T* s, int64_t ld, int64_t rows, int64_t cols,      \
                                      T scale, const T* bias, const uint8_t* flags,            \
                                      int64_t ldf, const T* rl, const T* gr, const T* grp,     \
                                      int64_t kc, const T* cl, const T* gc, const T* gcp,      \
                                      T* dz, int64_t ldz, T* db, T* cq, T* cp) {               \
    return fl::bwd_tile<T>(s, ld, rows, cols, scale, bias, flags, ldf, rl, gr, grp, kc, cl,    \
                           gc, gcp, dz, ldz, db, cq, cp);                                      \
  }
FL_FWD_TILE(float)
FL_FWD_TILE(double)

inline void fwd_tile_any(float* z, int64_t ld, int64_t rows, int64_t cols, float scale,
                         const float* b, const uint8_t* f, int64_t ldf, float* sc,
                         fl::Lse<float>* l, float* ps, float* pc, int64_t kc, float* cm,
                         float* cs, float* cps, float* cpc) {
  fwd_tile_float(z, ld, rows, cols, scale, b, f, ldf, sc, l, ps, pc, kc, cm, cs, cps, cpc);
}
inline void fwd_tile_any(double* z, int64_t ld, int64_t rows, int64_t cols, double scale,
                         const double* b, const uint8_t* f, int64_t ldf, double* sc,
                         fl::Lse<double>* l, double* ps, double* pc, int64_t kc, double* cm,
                         double* cs, double* cps, double* cpc) {
  fwd_tile_double(z, ld, rows, cols, scale, b, f, ldf, sc, l, ps, pc, kc, cm, cs, cps, cpc);
}
inline double bwd_tile_any(const float* s, int64_t ld, int64_t rows, int64_t cols, float scale,
                           const float* b, const uint8_t* f, int64_t ldf, const float* rl,
                           const float* gr, const float* grp, int64_t kc, const float* cl,
                           const float* gc, const float* gcp, float* dz, int64_t ldz,
                           float* db, float* cq, float* cp) {
  return bwd_tile_float(s, ld, rows, cols, scale, b, f, ldf, rl, gr, grp, kc, cl, gc, gcp, dz,
                        ldz, db, cq, cp);
}
inline double bwd_tile_any(const double* s, int64_t ld, int64_t rows, int64_t cols,
                           double scale, const double* b, const uint8_t* f, int64_t ldf,
                           const double* rl, const double* gr, const double* grp, int64_t kc,
                           const double* cl, const double* gc, const double* gcp, double* dz,
                           int64_t ldz, double* db, double* cq, double* cp) {
  return bwd_tile_double(s, ld, rows, cols, scale, b, f, ldf, rl, gr, grp, kc, cl, gc, gcp, dz,
                         ldz, db, cq, cp);
}

// S (rows × cols) = X[r0:r0+rows] · Y[c0:c0+cols]ᵀ into buf (a per-thread tensor).
Tensor sim_tile(const Tensor& x, const Tensor& y, int64_t r0, int64_t rows, int64_t c0,
                int64_t cols, Tensor& buf) {
  Tensor out = buf.narrow(0, 0, rows).narrow(1, 0, cols);
  at::mm_out(out, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Generic passes shared by the losses below: a row-block tile loop, and a gradient pass that turns
// a per-tile dS into dX = dS·Y and dY = dSᵀ·X (per-thread dY, summed at the end).

// f(tid, r0, rows, c0, cols, const T* s, ld) for every tile, row blocks in parallel.
template <typename T, typename F>
void for_each_tile(const Tensor& x, const Tensor& y, F&& f) {
  const int64_t n = x.size(0), m = y.size(0);
  at::parallel_for(0, num_blocks(n, kRowBlock), 1, [&](int64_t blo, int64_t bhi) {
    const int tid = at::get_thread_num();
    Tensor buf = at::empty({kRowBlock, kColBlock}, x.options());
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
      for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, m - c0);
        Tensor st = sim_tile(x, y, r0, rows, c0, cols, buf);
        f(tid, r0, rows, c0, cols, static_cast<const T*>(st.data_ptr<T>()), st.stride(0));
      }
    }
  });
}

// dS tile from g(tid, r0, rows, c0, cols, s, ld, ds, ldd); returns {dX, dY} = {dS·Y, dSᵀ·X}.
template <typename T, typename G>
std::pair<Tensor, Tensor> grad_pass(const Tensor& x, const Tensor& y, G&& g) {
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const int threads = at::get_num_threads();
  Tensor dx = at::zeros({n, d}, x.options());
  Tensor dy_t = at::zeros({threads, m, d}, x.options());
  at::parallel_for(0, num_blocks(n, kRowBlock), 1, [&](int64_t blo, int64_t bhi) {
    const int tid = at::get_thread_num();
    Tensor buf = at::empty({kRowBlock, kColBlock}, x.options());
    Tensor dsbuf = at::empty({kRowBlock, kColBlock}, x.options());
    Tensor dy = dy_t[tid];
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
      Tensor dx_blk = dx.narrow(0, r0, rows);
      for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
        const int64_t cols = std::min(kColBlock, m - c0);
        Tensor st = sim_tile(x, y, r0, rows, c0, cols, buf);
        Tensor ds = dsbuf.narrow(0, 0, rows).narrow(1, 0, cols);
        g(tid, r0, rows, c0, cols, static_cast<const T*>(st.data_ptr<T>()), st.stride(0),
          ds.data_ptr<T>(), ds.stride(0));
        dx_blk.addmm_(ds, y.narrow(0, c0, cols));
        dy.narrow(0, c0, cols).addmm_(ds.t(), x.narrow(0, r0, rows));
      }
    }
  });
  return {dx, dy_t.sum(0)};
}

template <typename T>
std::vector<Tensor> contrastive_fwd_impl(const Tensor& x, const Tensor& y, T scale,
                                         const optional<Tensor>& bias, const fl::PairMask& mask,
                                         bool want_cols) {
  const int64_t n = x.size(0), nk = mask.n_keys;
  auto opts = x.options();
  const int threads = at::get_num_threads();
  Tensor row_ps = at::zeros({n}, opts), row_pc = at::zeros({n}, opts);
  T* rps = row_ps.data_ptr<T>();
  T* rpc = row_pc.data_ptr<T>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  std::vector<fl::Lse<T>> rows_lse(n);  // a row block belongs to one thread
  // Per-thread scratch and column state (max/sum, positive sum/count) for the key columns.
  struct Scratch {
    std::vector<T> z, zb, cmax, csum, cps, cpc;
    std::vector<uint8_t> flags;
    std::vector<fl::Lse<T>> cols;
  };
  std::vector<Scratch> sc(threads);
  for (auto& t : sc) {
    t.z.resize(kRowBlock * kColBlock);
    t.zb.resize(kColBlock);
    t.cmax.resize(kColBlock);
    t.csum.resize(kColBlock);
    t.flags.resize(kRowBlock * kColBlock);
    if (want_cols) {
      t.cps.assign(nk, T(0));
      t.cpc.assign(nk, T(0));
      t.cols.assign(nk, fl::Lse<T>());
    }
  }
  for_each_tile<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                             const T* s, int64_t ld) {
    Scratch& t = sc[tid];
    for (int64_t i = 0; i < rows; ++i)  // z = s, scaled in place by fwd_tile
      std::copy(s + i * ld, s + i * ld + cols, t.z.data() + i * kColBlock);
    fl::tile_flags(mask, r0, rows, c0, cols, t.flags.data(), kColBlock);
    const int64_t kc = want_cols && c0 < nk ? std::min(cols, nk - c0) : 0;
    fwd_tile_any(t.z.data(), kColBlock, rows, cols, scale, b ? b + c0 : nullptr, t.flags.data(),
                 kColBlock, t.zb.data(), rows_lse.data() + r0, rps + r0, rpc + r0, kc,
                 kc ? t.cmax.data() : nullptr, t.csum.data(),
                 kc ? t.cps.data() + c0 : nullptr, kc ? t.cpc.data() + c0 : nullptr);
    for (int64_t j = 0; j < kc; ++j) t.cols[c0 + j].merge(t.cmax[j], t.csum[j]);
  });
  Tensor row_lse = at::empty({n}, opts);
  for (int64_t i = 0; i < n; ++i) row_lse.data_ptr<T>()[i] = rows_lse[i].value();
  if (!want_cols) return {row_lse, row_ps, row_pc};
  Tensor col_lse = at::empty({nk}, opts), cps = at::zeros({nk}, opts), cpc = at::zeros({nk}, opts);
  for (int64_t j = 0; j < nk; ++j) {
    fl::Lse<T> acc;
    for (int t = 0; t < threads; ++t) {
      acc.merge(sc[t].cols[j].max, sc[t].cols[j].sum);
      cps.data_ptr<T>()[j] += sc[t].cps[j];
      cpc.data_ptr<T>()[j] += sc[t].cpc[j];
    }
    col_lse.data_ptr<T>()[j] = acc.value();
  }
  return {row_lse, row_ps, row_pc, col_lse, cps, cpc};
}

std::vector<Tensor> contrastive_fwd(Tensor x, Tensor y, Tensor scale, optional<Tensor> bias,
                                    optional<Tensor> labels, optional<Tensor> key_labels,
                                    int64_t n_keys, int64_t offset, bool exclude_diagonal,
                                    bool decoupled, bool no_positives, bool want_cols) {
  // Kernels only: autograd is fused.py's business.  Detach (grad mode is thread-local and the
  // parallel workers would not see a NoGradGuard).
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  check_bias(bias, x, y);
  auto mask = make_mask(x, y, labels, key_labels, n_keys, offset, exclude_diagonal, decoupled,
                        no_positives);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_fwd", [&] {
    return contrastive_fwd_impl<scalar_t>(x, y, scale.item<scalar_t>(), bias, mask, want_cols);
  });
}

template <typename T>
std::vector<Tensor> contrastive_bwd_impl(const Tensor& x, const Tensor& y, T scale,
                                         const optional<Tensor>& bias, const fl::PairMask& mask,
                                         const Tensor& row_lse, const Tensor& g_row,
                                         const Tensor& g_rowpos, const optional<Tensor>& col_lse,
                                         const optional<Tensor>& g_col,
                                         const optional<Tensor>& g_colpos) {
  const int64_t m = y.size(0), nk = mask.n_keys;
  auto opts = x.options();
  const int threads = at::get_num_threads();
  Tensor dbias_t = at::zeros({threads, m}, opts);
  std::vector<double> dscale_t(threads, 0.0);
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  const T* rl = row_lse.data_ptr<T>();
  const T* gr = g_row.data_ptr<T>();
  const T* grp = g_rowpos.data_ptr<T>();
  const bool cols_on = col_lse.has_value();
  const T* cl = cols_on ? col_lse->data_ptr<T>() : nullptr;
  const T* gc = cols_on ? g_col->data_ptr<T>() : nullptr;
  const T* gcp = cols_on ? g_colpos->data_ptr<T>() : nullptr;
  std::vector<std::vector<uint8_t>> flags(threads, std::vector<uint8_t>(kRowBlock * kColBlock));
  std::vector<std::vector<T>> colq(threads, std::vector<T>(kColBlock)),
      colp(threads, std::vector<T>(kColBlock));
  auto grads = grad_pass<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0,
                                      int64_t cols, const T* s, int64_t ld, T* dz,
                                      int64_t ldz) {
    fl::tile_flags(mask, r0, rows, c0, cols, flags[tid].data(), kColBlock);
    const int64_t kc = cols_on && c0 < nk ? std::min(cols, nk - c0) : 0;
    T* db = dbias_t[tid].data_ptr<T>();
    dscale_t[tid] += bwd_tile_any(s, ld, rows, cols, scale, b ? b + c0 : nullptr,
                                  flags[tid].data(), kColBlock, rl + r0, gr + r0, grp + r0, kc,
                                  kc ? cl + c0 : nullptr, kc ? gc + c0 : nullptr,
                                  kc ? gcp + c0 : nullptr, dz, ldz, b ? db + c0 : nullptr,
                                  colq[tid].data(), colp[tid].data());
    for (int64_t i = 0; i < rows; ++i)  // dX = scale·dZ·Y, dY = scale·dZᵀ·X
      for (int64_t j = 0; j < cols; ++j) dz[i * ldz + j] *= scale;
  });
  double dscale = 0.0;
  for (double v : dscale_t) dscale += v;
  Tensor dscale_out = at::full({}, dscale, opts);
  if (!bias.has_value()) return {grads.first, grads.second, dscale_out};
  return {grads.first, grads.second, dscale_out, dbias_t.sum(0)};
}

std::vector<Tensor> contrastive_bwd(Tensor x, Tensor y, Tensor scale, optional<Tensor> bias,
                                    optional<Tensor> labels, optional<Tensor> key_labels,
                                    int64_t n_keys, int64_t offset, bool exclude_diagonal,
                                    bool decoupled, bool no_positives, Tensor row_lse,
                                    Tensor g_row, Tensor g_rowpos, optional<Tensor> col_lse,
                                    optional<Tensor> g_col, optional<Tensor> g_colpos) {
  // Kernels only: autograd is fused.py's business.  Detach (grad mode is thread-local and the
  // parallel workers would not see a NoGradGuard).
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  check_bias(bias, x, y);
  auto mask = make_mask(x, y, labels, key_labels, n_keys, offset, exclude_diagonal, decoupled,
                        no_positives);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_bwd", [&] {
    return contrastive_bwd_impl<scalar_t>(x, y, scale.item<scalar_t>(), bias, mask,
                                          row_lse.contiguous(), g_row.contiguous(),
                                          g_rowpos.contiguous(), col_lse, g_col, g_colpos);
  });
}

// ------------------------------------------------------------------------------ SigLIP

std::vector<Tensor> siglip_fwd(Tensor x, Tensor y, Tensor scale, Tensor bias, int64_t offset) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "siglip_fwd", [&] {
    using T = scalar_t;
    const T sc = scale.item<T>(), b = bias.item<T>();
    const int threads = at::get_num_threads();
    // Per-thread partial rows (a row block is owned by one thread, but stay generic).
    Tensor out = at::zeros({threads, x.size(0)}, x.options());
    for_each_tile<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                               const T* s, int64_t ld) {
      T* o = out[tid].data_ptr<T>();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t diag = r0 + i + offset - c0;
        T acc = 0;
        for (int64_t j = 0; j < cols; ++j) {
          const T sign = j == diag ? T(1) : T(-1);
          const T t = -sign * (sc * s[i * ld + j] + b);  // softplus(t), stably
          acc += (t > 0 ? t : T(0)) + std::log1p(fl::exp_f(-std::abs(t)));
        }
        o[r0 + i] += acc;
      }
    });
    return std::vector<Tensor>{out.sum(0)};
  });
}

std::vector<Tensor> siglip_bwd(Tensor x, Tensor y, Tensor scale, Tensor bias, int64_t offset,
                               Tensor g_row) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  g_row = g_row.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "siglip_bwd", [&] {
    using T = scalar_t;
    const T sc = scale.item<T>(), b = bias.item<T>();
    const T* gr = g_row.data_ptr<T>();
    std::vector<double> dscale(at::get_num_threads(), 0.0), dbias(at::get_num_threads(), 0.0);
    auto grads = grad_pass<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0,
                                        int64_t cols, const T* s, int64_t ld, T* ds,
                                        int64_t ldd) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t diag = r0 + i + offset - c0;
        double ds_s = 0.0, ds_1 = 0.0;
        for (int64_t j = 0; j < cols; ++j) {
          const T sign = j == diag ? T(1) : T(-1);
          const T u = -sign * (sc * s[i * ld + j] + b);
          const T sig = T(1) / (T(1) + fl::exp_f(-u));  // sigmoid(u)
          const T gz = -gr[r0 + i] * sign * sig;         // dL/dlogit
          ds[i * ldd + j] = sc * gz;
          ds_s += static_cast<double>(gz) * s[i * ld + j];
          ds_1 += gz;
        }
        dscale[tid] += ds_s;
        dbias[tid] += ds_1;
      }
    });
    double dsc = 0.0, db = 0.0;
    for (size_t t = 0; t < dscale.size(); ++t) { dsc += dscale[t]; db += dbias[t]; }
    return std::vector<Tensor>{grads.first, grads.second, at::full({}, dsc, x.options()),
                               at::full({}, db, x.options())};
  });
}

// ------------------------------------------------------------------------ multi-similarity

struct MsArgs {
  const int64_t* labels;
  const int64_t* ref_labels;
  int64_t offset;
  bool exclude_self;
};

// bit 0: positive, bit 1: negative (self pairs are neither when excluded).
inline int ms_flags(const MsArgs& a, int64_t gi, int64_t gj) {
  if (a.exclude_self && gj == gi + a.offset) return 0;
  return a.labels[gi] == a.ref_labels[gj] ? 1 : 2;
}

MsArgs ms_args(const Tensor& x, const Tensor& y, const Tensor& labels, const Tensor& ref_labels,
               int64_t offset, bool exclude_self) {
  check_vector(labels, x.size(0), at::kLong, "labels");
  check_vector(ref_labels, y.size(0), at::kLong, "ref_labels");
  return {labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), offset, exclude_self};
}

std::vector<Tensor> ms_mine(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                            bool exclude_self) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  const MsArgs a = ms_args(x, y, labels, ref_labels, offset, exclude_self);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mine", [&] {
    using T = scalar_t;
    const T inf = std::numeric_limits<T>::infinity();
    Tensor min_pos = at::full({x.size(0)}, inf, x.options());
    Tensor max_neg = at::full({x.size(0)}, -inf, x.options());
    T* mp = min_pos.data_ptr<T>();
    T* mn = max_neg.data_ptr<T>();
    for_each_tile<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                               const T* s, int64_t ld) {
      for (int64_t i = 0; i < rows; ++i) {
        T lo = mp[r0 + i], hi = mn[r0 + i];
        for (int64_t j = 0; j < cols; ++j) {
          const int f = ms_flags(a, r0 + i, c0 + j);
          const T v = s[i * ld + j];
          if ((f & 1) && v < lo) lo = v;
          if ((f & 2) && v > hi) hi = v;
        }
        mp[r0 + i] = lo;
        mn[r0 + i] = hi;
      }
    });
    return std::vector<Tensor>{min_pos, max_neg};
  });
}

// Kept pairs and their exponents u = -α(s-base) (positives) or β(s-base) (negatives).
template <typename T>
inline int ms_kept(const MsArgs& a, int64_t gi, int64_t gj, T s, bool mining, T eps, T min_pos,
                   T max_neg) {
  int f = ms_flags(a, gi, gj);
  if (mining) {
    if ((f & 1) && !(s - eps < max_neg)) f &= ~1;
    if ((f & 2) && !(s + eps > min_pos)) f &= ~2;
  }
  return f;
}

std::vector<Tensor> ms_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                           bool exclude_self, double alpha, double beta, double base,
                           std::optional<double> epsilon, std::optional<Tensor> min_pos,
                           std::optional<Tensor> max_neg) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  const MsArgs a = ms_args(x, y, labels, ref_labels, offset, exclude_self);
  const bool mining = epsilon.has_value();
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_fwd", [&] {
    using T = scalar_t;
    const int64_t n = x.size(0);
    // Online LSEs seeded with the value 0 (the "1 +" of log(1 + Σ exp)).
    std::vector<fl::Lse<T>> pos(n), neg(n);
    for (int64_t i = 0; i < n; ++i) { pos[i].merge(T(0), T(1)); neg[i].merge(T(0), T(1)); }
    const T* mp = mining ? min_pos->data_ptr<T>() : nullptr;
    const T* mn = mining ? max_neg->data_ptr<T>() : nullptr;
    const T eps = mining ? static_cast<T>(*epsilon) : T(0);
    const T al = static_cast<T>(alpha), be = static_cast<T>(beta), bs = static_cast<T>(base);
    std::vector<std::vector<T>> scratch(at::get_num_threads(), std::vector<T>(2 * kColBlock));
    for_each_tile<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                               const T* s, int64_t ld) {
      T* up = scratch[tid].data();
      T* un = up + kColBlock;
      const T ninf = -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t gi = r0 + i;
        T mxp = ninf, mxn = ninf;
        for (int64_t j = 0; j < cols; ++j) {
          const T v = s[i * ld + j];
          const int f = ms_kept<T>(a, gi, c0 + j, v, mining, eps, mining ? mp[gi] : T(0),
                                   mining ? mn[gi] : T(0));
          up[j] = (f & 1) ? -al * (v - bs) : ninf;
          un[j] = (f & 2) ? be * (v - bs) : ninf;
          mxp = up[j] > mxp ? up[j] : mxp;
          mxn = un[j] > mxn ? un[j] : mxn;
        }
        T sp = 0, sn = 0;
        for (int64_t j = 0; j < cols; ++j) {
          sp += mxp == ninf ? T(0) : fl::exp_f(up[j] - mxp);
          sn += mxn == ninf ? T(0) : fl::exp_f(un[j] - mxn);
        }
        pos[gi].merge(mxp, sp);
        neg[gi].merge(mxn, sn);
      }
    });
    Tensor pos_lse = at::empty({n}, x.options()), neg_lse = at::empty({n}, x.options());
    for (int64_t i = 0; i < n; ++i) {
      pos_lse.data_ptr<T>()[i] = pos[i].value();
      neg_lse.data_ptr<T>()[i] = neg[i].value();
    }
    return std::vector<Tensor>{pos_lse, neg_lse};
  });
}

std::vector<Tensor> ms_bwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                           bool exclude_self, double alpha, double beta, double base,
                           std::optional<double> epsilon, std::optional<Tensor> min_pos,
                           std::optional<Tensor> max_neg, Tensor pos_lse, Tensor neg_lse,
                           Tensor g) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  const MsArgs a = ms_args(x, y, labels, ref_labels, offset, exclude_self);
  const bool mining = epsilon.has_value();
  g = g.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_bwd", [&] {
    using T = scalar_t;
    const T* mp = mining ? min_pos->data_ptr<T>() : nullptr;
    const T* mn = mining ? max_neg->data_ptr<T>() : nullptr;
    const T* pl = pos_lse.data_ptr<T>();
    const T* nl = neg_lse.data_ptr<T>();
    const T* gg = g.data_ptr<T>();
    const T eps = mining ? static_cast<T>(*epsilon) : T(0);
    const T al = static_cast<T>(alpha), be = static_cast<T>(beta), bs = static_cast<T>(base);
    auto grads = grad_pass<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                        const T* s, int64_t ld, T* ds, int64_t ldd) {
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t gi = r0 + i;
        for (int64_t j = 0; j < cols; ++j) {
          const T v = s[i * ld + j];
          const int f = ms_kept<T>(a, gi, c0 + j, v, mining, eps, mining ? mp[gi] : T(0),
                                   mining ? mn[gi] : T(0));
          T d = 0;
          if (f & 1) d -= fl::exp_f(-al * (v - bs) - pl[gi]);
          if (f & 2) d += fl::exp_f(be * (v - bs) - nl[gi]);
          ds[i * ldd + j] = gg[gi] * d;
        }
      }
    });
    return std::vector<Tensor>{grads.first, grads.second};
  });
}

// ------------------------------------------------------------- softmax-weighted matmul
// out_i = Σ_j softmax_j(scale·s_ij + bias_j) v_j by an online softmax over column tiles
// (running max, sum and rescaled accumulator per row, flash-attention style).

std::vector<Tensor> softmax_matmul_fwd(Tensor x, Tensor y, Tensor v, Tensor scale,
                                       std::optional<Tensor> bias) {
  x = x.detach();
  y = y.detach();
  v = v.detach().contiguous();
  check_pair(x, y);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == y.size(0) && v.scalar_type() == x.scalar_type(),
              "v must be (M, E) in the dtype of x");
  check_bias(bias, x, y);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_matmul_fwd", [&] {
    using T = scalar_t;
    const T sc = scale.item<T>();
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    const int64_t n = x.size(0), m = y.size(0), e = v.size(1);
    Tensor out = at::zeros({n, e}, x.options());
    Tensor lse = at::empty({n}, x.options());
    T* lp = lse.data_ptr<T>();
    const T ninf = -std::numeric_limits<T>::infinity();
    at::parallel_for(0, num_blocks(n, kRowBlock), 1, [&](int64_t blo, int64_t bhi) {
      Tensor buf = at::empty({kRowBlock, kColBlock}, x.options());
      std::vector<T> mx(kRowBlock), sm(kRowBlock);
      for (int64_t blk = blo; blk < bhi; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
        Tensor acc = out.narrow(0, r0, rows);
        std::fill(mx.begin(), mx.end(), ninf);
        std::fill(sm.begin(), sm.end(), T(0));
        for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
          const int64_t cols = std::min(kColBlock, m - c0);
          Tensor st = sim_tile(x, y, r0, rows, c0, cols, buf);
          T* z = st.data_ptr<T>();
          const int64_t ld = st.stride(0);
          std::vector<T> rescale(rows);
          for (int64_t i = 0; i < rows; ++i) {
            T* zi = z + i * ld;
            T tmax = ninf;
            for (int64_t j = 0; j < cols; ++j) {
              zi[j] = sc * zi[j] + (b ? b[c0 + j] : T(0));
              tmax = zi[j] > tmax ? zi[j] : tmax;
            }
            const T mnew = tmax > mx[i] ? tmax : mx[i];
            const T msafe = mnew == ninf ? T(0) : mnew;
            T rowsum = 0;
            for (int64_t j = 0; j < cols; ++j) {
              zi[j] = fl::exp_f(zi[j] - msafe);  // the tile now holds P (unnormalized)
              rowsum += zi[j];
            }
            rescale[i] = mx[i] == ninf ? T(0) : fl::exp_f(mx[i] - msafe);
            sm[i] = sm[i] * rescale[i] + rowsum;
            mx[i] = mnew;
          }
          acc.mul_(at::from_blob(rescale.data(), {rows, 1}, x.options()));
          acc.addmm_(st, v.narrow(0, c0, cols));
        }
        for (int64_t i = 0; i < rows; ++i) lp[r0 + i] = mx[i] + std::log(sm[i]);
        acc.div_(at::from_blob(sm.data(), {rows, 1}, x.options()));
      }
    });
    return std::vector<Tensor>{out, lse};
  });
}

std::vector<Tensor> softmax_matmul_bwd(Tensor x, Tensor y, Tensor v, Tensor scale,
                                       std::optional<Tensor> bias, Tensor out, Tensor lse,
                                       Tensor g_out) {
  x = x.detach();
  y = y.detach();
  v = v.detach().contiguous();
  check_pair(x, y);
  g_out = g_out.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_matmul_bwd", [&] {
    using T = scalar_t;
    const T sc = scale.item<T>();
    const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    const int64_t m = y.size(0);
    const int threads = at::get_num_threads();
    Tensor delta = (g_out * out).sum(1).contiguous();  // rowsum(g_out ∘ out)
    const T* dl = delta.data_ptr<T>();
    const T* lp = lse.contiguous().data_ptr<T>();
    Tensor dv_t = at::zeros({threads, m, v.size(1)}, x.options());
    Tensor dbias_t = at::zeros({threads, m}, x.options());
    std::vector<double> dscale(threads, 0.0);
    auto grads = grad_pass<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0,
                                        int64_t cols, const T* s, int64_t ld, T* ds,
                                        int64_t ldd) {
      // P tile (into ds), then dv += Pᵀ g_out and dP = g_out vᵀ (GEMMs on this tile).
      Tensor p = at::from_blob(ds, {rows, cols}, {ldd, 1}, x.options());
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
          ds[i * ldd + j] = fl::exp_f(sc * s[i * ld + j] + (b ? b[c0 + j] : T(0)) - lp[r0 + i]);
      dv_t[tid].narrow(0, c0, cols).addmm_(p.t(), g_out.narrow(0, r0, rows));
      Tensor dp = at::mm(g_out.narrow(0, r0, rows), v.narrow(0, c0, cols).t());
      const T* dpp = dp.data_ptr<T>();
      T* db = dbias_t[tid].data_ptr<T>();
      double acc = 0.0;
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          const T dz = ds[i * ldd + j] * (dpp[i * cols + j] - dl[r0 + i]);
          acc += static_cast<double>(dz) * s[i * ld + j];
          db[c0 + j] += dz;
          ds[i * ldd + j] = sc * dz;  // grad_pass multiplies by Y / X
        }
      }
      dscale[tid] += acc;
    });
    double dsc = 0.0;
    for (double d : dscale) dsc += d;
    std::vector<Tensor> res{grads.first, grads.second, dv_t.sum(0), at::full({}, dsc, x.options())};
    if (bias.has_value()) res.push_back(dbias_t.sum(0));
    return res;
  });
}

// --------------------------------------------------------------------------------- top-k
// Per row, a running list of the k best (value, column) merged with each tile row by a partial
// sort; order: larger value first, ties to the smaller column.

std::vector<Tensor> topk(Tensor x, Tensor y, int64_t k, bool exclude_diagonal) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  TORCH_CHECK(k >= 1 && k <= y.size(0), "k out of range");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk", [&] {
    using T = scalar_t;
    const int64_t n = x.size(0);
    Tensor values = at::empty({n, k}, x.options());
    Tensor indices = at::empty({n, k}, x.options().dtype(at::kLong));
    T* vp = values.data_ptr<T>();
    int64_t* ip = indices.data_ptr<int64_t>();
    using Entry = std::pair<T, int64_t>;
    auto better = [](const Entry& a, const Entry& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::vector<std::vector<Entry>> best(n);
    for_each_tile<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                               const T* s, int64_t ld) {
      for (int64_t i = 0; i < rows; ++i) {
        std::vector<Entry>& b = best[r0 + i];
        for (int64_t j = 0; j < cols; ++j) {
          if (exclude_diagonal && c0 + j == r0 + i) continue;
          b.emplace_back(s[i * ld + j], c0 + j);
        }
        if (static_cast<int64_t>(b.size()) > k) {
          std::partial_sort(b.begin(), b.begin() + k, b.end(), better);
          b.resize(k);
        }
      }
    });
    for (int64_t i = 0; i < n; ++i) {
      std::vector<Entry>& b = best[i];
      std::sort(b.begin(), b.end(), better);
      for (int64_t t = 0; t < k; ++t) {
        vp[i * k + t] = b[t].first;
        ip[i * k + t] = b[t].second;
      }
    }
    return std::vector<Tensor>{values, indices};
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_losses_C, m) {
  m.def("contrastive_fwd", &contrastive_fwd);
  m.def("contrastive_bwd", &contrastive_bwd);
  m.def("siglip_fwd", &siglip_fwd);
  m.def("siglip_bwd", &siglip_bwd);
  m.def("ms_mine", &ms_mine);
  m.def("ms_fwd", &ms_fwd);
  m.def("ms_bwd", &ms_bwd);
  m.def("softmax_matmul_fwd", &softmax_matmul_fwd);
  m.def("softmax_matmul_bwd", &softmax_matmul_bwd);
  m.def("topk", &topk);
}
