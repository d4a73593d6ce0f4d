"""Storage precision as a second axis of a module's plan (issue 24; docs/precision.md).

A module stores three kinds of factors: its bases (``basis_B``, ``basis_A``), every task's
coefficient rows (``coefs_*``) and private rows (``private_*``). :class:`Precisions` gives each kind
a precision of :mod:`share_convert.math.quantize` (None: the module's float dtype, as before
precisions existed). :func:`precision_plans` turns the structural plan space into plans of
structure AND precision: per candidate, the structure is planned at a target tightened by the
error quantization is expected to add, and costed in bytes; the engine encodes the cheapest and
measures its exact errors from the dequantized values (:func:`meets`), falling back in order.

Why the tightening is what it is (docs/precision.md): with balanced canonical factors and per-row scale
blocks, rounding the numbers of one factor of a part of ΔŴ (its shared part, or its private part)
with relative RMS error ρ moves that part by about ρ‖part‖, independently of the structural
residual and of the other factors' rounding. So a task whose shared part holds a fraction
1 − e₀² of ‖ΔW‖² (e₀: its error with no private directions) and whose private part holds
e₀² − e² expects a quantization error e_q² = 2(ρ_bases² + ρ_coefs²)(1 − e₀²) + 2ρ_private²(e₀² − e²),
and a total error √(e² + e_q²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..math.quantize import (
    CODE_PRECISIONS,
    FLOAT_PRECISIONS,
    Quantized,
    quantize,
    relative_rms_error,
    stored_bytes,
    stored_values,
)
from ..math.tolerances import TARGET_TOL
from .plan_space import ModulePlan, PlanSpace

#: The kinds of stored factors, and the stored tensors' roles of each (docs/format.md).
PARTS = ("bases", "coefs", "private")
ROLES = {"bases": ("basis_B", "basis_A"), "coefs": ("coefs_B", "coefs_A"), "private": ("private_B", "private_A")}

#: Structural re-plans of one candidate to bring its predicted error under the target.
PREDICTION_ROUNDS = 6
#: The rounding error is predicted this much larger than its expectation: a module's measured error
#: scatters around the prediction, and a plan that misses the target once encoded is encoded again.
PREDICTION_MARGIN = 1.25


@dataclass(frozen=True)
class Precisions:
    """One storage precision per kind of stored factor of a module; None: the module's float dtype."""

    bases: str | None = None
    coefs: str | None = None
    private: str | None = None

    @classmethod
    def uniform(cls, precision: str | None) -> Precisions:
        return cls(precision, precision, precision)

    @property
    def is_float(self) -> bool:
        """Every factor in the module's float dtype: what the engine wrote before precisions existed."""
        return self.bases is None and self.coefs is None and self.private is None

    def of(self, part: str) -> str | None:
        return getattr(self, part)

    def name(self) -> str:
        """'float', one precision, or 'bases/coefs/private'."""
        names = [p or "float" for p in (self.bases, self.coefs, self.private)]
        return names[0] if len(set(names)) == 1 else "/".join(names)

    def roles(self, dtype: torch.dtype, plan: ModulePlan | None = None) -> dict[str, str]:
        """Stored role -> precision name of every role this module stores (``plan``: those it has)."""
        out: dict[str, str] = {}
        shared = plan is None or (plan.k_B and plan.k_A)
        private = plan is None or any(plan.private_ranks)
        for part in PARTS:
            if (part in ("bases", "coefs") and not shared) or (part == "private" and not private):
                continue
            for role in ROLES[part]:
                out[role] = self.of(part) or dtype_name(dtype)
        return out

    # -- the values as stored ---------------------------------------------------------------------------
    def to_store(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What the writer is handed: ``x`` in the module's float dtype (as before); the writer
        casts or quantizes it at the role's precision (docs/format.md)."""
        return x.to(dtype)

    def rows_as_stored(
        self, rows: torch.Tensor, part: str, dtype: torch.dtype, codes: Quantized | None = None
    ) -> torch.Tensor:
        """The values a reader gets back of ``rows`` (…× cols, one stored row per last-dimension row),
        stored at this part's precision: ``rows.to(dtype)`` for the float dtype, else the cast or
        the dequantized codes of that (rows are quantized independently, so a batch of tasks
        gives each task's rows exactly). ``codes``: those rows' codes, already computed (:meth:`read_back`)."""
        x = rows.to(dtype)
        precision = self.of(part)
        if precision is None:
            return x
        if precision in FLOAT_PRECISIONS:
            return x.to(getattr(torch, precision))
        if x.numel() == 0:
            return x.float()
        if codes is not None:
            return codes.dequantize().reshape(x.shape).to(x.device)
        flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        out = stored_values(flat, precision)
        return out.reshape(x.shape)

    def read_back(self, rows: torch.Tensor, part: str, dtype: torch.dtype) -> tuple[torch.Tensor, Quantized | None]:
        """:meth:`rows_as_stored` of ``rows``, and their codes where this part is stored as codes (None
        otherwise): quantized once, they give both the values errors are measured on and what the
        writer stores (:class:`TaskCodes`)."""
        precision = self.of(part)
        if precision not in CODE_PRECISIONS or rows.numel() == 0:
            return self.rows_as_stored(rows, part, dtype), None
        codes = quantize(rows.to(dtype).reshape(-1, rows.shape[-1]), precision)
        return self.rows_as_stored(rows, part, dtype, codes), codes

    # -- the estimate -----------------------------------------------------------------------------------
    def rho(self, part: str, dtype: torch.dtype) -> float:
        """Relative RMS error of one number of this part as stored: the writer is handed the number in
        the module's dtype (:meth:`to_store`), so a precision of its own rounds that rounding again."""
        own, base = self.of(part), relative_rms_error(dtype_name(dtype))
        return base if own is None else math.hypot(relative_rms_error(own), base)

    def quantization_errors(self, shared_error: torch.Tensor, error: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per task, the relative ΔW error rounding adds (module docstring): from each task's error
        with no private directions (``shared_error``, e₀) and its planned error (``error``, e)."""
        shared_share = (1 - shared_error**2).clamp_min(0)
        private_share = (shared_error**2 - error**2).clamp_min(0)
        shared_rho2 = self.rho("bases", dtype) ** 2 + self.rho("coefs", dtype) ** 2
        return (2 * shared_rho2 * shared_share + 2 * self.rho("private", dtype) ** 2 * private_share).sqrt()

    def floor(self, dtype: torch.dtype) -> float:
        """The least error this choice can add to a task (the whole of it shared, or private)."""
        shared_rho2 = self.rho("bases", dtype) ** 2 + self.rho("coefs", dtype) ** 2
        return math.sqrt(2 * min(shared_rho2, self.rho("private", dtype) ** 2))


class TaskCodes(dict):
    """Per task, where the codes of its stored rows already are (task -> role -> (codes, start, stop):
    rows ``start:stop`` of a batch's :class:`Quantized`; roles as the encoder names them: ``coef_B``,
    ``coef_A``, ``private_B``, ``private_A``). The encoder fills it as it measures errors on dequantized
    values, and the writer gathers these rows instead of quantizing the same rows again
    (:func:`share_convert.engine.results.quantize_for_writing`)."""

    def keep(self, task: str, role: str, codes: Quantized | None, start: int, stop: int) -> None:
        """Rows ``start:stop`` of ``codes`` are ``task``'s stored rows of ``role``."""
        if codes is not None and stop > start:
            self.setdefault(task, {})[role] = (codes, start, stop)

    def rows(self, task: str, role: str) -> Quantized | None:
        """``task``'s codes of ``role`` alone (None where the encoder made none)."""
        where = self.get(task, {}).get(role)
        return where[0].rows(where[1], where[2]) if where is not None else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def half_type(dtype: torch.dtype, inputs: str | None = None) -> str:
    """The half precision of a module: bfloat16 when it stores (or its inputs are) bfloat16, else float16."""
    return "bfloat16" if dtype == torch.bfloat16 or inputs == "bfloat16" else "float16"


def candidates(precision: str, dtype: torch.dtype) -> list[Precisions]:
    """The precisions a module may be stored at under ``--precision`` (float last: the fallback)."""
    if precision == "float":
        return [Precisions()]
    if precision != "auto":
        return [Precisions.uniform(precision), Precisions()]
    half = half_type(dtype)
    out = [
        Precisions("nf4", "nf4", "nf4"),
        Precisions("int8", "nf4", "nf4"),
        Precisions("int8", "int8", "nf4"),
        Precisions("int8", "int8", "int8"),
        Precisions(half, half, half),
    ]
    out = [c for c in out if not all((c.of(p) or dtype_name(dtype)) == dtype_name(dtype) for p in PARTS)]
    return [*out, Precisions()]


def plan_bytes(space: PlanSpace, plan: ModulePlan, choice: Precisions, dtype: torch.dtype) -> int:
    """Bytes a plan stores at ``choice``: bases, their Gram matrices (float32), every task's coefficient
    rows (frozen tasks' too) and private rows, each tensor as :func:`stored_bytes` counts it."""

    def size(rows: int, cols: int, part: str) -> int:
        return stored_bytes(rows, cols, choice.of(part) or dtype_name(dtype)) if rows and cols else 0

    k_B, k_A = plan.k_B, plan.k_A
    total = 0
    if k_B and k_A:
        total += size(space.n, k_B, "bases") + size(space.d, k_A, "bases") + 4 * (k_B * k_B + k_A * k_A)
        rows = int(space.ranks.clamp(max=min(k_B, k_A)).sum())
        if space.frozen is not None:
            rows += int(space.frozen.ranks.clamp(max=min(k_B, k_A)).sum())
        total += size(rows, k_B, "coefs") + size(rows, k_A, "coefs")
    q = sum(plan.private_ranks)
    return total + size(q, space.n, "private") + size(q, space.d, "private")


def predicted_metric(space: PlanSpace, plan: ModulePlan, choice: Precisions, dtype: torch.dtype, metric: str) -> float:
    """The plan's mean (or worst) task error once stored at ``choice``, as :meth:`Precisions.quantization_errors`
    predicts it; frozen tasks count with their planned errors."""
    if not plan.predicted_errors:
        return plan.mean_error if metric == "mean" else space.frozen_stats(plan.k_B, plan.k_A)[1]
    device = space.norm2.device
    error = torch.tensor(plan.predicted_errors, dtype=torch.float64, device=device)
    e0 = space.tails(plan.k_B, plan.k_A)[:, 0] if plan.k_B and plan.k_A else error.new_ones(error.shape)
    e0 = torch.maximum(e0, error)
    added = PREDICTION_MARGIN * choice.quantization_errors(e0.clamp(max=1), error.clamp(max=1), dtype)
    added = torch.where(space.norm2 > 0, added, 0.0)
    # a task that is itself a reconstruction carries a bound (prior + drift): the rounding adds to its drift
    total = (error**2 + added**2).sqrt() if space.plain else error + added
    frozen_sum, frozen_max = space.frozen_stats(plan.k_B, plan.k_A)
    if metric == "max":
        return max(float(total.max()), frozen_max)
    return (float(total.sum()) + frozen_sum) / space.count


@dataclass
class PrecisionPlan:
    """A plan of structure and precision: the structure, where to store it, its bytes and the
    structural target it was planned at."""

    plan: ModulePlan
    precision: Precisions
    bytes: int
    target: float


def precision_plans(
    planner, target: float, metric: str, precision: str, dtype: torch.dtype, float_plan: ModulePlan
) -> list[PrecisionPlan]:
    """Per candidate precision (:func:`candidates`), the least-storage structure whose predicted error
    meets ``target``, cheapest in bytes first; ``float_plan`` (the structure planned for the float
    dtype at ``target``) is last, the fallback that is always there.

    Candidates are tried in the order of what ``float_plan``'s structure would cost at their precision,
    and one is skipped when that already costs no less than the cheapest plan found: a tighter target
    needs at least as much structure, so it cannot be cheaper (the planner's search is the cost here,
    on modules small enough that planning outweighs the bases' fit).
    """
    out: list[PrecisionPlan] = []
    choices = [c for c in candidates(precision, dtype)[:-1] if c.floor(dtype) < target]
    choices.sort(key=lambda c: plan_bytes(planner, float_plan, c, dtype))
    shared_only: dict[tuple[str | None, str | None], PrecisionPlan] = {}
    for choice in choices:
        if out and plan_bytes(planner, float_plan, choice, dtype) >= min(p.bytes for p in out):
            continue
        same = shared_only.get((choice.bases, choice.coefs))
        if same is not None:  # a plan without private directions: the private rows' precision changes nothing
            out.append(PrecisionPlan(same.plan, choice, same.bytes, same.target))
            continue
        found = plan_for(planner, target, metric, choice, dtype, known=float_plan)
        if found is not None:
            out.append(found)
            if not any(found.plan.private_ranks) and not any(float_plan.private_ranks):
                shared_only[(choice.bases, choice.coefs)] = found
    out.sort(key=lambda p: p.bytes)
    out.append(PrecisionPlan(float_plan, Precisions(), plan_bytes(planner, float_plan, Precisions(), dtype), target))
    return out


def plan_for(
    planner,
    target: float,
    metric: str,
    choice: Precisions,
    dtype: torch.dtype,
    start: float | None = None,
    known: ModulePlan | None = None,
) -> PrecisionPlan | None:
    """The least-storage structure at ``choice`` whose predicted error meets ``target`` (None if none is
    found in :data:`PREDICTION_ROUNDS` re-plans). The structural target starts at ``start``, or below
    the structural error of ``known`` (a plan at ``target`` itself) by what rounding it adds over the
    target, or where rounding a fully shared task would leave room; it is lowered by what the
    prediction misses."""
    plan = None
    if start is not None:
        inner = start
    elif known is not None:
        predicted = predicted_metric(planner, known, choice, dtype, metric)
        if predicted <= target + TARGET_TOL:
            return PrecisionPlan(known, choice, plan_bytes(planner, known, choice, dtype), target)
        inner = min(target, structural_metric(planner, known, metric)) - (predicted - target) - TARGET_TOL
    else:
        shared = math.sqrt(2 * (choice.rho("bases", dtype) ** 2 + choice.rho("coefs", dtype) ** 2))
        inner = math.sqrt(max(target**2 - shared**2, 0.0))
    for _ in range(PREDICTION_ROUNDS):
        if inner <= 0:
            return None
        plan = planner.for_target(inner, metric)
        if plan.target_relaxed:
            return None
        predicted = predicted_metric(planner, plan, choice, dtype, metric)
        if predicted <= target + TARGET_TOL:
            return PrecisionPlan(plan, choice, plan_bytes(planner, plan, choice, dtype), inner)
        # plans are steps: below this plan's own structural error by what the rounding adds over the target
        inner = min(inner, structural_metric(planner, plan, metric)) - (predicted - target) - TARGET_TOL
    return None


def structural_metric(space: PlanSpace, plan: ModulePlan, metric: str) -> float:
    """The plan's mean (or worst) task error before rounding, frozen tasks included."""
    if metric == "mean":
        return plan.mean_error
    return max([*plan.predicted_errors, space.frozen_stats(plan.k_B, plan.k_A)[1]])


def tighter(space: PlanSpace, plan: ModulePlan, metric: str, measured: float, target: float) -> float:
    """A structural target for a retry of ``plan`` whose measured error missed ``target``: below its
    own structural error by twice the miss."""
    return structural_metric(space, plan, metric) - 2 * (measured - target)


def measured_metric(errors: list[float], norms: list[float], metric: str, frozen: tuple[float, float], count: int):
    """The mean (over ``count`` tasks) or worst of the recorded errors, frozen tasks' (sum, max) included."""
    live = [e for e, n in zip(errors, norms) if n > 0]
    if metric == "max":
        return max([*live, frozen[1]], default=0.0)
    return (sum(live) + frozen[0]) / max(count, 1)


def meets(value: float, target: float) -> bool:
    return value <= target + TARGET_TOL
