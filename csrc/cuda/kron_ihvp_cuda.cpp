// CUDA entry point of the Kronecker iHVP: the GEMM layout shared with the CPU (kron_ihvp_layout.h),
// cuBLAS through ATen, and our damped-division kernel (kron_ihvp_kernel.cu, math in vote.h).
// float16/bfloat16 inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "deltainf/checks.h"
#include "deltainf/kron_ihvp_layout.h"
#include "launchers.h"

namespace deltainf {
namespace {

at::Tensor kron_ihvp_cuda(const at::Tensor& G_in, const at::Tensor& Q_S_in, const at::Tensor& Q_A_in,
                          const at::Tensor& lam_in, double damping, bool eigenbasis) {
  check_ihvp_inputs(G_in, Q_S_in, Q_A_in, lam_in, damping);
  const c10::cuda::CUDAGuard guard(G_in.device());
  const auto dt = acc_dtype(G_in.scalar_type());
  const int64_t B = G_in.size(0), d_out = G_in.size(1), d_in = G_in.size(2);
  if (G_in.numel() == 0) return at::empty({B, d_out, d_in}, G_in.options().dtype(dt));
  const auto Q_S = Q_S_in.to(dt).contiguous(), Q_A = Q_A_in.to(dt).contiguous(), lam = lam_in.to(dt).contiguous();

  auto rotated = rotate_into_eigenbasis(G_in.to(dt), Q_S, Q_A);  // rows (o, b), columns i
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (dt == at::kDouble) {
    cuda::launch_damped_inverse<double>(rotated.mutable_data_ptr<double>(), lam.const_data_ptr<double>(), d_out, B,
                                        d_in, damping, stream);
  } else {
    cuda::launch_damped_inverse<float>(rotated.mutable_data_ptr<float>(), lam.const_data_ptr<float>(), d_out, B, d_in,
                                       static_cast<float>(damping), stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return finish_ihvp(rotated, Q_S, Q_A, B, eigenbasis);
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CUDA, m) { m.impl("kron_ihvp", &deltainf::kron_ihvp_cuda); }
