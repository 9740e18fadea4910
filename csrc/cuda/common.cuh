// Device helpers shared by the .cu files (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace deltainf {
namespace cuda {

constexpr int kThreads = 256;

// Grid size for a grid-stride loop over n elements; capped, the loop covers the rest.
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535 * 8)));
}

// Storage type -> accumulation type (float for float16/bfloat16/float32, double for double).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Explicit conversions: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__, so no implicit casts.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

}  // namespace cuda
}  // namespace deltainf
