// Named argument checks shared by the CPU and CUDA entry points (host code only).
// Every message names the op and the argument and prints what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace deltainf {

inline void check_ndim(const at::Tensor& t, const char* op, const char* name, int64_t ndim) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": expected ", name, " to be a ", ndim, "-d tensor, got ", t.dim(),
                    "-d with shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* op, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must equal ", what, " = ",
                    expected, ", got ", t.size(dim), " (", name, " shape ", t.sizes(), ")");
}

inline bool is_low_precision(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

// CPU kernels take float32/float64; the CUDA kernels also take float16/bfloat16.
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kDouble || (t.is_cuda() && is_low_precision(s));
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must be float32 or float64",
                   (t.is_cuda() ? " (or float16/bfloat16 on CUDA)" : " on CPU (float16/bfloat16 need CUDA)"),
                   ", got ", s);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
                   ref_name, " has dtype ", ref.scalar_type(), "; all floating inputs must share one dtype");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; all inputs must be on one device");
}

// A bool tensor's bytes, read as bytes: a bool made by reinterpreting other data may hold any nonzero
// byte, and reading it through bool* is undefined; callers test `!= 0`.
inline const uint8_t* bool_bytes(const at::Tensor& flags) {
  return reinterpret_cast<const uint8_t*>(flags.const_data_ptr<bool>());
}

// Accumulation / result dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace deltainf

namespace deltainf {

// Shapes of the projection ops: a (N,T,d_in), g (N,T,d_out), U (d_out,r_out), V (d_in,r_in).
inline void check_kron_project_inputs(const char* op, const at::Tensor& a, const at::Tensor& g, const at::Tensor& U,
                                      const at::Tensor& V) {
  check_ndim(a, op, "a", 3);
  check_ndim(g, op, "g", 3);
  check_ndim(U, op, "U", 2);
  check_ndim(V, op, "V", 2);
  check_size(g, op, "g", 0, a.size(0), "a.size(0) (examples N)");
  check_size(g, op, "g", 1, a.size(1), "a.size(1) (positions T)");
  check_size(U, op, "U", 0, g.size(2), "g.size(2) (d_out)");
  check_size(V, op, "V", 0, a.size(2), "a.size(2) (d_in)");
  check_float_dtype(a, op, "a");
  check_same_dtype(g, a, op, "g", "a");
  check_same_dtype(U, a, op, "U", "a");
  check_same_dtype(V, a, op, "V", "a");
  check_same_device(g, a, op, "g", "a");
  check_same_device(U, a, op, "U", "a");
  check_same_device(V, a, op, "V", "a");
}

inline void check_score_queries(const char* op, const at::Tensor& P, const at::Tensor& a, const at::Tensor& U,
                                const at::Tensor& V) {
  check_ndim(P, op, "P", 3);
  check_size(P, op, "P", 1, U.size(1), "U.size(1) (r_out)");
  check_size(P, op, "P", 2, V.size(1), "V.size(1) (r_in)");
  check_same_dtype(P, a, op, "P", "a");
  check_same_device(P, a, op, "P", "a");
}

// A projection to k >= p dimensions already keeps all of x (Omega has rank p), so a k beyond
// max(p, kMaxJLFixedK) can only be a mistake; kMaxJLFixedK leaves room for the fixed projection sizes
// users ask for on small layers (TRAK's are up to ~20K).
constexpr int64_t kMaxJLFixedK = int64_t(1) << 16;

inline void check_jl_inputs(const at::Tensor& x, int64_t k, int64_t seed, c10::string_view dist, int64_t offset) {
  const char* op = "jl_project";
  check_ndim(x, op, "x", 2);
  check_float_dtype(x, op, "x");
  const int64_t p = x.size(1);
  TORCH_CHECK_VALUE(k >= 1, op, ": k (output dimension) must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= std::max(p, kMaxJLFixedK), op, ": k (output dimension) must be at most max(p, ",
                    kMaxJLFixedK, ") = ", std::max(p, kMaxJLFixedK), " for x with p = ", p,
                    " features (k >= p already keeps all of x), got ", k);
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= std::numeric_limits<int64_t>::max() - p, op,
                    ": offset (index of x's first feature) must be in [0, 2**63 - 1 - p] with p = ", p, ", got ",
                    offset);
  TORCH_CHECK_VALUE(dist == "rademacher" || dist == "gaussian", op,
                    ": dist must be 'rademacher' or 'gaussian', got '", std::string(dist), "'");
}

inline void check_ihvp_inputs(const at::Tensor& G, const at::Tensor& Q_S, const at::Tensor& Q_A, const at::Tensor& lam,
                              double damping) {
  const char* op = "kron_ihvp";
  check_ndim(G, op, "G", 3);
  check_ndim(Q_S, op, "Q_S", 2);
  check_ndim(Q_A, op, "Q_A", 2);
  check_ndim(lam, op, "lam", 2);
  check_size(Q_S, op, "Q_S", 0, G.size(1), "G.size(1) (d_out)");
  check_size(Q_S, op, "Q_S", 1, G.size(1), "G.size(1) (d_out)");
  check_size(Q_A, op, "Q_A", 0, G.size(2), "G.size(2) (d_in)");
  check_size(Q_A, op, "Q_A", 1, G.size(2), "G.size(2) (d_in)");
  check_size(lam, op, "lam", 0, G.size(1), "G.size(1) (d_out)");
  check_size(lam, op, "lam", 1, G.size(2), "G.size(2) (d_in)");
  check_float_dtype(G, op, "G");
  check_same_dtype(Q_S, G, op, "Q_S", "G");
  check_same_dtype(Q_A, G, op, "Q_A", "G");
  check_same_dtype(lam, G, op, "lam", "G");
  check_same_device(Q_S, G, op, "Q_S", "G");
  check_same_device(Q_A, G, op, "Q_A", "G");
  check_same_device(lam, G, op, "lam", "G");
  TORCH_CHECK_VALUE(std::isfinite(damping) && damping >= 0, op, ": damping must be a finite number >= 0, got ",
                    damping);
}

inline void check_vote_inputs(const at::Tensor& base, const at::Tensor& transformed, double threshold,
                              int64_t min_votes) {
  const char* op = "sign_vote";
  check_ndim(base, op, "base", 2);
  check_ndim(transformed, op, "transformed", 3);
  check_size(transformed, op, "transformed", 0, base.size(0), "base.size(0) (test points P)");
  check_size(transformed, op, "transformed", 2, base.size(1), "base.size(1) (training examples N)");
  check_float_dtype(base, op, "base");
  check_same_dtype(transformed, base, op, "transformed", "base");
  check_same_device(transformed, base, op, "transformed", "base");
  TORCH_CHECK_VALUE(!std::isnan(threshold), op, ": threshold must be a number, got NaN");
  TORCH_CHECK_VALUE(min_votes >= 0, op, ": min_votes must be >= 0, got ", min_votes);
}

inline void check_combine_inputs(const at::Tensor& flags, int64_t min_points) {
  const char* op = "combine_flags";
  check_ndim(flags, op, "flags", 2);
  TORCH_CHECK_TYPE(flags.scalar_type() == at::kBool, op, ": flags must be a bool tensor, got ", flags.scalar_type());
  TORCH_CHECK_VALUE(flags.size(0) >= 1, op, ": flags must hold at least one test point (P >= 1), got shape ",
                    flags.sizes());
  TORCH_CHECK_VALUE(min_points >= 1 && min_points <= flags.size(0), op, ": min_points must be in [1, P] = [1, ",
                    flags.size(0), "], got ", min_points);
}

}  // namespace deltainf
