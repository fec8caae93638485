// The one tile loop of the CUDA backend, shared by every kernel (contrastive, multi-similarity,
// softmax-weighted matmul).  NOT YET EXECUTED ON A GPU.  What runs without one: CI compiles it for
// sm_80/sm_90a and checks ptxas's register/spill report (scripts/check_cuda_compile.sh); its
// per-element math (tile_math.h) and mma fragment layout are unit-tested on the host; and the
// kernels' source runs on the CPU under a host emulation of threads, barriers, shuffles,
// cp.async and mma (host_emulation.h, tests/test_cuda_emulation.py) against the reference.
//
// A CTA of 256 threads owns a block of 64 lines: rows of x (a "row pass") or rows of y, i.e.
// columns of the similarity matrix (a "column pass").  It streams over the other side in blocks
// of 64 and, per step:
//   1. sim_tile: S = X[r0:r0+64] · Y[c0:c0+64]ᵀ in fp32 into shared memory.  The k loop runs over
//      D in chunks of BK, double-buffered with cp.async (16-byte copies that zero-fill the row
//      and feature tails, so any N, M, D ≥ 1 is read in bounds); rows whose stride is not
//      16-byte aligned take a synchronous element path instead.  bf16/fp16 use tensor cores
//      (mma.sync m16n8k16, fp32 accumulation); fp32 uses plain FMA (exact fp32: no TF32).
//      The tile is ALWAYS computed as x-rows · y-rowsᵀ with tiles at multiples of 64, in row and
//      column passes alike: every pass of an op sees bit-identical s_ij (the multi-similarity
//      mining threshold is a hard comparison; kernels.py's contract).
//   2. an elementwise epilogue (the kernel's own): each owned line is handled by a quad of 4
//      threads, each visiting 16 of the tile's 64 entries of that line; quad reductions are
//      xor-butterflies, so all four lanes hold bit-identical results (deterministic).
//   3. for gradient-like kernels, product: out[owned lines] += W · R[streamed lines] with W the
//      epilogue's weight tile (in place in shared memory) and R the streamed side's rows
//      (features or values).  Each output element has exactly one owner thread for the whole
//      kernel: no atomics, results are deterministic run to run.
// Nothing of size N×M exists: per CTA one 64×64 tile (two for the softmax-matmul gradient).
#pragma once

#if defined(FL_HOST_EMULATION)
#include "cuda/host_emulation.h"  // tests only: run these kernels on the CPU
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "cuda/tile_math.h"

