// Host-side building blocks of the fused projection shared by the CPU and CUDA entry points:
// examples are processed in blocks, each block projected with two GEMMs (torch's GEMM: MKL/OpenBLAS
// on CPU, cuBLAS on CUDA) and then reduced by an epilogue, so per-example d_out x d_in gradients are
// never formed and R is formed one block at a time only where the epilogue needs it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

namespace deltainf {

// Examples per block so that a block's working set stays near `budget_bytes`. `scratch` is the
// epilogue's temporary per example (elements), e.g. r_out * r_in for a block of R.
inline int64_t examples_per_block(const at::Tensor& a, const at::Tensor& g, int64_t r_out, int64_t r_in,
                                  int64_t scratch, int64_t budget_bytes, int64_t max_block) {
  const int64_t T = a.size(1);
  const int64_t per_example = (T * (a.size(2) + g.size(2) + r_out + r_in) + scratch) * 4;
  return std::clamp<int64_t>(budget_bytes / std::max<int64_t>(per_example, 1), 1, max_block);
}

struct Projected {
  at::Tensor gp;  // (B, T, r_out) = g_block U
  at::Tensor ap;  // (B, T, r_in)  = a_block V
};

// Projects examples [first, first + count); inputs are cast to U's dtype (the accumulation dtype).
inline Projected project_block(const at::Tensor& a, const at::Tensor& g, const at::Tensor& U, const at::Tensor& V,
                               int64_t first, int64_t count) {
  const auto dt = U.scalar_type();
  return {at::matmul(g.narrow(0, first, count).to(dt), U), at::matmul(a.narrow(0, first, count).to(dt), V)};
}

// R_block (B, r_out, r_in) = gp^T ap per example. With one position (T == 1, plain linear layers)
// it is an outer product, which a broadcast multiply does faster than a batched GEMM with k = 1.
inline void form_block(const Projected& p, at::Tensor& R) {
  if (p.gp.size(1) == 1) {
    at::mul_out(R, p.gp.transpose(1, 2), p.ap);
  } else {
    at::bmm_out(R, p.gp.transpose(1, 2), p.ap);
  }
}

// One position (T == 1): R_i = gp_i ap_i^T is an outer product, and the epilogues below never form it;
// they square or contract gp_i and ap_i separately. Either factor alone may then overflow (or
// underflow) where R_i is finite (|a| = 1e20, |g| = 1e-20 in float32). Rescaling each example's pair by
// 2^s and 2^-s leaves R_i exactly as it is and brings both factors to the same largest magnitude,
// sqrt(max |R_i|). An all-zero side counts as magnitude 1 (R_i = 0 either way; the other side then
// ends near the square root of its magnitude, whose square stays finite); a non-finite side is left
// unscaled. The projections are fresh per block, so they are rescaled in place.
inline void balance_(const Projected& p) {
  const auto largest = [](const at::Tensor& t) {  // max |t_i| per example, (B, 1, 1); no |t| temporary
    const auto m = at::linalg_vector_norm(t, std::numeric_limits<double>::infinity(), {1, 2}, true);
    return at::log2(m.masked_fill(m == 0, 1));
  };
  const double max_exponent = p.gp.scalar_type() == at::kDouble ? 1022 : 126;  // 2^shift stays finite
  const auto shift = at::nan_to_num((largest(p.ap) - largest(p.gp)) * 0.5, 0, 0, 0).round_();
  const auto scale = at::exp2(shift.clamp_(-max_exponent, max_exponent));
  p.gp.mul_(scale);
  p.ap.div_(scale);
}

// T == 1 square-sum: the elementwise square of an outer product is the outer product of the
// squares, so sum_i R_i * R_i over a block is one GEMM of the squared (balanced) projections.
inline void accumulate_square_outer(const Projected& p, at::Tensor& acc) {
  balance_(p);
  acc.addmm_(p.gp.squeeze(1).square_().t(), p.ap.squeeze(1).square_());
}

// T == 1 score: S_iq = gp_i^T P_q ap_i. The wider rank is contracted by one GEMM against P laid out
// as (r_wide, Q * r_narrow) (see wide_layout), then a batched dot over the narrow rank; R_i is never
// formed and the temporary is Q * min(r_out, r_in) per example.
inline bool contract_out_rank(int64_t r_out, int64_t r_in) { return r_out >= r_in; }

inline at::Tensor wide_layout(const at::Tensor& P) {
  const int64_t Q = P.size(0), r_out = P.size(1), r_in = P.size(2);
  return contract_out_rank(r_out, r_in) ? P.permute({1, 0, 2}).reshape({r_out, Q * r_in}).contiguous()
                                        : P.permute({2, 0, 1}).reshape({r_in, Q * r_out}).contiguous();
}

// Queries are tiled so the temporary Y (count x queries x r_narrow) stays near `tile_bytes`: each
// GEMM then has a full block of examples as its rows while P's columns stream through once.
inline void score_outer_block(const Projected& p, const at::Tensor& P_wide, int64_t Q, at::Tensor S_block,
                              int64_t tile_bytes) {
  balance_(p);
  const bool out_wide = contract_out_rank(p.gp.size(2), p.ap.size(2));
  const auto wide = (out_wide ? p.gp : p.ap).squeeze(1);
  const auto narrow_t = (out_wide ? p.ap : p.gp).transpose(1, 2);  // (count, r_narrow, 1)
  const int64_t count = wide.size(0), r_narrow = narrow_t.size(1);
  const int64_t per_query = std::max<int64_t>(count * r_narrow * static_cast<int64_t>(wide.element_size()), 1);
  const int64_t queries_per_tile = std::clamp<int64_t>(tile_bytes / per_query, 1, Q);
  for (int64_t q0 = 0; q0 < Q; q0 += queries_per_tile) {
    const int64_t nq = std::min(queries_per_tile, Q - q0);
    const auto Y = at::mm(wide, P_wide.narrow(1, q0 * r_narrow, nq * r_narrow)).view({count, nq, r_narrow});
    S_block.narrow(1, q0, nq).copy_(at::bmm(Y, narrow_t).squeeze(2));
  }
}

// T > 1 score: R is formed a tile of eigenbasis rows at a time for the whole block of examples, and each tile
// is contracted at once with the queries' matching rows (a strided view of P, no copy). A tile of R and its
// query rows together stay near `tile_bytes`, so the block of examples need not shrink as the layer grows and
// P is read once per block rather than once per example.
inline int64_t rows_per_tile(int64_t count, int64_t Q, int64_t r_out, int64_t r_in, int64_t element_size,
                             int64_t tile_bytes) {
  const int64_t per_row = std::max<int64_t>((count + Q) * r_in * element_size, 1);
  return std::clamp<int64_t>(tile_bytes / per_row, 1, std::max<int64_t>(r_out, 1));
}

inline void score_full_block(const Projected& p, const at::Tensor& P_flat, at::Tensor S_block, int64_t tile_bytes) {
  const int64_t count = p.gp.size(0), r_out = p.gp.size(2), r_in = p.ap.size(2), Q = P_flat.size(0);
  const int64_t rows = rows_per_tile(count, Q, r_out, r_in, p.gp.element_size(), tile_bytes);
  for (int64_t o0 = 0; o0 < r_out; o0 += rows) {
    const int64_t n = std::min(rows, r_out - o0);
    const auto R = at::bmm(p.gp.narrow(2, o0, n).transpose(1, 2), p.ap).view({count, n * r_in});
    const auto P_rows_t = P_flat.narrow(1, o0 * r_in, n * r_in).t();  // (n r_in, Q), leading dimension r_out r_in
    if (o0 == 0) {
      at::mm_out(S_block, R, P_rows_t);
    } else {
      S_block.addmm_(R, P_rows_t);
    }
  }
}

// T > 1 score with the bases folded into the queries: <R_i, P_q> = <U^T W_i V, P_q> = <W_i, U P_q V^T>
// with W_i = sum_t g_it a_it^T. Forming W_i (2 T d_out d_in FLOP) skips both projections (2 T (d_out r_out
// + d_in r_in)) and forming R_i (2 T r_out r_in); the folded queries are made once. Used when that is
// fewer FLOP (always for a full eigenbasis, r = d) and the folded queries stay small; W exists one block
// of examples at a time.
constexpr int64_t kMaxFoldedQueryBytes = int64_t(256) << 20;

inline bool fold_bases_into_queries(int64_t T, int64_t d_out, int64_t d_in, int64_t r_out, int64_t r_in, int64_t Q,
                                    int64_t N, int64_t element_size) {
  // An empty layer side (d = 0) keeps the projected route: it multiplies the other side's values by the
  // empty sum 0, so a non-finite value there gives NaN, as the definition does; W_i would be empty.
  if (T <= 1 || d_out == 0 || d_in == 0 || Q * d_out * d_in * element_size > kMaxFoldedQueryBytes) return false;
  const double folded = 2.0 * d_out * d_in * (T + Q) + 2.0 * Q * d_out * r_in * (r_out + d_in) / std::max<int64_t>(N, 1);
  const double projected = 2.0 * T * (d_out * r_out + d_in * r_in) + 2.0 * r_out * r_in * (T + Q);
  return folded < projected;
}

// (d_out * d_in, Q): column q is U P_q V^T flattened.
inline at::Tensor folded_queries_t(const at::Tensor& U, const at::Tensor& V, const at::Tensor& P) {
  const int64_t Q = P.size(0), d_out = U.size(0), d_in = V.size(0);
  return at::matmul(at::matmul(U, P), V.t()).reshape({Q, d_out * d_in}).t();
}

inline void score_folded_block(const at::Tensor& a, const at::Tensor& g, const at::Tensor& folded_t, int64_t first,
                               int64_t count, at::Tensor S_block) {
  const auto dt = folded_t.scalar_type();
  const auto W = at::bmm(g.narrow(0, first, count).to(dt).transpose(1, 2), a.narrow(0, first, count).to(dt));
  at::mm_out(S_block, W.view({count, g.size(2) * a.size(2)}), folded_t);
}

// The features epilogue over all blocks: R (N, r_out, r_in) in U's dtype. `for_each_block(N, block, fn)`
// is the backend's block loop (parallel on CPU, sequential on a CUDA stream).
// Blocks hold at least `min_block` examples (the bases' reuse, see the CPU entry points).
template <typename ForEach>
at::Tensor project_features(const at::Tensor& a, const at::Tensor& g, const at::Tensor& U, const at::Tensor& V,
                            int64_t budget_bytes, int64_t max_block, int64_t min_block,
                            const ForEach& for_each_block) {
  const int64_t N = a.size(0), r_out = U.size(1), r_in = V.size(1);
  auto R = at::empty({N, r_out, r_in}, U.options());
  if (R.numel() == 0) return R;
  if (a.size(1) == 0) return R.zero_();
  for_each_block(N, std::max(min_block, examples_per_block(a, g, r_out, r_in, 0, budget_bytes, max_block)),
                 [&](int64_t first, int64_t count) {
                   auto R_block = R.narrow(0, first, count);
                   form_block(project_block(a, g, U, V, first, count), R_block);
                 });
  return R;
}

// The score epilogue over all blocks: S (N, Q) in U's dtype (see score_outer_block / score_full_block).
// `tile_bytes` bounds the one-position epilogue's temporary; `rows_bytes` a tile of R with its query rows when
// there are several positions, whose blocks hold at least `min_block` examples (the queries' reuse).
template <typename ForEach>
at::Tensor project_scores(const at::Tensor& a, const at::Tensor& g, const at::Tensor& U, const at::Tensor& V,
                          const at::Tensor& P, int64_t budget_bytes, int64_t max_block, int64_t tile_bytes,
                          int64_t rows_bytes, int64_t min_block, const ForEach& for_each_block) {
  const int64_t N = a.size(0), T = a.size(1), r_out = U.size(1), r_in = V.size(1), Q = P.size(0);
  auto S = at::empty({N, Q}, U.options());
  if (S.numel() == 0) return S;
  if (r_out == 0 || r_in == 0) return S.zero_();  // an empty inner product
  // No positions: R_i = 0, and <0, P_q> is NaN where P_q holds a NaN or an infinity (0 * inf), as in IEEE.
  if (T == 0) return S.zero_().masked_fill_(P.isfinite().logical_not().flatten(1).any(1).unsqueeze(0),
                                    std::numeric_limits<double>::quiet_NaN());
  if (T == 1) {
    const auto P_wide = wide_layout(P);
    // The block is sized for the projections only; the query tiles bound the epilogue's temporary.
    const int64_t block = examples_per_block(a, g, r_out, r_in, 0, budget_bytes, max_block);
    for_each_block(N, block, [&](int64_t first, int64_t count) {
      score_outer_block(project_block(a, g, U, V, first, count), P_wide, Q, S.narrow(0, first, count), tile_bytes);
    });
    return S;
  }
  const int64_t d_out = U.size(0), d_in = V.size(0);
  if (fold_bases_into_queries(T, d_out, d_in, r_out, r_in, Q, N, U.element_size())) {
    const auto folded_t = folded_queries_t(U, V, P);
    const int64_t block = examples_per_block(a, g, 0, 0, d_out * d_in + Q, budget_bytes, max_block);
    for_each_block(N, block, [&](int64_t first, int64_t count) {
      score_folded_block(a, g, folded_t, first, count, S.narrow(0, first, count));
    });
    // W_i = sum_t g_it a_it^T can overflow, or meet 0 * inf, where the projections g U and a V do not:
    // a non-finite score is recomputed through the projections, as the op is defined (one check of the
    // scores; a device sync on CUDA).
    if (S.isfinite().all().item<bool>()) return S;
  }
  const auto P_flat = P.view({Q, r_out * r_in});
  const int64_t block = std::clamp(examples_per_block(a, g, r_out, r_in, Q, budget_bytes, max_block), min_block,
                                   std::max(min_block, max_block));
  for_each_block(N, block, [&](int64_t first, int64_t count) {
    score_full_block(project_block(a, g, U, V, first, count), P_flat, S.narrow(0, first, count), rows_bytes);
  });
  return S;
}

}  // namespace deltainf
