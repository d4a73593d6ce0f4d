"""A lower bound on what any shared plan of one module costs, from the tasks' own spectra alone.

Before a module's bases are fitted, the planner can already price independent truncation exactly
(each task's error at each rank is its own Eckart–Young tail). :class:`SharingFloor` bounds from
below the storage of every plan with a shared basis of width k that meets the same error target,
for every k; where every such bound exceeds truncation's storage, sharing cannot pay and no basis
is fitted, and where a plan is in hand, no basis wider than :meth:`SharingFloor.cap` can beat it.
docs/bases.md ("Ruling sharing out, and how wide a basis can pay") derives the bound.
"""

from __future__ import annotations

import torch

from ..math.tolerances import TARGET_TOL
from .planning import ModulePlanner

#: Room for rounding between the planner's errors (residual spectra) and the Eckart–Young tails
#: the bound uses: the bound is lowered by this much per task, so it never exceeds a plan's storage.
FLOOR_SLACK = 1e-9


class SharingFloor:
    """Lower bounds ``LB(k)`` on the storage of any plan meeting ``target`` with shared width k.

    ``planner`` is the module's planner without bases (its ``tails(0, 0)`` are each task's error
    at each rank of its own). It must plan errors of this step only: no task that is a
    reconstruction of an earlier checkpoint's, no frozen tasks (:meth:`applies`).
    """

    def __init__(self, planner: ModulePlanner, target: float, metric: str):
        self.planner, self.target, self.metric = planner, target, metric
        n, d = planner.n, planner.d
        ranks = planner.ranks.cpu()
        self.R = R = int(ranks.max()) if ranks.numel() else 0
        self.rank_sum = int(ranks.sum())
        tails = planner.tails(0, 0).cpu()  # T × (R + 1): τ_t(h), the error of task t kept at rank h
        ks = torch.arange(1, R + 1)
        #: Σ_t min(r_t, k) for k = 1 … R: the fewest coefficients' columns a width-k basis carries
        kept = ranks[None, :].clamp(max=ks[:, None]).sum(1)
        private = torch.tensor([self._fewest_private(tails, ranks, k) for k in range(1, R + 1)], dtype=torch.int64)
        # bases k(n + d), their Gram matrices 2k², coefficients 2k per kept column, private directions
        self.bounds = ks * (n + d) + 2 * ks * ks + 2 * ks * kept + private * (n + d)

    @staticmethod
    def applies(planner: ModulePlanner) -> bool:
        """Whether the planner's errors are plain ΔW errors of this step (what the bound is about)."""
        return planner.frozen is None and planner._plain and planner.T > 0

    def _fewest_private(self, tails: torch.Tensor, ranks: torch.Tensor, k: int) -> int:
        """A lower bound on Σ_t q_t over plans of shared width k that meet the target.

        A task's reconstruction at width k with q private directions has rank ≤ min(k, r_t) + q,
        so its error is at least τ_t(min(k + q, r_t)) (Eckart–Young). Worst error: each task needs
        the least h_t with τ_t(h_t) within the target, so q_t ≥ h_t − k. Mean error: the errors at
        q = 0 must fall by their excess over the target; q private directions in all lower them by
        at most the q largest single steps τ_t(j − 1) − τ_t(j), j > k, over all tasks.
        """
        T = tails.shape[0]
        at = ranks.clamp(max=k)
        base = tails.gather(1, at[:, None]).squeeze(1)
        if self.metric == "max":
            ok = tails <= self.target + TARGET_TOL + FLOOR_SLACK
            ok &= torch.arange(tails.shape[1])[None, :] <= ranks[:, None]
            need = ok.to(torch.int8).argmax(1)  # the least rank within the target (τ_t(r_t) = 0)
            return int((need - k).clamp_min(0).sum())
        budget = self.target * self.planner.count + TARGET_TOL + FLOOR_SLACK * T
        excess = float(base.sum()) - budget
        if excess <= 0:
            return 0
        steps = tails[:, :-1] - tails[:, 1:]  # column j − 1: the step from rank j − 1 to j
        j = torch.arange(1, tails.shape[1])[None, :]
        live = (j > k) & (j <= ranks[:, None])
        gains = torch.sort(steps[live], descending=True).values.cumsum(0)
        reach = int((gains < excess).sum())  # the steps that still leave some excess
        return min(reach + 1, int(gains.numel()))

    def least(self) -> int | None:
        """The least storage any shared plan meeting the target can have (None: no task has rank)."""
        return int(self.bounds.min()) if self.bounds.numel() else None

    def rules_out(self, params: int) -> bool:
        """Whether every shared plan meeting the target costs more than ``params`` (strictly: a
        plan of equal storage and lower error would be preferred)."""
        least = self.least()
        return least is not None and least > params

    def cap(self, params: int, full: int) -> int:
        """The widest shared k (≤ ``full``) whose bound is ≤ ``params``: no plan wider can cost
        ``params`` or less. 0 when none can."""
        fits = (self.bounds <= params).nonzero()
        best = int(fits[-1]) + 1 if fits.numel() else 0
        if best < self.R or self.R == 0:
            return min(best, full)
        # beyond the largest rank every task is kept whole at q = 0: the bound grows with k alone
        n, d = self.planner.n, self.planner.d
        lo, hi = self.R, max(full, self.R)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid * (n + d) + 2 * mid * mid + 2 * mid * self.rank_sum <= params:
                lo = mid
            else:
                hi = mid - 1
        return min(lo, full)
