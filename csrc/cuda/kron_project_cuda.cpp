// CUDA entry points of the fused projection. The GEMMs go to cuBLAS through ATen (fp32 accumulation;
// float16/bfloat16 inputs are cast to float32 one block at a time), the square-sum epilogue of
// multi-position blocks runs in our kernel (kron_ihvp_kernel.cu); the block algebra is shared with the
// CPU path (kron_project_blocks.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "deltainf/checks.h"
#include "deltainf/kron_project_blocks.h"
#include "launchers.h"

namespace deltainf {
namespace {

constexpr int64_t kBlockBytes = int64_t(256) << 20;  // a GPU block is large enough to fill the device
constexpr int64_t kMaxBlock = 1 << 16;
constexpr int64_t kTileBytes = int64_t(64) << 20;

// Blocks run one after another on the current stream; each block is large enough to fill the GPU.
template <typename Fn>
void for_each_block(int64_t N, int64_t block, const Fn& fn) {
  for (int64_t first = 0; first < N; first += block) fn(first, std::min(block, N - first));
}

// The block loop as a value, for the shared epilogues in kron_project_blocks.h.
const auto kBlockLoop = [](int64_t N, int64_t block, const auto& fn) { for_each_block(N, block, fn); };

// Bases in the accumulation dtype; a and g are cast block by block in project_block.
at::Tensor acc_basis(const at::Tensor& t) { return t.to(acc_dtype(t.scalar_type())).contiguous(); }

at::Tensor kron_project_cuda(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& U_in,
                             const at::Tensor& V_in) {
  check_kron_project_inputs("kron_project", a_in, g_in, U_in, V_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), g = g_in.contiguous(), U = acc_basis(U_in), V = acc_basis(V_in);
  return project_features(a, g, U, V, kBlockBytes, kMaxBlock, 1, kBlockLoop);
}

at::Tensor kron_project_square_sum_cuda(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& U_in,
                                        const at::Tensor& V_in) {
  check_kron_project_inputs("kron_project_square_sum", a_in, g_in, U_in, V_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), g = g_in.contiguous(), U = acc_basis(U_in), V = acc_basis(V_in);
  const int64_t N = a.size(0), T = a.size(1), r_out = U.size(1), r_in = V.size(1);
  auto acc = at::zeros({r_out, r_in}, U.options());
  if (acc.numel() == 0 || N == 0 || T == 0) return acc;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t block = examples_per_block(a, g, r_out, r_in, T == 1 ? 0 : r_out * r_in, kBlockBytes, kMaxBlock);
  for_each_block(N, block, [&](int64_t first, int64_t count) {
    const Projected p = project_block(a, g, U, V, first, count);
    if (T == 1) {
      accumulate_square_outer(p, acc);
      return;
    }
    auto R = at::empty({count, r_out, r_in}, U.options());
    form_block(p, R);
    if (R.scalar_type() == at::kDouble) {
      cuda::launch_square_accumulate<double>(R.const_data_ptr<double>(), count, r_out * r_in,
                                             acc.mutable_data_ptr<double>(), stream);
    } else {
      cuda::launch_square_accumulate<float>(R.const_data_ptr<float>(), count, r_out * r_in,
                                            acc.mutable_data_ptr<float>(), stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return acc;
}

at::Tensor kron_project_score_cuda(const at::Tensor& a_in, const at::Tensor& g_in, const at::Tensor& U_in,
                                   const at::Tensor& V_in, const at::Tensor& P_in) {
  check_kron_project_inputs("kron_project_score", a_in, g_in, U_in, V_in);
  check_score_queries("kron_project_score", P_in, a_in, U_in, V_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), g = g_in.contiguous(), U = acc_basis(U_in), V = acc_basis(V_in);
  const auto P = acc_basis(P_in);
  // A tile of R with its query rows gets the whole block budget: on a GPU the block is already large.
  return project_scores(a, g, U, V, P, kBlockBytes, kMaxBlock, kTileBytes, kBlockBytes, 1, kBlockLoop);
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CUDA, m) {
  m.impl("kron_project", &deltainf::kron_project_cuda);
  m.impl("kron_project_square_sum", &deltainf::kron_project_square_sum_cuda);
  m.impl("kron_project_score", &deltainf::kron_project_score_cuda);
}
