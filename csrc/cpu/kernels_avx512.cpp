// AVX-512 (F, BW, DQ, VL) build of the tile kernels, picked at load time on CPUs that have it.
#include "cpu/tile_types.h"  // shared code first, compiled for the baseline target

#if FL_X86_BUILDS
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#define FL_VEC_BYTES 64
#define FL_ISA avx512
#include "cpu/tile_kernels.inc"
#endif
