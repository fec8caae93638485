// Compiled CPU backend: the streaming loops of the kernel contract (fused_losses/kernels.py).
//
// Each op walks (row block × column block) tiles.  A tile's similarities come from one GEMM into
// a per-thread buffer (ATen/MKL, single-threaded inside the parallel region); the elementwise
// work is done by the torch-free, vectorized tile functions (cpu/tile_ops.h, one build per ISA,
// picked at load time: kern<T>()) while the tile is in cache.  Row blocks run in parallel
// (at::parallel_for); column reductions and dY accumulate in per-thread buffers merged at the end.  Extra memory: O(threads·(M·D + tile)), never N×M.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/tile_types.h"

namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kRowBlock = 256;  // GEMM rows per tile (measured best of 64…512 at D=256)
constexpr int64_t kColBlock = 512;  // a multiple of every vector width (tile rows are padded)
static_assert(kRowBlock <= fl::kMaxTileRows, "tile rows");

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

void check_pair(const Tensor& x, const Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "x (N,D), y (M,D)");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the compiled CPU kernels take float32 or float64");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
}

int64_t num_blocks(int64_t n, int64_t b) { return (n + b - 1) / b; }
int64_t clamp_cols(int64_t v, int64_t cols) { return std::max<int64_t>(0, std::min(v, cols)); }

// A per-column vector copied with kColBlock zeros after it: tiles read whole vectors.
template <typename T>
std::vector<T> padded_copy(const T* p, int64_t len, T fill = T(0)) {
  std::vector<T> out(len + kColBlock, fill);
  if (p) std::copy(p, p + len, out.begin());
  return out;
}

// Dense ids of two label vectors (equal labels <=> equal ids, all >= 0), in the lane width of T;
// the second is padded with -1 (never a label id).
template <typename T>
void dense_label_ids(const int64_t* a, int64_t na, const int64_t* b, int64_t nb,
                     std::vector<fl::LabelOf<T>>& ida, std::vector<fl::LabelOf<T>>& idb) {
  std::vector<int64_t> u(a, a + na);
  u.insert(u.end(), b, b + nb);
  std::sort(u.begin(), u.end());
  u.erase(std::unique(u.begin(), u.end()), u.end());
  auto id = [&](int64_t v) {
    return static_cast<fl::LabelOf<T>>(std::lower_bound(u.begin(), u.end(), v) - u.begin());
  };
  ida.resize(na);
  for (int64_t i = 0; i < na; ++i) ida[i] = id(a[i]);
  idb.assign(nb + kColBlock, fl::LabelOf<T>(-1));
  for (int64_t j = 0; j < nb; ++j) idb[j] = id(b[j]);
}

// The call's pair mask (PairMask of kernels.py); tile() cuts the view of one tile.
template <typename T>
struct CallMask {
  bool labeled = false;
  std::vector<fl::LabelOf<T>> row_ids, key_ids;
  int64_t n_keys = 0, offset = 0;
  bool exclude_diagonal = false, decoupled = false, no_positives = false;

  fl::TileMask<T> tile(int64_t r0, int64_t c0, int64_t cols) const {
    fl::TileMask<T> t;
    if (labeled) {
      t.row_ids = row_ids.data() + r0;
      t.key_ids = key_ids.data() + c0;
    }
    t.cols = cols;
    t.kend = clamp_cols(n_keys - c0, cols);
    t.diag0 = r0 + offset - c0;
    t.exclude_diagonal = exclude_diagonal;
    t.decoupled = decoupled;
    t.no_positives = no_positives;
    return t;
  }
};

struct MaskArgs {
  optional<Tensor> labels, key_labels;
  int64_t n_keys, offset;
  bool exclude_diagonal, decoupled, no_positives;
};

template <typename T>
CallMask<T> make_mask(const Tensor& x, const Tensor& y, const MaskArgs& a) {
  TORCH_CHECK(a.n_keys >= 0 && a.n_keys <= y.size(0), "n_keys must be in [0, M]");
  CallMask<T> m;
  if (a.labels.has_value()) {
    TORCH_CHECK(a.key_labels.has_value(), "key_labels required with labels");
    check_vector(*a.labels, x.size(0), at::kLong, "labels");
    check_vector(*a.key_labels, a.n_keys, at::kLong, "key_labels");
    m.labeled = true;
    // Keys are padded to M + kColBlock: extra-negative columns read ids too (masked as non-keys).
    dense_label_ids<T>(a.labels->data_ptr<int64_t>(), x.size(0),
                       a.key_labels->data_ptr<int64_t>(), a.n_keys, m.row_ids, m.key_ids);
    m.key_ids.resize(y.size(0) + kColBlock, fl::LabelOf<T>(-1));
  }
  m.n_keys = a.n_keys;
  m.offset = a.offset;
  m.exclude_diagonal = a.exclude_diagonal;
  m.decoupled = a.decoupled;
  m.no_positives = a.no_positives;
  return m;
}

