"""Consolidation: many adapters in, one Share checkpoint out (spec, sections 2 and 6).

For each module, one at a time: read the factors of every task that has it (scale folded),
canonicalize them, stack them (weighted), find the principal bases, let the planner choose the
shared k and each task's private rank, then write the bases, coefficients and private factors
and measure each task's ΔW error on the tensors as stored. Only one module's stack is ever in
memory.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..checkpoint.format import FORMAT_NAME, FORMAT_VERSION
from ..checkpoint.publish import check_output
from ..checkpoint.records import RecordTable, TaskRows
from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..checkpoint.writer import CheckpointWriter
from ..config import DEFAULT_TARGET_ERROR, ConsolidationConfig  # noqa: F401 (re-exported)
from ..dtypes import itemsize
from ..errors import IncompatibleAdaptersError, InvalidOptionError
from ..io.factors import LoraFactors, LoraStack
from ..io.stack import OpenFiles, read_module_stack
from ..math.linalg import canonicalize_many, deterministic, extend_basis, load_linalg, principal_basis
from .encoding import (
    StoredBases,
    coordinates,
    encode_in_bases,
    encode_private_only,
    store_bases,
    store_grams,
)
from .grouping import cluster_tasks
from .planning import ModulePlan, ModulePlanner, TaskFit, energy_k, parse_budget, task_weight

if TYPE_CHECKING:
    from ..checkpoint.reader import Checkpoint

Progress = Callable[[str, int, int], None]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_TO_NAME = {"F32": "float32", "F64": "float32", "BF16": "bfloat16", "F16": "float16"}


class TaskSource(Protocol):
    """What consolidation needs of an input task: an adapter file or a task of a checkpoint."""

    task: str
    origin: str
    config: dict | None
    head_keys: list[str]
    weights_dtype: str

    def module_shapes(self) -> dict[str, tuple[int, int, int]]: ...  # name -> (n, d, r)
    def read_module(self, module: str) -> LoraFactors: ...
    def read_heads(self) -> dict[str, torch.Tensor]: ...
    def task_record(self) -> dict[str, Any]: ...
    def prior(self, module: str) -> tuple[float, float, bool] | None: ...  # (error, ‖ΔW‖, is_bound) of a reconstruction


@dataclass
class ModuleMember:
    """One task's update in one module, ready for stacking."""

    task: str
    rank: int  # the adapter's rank r in this module
    Bc: torch.Tensor  # canonical factors, float32: ΔW = Bc Acᵀ, BcᵀBc = AcᵀAc = diag(s)
    Ac: torch.Tensor
    s: torch.Tensor  # singular values of ΔW, float64
    raw: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, Aᵀ) as trained, stacked when not canonicalizing
    prior: tuple[float, float, bool] | None = None
    #: η of planning.drift_bound for a reconstruction that was a projection of its original (+inf: not known)
    slack: float = math.inf

    @property
    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The column factors that enter the stacks (spec, section 2, step 3)."""
        return self.raw if self.raw is not None else (self.Bc, self.Ac)

    def to(self, device: torch.device) -> ModuleMember:
        """This member with its tensors on ``device`` (itself when they are there already)."""
        if self.s.device == device:
            return self
        raw = None if self.raw is None else (self.raw[0].to(device), self.raw[1].to(device))
        return dc_replace(self, Bc=self.Bc.to(device), Ac=self.Ac.to(device), s=self.s.to(device), raw=raw)


@dataclass
class ModuleResult:
    plan: ModulePlan
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    records: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # a dict, or a RecordTable
    #: the planner the plan came from (its tasks' fits serve the grouping)
    planner: ModulePlanner | None = None
    groups: list[dict[str, Any]] | None = None
    #: bases and Gram matrices of the source checkpoint kept byte for byte (continual updates)
    carried: list[str] = field(default_factory=list)
    #: each task's tensors in this module: coef_B, coef_A, private_B, private_A (those it has)
    task_parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: the tasks' tensors already stacked (updates of many old tasks); when set, ``task_parts`` is not written
    rows: TaskRows | None = None


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def storage_dtype(config: ConsolidationConfig, weights_dtypes: Sequence[str]) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    names = {_ST_TO_NAME.get(d, "float32") for d in weights_dtypes}
    for pref in ("float32", "bfloat16", "float16"):
        if pref in names:
            return _DTYPES[pref]
    return torch.float32


class ModuleFilter:
    """A task source restricted to the modules whose names match a regular expression."""

    def __init__(self, source: TaskSource, pattern: str):
        self._source, self._pattern = source, re.compile(pattern)
        self._shapes: dict[str, tuple[int, int, int]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The source's modules that match, filtered once (a merge asks for them per module)."""
        if self._shapes is None:
            self._shapes = {k: v for k, v in self._source.module_shapes().items() if self._pattern.search(k)}
        return dict(self._shapes)


