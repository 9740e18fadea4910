// Per-element predicates shared by the CPU loops and the CUDA kernels.
#pragma once

#include <cstdint>

#include "deltainf/macros.h"

namespace deltainf {

// One transformation votes for example i when its influence dropped by more than the threshold:
// Delta = transformed - base < threshold. A NaN on either side compares false: it never votes.
template <typename acc_t>
DELTAINF_HOST_DEVICE int32_t collapse_vote(acc_t transformed, acc_t base, acc_t threshold) {
  return (transformed - base) < threshold ? 1 : 0;
}

// Kronecker iHVP in the eigenbasis: divide by the corrected eigenvalue plus damping.
template <typename acc_t>
DELTAINF_HOST_DEVICE acc_t damped_inverse(acc_t rotated, acc_t eigenvalue, acc_t damping) {
  return rotated / (eigenvalue + damping);
}

}  // namespace deltainf
