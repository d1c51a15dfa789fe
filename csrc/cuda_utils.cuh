// CUDA-only helpers shared by the kernels: 16-byte packs for vectorized loads, the
// launch shape, a block-wide sum and the current stream. Only c10/cuda headers are
// used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS headers).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace emosteer {
namespace cuda {

// VEC consecutive elements moved as one aligned load/store (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
constexpr int kMaxVec = 16 / sizeof(T);

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every pointer is 16-byte aligned and rows of `inner` elements split into whole
// packs, so that a kernel may use Pack<T, kMaxVec<T>> throughout.
template <typename T>
inline bool can_vectorize(int64_t inner, std::initializer_list<const void*> ptrs) {
  if (inner % kMaxVec<T> != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

constexpr int kThreads = 256;

// Grid for kernels with one block row per token: x = token, y = chunks of a row of
// `packs` packs, `threads` threads each. Launch bounds keep gridDim.y within limits.
inline dim3 token_grid(int64_t tokens, int64_t packs, int threads) {
  const int64_t chunks = std::max<int64_t>(1, (packs + threads - 1) / threads);
  return dim3(static_cast<unsigned>(tokens), static_cast<unsigned>(std::min<int64_t>(chunks, 65535)));
}

inline int threads_for(int64_t packs) {
  // A whole number of warps, at least one, at most kThreads.
  const int64_t warps = std::min<int64_t>((packs + 31) / 32, kThreads / 32);
  return static_cast<int>(std::max<int64_t>(warps, 1) * 32);
}

constexpr int kWarp = 32;

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to
// every thread: warp shuffles, then one step through shared memory. Every thread of the
// block must call it. red: kWarp + 1 floats of shared memory, free again on return.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? red[lane] : 0.0f;
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = add_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[kWarp] = v;
  }
  __syncthreads();
  const float out = red[kWarp];
  __syncthreads();  // red may be reused at once
  return out;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace emosteer
