"""Bounds on old tasks' errors after an update (spec, section 5), from k-sized products.

:func:`drift_bound` bounds an old task's error after its reconstruction moved; :func:`quadratic_form`
and :func:`block_form` give the squared norms, inner products and drifts of old tasks' shared parts
from their coefficients; :func:`inside_coordinates` measures a projection onto an old span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def drift_bound(error: torch.Tensor, drift: torch.Tensor, outside: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """Upper bounds on old tasks' relative errors after an update moved their reconstructions (spec, section 5).

    With R = ΔW − ΔŴ_before (‖R‖ = ``error``) and D = ΔŴ_before − ΔŴ_after (‖D‖ = ``drift``), all
    relative to ‖ΔW‖:  ‖ΔW − ΔŴ_after‖² = e² + d² + 2⟨R, D⟩. Cauchy–Schwarz, ⟨R, D⟩ ≤ e d, gives
    the triangle bound e + d, the only one for a task about whose R nothing more is known.

    A task whose stored part is the orthogonal projection of ΔW onto S = span(β) ⊗ span(α) (it was
    encoded in these bases, with no private part) has R ⊥ S, but for ΠR, of norm a ≤ ``slack`` (η),
    left by rounding to the storage dtype. Split D = ΠD + (I − Π)D, of norms g and f = ``outside``
    (f² + g² = d²): ⟨R, D⟩ ≤ a g + √(e² − a²) f, whose largest value over a ≤ η is taken (a = e g / d
    gives e d, so the result never exceeds e + d; a = 0 gives e² + d² + 2 e f). Rotating bases
    move a reconstruction mostly out of S (f ≈ d) and gain little; dropping directions of S (f ≈ 0)
    gives Pythagoras. ``slack`` is +inf for tasks with no such structure (the triangle bound).
    Nothing stored rules the worst case out: ΔW' = ΔŴ_before + R' with R' ⊥ S along (I − Π)D has
    the same stored coefficients, error and norm, and reaches the bound (tests/test_bounds.py builds
    one; it is a matrix of any rank, so a rank-r original might stay a little below).
    """
    f = outside.clamp_min(0).minimum(drift)
    g = (drift.square() - f.square()).clamp_min(0).sqrt()
    worst = torch.where(drift > 0, error * g / drift.clamp_min(1e-300), 0.0)
    a = torch.minimum(worst, slack.clamp_min(0))
    cross = a * g + (error.square() - a.square()).clamp_min(0).sqrt() * f
    tight = (error.square() + drift.square() + 2 * cross).sqrt()
    return torch.where(torch.isfinite(slack), torch.minimum(tight, error + drift), error + drift)


def use_cores(XB: torch.Tensor, XA: torch.Tensor) -> bool:
    """Whether products go through each task's core X_B X_Aᵀ (k_B · k_A numbers, and a
    (k_B · k_A)² matrix for the form): when that is not much more than its coefficients."""
    k_B, r, k_A = XB.shape[1], XB.shape[2], XA.shape[1]
    return bool(r) and k_B * k_A <= max(4 * r * (k_B + k_A), 64)


def task_cores(XB: torch.Tensor, XA: torch.Tensor) -> torch.Tensor:
    """Every task's core X_B X_Aᵀ, flattened row-major: ``T × (k_B · k_A)`` (a sum of r outer products)."""
    T, k_B, r = XB.shape
    C = torch.zeros(T, k_B, XA.shape[1], dtype=torch.float64)
    for j in range(r):
        C += XB[:, :, j, None] * XA[:, None, :, j]
    return C.reshape(T, -1)


def quadratic_form(
    XB: torch.Tensor,
    XA: torch.Tensor,
    terms: Sequence[tuple[float, torch.Tensor | None, torch.Tensor | None]],
    cores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_terms w · tr((X_Bᵀ G X_B)(X_Aᵀ H X_A)) per task, for ``terms`` (w, G, H) (None: identity).

    With G = βᵀβ', H = αᵀα' a term is w ⟨β X_B (α X_A)ᵀ, β' X_B (α' X_A)ᵀ⟩ (G, H symmetric), so
    squared norms, inner products and drifts of the old tasks' shared parts come from k-sized
    products (spec, section 4). Through the cores c = vec(X_B X_Aᵀ) the sum is the one quadratic
    form cᵀ (Σ w G ⊗ H) c: one matrix product for all terms, whose cancellations (a drift) happen
    in the k-sized matrix. For k ≫ r, per term the r × r blocks Xᵀ G X of each side instead.
    """
    T, k_B, r = XB.shape
    k_A = XA.shape[1]
    if r == 0 or T == 0:
        return torch.zeros(T, dtype=torch.float64)
    eye_B, eye_A = torch.eye(k_B, dtype=torch.float64), torch.eye(k_A, dtype=torch.float64)
    if cores is None and use_cores(XB, XA):
        cores = task_cores(XB, XA)
    if cores is not None:
        if all(G is None and H is None for _, G, H in terms):  # a multiple of ‖C‖²: no product needed
            return sum(w for w, _, _ in terms) * cores.pow(2).sum(1)
        K = sum(w * torch.kron(eye_B if G is None else G, eye_A if H is None else H) for w, G, H in terms)
        return ((cores @ K) * cores).sum(1)
    return block_form(XB, XA, terms)


def block_form(
    XB: torch.Tensor, XA: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor | None, torch.Tensor | None]]
) -> torch.Tensor:
    """:func:`quadratic_form` through each task's r × r blocks Xᵀ G X, per term: k² r work per task
    and term rather than the cores' (k_B k_A)², for sums whose cancellations float64 can afford."""
    T = XB.shape[0]
    out = torch.zeros(T, dtype=torch.float64)
    if XB.shape[2] == 0:
        return out
    for w, G, H in terms:
        QB = XB.transpose(1, 2) @ (XB if G is None else G @ XB)  # r × r per task
        QA = XA.transpose(1, 2) @ (XA if H is None else H @ XA)
        out += w * (QB * QA).sum((1, 2))
    return out


def inside_coordinates(old: torch.Tensor, new: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """V (k_old × k) with ‖V x‖ = ‖Π_old new x‖ for every x, Π_old the orthogonal projection onto
    span(``old``): with G = oldᵀold = L Lᵀ (``L``, computed once per basis), V = L⁻¹ oldᵀ new (G is
    the identity but for rounding)."""
    return torch.linalg.solve_triangular(L, old.T @ new, upper=False)


@dataclass(frozen=True)
class OldSpan:
    """One set of old bases and the Cholesky factors of their Gram matrices (see :func:`inside_coordinates`)."""

    beta: torch.Tensor
    alpha: torch.Tensor
    L_B: torch.Tensor
    L_A: torch.Tensor
