"""Covariance accumulation and eigendecomposition of the Kronecker factors.

Rank shortcut. A factor C = X^T X / n built from n rows x_1..x_n of dimension D has rank <= n.
When n < D we keep the rows instead of the D x D sum and eigendecompose inside their span:
X^T = Q0 R (Householder QR, Q0 orthonormal D x n), so C = Q0 (R R^T / n) Q0^T and the eigenpairs of
C with a nonzero eigenvalue are (mu, Q0 w) for the eigenpairs (mu, w) of the n x n matrix R R^T / n.
The directions orthogonal to the span have eigenvalue 0 and every row that built C is orthogonal
to them, so the per-example gradient of an example that built C has no component there and
EK-FAC's score of that example is unchanged when they are dropped (for the activation factor A this
holds for every pass since activations do not depend on labels; for the gradient factor S only when
the score pass uses the same labels as the fit, i.e. with the empirical Fisher). The result is
orthonormal to machine precision (a product of orthonormal matrices), costs O(D n^2 + n^3) instead
of O(D^3) and never forms the D x D covariance (the covariance pass skips the D x D GEMMs too).
"""

from __future__ import annotations

import torch

__all__ = ["CovAccumulator", "TokenCounts", "eig_full", "eig_dead_inputs_apart", "eig_rows", "truncated_svd"]

# Use the span path when the rows are at most this fraction of the dimension: near n ~ D the
# QR + small eigh costs about as much as one D x D eigh (measured in benchmarks/bench_ekfac.py).
SPAN_FRACTION = 0.75


