// The AVX2 build of the probe_gate CPU score loop (see cpu_vec.h); the launcher in
// probe_gate_cpu.cpp runs it where the CPU has AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)  // see common.h
#define EMOSTEER_CPU_AVX2
#include "cpu_vec.h"
#include "probe_gate/probe_gate_cpu_kernel.h"
#endif