// The tile kernels for this CPU: the widest ISA build it can run (csrc/cpu/kernels_*.cpp), or
// the one named by FUSED_LOSSES_CPU_ISA (generic | avx2 | avx512), which the tests use to check
// every build this machine can run.
template <typename T>
const fl::TileKernels<T>& kern() {
  static const fl::TileKernels<T>* k = [] {
    const char* env = std::getenv("FUSED_LOSSES_CPU_ISA");
    const std::string want = env ? env : "";
#if FL_X86_BUILDS
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    TORCH_CHECK(want.empty() || want == "generic" || want == "avx2" || want == "avx512",
                "FUSED_LOSSES_CPU_ISA must be generic, avx2 or avx512, got '", want, "'");
    TORCH_CHECK(want != "avx512" || avx512, "FUSED_LOSSES_CPU_ISA=avx512: this CPU lacks it");
    TORCH_CHECK(want != "avx2" || avx2, "FUSED_LOSSES_CPU_ISA=avx2: this CPU lacks AVX2/FMA");
    if (want == "avx512" || (want.empty() && avx512)) return fl::avx512::kernels((T*)nullptr);
    if (want == "avx2" || (want.empty() && avx2)) return fl::avx2::kernels((T*)nullptr);
#else
    TORCH_CHECK(want.empty() || want == "generic",
                "FUSED_LOSSES_CPU_ISA: only the generic build exists here, got '", want, "'");
#endif
    return fl::generic::kernels((T*)nullptr);
  }();
  return *k;
}

std::string tile_isa() { return kern<float>().isa; }

// S (rows × cols) = X[r0:r0+rows] · Y[c0:c0+cols]ᵀ into buf (a per-thread kRowBlock × kColBlock
// tensor: rows have stride kColBlock, so the padded tail of each row is readable).
Tensor sim_tile(const Tensor& x, const Tensor& y, int64_t r0, int64_t rows, int64_t c0,
                int64_t cols, Tensor& buf) {
  Tensor out = buf.narrow(0, 0, rows).narrow(1, 0, cols);
  at::mm_out(out, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Generic passes shared by the losses below: a row-block tile loop, and a gradient pass that turns
// a per-tile dS into dX = dS·Y and dY = dSᵀ·X (per-thread dY, summed at the end).

// f(tid, r0, rows, c0, cols, T* s, ld) for every tile, row blocks in parallel; s is the thread's
// buffer (f may overwrite it).
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
        f(tid, r0, rows, c0, cols, st.data_ptr<T>(), st.stride(0));
      }
    }
  });
}

// dS tile from g(tid, r0, rows, c0, cols, s, ld, ds, ldd) (both buffers kColBlock wide); returns
// {dX, dY} = {dS·Y, dSᵀ·X}.
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

// Per-thread scratch vectors, each padded for whole-vector reads.
template <typename T>
std::vector<std::vector<T>> per_thread(int64_t len, T fill = T(0)) {
  return std::vector<std::vector<T>>(at::get_num_threads(),
                                     std::vector<T>(len + kColBlock, fill));
}

// ------------------------------------------------------------------ InfoNCE family / LSE

template <typename T>
std::vector<Tensor> contrastive_fwd_impl(const Tensor& x, const Tensor& y, T scale,
                                         const optional<Tensor>& bias, const CallMask<T>& mask,
                                         bool want_cols, const optional<double>& ratio) {
  const int64_t n = x.size(0), m = y.size(0), nk = mask.n_keys;
  auto opts = x.options();
  const int threads = at::get_num_threads();
  Tensor row_ps = at::zeros({n}, opts), row_pc = at::zeros({n}, opts);
  T* rps = row_ps.data_ptr<T>();
  T* rpc = row_pc.data_ptr<T>();
  const std::vector<T> bpad = padded_copy<T>(bias ? bias->data_ptr<T>() : nullptr, m);
  const T* b = bias.has_value() ? bpad.data() : nullptr;
  std::vector<fl::Lse<T>> rows_lse(n);  // a row block belongs to one thread
  std::vector<fl::Lse<T>> rows_lse2(ratio ? n : 0);
  // Per-thread column state: this tile's max/sum, and the key columns' positives and LSE.
  auto tile_max = per_thread<T>(0), tile_sum = per_thread<T>(0);
  auto col_ps = per_thread<T>(want_cols ? nk : 0), col_pc = per_thread<T>(want_cols ? nk : 0);
  std::vector<std::vector<fl::Lse<T>>> cols_lse(threads,
                                                std::vector<fl::Lse<T>>(want_cols ? nk : 0));
  for_each_tile<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* s,
                             int64_t ld) {
    const fl::TileMask<T> tm = mask.tile(r0, c0, cols);
    const int64_t kc = want_cols ? clamp_cols(nk - c0, cols) : 0;
    const fl::ColStats<T> cs{tile_max[tid].data(), tile_sum[tid].data(),
                             kc ? col_ps[tid].data() + c0 : nullptr,
                             kc ? col_pc[tid].data() + c0 : nullptr};
    const fl::RowLse2<T> second{ratio ? static_cast<T>(*ratio) : T(0),
                                ratio ? rows_lse2.data() + r0 : nullptr};
    kern<T>().lse_fwd(s, ld, rows, scale, b ? b + c0 : nullptr, tm, rows_lse.data() + r0, rps + r0,
            rpc + r0, kc ? &cs : nullptr, ratio ? &second : nullptr);
    for (int64_t j = 0; j < kc; ++j) cols_lse[tid][c0 + j].merge(cs.max[j], cs.sum[j]);
  });
  Tensor row_lse = at::empty({n}, opts);
  for (int64_t i = 0; i < n; ++i) row_lse.data_ptr<T>()[i] = rows_lse[i].value();
  if (ratio) {
    Tensor row_lse2 = at::empty({n}, opts);
    for (int64_t i = 0; i < n; ++i) row_lse2.data_ptr<T>()[i] = rows_lse2[i].value();
    return {row_lse, row_ps, row_pc, row_lse2};
  }
  if (!want_cols) return {row_lse, row_ps, row_pc};
  Tensor col_lse = at::empty({nk}, opts), cps = at::zeros({nk}, opts), cpc = at::zeros({nk}, opts);
  for (int64_t j = 0; j < nk; ++j) {
    fl::Lse<T> acc;
    for (int t = 0; t < threads; ++t) {
      acc.merge(cols_lse[t][j].max, cols_lse[t][j].sum);
      cps.data_ptr<T>()[j] += col_ps[t][j];
      cpc.data_ptr<T>()[j] += col_pc[t][j];
    }
    col_lse.data_ptr<T>()[j] = acc.value();
  }
  return {row_lse, row_ps, row_pc, col_lse, cps, cpc};
}