class CovAccumulator:
    """Streaming sum of r r^T over rows r = [x, 1] (the ones column only when ``bias``).

    Rows are kept (up to ``dim`` of them) when ``keep_rows`` so that :func:`eig_rows` can be used;
    as soon as more arrive than the factor's dimension the kept rows are folded into the sum.
    Sums are held in float64; the per-batch products run in the rows' dtype.
    """

    def __init__(self, dim: int, bias: bool, keep_rows: bool, blocks: int = 1, shared: int = 1):
        self.d = dim
        self.bias = bias
        # The factors of a grouped convolution of G groups, whose tokens are (group, position) pairs (see
        # _layers.grouped); each column it is given holds G tokens. Its output factor (blocks = G): only the diagonal
        # blocks of the columns' products are its tokens'. Its input factor (shared = G): a column is its G tokens'
        # inputs in turn (G dim rows), whose products are summed into one dim x dim factor.
        self.blocks, self.shared = blocks, shared
        if (blocks > 1 and bias) or (max(blocks, shared) > 1 and keep_rows):
            raise ValueError("a grouped convolution's factors are summed, without kept rows (nor a bias column in S)")
        self.D = dim + int(bias)
        self.n = 0
        self.rows: list[torch.Tensor] | None = [] if keep_rows else None
        self.sxx: torch.Tensor | None = None
        self.sx: torch.Tensor | None = None

    def add(self, cols: torch.Tensor) -> None:
        """cols (dim, m): m rows stored feature-major (one column per token), no ones column; with ``shared``:
        (shared * dim, m), m * shared rows; with ``blocks``: m * blocks rows (a column holds a token of each block)."""
        m = cols.shape[1] * self.shared * self.blocks
        if self.rows is not None:
            if self.n + m < self.D:
                self.rows.append(cols.T.detach().clone())
                self.n += m
                return
            kept, self.rows = self.rows, None
            for r in kept:
                self._fold(r.T)
        self._fold(cols)
        self.n += m

    def _fold(self, cols: torch.Tensor) -> None:
        if self.sxx is None:
            self.sxx = torch.zeros(self.d, self.d, dtype=torch.float64, device=cols.device)
            self.sx = torch.zeros(self.d, dtype=torch.float64, device=cols.device)
        if self.blocks > 1:  # the diagonal blocks alone, as one batched product (a depthwise layer's: squares)
            G = self.blocks
            blocks = cols.reshape(G, self.d // G, -1)
            diagonal = torch.diagonal(self.sxx.view(G, self.d // G, G, self.d // G), dim1=0, dim2=2)  # (m, m, G)
            diagonal += torch.bmm(blocks, blocks.transpose(1, 2)).permute(1, 2, 0)
        elif self.shared > 1:  # each group's rows, a view of the patches (no copy of them in token order)
            groups = cols.reshape(self.shared, self.d, -1)
            self.sxx += torch.bmm(groups, groups.transpose(1, 2)).sum(0)
            self.sx += groups.sum((0, 2))
            return
        else:
            add_gram_(self.sxx, cols)
        self.sx += cols.sum(1)  # sum(dtype=float64) would first copy all of cols to float64

    def merge(self, other: "CovAccumulator") -> None:
        """Add the rows summed by ``other`` (a later partition of the same factor). Each partition's kept
        rows stay one chunk, folded as one, so the result depends only on the partitions and their order
        (not on whether ``other`` was packed, stored or sent between ranks)."""
        if other.n == 0:
            return
        if self.rows is not None and other.rows is not None and self.n + other.n < self.D:
            self.rows.append(torch.cat(other.rows, 0))
            self.n += other.n
            return
        if self.rows is not None:
            kept, self.rows = self.rows, None
            for r in kept:
                self._fold(r.T)
        if other.rows is not None:
            self._fold(torch.cat(other.rows, 0).T)
        elif self.sxx is None:
            self.sxx, self.sx = other.sxx.clone(), other.sx.clone()
        else:
            self.sxx += other.sxx
            self.sx += other.sx
        self.n += other.n

    def pack(self, prefix: str) -> dict[str, torch.Tensor]:
        """The state as named tensors (kept rows as one (n, dim) chunk, or the float64 sums), for files and
        for other ranks; :meth:`unpack` rebuilds it."""
        out = {f"{prefix}/n": torch.tensor([self.n], dtype=torch.int64)}
        if self.rows is not None:
            if self.rows:
                out[f"{prefix}/rows"] = torch.cat(self.rows, 0)
        elif self.sxx is not None:
            out[f"{prefix}/sxx"], out[f"{prefix}/sx"] = self.sxx, self.sx
        return out

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], prefix: str, dim: int, bias: bool, keep_rows: bool,
               device, blocks: int = 1, shared: int = 1) -> "CovAccumulator":
        acc = cls(dim, bias, keep_rows, blocks, shared)
        acc.n = int(tensors[f"{prefix}/n"][0])
        if f"{prefix}/rows" in tensors:
            acc.rows = [tensors[f"{prefix}/rows"].to(device)]
        elif f"{prefix}/sxx" in tensors:
            acc.rows = None
            acc.sxx, acc.sx = tensors[f"{prefix}/sxx"].to(device), tensors[f"{prefix}/sx"].to(device)
        elif acc.n:
            raise ValueError(f"{prefix}: a packed factor of {acc.n} rows holds neither rows nor sums")
        return acc

    @property
    def has_rows(self) -> bool:
        return self.rows is not None

    def covariance(self) -> torch.Tensor:
        """The (D, D) float64 covariance sum / n (assembled from kept rows if needed)."""
        if self.n == 0:
            raise RuntimeError("covariance of an empty factor")
        if self.rows is not None:
            X = self.stacked_rows()
            return (X.T @ X) / self.n
        D, d = self.D, self.d
        C = torch.empty(D, D, dtype=torch.float64, device=self.sxx.device)
        C[:d, :d] = self.sxx
        if self.bias:
            C[:d, d] = self.sx
            C[d, :d] = self.sx
            C[d, d] = self.n
        return C / self.n

    def stacked_rows(self) -> torch.Tensor:
        """(n, D) float64 rows with the ones column."""
        X = torch.cat(self.rows, 0).to(torch.float64)
        if self.bias:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], 1)
        return X

    def eigen(self, span: bool = True, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending, float64) and orthonormal eigenvectors (columns, float64), computed in ``dtype``.

        Full: (D,), (D, D). Span path (rows kept, n <= SPAN_FRACTION * D and ``span``): (n,), (D, n).
        """
        if span and self.rows is not None and self.n <= SPAN_FRACTION * self.D:
            return eig_rows(self.stacked_rows(), dtype)
        return eig_full(self.covariance(), dtype)


class TokenCounts:
    """The input factor of an embedding: one-hot token rows make A = diag(token counts) / n, whose eigenbasis is the
    identity. Streams the counts (a bincount per batch, where the dense sum costs V^2 multiply-adds per token and its
    eigendecomposition V^3); :meth:`eigen` returns the counts / n as eigenvalues, in token order, and None for the
    basis. Same interface as :class:`CovAccumulator` (n counts every token, a padding token's row being zero)."""

    def __init__(self, dim: int):
        self.d = self.D = dim
        self.n = 0
        self.counts: torch.Tensor | None = None

    def add(self, ids: torch.Tensor) -> None:
        """ids: token ids in [0, dim], dim for a padding token (its row is zero)."""
        ids = ids.reshape(-1)
        if self.counts is None:
            self.counts = torch.zeros(self.d, dtype=torch.float64, device=ids.device)
        self.counts += torch.bincount(ids, minlength=self.d + 1)[:self.d]
        self.n += ids.numel()

    def merge(self, other: "TokenCounts") -> None:
        if other.n == 0:
            return
        self.counts = other.counts.clone() if self.counts is None else self.counts + other.counts
        self.n += other.n

    def pack(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}/n": torch.tensor([self.n], dtype=torch.int64)}
        if self.counts is not None:
            out[f"{prefix}/counts"] = self.counts
        return out

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], prefix: str, dim: int, device) -> "TokenCounts":
        acc = cls(dim)
        acc.n = int(tensors[f"{prefix}/n"][0])
        if f"{prefix}/counts" in tensors:
            acc.counts = tensors[f"{prefix}/counts"].to(device)
        elif acc.n:
            raise ValueError(f"{prefix}: a packed factor of {acc.n} tokens holds no counts")
        return acc

    def eigen(self, span: bool = True, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, None]:
        """(counts / n (V,) float64, None): the identity basis is never formed."""
        if self.n == 0:
            raise RuntimeError("eigendecomposition of an empty factor")
        return self.counts / self.n, None


