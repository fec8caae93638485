// Host emulation of the few CUDA features the kernels use, for TESTING ONLY: compiled with a host
// compiler (-DFL_HOST_EMULATION, -x c++), csrc/cuda/*.cu then run on the CPU, one std::thread per
// CUDA thread, so that the kernels' own code (tile loop, epilogues, reductions, products) is
// executed on a machine without a GPU (tests/test_cuda_emulation.py, built by
// csrc/cuda/tests/emulation_api.cpp).  What it does NOT reproduce: the GPU's memory model and
// scheduling (each emulated thread runs to the next barrier with sequentially consistent memory;
// races that racecheck would flag can go unnoticed), the tensor cores' internal summation order
// (the mma emulation sums its 16 products in fp32 in k order), cp.async's asynchrony (copies
// complete at once), and performance.  The GPU build never includes this header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace flcuda {
namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

constexpr int kEmuThreads = 256;

struct Cta {
  std::barrier<> block{kEmuThreads};
  std::unique_ptr<std::barrier<>> warp[kEmuThreads / 32];
  double slot[kEmuThreads / 32][32];
  unsigned a[kEmuThreads / 32][32][4];
  unsigned b[kEmuThreads / 32][32][2];
  std::vector<unsigned char> smem;
  Cta() {
    for (auto& w : warp) w = std::make_unique<std::barrier<>>(32);
  }
};

inline thread_local Cta* cta = nullptr;
inline thread_local Dim3 thread_idx, block_idx;

inline int warp_id() { return static_cast<int>(thread_idx.x >> 5); }
inline int lane_id() { return static_cast<int>(thread_idx.x & 31); }
inline void warp_sync() { cta->warp[warp_id()]->arrive_and_wait(); }

// Value of lane `src` (own value when src is out of range, as __shfl_down_sync).
inline double exchange(double v, int src) {
  cta->slot[warp_id()][lane_id()] = v;
  warp_sync();
  const double out = (src >= 0 && src < 32) ? cta->slot[warp_id()][src] : v;
  warp_sync();
  return out;
}

// Runs fn once per emulated thread of `blocks` CTAs of 256 threads (CTAs one after another).
template <typename F>
void run_grid(int64_t blocks, int smem_bytes, F&& fn) {
  for (int64_t bid = 0; bid < blocks; ++bid) {
    Cta c;
    c.smem.assign(static_cast<size_t>(smem_bytes) + 16, 0xFF);  // garbage, not zeros
    std::vector<std::thread> threads;
    threads.reserve(kEmuThreads);
    for (int t = 0; t < kEmuThreads; ++t)
      threads.emplace_back([&, t] {
        cta = &c;
        thread_idx.x = static_cast<unsigned>(t);
        block_idx.x = static_cast<unsigned>(bid);
        fn();
      });
    for (auto& th : threads) th.join();
  }
}

inline unsigned char* shared_base() {
  auto p = reinterpret_cast<uintptr_t>(cta->smem.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}

template <typename T>
inline float half_bits_to_float(unsigned short bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: every lane deposits its fragments, then
// computes its four accumulators from the whole warp's, with the PTX ISA element layout.
template <typename T>
inline void mma_m16n8k16(float* c, const unsigned* a, const unsigned* b) {
  const int w = warp_id(), lane = lane_id();
  for (int r = 0; r < 4; ++r) cta->a[w][lane][r] = a[r];
  for (int r = 0; r < 2; ++r) cta->b[w][lane][r] = b[r];
  warp_sync();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 8; ++i) {  // a_i: element i, register i/2, half i%2 (low half first)
      const unsigned reg = cta->a[w][l][i >> 1];
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half_bits_to_float<T>(static_cast<unsigned short>(reg >> (16 * (i & 1))));
    }
    for (int i = 0; i < 4; ++i) {
      const unsigned reg = cta->b[w][l][i >> 1];
      B[t * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] =
          half_bits_to_float<T>(static_cast<unsigned short>(reg >> (16 * (i & 1))));
    }
  }
  warp_sync();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[i] += acc;
  }
}

}  // namespace emu
}  // namespace flcuda

#define threadIdx (::flcuda::emu::thread_idx)
#define blockIdx (::flcuda::emu::block_idx)

inline void __syncthreads() { ::flcuda::emu::cta->block.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  return static_cast<float>(::flcuda::emu::exchange(v, ::flcuda::emu::lane_id() ^ m));
}
inline double __shfl_xor_sync(unsigned, double v, int m) {
  return ::flcuda::emu::exchange(v, ::flcuda::emu::lane_id() ^ m);
}
inline double __shfl_down_sync(unsigned, double v, int o) {
  return ::flcuda::emu::exchange(v, ::flcuda::emu::lane_id() + o);
}
