// The AVX2 build of the neuron_gain CPU token loop (see cpu_vec.h); the launcher in
// neuron_gain_cpu.cpp runs it where the CPU has AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)  // see common.h
#define EMOSTEER_CPU_AVX2
#include "cpu_vec.h"
#include "neuron_gain/neuron_gain_cpu_kernel.h"
#endif