def only_modules(sources: Sequence[TaskSource], pattern: str | None) -> list[TaskSource]:
    """Keep only the modules matching ``pattern`` (a regex searched in module names)."""
    if not pattern:
        return list(sources)
    try:
        re.compile(pattern)
    except re.error as e:
        raise InvalidOptionError(
            f"--modules {pattern!r} is not a valid regular expression ({e})",
            hint="For example --modules 'attn\\.c_attn'",
        ) from None
    kept = [ModuleFilter(s, pattern) for s in sources]
    kept = [s for s in kept if s.module_shapes()]
    if not kept:
        raise InvalidOptionError(
            f"--modules {pattern!r} matches no module of the inputs", hint="Check the pattern against the module names"
        )
    return kept


def check_compatible(sources: Sequence[TaskSource]) -> dict[str, tuple[int, int, list[int]]]:
    """Module name → (n, d, indices of the sources that have it); raises on disagreements."""
    modules: dict[str, tuple[int, int, list[int]]] = {}
    owner: dict[str, int] = {}
    for i, src in enumerate(sources):
        for name, (n, d, _r) in src.module_shapes().items():
            if name in modules:
                n0, d0, idx = modules[name]
                if (n0, d0) != (n, d):
                    other = sources[owner[name]]
                    raise IncompatibleAdaptersError(
                        f"module {name} is {n}×{d} in {src.origin} but {n0}×{d0} in {other.origin}: "
                        "they adapt different base models",
                        hint="Consolidate adapters of one base model together",
                    )
                idx.append(i)
            else:
                modules[name] = (n, d, [i])
                owner[name] = i
    if len(sources) > 1:
        for i, src in enumerate(sources):
            if all(len(modules[m][2]) == 1 for m in src.module_shapes()):
                other = next(s for j, s in enumerate(sources) if j != i)
                bases = {s.config.get("base_model_name_or_path") for s in (src, other) if s.config}
                extra = f" (base models: {', '.join(sorted(str(b) for b in bases))})" if len(bases) > 1 else ""
                raise IncompatibleAdaptersError(
                    f"{src.origin} shares no module with the other inputs{extra}: they adapt different base models",
                    hint="Consolidate adapters of one base model together",
                )
    return dict(sorted(modules.items(), key=lambda kv: natural_key(kv[0])))


def prepare_member(task: str, factors: LoraFactors, config: ConsolidationConfig, prior=None) -> ModuleMember:
    """Canonicalize one task's factors (spec, section 2, step 2)."""
    return prepare_members([task], [factors], config, [prior])[0]


def prepare_members(
    tasks: Sequence[str],
    factors: LoraStack | Sequence[LoraFactors],
    config: ConsolidationConfig,
    priors: Sequence | None = None,
    original_ranks: Sequence[int | None] | None = None,
) -> list[ModuleMember]:
    """Canonicalize many tasks' factors in one module at once (batched; spec, section 2, step 2).

    The factors move to the compute device first (``config.device``): the members, and everything
    computed from them for this module (stacks, bases, planning, encoding), live there; only what
    is written comes back. ``original_ranks`` gives, for tasks read from a checkpoint, the rank of
    the adapter they came from (their factors as read have the stored rank)."""
    device = config.torch_device()
    if isinstance(factors, LoraStack):  # read as one stack: canonicalized without restacking
        factors = LoraStack(factors.B.to(device), factors.A.to(device))
        canon = canonicalize_many(factors.B, factors.A.transpose(-1, -2))
    else:
        factors = [LoraFactors(f.B.to(device), f.A.to(device)) for f in factors]
        canon = canonicalize_many([f.B for f in factors], [f.A.T for f in factors])
    priors = priors or [None] * len(tasks)
    originals = original_ranks or [None] * len(tasks)
    return [
        ModuleMember(
            t,
            int(f.B.shape[1]) if o is None else o,
            Bc,
            Ac,
            s,
            None if config.canonicalize else (f.B, f.A.T.contiguous()),
            p,
        )
        for t, f, (Bc, Ac, s), p, o in zip(tasks, factors, canon, priors, originals)
    ]


def read_members(
    sources: Sequence[TaskSource], module: str, config: ConsolidationConfig, files: OpenFiles | None = None
) -> list[ModuleMember]:
    """One module of every source in ``sources``, read (scale folded) and canonicalized: what
    merge, add and the budget's first pass all start a module with."""
    return prepare_members(
        [s.task for s in sources],
        read_module_stack(list(sources), module, files, config.torch_device()),
        config,
        [s.prior(module) for s in sources],
        [original_rank(s, module) for s in sources],
    )


def original_rank(source: TaskSource, module: str) -> int | None:
    """The rank of the adapter a task came from in ``module``, when it differs from what is read
    (a task of a checkpoint); None for an adapter."""
    method = getattr(source, "original_rank", None)
    return method(module) if method is not None else None


