// CPU kernel of the Kronecker eigenbasis inverse-Hessian product
//   H^-1 G = Q_S [ (Q_S^T G Q_A) / (lam + damping) ] Q_A^T, batched over B query gradients.
// GEMM layout in kron_ihvp_layout.h; the damped division runs here with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "deltainf/checks.h"
#include "deltainf/kron_ihvp_layout.h"
#include "deltainf/vote.h"

namespace deltainf {
namespace {

at::Tensor kron_ihvp_cpu(const at::Tensor& G_in, const at::Tensor& Q_S_in, const at::Tensor& Q_A_in,
                         const at::Tensor& lam_in, double damping, bool eigenbasis) {
  check_ihvp_inputs(G_in, Q_S_in, Q_A_in, lam_in, damping);
  const int64_t B = G_in.size(0), d_out = G_in.size(1), d_in = G_in.size(2);
  if (G_in.numel() == 0) return at::empty({B, d_out, d_in}, G_in.options());
  const auto Q_S = Q_S_in.contiguous(), Q_A = Q_A_in.contiguous(), lam = lam_in.contiguous();

  auto rotated = rotate_into_eigenbasis(G_in, Q_S, Q_A);  // rows (o, b), columns i

  AT_DISPATCH_FLOATING_TYPES(rotated.scalar_type(), "kron_ihvp_cpu", [&] {
    scalar_t* data = rotated.mutable_data_ptr<scalar_t>();
    const scalar_t* eig = lam.const_data_ptr<scalar_t>();
    const auto damp = static_cast<scalar_t>(damping);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(d_in, 1));
    at::parallel_for(0, d_out * B, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = data + r * d_in;
        const scalar_t* eig_row = eig + (r / B) * d_in;
        for (int64_t i = 0; i < d_in; ++i) row[i] = damped_inverse<scalar_t>(row[i], eig_row[i], damp);
      }
    });
  });

  return finish_ihvp(rotated, Q_S, Q_A, B, eigenbasis);
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CPU, m) { m.impl("kron_ihvp", &deltainf::kron_ihvp_cpu); }
