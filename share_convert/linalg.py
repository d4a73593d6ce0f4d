"""The linear algebra of Share: canonical factors, principal bases, errors by traces.

Conventions: a low-rank matrix is held as two column-form factors, ΔW = B @ A.T with
B ``n × r`` (output side) and A ``d × r`` (input side). Nothing here forms an ``n × d`` matrix.
Small cores are computed in float64 (spec, section 2, step 4).
"""

from __future__ import annotations

import torch

#: Singular values below ``RANK_RTOL × σ_max`` are treated as zero (numerical rank).
RANK_RTOL = 1e-6


def fix_signs(U: torch.Tensor) -> torch.Tensor:
    """Sign convention: each column's largest-magnitude entry is positive (spec, section 2.4).

    Returns the ±1 vector applied, so that a paired factor can be flipped the same way.
    """
    if U.shape[1] == 0:
        return torch.ones(0, dtype=U.dtype, device=U.device)
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs[signs == 0] = 1
    return signs


def canonicalize(
    B: torch.Tensor, A: torch.Tensor, *, max_rank: int | None = None, rtol: float = 1e-10
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
    QB, RB = torch.linalg.qr(B64)
    QA, RA = torch.linalg.qr(A64)
    U, S, Vh = torch.linalg.svd(RB @ RA.T)
    keep = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    if max_rank is not None:
        keep = min(keep, max_rank)
    U, S, V = U[:, :keep], S[:keep], Vh[:keep].T
    Bc = QB @ (U * S.sqrt())
    Ac = QA @ (V * S.sqrt())
    signs = fix_signs(Bc)
    return Bc * signs, Ac * signs, S


def principal_basis(
    stack: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    n_oversamples: int = 10,
    n_iter: int = 3,
    exact_below: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors and values of ``stack`` (``n × m``), uncentered.

    Exact when ``m ≤ exact_below`` (eigh of the ``m × m`` Gram matrix in float64) or when
    ``k + n_oversamples`` covers the stack; otherwise the randomized range finder of Halko,
    Martinsson & Tropp (2011) with ``n_oversamples`` extra columns and ``n_iter`` power
    iterations re-orthonormalized by QR, from a fixed ``seed`` (spec, section 2, step 4).
    The result is clamped to the numerical rank (spec, section 2, step 5), has the sign
    convention of :func:`fix_signs`, and lives on ``stack``'s device in float32.
    """
    n, m = stack.shape
    k = min(k, n, m)
    if k <= 0 or m == 0:
        return stack.new_zeros((n, 0)), torch.zeros(0, dtype=torch.float64)
    if m <= exact_below or k + n_oversamples >= min(n, m):
        G = stack.T.to(torch.float64) @ stack.to(torch.float64) if m <= exact_below else None
        if G is not None:
            evals, V = torch.linalg.eigh(G)
            evals, V = evals.flip(0).clamp_min(0), V.flip(1)
            S = evals.sqrt()
            U = (stack.to(torch.float64) @ V[:, :k]) / torch.where(S[:k] > 0, S[:k], 1)
        else:
            U64, S, _ = torch.linalg.svd(stack.to(torch.float64), full_matrices=False)
            U = U64[:, :k]
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        omega = torch.randn(m, k + n_oversamples, generator=gen, dtype=torch.float32).to(stack.device)
        Q = torch.linalg.qr(stack @ omega).Q
        for _ in range(n_iter):
            Q = torch.linalg.qr(stack.T @ Q).Q
            Q = torch.linalg.qr(stack @ Q).Q
        small = (Q.T @ stack).to(torch.float64)
        Us, S, _ = torch.linalg.svd(small, full_matrices=False)
        U = Q.to(torch.float64) @ Us[:, :k]
    S = S.to(torch.float64).cpu()
    rank = int((S[:k] > RANK_RTOL * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    U = U[:, :rank]
    if rank:  # re-orthonormalize (the Gram route loses orthogonality in weak directions)
        Q, R = torch.linalg.qr(U)
        d = torch.sign(torch.diagonal(R))
        d[d == 0] = 1
        U = Q * d
    U = U * fix_signs(U)
    return U.to(torch.float32), S[:rank]


def frob2(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B Aᵀ‖²_F = tr((BᵀB)(AᵀA)), in float64 (spec, section 4)."""
    B, A = B.to(torch.float64), A.to(torch.float64)
    return float(((B.T @ B) * (A.T @ A)).sum())


def inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """⟨B1 A1ᵀ, B2 A2ᵀ⟩_F = tr((B1ᵀB2)(A2ᵀA1)), in float64 (spec, section 4)."""
    B1, A1, B2, A2 = (x.to(torch.float64) for x in (B1, A1, B2, A2))
    return float(((B1.T @ B2) * (A1.T @ A2)).sum())


def relative_error(B: torch.Tensor, A: torch.Tensor, Bh: torch.Tensor, Ah: torch.Tensor) -> float:
    """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F for ΔW = B Aᵀ and ΔŴ = Bh Ahᵀ, without forming either."""
    ref = frob2(B, A)
    if ref == 0:
        return 0.0 if frob2(Bh, Ah) == 0 else float("inf")
    diff = ref - 2 * inner(B, A, Bh, Ah) + frob2(Bh, Ah)
    return max(diff, 0.0) ** 0.5 / ref**0.5


def _psd_sqrt(M: torch.Tensor) -> torch.Tensor:
    evals, V = torch.linalg.eigh(M)
    return (V * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def residual_spectrum(s: torch.Tensor, Eb: torch.Tensor, Ea: torch.Tensor) -> torch.Tensor:
    """Squared singular values (descending) of R = ΔW − P_β ΔW P_α, for canonical factors.

    ``s``: the canonical singular values (``… × r``); ``Eb = βᵀB'`` and ``Ea = αᵀA'``
    (``… × k × r``), batched over tasks of equal rank. With B⊥ = (I − P_β)B' and
    A⊥ = (I − P_α)A', R = [B⊥, βE_B] [A', A⊥]ᵀ and, because B'ᵀB' = A'ᵀA' = S, both Gram
    matrices are 2r × 2r expressions in S, E_BᵀE_B and E_AᵀE_A: no n- or d-sized work.
    """
    S = torch.diag_embed(s)
    Gb = Eb.transpose(-1, -2) @ Eb
    Ga = Ea.transpose(-1, -2) @ Ea
    zero = torch.zeros_like(S)
    left = torch.cat([torch.cat([S - Gb, zero], -1), torch.cat([zero, Gb], -1)], -2)
    right = torch.cat([torch.cat([S, S - Ga], -1), torch.cat([S - Ga, S - Ga], -1)], -2)
    X = _psd_sqrt(left)
    evals = torch.linalg.eigvalsh(X @ right @ X)
    return evals.flip(-1).clamp_min(0)
