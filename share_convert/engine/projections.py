"""Old tasks whose stored part is a projection in their bases: the slack η of the tighter bound."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..checkpoint.entries import ModuleEntry
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable
from ..dtypes import UNIT_ROUNDOFF
from .old_tasks import OldCoefficients
from .planning import task_weights


def projection_slack(
    ckpt: Checkpoint,
    entry: ModuleEntry,
    table: RecordTable,
    old: OldCoefficients,
    b_old: torch.Tensor,
    a_old: torch.Tensor,
    norm2: torch.Tensor,
    grams: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """η of :func:`share_convert.engine.planning.drift_bound` per old task: a bound on ‖Π R‖ / ‖ΔW‖, with
    R = ΔW − ΔŴ and Π the projection onto span(β) ⊗ span(α) of the stored bases; +inf where
    nothing better than the triangle bound is known. ``grams``: the bases' Gram matrices βᵀβ and
    αᵀα when the caller has them.

    Finite only for tasks encoded by the operation that wrote the checkpoint (``drift`` −1, so
    their coefficients were computed in these very bases), with an exact error (not ``bound``), not
    taken from another checkpoint (whose error is relative to an earlier reconstruction) and with no
    private part (the private correction of the residual has a component in the span). For those the
    stored core C is βᵀΔWα up to rounding (spec, section 2, step 6), so that Π R = Π ΔW − β C αᵀ
    comes only from the storage dtype (unit roundoff u, each factor of C rounded) and from the stored
    bases being orthonormal only to that precision (‖βᵀβ − I‖₂ = ε_B):
    ‖Π R‖ ≤ √((1+ε_B)(1+ε_A)) [(1+δ_B)(1+δ_A)(2u + u²) ‖c_B‖ ‖c_A‖ + (δ_B + δ_A + δ_B δ_A) ‖C‖],
    δ = ε / (1 − ε). u also carries √max(n, d) · 2⁻²³ for the float32 products the coordinates come
    from (a typical-case margin, not a proof: recorded errors are accurate to that precision too).
    """
    T = len(table)
    inf = torch.full((T,), torch.inf, dtype=torch.float64)
    if T == 0 or b_old.shape[1] == 0 or a_old.shape[1] == 0:
        return inf
    eligible = projection_eligible(ckpt, table)
    if not eligible.any():
        return inf
    n, d = entry.shape
    u = UNIT_ROUNDOFF.get(entry.dtype, 2.0**-8) + max(n, d) ** 0.5 * 2.0**-23

    def defect(gram: torch.Tensor) -> float:  # how far the stored basis is from orthonormal
        return float(torch.linalg.eigvalsh(gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())

    gram_B, gram_A = grams if grams is not None else (b_old.T @ b_old, a_old.T @ a_old)
    eps_B, eps_A = defect(gram_B), defect(gram_A)
    if max(eps_B, eps_A) >= 0.5:
        return inf
    dB, dA = eps_B / (1 - eps_B), eps_A / (1 - eps_A)
    coefs = (old.XB.square().sum((1, 2)) * old.XA.square().sum((1, 2))).sqrt()
    core = norm2.clamp_min(0).sqrt()
    eta = ((1 + eps_B) * (1 + eps_A)) ** 0.5 * (
        (1 + dB) * (1 + dA) * (2 * u + u * u) * coefs + (dB + dA + dB * dA) * core
    )
    eta = eta * task_weights(table.float_column("norm"), "equal")
    return torch.where(torch.from_numpy(eligible), eta, inf)


def projection_eligible(ckpt: Checkpoint, table: RecordTable) -> np.ndarray:
    """Which tasks of ``table`` :func:`projection_slack` can bound (from their records alone)."""
    eligible = (
        (table.int_column("bound") == 0)
        & (table.float_column("drift") < 0)
        & (table.int_column("private_rank") == 0)
        & (table.float_column("norm") > 0)
    )
    reconstructed = reconstructed_tasks(ckpt)
    if reconstructed:
        eligible &= ~np.isin(np.asarray(table.tasks, dtype=object), reconstructed)
    return eligible


_RECONSTRUCTED: weakref.WeakKeyDictionary[Checkpoint, list[str]] = weakref.WeakKeyDictionary()


def reconstructed_tasks(ckpt: Checkpoint) -> list[str]:
    """The tasks of ``ckpt`` taken from another checkpoint (their originals were reconstructions),
    found once per checkpoint rather than once per module."""
    if ckpt not in _RECONSTRUCTED:
        _RECONSTRUCTED[ckpt] = [t for t, rec in ckpt.tasks.items() if rec.get("from_checkpoint")]
    return _RECONSTRUCTED[ckpt]
