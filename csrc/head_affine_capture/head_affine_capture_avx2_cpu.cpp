// The AVX2 build of the head_affine_capture CPU token loop (see cpu_vec.h); the
// launcher in head_affine_capture_cpu.cpp runs it where the CPU has AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)  // see common.h
#define EMOSTEER_CPU_AVX2
#include "cpu_vec.h"
#include "head_affine_capture/head_affine_capture_cpu_kernel.h"
#endif
