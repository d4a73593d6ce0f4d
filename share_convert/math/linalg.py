"""The linear algebra of Share: canonical factors, principal bases, errors by traces.

Conventions: a low-rank matrix is held as two column-form factors, ΔW = B @ A.T with
B ``n × r`` (output side) and A ``d × r`` (input side). Nothing here forms an ``n × d`` matrix.
Small cores are computed in float64 (spec, section 2, step 4).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .tolerances import CANONICAL_RTOL, CHOLESKY_MIN_RATIO, RANK_RTOL
from .traces import frobenius2, trace_product


@contextmanager
def deterministic() -> Iterator[None]:
    """Run the enclosed numerics on one CPU thread.

    Multi-threaded BLAS and reductions split sums differently for different thread counts, which
    changes the last bits of results; one thread makes every output byte-identical whatever the
    machine's thread settings (the project's determinism rule). GPU work is unaffected.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_linalg(device: torch.device) -> None:
    """Load the device's linear-algebra libraries on this thread, before worker threads use them.

    On CUDA, PyTorch loads them lazily and that loading is not thread-safe: workers that race to
    their first QR fail with "lazy wrapper should be called at most once" (seen on an H200).
    """
    if device.type == "cuda":
        # every routine the device path calls, single and batched (batches may take other backends)
        for x in (torch.eye(2, device=device, dtype=torch.float64), torch.eye(2, device=device).expand(3, 2, 2)):
            torch.linalg.qr(x)
            torch.linalg.svd(x)
            torch.linalg.eigh(x)
            torch.linalg.eigvalsh(x)
            torch.linalg.cholesky_ex(x)
            torch.linalg.solve_triangular(x, x, upper=True)


def fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Sign convention: each column's largest-magnitude entry is positive (spec, section 2.4).

    Returns the ±1 vector applied (``r``, or ``… × r`` for a batch ``… × n × r``), so that a paired
    factor can be flipped the same way; the first such entry on ties, and 1 for a zero column. A
    max and a min reduction find it, without an n-sized ``abs`` copy.
    """
    if U.shape[-1] == 0 or U.shape[-2] == 0:
        return torch.ones((*U.shape[:-2], U.shape[-1]), dtype=U.dtype, device=U.device)
    high, at_high = U.max(dim=-2)
    low, at_low = U.min(dim=-2)
    # the positive entry wins where it is larger in magnitude, or equal and earlier
    positive = (high > -low) | ((high == -low) & (at_high < at_low))
    signs = torch.where(positive, 1.0, -1.0).to(U.dtype)
    return torch.where((high == 0) & (low == 0), torch.ones_like(signs), signs)


def canonicalize(
    B: torch.Tensor, A: torch.Tensor, *, max_rank: int | None = None, rtol: float = CANONICAL_RTOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced SVD form of ΔW = B Aᵀ (spec, section 2, step 2).

    B = Q_B R_B, A = Q_A R_A, U S Vᵀ = svd(R_B R_Aᵀ), then B' = Q_B U S^½, A' = Q_A V S^½.
    B' A'ᵀ = B Aᵀ exactly (up to rounding); B'ᵀB' = A'ᵀA' = S. Directions with singular value
    ≤ ``rtol × σ_max`` are dropped; ``max_rank`` keeps the top ones (best rank-``max_rank``
    approximation, Eckart–Young). Computed in float64; returns float64 factors and S.
    """
    B64, A64 = B.to(torch.float64), A.to(torch.float64)
    n, r = B64.shape
    if r == 0:
        z = B64.new_zeros
        return z((n, 0)), z((A64.shape[0], 0)), z((0,))
    # a rank above a side is rank-deficient by construction: its Gram matrix is singular, and the Cholesky
    # route would turn its rounding into a spurious direction of size √ε·σ_max
    deficient = r > min(n, A64.shape[0])
    RB, RA = (None, None) if deficient else (_triangular_factor(B64), _triangular_factor(A64))
    if RB is None or RA is None:  # ill-conditioned: the slower, always-stable Householder route
        QB, RB = torch.linalg.qr(B64)
        QA, RA = torch.linalg.qr(A64)
        U, S, V = _core(RB, RA, rtol, max_rank)
        Bc, Ac = QB @ (U * S.sqrt()), QA @ (V * S.sqrt())
    else:  # B = Q_B R_B with Q_B = B R_B⁻¹: no n-sized factorization needed
        U, S, V = _core(RB, RA, rtol, max_rank)
        Bc = B64 @ torch.linalg.solve_triangular(RB, U * S.sqrt(), upper=True)
        Ac = A64 @ torch.linalg.solve_triangular(RA, V * S.sqrt(), upper=True)
    signs = fix_signs(Bc)
    return Bc * signs, Ac * signs, S


