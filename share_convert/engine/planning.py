"""Choosing, per module, the shared k and each task's private rank q (spec, sections 2.5 and 6).

The planner sees one module at a time: each task's canonical singular values and its
coordinates in candidate bases (``Eb = βᵀB'``, ``Ea = αᵀA'`` for the largest k computed).
For any k (a prefix of those bases) and q it knows each task's exact relative ΔW error from
2r × 2r matrices (:func:`share_convert.math.linalg.residual_spectrum`), so it can search the
plan space — pure sharing (q = 0) through independent truncation (k = 0) — cheaply and
choose the plan with the least storage that meets a target, or the least error within a budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ConsolidationConfig, parse_budget  # noqa: F401 (parse_budget re-exported)
from ..math.bounds import drift_bound  # noqa: F401 (re-exported)
from ..math.tolerances import COUNT_TOL, ENERGY_RTOL, TARGET_TOL
from .fits import FrozenTasks, TaskFit  # noqa: F401 (re-exported)
from .plan_space import K_GRID, ModulePlan, PlanSpace  # noqa: F401 (re-exported)
from .precision import PrecisionPlan, Precisions, plan_bytes, plan_for, precision_plans


class ModulePlanner(PlanSpace):
    """Chooses one module's plan: a fixed k, the least storage meeting an error target, the least
    error within a budget, and the extremes (pure sharing, truncation) for comparison."""

    # -- the three ways of choosing ---------------------------------------------------------------------
    def fixed(self, k: int, private_rank: int = 0) -> ModulePlan:
        k_B, k_A = self.sides(k)
        return self.evaluate(k_B, k_A, self.ranks.clamp(max=private_rank))

    def for_target(self, error: float, metric: str = "mean") -> ModulePlan:
        """The plan with the least storage whose mean (or worst) task error is ≤ ``error``.

        Candidates: the cheapest pure-sharing k, no sharing (k = 0), and every k of the grid in
        between with private ranks added greedily. A k is skipped when a lower bound on its cost
        (its bases and coefficients, plus the fewest private directions that could meet the
        target) is no better than the best plan found so far.
        """
        step = self.n + self.d
        # the most private directions the bound below can ask for, where it is known without the
        # errors at k: then a k that costs less than best even with that many is searched without them
        most_needed = self._most_needed(error)
        pure = self.pure_sharing_for_target(error, metric)
        best = pure
        no_sharing = self._target_at(0, 0, error, metric)
        if no_sharing is not None and (
            best is None or (no_sharing.params, no_sharing.mean_error) < (best.params, best.mean_error)
        ):
            best = no_sharing
        for k in self.grid():
            if k == 0 or (pure is not None and k >= pure.k_B and k >= pure.k_A):
                continue
            k_B, k_A = self.sides(k)
            base = self.shared_params(k_B, k_A)
            if best is not None and base >= best.params:
                break  # costs only grow with k
            room = None if best is None else best.params - base
            if (most_needed is None or (room is not None and most_needed * step >= room)) and self._skipped(
                k_B, k_A, error, metric, room
            ):
                continue
            plan = self._target_at(k_B, k_A, error, metric, None if best is None else best.params)
            if plan is not None and (best is None or (plan.params, plan.mean_error) < (best.params, best.mean_error)):
                best = plan
        if best is None and self.has_priors():
            # the errors the tasks bring from earlier checkpoints alone exceed the target: hold the
            # error this step adds to the target instead, and record the bounds as they are
            relaxed = self.without_priors().for_target(error, metric)
            best = self.evaluate(relaxed.k_B, relaxed.k_A, relaxed.private_ranks)
            best.target_relaxed = True
        if best is None:  # keep every direction
            K = max(self.K_B, self.K_A)
            best = self.evaluate(*self.sides(K), self.ranks)
        best.alternatives = {
            "shared": pure.params if pure else None,
            "private": no_sharing.params if no_sharing else None,
        }
        return best

    def _skipped(self, k_B: int, k_A: int, error: float, metric: str, room: int | None) -> bool:
        """Whether a lower bound on the cost of meeting the target at this k (its bases and
        coefficients, plus the fewest private directions that could meet it) leaves no ``room``
        (the storage the best plan so far leaves above the bases; None: no plan yet)."""
        T = self.count
        frozen_sum, frozen_max = self.frozen_stats(k_B, k_A)
        if metric == "max":
            if frozen_max > error:
                return True
            needed = int((self.shared_error_tensor(k_B, k_A) > error).sum())
        else:
            errs_sum, movable = self.shared_error_stats(k_B, k_A)
            excess = errs_sum + frozen_sum - error * T
            if excess <= 0:
                needed = 0
            elif movable > 0:
                needed = math.ceil(excess / movable - COUNT_TOL)
            else:
                return True
        return room is not None and needed * (self.n + self.d) >= room

    def _most_needed(self, error: float) -> int | None:
        """An upper bound on the private directions :meth:`_skipped` asks for at any k, when one is
        known without the errors: no frozen tasks and plain, finite errors (each in [0, the max], so
        their excess over a target ≥ 0 is at most every task's max, plus one for the sum's rounding)."""
        if self.frozen is not None or not self._plain or not error >= 0 or not self._finite():
            return None
        return self.T + 1

    def _finite(self) -> bool:
        """Whether every figure the errors come from is finite (the readers refuse inputs that are not)."""
        if self._all_finite is None:
            self._all_finite = all(bool(torch.isfinite(x).all()) for x in (self._s, self._Eb, self._Ea, self.norm2))
        return self._all_finite

    def _target_at(
        self, k_B: int, k_A: int, error: float, metric: str, at_most: int | None = None
    ) -> ModulePlan | None:
        """At this k, the fewest private directions that meet the target, or None; None too when that
        plan would store more than ``at_most`` parameters (it could not replace a plan of that size)."""
        T = self.count
        tails = self.tails(k_B, k_A)
        frozen_sum, frozen_max = self.frozen_stats(k_B, k_A)
        step = self.n + self.d
        if metric == "max":
            if frozen_max > error:
                return None
            ok = (tails <= error) & self._allowed
            if not bool(ok.any(1).all()):
                return None
            q = ok.to(torch.int8).argmax(1)  # the first private rank that meets the target
            if at_most is not None and self.shared_params(k_B, k_A) + int(q.sum()) * step > at_most:
                return None
        else:
            # the same tolerance as the check below: a running sum must not tip a plan that sits on the target
            bound = error * T + TARGET_TOL - frozen_sum
            key = self.tails_key(k_B, k_A)
            if at_most is not None and self.shared_params(k_B, k_A) + self._taken(tails, bound, key) * step > at_most:
                return None
            q = self._greedy(tails, total_at_most=bound, key=key)
            if float(tails.gather(1, q[:, None]).sum()) + frozen_sum > error * T + TARGET_TOL:
                return None
        return self.evaluate(k_B, k_A, q)

    def _meets(self, k_B: int, k_A: int, error: float, metric: str) -> bool:
        """Whether pure sharing at this k meets the target, frozen tasks included."""
        errs_sum, errs_max = self.shared_error_stats(k_B, k_A)
        frozen_sum, frozen_max = self.frozen_stats(k_B, k_A)
        if metric == "max":
            value = max(errs_max, frozen_max)
        else:
            value = (errs_sum + frozen_sum) / self.count
        return value <= error + TARGET_TOL

    def pure_sharing_for_target(self, error: float, metric: str = "mean") -> ModulePlan | None:
        """The smallest k whose pure-sharing plan (q = 0) meets the target, or None."""
        K = max(self.K_B, self.K_A)
        if K == 0 or not self._meets(*self.sides(K), error, metric):
            return None
        lo, hi = 1, K  # errors fall as k grows: binary search for the first k that meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            if self._meets(*self.sides(mid), error, metric):
                hi = mid
            else:
                lo = mid + 1
        return self.pure(*self.sides(lo))

    def pure(self, k_B: int, k_A: int) -> ModulePlan:
        """The pure-sharing plan (q = 0) at this k, without spectra."""
        errs = self.shared_errors(k_B, k_A)
        if k_B == 0 or k_A == 0:
            k_B = k_A = 0
        return self._plan(k_B, k_A, [0] * self.T, errs, self.shared_params(k_B, k_A))

    def _largest_pure_k(self, params: int) -> int:
        """The largest k whose pure-sharing storage fits ``params`` (storage grows with k)."""
        K = max(self.K_B, self.K_A)
        lo, hi = 0, K
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.shared_params(*self.sides(mid)) <= params:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def for_budget(self, params: int) -> ModulePlan:
        """The plan with the least mean task error whose storage is ≤ ``params``."""
        # the largest pure-sharing k that fits, so that the extreme q = 0 is always a candidate
        k_pure = self._largest_pure_k(params)
        best: ModulePlan | None = None
        step = self.n + self.d
        for k in self.grid((k_pure,)):
            k_B, k_A = self.sides(k)
            base = self.shared_params(k_B, k_A)
            if base > params:
                continue
            slots = (params - base) // step
            q = self._greedy(self.tails(k_B, k_A), slots=slots, key=self.tails_key(k_B, k_A))
            plan = self.evaluate(k_B, k_A, q)
            if best is None or (plan.mean_error, plan.params) < (best.mean_error, best.params):
                best = plan
        if best is None:
            best = self.evaluate(0, 0, [0] * self.T)
        return best

    # -- the extremes, for comparison ------------------------------------------------------------------
    def pure_sharing(self, params: int) -> ModulePlan:
        """Largest k with q = 0 whose storage fits ``params``."""
        return self.pure(*self.sides(self._largest_pure_k(params)))

    def truncation_allocated(self, params: int) -> ModulePlan:
        """No sharing, with each task's rank allocated greedily where it lowers the mean error most."""
        slots = params // (self.n + self.d)
        return self.evaluate(0, 0, self._greedy(self.tails(0, 0), slots=slots, key=(0, 0)))

    def truncation(self, params: int) -> ModulePlan:
        """No sharing: every task keeps the same number h of its own top directions."""
        step = self.n + self.d
        h, top = 0, int(self.ranks.max()) if self.T else 0
        while h < top and int(self.ranks.clamp(max=h + 1).sum()) * step <= params:
            h += 1
        return self.evaluate(0, 0, self.ranks.clamp(max=h))