def add_gram_(acc: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """acc += cols @ cols.T for cols (d, m), in place (acc (d, d), a dtype at least as wide: each product is added as
    computed in cols' dtype), computing only the block rows of the lower triangle and adding each block and its
    mirror: about (nb+1)/(2 nb) of the multiply-adds of one GEMM with nb block rows, an exactly symmetric sum, and no
    d x d temporary (ResNet-18's widest factor: 85 MB per batch in float32, several times over). This is the
    covariance pass's largest cost for convolutions (d = C_in k^2, m = batch x positions)."""
    d = cols.shape[0]
    nb = min(4, d // 96)
    if nb <= 1:
        return acc.add_(cols @ cols.T)
    edges = [round(i * d / nb) for i in range(nb + 1)]
    for i in range(nb):
        lo, hi = edges[i], edges[i + 1]
        block = cols[lo:hi] @ cols[:hi].T  # block row i up to the diagonal: (hi - lo, hi)
        off, diag = block[:, :lo], block[:, lo:hi].tril()
        acc[lo:hi, :lo] += off
        acc[:lo, lo:hi] += off.T
        acc[lo:hi, lo:hi] += diag
        acc[lo:hi, lo:hi] += diag.tril(-1).T
    return acc


def eig_full(C: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrised eigh of a covariance (D, D) in ``dtype`` -> (D,), (D, D) float64.

    Where LAPACK's eigh does not converge (seen with torch 2.14's CPU build on a torchvision SqueezeNet's
    covariance: 543 of its 577 inputs always zero, dead ReLU channels), the decomposition is taken again by
    :func:`eig_dead_inputs_apart`."""
    C = C.to(dtype)
    C = (C + C.T) / 2
    try:
        evals, vecs = torch.linalg.eigh(C)
    except torch.linalg.LinAlgError:
        evals, vecs = eig_dead_inputs_apart(C)
    return evals.double(), vecs.double()


def eig_dead_inputs_apart(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric positive semidefinite C (D, D), ascending, with the inputs whose row is zero
    (an input that was zero in every row that built C) set apart: each is an eigenvector e_j of eigenvalue 0, and
    the rest is one smaller eigh, by LAPACK's relatively robust representation driver (scipy's ``evr``) where
    torch's own does not converge either. Exact, not regularised."""
    is_live = (C != 0).any(1)
    live, dead = is_live.nonzero().flatten(), (~is_live).nonzero().flatten()
    D, m = C.shape[0], live.numel()
    block = C[live][:, live]
    try:
        mu, W = torch.linalg.eigh(block)
    except torch.linalg.LinAlgError:
        import scipy.linalg

        mu_np, W_np = scipy.linalg.eigh(block.cpu().numpy(), driver="evr")
        mu, W = (torch.from_numpy(t).to(C.device, C.dtype) for t in (mu_np, W_np))
    evals = torch.cat([C.new_zeros(D - m), mu])
    vecs = C.new_zeros(D, D)
    vecs[dead, torch.arange(D - m, device=C.device)] = 1
    vecs[live.unsqueeze(1), torch.arange(D - m, D, device=C.device)] = W
    order = torch.argsort(evals, stable=True)
    return evals[order], vecs[:, order]


def eig_rows(X: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of X^T X / n restricted to the row span of X (n, D), n <= D, computed in ``dtype``.

    Returns eigenvalues (n,) ascending and orthonormal eigenvectors (D, n), both float64.
    """
    X = X.to(dtype)
    n, D = X.shape
    if n > D:
        raise ValueError(f"eig_rows: expected at most D={D} rows, got {n}")
    a, tau = torch.geqrf(X.T)  # X^T = Q0 R, Householder form in (a, tau)
    R = a[:n].triu()
    M = (R @ R.T) / n
    mu, W = torch.linalg.eigh((M + M.T) / 2)
    Wpad = torch.cat([W, W.new_zeros(D - n, n)], 0)
    Q = torch.ormqr(a, tau, Wpad)  # Q0 @ W without forming Q0
    return mu.double(), Q.double()


# Randomized SVD (a Gaussian range finder with power iterations, as in Halko, Martinsson & Tropp 2011): the sketch
# is this many columns wider than the rank kept, and refined by this many power iterations.
SVD_OVERSAMPLE = 8
SVD_POWER_ITERATIONS = 2


def truncated_svd(X: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of every matrix of X (B, m, n), up to the randomized sketch's error:
    (L (B, m, k), R (B, n, k)) with X ~ L R^T, k = min(rank, m, n), the singular values folded into L. Exact
    (a full SVD) when the sketch would be as wide as the smaller side. The sketch is drawn from a generator seeded
    with ``seed``, so the result does not depend on the global random state."""
    B, m, n = X.shape
    k = min(rank, m, n)
    width = k + SVD_OVERSAMPLE
    if width >= min(m, n):
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        return U[:, :, :k] * S[:, None, :k], Vh[:, :k].transpose(1, 2)
    g = torch.Generator(device=X.device).manual_seed(seed)
    Y = X @ torch.randn(n, width, generator=g, dtype=X.dtype, device=X.device)
    for _ in range(SVD_POWER_ITERATIONS):
        Y = X @ (X.transpose(1, 2) @ torch.linalg.qr(Y).Q)
    basis = torch.linalg.qr(Y).Q  # (B, m, width): the range of X's leading singular vectors
    U, S, Vh = torch.linalg.svd(basis.transpose(1, 2) @ X, full_matrices=False)
    return (basis @ U[:, :, :k]) * S[:, None, :k], Vh[:, :k].transpose(1, 2)
