"""Encoding one module's tasks in its stored bases: coefficients, private factors, exact errors.

Given the bases as stored (rounded to the storage dtype), each task gets balanced coefficients
(spec, section 2, step 7), optionally a private rank-q correction of what the bases miss
(section 6), and its relative ΔW error computed from the tensors exactly as written (section 4).
The Gram matrices Σ w E Eᵀ of the stored coefficients are kept beside the bases (section 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..math.linalg import canonicalize, canonicalize_padded, fix_signs, left_batched, relative_errors
from ..math.tolerances import CANONICAL_RTOL, DRIFT_BOUND_ABOVE
from ..math.traces import frobenius2, trace_product
from .members import ModuleMember
from .planning import ModulePlan
from .precision import Precisions, TaskCodes
from .results import ModuleResult

#: Every factor in the module's float dtype (as before precisions existed).
FLOAT = Precisions()


def store_bases(
    name: str,
    beta,
    alpha,
    plan: ModulePlan,
    dtype: torch.dtype,
    result: ModuleResult,
    prefix: str | None = None,
    precision: Precisions = FLOAT,
):
    """Round the chosen bases to the storage dtype and add them to ``result`` (on the CPU, to be
    written at ``precision``); returns the bases on their device as a reader gets them back
    (dequantized where ``precision`` quantizes them), for encoding."""
    if not (plan.k_B and plan.k_A):
        return None, None
    prefix = prefix or f"modules/{name}/"
    beta_s, alpha_s = beta[:, : plan.k_B].to(dtype), alpha[:, : plan.k_A].to(dtype)
    result.tensors[f"{prefix}basis_B"] = beta_s.cpu()
    result.tensors[f"{prefix}basis_A"] = alpha_s.cpu()
    if precision.bases is None:
        return beta_s, alpha_s
    return precision.rows_as_stored(beta_s, "bases", dtype), precision.rows_as_stored(alpha_s, "bases", dtype)


def store_grams(
    name: str,
    result: ModuleResult,
    weighted_tasks: list[tuple[str, float]],
    plan: ModulePlan,
    prefix: str | None = None,
    known: dict[str, torch.Tensor] | None = None,
    precision: Precisions = FLOAT,
) -> None:
    """Σ_i w_i E_i E_iᵀ over the stored coefficients (as a reader gets them back: dequantized where
    ``precision`` quantizes them), per side: the stack as the checkpoint knows it (spec, section 5).
    Kept so that later updates cost nothing per old task. ``known`` holds the sum over tasks not in
    ``weighted_tasks``, per side (the old tasks of an update)."""
    if not (plan.k_B and plan.k_A):
        return
    for side, k in (("B", plan.k_B), ("A", plan.k_A)):
        coefs, scales = [torch.zeros(k, 0)], []
        for task, w in weighted_tasks:
            c = result.task_parts.get(task, {}).get(f"coef_{side}")
            if c is not None:
                if precision.coefs is not None:  # stored rows are the columns of c (their codes, where made)
                    codes = result.task_codes.rows(task, f"coef_{side}")
                    c = precision.rows_as_stored(c.T, "coefs", c.dtype, codes).T
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
        Eb = (bases.beta32.T @ _side_by_side([m.Bc for m in part])).double().split(widths, 1)
        Ea = (bases.alpha32.T @ _side_by_side([m.Ac for m in part])).double().split(widths, 1)
        out += list(zip(Eb, Ea))
    return out


def _side_by_side(factors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(factors, 1)``; factors of one width are stacked instead: the same values in the
    same layout, in one strided copy instead of one per factor (64 factors of 4096 × 16: 3.2–4.3
    against 4.6–6.3 ms here)."""
    if len({f.shape[1] for f in factors}) == 1:
        return torch.stack(factors, 1).view(factors[0].shape[0], -1)
    return torch.cat(factors, 1)


#: Below this error, the float32 coordinates are not precise enough (e² = 1 − ‖C‖²/‖ΔW‖² cancels):
#: the error is recomputed in float64.
PRECISE_BELOW = 0.02


