"""The plan space of one module: each plan's storage and its tasks' errors (spec, sections 2.5, 4 and 6).

For any k (a prefix of the candidate bases) and private ranks q, :class:`PlanSpace` knows each task's
exact relative ΔW error from 2r × 2r matrices (:func:`share_convert.math.linalg.residual_spectrum`) and
the plan's storage; :class:`share_convert.engine.planning.ModulePlanner` searches it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..math.bounds import drift_bound
from ..math.linalg import residual_spectrum
from ..math.traces import frobenius2
from .fits import FrozenTasks, TaskFit, padded_fits

#: The k values tried between 0 and the number of basis vectors computed.
K_GRID = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    12,
    14,
    16,
    20,
    24,
    28,
    32,
    40,
    48,
    56,
    64,
    80,
    96,
    112,
    128,
    160,
    192,
    224,
    256,
    320,
    384,
    448,
    512,
    640,
    768,
    896,
    1024,
    1280,
    1536,
    2048,
    3072,
    4096,
)


@dataclass
class ModulePlan:
    """The representation chosen for one module.

    ``private_ranks`` and ``predicted_errors`` list the planned (not frozen) tasks; frozen tasks
    count in ``params``, ``mean_error`` and the totals below.
    """

    k_B: int
    k_A: int
    private_ranks: list[int]
    predicted_errors: list[float]
    params: int
    #: storage (parameters) of the cheapest pure-sharing and no-sharing plans meeting the same target
    alternatives: dict[str, int | None] | None = None
    frozen_count: int = 0
    frozen_error_sum: float = 0.0
    #: the target could not be met because of errors from earlier checkpoints; it held this step's error
    target_relaxed: bool = False
    #: where each kind of factor is stored (engine/precision.Precisions; None: the float dtype, as before)
    precision: Any = None
    #: bytes the plan stores at ``precision`` (None: not costed in bytes)
    bytes: int | None = None
    #: the structural target the plan was planned at (tighter than the target where precision adds error)
    structural_target: float | None = None
    #: plans of structure and precision to fall back on, in order, if this one misses the target once
    #: encoded (engine/precision.PrecisionPlan each; the last is the float plan)
    fallbacks: list[Any] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """'shared' (pure Share), 'private' (independent truncation, no sharing) or 'mixed'."""
        if self.k_B == 0 and self.k_A == 0:
            return "private"
        return "shared" if not any(self.private_ranks) else "mixed"

    @property
    def mean_error(self) -> float:
        count = len(self.predicted_errors) + self.frozen_count
        return (sum(self.predicted_errors) + self.frozen_error_sum) / max(count, 1)


class PlanSpace:
    """The plans of one module of shape ``n × d`` (out × in): their storage and errors.

    The tasks' figures are held as padded tensors (one row per task, columns up to the largest
    rank), so that evaluating a candidate k is a few batched expressions whatever the number of
    tasks: no Python loop over tasks on the search path (issue 12).
    """

    def __init__(self, n: int, d: int, fits: list[TaskFit], frozen: FrozenTasks | None = None):
        K_B = max([f.Eb.shape[0] for f in fits], default=0)
        K_A = max([f.Ea.shape[0] for f in fits], default=0)
        R = max([f.rank for f in fits], default=0)
        f64, device = torch.float64, fits[0].s.device if fits else torch.device("cpu")
        self._init(
            n,
            d,
            *padded_fits(fits, R, K_B, K_A),
            ranks=torch.tensor([f.rank for f in fits], dtype=torch.int64, device=device),
            norm2=torch.tensor([f.norm2 for f in fits], dtype=f64, device=device),
            prior=torch.tensor([f.prior for f in fits], dtype=f64, device=device),
            ratio=torch.tensor([f.ratio for f in fits], dtype=f64, device=device),
            slack=torch.tensor([f.slack for f in fits], dtype=f64, device=device),
            frozen=frozen,
        )
        self._fits = fits

    @classmethod
    def stacked(
        cls,
        n: int,
        d: int,
        s: torch.Tensor,
        Eb: torch.Tensor,
        Ea: torch.Tensor,
        *,
        ranks: torch.Tensor,
        norm2: torch.Tensor,
        prior: torch.Tensor,
        ratio: torch.Tensor,
        slack: torch.Tensor | None = None,
    ) -> PlanSpace:
        """A planner over tasks given as padded stacks: ``s`` (T × R), ``Eb`` (T × K_B × R), ``Ea``
        (T × K_A × R), float64, zero past each task's rank; ``prior``, ``ratio`` and ``slack`` as in
        :class:`TaskFit`. No object per task is made unless :attr:`fits` is asked for."""
        planner = cls.__new__(cls)
        planner._init(n, d, s, Eb, Ea, ranks=ranks, norm2=norm2, prior=prior, ratio=ratio, slack=slack, frozen=None)
        planner._fits = None
        return planner

    def _init(self, n, d, s, Eb, Ea, *, ranks, norm2, prior, ratio, frozen, slack=None) -> None:
        self.n, self.d = n, d
        #: tasks whose private rank is fixed at 0 here (old tasks during a continual update)
        self.frozen = frozen
        self.K_B = max([Eb.shape[1]] + ([frozen.Eb.shape[1]] if frozen is not None else []))
        self.K_A = max([Ea.shape[1]] + ([frozen.Ea.shape[1]] if frozen is not None else []))
        self.ranks, self.norm2, self.prior, self.ratio = ranks, norm2, prior, ratio
        self.T = int(ranks.numel())
        self.R = R = int(s.shape[1])
        #: no task is a reconstruction: planned errors are the errors themselves
        self._plain = bool(((prior == 0) & (ratio == 1)).all())
        #: η of drift_bound per task (+inf: the triangle bound), used where a plan keeps each task's own directions
        self.slack = slack if slack is not None else torch.full_like(prior, math.inf)
        self._projections = bool(torch.isfinite(self.slack).any())
        self._s, self._Eb, self._Ea = s, Eb, Ea
        #: q ≤ rank: which private ranks each task can take (columns 0 … R)
        self._allowed = torch.arange(R + 1, device=ranks.device)[None, :] <= ranks[:, None]
        #: the tasks the mean error is over: planned and frozen, but not those whose ΔW is zero here
        #: (an untrained export's 0% error would let the others' errors grow)
        self.count = max(int((norm2 > 0).sum()) + (len(frozen) if frozen is not None else 0), 1)
        #: what a search asks for again and again, per (k_B, k_A): the plan space is fixed, only the
        #: target changes between searches (a precision plan searches at up to dozens of targets)
        self._tails: dict[tuple[int, int], torch.Tensor] = {}
        self._shared: dict[tuple[int, int], torch.Tensor] = {}
        self._shared_stats: dict[tuple[int, int], tuple[float, float]] = {}
        self._orders: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._all_finite: bool | None = None
        self._full_ranks: bool | None = None
        self._S: torch.Tensor | None = None  # diag(s) per task, for the residual spectra
        #: the stacks' coordinates in the bases (k × columns), when the planner was built from them
        self.projections: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def plain(self) -> bool:
        """No task is a reconstruction: planned errors are the errors themselves (not bounds)."""
        return self._plain

    def inherit(self, narrower: PlanSpace) -> None:
        """Reuse the error tails of a planner whose bases are prefixes of this one's (same tasks):
        a tail is keyed by the prefixes (k_B, k_A) it was computed on, which are unchanged."""
        self._tails.update(narrower._tails)

    @property
    def fits(self) -> list[TaskFit]:
        """The tasks, one :class:`TaskFit` each (views of the stacks when the planner was built from them)."""
        if self._fits is None:
            self._fits = [
                TaskFit(self._s[i, :r], self._Eb[i, :, :r], self._Ea[i, :, :r], float(p), float(q), float(h))
                for i, (r, p, q, h) in enumerate(
                    zip(self.ranks.tolist(), self.prior.tolist(), self.ratio.tolist(), self.slack.tolist())
                )
            ]
        return self._fits

    # -- storage ------------------------------------------------------------------------------------
    def shared_params(self, k_B: int, k_A: int) -> int:
        """Parameters of the bases (and their k × k Gram matrices) plus every task's coefficients."""
        if k_B == 0 or k_A == 0:
            return 0
        coef = int(self.ranks.clamp(max=min(k_B, k_A)).sum()) * (k_B + k_A)
        if self.frozen is not None:
            coef += self.frozen.coef_params(k_B, k_A)
        return k_B * self.n + k_A * self.d + k_B * k_B + k_A * k_A + coef

    def original_params(self) -> int:
        frozen = int(self.frozen.ranks.sum()) if self.frozen is not None else 0
        return (int(self.ranks.sum()) + frozen) * (self.n + self.d)

    def has_priors(self) -> bool:
        """Whether some task brings an error from an earlier checkpoint."""
        frozen = self.frozen is not None and bool((self.frozen.prior > 0).any())
        return frozen or bool((self.prior > 0).any())

    def without_priors(self) -> PlanSpace:
        """The same planner with every task's earlier error set aside (errors of this step only)."""
        fits = [TaskFit(f.s, f.Eb, f.Ea) for f in self.fits]
        frozen = None
        if self.frozen is not None:
            frozen = dataclasses.replace(self.frozen, prior=torch.zeros_like(self.frozen.prior))
        return type(self)(self.n, self.d, fits, frozen)

    def frozen_stats(self, k_B: int, k_A: int) -> tuple[float, float]:
        """(sum, max) of the frozen tasks' errors at this k; (0, 0) without frozen tasks."""
        return self.frozen.error_stats(k_B, k_A) if self.frozen is not None else (0.0, 0.0)

    def sides(self, k: int) -> tuple[int, int]:
        return min(k, self.K_B), min(k, self.K_A)

    # -- errors --------------------------------------------------------------------------------------
    def _relative(self, energy: torch.Tensor, inside: bool = False) -> torch.Tensor:
        """Planned errors from residual energies (``T × …``): √(energy / ‖ΔW‖²), 0 where ΔW = 0,
        or their bounds for tasks that are reconstructions (prior + ratio × error, spec section 5;
        :func:`drift_bound` with no outside part where ``inside``: each task keeps its own directions)."""
        shape = (-1, *([1] * (energy.dim() - 1)))  # per task, broadcast over the other dimensions
        norm2 = self.norm2.view(shape)
        errs = torch.where(norm2 > 0, (energy / norm2.clamp_min(1e-300)).clamp_min(0).sqrt(), 0.0)
        if self._plain:
            return errs
        drift = self.ratio.view(shape) * errs
        if inside and self._projections:
            prior, slack = self.prior.view(shape).expand_as(drift), self.slack.view(shape).expand_as(drift)
            return drift_bound(prior, drift, torch.zeros_like(drift), slack)
        return self.prior.view(shape) + drift

    def shared_error_tensor(self, k_B: int, k_A: int) -> torch.Tensor:
        """Per task, the error of pure sharing (q = 0): e² = 1 − ‖E_B E_Aᵀ‖² / ‖ΔW‖² (spec, section 4).

        Computed once per k (callers must not modify it)."""
        key = (k_B, k_A)
        out = self._shared.get(key)
        if out is None:
            if k_B == 0 or k_A == 0:
                out = self._relative(self.norm2.clone(), inside=True)
            else:
                kept = frobenius2(self._Eb[:, :k_B], self._Ea[:, :k_A])
                out = self._relative(self.norm2 - kept)
            self._shared[key] = out
        return out

    def shared_error_stats(self, k_B: int, k_A: int) -> tuple[float, float]:
        """(sum, max) of :meth:`shared_error_tensor` (max 0 without tasks), once per k."""
        key = (k_B, k_A)
        stats = self._shared_stats.get(key)
        if stats is None:
            errs = self.shared_error_tensor(k_B, k_A)
            stats = self._shared_stats[key] = (float(errs.sum()), float(errs.max()) if errs.numel() else 0.0)
        return stats

    def shared_errors(self, k_B: int, k_A: int) -> list[float]:
        """:meth:`shared_error_tensor` as a list."""
        return self.shared_error_tensor(k_B, k_A).tolist()

    @staticmethod
    def tails_key(k_B: int, k_A: int) -> tuple[int, int]:
        """The k that :meth:`tails` computes for (k_B, k_A): (0, 0) when either side is empty."""
        return (0, 0) if k_B == 0 or k_A == 0 else (k_B, k_A)

    def tails(self, k_B: int, k_A: int) -> torch.Tensor:
        """Per task (rows), the relative error for q = 0 … R private directions at this k
        (``T × (R + 1)``; columns past a task's rank repeat nothing meaningful: see ``_allowed``).
        Computed once per k (callers must not modify it)."""
        key = self.tails_key(k_B, k_A)
        k_B, k_A = key
        if key in self._tails:
            return self._tails[key]
        T, R = self.T, self.R
        if k_B == 0:  # no shared part: the residual is ΔW itself, whose spectrum is known
            spec = self._s**2
        else:
            if self._S is None:
                self._S = torch.diag_embed(self._s)
            spec = residual_spectrum(self._s, self._Eb[:, :k_B], self._Ea[:, :k_A], self._S)  # (T, 2R) descending
        # energy left after keeping q private directions, q = 0 … R
        tail = spec.flip(-1).cumsum(-1).flip(-1)
        tail = torch.cat([tail, tail.new_zeros(T, 1)], -1)[:, : R + 1]
        self._tails[key] = out = self._relative(tail, inside=k_B == 0)
        return out

    def evaluate(self, k_B: int, k_A: int, q) -> ModulePlan:
        tails = self.tails(k_B, k_A)
        q = torch.as_tensor(q, dtype=torch.int64, device=tails.device)
        errs = tails.gather(1, q[:, None]).squeeze(1) if self.T else tails.new_zeros(0)
        params = self.shared_params(k_B, k_A) + int(q.sum()) * (self.n + self.d)
        if k_B == 0 or k_A == 0:
            k_B = k_A = 0
        return self._plan(k_B, k_A, q.tolist(), errs.tolist(), params)

    def _plan(self, k_B: int, k_A: int, q: list[int], errs: list[float], params: int) -> ModulePlan:
        frozen_sum = self.frozen_stats(k_B, k_A)[0]
        count = len(self.frozen) if self.frozen is not None else 0
        return ModulePlan(k_B, k_A, q, errs, params, frozen_count=count, frozen_error_sum=frozen_sum)

    def grid(self, extra: tuple[int, ...] = ()) -> list[int]:
        K = max(self.K_B, self.K_A)
        return sorted({k for k in K_GRID if k <= K} | {K} | {k for k in extra if 0 <= k <= K})

    # -- allocation of private ranks --------------------------------------------------------------------
    def _greedy(
        self,
        tails: torch.Tensor,
        *,
        slots: int | None = None,
        total_at_most: float | None = None,
        key: tuple[int, int] | None = None,
    ):
        """Private directions added one at a time to the task whose error drops most, until
        ``slots`` directions are taken or the sum of the errors is ≤ ``total_at_most``.

        Vectorized: taking the largest available drop each time takes the drops in decreasing
        order of their running minimum along each task's tail (a drop cannot be taken before the
        ones ahead of it in its task, and never before a larger one elsewhere), so one stable
        sort replaces the heap; ties go to the earlier task, as they did. Returns q per task.
        ``key``: the (k_B, k_A) that ``tails`` are of (:meth:`tails`): the order, which does not
        depend on the target, is then sorted once per k and kept.
        """
        T = self.T
        q = torch.zeros(T, dtype=torch.int64, device=tails.device)
        if T == 0 or self.R == 0:
            return q
        owner, totals = self._orders[key] if key in self._orders else self._order(tails, key)
        if slots is not None:
            taken = min(max(int(slots), 0), int(owner.numel()))
        else:
            taken = self._taken(tails, total_at_most, key)
        return q.index_add_(0, owner[:taken], torch.ones(taken, dtype=torch.int64, device=q.device))

    def _taken(self, tails: torch.Tensor, total_at_most: float, key: tuple[int, int] | None) -> int:
        """How many private directions :meth:`_greedy` takes to bring the sum of the errors to
        ``total_at_most`` (all of them when it cannot)."""
        if self.T == 0 or self.R == 0:
            return 0
        owner, totals = self._orders[key] if key in self._orders else self._order(tails, key)
        # the sum of the errors after t directions, t = 0 … all: the first that meets the bound
        hit = (totals <= total_at_most).nonzero()
        return int(hit[0]) if hit.numel() else int(owner.numel())

    def _every_rank_full(self) -> bool:
        """Whether every task has the largest rank R (every private rank 0 … R is allowed)."""
        if self._full_ranks is None:
            self._full_ranks = bool(self._allowed.all())
        return self._full_ranks

    def _order(self, tails: torch.Tensor, key: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy order of :meth:`_greedy`: which task each drop belongs to, in the order they
        are taken, and the sum of the errors after t drops (t = 0 … all); kept under ``key``."""
        T = self.T
        drops = tails[:, :-1] - tails[:, 1:]  # T × R: the drop from q to q + 1
        keys = torch.cummin(drops, dim=1).values  # task-major order, within a task by q
        if self._every_rank_full():  # every drop is live: the rows as they lie, no mask
            keys, gains = keys.reshape(-1), drops.reshape(-1)
            owner = torch.arange(T, device=drops.device).repeat_interleave(self.R)
        else:
            live = self._allowed[:, 1:]
            keys, gains = keys[live], drops[live]
            owner = torch.arange(T, device=drops.device)[:, None].expand_as(drops)[live]
        order = torch.sort(keys, descending=True, stable=True).indices
        gains, owner = gains[order], owner[order]
        totals = float(tails[:, 0].sum()) - torch.cat([gains.new_zeros(1), gains.cumsum(0)])
        if key is not None:
            self._orders[key] = (owner, totals)
        return owner, totals