// n_keys is a SymInt in the schema: under torch.compile(dynamic=True) it is the (symbolic) key
// count, and an int schema would specialize the graph to each batch size.
// ratio (optional, a default in the schema below): the second row LSE at ratio·z, returned
// fourth (rows only: no bias, no columns).
std::vector<Tensor> contrastive_fwd(Tensor x, Tensor y, Tensor scale, optional<Tensor> bias,
                                    optional<Tensor> labels, optional<Tensor> key_labels,
                                    c10::SymInt n_keys, int64_t offset, bool exclude_diagonal,
                                    bool decoupled, bool no_positives, bool want_cols,
                                    optional<double> ratio) {
  // Kernels only: autograd is fused.py's business.  Detach (grad mode is thread-local and the
  // parallel workers would not see a NoGradGuard).
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  check_bias(bias, x, y);
  TORCH_CHECK(!ratio || (*ratio >= 0 && !bias.has_value() && !want_cols),
              "ratio must be >= 0, without bias or columns");
  const MaskArgs args{labels, key_labels, n_keys.expect_int(), offset, exclude_diagonal,
                      decoupled, no_positives};
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_fwd", [&] {
    return contrastive_fwd_impl<scalar_t>(x, y, scale.item<scalar_t>(), bias,
                                          make_mask<scalar_t>(x, y, args), want_cols, ratio);
  });
}

template <typename T>
std::vector<Tensor> contrastive_bwd_impl(const Tensor& x, const Tensor& y, T scale,
                                         const optional<Tensor>& bias, const CallMask<T>& mask,
                                         const Tensor& row_lse, const Tensor& g_row,
                                         const Tensor& g_rowpos, const optional<Tensor>& col_lse,
                                         const optional<Tensor>& g_col,
                                         const optional<Tensor>& g_colpos,
                                         const optional<double>& ratio,
                                         const optional<Tensor>& row_lse2,
                                         const optional<Tensor>& g_row2) {
  const int64_t n = x.size(0), m = y.size(0), nk = mask.n_keys;
  auto opts = x.options();
  const int threads = at::get_num_threads();
  check_vector(row_lse, n, x.scalar_type(), "row_lse");
  check_vector(g_row, n, x.scalar_type(), "g_row");
  check_vector(g_rowpos, n, x.scalar_type(), "g_rowpos");
  const bool cols_on = col_lse.has_value();
  if (cols_on) {
    TORCH_CHECK(g_col.has_value() && g_colpos.has_value(), "col_lse needs g_col and g_colpos");
    check_vector(*col_lse, nk, x.scalar_type(), "col_lse");
    check_vector(*g_col, nk, x.scalar_type(), "g_col");
    check_vector(*g_colpos, nk, x.scalar_type(), "g_colpos");
  }
  if (ratio) {
    TORCH_CHECK(row_lse2.has_value() && g_row2.has_value() && !bias.has_value(),
                "ratio needs row_lse2 and g_row2, and no bias");
    check_vector(*row_lse2, n, x.scalar_type(), "row_lse2");
    check_vector(*g_row2, n, x.scalar_type(), "g_row2");
  }
  const fl::RowGrad2<T> second{ratio ? static_cast<T>(*ratio) : T(0),
                               ratio ? row_lse2->data_ptr<T>() : nullptr,
                               ratio ? g_row2->data_ptr<T>() : nullptr};
  const std::vector<T> bpad = padded_copy<T>(bias ? bias->data_ptr<T>() : nullptr, m);
  const T* b = bias.has_value() ? bpad.data() : nullptr;
  const T* rl = row_lse.data_ptr<T>();
  const T* gr = g_row.data_ptr<T>();
  const T* grp = g_rowpos.data_ptr<T>();
  // Column arrays padded with zeros (masked past the key columns).
  const std::vector<T> cl = padded_copy<T>(cols_on ? col_lse->data_ptr<T>() : nullptr, nk);
  const std::vector<T> gc = padded_copy<T>(cols_on ? g_col->data_ptr<T>() : nullptr, nk);
  const std::vector<T> gcp = padded_copy<T>(cols_on ? g_colpos->data_ptr<T>() : nullptr, nk);
  auto dbias_t = per_thread<T>(bias ? m : 0);
  std::vector<double> dscale_t(threads, 0.0);
  auto grads = grad_pass<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0,
                                      int64_t cols, const T* s, int64_t ld, T* ds,
                                      int64_t ldd) {
    const fl::TileMask<T> tm = mask.tile(r0, c0, cols);
    const int64_t kc = cols_on ? clamp_cols(nk - c0, cols) : 0;
    const fl::ColGrad<T> cg{cl.data() + c0, gc.data() + c0, gcp.data() + c0, kc};
    const fl::RowGrad2<T> sec{second.ratio, ratio ? second.lse + r0 : nullptr,
                              ratio ? second.g + r0 : nullptr};
    dscale_t[tid] += kern<T>().lse_bwd(s, ld, rows, scale, b ? b + c0 : nullptr, tm, rl + r0, gr + r0,
                             grp + r0, kc ? &cg : nullptr, ratio ? &sec : nullptr,
                             b ? dbias_t[tid].data() + c0 : nullptr, ds, ldd);
  });
  double dscale = 0.0;
  for (double v : dscale_t) dscale += v;
  Tensor dscale_out = at::full({}, dscale, opts);
  if (!bias.has_value()) return {grads.first, grads.second, dscale_out};
  Tensor dbias = at::zeros({m}, opts);
  for (int t = 0; t < threads; ++t)
    for (int64_t j = 0; j < m; ++j) dbias.data_ptr<T>()[j] += dbias_t[t][j];
  return {grads.first, grads.second, dscale_out, dbias};
}