#: Pairs canonicalized in one batch hold at most about this many bytes of float64 copies of their
#: factors (16 pairs of a 7B model's 4096 × 16 factors: batches that stay in cache are about 30%
#: faster there than 64 pairs), and never fewer than 16 pairs (small modules: the per-batch work
#: is what costs). Every step is per pair, so the batch size changes no result.
CANONICAL_CHUNK_BYTES = 16 * 2**20
CANONICAL_CHUNK_PAIRS = (16, 1024)


def canonical_chunk(n: int, d: int, r: int) -> int:
    """How many pairs of factors (``n × r`` and ``d × r``) :func:`canonicalize_many` takes at once:
    small modules in large batches (the per-batch work is what costs there), large ones 16 at a time."""
    least, most = CANONICAL_CHUNK_PAIRS
    return max(least, min(most, CANONICAL_CHUNK_BYTES // max(8 * (n + d) * r, 1)))


def canonicalize_many(
    Bs: list[torch.Tensor] | torch.Tensor, As: list[torch.Tensor] | torch.Tensor, chunk: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`canonicalize` of many factor pairs at once, batched over pairs of equal shape.

    ``Bs`` and ``As`` are lists of pairs, or two stacks (``T × n × r`` and ``T × d × r``) of pairs
    of one shape. The small cores are float64 as in :func:`canonicalize`; the n-sized canonical
    factors are returned in float32 (the precision of the inputs), which halves the memory
    traffic of the step that touches every input. Ill-conditioned pairs go through the
    Householder route. ``chunk``: pairs per batch (default :func:`canonical_chunk`); every step is
    per pair, so a pair's result does not depend on the batch it is in.
    """
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(Bs)
    groups: dict[tuple, list[int]] = {}
    if isinstance(Bs, torch.Tensor):  # one stack: one group
        groups[(tuple(Bs.shape[1:]), tuple(As.shape[1:]))] = list(range(len(Bs)))
    else:
        for i, (B, A) in enumerate(zip(Bs, As)):
            groups.setdefault((tuple(B.shape), tuple(A.shape)), []).append(i)
    sizes = {shape: chunk or canonical_chunk(shape[0][0], shape[1][0], shape[0][1]) for shape in groups}
    chunks = [
        (shape, idx[j : j + sizes[shape]]) for shape, idx in groups.items() for j in range(0, len(idx), sizes[shape])
    ]
    for (bshape, _), idx in chunks:  # chunks bound the float64 temporaries
        if bshape[1] == 0:
            for i in idx:
                Bc, Ac, sv = canonicalize(Bs[i], As[i])
                out[i] = (Bc.float(), Ac.float(), sv)
            continue
        if isinstance(Bs, torch.Tensor):  # consecutive pairs of the stack: views, not copies
            B32, A32 = Bs[idx[0] : idx[-1] + 1].to(torch.float32), As[idx[0] : idx[-1] + 1].to(torch.float32)
        else:
            B32 = torch.stack([Bs[i] for i in idx]).to(torch.float32)
            A32 = torch.stack([As[i] for i in idx]).to(torch.float32)
        B, A = B32.to(torch.float64), A32.to(torch.float64)
        LB, infoB = torch.linalg.cholesky_ex(B.transpose(-1, -2) @ B)
        LA, infoA = torch.linalg.cholesky_ex(A.transpose(-1, -2) @ A)
        del B, A
        dB, dA = torch.diagonal(LB, dim1=-2, dim2=-1), torch.diagonal(LA, dim1=-2, dim2=-1)
        ok = (
            (infoB == 0)
            & (infoA == 0)
            & (dB.min(-1).values > CHOLESKY_MIN_RATIO * dB.max(-1).values)
            & (dA.min(-1).values > CHOLESKY_MIN_RATIO * dA.max(-1).values)
        )
        RB, RA = LB.transpose(-1, -2), LA.transpose(-1, -2)
        eye = torch.eye(RB.shape[-1], dtype=torch.float64, device=RB.device).expand_as(RB)
        RB = torch.where(ok[:, None, None], RB, eye)  # placeholders for the pairs redone one by one
        RA = torch.where(ok[:, None, None], RA, eye)
        U, S, Vh = torch.linalg.svd(RB @ RA.transpose(-1, -2))
        half = S.sqrt().unsqueeze(-2)
        XB = torch.linalg.solve_triangular(RB, U * half, upper=True)  # Q_B U S^½ = B R_B⁻¹ U S^½
        XA = torch.linalg.solve_triangular(RA, Vh.transpose(-1, -2) * half, upper=True)
        # the n-sized products in float32 (the inputs' precision); the small factors stay float64
        Bc_all, Ac_all = B32 @ XB.to(torch.float32), A32 @ XA.to(torch.float32)
        signs = fix_signs(Bc_all).unsqueeze(-2)  # for the whole chunk at once
        Bc_all.mul_(signs)
        Ac_all.mul_(signs)
        keeps = ((S > CANONICAL_RTOL * S[:, :1]) & (S[:, :1] > 0)).sum(-1).tolist()
        goods = ok.tolist()
        full = S.shape[-1]
        if all(goods) and all(keep == full for keep in keeps):  # the common case: views made in one call each
            for i, Bc, Ac, sv in zip(idx, Bc_all.unbind(0), Ac_all.unbind(0), S.unbind(0)):
                out[i] = (Bc, Ac, sv)
            continue
        for j, (i, good, keep) in enumerate(zip(idx, goods, keeps)):
            if not good:
                Bc, Ac, sv = canonicalize(Bs[i], As[i])
                out[i] = (Bc.float(), Ac.float(), sv)
                continue
            out[i] = (Bc_all[j, :, :keep], Ac_all[j, :, :keep], S[j, :keep])
    return out  # type: ignore[return-value]


def canonicalize_padded(
    B: torch.Tensor, A: torch.Tensor, rtol: float = CANONICAL_RTOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`canonicalize` of a batch of small factor pairs, zero-padded to a common width.

    ``B`` (``T × m × r``) and ``A`` (``T × m' × r``) hold coordinates, not n-sized factors, so
    Householder QR is cheap and exact enough for rank-deficient (padded) pairs. Returns the
    balanced factors (float64, same shapes up to ``min(m, m', r)`` columns), their singular values
    (``T × ·``) and each pair's numerical rank; columns past a pair's rank are zero.
    """
    B, A = B.to(torch.float64), A.to(torch.float64)
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A)
    U, S, Vh = torch.linalg.svd(RB @ RA.transpose(-1, -2), full_matrices=False)
    top = S[:, :1] if S.shape[-1] else S.new_zeros(S.shape[0], 1)
    live = (S > rtol * top) & (top > 0)
    rank = live.sum(-1)
    S = torch.where(live, S, torch.zeros_like(S))
    half = S.sqrt().unsqueeze(-2)
    Bc, Ac = QB @ (U * half), QA @ (Vh.transpose(-1, -2) * half)
    signs = fix_signs(Bc).unsqueeze(-2)  # per pair and column
    return Bc * signs, Ac * signs, S, rank


def _triangular_factor(X: torch.Tensor) -> torch.Tensor | None:
    """R with X = Q R from the Cholesky factor of XᵀX, or None when X is too ill-conditioned for it."""
    G = X.T @ X
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return None
    d = torch.diagonal(L)
    if float(d.min()) <= CHOLESKY_MIN_RATIO * float(d.max()):
        return None
    return L.T


def _core(RB: torch.Tensor, RA: torch.Tensor, rtol: float, max_rank: int | None):
    U, S, Vh = torch.linalg.svd(RB @ RA.T)
    keep = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    if max_rank is not None:
        keep = min(keep, max_rank)
    return U[:, :keep], S[:keep], Vh[:keep].T


def principal_basis(
    stack: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_oversamples: int = 10,
    n_iter: int = 1,
    exact_below: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors U and values S of ``stack`` (``n × m``), uncentered.

    Exact when ``m ≤ exact_below`` (eigh of the ``m × m`` Gram matrix in float64) or when
    ``k + n_oversamples`` covers the stack (eigh of the ``n × n`` Gram matrix in float64 when
    n ≤ m: many tasks of a narrow module; else an SVD); otherwise the randomized range finder of Halko,
    Martinsson & Tropp (2011) with ``n_oversamples`` extra columns and ``n_iter`` power
    iterations re-orthonormalized by QR, from a fixed ``seed`` (spec, section 2, step 4).
    The result is clamped to the numerical rank (spec, section 2, step 5) and has the sign
    convention of :func:`fix_signs`. Returns U (float32), S (float64, on the CPU: it steers
    Python-level choices) and the projection Uᵀ·stack (``k × m``, float64), which the randomized route
    gets for free; U and the projection stay on ``stack``'s device, where the planner uses them.
    """
    n, m = stack.shape
    k = min(k, n, m)
    if k <= 0 or m == 0:
        return (
            stack.new_zeros((n, 0)),
            torch.zeros(0, dtype=torch.float64),
            torch.zeros(0, m, dtype=torch.float64, device=stack.device),
        )
    if m <= exact_below or k + n_oversamples >= min(n, m):
        s64 = stack.to(torch.float64)
        if m <= exact_below:
            evals, V = torch.linalg.eigh(s64.T @ s64)
            S = evals.flip(0).clamp_min(0).sqrt()
            V = V.flip(1)
            U = (s64 @ V[:, :k]) / torch.where(S[:k] > 0, S[:k], 1)
        elif n <= m:  # few rows, many columns: the columns of U are the n × n Gram matrix's eigenvectors
            evals, W = torch.linalg.eigh(s64 @ s64.T)
            S = evals.flip(0).clamp_min(0).sqrt()
            U = W.flip(1)[:, :k]
        else:
            U64, S, _ = torch.linalg.svd(s64, full_matrices=False)
            U = U64[:, :k]
        rank = _numerical_rank(S, k)
        U = U[:, :rank]
        if rank:  # re-orthonormalize (the Gram route loses orthogonality in weak directions)
            U = qr_positive(U)
        U = (U * fix_signs(U)).to(torch.float32)
        proj = U.to(torch.float64).T @ s64
        return U, S[:rank].cpu(), proj
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(m, k + n_oversamples, generator=gen, dtype=torch.float32).to(stack.device)
    Q = torch.linalg.qr(stack @ omega).Q
    for _ in range(n_iter):
        Q = torch.linalg.qr(stack.T @ Q).Q
        Q = torch.linalg.qr(stack @ Q).Q
    small = (Q.T @ stack).to(torch.float64)
    Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
    rank = _numerical_rank(S, k)
    U = Q @ Us[:, :rank].to(Q.dtype)
    signs = fix_signs(U)
    # Uᵀ·stack = Usᵀ Qᵀ stack = S Vᵀ: the coordinates of every stacked column, at no extra cost
    proj = (S[:rank, None] * Vh[:rank]) * signs.to(torch.float64)[:, None]
    return U * signs, S[:rank].cpu(), proj


def extend_basis(
    stack: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    proj: torch.Tensor,
    more: int,
    *,
    seed: int = 0,
    n_oversamples: int = 10,
    n_iter: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`principal_basis` widened by up to ``more`` directions, keeping the first ones as they are.

    ``U``, ``S``, ``proj`` are a basis of ``stack`` and its outputs as :func:`principal_basis` gives
    them. The new directions are the principal directions of what the basis leaves out of the stack
    (stack − U·proj), made orthogonal to U: the cost is that of the new directions alone, and every
    prefix of the old basis is unchanged, so whatever was computed on it (the planner's errors) still
    holds. Up to rounding, the result spans what a fresh fit would (Eckart–Young on the deflated stack).
    """
    n, m = stack.shape
    more = min(more, n - U.shape[1], m - U.shape[1])
    if more <= 0 or S.numel() == 0:
        return U, S, proj
    rest = stack - U @ proj.to(device=stack.device, dtype=stack.dtype)
    V, T, _ = principal_basis(rest, more, seed=seed, n_oversamples=n_oversamples, n_iter=n_iter)
    keep = int((T > RANK_RTOL * S[0]).sum())  # numerical rank, relative to the whole stack
    if keep == 0:
        return U, S, proj
    V = V[:, :keep]
    V = V - U @ (U.T @ V)  # orthogonal to the kept basis (one more pass removes rounding)
    V = torch.linalg.qr(V - U @ (U.T @ V)).Q
    V = V * fix_signs(V)
    # the new coordinates in the stack's precision: they serve the planner's estimates, and the
    # encoder measures every stored error exactly
    extra = (V.T @ stack).to(torch.float64)
    return torch.cat([U, V], 1), torch.cat([S, T[:keep].cpu()]), torch.cat([proj, extra])


class GramDecomposition:
    """Every principal direction of a stack (``n × m``) at once, from one eigendecomposition of its
    smaller Gram matrix: ``stackᵀ·stack`` (``m × m``) when m ≤ n, else ``stack·stackᵀ`` (``n × n``).

    What it costs does not depend on how many directions are used: one product of
    ``n·m·min(n, m)`` operations (:func:`upper_gram`) and one symmetric eigendecomposition of
    ``min(n, m)³``, where
    the randomized range finder at width K costs about ``8·n·m·K`` (:func:`gram_cost`,
    :func:`randomized_cost`). Both run in float32, the precision of the stack; the eigenvalues are
    accurate to about ``1e-7·σ₁²``, so directions weaker than ``GRAM_RTOL·σ₁`` are not kept.

    The stack's coordinates in the top k directions, ``Uᵀ·stack = S·Vᵀ`` (m ≤ n), come without
    forming U: the planner searches every width first, and :meth:`basis` forms only the directions
    of the plan chosen.
    """

    def __init__(self, stack: torch.Tensor):
        self.stack = stack
        n, m = stack.shape
        self.tall = m <= n
        evals, vecs = torch.linalg.eigh(upper_gram(stack if self.tall else stack.T), UPLO="U")
        S = evals.flip(0).clamp_min(0).sqrt().to(torch.float64)
        #: how many directions are kept: those above GRAM_RTOL × σ₁
        self.rank = int((S > GRAM_RTOL * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        #: singular values, descending (float64, on the CPU)
        self.S = S[: self.rank].cpu()
        self._vecs = vecs.flip(1)[:, : self.rank]
        self._coords: torch.Tensor | None = None

    def coordinates(self, k: int) -> torch.Tensor:
        """Uᵀ·stack for the top ``k`` directions (``k × m``, float64, on the stack's device), each row up
        to its sign (:meth:`basis` fixes the signs of U; the planner's figures do not depend on them)."""
        k = min(k, self.rank)
        if self._coords is None or self._coords.shape[0] < k:
            if self.tall:  # U = stack·V·S⁻¹, so Uᵀ·stack = S⁻¹·Vᵀ·stackᵀ·stack = S·Vᵀ
                S = self.S[:k].to(self._vecs.device)
                self._coords = S[:, None] * self._vecs[:, :k].T.to(torch.float64)
            else:  # U is the eigenvectors themselves
                self._coords = (self._vecs[:, :k].T @ self.stack).to(torch.float64)
        return self._coords[:k]

    def basis(self, k: int) -> torch.Tensor:
        """The top ``k`` directions, float32, orthonormalized (QR keeps their span and order) and with
        the sign convention of :func:`fix_signs`."""
        k = min(k, self.rank)
        if self.tall:
            S = self.S[:k].to(device=self.stack.device, dtype=self.stack.dtype)
            U = self.stack @ (self._vecs[:, :k] / S)
        else:
            U = self._vecs[:, :k]
        if k:  # the products above lose orthogonality in weak directions: restore it, span unchanged
            U = orthonormalized(U)
        return U * fix_signs(U)


#: :func:`orthonormalized` takes Cholesky QR when its factor's diagonal ratio exceeds this (cond(U) ≲ 10:
#: in float32 it then loses no more orthogonality than Householder QR), else Householder QR.
CHOLESKY_QR_MIN_RATIO = 0.1


def orthonormalized(U: torch.Tensor) -> torch.Tensor:
    """U's columns made orthonormal, their span and order kept: U·R⁻¹ with R the upper triangular
    factor (positive diagonal) of U = Q·R.

    For nearly orthonormal U (directions formed from a Gram decomposition) by Cholesky QR: the
    ``k × k`` Gram matrix, its Cholesky factor in float64 and one triangular solve, about half the
    work of Householder QR at the same orthogonality; Householder QR (diagonal made positive) where U is
    further from orthonormal.
    """
    L, info = torch.linalg.cholesky_ex((U.T @ U).double())
    diag = torch.diagonal(L)
    if int(info) == 0 and float(diag.min()) > CHOLESKY_QR_MIN_RATIO * float(diag.max()):
        return torch.linalg.solve_triangular(L.T.to(U.dtype), U, upper=True, left=False)
    return qr_positive(U)


def qr_positive(U: torch.Tensor) -> torch.Tensor:
    """Q of U = Q·R by Householder QR, each column's sign set so that R's diagonal is non-negative
    (the orthonormal columns with U's span and order that :func:`orthonormalized` also gives)."""
    Q, R = torch.linalg.qr(U)
    d = torch.sign(torch.diagonal(R))
    d[d == 0] = 1
    return Q * d


def upper_gram(Y: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The upper triangle of Yᵀ·Y (the rest zeros), one block row of columns at a time: about half
    the operations of the full product, for an eigensolver that reads one triangle."""
    m = Y.shape[1]
    G = Y.new_zeros((m, m))
    for i in range(0, m, block):
        G[i : i + block, i:] = Y[:, i : i + block].T @ Y[:, i:]
    return G


#: Directions of a :class:`GramDecomposition` weaker than this × σ₁ are not kept: the float32 Gram
#: matrix holds σ² to about 1e-7·σ₁², so below about 1e-3·σ₁ a singular value is rounding.
GRAM_RTOL = 1e-3


def gram_cost(n: int, m: int) -> float:
    """Operations of a :class:`GramDecomposition` of an ``n × m`` stack (the Gram product's upper
    triangle and the eigendecomposition; forming the vectors is left out, as both routes pay it)."""
    g = min(n, m)
    return 1.0 * n * m * g + 6.0 * g**3


def randomized_cost(n: int, m: int, k: int, n_oversamples: int = 10, n_iter: int = 1) -> float:
    """Operations of :func:`principal_basis`'s randomized route at width ``k``: ``2 + 2·n_iter``
    products with the stack, as many QR factorizations of ``n × (k + p)``, and the small SVD."""
    w = min(k + n_oversamples, m)
    return (2 + 2 * n_iter) * (2.0 * n * m * w + 2.0 * n * w * w) + 4.0 * w * w * m


def _numerical_rank(S: torch.Tensor, k: int) -> int:
    return int((S[:k] > RANK_RTOL * S[0]).sum()) if S.numel() and S[0] > 0 else 0


def left_batched(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M @ X[i]`` for every i of a batch ``X`` (``t × b × c``), as one matrix product.

    Equal to ``M @ X``, whose broadcasting runs many times slower on the CPU (about 10× for a
    4096 × 300 basis times 64 tasks' coefficients).
    """
    t, b, c = X.shape
    return (M @ X.permute(1, 0, 2).reshape(b, t * c)).reshape(M.shape[0], t, c).permute(1, 0, 2)


def frob2(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B Aᵀ‖²_F = tr((BᵀB)(AᵀA)), in float64 (spec, section 4)."""
    B, A = B.to(torch.float64), A.to(torch.float64)
    return float(frobenius2(B, A))


def inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """⟨B1 A1ᵀ, B2 A2ᵀ⟩_F = tr((B1ᵀB2)(A2ᵀA1)), in float64 (spec, section 4)."""
    B1, A1, B2, A2 = (x.to(torch.float64) for x in (B1, A1, B2, A2))
    return float(trace_product(B1, A1, B2, A2))


def relative_error(B: torch.Tensor, A: torch.Tensor, Bh: torch.Tensor, Ah: torch.Tensor) -> float:
    """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F for ΔW = B Aᵀ and ΔŴ = Bh Ahᵀ, without forming either."""
    ref = frob2(B, A)
    if ref == 0:
        return 0.0 if frob2(Bh, Ah) == 0 else float("inf")
    diff = ref - 2 * inner(B, A, Bh, Ah) + frob2(Bh, Ah)
    return max(diff, 0.0) ** 0.5 / ref**0.5


def relative_errors(ref2: torch.Tensor, cross: torch.Tensor, recon2: torch.Tensor) -> torch.Tensor:
    """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of a batch, from ‖ΔW‖², ⟨ΔW, ΔŴ⟩ and ‖ΔŴ‖² (spec, section 4); 0 where ΔW = 0."""
    return torch.where(ref2 > 0, ((ref2 - 2 * cross + recon2).clamp_min(0) / ref2.clamp_min(1e-300)).sqrt(), 0.0)


def _psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    evals, V = torch.linalg.eigh(M)
    return (V * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def residual_spectrum(
    s: torch.Tensor, Eb: torch.Tensor, Ea: torch.Tensor, S: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared singular values (descending) of R = ΔW − P_β ΔW P_α, for canonical factors.

    ``s``: the canonical singular values (``… × r``); ``Eb = βᵀB'`` and ``Ea = αᵀA'``
    (``… × k × r``), batched over tasks of equal rank. With B⊥ = (I − P_β)B' and
    A⊥ = (I − P_α)A', R = [B⊥, βE_B] [A', A⊥]ᵀ and, because B'ᵀB' = A'ᵀA' = S, both Gram
    matrices are 2r × 2r expressions in S, E_BᵀE_B and E_AᵀE_A: no n- or d-sized work.
    ``S``: ``diag_embed(s)``, when the caller keeps it (a planner asks for many k on the same tasks).
    """
    if S is None:
        S = torch.diag_embed(s)
    Gb = Eb.transpose(-1, -2) @ Eb
    Ga = Ea.transpose(-1, -2) @ Ea
    # The left Gram matrix is block-diagonal, diag(S − G_B, G_B). With any factor of it,
    # L Lᵀ = diag(L1 L1ᵀ, L2 L2ᵀ), the spectrum of R is that of Lᵀ · right · L (it equals the
    # spectrum of right · L Lᵀ): assembled from its blocks, one 2r × 2r eigvalsh per task.
    r, k = Eb.shape[-1], Eb.shape[-2]
    if k < r:  # G_B = E_Bᵀ E_B has the narrower factor E_Bᵀ: an (r + k)-sized problem
        L1, L2 = gram_factor(S - Gb), Eb.transpose(-1, -2)
    else:
        L1, L2 = gram_factor(torch.stack([S - Gb, Gb])).unbind(0)
    D = S - Ga
    L1t, L2t = L1.transpose(-1, -2), L2.transpose(-1, -2)
    top = torch.cat([L1t @ S @ L1, L1t @ D @ L2], -1)
    bottom = torch.cat([L2t @ D @ L1, L2t @ D @ L2], -1)
    evals = torch.linalg.eigvalsh(torch.cat([top, bottom], -2)).flip(-1).clamp_min(0)
    if k < r:  # the rest of the 2r values are zeros
        evals = torch.cat([evals, evals.new_zeros(*evals.shape[:-1], r - k)], -1)
    return evals


def gram_factor(M: torch.Tensor) -> torch.Tensor:
    """A factor L with L Lᵀ = M for a batch of positive semidefinite matrices.

    The Cholesky factor where it exists (an order of magnitude cheaper than an eigendecomposition
    for small matrices), else the symmetric square root (singular matrices: a basis narrower
    than the task, or a task the basis holds entirely).
    """
    L, info = torch.linalg.cholesky_ex(M)
    failed = info != 0
    if bool(failed.any()):
        L = L.clone()
        L[failed] = _psd_sqrt(M[failed])
    return L
