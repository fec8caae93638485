// Baseline build of the tile kernels (SSE2 on x86-64; whatever the compiler targets elsewhere).
#include "cpu/tile_types.h"

#define FL_ISA generic
#include "cpu/tile_kernels.inc"
