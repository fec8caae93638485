// Python module entry of the compiled CPU extension ``fused_losses._C``.  Importing it loads the
// library, whose static initializers register the ``torch.ops.fused_losses_C`` kernels
// (csrc/cpu_ops.cpp).  build_info() reports how it was built.
#include <torch/extension.h>

#include <string>

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#if defined(_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["torch_version"] = TORCH_VERSION;
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused-losses compiled CPU kernels (ops live in torch.ops.fused_losses_C)";
  m.def("build_info", &build_info, "How this extension was built.");
}
