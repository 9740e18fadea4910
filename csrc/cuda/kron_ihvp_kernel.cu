// CUDA kernels of the elementwise steps around the GEMMs of the projection and iHVP ops: the damped
// eigenvalue division (shared math in vote.h) and the square-sum accumulation of projected blocks.
#include "common.cuh"
#include "deltainf/vote.h"
#include "launchers.h"

namespace deltainf {
namespace cuda {
namespace {

// rotated is laid out (d_out, B, d_in): element e divides by lam[e / (B * d_in), e % d_in] + damping.
template <typename T>
__global__ void damped_inverse_kernel(T* __restrict__ rotated, const T* __restrict__ lam, int64_t B, int64_t d_in,
                                      int64_t total, T damping) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = e / (B * d_in), i = e % d_in;
    rotated[e] = damped_inverse<T>(rotated[e], lam[o * d_in + i], damping);
  }
}

// One thread per column, looping over rows: reads are coalesced across the warp.
template <typename T>
__global__ void square_accumulate_kernel(const T* __restrict__ R, int64_t rows, int64_t cols, T* __restrict__ acc) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T sum = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const T v = R[r * cols + c];
      sum += v * v;
    }
    acc[c] += sum;
  }
}

}  // namespace

template <typename T>
void launch_damped_inverse(T* rotated, const T* lam, int64_t d_out, int64_t B, int64_t d_in, T damping,
                           cudaStream_t stream) {
  const int64_t total = d_out * B * d_in;
  if (total == 0) return;
  damped_inverse_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(rotated, lam, B, d_in, total, damping);
}

template <typename T>
void launch_square_accumulate(const T* R, int64_t rows, int64_t cols, T* acc, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  square_accumulate_kernel<T><<<grid_for(cols), kThreads, 0, stream>>>(R, rows, cols, acc);
}

template void launch_damped_inverse<float>(float*, const float*, int64_t, int64_t, int64_t, float, cudaStream_t);
template void launch_damped_inverse<double>(double*, const double*, int64_t, int64_t, int64_t, double, cudaStream_t);
template void launch_square_accumulate<float>(const float*, int64_t, int64_t, float*, cudaStream_t);
template void launch_square_accumulate<double>(const double*, int64_t, int64_t, double*, cudaStream_t);

}  // namespace cuda
}  // namespace deltainf
