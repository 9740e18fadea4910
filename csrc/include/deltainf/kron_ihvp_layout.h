// Host-side GEMM layout of the Kronecker iHVP, shared by the CPU and CUDA entry points.
//
// The batch is laid out as one (d_out, B * d_in) matrix so each of the four products is a single
// large GEMM (torch's: MKL/OpenBLAS or cuBLAS); only two memory-bound permutes and the backend's
// elementwise damped division sit outside GEMMs.
#pragma once

#include <ATen/ATen.h>

namespace deltainf {

// Q_S^T G_b Q_A for every b, as a (d_out * B, d_in) matrix whose row (o, b) is row o of block b.
inline at::Tensor rotate_into_eigenbasis(const at::Tensor& G, const at::Tensor& Q_S, const at::Tensor& Q_A) {
  const int64_t B = G.size(0), d_out = G.size(1), d_in = G.size(2);
  const auto G_wide = G.permute({1, 0, 2}).reshape({d_out, B * d_in});
  return at::mm(Q_S.t(), G_wide).view({d_out * B, d_in}).mm(Q_A);
}

// From the scaled eigenbasis form back to (B, d_out, d_in): either as is (eigenbasis=true) or rotated
// back, Q_S [.] Q_A^T.
inline at::Tensor finish_ihvp(const at::Tensor& scaled, const at::Tensor& Q_S, const at::Tensor& Q_A, int64_t B,
                              bool eigenbasis) {
  const int64_t d_out = Q_S.size(0), d_in = Q_A.size(0);
  at::Tensor result;
  if (eigenbasis) {
    result = scaled.view({d_out, B, d_in});
  } else {
    const auto back = at::mm(Q_S, scaled.view({d_out, B * d_in}));
    result = back.view({d_out * B, d_in}).mm(Q_A.t()).view({d_out, B, d_in});
  }
  return result.permute({1, 0, 2}).contiguous();
}

}  // namespace deltainf
