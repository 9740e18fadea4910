// CUDA kernel that fills a tile of the JL matrix Omega from the counter-based generator (rng.h), the
// same function of (seed, row, column) as on the CPU; the glue multiplies tiles in with cuBLAS, so
// Omega is never stored whole.
//
// A warp covers 32 consecutive columns of one row. Those share one 64-bit Rademacher draw, so lane 0
// hashes once and broadcasts with a shuffle, and the 32 stores are coalesced.
#include "common.cuh"
#include "deltainf/rng.h"
#include "launchers.h"

namespace deltainf {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;

template <typename T>
__global__ void fill_omega_kernel(T* __restrict__ tile, int64_t ld, int64_t rows, int64_t cols, uint64_t first_row,
                                  int64_t first_col, uint64_t seed, int dist, T scale) {
  const int lane = threadIdx.x;  // blockDim.x == 32
  // rows in a grid-stride loop like the columns: gridDim.y stops at 65535 (a tile of 2^24 / k rows passes it for
  // k <= 32); r is the same across a warp, so whole warps leave together and the full-mask shuffle stays valid
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.y) * kRowsPerBlock) {
    const uint64_t row = first_row + static_cast<uint64_t>(r);
    for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32; c0 < cols; c0 += static_cast<int64_t>(gridDim.x) * 32) {
      const int64_t c = c0 + lane;
      const int64_t col = first_col + c;
      T value;
      if (dist == rng::kRademacher) {
        uint64_t bits = 0;
        if (lane == 0) bits = rng::draw(rng::row_key(seed, row, 0), static_cast<uint64_t>((first_col + c0) / 64));
        bits = __shfl_sync(0xffffffffu, bits, 0);
        value = rng::rademacher<T>(bits, static_cast<int>(col % 64), scale);
      } else {
        T z0, z1;
        const uint64_t key = rng::row_key(seed, row, rng::kSaltGaussian);
        rng::gaussian_pair<T>(rng::draw(key, static_cast<uint64_t>(col / 2)), scale, &z0, &z1);
        value = (col % 2 == 0) ? z0 : z1;
      }
      if (c < cols) tile[r * ld + c] = value;
    }
  }
}

}  // namespace

template <typename T>
void launch_fill_omega(T* tile, int64_t ld, int64_t rows, int64_t cols, uint64_t first_row, int64_t first_col,
                       uint64_t seed, int dist, T scale, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const dim3 block(32, kRowsPerBlock);
  const int64_t col_chunks = std::min<int64_t>((cols + 31) / 32, 65535);
  const int64_t row_chunks = std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, 65535);
  const dim3 grid(static_cast<unsigned int>(col_chunks), static_cast<unsigned int>(row_chunks));
  fill_omega_kernel<T><<<grid, block, 0, stream>>>(tile, ld, rows, cols, first_row, first_col, seed, dist, scale);
}

template void launch_fill_omega<float>(float*, int64_t, int64_t, int64_t, uint64_t, int64_t, uint64_t, int, float,
                                       cudaStream_t);
template void launch_fill_omega<double>(double*, int64_t, int64_t, int64_t, uint64_t, int64_t, uint64_t, int, double,
                                        cudaStream_t);

}  // namespace cuda
}  // namespace deltainf
