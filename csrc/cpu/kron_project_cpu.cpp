// CPU kernels of the fused per-example gradient projection R_i = sum_t (U^T g_it)(V^T a_it)^T.
//
// Blocks of examples (sized to stay in cache) run in parallel with at::parallel_for; inside a
// parallel region ATen runs nested ops single-threaded, so the per-block GEMMs do not oversubscribe.
// The block algebra is shared with the CUDA entry points (kron_project_blocks.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "deltainf/checks.h"
#include "deltainf/kron_project_blocks.h"

namespace deltainf {
namespace {

constexpr int64_t kBlockBytes = int64_t(2) << 20;
constexpr int64_t kMaxBlock = 1024;
constexpr int64_t kTileBytes = int64_t(1) << 20;  // score temporary per block: stays in L2
// Several positions per example: a tile of R with its query rows (cache-sized), for blocks of at least 32
// examples, so the queries are read once per 32 examples. ResNet-18 layer-4 shapes (T = 16, 512 x 4609,
// 64 examples): see benchmarks/RESULTS.md.
constexpr int64_t kRowsBytes = int64_t(8) << 20;
constexpr int64_t kMinScoreBlock = 32;
// Token rows per projection GEMM (g U, a V) at least: a block reads U and V once, and on a wide layer a
// cache-sized block of one example re-read them per example (ResNet-18's last block: V is 4608 x 4608, 85 MB
// in float32), which made the projections memory-bound. Capped so that every thread still gets a block.
constexpr int64_t kMinProjectionRows = 256;

int64_t min_projection_block(const at::Tensor& a) {
  const int64_t N = a.size(0), T = std::max<int64_t>(a.size(1), 1);
  const int64_t per_thread = (N + at::get_num_threads() - 1) / at::get_num_threads();
  return std::clamp<int64_t>((kMinProjectionRows + T - 1) / T, 1, std::max<int64_t>(per_thread, 1));
}

// Runs fn(first, count) over blocks of examples in parallel.
template <typename Fn>
void for_each_block(int64_t N, int64_t block, const Fn& fn) {
  const int64_t num_blocks = (N + block - 1) / block;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t first = b * block;
      fn(first, std::min(block, N - first));
    }
  });
}

// The block loop as a value, for the shared epilogues in kron_project_blocks.h.
const auto kBlockLoop = [](int64_t N, int64_t block, const auto& fn) { for_each_block(N, block, fn); };

template <typename scalar_t>
void square_accumulate(const scalar_t* R, int64_t rows, int64_t cols, scalar_t* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = R + r * cols;
    for (int64_t c = 0; c < cols; ++c) acc[c] += row[c] * row[c];
  }
}

at::Tensor kron_project_cpu(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& U_in,
                            const at::Tensor& V_in) {
  check_kron_project_inputs("kron_project", a_in, g_in, U_in, V_in);
  const auto a = a_in.contiguous(), g = g_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  return project_features(a, g, U, V, kBlockBytes, kMaxBlock, min_projection_block(a), kBlockLoop);
}

at::Tensor kron_project_square_sum_cpu(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& U_in,
                                       const at::Tensor& V_in) {
  check_kron_project_inputs("kron_project_square_sum", a_in, g_in, U_in, V_in);
  const auto a = a_in.contiguous(), g = g_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  const int64_t N = a.size(0), T = a.size(1), r_out = U.size(1), r_in = V.size(1);
  auto out = at::zeros({r_out, r_in}, a.options());
  if (out.numel() == 0 || N == 0 || T == 0) return out;

  // One accumulator per worker thread, summed at the end: no atomics or locks.
  std::vector<at::Tensor> partial(static_cast<size_t>(at::get_num_threads()));
  // A block's projections are formed at once (the bases' reuse); its R_i a cache-sized step of examples at a time.
  const int64_t step = examples_per_block(a, g, r_out, r_in, T == 1 ? 0 : r_out * r_in, kBlockBytes, kMaxBlock);
  const int64_t block = std::max(step, min_projection_block(a));
  for_each_block(N, block, [&](int64_t first, int64_t count) {
    auto& acc = partial[static_cast<size_t>(at::get_thread_num())];
    if (!acc.defined()) acc = at::zeros({r_out, r_in}, a.options());
    const Projected p = project_block(a, g, U, V, first, count);
    if (T == 1) {
      accumulate_square_outer(p, acc);
      return;
    }
    auto R = at::empty({std::min(step, count), r_out, r_in}, a.options());
    for (int64_t s = 0; s < count; s += step) {
      const int64_t c = std::min(step, count - s);
      auto R_step = R.narrow(0, 0, c);
      form_block({p.gp.narrow(0, s, c), p.ap.narrow(0, s, c)}, R_step);
      AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "kron_project_square_sum_cpu", [&] {
        square_accumulate<scalar_t>(R_step.const_data_ptr<scalar_t>(), c, r_out * r_in,
                                    acc.mutable_data_ptr<scalar_t>());
      });
    }
  });
  for (const auto& acc : partial) {
    if (acc.defined()) out.add_(acc);
  }
  return out;
}

at::Tensor kron_project_score_cpu(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& U_in,
                                  const at::Tensor& V_in, const at::Tensor& P_in) {
  check_kron_project_inputs("kron_project_score", a_in, g_in, U_in, V_in);
  check_score_queries("kron_project_score", P_in, a_in, U_in, V_in);
  const auto a = a_in.contiguous(), g = g_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  const auto P = P_in.contiguous();
  return project_scores(a, g, U, V, P, kBlockBytes, kMaxBlock, kTileBytes, kRowsBytes, kMinScoreBlock, kBlockLoop);
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CPU, m) {
  m.impl("kron_project", &deltainf::kron_project_cpu);
  m.impl("kron_project_square_sum", &deltainf::kron_project_square_sum_cpu);
  m.impl("kron_project_score", &deltainf::kron_project_score_cpu);
}