std::vector<Tensor> contrastive_bwd(Tensor x, Tensor y, Tensor scale, optional<Tensor> bias,
                                    optional<Tensor> labels, optional<Tensor> key_labels,
                                    c10::SymInt n_keys, int64_t offset, bool exclude_diagonal,
                                    bool decoupled, bool no_positives, Tensor row_lse,
                                    Tensor g_row, Tensor g_rowpos, optional<Tensor> col_lse,
                                    optional<Tensor> g_col, optional<Tensor> g_colpos,
                                    optional<double> ratio, optional<Tensor> row_lse2,
                                    optional<Tensor> g_row2) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  check_bias(bias, x, y);
  const MaskArgs args{labels, key_labels, n_keys.expect_int(), offset, exclude_diagonal,
                      decoupled, no_positives};
  auto c = [](const optional<Tensor>& t) -> optional<Tensor> {
    return t.has_value() ? optional<Tensor>(t->contiguous()) : t;
  };
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_bwd", [&] {
    return contrastive_bwd_impl<scalar_t>(x, y, scale.item<scalar_t>(), bias,
                                          make_mask<scalar_t>(x, y, args), row_lse.contiguous(),
                                          g_row.contiguous(), g_rowpos.contiguous(), c(col_lse),
                                          c(g_col), c(g_colpos), ratio, c(row_lse2), c(g_row2));
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
          acc += (t > 0 ? t : T(0)) + std::log1p(std::exp(-std::abs(t)));
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
          const T sig = T(1) / (T(1) + std::exp(-u));  // sigmoid(u)
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

// Label ids of rows and (padded) reference columns, and the self-pair rule, of one call.
template <typename T>
struct MsCall {
  std::vector<fl::LabelOf<T>> row_ids, ref_ids;
  int64_t offset;
  bool exclude_self;
  fl::MsMask<T> tile(int64_t r0, int64_t c0, int64_t cols) const {
    return {row_ids.data() + r0, ref_ids.data() + c0, cols, r0 + offset - c0, exclude_self};
  }
};

template <typename T>
MsCall<T> ms_call(const Tensor& x, const Tensor& y, const Tensor& labels,
                  const Tensor& ref_labels, int64_t offset, bool exclude_self) {
  check_vector(labels, x.size(0), at::kLong, "labels");
  check_vector(ref_labels, y.size(0), at::kLong, "ref_labels");
  MsCall<T> c;
  dense_label_ids<T>(labels.data_ptr<int64_t>(), x.size(0), ref_labels.data_ptr<int64_t>(),
                     y.size(0), c.row_ids, c.ref_ids);
  c.offset = offset;
  c.exclude_self = exclude_self;
  return c;
}

std::vector<Tensor> ms_mine(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                            bool exclude_self) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mine", [&] {
    using T = scalar_t;
    const MsCall<T> call = ms_call<T>(x, y, labels, ref_labels, offset, exclude_self);
    const T inf = std::numeric_limits<T>::infinity();
    Tensor min_pos = at::full({x.size(0)}, inf, x.options());
    Tensor max_neg = at::full({x.size(0)}, -inf, x.options());
    T* mp = min_pos.data_ptr<T>();
    T* mn = max_neg.data_ptr<T>();
    for_each_tile<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* s,
                               int64_t ld) {
      kern<T>().ms_mine(s, ld, rows, call.tile(r0, c0, cols), mp + r0, mn + r0);
    });
    return std::vector<Tensor>{min_pos, max_neg};
  });
}

