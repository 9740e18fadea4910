"""Per-layer contractions of per-example gradients with the Kronecker eigenbases.

Every function computes something defined on the per-example gradient G_i = sum_t g_it a_it^T
(bias column appended), choosing the cheapest exact way to evaluate it:

* direct: hand the T tokens to the ``deltainf.ops`` kernel, which rotates each token
  (U^T g_it, V^T a_it) and never forms G_i. Cost per example ~ T (d_out r_out + d_in r_in + r_out r_in).
* compressed tokens: when T exceeds min(d_out, d_in), G_i itself (cost T d_out d_in) has fewer
  "tokens" than the layer: G_i = sum_k e_k G_i[k, :] (k over outputs) or
  G_i = sum_j G_i[:, j] e_j^T (j over inputs). Feeding those min(d_out, d_in) tokens to the same
  kernel gives the same R_i = U^T G_i V. (A conv layer with 256 positions and d_out=64 gets 4x
  fewer tokens.) G_i is formed for a chunk of examples at a time under a memory budget (Conv2d:
  one grouped weight-gradient convolution with the examples as groups, no patch matrix).

The score pass has a third, kernel-free route ("dense"): scores = <G_i, H^-1 grad m_q> with the
preconditioned query gradient taken back to the parameter basis once per query. It skips rotating
every training example into the eigenbasis; which route is cheaper depends on the layer's shapes,
ranks and the number of queries, so :func:`score_plan` picks by operation count.

With queries of rank k (an approximation the user asks for: ``EKFACConfig.query_rank``), H^-1 grad m_q =
sum_j l_qj r_qj^T and <G_i, l r^T> = sum_t (g_it . l)(a_it . r): a fourth route ("lowrank") projects every
token on the 2 Q k vectors and never forms G_i; it pays off on wide layers with few tokens per example.

An embedding is the linear layer of one-hot token rows, whose input factor is diagonal (token counts) with the
identity for eigenbasis: its functions (``row_*``) add each token's output gradient to its id's column and gather
its id's query rows, so that nothing costs the vocabulary's size per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from deltainf import ops
from deltainf.influence._layers import LayerBatch

__all__ = ["pass_operand", "drop_subnormals_", "rotate", "rotate_square_sum", "rotate_score", "EigenbasisPlan",
           "dense_operands", "dense_score", "score_plan", "LowRankQueries", "LowRankPlan", "lowrank_operands",
           "lowrank_score", "lowrank_cost", "rotate_cost", "ihvp_cost", "RowQueries", "row_rotate", "add_row_squares_",
           "RowsPlan", "rows_operands", "row_score"]

# Bytes of per-example gradients materialised at once by the compressed-token route (the dense route's blocks:
# BLOCK_BYTES below).
CHUNK_BYTES = 64 * 2 ** 20


# Elements per step of drop_subnormals_: its temporaries stay this small whatever the tensor's size.
_FLUSH_STEP = 1 << 22


def drop_subnormals_(t: torch.Tensor) -> torch.Tensor:
    """Set the subnormal entries of the contiguous tensor ``t`` (|x| below its dtype's smallest normal number) to 0,
    in place, a block of elements at a time; returns ``t``."""
    tiny = torch.finfo(t.dtype).tiny
    flat = t.view(-1)
    for s in range(0, flat.numel(), _FLUSH_STEP):
        block = flat[s:s + _FLUSH_STEP]
        block.masked_fill_(block.abs() < tiny, 0)
    return t


def pass_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (float64: an eigenbasis, preconditioned queries) as a contiguous operand of the passes in ``dtype``:
    ``t`` itself when it already is one; else a converted copy without subnormal entries. Cast to float32, such
    values held 3 % of a SmallCNN victim's linear-layer queries (whose largest entry was 1e6): they add nothing a
    float32 sum can hold, but the CPU computes with them through a microcode assist, and one batch of that
    layer's scores took 2.7 s against 0.04 s for the same shapes without them."""
    if t.dtype == dtype:
        return t.contiguous()
    return drop_subnormals_(t.to(dtype).contiguous())


def _direct_cost(T, d_out, D, r_out, r_in):
    return T * (d_out * r_out + D * r_in + r_out * r_in)


def rotate_cost(T: int, d_out: int, D: int, r_out: int, r_in: int, tokens: bool = True) -> tuple[float, str]:
    """(multiply-adds per example, mode) of the cheapest way to form R_i = U^T G_i V; ``tokens``: whether the layer's
    tokens can be handed to the kernel (not a grouped convolution's: only its per-example gradients)."""
    direct = _direct_cost(T, d_out, D, r_out, r_in)
    m = min(d_out, D)
    compressed = T * d_out * D + _direct_cost(m, d_out, D, r_out, r_in)
    return (direct, "direct") if tokens and direct <= compressed else (compressed, "compressed")


def ihvp_cost(T: int, d_out: int, D: int, r_out: int, r_in: int) -> float:
    """Multiply-adds per query of materialising G_q and rotating it with kron_ihvp."""
    return T * d_out * D + r_out * d_out * D + r_out * D * r_in


def _chunk(lb: LayerBatch) -> int:
    per = lb.info.d_out * lb.info.d_in_aug * torch.finfo(lb.dtype).bits // 8  # no lb.a: it may build patches
    return max(1, CHUNK_BYTES // max(per, 1))


def _tokens(lb: LayerBatch, start: int, stop: int):
    """Compressed tokens (a', g') of examples start..stop-1 with sum_t g'_t a'_t^T = G_i."""
    G = lb.grads(start, stop)  # (b, d_out, D)
    b, d_out, D = G.shape
    if d_out <= D:
        eye = torch.eye(d_out, dtype=G.dtype, device=G.device).expand(b, d_out, d_out)
        return G, eye
    eye = torch.eye(D, dtype=G.dtype, device=G.device).expand(b, D, D)
    return eye, G.transpose(1, 2)


def _mode(lb: LayerBatch, U: torch.Tensor, V: torch.Tensor, mode: str) -> str:
    if mode != "auto":
        return mode
    return rotate_cost(lb.tokens, lb.info.d_out, lb.info.d_in_aug, U.shape[1], V.shape[1],
                       tokens=lb.groups == 1)[1]


def rotate(lb: LayerBatch, U: torch.Tensor, V: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """R_i = U^T G_i V for every example: (B, r_out, r_in) via ``ops.kron_project``."""
    if _mode(lb, U, V, mode) == "direct":
        return ops.kron_project(lb.a_aug(), lb.g, U, V)
    step = _chunk(lb)
    parts = []
    for s in range(0, lb.batch, step):
        a, g = _tokens(lb, s, min(s + step, lb.batch))
        parts.append(ops.kron_project(a, g, U, V))
    return torch.cat(parts, 0)


def rotate_square_sum(lb: LayerBatch, U: torch.Tensor, V: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """sum_i (U^T G_i V)^2 elementwise: (r_out, r_in) via ``ops.kron_project_square_sum``."""
    if _mode(lb, U, V, mode) == "direct":
        return ops.kron_project_square_sum(lb.a_aug(), lb.g, U, V)
    step = _chunk(lb)
    total = None
    for s in range(0, lb.batch, step):
        a, g = _tokens(lb, s, min(s + step, lb.batch))
        part = ops.kron_project_square_sum(a, g, U, V)
        total = part if total is None else total + part
    return total


def rotate_score(lb: LayerBatch, U: torch.Tensor, V: torch.Tensor, P: torch.Tensor,
                 mode: str = "auto") -> torch.Tensor:
    """S_iq = <U^T G_i V, P_q>: (B, Q) via ``ops.kron_project_score``; P (Q, r_out, r_in). One token per example
    (a linear layer on vectors): S_iq = u_i^T P_q v_i with u_i = U^T g_i, v_i = V^T a_i, as one GEMM."""
    if _mode(lb, U, V, mode) == "direct":
        if lb.tokens == 1:
            return _single_token_score(lb, U, V, P)
        return ops.kron_project_score(lb.a_aug(), lb.g, U, V, P)
    step = _chunk(lb)
    parts = []
    for s in range(0, lb.batch, step):
        a, g = _tokens(lb, s, min(s + step, lb.batch))
        parts.append(ops.kron_project_score(a, g, U, V, P))
    return torch.cat(parts, 0)


def _single_token_score(lb: LayerBatch, U: torch.Tensor, V: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_score` for one token per example. The same multiply-adds as the kernel's (Q r_out r_in per
    example), but as a GEMM over a block of examples against all the queries at once, which the kernel's
    per-example epilogue is not: a 128 x 513 linear layer, 542 queries, 64 examples, 2 threads: 0.53-0.82 s
    against 3.3-3.7 s. Examples go a chunk at a time so that the (Q, examples, r_out) intermediate takes at most
    CHUNK_BYTES."""
    Q, r_out, r_in = P.shape
    u = lb.g.reshape(lb.batch, -1) @ U  # (B, r_out)
    v = lb.a_aug().reshape(lb.batch, -1) @ V  # (B, r_in)
    step = max(1, CHUNK_BYTES // max(1, Q * r_out * P.element_size()))
    out = torch.empty(lb.batch, Q, dtype=u.dtype, device=u.device)
    for s in range(0, lb.batch, step):
        h = torch.matmul(v[s:s + step].unsqueeze(0), P.transpose(1, 2))  # (Q, b, r_out)
        out[s:s + step] = (h * u[s:s + step].unsqueeze(0)).sum(2).T
    return out


def _token_columns(lb: LayerBatch, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An embedding's per-example gradients rotated by the output basis, U^T G_i, by their nonzero columns: for each
    distinct (example, token id) pair of the batch, (example (K,), id (K,), the sum of its tokens' U^T g (K, r_out));
    a padding token's pairs are left out (its row is zero). Work in the batch's tokens, none in the vocabulary's
    size."""
    ids = lb.token_ids().reshape(-1)
    V1 = lb.info.d_in + 1  # a padding token's id is V
    example = torch.arange(lb.batch, device=ids.device).repeat_interleave(ids.numel() // lb.batch)
    h = lb.g.reshape(ids.numel(), -1).to(U.dtype) @ U  # (float64 for the queries)
    pairs, which = torch.unique(example * V1 + ids, return_inverse=True)
    columns = h.new_zeros(pairs.numel(), h.shape[1]).index_add_(0, which, h)
    kept = pairs % V1 < lb.info.d_in
    pairs = pairs[kept]
    return pairs // V1, pairs % V1, columns[kept]


class RowQueries(NamedTuple):
    """An embedding's preconditioned queries in eigenbasis form, kept to the token ids the queries hold: rows
    (Q, r_out, U), the columns of those ids, and ids (U,) ascending. Every other column is zero (a query's gradient
    has none there, and Lambda's division keeps zeros zero), so nothing here grows with the vocabulary."""

    rows: torch.Tensor
    ids: torch.Tensor

    def dense(self, vocabulary: int) -> torch.Tensor:
        """The (Q, r_out, vocabulary) form :meth:`~deltainf.influence.EKFAC.precondition` returns."""
        Q, r_out, _ = self.rows.shape
        out = self.rows.new_zeros(Q, r_out, vocabulary)
        out[:, :, self.ids] = self.rows
        return out

    @staticmethod
    def joined(parts: list["RowQueries"]) -> "RowQueries":
        """The queries of ``parts`` (batches of queries) stacked, over the union of their ids."""
        ids = torch.unique(torch.cat([p.ids for p in parts]))
        rows = parts[0].rows.new_zeros(sum(p.rows.shape[0] for p in parts), parts[0].rows.shape[1], ids.numel())
        s = 0
        for p in parts:
            rows[s:s + p.rows.shape[0], :, torch.searchsorted(ids, p.ids)] = p.rows
            s += p.rows.shape[0]
        return RowQueries(rows, ids)


def row_rotate(lb: LayerBatch, U: torch.Tensor) -> RowQueries:
    """:func:`rotate` of an embedding whose input basis is the identity: R_i = U^T G_i, kept to the token ids of the
    batch ((B, r_out, U) and those ids)."""
    example, ids, columns = _token_columns(lb, U)
    held, column = torch.unique(ids, return_inverse=True)
    R = columns.new_zeros(lb.batch, held.numel(), columns.shape[1]).index_put_((example, column), columns)
    return RowQueries(R.transpose(1, 2).contiguous(), held)


def add_row_squares_(total: torch.Tensor, lb: LayerBatch, U: torch.Tensor) -> torch.Tensor:
    """total += sum_i (U^T G_i)^2 in place: :func:`rotate_square_sum` of an embedding whose input basis is the
    identity, total (r_out, V). Each example's tokens of one id are summed first (its column of G_i), then squared into
    that id's column of ``total`` (in its dtype)."""
    _, ids, columns = _token_columns(lb, U)
    return total.index_add_(1, ids, columns.square().T.to(total.dtype))


class RowsPlan(NamedTuple):
    """An embedding's queries in the parameter basis, laid out by token: rows (U + 1, Q, d_out) of the U tokens some
    query holds, the last row zero; index (V + 1,) the row of each token id (U for the others and a padding token)."""

    rows: torch.Tensor
    index: torch.Tensor


def rows_operands(U: torch.Tensor, queries: RowQueries, vocabulary: int) -> RowsPlan:
    """The plan of an embedding's preconditioned queries (:class:`RowQueries`) with output basis ``U`` (d_out,
    r_out): H^-1 grad m_q = U queries_q, taken back to the parameter basis in the columns of the ids they hold."""
    Q, _, n = queries.rows.shape
    rows = queries.rows.new_zeros(n + 1, Q, U.shape[0])
    rows[:-1] = (U @ queries.rows).permute(2, 0, 1)
    index = torch.full((vocabulary + 1,), n, dtype=torch.long, device=U.device)
    index[queries.ids] = torch.arange(n, device=U.device)
    return RowsPlan(rows, index)


def row_score(lb: LayerBatch, plan: RowsPlan) -> torch.Tensor:
    """S_iq = <G_i, P_q> = sum_t g_it . P_q[:, id_t] of an embedding: (B, Q), each token's query rows gathered (Q d_out
    multiply-adds per token; the one-hot rows would cost V times that), a block of tokens at a time."""
    ids = plan.index[lb.token_ids().reshape(-1)]
    g = lb.g.reshape(ids.numel(), -1)
    _, Q, d_out = plan.rows.shape
    per_token = torch.empty(ids.numel(), Q, dtype=g.dtype, device=g.device)
    step = max(1, CHUNK_BYTES // max(1, Q * d_out * plan.rows.element_size()))
    for s in range(0, ids.numel(), step):
        rows = plan.rows.index_select(0, ids[s:s + step])  # (n, Q, d_out)
        per_token[s:s + step] = torch.bmm(rows, g[s:s + step].unsqueeze(2)).squeeze(2)
    return per_token.view(lb.batch, -1, Q).sum(1)


class EigenbasisPlan(NamedTuple):
    """How one layer is scored in the eigenbasis (:func:`rotate_score`): route "direct" or "compressed", the
    eigenbases U (d_out, r_out), V (d_in_aug, r_in), and the eigenbasis-form queries P (Q, r_out, r_in)."""

    route: str
    U: torch.Tensor
    V: torch.Tensor
    P: torch.Tensor


class DensePlan(NamedTuple):
    """How one layer is scored in the parameter basis (:func:`dense_score`).

    route "tokens": Pw (d_in, Q*d_out), Pb (Q, d_out) or None. route "grads": Pw a list of (input units (u0, u1),
    their queries' columns (Q, d_out * columns)), Pb (Q, d_out) or None, and ``step`` examples per chunk."""

    route: str
    Pw: torch.Tensor | list
    Pb: torch.Tensor | None
    shape: tuple
    step: int = 0


# The "grads" route works block by block: the per-example gradients of EXAMPLES_PER_BLOCK examples restricted to a
# range of input units, at most BLOCK_BYTES of them, contracted at once with the queries' matching columns, so that
# the gradients are read back while in cache and never written to fresh pages. Measured on ResNet-18 (2 threads, a
# batch of 64, its 21 layers, ms per example): blocks of 32 examples whose gradients and query columns took 8 MB
# together, 8.9-9.5 with 8 queries and 16.6 with 51; 64 examples and 16 MB of gradients alone (the query columns
# are read once per block whatever their count), 8.3-8.6 and 11.5-11.7; 8 or 32 MB, 9.0-9.7 and 11.2-12.6. (Whole
# per-example gradients in 64 MB chunks, then one GEMM: about twice the 8 MB blocks' time.)
# On a GPU the blocks are as large as the kernels' (kron_project_cuda.cpp: 256 MB), to fill the device (not measured:
# no GPU has been lent to this project yet).
BLOCK_BYTES = 16 * 2 ** 20
EXAMPLES_PER_BLOCK = 64
GPU_BLOCK_BYTES = 256 * 2 ** 20
GPU_EXAMPLES_PER_BLOCK = 1024


def dense_operands(Pw: torch.Tensor, Pb: torch.Tensor | None, mode: str, unit_width: int = 1) -> DensePlan:
    """Lay out the parameter-basis preconditioned gradients once per score pass for
    :func:`dense_score`: Pw (Q, d_out, d_in), Pb (Q, d_out) or None, both possibly views; ``unit_width`` columns per
    input unit (Conv2d: k_h * k_w per input channel), the granularity of the "grads" route's blocks."""
    Q, d_out, d_in = Pw.shape
    Pb = Pb.contiguous() if Pb is not None else None
    if mode == "tokens":
        return DensePlan(mode, Pw.permute(2, 0, 1).reshape(d_in, Q * d_out).contiguous(), Pb, (Q, d_out, d_in))
    gpu = Pw.device.type == "cuda"
    step = GPU_EXAMPLES_PER_BLOCK if gpu else EXAMPLES_PER_BLOCK
    cols = (GPU_BLOCK_BYTES if gpu else BLOCK_BYTES) // (Pw.element_size() * step * d_out)
    units = max(1, cols // unit_width)
    n_units = d_in // unit_width
    blocks = [((u0, min(u0 + units, n_units)),
               Pw[:, :, u0 * unit_width:min(u0 + units, n_units) * unit_width].reshape(Q, -1).contiguous())
              for u0 in range(0, n_units, units)]
    return DensePlan(mode, blocks, Pb, (Q, d_out, d_in), step)


def dense_score(lb: LayerBatch, plan: DensePlan) -> torch.Tensor:
    """S_iq = <G_i, P_q> with P in the parameter basis (the plan from :func:`dense_operands`).
    route "tokens": sum_t g_it^T P_q a_it without forming G_i (cheapest for T = 1); "grads": form the
    weight part of G_i block by block (a chunk of examples, a range of input units) and contract each block
    with the queries' matching columns at once (the bias part is sum_t g_it). -> (B, Q)."""
    mode, Pw, Pb, (Q, d_out, d_in), step = plan
    B, T = lb.batch, lb.tokens
    if mode == "tokens":
        # (B*T, d_in) @ (d_in, Q*d_out) keeps the intermediate at Q*d_out per token
        h = (lb.a.reshape(B * T, d_in) @ Pw).view(B, T, Q, d_out)
        if Pb is not None:
            h = h + Pb
        return torch.einsum("btqo,bto->bq", h, lb.g)
    out = torch.empty(B, Q, dtype=lb.dtype, device=lb.device)
    for s in range(0, B, step):
        e = min(s + step, B)
        acc = torch.zeros(Q, e - s, dtype=out.dtype, device=out.device)
        for units, cols in Pw:
            acc.addmm_(cols, lb.weight_grads(s, e, units).reshape(e - s, -1).T)
        if Pb is not None:
            acc.addmm_(Pb, lb.bias_grads(s, e).T)
        out[s:e] = acc.T
    return out


def score_plan(T: int, d_out: int, D: int, r_out: int, r_in: int, Q: int, n: int = 0,
               tokens: bool = True) -> tuple[float, str]:
    """(multiply-adds per example, route) for scoring Q queries against one layer, n training examples:
    route in {"direct", "compressed"} (kernel, eigenbasis P) or {"tokens", "grads"} (dense).

    The dense routes first take every query back to the parameter basis, (Q_S P_q) Q_A^T: Q d_out r_in (r_out + D)
    multiply-adds once per pass, charged spread over the n examples (n = 0: unknown, not charged). On a large
    layer with many queries and few examples this one-off product is the pass's largest cost (ResNet-18's
    4609-wide convolutions, 51 queries, 512 examples: 1.2e9 multiply-adds per example against 1.4e8 for the
    scoring)."""
    rc, rmode = rotate_cost(T, d_out, D, r_out, r_in, tokens)
    to_params = Q * d_out * r_in * (r_out + D) / n if n > 0 else 0.0
    options = [
        (rc + Q * r_out * r_in, rmode),
        (T * Q * d_out * D + to_params, "tokens"),
        (T * d_out * D + Q * d_out * D + to_params, "grads"),
    ]
    return min([o for o in options if tokens or o[1] != "tokens"], key=lambda o: o[0])


class LowRankQueries(NamedTuple):
    """Preconditioned queries of one layer in eigenbasis form, each of rank at most k: P_q = L_q R_q^T with
    L (Q, r_out, k) and R (Q, r_in, k), float64 (:func:`deltainf.influence._linalg.truncated_svd`)."""

    L: torch.Tensor
    R: torch.Tensor


class LowRankPlan(NamedTuple):
    """How one layer is scored with rank-k queries (:func:`lowrank_score`): Lw (d_out, Q*k) and Rw (D, Q*k), the
    factors in the parameter basis (bias row last in Rw), query-major columns, in the pass dtype."""

    Lw: torch.Tensor
    Rw: torch.Tensor
    Q: int
    k: int


def lowrank_cost(T: int, d_out: int, D: int, r_out: int, r_in: int, Q: int, k: int, n: int = 0) -> float:
    """Multiply-adds per example of the "lowrank" route: the tokens' projections on the Q k factor pairs, plus two
    one-off costs spread over the n examples: the queries' randomized SVDs (about 6 r_out r_in (k + 8) each) and
    taking the factors to the parameter basis (Q k (d_out r_out + D r_in))."""
    once = Q * (6 * r_out * r_in * (k + 8) + k * (d_out * r_out + D * r_in))
    return T * (d_out + D + 1) * Q * k + (once / n if n > 0 else 0.0)


def lowrank_operands(queries: LowRankQueries, U: torch.Tensor, V: torch.Tensor, dtype: torch.dtype) -> LowRankPlan:
    """The plan of :func:`lowrank_score` from eigenbasis-form factors and the layer's eigenbases U (d_out, r_out),
    V (D, r_in), both in the factors' dtype: l = U L_q, r = V R_q."""
    Q, _, k = queries.L.shape
    Lw = (U @ queries.L).permute(1, 0, 2).reshape(U.shape[0], Q * k)
    Rw = (V @ queries.R).permute(1, 0, 2).reshape(V.shape[0], Q * k)
    return LowRankPlan(pass_operand(Lw, dtype), pass_operand(Rw, dtype), Q, k)


def lowrank_score(lb: LayerBatch, plan: LowRankPlan) -> torch.Tensor:
    """S_iq = sum_j sum_t (g_it . l_qj)(a_it . r_qj) = <G_i, sum_j l_qj r_qj^T>, bias column included: (B, Q).
    Examples go a chunk at a time so that the two (examples, T, Q k) projections take at most CHUNK_BYTES."""
    B, T = lb.batch, lb.tokens
    Lw, Rw, Q, k = plan
    a, g = lb.a_aug(), lb.g
    step = max(1, CHUNK_BYTES // max(1, 2 * T * Q * k * Lw.element_size()))
    out = torch.empty(B, Q, dtype=Lw.dtype, device=Lw.device)
    for s in range(0, B, step):
        e = min(s + step, B)
        gl = g[s:e].reshape(-1, g.shape[2]) @ Lw
        al = a[s:e].reshape(-1, a.shape[2]) @ Rw
        out[s:e] = (gl * al).view(e - s, T, Q, k).sum((1, 3))
    return out