def energy_k(s: torch.Tensor, total: float, tau: float) -> int:
    """Smallest k whose singular values ``s`` hold a fraction ≥ τ of ``total`` (spec, section 2.5)."""
    if total <= 0 or s.numel() == 0:
        return 0
    cum = (s**2).cumsum(0) / total
    hits = (cum >= tau * (1 - ENERGY_RTOL)).nonzero()
    return int(hits[0]) + 1 if hits.numel() else s.numel()


def task_weight(norm: float, weighting: str) -> float:
    """A task's weight in the basis fit: 1/‖ΔW‖ with equal weighting (spec, section 6), else 1."""
    if weighting != "equal":
        return 1.0
    return 1.0 / norm if norm > 0 else 0.0


def task_weights(norms, weighting: str) -> torch.Tensor:
    """:func:`task_weight` of many tasks at once (``norms``: an array of ‖ΔW‖), float64."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    if weighting != "equal":
        return torch.ones_like(norms)
    return torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)


@dataclass(frozen=True)
class BasisSpectra:
    """What an energy fraction (``--energy``) is measured on: the singular values of a module's two
    candidate bases and, computed only when asked for, the total energy of each side."""

    s_B: torch.Tensor
    s_A: torch.Tensor
    totals: Callable[[], tuple[float, float]]


def choose_plan(
    planner: ModulePlanner,
    config: ConsolidationConfig,
    spectra: BasisSpectra,
    dtype: torch.dtype | None = None,
    precision: Precisions | None = None,
    known: ModulePlan | None = None,
) -> ModulePlan:
    """The plan step of every way a module is computed (merge, the budget pass, add, refits): a
    fixed k, an energy fraction, or the least storage meeting the error target; and, given the
    storage ``dtype``, where its factors are stored (``plan.precision``, ``plan.bytes``).

    Precision (``config.precision``, or an imposed ``precision``: groups of a module, updates of a
    module whose stored precisions are kept): 'float' stores every factor in ``dtype`` (the plan is
    the one of before precisions existed, ``plan.precision`` None). Under an error target, 'auto'
    plans each candidate precision at a tightened target (engine/precision.py) and takes the least
    bytes, with the others as ``plan.fallbacks`` (the float plan last); a fixed precision is kept,
    at the tightest structure if the target is out of its reach. Under ``--k`` or ``--energy`` the
    structure is the user's: 'auto' keeps it in the float dtype, a fixed precision stores it so.

    A ``--budget`` is spent across modules by ``merge`` first (an error target per module) and never
    reaches one module; ``add`` keeps the error target. ``known``: this planner's plan at the error
    target, where the caller has it already (the search is not repeated).
    """
    mode = config.mode()
    if mode == "budget":
        raise ValueError("a --budget is spent across modules by merge(): plan each module at its target")
    imposed = precision is not None
    chosen = precision if imposed else None
    if not imposed and config.precision not in ("auto", "float"):
        chosen = Precisions.uniform(config.precision)
    if mode == "fixed":
        plan = planner.fixed(config.k, config.private_rank)
    elif mode == "energy":
        total_B, total_A = spectra.totals()
        kB = energy_k(spectra.s_B, total_B, config.energy)
        kA = energy_k(spectra.s_A, total_A, config.energy)
        plan = planner.evaluate(kB, kA, [0] * planner.T)
    else:
        plan = known if known is not None else planner.for_target(config.target_error, config.target_metric)
        if dtype is not None and not plan.target_relaxed and (chosen is not None or config.precision == "auto"):
            return _with_precision(planner, plan, config, dtype, chosen)
    if dtype is not None and chosen is not None and not chosen.is_float:
        plan.precision, plan.bytes = chosen, plan_bytes(planner, plan, chosen, dtype)
    return plan


def _with_precision(
    planner: ModulePlanner, float_plan: ModulePlan, config: ConsolidationConfig, dtype: torch.dtype, chosen
) -> ModulePlan:
    """Under an error target: the plan of structure and precision with the least bytes (``chosen``:
    that precision only), its fallbacks in order."""
    target, metric = config.target_error, config.target_metric
    if chosen is None:
        found = precision_plans(planner, target, metric, config.precision, dtype, float_plan)
    elif chosen.is_float:
        found = [PrecisionPlan(float_plan, chosen, plan_bytes(planner, float_plan, chosen, dtype), target)]
    else:
        one = plan_for(planner, target, metric, chosen, dtype)
        if one is None:  # out of this precision's reach: the tightest structure, stored as asked
            tight = planner.for_target(0.0, metric)
            one = PrecisionPlan(tight, chosen, plan_bytes(planner, tight, chosen, dtype), 0.0)
        found = [one]
    best = found[0]
    plan = dataclasses.replace(best.plan)  # a plan object may stand in several candidates
    plan.precision = None if best.precision.is_float else best.precision
    plan.bytes, plan.structural_target = best.bytes, best.target
    plan.fallbacks = found[1:]
    return plan