template <typename T>
fl::MsParams<T> ms_params(double alpha, double beta, double base,
                          const std::optional<double>& epsilon,
                          const std::optional<Tensor>& min_pos,
                          const std::optional<Tensor>& max_neg, int64_t n) {
  const bool mining = epsilon.has_value();
  if (mining) {
    TORCH_CHECK(min_pos.has_value() && max_neg.has_value(), "mining needs min_pos and max_neg");
    check_vector(*min_pos, n, c10::CppTypeToScalarType<T>::value, "min_pos");
    check_vector(*max_neg, n, c10::CppTypeToScalarType<T>::value, "max_neg");
  }
  return {static_cast<T>(alpha), static_cast<T>(beta), static_cast<T>(base),
          mining ? static_cast<T>(*epsilon) : T(0), mining,
          mining ? min_pos->data_ptr<T>() : nullptr, mining ? max_neg->data_ptr<T>() : nullptr};
}

// The tile view of MsParams: per-row thresholds from row r0 on.
template <typename T>
fl::MsParams<T> ms_rows(fl::MsParams<T> p, int64_t r0) {
  if (p.mining) {
    p.min_pos += r0;
    p.max_neg += r0;
  }
  return p;
}

std::vector<Tensor> ms_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                           bool exclude_self, double alpha, double beta, double base,
                           std::optional<double> epsilon, std::optional<Tensor> min_pos,
                           std::optional<Tensor> max_neg) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_fwd", [&] {
    using T = scalar_t;
    const int64_t n = x.size(0);
    const MsCall<T> call = ms_call<T>(x, y, labels, ref_labels, offset, exclude_self);
    const fl::MsParams<T> prm = ms_params<T>(alpha, beta, base, epsilon, min_pos, max_neg, n);
    // Online LSEs seeded with the value 0 (the "1 +" of log(1 + Σ exp)).
    std::vector<fl::Lse<T>> pos(n), neg(n);
    for (int64_t i = 0; i < n; ++i) { pos[i].merge(T(0), T(1)); neg[i].merge(T(0), T(1)); }
    for_each_tile<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* s,
                               int64_t ld) {
      kern<T>().ms_fwd(s, ld, rows, call.tile(r0, c0, cols), ms_rows(prm, r0), pos.data() + r0,
             neg.data() + r0);
    });
    Tensor pos_lse = at::empty({n}, x.options()), neg_lse = at::empty({n}, x.options());
    for (int64_t i = 0; i < n; ++i) {
      pos_lse.data_ptr<T>()[i] = pos[i].value();
      neg_lse.data_ptr<T>()[i] = neg[i].value();
    }
    return std::vector<Tensor>{pos_lse, neg_lse};
  });
}

// Mining and the forward in one GEMM pass.  Each thread computes a strip of S (all columns of a
// few rows) into a buffer of at most kStripBytes: the row minima/maxima are known once the strip
// is done, and they are also the stability shifts of the two LSEs (the kept pair with the
// largest exponent is the mined extreme itself), so one exponential per pair follows.  Wider
// problems (a strip of fewer than 64 rows) take a mining pass and a forward pass.
constexpr int64_t kStripBytes = int64_t(16) << 20;