def exact_coordinates(members: Sequence[ModuleMember], bases: StoredBases) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(βᵀBc, αᵀAc) of every member in float64, one product per member and side.

    What ``add`` records its new tasks from. Per member, not as one product over the side-by-side
    factors: a wider product may sum in another order (BLAS picks its kernel by shape), and add's
    outputs must not change by one bit.
    """
    return [(bases.beta.T @ m.Bc.double(), bases.alpha.T @ m.Ac.double()) for m in members]


def encode_in_bases(
    members: Sequence[ModuleMember],
    qs: Sequence[int],
    bases: StoredBases | None,
    dtype: torch.dtype,
    norms: Sequence[float],
    coords: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    factors: str = "batched",
    errors: str = "batched",
    precision: Precisions = FLOAT,
    codes: TaskCodes | None = None,
) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Many tasks of a module in its shared bases, each with a private rank q (0 for none),
    batched per (rank, q): their coefficients, private factors and ΔW errors.

    One batched balanced SVD of the coordinates gives the coefficients (spec, section 2, step 7);
    where q > 0, the best rank-q part of each residual ΔW − ΔŴ_shared = [Bc, −β cB] [Ac, α cA]ᵀ
    (section 6) comes from one batched QR per side and one batched SVD of the small cores.

    ``coords``: each task's coordinates (βᵀBc, αᵀAc); merge passes :func:`coordinates` (float32
    products, then float64). ``None``: float64 products per task (:func:`exact_coordinates`), as
    ``add`` computes them for its new tasks.

    ``factors``: ``"batched"`` (merge): the factorizations above, one per group. ``"per_task"``
    (add): :func:`canonicalize` of each task's coordinates and of its residual (the Cholesky route
    where well-conditioned), the factorization ``add`` has always stored. Both are the balanced SVD
    form, but they round differently: a stored float32 value can differ in its last bit.

    ``errors``: errors are those of the tensors as stored (section 4). ``"batched"`` (merge): by
    batched traces from the coordinates, in float64 from the canonical factors for tasks below
    ``PRECISE_BELOW``. ``"stored"`` (add): per task by :func:`stored_error` in float64 throughout,
    the arithmetic ``add`` has always recorded.

    ``bases`` None (a plan that keeps no shared directions; only with ``errors="stored"``): no
    coefficients, each task's own best rank-q part by the same QR and SVD. Merge encodes such
    modules with :func:`encode_private_only`.

    ``precision``: where coefficients and private factors are stored (``bases`` are already as a
    reader gets them back). The tensors returned are what the writer is handed (the float dtype);
    the private part is fitted to the residual of the shared part as read back, and every error
    is that of the values read back (dequantized), so records say what extraction gives.
    ``codes``, when given, receives the codes of the rows stored as codes (:class:`TaskCodes`).
    """
    if errors not in ("batched", "stored") or factors not in ("batched", "per_task"):
        raise ValueError(
            f"factors must be 'batched' or 'per_task', errors 'batched' or 'stored': {factors!r}, {errors!r}"
        )
    if bases is None and errors == "batched":
        raise ValueError("batched errors need shared bases: without them, use encode_private_only")
    if coords is None and bases is not None:
        coords = exact_coordinates(members, bases)
    out: list[tuple[dict[str, torch.Tensor], dict[str, Any]] | None] = [None] * len(members)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (m, q) in enumerate(zip(members, qs)):
        groups.setdefault((int(m.Bc.shape[1]), int(q)), []).append(i)
    f64 = torch.float64

    for (r, q), idx in groups.items():
        if r == 0:  # ΔW = 0: nothing to store, and its error is 0 by definition
            for i in idx:
                out[i] = ({}, _record(members[i], {}, 0.0, norms[i]))
            continue
        if factors == "per_task":
            for i in idx:
                tensors, vals = _task_factors(
                    members[i], q, bases, dtype, coords[i] if bases is not None else None, precision
                )
                out[i] = (tensors, _record(members[i], tensors, stored_error(members[i], vals, bases, None), norms[i]))
            continue
        if bases is not None:
            EB = torch.stack([coords[i][0] for i in idx])  # t × k_B × r, float64
            EA = torch.stack([coords[i][1] for i in idx])
            CB, CA, _S, ranks = canonicalize_padded(EB, EA)
            CB, CA = CB.to(dtype), CA.to(dtype)  # as stored
            codes_cB = codes_cA = None
            if precision.coefs is None:
                cB, cA = CB.to(f64), CA.to(f64)
            else:  # as read back: each stored row (a column of E) at the coefficients' precision
                rows_B, rows_A = CB.transpose(1, 2), CA.transpose(1, 2)
                (cB, codes_cB), (cA, codes_cA) = (precision.read_back(x, "coefs", dtype) for x in (rows_B, rows_A))
                cB, cA = cB.transpose(1, 2).to(f64), cA.transpose(1, 2).to(f64)
        else:  # no shared bases: no coefficients, each task's own top q directions
            ranks = torch.zeros(len(idx), dtype=torch.int64)
        batched = errors == "batched"
        if batched:
            ref2 = torch.stack([members[i].s for i in idx]).to(f64).pow(2).sum(-1)  # one reduction, not one per task
            cross = trace_product(EB, EA, cB, cA)
            recon2 = trace_product(cB, cA, cB, cA, bases.gram_beta, bases.gram_alpha)
        keep = torch.zeros(len(idx), dtype=torch.int64, device=members[idx[0]].Bc.device)
        codes_PB = codes_PA = None
        if q:
            Bc = torch.stack([members[i].Bc for i in idx]).to(f64)  # t × n × r
            Ac = torch.stack([members[i].Ac for i in idx]).to(f64)
            if bases is not None:  # the residual ΔW − ΔŴ_shared as side-by-side factors
                shared_B, shared_A = left_batched(bases.beta, cB), left_batched(bases.alpha, cA)  # as stored
                Bc_res, Ac_res = torch.cat([Bc, -shared_B], -1), torch.cat([Ac, shared_A], -1)
            else:
                Bc_res, Ac_res = Bc, Ac
            # its best rank-q part: QR of the side-by-side factors, SVD of the small core
            QB, RB = torch.linalg.qr(Bc_res)
            QA, RA = torch.linalg.qr(Ac_res)
            U, S, Vh = torch.linalg.svd(RB @ RA.transpose(-1, -2))
            top = S[:, :1]
            keep = ((S > CANONICAL_RTOL * top) & (top > 0)).sum(-1).clamp(max=q)
            live = (torch.arange(S.shape[-1], device=S.device) < keep[:, None])[:, :q].to(f64)  # t × q
            half = (S[:, :q].sqrt() * live).unsqueeze(-2)
            PB = QB @ (U[:, :, :q] * half)
            PA = QA @ (Vh.transpose(-1, -2)[:, :, :q] * half)
            signs = fix_signs(PB).unsqueeze(-2)
            PB, PA = (PB * signs).to(dtype), (PA * signs).to(dtype)  # as stored
            if batched:
                PB64, PA64 = PB.to(f64), PA.to(f64)
                if precision.private is not None:  # as read back: rows of P_Bᵀ and of P_A
                    rows_B, rows_A = PB.transpose(1, 2), PA.transpose(1, 2)
                    (PB64, codes_PB), (PA64, codes_PA) = (
                        precision.read_back(x, "private", dtype) for x in (rows_B, rows_A)
                    )
                    PB64, PA64 = PB64.transpose(1, 2).to(f64), PA64.transpose(1, 2).to(f64)
                cross_private = trace_product(Bc, Ac, PB64, PA64)
                cross = cross + cross_private
                recon2 = (
                    recon2 + trace_product(PB64, PA64, PB64, PA64) + 2 * trace_product(shared_B, shared_A, PB64, PA64)
                )
        if batched:
            err = relative_errors(ref2, cross, recon2)
            close = err < PRECISE_BELOW
            if bool(close.any()):  # the float32 coordinates are not precise enough there: float64 throughout
                pick = torch.nonzero(close).flatten()
                if q:
                    B, A = Bc[pick], Ac[pick]
                else:
                    B = torch.stack([members[idx[j]].Bc for j in pick.tolist()]).to(f64)
                    A = torch.stack([members[idx[j]].Ac for j in pick.tolist()]).to(f64)
                Eb, Ea = left_batched(bases.beta.T, B), left_batched(bases.alpha.T, A)
                precise_cross = trace_product(Eb, Ea, cB[pick], cA[pick])
                if q:
                    precise_cross = precise_cross + cross_private[pick]
                err = err.clone()
                err[pick] = relative_errors(trace_product(B, A, B, A), precise_cross, recon2[pick])
            errs = err.tolist()
        # what is written comes back from the compute device at once, not task by task
        if bases is not None:
            CB, CA = CB.cpu(), CA.cpu()
        PB, PA = (PB.cpu(), PA.cpu()) if q else (None, None)
        for j, (i, p, k) in enumerate(zip(idx, ranks.tolist(), keep.tolist())):
            tensors = {"coef_B": CB[j, :, :p], "coef_A": CA[j, :, :p]} if p else {}
            if k:
                tensors["private_B"] = PB[j, :, :k]
                tensors["private_A"] = PA[j, :, :k].T.contiguous()
            if codes is not None and bases is not None:  # rows j·r … of the coefficients, j·q … of private factors
                codes.keep(members[i].task, "coef_B", codes_cB, j * CB.shape[-1], j * CB.shape[-1] + p)
                codes.keep(members[i].task, "coef_A", codes_cA, j * CA.shape[-1], j * CA.shape[-1] + p)
            if codes is not None and k:
                codes.keep(members[i].task, "private_B", codes_PB, j * q, j * q + k)
                codes.keep(members[i].task, "private_A", codes_PA, j * q, j * q + k)
            err = errs[j] if batched else stored_error(members[i], _as_read(tensors, precision), bases, None)
            out[i] = (tensors, _record(members[i], tensors, err, norms[i]))
    return out  # type: ignore[return-value]


