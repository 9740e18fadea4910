// CUDA entry points of the sign vote and the flag combination (kernels in sign_vote_kernel.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>

#include "deltainf/checks.h"
#include "launchers.h"

namespace deltainf {
namespace {

template <typename T>
void vote(const at::Tensor& base, const at::Tensor& transformed, double threshold, int64_t min_votes, at::Tensor& votes,
          at::Tensor& flags, cudaStream_t stream) {
  // at::Half / at::BFloat16 share their bit layout with __half / __nv_bfloat16.
  cuda::launch_sign_vote<T>(reinterpret_cast<const T*>(base.const_data_ptr()),
                            reinterpret_cast<const T*>(transformed.const_data_ptr()), base.size(0),
                            transformed.size(1), base.size(1), threshold, min_votes,
                            votes.mutable_data_ptr<int32_t>(), flags.mutable_data_ptr<bool>(), stream);
}

std::tuple<at::Tensor, at::Tensor> sign_vote_cuda(const at::Tensor& base_in, const at::Tensor& transformed_in,
                                                  double threshold, int64_t min_votes) {
  check_vote_inputs(base_in, transformed_in, threshold, min_votes);
  const c10::cuda::CUDAGuard guard(base_in.device());
  const auto base = base_in.contiguous(), transformed = transformed_in.contiguous();
  auto votes = at::empty(base.sizes(), base.options().dtype(at::kInt));
  auto flags = at::empty(base.sizes(), base.options().dtype(at::kBool));
  if (base.numel() == 0) return {votes, flags};
  const auto stream = at::cuda::getCurrentCUDAStream();
  switch (base.scalar_type()) {
    case at::kFloat: vote<float>(base, transformed, threshold, min_votes, votes, flags, stream); break;
    case at::kDouble: vote<double>(base, transformed, threshold, min_votes, votes, flags, stream); break;
    case at::kHalf: vote<__half>(base, transformed, threshold, min_votes, votes, flags, stream); break;
    case at::kBFloat16: vote<__nv_bfloat16>(base, transformed, threshold, min_votes, votes, flags, stream); break;
    default: TORCH_CHECK_TYPE(false, "sign_vote: unsupported dtype ", base.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {votes, flags};
}

at::Tensor combine_flags_cuda(const at::Tensor& flags_in, int64_t min_points) {
  check_combine_inputs(flags_in, min_points);
  const c10::cuda::CUDAGuard guard(flags_in.device());
  const auto flags = flags_in.contiguous();
  auto out = at::empty({flags.size(1)}, flags.options());
  if (out.numel() == 0) return out;
  cuda::launch_combine_flags(bool_bytes(flags), flags.size(0), flags.size(1), min_points,
                             out.mutable_data_ptr<bool>(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CUDA, m) {
  m.impl("sign_vote", &deltainf::sign_vote_cuda);
  m.impl("combine_flags", &deltainf::combine_flags_cuda);
}
