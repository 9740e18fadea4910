// CPU kernel of the dense JL projection x (N, p) -> x Omega (N, k), Omega never materialised.
//
// Omega is generated tile by tile (kRowTile features x kColBlock columns) into a per-thread buffer
// from the counter-based generator in rng.h and multiplied in with torch's GEMM, so the RNG work is
// p * k per call (amortised over the N rows of x) and the memory is one tile per thread. Work items
// are column blocks, further split along the features when there are fewer blocks than threads
// (each split then accumulates into its own partial output, summed at the end).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "deltainf/checks.h"
#include "deltainf/rng.h"

namespace deltainf {
namespace {

constexpr int64_t kColBlock = 256;  // multiple of 64: Rademacher words never straddle a block
constexpr int64_t kRowTile = 128;

// Rademacher values of one byte of a draw: kByteValues[byte][b] = +-scale for bit b of byte. Eight
// memcpy's of 8 values per 64-bit draw replace a per-bit select that compilers do not vectorise for
// baseline x86-64; the values are bit-identical to rng::rademacher.
template <typename T>
struct RademacherTable {
  T values[256][8];
  explicit RademacherTable(T scale) {
    for (int byte = 0; byte < 256; ++byte) {
      for (int b = 0; b < 8; ++b) values[byte][b] = rng::rademacher<T>(static_cast<uint64_t>(byte), b, scale);
    }
  }
};

// One row of Gaussian entries, columns first_col .. first_col + cols (first_col even, cols <= kColBlock).
// Two passes: the 64-bit draws split into their two 24-bit fields (the mixing has no SSE form), then the
// Box-Muller math on those arrays, branch-free in rng.h, so for float32 this loop vectorises (it writes
// each pair straight into the row; measured as fast as staging the pairs in temporaries).
template <typename T>
inline void gaussian_row_body(T* dst, int64_t cols, uint64_t key, int64_t first_col, T scale) {
  uint32_t field1[kColBlock / 2], field2[kColBlock / 2];
  const int64_t pairs = (cols + 1) / 2;
  const uint64_t first_pair = static_cast<uint64_t>(first_col / 2);
  for (int64_t m = 0; m < pairs; ++m) {
    const uint64_t bits = rng::draw(key, first_pair + static_cast<uint64_t>(m));
    field1[m] = rng::gaussian_field1(bits);
    field2[m] = rng::gaussian_field2(bits);
  }
  for (int64_t m = 0; m < cols / 2; ++m) {
    rng::gaussian_pair_fields(field1[m], field2[m], scale, dst + 2 * m, dst + 2 * m + 1);
  }
  if (cols % 2 == 1) {  // the last column takes the first value of its pair
    T unused;
    rng::gaussian_pair_fields(field1[pairs - 1], field2[pairs - 1], scale, dst + cols - 1, &unused);
  }
}

// float32 rows also get an AVX2 clone, picked at load time where the CPU has AVX2 (the extension is
// built for baseline x86-64): both loops vectorise 8 wide there, about 2.5x faster than SSE2. AVX2
// without FMA: no contraction, so both clones give bit-identical values.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void gaussian_row_f32(float* dst, int64_t cols, uint64_t key, int64_t first_col, float scale) {
  gaussian_row_body<float>(dst, cols, key, first_col, scale);
}

template <typename T>
void gaussian_row(T* dst, int64_t cols, uint64_t key, int64_t first_col, T scale) {
  if constexpr (std::is_same_v<T, float>) {
    gaussian_row_f32(dst, cols, key, first_col, scale);
  } else {
    gaussian_row_body<T>(dst, cols, key, first_col, scale);
  }
}

// Fills rows [0, rows) x cols [0, cols) of buf (leading dimension ld) with Omega's entries for
// feature rows first_row.. and columns first_col.. (first_col a multiple of 64).
template <typename T>
void fill_omega(T* buf, int64_t ld, int64_t rows, int64_t cols, uint64_t first_row, int64_t first_col,
                uint64_t seed, int dist, T scale, const RademacherTable<T>& table) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = buf + r * ld;
    if (dist == rng::kRademacher) {
      const uint64_t key = rng::row_key(seed, first_row + static_cast<uint64_t>(r), 0);
      for (int64_t w = 0; w * 64 < cols; ++w) {
        const uint64_t bits = rng::draw(key, static_cast<uint64_t>(first_col / 64 + w));
        const int64_t n = std::min<int64_t>(64, cols - w * 64);
        T* out = dst + w * 64;
        if (n == 64) {
          for (int byte = 0; byte < 8; ++byte) {
            std::memcpy(out + 8 * byte, table.values[(bits >> (8 * byte)) & 0xFF], 8 * sizeof(T));
          }
        } else {
          for (int64_t b = 0; b < n; ++b) out[b] = rng::rademacher<T>(bits, static_cast<int>(b), scale);
        }
      }
    } else {
      gaussian_row<T>(dst, cols, rng::row_key(seed, first_row + static_cast<uint64_t>(r), rng::kSaltGaussian),
                      first_col, scale);
    }
  }
}