std::vector<Tensor> ms_mine_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels,
                                int64_t offset, bool exclude_self, double alpha, double beta,
                                double base, std::optional<double> epsilon) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  TORCH_CHECK(alpha > 0 && beta > 0, "alpha and beta must be positive");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mine_fwd", [&] {
    using T = scalar_t;
    const int64_t n = x.size(0), m = y.size(0);
    const MsCall<T> call = ms_call<T>(x, y, labels, ref_labels, offset, exclude_self);
    const T inf = std::numeric_limits<T>::infinity();
    Tensor min_pos = at::full({n}, inf, x.options());
    Tensor max_neg = at::full({n}, -inf, x.options());
    Tensor pos_lse = at::empty({n}, x.options()), neg_lse = at::empty({n}, x.options());
    T* mp = min_pos.data_ptr<T>();
    T* mn = max_neg.data_ptr<T>();
    T* pl = pos_lse.data_ptr<T>();
    T* nl = neg_lse.data_ptr<T>();
    fl::MsParams<T> prm{static_cast<T>(alpha), static_cast<T>(beta), static_cast<T>(base),
                        epsilon ? static_cast<T>(*epsilon) : T(0), epsilon.has_value(), mp, mn};
    const int64_t width = num_blocks(m, kColBlock) * kColBlock;
    const int64_t strip_rows =
        std::min<int64_t>(kRowBlock, kStripBytes / (width * int64_t(sizeof(T))) / 16 * 16);
    if (strip_rows < 64) {
      for_each_tile<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* s,
                                 int64_t ld) {
        kern<T>().ms_mine(s, ld, rows, call.tile(r0, c0, cols), mp + r0, mn + r0);
      });
      std::vector<fl::Lse<T>> pos(n), neg(n);
      for (int64_t i = 0; i < n; ++i) { pos[i].merge(T(0), T(1)); neg[i].merge(T(0), T(1)); }
      for_each_tile<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols, T* s,
                                 int64_t ld) {
        kern<T>().ms_fwd(s, ld, rows, call.tile(r0, c0, cols), ms_rows(prm, r0), pos.data() + r0,
                    neg.data() + r0);
      });
      for (int64_t i = 0; i < n; ++i) { pl[i] = pos[i].value(); nl[i] = neg[i].value(); }
      return std::vector<Tensor>{min_pos, max_neg, pos_lse, neg_lse};
    }
    at::parallel_for(0, num_blocks(n, strip_rows), 1, [&](int64_t blo, int64_t bhi) {
      Tensor strip = at::empty({strip_rows, width}, x.options());
      T* sp0 = strip.data_ptr<T>();
      std::vector<T> shp(strip_rows), shn(strip_rows), sum_p(strip_rows), sum_n(strip_rows);
      for (int64_t blk = blo; blk < bhi; ++blk) {
        const int64_t r0 = blk * strip_rows, rows = std::min(strip_rows, n - r0);
        for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
          const int64_t cols = std::min(kColBlock, m - c0);
          Tensor out = strip.narrow(0, 0, rows).narrow(1, c0, cols);
          at::mm_out(out, x.narrow(0, r0, rows), y.narrow(0, c0, cols).t());
          TORCH_CHECK(out.data_ptr<T>() == sp0 + c0 && out.stride(0) == width);
          kern<T>().ms_mine(sp0 + c0, width, rows, call.tile(r0, c0, cols), mp + r0, mn + r0);
        }
        for (int64_t i = 0; i < rows; ++i) {  // the exponents of the mined extremes
          const T lo = mp[r0 + i], hi = mn[r0 + i];
          shp[i] = lo == inf ? T(0) : (lo - prm.base) * -prm.alpha;
          shn[i] = hi == -inf ? T(0) : (hi - prm.base) * prm.beta;
          sum_p[i] = sum_n[i] = T(0);
        }
        for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
          const int64_t cols = std::min(kColBlock, m - c0);
          kern<T>().ms_sums(sp0 + c0, width, rows, call.tile(r0, c0, cols), ms_rows(prm, r0),
                       shp.data(), shn.data(), sum_p.data(), sum_n.data());
        }
        for (int64_t i = 0; i < rows; ++i) {  // log(1 + Σ): seeded with the value 0
          fl::Lse<T> lp, ln;
          lp.merge(T(0), T(1));
          ln.merge(T(0), T(1));
          // A side that keeps nothing sums to 0 (else its extreme contributes exp(0) = 1).
          if (sum_p[i] > T(0)) lp.merge(shp[i], sum_p[i]);
          if (sum_n[i] > T(0)) ln.merge(shn[i], sum_n[i]);
          pl[r0 + i] = lp.value();
          nl[r0 + i] = ln.value();
        }
      }
    });
    return std::vector<Tensor>{min_pos, max_neg, pos_lse, neg_lse};
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
  pos_lse = pos_lse.contiguous();
  neg_lse = neg_lse.contiguous();
  g = g.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_bwd", [&] {
    using T = scalar_t;
    const int64_t n = x.size(0);
    const MsCall<T> call = ms_call<T>(x, y, labels, ref_labels, offset, exclude_self);
    const fl::MsParams<T> prm = ms_params<T>(alpha, beta, base, epsilon, min_pos, max_neg, n);
    check_vector(pos_lse, n, x.scalar_type(), "pos_lse");
    check_vector(neg_lse, n, x.scalar_type(), "neg_lse");
    check_vector(g, n, x.scalar_type(), "g");
    const T* pl = pos_lse.data_ptr<T>();
    const T* nl = neg_lse.data_ptr<T>();
    const T* gg = g.data_ptr<T>();
    auto grads = grad_pass<T>(x, y, [&](int, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                        const T* s, int64_t ld, T* ds, int64_t ldd) {
      kern<T>().ms_bwd(s, ld, rows, call.tile(r0, c0, cols), ms_rows(prm, r0), pl + r0, nl + r0, gg + r0,
             ds, ldd);
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
    const int64_t n = x.size(0), m = y.size(0), e = v.size(1);
    const std::vector<T> bpad = padded_copy<T>(bias ? bias->data_ptr<T>() : nullptr, m);
    const T* b = bias.has_value() ? bpad.data() : nullptr;
    Tensor out = at::zeros({n, e}, x.options());
    Tensor lse = at::empty({n}, x.options());
    T* lp = lse.data_ptr<T>();
    const T ninf = -std::numeric_limits<T>::infinity();
    at::parallel_for(0, num_blocks(n, kRowBlock), 1, [&](int64_t blo, int64_t bhi) {
      Tensor buf = at::empty({kRowBlock, kColBlock}, x.options());
      std::vector<T> mx(kRowBlock), sm(kRowBlock), rescale(kRowBlock);
      for (int64_t blk = blo; blk < bhi; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
        Tensor acc = out.narrow(0, r0, rows);
        std::fill(mx.begin(), mx.end(), ninf);
        std::fill(sm.begin(), sm.end(), T(0));
        for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
          const int64_t cols = std::min(kColBlock, m - c0);
          Tensor st = sim_tile(x, y, r0, rows, c0, cols, buf);  // becomes P (unnormalized)
          kern<T>().softmax_rows(st.data_ptr<T>(), st.stride(0), rows, cols, sc, b ? b + c0 : nullptr,
                       mx.data(), sm.data(), rescale.data());
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
  check_bias(bias, x, y);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == y.size(0) && v.scalar_type() == x.scalar_type(),
              "v must be (M, E) in the dtype of x");
  g_out = g_out.contiguous();
  lse = lse.contiguous();
  TORCH_CHECK(g_out.sizes() == at::IntArrayRef({x.size(0), v.size(1)}) &&
                  out.sizes() == g_out.sizes(), "out and g_out must be (N, E)");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "softmax_matmul_bwd", [&] {
    using T = scalar_t;
    const T sc = scale.item<T>();
    const int64_t m = y.size(0);
    const int threads = at::get_num_threads();
    check_vector(lse, x.size(0), x.scalar_type(), "lse");
    const std::vector<T> bpad = padded_copy<T>(bias ? bias->data_ptr<T>() : nullptr, m);
    const T* b = bias.has_value() ? bpad.data() : nullptr;
    Tensor delta = (g_out * out).sum(1).contiguous();  // rowsum(g_out ∘ out)
    const T* dl = delta.data_ptr<T>();
    const T* lp = lse.data_ptr<T>();
    Tensor dv_t = at::zeros({threads, m, v.size(1)}, x.options());
    auto dbias_t = per_thread<T>(bias ? m : 0);
    std::vector<Tensor> dp_buf(threads);
    for (auto& t : dp_buf) t = at::empty({kRowBlock, kColBlock}, x.options());
    std::vector<double> dscale(threads, 0.0);
    auto grads = grad_pass<T>(x, y, [&](int tid, int64_t r0, int64_t rows, int64_t c0,
                                        int64_t cols, const T* s, int64_t ld, T* ds,
                                        int64_t ldd) {
      // P tile (into ds), then dv += Pᵀ g_out and dP = g_out vᵀ (GEMMs on this tile).
      kern<T>().softmax_probs(s, ld, rows, cols, sc, b ? b + c0 : nullptr, lp + r0, ds, ldd);
      Tensor p = at::from_blob(ds, {rows, cols}, {ldd, 1}, x.options());
      dv_t[tid].narrow(0, c0, cols).addmm_(p.t(), g_out.narrow(0, r0, rows));
      Tensor dp = dp_buf[tid].narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(dp, g_out.narrow(0, r0, rows), v.narrow(0, c0, cols).t());
      dscale[tid] += kern<T>().softmax_grad(s, ld, rows, cols, sc, dp.data_ptr<T>(), dp.stride(0),
                                  dl + r0, ds, ldd, b ? dbias_t[tid].data() + c0 : nullptr);
    });
    double dsc = 0.0;
    for (double d : dscale) dsc += d;
    std::vector<Tensor> res{grads.first, grads.second, dv_t.sum(0),
                            at::full({}, dsc, x.options())};
    if (bias.has_value()) {
      Tensor db = at::zeros({m}, x.options());
      for (int t = 0; t < threads; ++t)
        for (int64_t j = 0; j < m; ++j) db.data_ptr<T>()[j] += dbias_t[t][j];
      res.push_back(db);
    }
    return res;
  });
}

// --------------------------------------------------------------------------------- top-k
// Work items are (row block, column chunk) pairs, so a few query rows against millions of keys
// still use every thread.  Each item keeps, per row, the k best (value, column) of its chunk:
// after the first k, a score enters only if it beats the current k-th (columns grow within a
// chunk, so an equal score never does), which makes the scan a compare per score.  Lists are
// merged per row at the end.  Order: larger first, ties to the smaller column, NaN largest
// (torch.topk's order).

template <typename T>
struct TopkEntry {
  T value;
  int64_t col;
};

template <typename T>
bool topk_better(const TopkEntry<T>& a, const TopkEntry<T>& b) {
  const bool an = std::isnan(a.value), bn = std::isnan(b.value);
  if (an != bn) return an;
  if (!an && a.value != b.value) return a.value > b.value;
  return a.col < b.col;
}

std::vector<Tensor> topk(Tensor x, Tensor y, int64_t k, bool exclude_diagonal) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
  TORCH_CHECK(k >= 1 && k <= y.size(0), "k out of range");
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk", [&] {
    using T = scalar_t;
    using Entry = TopkEntry<T>;
    const int64_t n = x.size(0), m = y.size(0);
    const int64_t row_blocks = num_blocks(n, kRowBlock), col_tiles = num_blocks(m, kColBlock);
    const int64_t want_items = 4 * static_cast<int64_t>(at::get_num_threads());
    const int64_t chunks = std::clamp<int64_t>(num_blocks(want_items, row_blocks), 1, col_tiles);
    const int64_t tiles_per_chunk = num_blocks(col_tiles, chunks);
    // best[item][row in block]: the chunk's k best of that row, sorted once the list is full.
    std::vector<std::vector<std::vector<Entry>>> best(row_blocks * chunks);
    at::parallel_for(0, row_blocks * chunks, 1, [&](int64_t lo, int64_t hi) {
      Tensor buf = at::empty({kRowBlock, kColBlock}, x.options());
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t blk = item / chunks, chunk = item % chunks;
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
        const int64_t t_end = std::min(col_tiles, (chunk + 1) * tiles_per_chunk);
        auto& lists = best[item];
        lists.resize(rows);
        for (int64_t t = chunk * tiles_per_chunk; t < t_end; ++t) {
          const int64_t c0 = t * kColBlock, cols = std::min(kColBlock, m - c0);
          Tensor st = sim_tile(x, y, r0, rows, c0, cols, buf);
          const T* s = st.data_ptr<T>();
          const int64_t ld = st.stride(0);
          for (int64_t i = 0; i < rows; ++i) {
            std::vector<Entry>& b = lists[i];
            const T* row = s + i * ld;
            const bool full = static_cast<int64_t>(b.size()) >= k;
            const T thr = full ? b[k - 1].value : T(0);
            const bool thr_nan = full && std::isnan(thr);
            const int64_t diag = exclude_diagonal ? r0 + i - c0 : -1;
            for (int64_t j = 0; j < cols; ++j) {
              const T v = row[j];
              // Full list: only a larger score, or a NaN over a non-NaN k-th, can enter.
              if (full && !(v > thr || (std::isnan(v) && !thr_nan))) continue;
              if (j == diag) continue;
              b.push_back({v, c0 + j});
            }
            const int64_t size = static_cast<int64_t>(b.size());
            if (size > k || (!full && size == k)) {  // keep the k best, sorted
              std::partial_sort(b.begin(), b.begin() + k, b.end(), topk_better<T>);
              b.resize(k);
            }
          }
        }
      }
    });
    Tensor values = at::empty({n, k}, x.options());
    Tensor indices = at::empty({n, k}, x.options().dtype(at::kLong));
    T* vp = values.data_ptr<T>();
    int64_t* ip = indices.data_ptr<int64_t>();
    at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
      std::vector<Entry> merged;
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t blk = r / kRowBlock, i = r - blk * kRowBlock;
        merged.clear();
        for (int64_t c = 0; c < chunks; ++c) {
          const auto& lists = best[blk * chunks + c];
          if (i < static_cast<int64_t>(lists.size()))
            merged.insert(merged.end(), lists[i].begin(), lists[i].end());
        }
        TORCH_CHECK(static_cast<int64_t>(merged.size()) >= k, "topk: fewer than k candidates");
        std::partial_sort(merged.begin(), merged.begin() + k, merged.end(), topk_better<T>);
        for (int64_t t = 0; t < k; ++t) {
          vp[r * k + t] = merged[t].value;
          ip[r * k + t] = merged[t].col;
        }
      }
    });
    return std::vector<Tensor>{values, indices};
  });
}

}  // namespace

