// CPU kernel of the batched sign vote: votes[p, i] = #{ j : transformed[p, j, i] - base[p, i] < threshold }.
//
// Memory-bound: each score is read exactly once, streaming the rows of `transformed` while a
// chunk of per-example counters stays in L1; no (n x N) difference tensor is formed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "deltainf/checks.h"
#include "deltainf/vote.h"

namespace deltainf {
namespace {

constexpr int64_t kChunk = 4096;  // 16 KiB of counters: they stay in L1 while the rows stream past
constexpr int64_t kRowsPerPass = 8;  // rows summed in registers before one counter update

std::tuple<at::Tensor, at::Tensor> sign_vote_cpu(const at::Tensor& base_in, const at::Tensor& transformed_in,
                                                 double threshold, int64_t min_votes) {
  check_vote_inputs(base_in, transformed_in, threshold, min_votes);
  const auto base = base_in.contiguous(), transformed = transformed_in.contiguous();
  const int64_t P = base.size(0), N = base.size(1), n = transformed.size(1);
  auto votes = at::zeros({P, N}, base.options().dtype(at::kInt));
  // Votes never exceed n; clamping keeps the int32 comparison exact for any int64 min_votes.
  const int64_t min_votes_clamped = std::min<int64_t>(min_votes, n + 1);
  if (P == 0 || N == 0) return {votes, votes.ge(min_votes_clamped)};

  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "sign_vote_cpu", [&] {
    const scalar_t* b = base.const_data_ptr<scalar_t>();
    const scalar_t* t = transformed.const_data_ptr<scalar_t>();
    int32_t* v = votes.mutable_data_ptr<int32_t>();
    const auto thr = static_cast<scalar_t>(threshold);
    const int64_t chunks = (N + kChunk - 1) / kChunk;
    // About 32K scores per task, as torch's own elementwise grain: small votes stay serial.
    const int64_t scores_per_chunk = std::min(kChunk, N) * std::max<int64_t>(n, 1);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / scores_per_chunk);
    at::parallel_for(0, P * chunks, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t p = c / chunks, i0 = (c % chunks) * kChunk, len = std::min(kChunk, N - i0);
        const scalar_t* base_row = b + p * N + i0;
        int32_t* count = v + p * N + i0;
        const scalar_t* rows = t + p * n * N + i0;
        int64_t j = 0;
        for (; j + kRowsPerPass <= n; j += kRowsPerPass) {
          const scalar_t* block = rows + j * N;
          for (int64_t i = 0; i < len; ++i) {
            int32_t sum = 0;
            for (int64_t u = 0; u < kRowsPerPass; ++u) sum += collapse_vote<scalar_t>(block[u * N + i], base_row[i], thr);
            count[i] += sum;
          }
        }
        for (; j < n; ++j) {
          const scalar_t* row = rows + j * N;
          for (int64_t i = 0; i < len; ++i) count[i] += collapse_vote<scalar_t>(row[i], base_row[i], thr);
        }
      }
    });
  });
  return {votes, votes.ge(min_votes_clamped)};
}

at::Tensor combine_flags_cpu(const at::Tensor& flags_in, int64_t min_points) {
  check_combine_inputs(flags_in, min_points);
  const auto flags = flags_in.contiguous();
  const int64_t P = flags.size(0), N = flags.size(1);
  auto out = at::empty({N}, flags.options());
  const uint8_t* f = bool_bytes(flags);
  bool* o = out.mutable_data_ptr<bool>();
  at::parallel_for(0, N, std::max<int64_t>(4096, (int64_t(1) << 15) / std::max<int64_t>(P, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t count = 0;
      for (int64_t p = 0; p < P; ++p) count += f[p * N + i] != 0;
      o[i] = count >= min_points;
    }
  });
  return out;
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CPU, m) {
  m.impl("sign_vote", &deltainf::sign_vote_cpu);
  m.impl("combine_flags", &deltainf::combine_flags_cpu);
}