class ModuleStack:
    """One module's weighted stacks, ready for decomposition (spec, section 2, steps 3–4)."""

    def __init__(self, n: int, d: int, members: list[ModuleMember], config: ConsolidationConfig):
        self.n, self.d, self.members, self.config = n, d, members, config
        #: each task's rank here (its canonical singular values); uniform: one rank, and those columns stacked
        self.ranks = [int(m.s.numel()) for m in members]
        self.uniform = len(set(self.ranks)) == 1 and all(
            m.stacked[0].shape[1] == r for m, r in zip(members, self.ranks)
        )
        #: where this module is computed: the members' device
        self.device = members[0].s.device if members else config.torch_device()
        if self.uniform and members:  # one batched reduction, the same sums as one per task
            self.norm2 = (torch.stack([m.s for m in members]) ** 2).sum(1)
        else:
            self.norm2 = torch.tensor([float((m.s**2).sum()) for m in members], dtype=torch.float64, device=self.device)
        self.norms = [x**0.5 for x in self.norm2.tolist()]
        self.weights = [task_weight(nm, config.weighting) for nm in self.norms]
        self.stack_B, self.stack_A = (self._weighted(side) for side in (0, 1))
        m_total = self.stack_B.shape[1]
        self.cap = config.max_k or m_total
        #: the most basis vectors either side can have
        self.full = max(min(n, m_total, self.cap), min(d, m_total, self.cap))
        #: fit(K) by K, and widen(K, fit) by (the fit's widths, K): each computed once
        self._fits: dict[int, tuple] = {}
        self._widened: dict[tuple[int, int, int], tuple] = {}

    def _weighted(self, side: int) -> torch.Tensor:
        """One side's stack: every task's columns times √weight, side by side (``n × Σr``)."""
        parts = [m.stacked[side] for m in self.members]
        roots = [w**0.5 for w in self.weights]
        if self.uniform and len(parts) > 1:  # one rank: a batched product, then one copy into place
            T, rows, r = len(parts), parts[0].shape[0], parts[0].shape[1]
            scale = torch.tensor(roots, dtype=torch.float32, device=self.device)[:, None, None]
            return (torch.stack(parts).float() * scale).permute(1, 0, 2).reshape(rows, T * r)
        return torch.cat([p.float() * w for p, w in zip(parts, roots)], 1)

    def fit(self, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ModulePlanner]:
        """Top-K bases of both stacks and a planner over them (computed once per K)."""
        if K not in self._fits:
            self._fits[K] = self._fit(K)
        return self._fits[K]

    def widen(self, K: int, fit: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ModulePlanner]:
        """``fit`` (the result of :meth:`fit` or :meth:`widen`) widened to K vectors per side.

        The vectors already computed are kept and new ones found in what they leave out
        (:func:`share_convert.math.linalg.extend_basis`), so widening costs the new vectors only, and
        the planner keeps every error it computed on the narrower bases (they are prefixes of the new).
        """
        beta, alpha, sB, sA, planner = fit
        if planner.projections is None:  # not built from projections: fit afresh
            return self.fit(K)
        key = (beta.shape[1], alpha.shape[1], K)
        if key not in self._widened:
            self._widened[key] = self._widen(K, fit)
        return self._widened[key]

    def _widen(
        self, K: int, fit: tuple
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ModulePlanner]:
        beta, alpha, sB, sA, planner = fit
        projB, projA = planner.projections
        opts = {"n_oversamples": self.config.n_oversamples, "n_iter": self.config.n_iter}
        seed = self.config.seed + 2 * beta.shape[1]  # fresh random directions for each widening
        beta, sB, projB = extend_basis(
            self.stack_B, beta, sB, projB, min(K, self.cap) - beta.shape[1], seed=seed, **opts
        )
        alpha, sA, projA = extend_basis(
            self.stack_A, alpha, sA, projA, min(K, self.cap) - alpha.shape[1], seed=seed + 1, **opts
        )
        wider = self._planner(projB, projA)
        wider.inherit(planner)
        return beta, alpha, sB, sA, wider

    def _fit(self, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ModulePlanner]:
        opts = {"n_oversamples": self.config.n_oversamples, "n_iter": self.config.n_iter}
        beta, sB, projB = principal_basis(self.stack_B, min(K, self.cap), seed=self.config.seed, **opts)
        alpha, sA, projA = principal_basis(self.stack_A, min(K, self.cap), seed=self.config.seed + 1, **opts)
        if self.config.canonicalize and self.uniform:  # every task's coordinates, from the projections
            return beta, alpha, sB, sA, self._planner(projB, projA)
        if self.config.canonicalize:  # the projections hold every task's coordinates, weighted
            fits, off = [], 0
            for m, w in zip(self.members, self.weights):
                r = m.stacked[0].shape[1]
                scale = w**-0.5 if w > 0 else 0.0
                fits.append(
                    TaskFit.of(m.s, projB[:, off : off + r] * scale, projA[:, off : off + r] * scale, m.prior, m.slack)
                )
                off += r
        else:
            b64, a64 = beta.double(), alpha.double()
            fits = [
                TaskFit.of(m.s, b64.T @ m.Bc.double(), a64.T @ m.Ac.double(), m.prior, m.slack) for m in self.members
            ]
        return beta, alpha, sB, sA, ModulePlanner(self.n, self.d, fits)

    def _planner(self, projB: torch.Tensor, projA: torch.Tensor) -> ModulePlanner:
        """The planner over tasks of one rank, built from the projections without a Python object per
        task: the weighted stack's coordinates, unweighted column block by column block."""
        T, r = len(self.members), self.ranks[0] if self.members else 0
        f64, device = torch.float64, projB.device
        scale = torch.tensor([w**-0.5 if w > 0 else 0.0 for w in self.weights], dtype=f64, device=device)
        Eb = (projB.reshape(projB.shape[0], T, r).permute(1, 0, 2) * scale[:, None, None]).contiguous()
        Ea = (projA.reshape(projA.shape[0], T, r).permute(1, 0, 2) * scale[:, None, None]).contiguous()
        prior, ratio, slack = [0.0] * T, [1.0] * T, [math.inf] * T
        for i, m in enumerate(self.members):  # tasks that are reconstructions (a few, when any)
            if m.prior is not None:
                error, norm, _ = m.prior
                prior[i] = error
                ratio[i] = self.norms[i] / norm if norm > 0 else 0.0
                slack[i] = m.slack
        prior, ratio, slack = (torch.tensor(x, dtype=f64, device=device) for x in (prior, ratio, slack))
        s = torch.stack([m.s for m in self.members]).to(f64) if T else torch.zeros(0, 0, dtype=f64, device=device)
        ranks = torch.full((T,), r, dtype=torch.int64, device=device)
        planner = ModulePlanner.stacked(
            self.n, self.d, s, Eb, Ea, ranks=ranks, norm2=self.norm2, prior=prior, ratio=ratio, slack=slack
        )
        planner.projections = (projB, projA)
        return planner


