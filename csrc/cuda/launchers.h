// Torch-free CUDA launchers: raw pointers, sizes and a stream. The kernels behind them live in the
// *_kernel.cu files, which nvcc compiles without torch headers (make cuda-check); the torch glue
// (*_cuda.cpp) validates, sets the device guard and stream, and checks every launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deltainf {
namespace cuda {

// Omega tile for feature rows first_row.. and columns first_col.. (a multiple of 64) into
// tile[r * ld + c]; T = float or double.
template <typename T>
void launch_fill_omega(T* tile, int64_t ld, int64_t rows, int64_t cols, uint64_t first_row, int64_t first_col,
                       uint64_t seed, int dist, T scale, cudaStream_t stream);

// rotated (d_out, B, d_in) /= lam (d_out, d_in) + damping, in place; T = float or double.
template <typename T>
void launch_damped_inverse(T* rotated, const T* lam, int64_t d_out, int64_t B, int64_t d_in, T damping,
                           cudaStream_t stream);

// acc[c] += sum_r R[r, c]^2 for R (rows, cols); T = float or double.
template <typename T>
void launch_square_accumulate(const T* R, int64_t rows, int64_t cols, T* acc, cudaStream_t stream);

// Sign vote over base (P, N) and transformed (P, n, N); T = float, double, __half, __nv_bfloat16
// (passed as the storage type; the glue reinterprets at::Half / at::BFloat16).
template <typename T>
void launch_sign_vote(const T* base, const T* transformed, int64_t P, int64_t n, int64_t N, double threshold,
                      int64_t min_votes, int32_t* votes, bool* flags, cudaStream_t stream);

void launch_combine_flags(const uint8_t* flags, int64_t P, int64_t N, int64_t min_points, bool* out,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace deltainf
