"""The tasks a planner sees: one task's figures in candidate bases, and tasks held frozen."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..math.bounds import drift_bound
from ..math.linalg import left_batched
from ..math.traces import frobenius2


@dataclass
class TaskFit:
    """One task in one module: canonical singular values and coordinates in the bases.

    A task that is itself a reconstruction (from a checkpoint) carries its error so far
    (``prior``) and ``ratio`` = ‖ΔŴ‖ / ‖ΔW‖: its planned error is then the bound
    prior + ratio × (error relative to ΔŴ), the figure its record will show (spec, section 5).
    Where the reconstruction was a projection of its original onto its checkpoint's bases
    (``slack`` finite: η of :func:`drift_bound`), plans that keep each task's own directions (k = 0)
    stay inside those bases, and the planned bound is :func:`drift_bound`'s with no outside part.
    """

    s: torch.Tensor  # (r,) float64, canonical singular values of ΔW
    Eb: torch.Tensor  # (K_B, r) float64, βᵀB'
    Ea: torch.Tensor  # (K_A, r) float64, αᵀA'
    prior: float = 0.0
    ratio: float = 1.0
    slack: float = math.inf

    def __post_init__(self) -> None:
        self.rank = int(self.s.numel())
        self.norm2 = float((self.s**2).sum())

    @classmethod
    def of(cls, s: torch.Tensor, Eb: torch.Tensor, Ea: torch.Tensor, prior=None, slack: float = math.inf) -> TaskFit:
        """A fit for a member whose ``prior`` is (error, ‖ΔW‖ of the original, is_bound) or None."""
        if prior is None:
            return cls(s, Eb, Ea)
        error, norm, _ = prior
        return cls(s, Eb, Ea, error, float((s**2).sum()) ** 0.5 / norm if norm > 0 else 0.0, slack)


@dataclass
class FrozenTasks:
    """Tasks whose private rank is fixed at 0 (old tasks during a continual update), batched.

    A frozen task's error after the update is bounded from its error before and the drift of its
    shared part, ‖S − P_β S P_α‖ / ‖ΔW‖ (spec, section 5): by their sum, or, for tasks whose
    ``slack`` is finite, by :func:`drift_bound`, which needs the part of the drift outside the old
    bases' span (``inside`` gives that span's coordinates); it is what the planner counts.
    Coordinates are zero-padded to the largest rank (padding changes none of the sums below), so
    their errors at any k cost a few batched products, not a Python loop over tasks.
    """

    Eb: torch.Tensor  # (T, K_B, r) float64, the shared part's coordinates in the new bases
    Ea: torch.Tensor  # (T, K_A, r) float64
    norm2: torch.Tensor  # (T,) float64, ‖S‖², squared norm of each task's shared part
    ranks: torch.Tensor  # (T,) int64
    prior: torch.Tensor  # (T,) float64, each task's error before the update
    scale: torch.Tensor  # (T,) float64, 1 / ‖ΔW‖ of each task's original update (0 if ΔW = 0)
    #: (T,) float64, η of :func:`drift_bound` per task, +inf where only the triangle bound holds; None: all
    slack: torch.Tensor | None = None
    #: (V_B, V_A), k_old × K each: ‖V_B[:, :k] x‖ is the norm of β'_k x's projection on span(β_old)
    inside: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}
        #: whether some task has drift_bound's structure (decided once, not per k)
        self._tight = self.slack is not None and self.inside is not None and bool(torch.isfinite(self.slack).any())

    def __len__(self) -> int:
        return int(self.Eb.shape[0])

    def errors(self, k_B: int, k_A: int) -> torch.Tensor:
        """Each task's error bound at this k, from its prior error and the drift of its shared part."""
        if k_B == 0 or k_A == 0:
            kept = torch.zeros_like(self.norm2)
            Eb = Ea = None
        else:
            Eb, Ea = self.Eb[:, :k_B], self.Ea[:, :k_A]
            kept = frobenius2(Eb, Ea)
        # the bases are orthonormal: ‖S − P S P‖² = ‖S‖² − ‖P S P‖²
        drift = (self.norm2 - kept).clamp_min(0).sqrt() * self.scale
        if not self._tight:
            return self.prior + drift
        if Eb is None:  # nothing kept: the drift is the shared part itself, inside the old span
            outside = torch.zeros_like(drift)
        else:
            # ‖(I − Π_old) P S P‖² = ‖P S P‖² − ‖Π_old P S P‖², Π_old the old bases' projection
            YB, YA = left_batched(self.inside[0][:, :k_B], Eb), left_batched(self.inside[1][:, :k_A], Ea)
            within = frobenius2(YB, YA)
            outside = (kept - within).clamp_min(0).sqrt() * self.scale
        return drift_bound(self.prior, drift, outside, self.slack)

    def error_stats(self, k_B: int, k_A: int) -> tuple[float, float]:
        """(sum, max) of the errors at this k."""
        key = (k_B, k_A) if k_B and k_A else (0, 0)
        if key not in self._cache:
            e = self.errors(*key)
            self._cache[key] = (float(e.sum()), float(e.max()) if e.numel() else 0.0)
        return self._cache[key]

    def coef_params(self, k_B: int, k_A: int) -> int:
        return int(self.ranks.clamp(max=min(k_B, k_A)).sum()) * (k_B + k_A)


def padded_fits(fits: list[TaskFit], R: int, K_B: int, K_A: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tasks' singular values and coordinates stacked, zero-padded to rank R and to K_B, K_A
    basis vectors (zero columns change no error, residual spectrum or Gram matrix)."""
    f64, device = torch.float64, fits[0].s.device if fits else torch.device("cpu")
    T = len(fits)
    if T and all(f.rank == R and f.Eb.shape[0] == K_B and f.Ea.shape[0] == K_A for f in fits):
        stack = [torch.stack([getattr(f, a) for f in fits]).to(f64) for a in ("s", "Eb", "Ea")]
        return stack[0], stack[1], stack[2]
    s = torch.zeros(T, R, dtype=f64, device=device)
    Eb, Ea = torch.zeros(T, K_B, R, dtype=f64, device=device), torch.zeros(T, K_A, R, dtype=f64, device=device)
    for i, f in enumerate(fits):
        s[i, : f.rank] = f.s
        Eb[i, : f.Eb.shape[0], : f.rank] = f.Eb
        Ea[i, : f.Ea.shape[0], : f.rank] = f.Ea
    return s, Eb, Ea
