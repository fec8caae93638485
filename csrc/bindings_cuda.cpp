// Thin torch bindings of the CUDA kernels (csrc/cuda/api.h): argument checks, output
// allocation, the current stream, and registration as torch.ops.fused_losses_cuda.* for the CUDA
// dispatch key.  Schemas are those of the CPU ops (csrc/cpu_ops.cpp), so both backends share one
// set of fake (meta) implementations for torch.compile (fused_losses/cuda_backend.py).
//
// No ATen/cuda or c10/cuda header is included: those cannot compile on the GPU-less CI machine
// (the CPU torch wheel lacks c10's generated CUDA headers), while this file can be syntax-checked
// there (scripts/check_cuda_compile.sh).  The current stream comes from the device-generic guard
// interface (c10::impl::getDeviceGuardImpl(CUDA)->getStream(device).native_handle()), which the
// CUDA build of torch implements; device selection uses c10::DeviceGuard.
//
// NOT YET EXECUTED ON A GPU: compiled (syntax-checked) only.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "cuda/api.h"

namespace {

using at::Tensor;
using std::optional;

cudaStream_t current_stream(const Tensor& t) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(t.device()).native_handle());
}

void check_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused_losses_cuda::", what, ": CUDA error ",
              static_cast<int>(err), " (", cudaGetErrorString(err), ")");
}

flcuda::DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return flcuda::DType::kFloat32;
    case at::kHalf:
      return flcuda::DType::kFloat16;
    case at::kBFloat16:
      return flcuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "the CUDA kernels take float32, float16 or bfloat16, got ",
                  x.scalar_type());
  }
}

void check_pair(const Tensor& x, const Tensor& y) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(x.device() == y.device(), "x and y must be on the same device");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1), "x (N,D), y (M,D)");
  TORCH_CHECK(x.size(1) >= 1, "D must be >= 1");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must share a dtype");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "x and y must be contiguous");
  dtype_of(x);
}

// The kernels' x and y: detached (the ops compute gradients explicitly), then checked.
void detach_pair(Tensor& x, Tensor& y) {
  x = x.detach();
  y = y.detach();
  check_pair(x, y);
}