namespace flcuda {

constexpr int kThreads = 256;
constexpr int kTile = 64;           // tile rows (x side) = tile columns (y side) = owned lines
constexpr int kLd = kTile + 4;      // shared row stride of a float tile (bank spread)
constexpr int kTileBytes = kTile * kLd * 4;
constexpr int kStageBytes = 20480;  // two k-chunks of both operands; reused by product()
constexpr int kScratchBytes = 64;   // block_sum's 8 doubles

// Feature chunk per pipeline stage: 64 bytes per row for every input type (4 × 16-byte copies),
// padded by 16 bytes (conflict-free mma fragment reads).
template <typename T>
struct Cfg {
  static constexpr int kEpc = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte copy
  static constexpr int BK = 4 * kEpc;
  static constexpr int kLdS = BK + kEpc;
};
static_assert(2 * 2 * kTile * Cfg<float>::kLdS * 4 <= kStageBytes, "fp32 stages");
static_assert(2 * 2 * kTile * Cfg<__half>::kLdS * 2 <= kStageBytes, "16-bit stages");
static_assert(kTile * kTile * 4 <= kStageBytes, "product staging");

// Dynamic shared memory of a kernel with `tiles` float tiles.
constexpr int smem_bytes(int tiles) { return kStageBytes + tiles * kTileBytes + kScratchBytes; }

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

// A row-major operand: rows × cols (cols = the feature dimension, contiguous), row stride ld.
// vec: base and stride 16-byte aligned, so rows can be copied in 16-byte pieces.
template <typename T>
struct Operand {
  const T* p;
  int64_t rows, cols, ld;
  bool vec;
};

template <typename T>
inline Operand<T> make_operand(const void* p, int64_t rows, int64_t cols, int64_t ld) {
  const bool vec = (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((ld * sizeof(T)) % 16 == 0);
  return Operand<T>{static_cast<const T*>(p), rows, cols, ld, vec};
}

// The kernel's dynamic shared memory.
#if defined(FL_HOST_EMULATION)
#define FL_SMEM(name) unsigned char* const name = ::flcuda::emu::shared_base()
#else
#define FL_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ------------------------------------------------------------------------ cp.async (sm_80+)
// 16 bytes global -> shared; bytes past src_bytes are zero-filled (src_bytes = 0: none read).
#if defined(FL_HOST_EMULATION)
inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
  std::memset(smem, 0, 16);
  if (src_bytes > 0) std::memcpy(smem, gmem, static_cast<size_t>(src_bytes));
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// One pipeline stage: rows 0..63 of the stage hold X[r0 + r, k0 : k0 + BK], rows 64..127 hold
// Y[c0 + r, k0 : k0 + BK]; everything out of range reads as 0.
template <typename T>
__device__ __forceinline__ void load_stage(const Operand<T>& a, int64_t r0, const Operand<T>& b,
                                           int64_t c0, int64_t k0, T* st) {
  constexpr int E = Cfg<T>::kEpc;
  constexpr int LD = Cfg<T>::kLdS;
  for (int c = threadIdx.x; c < 2 * kTile * 4; c += kThreads) {
    const int r = c >> 2, part = c & 3;
    const Operand<T>& op = r < kTile ? a : b;
    const int64_t row = (r < kTile ? r0 : c0 - kTile) + r;
    const int64_t k = k0 + part * E;
    T* dst = st + r * LD + part * E;
    const bool row_ok = row < op.rows;
    if (op.vec) {
      int64_t valid = op.cols - k;
      valid = row_ok ? (valid < 0 ? 0 : (valid > E ? E : valid)) : 0;
      const T* src = valid > 0 ? op.p + row * op.ld + k : op.p;  // 0 bytes read when invalid
      cp_async16(dst, src, static_cast<int>(valid * sizeof(T)));
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e)
        dst[e] = (row_ok && k + e < op.cols) ? op.p[row * op.ld + k + e] : zero_of<T>();
    }
  }
}

// ------------------------------------------------------------------------ tile products
// Accumulators of the 64×64 tile in registers, and their store into a float tile.
// Tensor-core path (bf16/fp16): 8 warps as 4 (rows) × 2 (cols); a warp owns 16 × 32 = four
// m16n8 accumulators.  Fragment coordinates: tile_math.h (mma_a_row ... warp_col0), the PTX
// ISA's for mma.m16n8k16 (.row.col), emulated on the host by csrc/cuda/tests.  Inline PTX rather than nvcuda::wmma: the layout is documented (wmma's
// is opaque), so the k order per element is pinned and identical in every pass, and the same
// instruction serves sm_80 and sm_90a.
template <typename T>
struct MmaOp;
#if defined(FL_HOST_EMULATION)
template <typename T>
struct MmaOp {
  static void run(float* c, const unsigned* a, const unsigned* b) {
    emu::mma_m16n8k16<T>(c, a, b);
  }
};
#else
template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
#endif

// The 16 fp32 accumulators per thread of either tile path.
struct AccRegs {
  float c[4][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[i][j] = 0.f;
  }
};

template <typename T>
struct TileAcc : AccRegs {  // bf16 / fp16: tensor cores
  __device__ __forceinline__ void step(const T* st) {
    constexpr int LD = Cfg<T>::kLdS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const T* as = st + warp_row0(warp) * LD;
    const T* bs = st + (kTile + warp_col0(warp)) * LD;
#pragma unroll
    for (int ks = 0; ks < Cfg<T>::BK; ks += 16) {
      unsigned a[4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
        a[r] = *reinterpret_cast<const unsigned*>(as + mma_a_row(lane, r) * LD + ks +
                                                  mma_a_k(lane, r));
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        unsigned b[2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
          b[r] = *reinterpret_cast<const unsigned*>(bs + (nt * 8 + mma_b_n(lane)) * LD + ks +
                                                    mma_b_k(lane, r));
        MmaOp<T>::run(c[nt], a, b);
      }
    }
  }
  __device__ __forceinline__ void store(float* dst) const {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        dst[(warp_row0(warp) + mma_c_row(lane, i)) * kLd + warp_col0(warp) + nt * 8 +
            mma_c_col(lane, i)] = c[nt][i];
  }
};

// fp32: exact FMA, each thread a 4×4 block (rows ty+16a, cols tx+16b).
template <>
struct TileAcc<float> : AccRegs {
  __device__ __forceinline__ void step(const float* st) {
    constexpr int LD = Cfg<float>::kLdS;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 4
    for (int k = 0; k < Cfg<float>::BK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = st[(ty + 16 * i) * LD + k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = st[(kTile + tx + 16 * j) * LD + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);  // k ascending, always
    }
  }
  __device__ __forceinline__ void store(float* dst) const {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dst[(ty + 16 * i) * kLd + tx + 16 * j] = c[i][j];
  }
};

// S = A[r0 : r0+64] · B[c0 : c0+64]ᵀ (fp32) into dst (64 × kLd floats); a.cols == b.cols.
// Called by all threads; starts and ends with a barrier (stage and dst are then free/ready).
template <typename T>
__device__ void sim_tile(const Operand<T>& a, int64_t r0, const Operand<T>& b, int64_t c0,
                         unsigned char* stage, float* dst) {
  constexpr int BK = Cfg<T>::BK;
  constexpr int STAGE_ELEMS = 2 * kTile * Cfg<T>::kLdS;
  T* st = reinterpret_cast<T*>(stage);
  const int64_t nk = (a.cols + BK - 1) / BK;
  TileAcc<T> acc;
  acc.zero();
  __syncthreads();
  load_stage(a, r0, b, c0, 0, st);
  cp_async_commit();
  for (int64_t kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) {
      load_stage(a, r0, b, c0, (kt + 1) * BK, st + ((kt + 1) & 1) * STAGE_ELEMS);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    acc.step(st + (kt & 1) * STAGE_ELEMS);
    __syncthreads();
  }
  cp_async_wait<0>();
  acc.store(dst);
  __syncthreads();
}

// ------------------------------------------------------------------------ line reductions
// Owned line of this thread (0..63) and its quad lane; the 16 tile positions it visits are
// k = quad_lane + 4·t.
__device__ __forceinline__ int line_of_thread() { return threadIdx.x >> 2; }
__device__ __forceinline__ int quad_lane() { return threadIdx.x & 3; }

// Entry (line, k) of a tile: a row pass owns tile rows, a column pass tile columns.
template <bool ROWS>
__device__ __forceinline__ float& tile_at(float* s, int line, int k) {
  return ROWS ? s[line * kLd + k] : s[k * kLd + line];
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
__device__ __forceinline__ double quad_sum(double v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
__device__ __forceinline__ float quad_max(float v) {
  v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return nan_max(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_min(float v) {
  v = nan_min(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return nan_min(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Block-wide sum of one double per thread, in a fixed order (deterministic); result in thread 0.
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// ------------------------------------------------------------------------ weighted products
// out[o0 + o, :] += Σ_k W(o, k) · R[k0 + k, :] for the owned lines o < n_out, k < n_k, where
// W(o, k) is the tile entry (o, k) of a row pass or (k, o) of a column pass.  R (n_k × E) is read
// in 64-wide column chunks staged as fp32 (zero past its ends); W entries outside the valid
// lines must be 0 (the epilogues write 0 there, never a masked value times 0).  Each output
// element belongs to one thread for the whole kernel: plain read-modify-write, no atomics.
// fp32 FMA: the weights stay fp32 (a bf16 rounding of near-cancelling gradient weights costs
// digits).  A tensor-core version (split hi/lo bf16 weights) is future work, to be measured.
template <bool ROWS, typename TR>
__device__ void product(const float* w, const TR* r, int64_t ldr, int64_t k0, int64_t n_k,
                        int64_t width, float* out, int64_t ldo, int64_t o0, int64_t n_out,
                        unsigned char* stage) {
  float* rs = reinterpret_cast<float*>(stage);
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
  for (int64_t e0 = 0; e0 < width; e0 += kTile) {
    __syncthreads();  // rs free, w complete
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int k = idx >> 6, e = idx & 63;
      const bool ok = k < n_k && e0 + e < width;
      rs[idx] = ok ? to_f<TR>(r[(k0 + k) * ldr + e0 + e]) : 0.f;
    }
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#pragma unroll 4
    for (int k = 0; k < kTile; ++k) {
      float wv[4], rv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        wv[i] = ROWS ? w[(ty + 16 * i) * kLd + k] : w[k * kLd + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) rv[j] = rs[k * kTile + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(wv[i], rv[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int o = ty + 16 * i;
      if (o >= n_out) continue;
      float* orow = out + (o0 + o) * ldo + e0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = tx + 16 * j;
        if (e0 + e < width) orow[e] += acc[i][j];
      }
    }
  }
  __syncthreads();
}

// Valid lines of the 64-line block starting at `start` of n lines: min(n − start, 64).
__device__ __forceinline__ int64_t block_extent(int64_t n, int64_t start) {
  return n - start < kTile ? n - start : kTile;
}

// The lines a CTA owns and this thread's place among them (a quad of 4 threads per line).
struct OwnedLine {
  int line, q;        // owned line of the block (0..63), quad lane
  int64_t own0, own;  // first line of the block, this thread's line
  bool ok;            // own < n_own
  __device__ __forceinline__ explicit OwnedLine(int64_t n_own)
      : line(line_of_thread()),
        q(quad_lane()),
        own0(static_cast<int64_t>(blockIdx.x) * kTile),
        own(own0 + line),
        ok(own < n_own) {}
};

// The gradient product of a pass over x (n×d) and y (m×d): grad[owned lines] += W · (the
// streamed lines t0.. of the other side), i.e. W·Y in a row pass, Wᵀ·X in a column pass.
template <bool ROWS, typename T>
__device__ __forceinline__ void grad_product(const float* w, const Operand<T>& x,
                                             const Operand<T>& y, int64_t t0, int64_t n_stream,
                                             float* grad, int64_t own0, int64_t n_own,
                                             unsigned char* stage) {
  const Operand<T>& r = ROWS ? y : x;
  const int64_t d = x.cols;
  product<ROWS>(w, r.p, r.ld, t0, block_extent(n_stream, t0), d, grad, d, own0,
                block_extent(n_own, own0), stage);
}

// End of a gradient pass with scale and bias terms: a row pass writes its CTA's fp64 Σ dscale
// (block_sum order) to dscale_part[blockIdx.x]; a column pass writes its lines' Σ dbias
// (quad-reduced) to dbias when given.  Called by all threads.
template <bool ROWS>
__device__ __forceinline__ void grad_pass_sums(double dscale, double dbias, const OwnedLine& o,
                                               double* dscale_part, float* dbias_out,
                                               double* scratch) {
  if (ROWS) {
    const double total = block_sum(dscale, scratch);
    if (threadIdx.x == 0) dscale_part[blockIdx.x] = total;
  } else {
    dbias = quad_sum(dbias);
    if (o.ok && o.q == 0 && dbias_out) dbias_out[o.own] = static_cast<float>(dbias);
  }
}

// Shared-memory carve-up of a kernel: stage | tile0 | tile1 | scratch.
struct Smem {
  unsigned char* stage;
  float* tile0;
  float* tile1;
  double* scratch;
  __device__ __forceinline__ explicit Smem(unsigned char* base, int tiles) {
    stage = base;
    tile0 = reinterpret_cast<float*>(base + kStageBytes);
    tile1 = reinterpret_cast<float*>(base + kStageBytes + kTileBytes);
    scratch = reinterpret_cast<double*>(base + kStageBytes + tiles * kTileBytes);
  }
};

// The part of every kernel's parameters that the tile loop reads: the operands x (n×d) and
// y (m×d) of the similarity tiles, and the extent of the pass: a row pass owns the n rows of x
// and streams the m rows of y, a column pass the reverse.
template <typename T>
struct PassParams {
  Operand<T> x, y;
  int64_t n_own, n_stream;
};

template <typename T>
inline void set_pass(PassParams<T>& p, const void* x, const void* y, int64_t n, int64_t m,
                     int64_t d, bool cols) {
  p.x = make_operand<T>(x, n, d, d);
  p.y = make_operand<T>(y, m, d, d);
  p.n_own = cols ? m : n;
  p.n_stream = cols ? n : m;
}

inline int64_t num_blocks(int64_t n) { return (n + kTile - 1) / kTile; }

// Launch with `tiles` float tiles of dynamic shared memory (above 48 KiB needs the opt-in).
template <typename Kernel, typename Params>
inline cudaError_t launch(Kernel kernel, int64_t lines, int tiles, const Params& p,
                          cudaStream_t stream) {
  if (lines <= 0) return cudaSuccess;
  const int bytes = smem_bytes(tiles);
#if defined(FL_HOST_EMULATION)
  (void)stream;
  emu::run_grid(num_blocks(lines), bytes, [&] { kernel(p); });
  return cudaSuccess;
#else
  if (bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(num_blocks(lines)), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
#endif
}

}  // namespace flcuda

namespace flcuda {

// Host-side dispatch of the three input types to a template.
template <typename T>
struct TypeTag {
  using type = T;
};

}  // namespace flcuda
