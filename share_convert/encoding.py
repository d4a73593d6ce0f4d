"""Encoding one module's tasks in its stored bases: coefficients, private factors, exact errors.

Given the bases as stored (rounded to the storage dtype), each task gets balanced coefficients
(spec, section 2, step 7), optionally a private rank-q correction of what the bases miss
(section 6), and its relative ΔW error computed from the tensors exactly as written (section 4).
The Gram matrices Σ w E Eᵀ of the stored coefficients are kept beside the bases (section 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .linalg import canonicalize
from .planning import ModulePlan

if TYPE_CHECKING:
    from .consolidation import ModuleMember, ModuleResult


def store_bases(
    name: str, beta, alpha, plan: ModulePlan, dtype: torch.dtype, result: ModuleResult, prefix: str | None = None
):
    """Round the chosen bases to the storage dtype and add them to ``result``."""
    if not (plan.k_B and plan.k_A):
        return None, None
    prefix = prefix or f"modules/{name}/"
    beta_s, alpha_s = beta[:, : plan.k_B].cpu().to(dtype), alpha[:, : plan.k_A].cpu().to(dtype)
    result.tensors[f"{prefix}basis_B"] = beta_s
    result.tensors[f"{prefix}basis_A"] = alpha_s
    return beta_s, alpha_s


def store_grams(
    name: str,
    result: ModuleResult,
    weighted_tasks: list[tuple[str, float]],
    plan: ModulePlan,
    prefix: str | None = None,
    known: dict[str, torch.Tensor] | None = None,
) -> None:
    """Σ_i w_i E_i E_iᵀ over the stored coefficients, per side: the stack as the checkpoint knows it
    (spec, section 5). Kept so that later updates cost nothing per old task. ``known`` holds the
    sum over tasks not in ``weighted_tasks``, per side (the old tasks of an update)."""
    if not (plan.k_B and plan.k_A):
        return
    for side, k in (("B", plan.k_B), ("A", plan.k_A)):
        coefs, scales = [torch.zeros(k, 0)], []
        for task, w in weighted_tasks:
            c = result.task_parts.get(task, {}).get(f"coef_{side}")
            if c is not None:
                coefs.append(c.float())
                scales.append(torch.full((c.shape[1],), w, dtype=torch.float64))
        # Σ_i w_i c_i c_iᵀ as one product over the side-by-side coefficients
        C = torch.cat(coefs, 1).double()
        w = torch.cat(scales) if scales else torch.zeros(0, dtype=torch.float64)
        G = (C * w) @ C.T
        if known is not None:
            G = G + known[side]
        result.tensors[f"{prefix or f'modules/{name}/'}gram_{side}"] = G.to(torch.float32)


@dataclass
class StoredBases:
    """The bases as stored (rounded to the storage dtype), in float64, with their Gram matrices."""

    beta: torch.Tensor
    alpha: torch.Tensor
    gram_beta: torch.Tensor
    gram_alpha: torch.Tensor
    beta32: torch.Tensor
    alpha32: torch.Tensor

    @classmethod
    def of(cls, beta_s: torch.Tensor | None, alpha_s: torch.Tensor | None) -> StoredBases | None:
        if beta_s is None or alpha_s is None:
            return None
        b64, a64 = beta_s.to(torch.float64), alpha_s.to(torch.float64)
        return cls(b64, a64, b64.T @ b64, a64.T @ a64, beta_s.float(), alpha_s.float())


def coordinates(members: Sequence[ModuleMember], bases: StoredBases | None, chunk: int = 64) -> list:
    """(βᵀBc, αᵀAc) of every member, batched in chunks (one float32 matmul per chunk and side)."""
    if bases is None:
        return [None] * len(members)
    out: list = []
    for start in range(0, len(members), chunk):
        part = members[start : start + chunk]
        widths = [m.Bc.shape[1] for m in part]
        Eb = (bases.beta32.T @ torch.cat([m.Bc for m in part], 1)).double().split(widths, 1)
        Ea = (bases.alpha32.T @ torch.cat([m.Ac for m in part], 1)).double().split(widths, 1)
        out += list(zip(Eb, Ea))
    return out


#: Below this error, the float32 coordinates are not precise enough (e² = 1 − ‖C‖²/‖ΔW‖² cancels):
#: the error is recomputed in float64.
PRECISE_BELOW = 0.02


def encode_task(
    m: ModuleMember,
    q: int,
    bases: StoredBases | None,
    dtype: torch.dtype,
    norm: float,
    coords: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One task's coefficients and private factors in the stored bases, and its ΔW error."""
    tensors: dict[str, torch.Tensor] = {}
    f64 = torch.float64
    p = 0
    shared_B = shared_A = None
    if bases is not None:
        Eb, Ea = coords if coords is not None else (bases.beta.T @ m.Bc.double(), bases.alpha.T @ m.Ac.double())
        cB, cA, _ = canonicalize(Eb, Ea)  # balanced core E_B E_Aᵀ of rank p ≤ r (spec, section 2.7)
        p = cB.shape[1]
        if p:
            tensors["coef_B"], tensors["coef_A"] = cB.to(dtype), cA.to(dtype)
            if q:
                shared_B = bases.beta @ tensors["coef_B"].to(f64)
                shared_A = bases.alpha @ tensors["coef_A"].to(f64)
    if q:
        Bc, Ac = m.Bc.to(f64), m.Ac.to(f64)
        if shared_B is None:
            PB, PA, _ = canonicalize(Bc, Ac, max_rank=q)  # no shared part: the task's own top q
        else:  # residual ΔW − ΔŴ_shared as factors [Bc, −β cB] [Ac, α cA]ᵀ; its best rank-q part (spec, section 6)
            PB, PA, _ = canonicalize(torch.cat([Bc, -shared_B], 1), torch.cat([Ac, shared_A], 1), max_rank=q)
        q = PB.shape[1]
        if q:
            tensors["private_B"], tensors["private_A"] = PB.to(dtype), PA.T.contiguous().to(dtype)
    err = stored_error(m, tensors, bases, coords)
    if err < PRECISE_BELOW and coords is not None:
        err = stored_error(m, tensors, bases, None)
    record: dict[str, Any] = {"rank": p, "private_rank": q, "original_rank": m.rank, "error": err, "norm": norm}
    if m.prior is not None:  # the input was itself a reconstruction: bound the error to the original
        prior_err, prior_norm, prior_bound = m.prior
        drift = err * norm / prior_norm if prior_norm > 0 else 0.0
        record.update(error=prior_err + drift, norm=prior_norm, bound=prior_bound or drift > 1e-6)
    return tensors, record


