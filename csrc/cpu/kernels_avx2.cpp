// AVX2 + FMA build of the tile kernels, picked at load time on CPUs that have them.
#include "cpu/tile_types.h"  // shared code first, compiled for the baseline target

#if FL_X86_BUILDS
#pragma GCC target("avx2,fma")
#define FL_VEC_BYTES 32
#define FL_ISA avx2
#include "cpu/tile_kernels.inc"
#endif
