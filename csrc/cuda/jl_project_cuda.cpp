// CUDA entry point of the JL projection: Omega is generated tile by tile on the device by our
// kernel (jl_project_kernel.cu) and multiplied in with cuBLAS, so only one tile is ever stored.
// float16/bfloat16 inputs are cast to float32 one feature tile at a time; accumulation is float32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "deltainf/checks.h"
#include "deltainf/rng.h"
#include "launchers.h"

namespace deltainf {
namespace {

constexpr int64_t kTileElements = int64_t(16) << 20;  // 64 MiB of float32 Omega per tile

at::Tensor jl_project_cuda(const at::Tensor& x_in, int64_t k, int64_t seed, c10::string_view dist_name,
                           int64_t offset) {
  check_jl_inputs(x_in, k, seed, dist_name, offset);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto dt = acc_dtype(x.scalar_type());
  const int64_t N = x.size(0), p = x.size(1);
  auto out = at::zeros({N, k}, x.options().dtype(dt));
  if (N == 0 || p == 0) return out;
  const int dist = dist_name == "rademacher" ? rng::kRademacher : rng::kGaussian;
  const int64_t tile_rows = std::min<int64_t>(p, std::max<int64_t>(kTileElements / k, 64));  // clamp needs 64 <= p
  auto tile = at::empty({tile_rows, k}, out.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t row0 = 0; row0 < p; row0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, p - row0);
    if (dt == at::kDouble) {
      cuda::launch_fill_omega<double>(tile.mutable_data_ptr<double>(), k, rows, k, static_cast<uint64_t>(offset + row0),
                                      0, static_cast<uint64_t>(seed), dist, 1.0 / std::sqrt(static_cast<double>(k)),
                                      stream);
    } else {
      cuda::launch_fill_omega<float>(tile.mutable_data_ptr<float>(), k, rows, k, static_cast<uint64_t>(offset + row0),
                                     0, static_cast<uint64_t>(seed), dist, static_cast<float>(1.0 / std::sqrt(static_cast<double>(k))),
                                     stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out.addmm_(x.narrow(1, row0, rows).to(dt), tile.narrow(0, 0, rows));
  }
  return out;
}

}  // namespace
}  // namespace deltainf

TORCH_LIBRARY_IMPL(deltainf, CUDA, m) { m.impl("jl_project", &deltainf::jl_project_cuda); }