def consolidate_module(
    name: str,
    n: int,
    d: int,
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    clock: dict[str, float] | None = None,
) -> ModuleResult:
    """Bases, plan, coefficients, private factors and errors for one module.

    ``config`` has a fixed k, an energy or an error target: a ``--budget`` is turned into an error
    target per module by :func:`merge` first. With ``config.groups`` other than '1', the tasks are
    also split into groups with separate bases (spec, section 6), and the split is kept when it is
    cheaper at the same error target.
    """
    single = consolidate_group(name, n, d, members, config, dtype, clock)
    mode = config.mode()
    if str(config.groups) == "1" or mode in ("fixed", "energy") or len(members) < 4:
        return single
    options = range(2, min(4, len(members) // 2) + 1) if config.groups == "auto" else [int(config.groups)]
    best = single
    for G in options:
        labels = cluster_tasks(single.planner.fits, G)
        found = sorted(set(labels))
        if len(found) < 2:
            continue
        parts = [[m for m, lab in zip(members, labels) if lab == g] for g in found]
        results = [
            consolidate_group(name, n, d, part, config, dtype, clock, prefix=f"modules/{name}/g{j}/")
            for j, part in enumerate(parts)
        ]
        combined = combine_groups(members, parts, results, single.plan.alternatives)
        if combined.plan.params < best.plan.params:
            best = combined
    return best


def combine_groups(
    members: list[ModuleMember], parts: list[list[ModuleMember]], results: list[ModuleResult], alternatives
) -> ModuleResult:
    """One module result from the results of its groups (bases under modules/<m>/g<j>/)."""
    combined = ModuleResult(plan=ModulePlan(0, 0, [], [], 0, alternatives))
    combined.groups = []
    where = {}
    for j, (part, res) in enumerate(zip(parts, results)):
        combined.tensors.update(res.tensors)
        combined.task_parts.update(res.task_parts)
        for m in part:
            where[m.task] = (j, res)
        combined.groups.append(
            {
                "k_B": res.plan.k_B,
                "k_A": res.plan.k_A,
                "kind": res.plan.kind,
                "params": res.plan.params,
                "tasks": [m.task for m in part],
            }
        )
        combined.plan.k_B += res.plan.k_B
        combined.plan.k_A += res.plan.k_A
        combined.plan.params += res.plan.params
    for m in members:
        j, res = where[m.task]
        i = [x.task for x in parts[j]].index(m.task)
        combined.records[m.task] = dict(res.records[m.task], group=j)
        combined.plan.private_ranks.append(res.plan.private_ranks[i])
        combined.plan.predicted_errors.append(res.records[m.task]["error"])
    return combined


def consolidate_group(
    name: str,
    n: int,
    d: int,
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    clock: dict[str, float] | None = None,
    prefix: str | None = None,
) -> ModuleResult:
    """One set of shared bases for ``members`` (all of a module's tasks, or one group of them)."""
    t0 = time.perf_counter()
    stack = ModuleStack(n, d, members, config)
    beta, alpha, plan, planner = plan_group(stack, config)
    norms, weights = stack.norms, stack.weights
    t1 = time.perf_counter()
    result = ModuleResult(plan=plan)
    result.planner = planner
    bases = StoredBases.of(*store_bases(name, beta, alpha, plan, dtype, result, prefix))
    coords = coordinates(members, bases)
    if bases is None:  # no shared part: every task keeps its own top directions
        encoded = encode_private_only(members, plan.private_ranks, dtype, norms)
    else:
        encoded = encode_in_bases(members, plan.private_ranks, bases, dtype, norms, coords)
    for i, m in enumerate(members):
        tensors, record = encoded[i]
        result.task_parts[m.task] = tensors
        result.records[m.task] = record
    store_grams(name, result, [(m.task, weights[i]) for i, m in enumerate(members)], plan, prefix)
    if clock is not None:
        clock["decompose"] += t1 - t0
        clock["encode"] += time.perf_counter() - t1
    return result


def plan_group(stack: ModuleStack, config: ConsolidationConfig):
    """The bases and plan of one stack under ``config``: (β, α, plan, planner)."""
    full = stack.full
    if config.mode() == "fixed":
        K = min(config.k or 0, full)
    elif config.mode() == "energy" or full <= 64:
        K = full
    else:  # start small; the loop below widens the bases when the best k is at the edge
        K = min(48, full)
    fit = stack.fit(K)
    while True:
        beta, alpha, sB, sA, planner = fit
        plan = _choose(planner, config, stack.stack_B, stack.stack_A, sB, sA)
        if config.mode() in ("fixed", "energy") or not _wider_may_pay(planner, plan, K, full):
            break
        K = min(2 * K, full)
        fit = stack.widen(K, fit)
    return beta, alpha, plan, planner


def _wider_may_pay(planner: ModulePlanner, plan: ModulePlan, K: int, full: int) -> bool:
    """Whether bases wider than the K vectors computed may hold a cheaper plan than ``plan``.

    Never when any plan beyond K (its bases and coefficients alone) costs more than ``plan``;
    otherwise when the best k is at the edge, or when it is a mix of sharing and private
    corrections in the upper half of the bases: there the storage varies little with k (the
    planner's costs are flat within a fraction of a percent on noisy sets), so a fit of K vectors
    alone does not tell whether a wider basis pays.
    """
    if K >= full or planner.shared_params(K + 1, K + 1) >= plan.params:
        return False
    k = max(plan.k_B, plan.k_A)
    return k >= K or (plan.kind == "mixed" and 2 * k >= K)


def _choose(planner: ModulePlanner, config, stack_B, stack_A, sB, sA) -> ModulePlan:
    mode = config.mode()
    if mode == "fixed":
        return planner.fixed(config.k, config.private_rank)
    if mode == "energy":
        kB = energy_k(sB, float(stack_B.double().pow(2).sum()), config.energy)
        kA = energy_k(sA, float(stack_A.double().pow(2).sum()), config.energy)
        return planner.evaluate(kB, kA, [0] * planner.T)
    if mode == "budget":
        raise ValueError("a --budget is spent across modules by merge(): plan each module at its target")
    return planner.for_target(config.target_error, config.target_metric)


def merge(
    sources: Sequence[TaskSource],
    output: str | Path,
    config: ConsolidationConfig | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    history: list[dict[str, Any]] | None = None,
    op: str = "merge",
    timings: dict[str, float] | None = None,
    workers: int | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Consolidate ``sources`` into the Share checkpoint ``output``; return its manifest.

    Nothing is written unless every input is valid: the file appears atomically at the end.
    ``timings``, when given, receives the seconds spent reading, canonicalizing, decomposing
    (bases and planning), encoding (coefficients, private factors, errors) and writing, summed
    over workers. ``workers`` modules are processed at once (default: one per CPU core, at most
    4); memory holds that many modules' stacks. Tensors taking more than ``max_shard_size`` bytes
    (an int, or text such as '5GB') are written in shards with an index.
    """
    config = config or ConsolidationConfig()
    config.validate()
    max_shard_size = parse_size(max_shard_size)
    output = Path(output)
    if not sources:
        raise InvalidOptionError("no inputs were given", hint="Pass adapter folders, files or globs")
    check_output(output, force)
    modules = check_compatible(sources)
    dtype = storage_dtype(config, [s.weights_dtype for s in sources])
    shapes = [s.module_shapes() for s in sources]
    # original LoRA parameters per module: what budgets are split by and what sets the worker count
    module_params = {m: sum(shapes[i][m][2] for i in idx) * (n + d) for m, (n, d, idx) in modules.items()}
    total_original = sum(module_params.values())
    if workers is None:
        workers = auto_workers(max(module_params.values(), default=0))
    load_linalg(config.torch_device())
    # bytes that are not LoRA data: heads, the records (64 bytes per task and module) and the manifest
    pairs = sum(len(idx) for (_, _, idx) in modules.values())
    fixed_bytes = (
        sum(s.task_record().get("head_bytes", 0) for s in sources)
        + 64 * pairs
        + 1000 * len(sources)
        + 2000 * len(modules)
        + 4096
    )
    with OpenFiles() as files:  # each adapter file opened once for the whole merge (up to a limit)
        return _merge_into(
            sources, output, config, modules, dtype, workers, total_original, fixed_bytes, files,
            progress=progress, history=history, op=op, timings=timings, max_shard_size=max_shard_size,
        )  # fmt: skip


def _merge_into(
    sources: Sequence[TaskSource],
    output: Path,
    config: ConsolidationConfig,
    modules: dict[str, tuple[int, int, list[int]]],
    dtype: torch.dtype,
    workers: int,
    total_original: int,
    fixed_bytes: int,
    files: OpenFiles,
    *,
    progress: Progress | None,
    history: list[dict[str, Any]] | None,
    op: str,
    timings: dict[str, float] | None,
    max_shard_size: int | str,
) -> dict[str, Any]:
    """The body of :func:`merge`, once its inputs are checked: the budget's targets, then every
    module read, consolidated and written in order."""
    manifest_modules: dict[str, Any] = {}
    clock = dict.fromkeys(("read", "canonicalize", "decompose", "encode", "write"), 0.0)
    # a --budget is spent across modules: first each module's error against storage, then a target per module
    with deterministic():
        targets = _budget_targets(sources, modules, config, dtype, total_original, fixed_bytes, workers, files)
    with deterministic(), CheckpointWriter(output, max_shard_size) as writer:
        for src in sources:
            for key, t in src.read_heads().items():
                writer.add(f"tasks/{src.task}/heads/{key}", t)
        lock = threading.Lock()
        device = config.torch_device()

        def read(item: tuple[str, tuple[int, int, list[int]]]) -> tuple[LoraStack | list[LoraFactors], float]:
            name, (_n, _d, idx) = item
            t0 = time.perf_counter()
            return read_module_stack([sources[i] for i in idx], name, files, device), time.perf_counter() - t0

        def work(
            item: tuple[str, tuple[int, int, list[int]]], read_ahead: tuple[Any, float] | None = None
        ) -> ModuleResult:
            name, (n, d, idx) = item
            local = dict.fromkeys(clock, 0.0)
            factors, local["read"] = read_ahead or read(item)
            t1 = time.perf_counter()
            here = [sources[i] for i in idx]
            members = prepare_members(  # read_members, with the reading timed apart
                [s.task for s in here], factors, config, [s.prior(name) for s in here],
                [original_rank(s, name) for s in here],
            )  # fmt: skip
            del factors
            local["canonicalize"] += time.perf_counter() - t1
            module_config = config
            if targets:  # under --budget: this module's share, as an error target
                module_config = dc_replace(config, budget=None, target_error=targets[name], target_metric="mean")
            res = consolidate_module(name, n, d, members, module_config, dtype, local)
            with lock:
                for k, v in local.items():
                    clock[k] += v
            return res

        # Modules are independent: workers compute them concurrently (each numeric op on one
        # thread, so results do not depend on the thread count) and the writer takes them in order.
        # Several workers overlap one's reading with the others' compute; a single one (large
        # modules) has the next module read on a thread of its own while it computes this one.
        items = list(modules.items())
        if workers <= 1:
            results = (work(item, ahead) for item, ahead in zip(items, _prefetched(read, items)))
        else:
            results = _ordered_map(work, items, workers)
        for step, (item, res) in enumerate(zip(items, results)):
            name, (n, d, _idx) = item
            if progress:
                progress(name, step, len(modules))
            t2 = time.perf_counter()
            write_module(writer, name, res, dtype)
            manifest_modules[name] = module_record(n, d, res, dtype)
            if targets:
                manifest_modules[name]["target_error"] = targets[name]
            clock["write"] += time.perf_counter() - t2
        if progress:
            progress("", len(modules), len(modules))
        manifest = build_manifest(config, sources, manifest_modules, history or [], op)
        t3 = time.perf_counter()
        writer.finish(manifest)
        clock["write"] += time.perf_counter() - t3
    if timings is not None:
        timings.update(clock)
    return manifest


#: Memory one module may take (bytes) before modules are processed one at a time.
PARALLEL_MODULE_BYTES = 384 * 2**20


def auto_workers(largest_module_params: int) -> int:
    """One worker per core (at most 4), or one when a module's stack is large: memory holds one
    module per worker, and the project's rule is that memory stays small and flat."""
    # factors as read, canonical factors and the stacks: about four float32 copies of the module
    if largest_module_params * 4 * 4 > PARALLEL_MODULE_BYTES:
        return 1
    return min(os.cpu_count() or 1, 4)


def _ordered_map(fn: Callable, items: list, workers: int | None) -> Iterator:
    """``map(fn, items)`` on a few threads, in order, with at most ``2 × workers`` results pending."""
    workers = workers or min(os.cpu_count() or 1, 4)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="share-convert") as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))