def stored_error(
    m: ModuleMember,
    tensors: dict[str, torch.Tensor],
    bases: StoredBases | None,
    coords: tuple[torch.Tensor, torch.Tensor] | None,
) -> float:
    """‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of the tensors as stored (rounded to their dtype), by traces of small
    products (spec, section 4). With ``coords`` (float32 coordinates), fast; without, float64 throughout,
    with ΔW = Bc Acᵀ as the reference so that a perfect reconstruction reads as (almost exactly) zero."""
    f64 = torch.float64
    precise = coords is None
    Bc = Ac = None
    if precise or "private_B" in tensors:
        Bc, Ac = m.Bc.to(f64), m.Ac.to(f64)
    ref2 = float(((Bc.T @ Bc) * (Ac.T @ Ac)).sum()) if precise else float((m.s**2).sum())
    if ref2 <= 0:
        return 0.0
    cross = recon2 = 0.0
    shared_B = shared_A = None
    if "coef_B" in tensors:
        Eb, Ea = (bases.beta.T @ Bc, bases.alpha.T @ Ac) if precise else coords
        cB, cA = tensors["coef_B"].to(f64), tensors["coef_A"].to(f64)
        cross += float(((Eb.T @ cB) * (Ea.T @ cA)).sum())
        recon2 += float(((cB.T @ bases.gram_beta @ cB) * (cA.T @ bases.gram_alpha @ cA)).sum())
        if "private_B" in tensors:
            shared_B, shared_A = bases.beta @ cB, bases.alpha @ cA
    if "private_B" in tensors:
        PB, PA = tensors["private_B"].to(f64), tensors["private_A"].to(f64).T
        cross += float(((Bc.T @ PB) * (Ac.T @ PA)).sum())
        recon2 += float(((PB.T @ PB) * (PA.T @ PA)).sum())
        if shared_B is not None:
            recon2 += 2 * float(((shared_B.T @ PB) * (shared_A.T @ PA)).sum())
    return (max(ref2 - 2 * cross + recon2, 0.0) / ref2) ** 0.5
