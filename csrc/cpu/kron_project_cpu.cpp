// CPU kernels of the fused per-example gradient projection R_i = sum_t (U^T g_it)(V^T a_it)^T.
//
// Examples are processed in blocks sized to stay in cache; blocks run in parallel (at::parallel_for)
// and each block's work is two GEMMs (project g and a) plus the epilogue, so no N x d_out x d_in
// per-example gradient and no N x r_out x r_in tensor is formed by the square-sum and score epilogues.
// Inside at::parallel_for ATen runs nested ops single-threaded, so GEMMs do not oversubscribe.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "deltainf/checks.h"

namespace deltainf {
namespace {

constexpr int64_t kBlockBytes = int64_t(2) << 20;  // working set of one block
constexpr int64_t kMaxBlock = 1024;

// `scratch` is the epilogue's temporary per example (elements), e.g. r_out * r_in for a block of R.
int64_t examples_per_block(const at::Tensor& a, const at::Tensor& g, int64_t r_out, int64_t r_in, int64_t scratch) {
  const int64_t T = a.size(1);
  const int64_t per_example =
      (T * (a.size(2) + g.size(2) + r_out + r_in) + scratch) * static_cast<int64_t>(a.element_size());
  return std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(per_example, 1), 1, kMaxBlock);
}

struct Projected {
  at::Tensor gp;  // (B, T, r_out) = g_block U
  at::Tensor ap;  // (B, T, r_in)  = a_block V
};

Projected project_block(const at::Tensor& a, const at::Tensor& g, const at::Tensor& U, const at::Tensor& V,
                        int64_t first, int64_t count) {
  return {at::matmul(g.narrow(0, first, count), U), at::matmul(a.narrow(0, first, count), V)};
}

// R_block (B, r_out, r_in) = gp^T ap per example. With one position (T == 1, plain linear layers)
// it is an outer product, which a broadcast multiply does faster than a batched GEMM with k = 1.
void form_block(const Projected& p, at::Tensor& R) {
  if (p.gp.size(1) == 1) {
    at::mul_out(R, p.gp.transpose(1, 2), p.ap);
  } else {
    at::bmm_out(R, p.gp.transpose(1, 2), p.ap);
  }
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
  const int64_t N = a.size(0), r_out = U.size(1), r_in = V.size(1);
  auto R = at::empty({N, r_out, r_in}, a.options());
  if (R.numel() == 0) return R;
  if (a.size(1) == 0) return R.zero_();
  for_each_block(N, examples_per_block(a, g, r_out, r_in, 0), [&](int64_t first, int64_t count) {
    auto block = R.narrow(0, first, count);
    form_block(project_block(a, g, U, V, first, count), block);
  });
  return R;
}

at::Tensor kron_project_square_sum_cpu(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& U_in,
                                       const at::Tensor& V_in) {
  check_kron_project_inputs("kron_project_square_sum", a_in, g_in, U_in, V_in);
  const auto a = a_in.contiguous(), g = g_in.contiguous(), U = U_in.contiguous(), V = V_in.contiguous();
  const int64_t N = a.size(0), T = a.size(1), r_out = U.size(1), r_in = V.size(1);
  auto out = at::zeros({r_out, r_in}, a.options());
  if (out.numel() == 0 || N == 0 || T == 0) return out;

  // One accumulator per worker thread, summed at the end: no atomics, deterministic per thread count.
  std::vector<at::Tensor> partial(static_cast<size_t>(at::get_num_threads()));
  const int64_t scratch = T == 1 ? 0 : r_out * r_in;
  for_each_block(N, examples_per_block(a, g, r_out, r_in, scratch), [&](int64_t first, int64_t count) {
    auto& acc = partial[static_cast<size_t>(at::get_thread_num())];
    if (!acc.defined()) acc = at::zeros({r_out, r_in}, a.options());
    const Projected p = project_block(a, g, U, V, first, count);
    if (T == 1) {
      // sum_i (gp_i gp_i) outer (ap_i ap_i): the elementwise square of an outer product is the outer
      // product of squares, so the whole epilogue is one GEMM of the squared projections.
      acc.addmm_(p.gp.squeeze(1).square().t(), p.ap.squeeze(1).square());
      return;
    }
    auto R = at::empty({count, r_out, r_in}, a.options());
    form_block(p, R);
    AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "kron_project_square_sum_cpu", [&] {
      square_accumulate<scalar_t>(R.const_data_ptr<scalar_t>(), count, r_out * r_in, acc.mutable_data_ptr<scalar_t>());
    });
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
  const int64_t N = a.size(0), T = a.size(1), r_out = U.size(1), r_in = V.size(1), Q = P.size(0);
  auto S = at::empty({N, Q}, a.options());
  if (S.numel() == 0) return S;
  if (T == 0 || r_out == 0 || r_in == 0) return S.zero_();

  if (T == 1) {
    // S_iq = gp_i^T P_q ap_i. Contract the wider rank with one GEMM against P laid out as
    // (r_wide, Q * r_narrow), then a batched dot over the narrow rank. R_i is never formed, and the
    // temporary is Q * min(r_out, r_in) per example.
    const bool contract_out = r_out >= r_in;
    const int64_t r_narrow = contract_out ? r_in : r_out;
    const auto P_wide = contract_out ? P.permute({1, 0, 2}).reshape({r_out, Q * r_in}).contiguous()
                                     : P.permute({2, 0, 1}).reshape({r_in, Q * r_out}).contiguous();
    for_each_block(N, examples_per_block(a, g, r_out, r_in, Q * r_narrow), [&](int64_t first, int64_t count) {
      const Projected p = project_block(a, g, U, V, first, count);
      const auto& wide = contract_out ? p.gp : p.ap;
      const auto& narrow = contract_out ? p.ap : p.gp;
      const auto Y = at::mm(wide.squeeze(1), P_wide).view({count, Q, r_narrow});
      auto S_block = S.narrow(0, first, count).unsqueeze(2);
      at::bmm_out(S_block, Y, narrow.transpose(1, 2));
    });
    return S;
  }
  const auto P_flat_t = P.view({Q, r_out * r_in}).t();
  for_each_block(N, examples_per_block(a, g, r_out, r_in, r_out * r_in + Q), [&](int64_t first, int64_t count) {
    auto R = at::empty({count, r_out, r_in}, a.options());
    form_block(project_block(a, g, U, V, first, count), R);
    auto S_block = S.narrow(0, first, count);
    at::mm_out(S_block, R.view({count, r_out * r_in}), P_flat_t);
  });
  return S;
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CPU, m) {
  m.impl("kron_project", &deltainf::kron_project_cpu);
  m.impl("kron_project_square_sum", &deltainf::kron_project_square_sum_cpu);
  m.impl("kron_project_score", &deltainf::kron_project_score_cpu);
}