def _prefetched(fn: Callable, items: list, ahead: int = 1) -> Iterator:
    """``map(fn, items)``, computed on one background thread ``ahead`` items before each is asked
    for: the next module is read while this one is computed (memory: ``ahead`` more modules)."""
    if len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="share-convert-read") as pool:
        pending: deque = deque(pool.submit(fn, item) for item in items[:ahead])
        nxt = ahead
        while pending:
            result = pending.popleft().result()
            if nxt < len(items):
                pending.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield result


def write_module(
    writer: CheckpointWriter, name: str, res: ModuleResult, dtype: torch.dtype, source: Checkpoint | None = None
) -> None:
    """Write one module: its bases and Gram matrices, then every task's tensors stacked (format v2).

    ``source`` is the checkpoint that ``res.carried`` tensors are copied from, byte for byte.
    """
    for tname in sorted(res.tensors):
        writer.add(tname, res.tensors[tname])
    for tname in res.carried:
        source.copy_to(writer, tname)
    rows = res.rows
    if rows is None:
        tasks = []
        for task, rec in res.records.items():
            prefix = f"modules/{name}/g{rec['group']}/" if res.groups else f"modules/{name}/"
            tasks.append((task, prefix, res.task_parts.get(task, {})))
        rows = TaskRows.of_parts(tasks, dtype)
    writer.add_module(name, rows)


