// The AVX2 build of the residual_steer CPU token loop (see cpu_vec.h); the launcher in
// residual_steer_cpu.cpp runs it where the CPU has AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)  // see common.h
#define EMOSTEER_CPU_AVX2
#include "cpu_vec.h"
#include "residual_steer/residual_steer_cpu_kernel.h"
#endif
