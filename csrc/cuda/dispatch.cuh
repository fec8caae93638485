// DType -> element type dispatch of the host launchers (csrc/cuda/*.cu).
#pragma once

#include "cuda/api.h"
#include "cuda/tile_loop.cuh"

namespace flcuda {

template <typename F>
inline cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace flcuda