def _as_read(tensors: dict[str, torch.Tensor], precision: Precisions) -> dict[str, torch.Tensor]:
    """A task's tensors (coef_B k_B × p, coef_A, private_B n × q, private_A q × d) as a reader gets
    them back at ``precision`` (its stored rows: columns of the coefficients and of private_B, rows of
    private_A)."""
    if precision.is_float:
        return tensors
    out = {}
    for key, x in tensors.items():
        part = "coefs" if key.startswith("coef") else "private"
        rows_are_columns = key != "private_A"
        rows = x.T if rows_are_columns else x
        back = precision.rows_as_stored(rows, part, x.dtype)
        out[key] = back.T if rows_are_columns else back
    return out


def _task_factors(
    m: ModuleMember,
    q: int,
    bases: StoredBases | None,
    dtype: torch.dtype,
    coords: tuple[torch.Tensor, torch.Tensor] | None,
    precision: Precisions = FLOAT,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One task's coefficients and private factors as stored, by :func:`canonicalize` (``factors="per_task"``),
    and as a reader gets them back at ``precision``."""
    tensors: dict[str, torch.Tensor] = {}
    f64 = torch.float64
    shared_B = shared_A = None
    if bases is not None:
        cB, cA, _ = canonicalize(*coords)  # balanced core E_B E_Aᵀ of rank p ≤ r (spec, section 2.7)
        if cB.shape[1]:
            tensors["coef_B"], tensors["coef_A"] = cB.to(dtype), cA.to(dtype)
            if q:
                read = _as_read(tensors, precision)
                shared_B = bases.beta @ read["coef_B"].to(f64)
                shared_A = bases.alpha @ read["coef_A"].to(f64)
    if q:
        Bc, Ac = m.Bc.to(f64), m.Ac.to(f64)
        if shared_B is None:
            PB, PA, _ = canonicalize(Bc, Ac, max_rank=q)  # no shared part: the task's own top q
        else:  # residual ΔW − ΔŴ_shared as factors [Bc, −β cB] [Ac, α cA]ᵀ; its best rank-q part (spec, section 6)
            PB, PA, _ = canonicalize(torch.cat([Bc, -shared_B], 1), torch.cat([Ac, shared_A], 1), max_rank=q)
        if PB.shape[1]:
            tensors["private_B"], tensors["private_A"] = PB.to(dtype), PA.T.contiguous().to(dtype)
    return tensors, _as_read(tensors, precision)


def _record(m: ModuleMember, tensors: dict[str, torch.Tensor], error: float, norm: float) -> dict[str, Any]:
    """A new task's record: its ranks as stored, its error and the norm of its ΔW."""
    rank = tensors["coef_B"].shape[1] if "coef_B" in tensors else 0
    private_rank = tensors["private_B"].shape[1] if "private_B" in tensors else 0
    record = {"rank": rank, "private_rank": private_rank, "original_rank": m.rank, "error": error, "norm": norm}
    return _with_prior(m, record)


def encode_private_only(
    members: Sequence[ModuleMember],
    qs: Sequence[int],
    dtype: torch.dtype,
    norms: Sequence[float],
    precision: Precisions = FLOAT,
    codes: TaskCodes | None = None,
) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """:func:`encode_in_bases` of many tasks in a module without shared bases (k = 0), for merge.

    Each task keeps its own top q directions (spec, section 6, independent truncation). Its
    canonical factors are already in balanced SVD form, singular values descending, so those are
    their first q columns; errors by batched traces of the tensors as stored (section 4).
    ``codes``, when given, receives the codes of the rows stored as codes (:class:`TaskCodes`).
    """
    out: list[tuple[dict[str, torch.Tensor], dict[str, Any]] | None] = [None] * len(members)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (m, q) in enumerate(zip(members, qs)):
        groups.setdefault((int(m.Bc.shape[1]), min(int(q), int(m.Bc.shape[1]))), []).append(i)
    for (_r, q), idx in groups.items():
        Bc = torch.stack([members[i].Bc for i in idx])  # t × n × r
        Ac = torch.stack([members[i].Ac for i in idx])
        PB = Bc[:, :, :q].to(dtype)
        PA = Ac[:, :, :q].transpose(-1, -2).to(dtype)  # t × q × d
        # ΔW − ΔŴ = Σ_{j≥q} b_j a_jᵀ − Σ_{j<q} b_j δa_jᵀ − δB PAᵀ, with δ the rounding of the
        # stored factors (exact in float32): one product X Yᵀ of n- and d-sized factors that holds
        # the difference itself, so its norm (section 4's trace of Gram matrices, in float32, summed
        # in float64) does not cancel large terms, and small errors need no float64 pass.
        PBf, PAf = PB.float(), PA.float()
        codes_B = codes_A = None
        if precision.private is not None:  # as read back: rows of P_Bᵀ and of P_A
            (PBf, codes_B), (PAf, codes_A) = (
                precision.read_back(x, "private", dtype) for x in (PB.transpose(1, 2), PA)
            )
            PBf, PAf = PBf.transpose(1, 2).float(), PAf.float()
        dA = PAf.transpose(-1, -2) - Ac[:, :, :q]
        X = torch.cat([Bc, PBf - Bc[:, :, :q]], -1)
        Y = torch.cat([-dA, Ac[:, :, q:], -PAf.transpose(-1, -2)], -1)
        diff2 = frobenius2(X, Y, dtype=torch.float64)
        ref2 = frobenius2(Bc, Ac, dtype=torch.float64)
        err = torch.where(ref2 > 0, (diff2.clamp_min(0) / ref2.clamp_min(1e-300)).sqrt(), 0.0)
        # what is written, back from the compute device at once (one view per task, made in one call)
        PBs, PAs = PB.cpu().unbind(0), PA.cpu().unbind(0)
        for j, (i, e) in enumerate(zip(idx, err.tolist())):
            m = members[i]
            tensors = {"private_B": PBs[j], "private_A": PAs[j]} if q else {}
            if codes is not None:
                codes.keep(m.task, "private_B", codes_B, j * q, (j + 1) * q)
                codes.keep(m.task, "private_A", codes_A, j * q, (j + 1) * q)
            record: dict[str, Any] = {
                "rank": 0,
                "private_rank": q,
                "original_rank": m.rank,
                "error": e,
                "norm": norms[i],
            }
            out[i] = (tensors, _with_prior(m, record))
    return out  # type: ignore[return-value]


def _with_prior(m: ModuleMember, record: dict[str, Any]) -> dict[str, Any]:
    """A record whose task was itself a reconstruction: its error becomes a bound to the original."""
    if m.prior is not None:
        prior_err, prior_norm, prior_bound = m.prior
        err, norm = record["error"], record["norm"]
        drift = err * norm / prior_norm if prior_norm > 0 else 0.0
        record.update(error=prior_err + drift, norm=prior_norm, bound=prior_bound or drift > DRIFT_BOUND_ABOVE)
    return record


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
    ref2 = float(frobenius2(Bc, Ac)) if precise else float((m.s**2).sum())
    if ref2 <= 0:
        return 0.0
    cross = recon2 = 0.0
    shared_B = shared_A = None
    if "coef_B" in tensors:
        Eb, Ea = (bases.beta.T @ Bc, bases.alpha.T @ Ac) if precise else coords
        cB, cA = tensors["coef_B"].to(f64), tensors["coef_A"].to(f64)
        cross += float(trace_product(Eb, Ea, cB, cA))
        recon2 += float(trace_product(cB, cA, cB, cA, bases.gram_beta, bases.gram_alpha))
        if "private_B" in tensors:
            shared_B, shared_A = bases.beta @ cB, bases.alpha @ cA
    if "private_B" in tensors:
        PB, PA = tensors["private_B"].to(f64), tensors["private_A"].to(f64).T
        cross += float(trace_product(Bc, Ac, PB, PA))
        recon2 += float(frobenius2(PB, PA))
        if shared_B is not None:
            recon2 += 2 * float(trace_product(shared_B, shared_A, PB, PA))
    return (max(ref2 - 2 * cross + recon2, 0.0) / ref2) ** 0.5
