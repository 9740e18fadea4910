// CUDA kernels of the batched sign vote and of the combination across affected test points.
//
// One thread per (test point, training example); it walks the n transformed scores of its example,
// and consecutive threads read consecutive examples, so every read is coalesced and each score is
// read exactly once. The vote predicate is the one the CPU uses (vote.h).
#include "common.cuh"
#include "deltainf/vote.h"
#include "launchers.h"

namespace deltainf {
namespace cuda {
namespace {

template <typename T>
__global__ void sign_vote_kernel(const T* __restrict__ base, const T* __restrict__ transformed, int64_t n, int64_t N,
                                 int64_t total, typename Acc<T>::type threshold, int64_t min_votes,
                                 int32_t* __restrict__ votes, bool* __restrict__ flags) {
  using acc_t = typename Acc<T>::type;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e / N, i = e % N;
    const acc_t b = to_acc(base[e]);
    const T* column = transformed + p * n * N + i;
    int32_t count = 0;
    for (int64_t j = 0; j < n; ++j) count += collapse_vote<acc_t>(to_acc(column[j * N]), b, threshold);
    votes[e] = count;
    flags[e] = count >= min_votes;
  }
}

__global__ void combine_flags_kernel(const uint8_t* __restrict__ flags, int64_t P, int64_t N, int64_t min_points,
                                     bool* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t count = 0;
    for (int64_t p = 0; p < P; ++p) count += flags[p * N + i] != 0;
    out[i] = count >= min_points;
  }
}

}  // namespace

template <typename T>
void launch_sign_vote(const T* base, const T* transformed, int64_t P, int64_t n, int64_t N, double threshold,
                      int64_t min_votes, int32_t* votes, bool* flags, cudaStream_t stream) {
  const int64_t total = P * N;
  if (total == 0) return;
  using acc_t = typename Acc<T>::type;
  sign_vote_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(base, transformed, n, N, total,
                                                                  static_cast<acc_t>(threshold), min_votes, votes, flags);
}

void launch_combine_flags(const uint8_t* flags, int64_t P, int64_t N, int64_t min_points, bool* out, cudaStream_t stream) {
  if (N == 0) return;
  combine_flags_kernel<<<grid_for(N), kThreads, 0, stream>>>(flags, P, N, min_points, out);
}

template void launch_sign_vote<float>(const float*, const float*, int64_t, int64_t, int64_t, double, int64_t, int32_t*,
                                      bool*, cudaStream_t);
template void launch_sign_vote<double>(const double*, const double*, int64_t, int64_t, int64_t, double, int64_t,
                                       int32_t*, bool*, cudaStream_t);
template void launch_sign_vote<__half>(const __half*, const __half*, int64_t, int64_t, int64_t, double, int64_t,
                                       int32_t*, bool*, cudaStream_t);
template void launch_sign_vote<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, int64_t, int64_t, int64_t,
                                              double, int64_t, int32_t*, bool*, cudaStream_t);

}  // namespace cuda
}  // namespace deltainf