at::Tensor jl_project_cpu(const at::Tensor& x_in, int64_t k, int64_t seed, c10::string_view dist_name,
                          int64_t offset) {
  check_jl_inputs(x_in, k, seed, dist_name, offset);
  const auto x = x_in.contiguous();
  const int64_t N = x.size(0), p = x.size(1);
  auto out = at::zeros({N, k}, x.options());
  if (N == 0 || p == 0) return out;
  const int dist = dist_name == "rademacher" ? rng::kRademacher : rng::kGaussian;

  const int64_t col_blocks = (k + kColBlock - 1) / kColBlock;
  const int64_t threads = at::get_num_threads();
  const int64_t row_tiles = (p + kRowTile - 1) / kRowTile;
  const int64_t splits = col_blocks >= threads ? 1 : std::min(row_tiles, (threads + col_blocks - 1) / col_blocks);
  const int64_t tiles_per_split = (row_tiles + splits - 1) / splits;
  std::vector<at::Tensor> partial(static_cast<size_t>(splits));
  partial[0] = out;
  for (int64_t s = 1; s < splits; ++s) partial[static_cast<size_t>(s)] = at::zeros({N, k}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jl_project_cpu", [&] {
    // Rounded once from double, as the reference does, so Rademacher entries match it exactly.
    const auto scale = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(k)));
    const RademacherTable<scalar_t> table(scale);
    // One task per work item, but no parallel region at all for tiny inputs (opening one costs a
    // scheduler slice on a busy machine): below ~1 MFLOP per item run serially.
    const int64_t grain = 2 * N * p * std::min(k, kColBlock) / splits >= (int64_t(1) << 20) ? 1 : col_blocks * splits;
    at::parallel_for(0, col_blocks * splits, grain, [&](int64_t i0, int64_t i1) {
      auto tile = at::empty({kRowTile, kColBlock}, x.options());
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t block = item / splits, split = item % splits;
        const int64_t col0 = block * kColBlock, cols = std::min(kColBlock, k - col0);
        auto out_cols = partial[static_cast<size_t>(split)].narrow(1, col0, cols);
        const int64_t row_begin = split * tiles_per_split * kRowTile;
        const int64_t row_end = std::min(p, row_begin + tiles_per_split * kRowTile);
        for (int64_t row0 = row_begin; row0 < row_end; row0 += kRowTile) {
          const int64_t rows = std::min(kRowTile, row_end - row0);
          fill_omega<scalar_t>(tile.mutable_data_ptr<scalar_t>(), kColBlock, rows, cols,
                               static_cast<uint64_t>(offset + row0), col0, static_cast<uint64_t>(seed), dist, scale,
                               table);
          out_cols.addmm_(x.narrow(1, row0, rows), tile.narrow(0, 0, rows).narrow(1, 0, cols));
        }
      }
    });
  });
  for (int64_t s = 1; s < splits; ++s) out.add_(partial[static_cast<size_t>(s)]);
  return out;
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CPU, m) { m.impl("jl_project", &deltainf::jl_project_cpu); }