def module_record(n: int, d: int, res: ModuleResult, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "out_features": n,
        "in_features": d,
        "k_B": res.plan.k_B,
        "k_A": res.plan.k_A,
        "kind": res.plan.kind,
        "alternatives": res.plan.alternatives,
        "params": res.plan.params,
        **({"groups": res.groups} if res.groups else {}),
        **({"target_relaxed": True} if res.plan.target_relaxed else {}),
        "dtype": str(dtype).replace("torch.", ""),
        # as arrays: T × M record dicts would hold memory in proportion to the tasks (issue 12)
        "tasks": RecordTable.from_dicts(res.records),
    }


def build_manifest(
    config: ConsolidationConfig,
    sources: Sequence[TaskSource],
    modules: dict[str, Any],
    history: list[dict[str, Any]],
    op: str,
    added: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The manifest: options, task records, module entries and the history with this operation.

    ``added`` names the tasks this operation added (default: every source not taken from a checkpoint).
    """
    tasks = {s.task: dict(s.task_record()) for s in sources}
    # per task, over the modules in order: the original LoRA parameters and the errors (as arrays)
    index = {t: i for i, t in enumerate(tasks)}
    lora = np.zeros(len(tasks), dtype=np.int64)
    err_sum, err_count = np.zeros(len(tasks)), np.zeros(len(tasks), dtype=np.int64)
    err_max = np.zeros(len(tasks))
    for m in modules.values():
        table = RecordTable.from_dicts(m["tasks"])
        where = np.array([index.get(t, -1) for t in table.tasks], dtype=np.int64)
        known = where >= 0
        where = where[known]
        lora[where] += table.int_column("original_rank")[known] * (m["out_features"] + m["in_features"])
        errors = table.float_column("error")[known]
        err_max[where] = np.where(err_count[where] > 0, np.maximum(err_max[where], errors), errors)
        err_sum[where] += errors
        err_count[where] += 1
    for name, rec in tasks.items():
        if "original_params" in rec:
            continue  # a task from an earlier checkpoint keeps its originals' size
        # the originals counted are what this checkpoint replaces: the LoRA tensors of its modules, and the heads
        params = int(lora[index[name]])
        rec["original_params"] = params + rec.get("head_params", 0)
        rec["original_bytes"] = params * itemsize(rec.get("weights_dtype", "F32")) + rec.get("head_bytes", 0)
    if added is None:
        added = [s.task for s in sources if not s.task_record().get("from_checkpoint")]

    def errors_of(task: str) -> dict[str, float]:
        i = index.get(task)
        if i is None or not err_count[i]:
            return {"mean": 0.0, "max": 0.0}
        return {"mean": float(err_sum[i]) / int(err_count[i]), "max": float(err_max[i])}

    # the errors of the tasks this operation added; every task's current errors are in the record
    # tables, and the reader completes the last entry from them (format version 2)
    entry = {"op": op, "tasks_added": added, "errors": {t: errors_of(t) for t in added}}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "tasks": tasks,
        "modules": modules,
        "history": [*history, entry],
    }


def _budget_targets(
    sources: Sequence[TaskSource],
    modules: dict[str, tuple[int, int, list[int]]],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    total_original: int,
    fixed_bytes: int,
    workers: int,
    files: OpenFiles | None = None,
) -> dict[str, float]:
    """Under ``--budget``, the error target of each module that spends the budget best (else {}).

    A first pass reads every module and plans it at each of ``BUDGET_TARGETS`` (the least storage
    meeting that mean error); :func:`allocate_budget` then chooses per module. The second pass
    (``merge``) consolidates each module at its target: a budget merge reads its inputs twice.
    """
    if config.mode() != "budget":
        return {}
    kind, value = parse_budget(config.budget)
    size = torch.empty((), dtype=dtype).element_size()
    budget_params = total_original / value if kind == "ratio" else max((value - fixed_bytes) / size, 0.0)

    def frontier(item: tuple[str, tuple[int, int, list[int]]]) -> list[tuple[int, float]]:
        name, (n, d, idx) = item
        members = read_members([sources[i] for i in idx], name, config, files)
        stack = ModuleStack(n, d, members, config)
        points = []
        for eps in BUDGET_TARGETS:
            at = dc_replace(config, budget=None, target_error=eps, target_metric="mean")
            plan = plan_group(stack, at)[2]
            points.append((plan.params, plan.mean_error * len(members)))
        return points

    frontiers = dict(zip(modules, _ordered_map(frontier, list(modules.items()), workers)))
    return {m: BUDGET_TARGETS[j] for m, j in allocate_budget(frontiers, budget_params).items()}


#: The error targets a --budget is allocated among, per module (mean ΔW error over the module's tasks).
BUDGET_TARGETS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)


def allocate_budget(frontiers: dict[str, list[tuple[int, float]]], budget_params: float) -> dict[str, int]:
    """Spend a storage budget across modules: per module, which point of its frontier to take.

    ``frontiers[m][j]`` is (parameters, sum of task errors) of module m's least-storage plan at
    ``BUDGET_TARGETS[j]``. Two allocations are compared and the one with the lower total error is
    kept: the same target everywhere (the largest spending that fits), and a greedy by marginal error
    per parameter (each step moves the module whose step lowers the error most per extra parameter,
    while the total fits; a step may skip points where a frontier is not convex). The first
    guarantees that at the storage of the default target plan, a budget plan is never worse than
    it; the second spends storage where it pays most.
    Returns the index into ``BUDGET_TARGETS`` per module (the cheapest point when nothing fits).
    """
    import heapq

    names = list(frontiers)
    last = len(BUDGET_TARGETS) - 1

    def total(choice: dict[str, int]) -> tuple[float, int]:
        return (
            sum(frontiers[m][j][1] for m, j in choice.items()),
            sum(frontiers[m][j][0] for m, j in choice.items()),
        )

    fitting = []
    for j in range(len(BUDGET_TARGETS)):  # the same target everywhere
        choice = {m: j for m in names}
        if total(choice)[1] <= budget_params:
            fitting.append(choice)
    # greedy: from the cheapest point of every module, the best error drop per parameter first
    choice = {m: last for m in names}
    spent = total(choice)[1]
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        """Module i's steepest step from where it is: the point, among those that cost more, lower
        the error and still fit, with the largest error drop per parameter (on a frontier that is
        not convex this may skip points, as walking its lower convex hull does)."""
        m = names[i]
        j = choice[m]
        p0, e0 = frontiers[m][j]
        best: tuple[float, int] | None = None
        for nxt in range(j - 1, -1, -1):
            p1, e1 = frontiers[m][nxt]
            if e1 < e0 and p1 > p0 and spent + (p1 - p0) <= budget_params:
                rate = (e0 - e1) / (p1 - p0)
                if best is None or rate > best[0]:
                    best = (rate, nxt)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, best[1]))

    for i in range(len(names)):
        push(i)
    while heap:  # each module has at most one step in the heap
        _rate, i, nxt = heapq.heappop(heap)
        m = names[i]
        extra = frontiers[m][nxt][0] - frontiers[m][choice[m]][0]
        if spent + extra > budget_params:  # no longer fits: the module's best step that does
            push(i)
            continue
        choice[m] = nxt
        spent += extra
        push(i)
    if spent <= budget_params:
        fitting.append(choice)
    if not fitting:  # nothing fits: the least storage each module can have
        return {m: last for m in names}
    return min(fitting, key=total)