// A vector read through a raw pointer must have exactly the length the kernels index.
void check_vector(const Tensor& t, const Tensor& like, int64_t len, at::ScalarType dtype,
                  const char* name) {
  TORCH_CHECK(t.device() == like.device() && t.dim() == 1 && t.size(0) == len, name,
              " must be a vector of length ", len, " on ", like.device(), ", got shape ",
              t.sizes(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

const float* scale_ptr(const Tensor& scale, const Tensor& x) {
  TORCH_CHECK(scale.device() == x.device() && scale.numel() == 1 &&
                  scale.scalar_type() == at::kFloat,
              "scale must be a one-element float32 tensor on ", x.device());
  return scale.data_ptr<float>();
}

const float* opt_vec(const optional<Tensor>& t, const Tensor& like, int64_t len,
                     const char* name) {
  if (!t.has_value()) return nullptr;
  check_vector(*t, like, len, at::kFloat, name);
  return t->data_ptr<float>();
}

at::TensorOptions f32(const Tensor& x) { return x.options().dtype(at::kFloat); }

flcuda::PairMaskArgs make_mask(const Tensor& x, const Tensor& y, const optional<Tensor>& labels,
                               const optional<Tensor>& key_labels, int64_t n_keys,
                               int64_t offset, bool exclude_diagonal, bool decoupled,
                               bool no_positives) {
  TORCH_CHECK(n_keys >= 0 && n_keys <= y.size(0), "n_keys must be in [0, M]");
  flcuda::PairMaskArgs m;
  if (labels.has_value()) {
    TORCH_CHECK(key_labels.has_value(), "key_labels required with labels");
    check_vector(*labels, x, x.size(0), at::kLong, "labels");
    check_vector(*key_labels, x, n_keys, at::kLong, "key_labels");
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

std::vector<Tensor> contrastive_fwd(Tensor x, Tensor y, Tensor scale, optional<Tensor> bias,
                                    optional<Tensor> labels, optional<Tensor> key_labels,
                                    int64_t n_keys, int64_t offset, bool exclude_diagonal,
                                    bool decoupled, bool no_positives, bool want_cols) {
  detach_pair(x, y);
  const c10::DeviceGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  TORCH_CHECK(!(want_cols && bias.has_value()), "bias must be None with want_cols");
  const auto mask = make_mask(x, y, labels, key_labels, n_keys, offset, exclude_diagonal,
                              decoupled, no_positives);
  const float* b = opt_vec(bias, x, m, "bias");
  const float* sc = scale_ptr(scale, x);
  const auto st = current_stream(x);
  std::vector<Tensor> out;
  for (int k = 0; k < 3; ++k) out.push_back(at::empty({n}, f32(x)));
  check_ok(flcuda::contrastive_lse(dtype_of(x), x.data_ptr(), y.data_ptr(), n, m, d, sc, b, mask,
                                   false, out[0].data_ptr<float>(), out[1].data_ptr<float>(),
                                   out[2].data_ptr<float>(), st),
           "contrastive_fwd (rows)");
  if (want_cols) {
    for (int k = 0; k < 3; ++k) out.push_back(at::empty({n_keys}, f32(x)));
    check_ok(flcuda::contrastive_lse(dtype_of(x), x.data_ptr(), y.data_ptr(), n, m, d, sc,
                                     nullptr, mask, true, out[3].data_ptr<float>(),
                                     out[4].data_ptr<float>(), out[5].data_ptr<float>(), st),
             "contrastive_fwd (columns)");
  }
  return out;
}

std::vector<Tensor> contrastive_bwd(Tensor x, Tensor y, Tensor scale, optional<Tensor> bias,
                                    optional<Tensor> labels, optional<Tensor> key_labels,
                                    int64_t n_keys, int64_t offset, bool exclude_diagonal,
                                    bool decoupled, bool no_positives, Tensor row_lse,
                                    Tensor g_row, Tensor g_rowpos, optional<Tensor> col_lse,
                                    optional<Tensor> g_col, optional<Tensor> g_colpos) {
  detach_pair(x, y);
  const c10::DeviceGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const auto mask = make_mask(x, y, labels, key_labels, n_keys, offset, exclude_diagonal,
                              decoupled, no_positives);
  const float* b = opt_vec(bias, x, m, "bias");
  const float* sc = scale_ptr(scale, x);
  check_vector(row_lse, x, n, at::kFloat, "row_lse");
  check_vector(g_row, x, n, at::kFloat, "g_row");
  check_vector(g_rowpos, x, n, at::kFloat, "g_rowpos");
  const bool has_col = col_lse.has_value();
  TORCH_CHECK(has_col == g_col.has_value() && has_col == g_colpos.has_value(),
              "col_lse, g_col, g_colpos: all or none");
  const float* cl = opt_vec(col_lse, x, n_keys, "col_lse");
  const float* gc = opt_vec(g_col, x, n_keys, "g_col");
  const float* gcp = opt_vec(g_colpos, x, n_keys, "g_colpos");
  const auto st = current_stream(x);
  Tensor dx = at::zeros({n, d}, f32(x)), dy = at::zeros({m, d}, f32(x));
  Tensor parts = at::zeros({flcuda::pass_blocks(n)}, x.options().dtype(at::kDouble));
  Tensor dbias = b ? at::zeros({m}, f32(x)) : Tensor();
  for (const bool cols : {false, true})
    check_ok(flcuda::contrastive_grad(dtype_of(x), x.data_ptr(), y.data_ptr(), n, m, d, sc, b,
                                      mask, cols, row_lse.data_ptr<float>(),
                                      g_row.data_ptr<float>(), g_rowpos.data_ptr<float>(), cl, gc,
                                      gcp, (cols ? dy : dx).data_ptr<float>(),
                                      cols ? nullptr : parts.data_ptr<double>(),
                                      (cols && b) ? dbias.data_ptr<float>() : nullptr, st),
             cols ? "contrastive_bwd (dy)" : "contrastive_bwd (dx)");
  std::vector<Tensor> out{dx, dy, parts.sum().to(at::kFloat)};  // fp64 sum of fp64 partials
  if (b) out.push_back(dbias);
  return out;
}

flcuda::MsArgs ms_args(const Tensor& x, const Tensor& y, const Tensor& labels,
                       const Tensor& ref_labels, int64_t offset, bool exclude_self, double alpha,
                       double beta, double base, optional<double> epsilon) {
  check_vector(labels, x, x.size(0), at::kLong, "labels");
  check_vector(ref_labels, x, y.size(0), at::kLong, "ref_labels");
  flcuda::MsArgs a;
  a.labels = labels.data_ptr<int64_t>();
  a.ref_labels = ref_labels.data_ptr<int64_t>();
  a.offset = offset;
  a.exclude_self = exclude_self;
  a.alpha = static_cast<float>(alpha);
  a.beta = static_cast<float>(beta);
  a.base = static_cast<float>(base);
  a.mining = epsilon.has_value();
  a.eps = epsilon.has_value() ? static_cast<float>(*epsilon) : 0.f;
  return a;
}

// min_pos / max_neg of ms_mine: required (length N) with epsilon, ignored (null) without.
void mining_bounds(const flcuda::MsArgs& a, const optional<Tensor>& min_pos,
                   const optional<Tensor>& max_neg, const Tensor& x, const float*& mp,
                   const float*& mn) {
  TORCH_CHECK(!a.mining || (min_pos.has_value() && max_neg.has_value()),
              "min_pos and max_neg are required with epsilon");
  mp = a.mining ? opt_vec(min_pos, x, x.size(0), "min_pos") : nullptr;
  mn = a.mining ? opt_vec(max_neg, x, x.size(0), "max_neg") : nullptr;
}

std::vector<Tensor> ms_mine(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                            bool exclude_self) {
  detach_pair(x, y);
  const c10::DeviceGuard guard(x.device());
  const auto a = ms_args(x, y, labels, ref_labels, offset, exclude_self, 2.0, 50.0, 0.5, 0.0);
  Tensor lo = at::empty({x.size(0)}, f32(x)), hi = at::empty({x.size(0)}, f32(x));
  check_ok(flcuda::ms_mine(dtype_of(x), x.data_ptr(), y.data_ptr(), x.size(0), y.size(0),
                           x.size(1), a, lo.data_ptr<float>(), hi.data_ptr<float>(),
                           current_stream(x)),
           "ms_mine");
  return {lo, hi};
}

std::vector<Tensor> ms_fwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                           bool exclude_self, double alpha, double beta, double base,
                           optional<double> epsilon, optional<Tensor> min_pos,
                           optional<Tensor> max_neg) {
  detach_pair(x, y);
  const c10::DeviceGuard guard(x.device());
  const int64_t n = x.size(0);
  const auto a = ms_args(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base,
                         epsilon);
  const float *mp, *mn;
  mining_bounds(a, min_pos, max_neg, x, mp, mn);
  Tensor pl = at::empty({n}, f32(x)), nl = at::empty({n}, f32(x));
  check_ok(flcuda::ms_fwd(dtype_of(x), x.data_ptr(), y.data_ptr(), n, y.size(0), x.size(1), a, mp,
                          mn, pl.data_ptr<float>(), nl.data_ptr<float>(), current_stream(x)),
           "ms_fwd");
  return {pl, nl};
}

std::vector<Tensor> ms_bwd(Tensor x, Tensor y, Tensor labels, Tensor ref_labels, int64_t offset,
                           bool exclude_self, double alpha, double beta, double base,
                           optional<double> epsilon, optional<Tensor> min_pos,
                           optional<Tensor> max_neg, Tensor pos_lse, Tensor neg_lse,
                           Tensor g) {
  detach_pair(x, y);
  const c10::DeviceGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const auto a = ms_args(x, y, labels, ref_labels, offset, exclude_self, alpha, beta, base,
                         epsilon);
  const float *mp, *mn;
  mining_bounds(a, min_pos, max_neg, x, mp, mn);
  check_vector(pos_lse, x, n, at::kFloat, "pos_lse");
  check_vector(neg_lse, x, n, at::kFloat, "neg_lse");
  check_vector(g, x, n, at::kFloat, "g");
  const auto st = current_stream(x);
  Tensor dx = at::zeros({n, d}, f32(x)), dy = at::zeros({m, d}, f32(x));
  for (const bool cols : {false, true})
    check_ok(flcuda::ms_grad(dtype_of(x), x.data_ptr(), y.data_ptr(), n, m, d, a, mp, mn,
                             pos_lse.data_ptr<float>(), neg_lse.data_ptr<float>(),
                             g.data_ptr<float>(), cols,
                             (cols ? dy : dx).data_ptr<float>(), st),
             "ms_bwd");
  return {dx, dy};
}

std::vector<Tensor> softmax_matmul_fwd(Tensor x, Tensor y, Tensor v, Tensor scale,
                                       optional<Tensor> bias) {
  detach_pair(x, y);
  v = v.detach();
  const c10::DeviceGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  TORCH_CHECK(v.device() == x.device() && v.dim() == 2 && v.size(0) == m &&
                  v.scalar_type() == x.scalar_type() && v.is_contiguous(),
              "v must be a contiguous (M, E) tensor of x's dtype and device");
  const int64_t e = v.size(1);
  const float* b = opt_vec(bias, x, m, "bias");
  const float* sc = scale_ptr(scale, x);
  const auto st = current_stream(x);
  flcuda::PairMaskArgs plain;
  plain.n_keys = m;
  plain.no_positives = true;
  Tensor lse = at::empty({n}, f32(x)), ps = at::empty({n}, f32(x)), pc = at::empty({n}, f32(x));
  check_ok(flcuda::contrastive_lse(dtype_of(x), x.data_ptr(), y.data_ptr(), n, m, d, sc, b, plain,
                                   false, lse.data_ptr<float>(), ps.data_ptr<float>(),
                                   pc.data_ptr<float>(), st),
           "softmax_matmul_fwd (lse)");
  Tensor out = at::zeros({n, e}, f32(x));
  if (e > 0)
    check_ok(flcuda::softmax_matmul_out(dtype_of(x), x.data_ptr(), y.data_ptr(), v.data_ptr(), n,
                                        m, d, e, sc, b, lse.data_ptr<float>(),
                                        out.data_ptr<float>(), st),
             "softmax_matmul_fwd (out)");
  return {out, lse};
}

std::vector<Tensor> softmax_matmul_bwd(Tensor x, Tensor y, Tensor v, Tensor scale,
                                       optional<Tensor> bias, Tensor out, Tensor lse,
                                       Tensor g_out) {
  detach_pair(x, y);
  v = v.detach();
  const c10::DeviceGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  TORCH_CHECK(v.device() == x.device() && v.dim() == 2 && v.size(0) == m,
              "v must be (M, E) on x's device");
  const int64_t e = v.size(1);
  TORCH_CHECK(out.sizes() == g_out.sizes() && out.dim() == 2 && out.size(0) == n &&
                  out.size(1) == e,
              "out and g_out must be (N, E)");
  const float* b = opt_vec(bias, x, m, "bias");
  const float* sc = scale_ptr(scale, x);
  check_vector(lse, x, n, at::kFloat, "lse");
  const auto st = current_stream(x);
  // O((N + M)·E) fp32 copies: the dP tile g_out·vᵀ runs on the fp32 path.
  const Tensor g = g_out.detach().to(at::kFloat).contiguous();
  const Tensor vf = v.to(at::kFloat).contiguous();
  const Tensor delta = (g * out.detach().to(at::kFloat)).sum(1).contiguous();
  Tensor dx = at::zeros({n, d}, f32(x)), dy = at::zeros({m, d}, f32(x));
  Tensor dv = at::zeros({m, e}, f32(x));
  Tensor parts = at::zeros({flcuda::pass_blocks(n)}, x.options().dtype(at::kDouble));
  Tensor dbias = b ? at::zeros({m}, f32(x)) : Tensor();
  if (e > 0)
    for (const bool cols : {false, true})
      check_ok(flcuda::softmax_matmul_grad(
                   dtype_of(x), x.data_ptr(), y.data_ptr(), n, m, d, e, sc, b,
                   lse.data_ptr<float>(), delta.data_ptr<float>(), g.data_ptr<float>(),
                   vf.data_ptr<float>(), cols, (cols ? dy : dx).data_ptr<float>(),
                   cols ? nullptr : parts.data_ptr<double>(),
                   cols ? dv.data_ptr<float>() : nullptr,
                   (cols && b) ? dbias.data_ptr<float>() : nullptr, st),
               "softmax_matmul_bwd");
  std::vector<Tensor> res{dx, dy, dv, parts.sum().to(at::kFloat)};
  if (b) res.push_back(dbias);
  return res;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
  info["executed_on_gpu"] = false;  // update when a GPU run validates these kernels
  return info;
}

}  // namespace

TORCH_LIBRARY(fused_losses_cuda, m) {
#define FL_CUDA_OP(name) m.def(#name, torch::dispatch(c10::DispatchKey::CUDA, TORCH_FN(name)))
  FL_CUDA_OP(contrastive_fwd);
  FL_CUDA_OP(contrastive_bwd);
  FL_CUDA_OP(ms_mine);
  FL_CUDA_OP(ms_fwd);
  FL_CUDA_OP(ms_bwd);
  FL_CUDA_OP(softmax_matmul_fwd);
  FL_CUDA_OP(softmax_matmul_bwd);
#undef FL_CUDA_OP
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused-losses CUDA kernels (ops live in torch.ops.fused_losses_cuda)";
  m.def("build_info", &build_info, "How this extension was built.");
}
