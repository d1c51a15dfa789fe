// The AVX2 build of the attn_image_boost CPU loop (see cpu_vec.h); the launcher in
// attn_image_boost_cpu.cpp runs it where the CPU has AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)  // see common.h
#define EMOSTEER_CPU_AVX2
#include "cpu_vec.h"
#include "attn_image_boost/attn_image_boost_cpu_kernel.h"
#endif