// Kernels registered for the CPU dispatch key only (schemas inferred from the signatures), so
// fused_losses/cpu_backend.py can give each a fake (meta) implementation: under torch.compile
// they are opaque ops of the graph.  Autograd is fused.py's business (autograd Functions).
TORCH_LIBRARY_FRAGMENT(fused_losses_C, m) {
#define FL_CPU_OP(name) m.def(#name, torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(name)))
  // The contrastive ops spell their schemas out: the second-LSE arguments default to None, so a
  // call without them (the pre-ratio signature) still binds.
  m.def("contrastive_fwd(Tensor x, Tensor y, Tensor scale, Tensor? bias, Tensor? labels, "
        "Tensor? key_labels, SymInt n_keys, int offset, bool exclude_diagonal, bool decoupled, "
        "bool no_positives, bool want_cols, float? ratio=None) -> Tensor[]");
  m.impl("contrastive_fwd", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(contrastive_fwd)));
  m.def("contrastive_bwd(Tensor x, Tensor y, Tensor scale, Tensor? bias, Tensor? labels, "
        "Tensor? key_labels, SymInt n_keys, int offset, bool exclude_diagonal, bool decoupled, "
        "bool no_positives, Tensor row_lse, Tensor g_row, Tensor g_rowpos, Tensor? col_lse, "
        "Tensor? g_col, Tensor? g_colpos, float? ratio=None, Tensor? row_lse2=None, "
        "Tensor? g_row2=None) -> Tensor[]");
  m.impl("contrastive_bwd", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(contrastive_bwd)));
  FL_CPU_OP(siglip_fwd);
  FL_CPU_OP(siglip_bwd);
  FL_CPU_OP(ms_mine);
  FL_CPU_OP(ms_fwd);
  FL_CPU_OP(ms_mine_fwd);
  FL_CPU_OP(ms_bwd);
  FL_CPU_OP(softmax_matmul_fwd);
  FL_CPU_OP(softmax_matmul_bwd);
  FL_CPU_OP(topk);
#undef FL_CPU_OP
  m.def("tile_isa", &tile_isa);
}
