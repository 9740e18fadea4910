// HOST_DEVICE: one definition of the per-element math for the CPU loops and the CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DELTAINF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DELTAINF_HOST_DEVICE inline
#endif
