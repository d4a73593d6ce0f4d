"""Consolidation: many adapters in, one Share checkpoint out (spec, sections 2 and 6).

For each module, one at a time: read the factors of every task that has it (scale folded),
canonicalize them, stack them (weighted), find the principal bases, let the planner choose the
shared k and each task's private rank, then write the bases, coefficients and private factors
and measure each task's ΔW error on the tensors as stored. Only one module's stack is ever in
memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import FORMAT_NAME, FORMAT_VERSION, CheckpointWriter, check_output
from .errors import IncompatibleAdaptersError, InvalidOptionError
from .formats import LoraFactors
from .linalg import canonicalize, principal_basis, relative_error
from .planning import ModulePlan, ModulePlanner, TaskFit, parse_budget

Progress = Callable[[str, int, int], None]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_TO_NAME = {"F32": "float32", "F64": "float32", "BF16": "bfloat16", "F16": "float16"}

DEFAULT_TARGET_ERROR = 0.05


@dataclass
class ConsolidationConfig:
    """Every option of consolidation; stored in the checkpoint and shown by ``info``.

    How k (the shared rank, per module and side) and q (each task's private rank) are chosen,
    in order of precedence: a fixed ``k`` (with ``private_rank`` for every task), an ``energy``
    target (fraction of the stack's squared norm kept, q = 0), a storage ``budget``, or an error
    target (the default): per module, the plan with the least storage whose mean (or worst, with
    ``target_metric="max"``) relative ΔW error is at most ``target_error``.
    """

    k: int | None = None
    """Fixed shared rank per module and side (clamped to the stack's numerical rank)."""
    private_rank: int = 0
    """With ``k``: private rank kept by every task in every module."""
    energy: float | None = None
    """Energy target τ in (0, 1]: smallest k whose basis holds τ of the stack's squared norm."""
    budget: str | None = None
    """Storage budget: a compression ratio ('4x') or a size ('10MB'); least mean error within it."""
    target_error: float = DEFAULT_TARGET_ERROR
    """Error target ε: relative ΔW error per module (mean over tasks, or worst task)."""
    target_metric: str = "mean"
    """'mean' or 'max': which task error the target bounds, per module."""
    weighting: str = "equal"
    """'equal': every task counts the same in the basis fit; 'norm': tasks weigh by ‖ΔW‖."""
    canonicalize: bool = True
    """Stack each adapter's balanced SVD factors rather than the raw (gauge-dependent) ones."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda': where the decompositions run."""
    dtype: str = "auto"
    """Storage dtype of bases and coefficients: 'auto' (the inputs'), 'float32', 'bfloat16', 'float16'."""
    seed: int = 0
    """Seed of the randomized range finder."""
    n_oversamples: int = 10
    """Extra random directions of the range finder (Halko et al. 2011)."""
    n_iter: int = 3
    """Power iterations of the range finder."""
    max_k: int | None = None
    """Upper bound on k for every module."""

    def mode(self) -> str:
        if self.k is not None:
            return "fixed"
        if self.energy is not None:
            return "energy"
        if self.budget is not None:
            return "budget"
        return "target"

    def validate(self) -> None:
        def bad(msg: str, hint: str) -> None:
            raise InvalidOptionError(msg, hint=hint)

        if self.k is not None and self.k < 0:
            bad(f"--k must be ≥ 0, got {self.k}", "Give a non-negative k")
        if self.private_rank < 0:
            bad("--private-rank must be ≥ 0", "Give a non-negative rank")
        if self.energy is not None and not 0 < self.energy <= 1:
            bad(f"--energy must be in (0, 1], got {self.energy}", "For example --energy 0.99")
        if not 0 <= self.target_error < 1:
            bad(f"--target-error must be in [0, 1), got {self.target_error}", "For example --target-error 0.05")
        if self.target_metric not in ("mean", "max"):
            bad(f"--target-metric must be 'mean' or 'max', got {self.target_metric!r}", "Use mean or max")
        if self.weighting not in ("equal", "norm"):
            bad(f"--weighting must be 'equal' or 'norm', got {self.weighting!r}", "Use equal or norm")
        if self.device not in ("auto", "cpu", "cuda"):
            bad(f"--device must be auto, cpu or cuda, got {self.device!r}", "Use auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            bad("--device cuda was asked for but no CUDA device is available", "Use --device cpu or auto")
        if self.dtype not in ("auto", *_DTYPES):
            bad(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}", "Use one of those")
        if self.budget is not None:
            try:
                kind, value = parse_budget(self.budget)
            except ValueError:
                bad(
                    f"--budget {self.budget!r} is neither a ratio ('4x') nor a size ('10MB')", "For example --budget 4x"
                )
            if value <= 0 or (kind == "ratio" and value < 1):
                bad(f"--budget {self.budget!r} must be a ratio ≥ 1 or a positive size", "For example --budget 4x")

    def torch_device(self) -> torch.device:
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    def describe(self) -> str:
        mode = self.mode()
        if mode == "fixed":
            return f"fixed k={self.k}, private rank {self.private_rank}"
        if mode == "energy":
            return f"energy ≥ {self.energy:g} of each stack"
        if mode == "budget":
            return f"budget {self.budget}, least mean ΔW error"
        return f"{self.target_metric} ΔW error ≤ {self.target_error:g} per module, least storage"


class TaskSource(Protocol):
    """What consolidation needs of an input task: an adapter file or a task of a checkpoint."""

    task: str
    origin: str
    config: dict | None
    head_keys: list[str]
    weights_dtype: str
    stored_params: int
    stored_bytes: int

    def module_shapes(self) -> dict[str, tuple[int, int, int]]: ...  # name -> (n, d, r)
    def read_module(self, module: str) -> LoraFactors: ...
    def read_heads(self) -> dict[str, torch.Tensor]: ...
    def task_record(self) -> dict[str, Any]: ...
    def prior(self, module: str) -> tuple[float, float, bool] | None: ...  # (error, ‖ΔW‖, is_bound) of a reconstruction


@dataclass
class ModuleMember:
    """One task's update in one module, ready for stacking."""

    task: str
    factors: LoraFactors  # the reference ΔW (scale folded)
    B: torch.Tensor  # canonical (or raw) column factors that are stacked, float32
    A: torch.Tensor
    s: torch.Tensor  # canonical singular values, float64
    prior: tuple[float, float, bool] | None = None


@dataclass
class ModuleResult:
    plan: ModulePlan
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {k: v for k, v in self._source.module_shapes().items() if self._pattern.search(k)}


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
    Bc, Ac, s = canonicalize(factors.B, factors.A.T)
    if config.canonicalize:
        B, A = Bc.to(torch.float32), Ac.to(torch.float32)
    else:  # raw factors, but the same ΔW; canonical singular values still serve the planner
        B, A = factors.B, factors.A.T.contiguous()
    return ModuleMember(task, factors, B, A, s, prior)


class ModuleStack:
    """One module's weighted stacks, ready for decomposition (spec, section 2, steps 3–4)."""

    def __init__(self, n: int, d: int, members: list[ModuleMember], config: ConsolidationConfig):
        self.n, self.d, self.members, self.config = n, d, members, config
        self.norms = [float((m.s**2).sum()) ** 0.5 for m in members]
        if config.weighting == "equal":  # spec, section 6: every task scaled to ‖ΔW_i‖_F = 1 for the fit
            self.weights = [1.0 / nm if nm > 0 else 0.0 for nm in self.norms]
        else:
            self.weights = [1.0] * len(members)
        device = config.torch_device()
        self.stack_B = torch.cat([m.B * w**0.5 for m, w in zip(members, self.weights)], 1).to(device)
        self.stack_A = torch.cat([m.A * w**0.5 for m, w in zip(members, self.weights)], 1).to(device)
        self.canon = [
            canonicalize(m.B, m.A) if not config.canonicalize else (m.B.double(), m.A.double(), m.s) for m in members
        ]
        m_total = self.stack_B.shape[1]
        self.cap = config.max_k or m_total
        #: the most basis vectors either side can have
        self.full = max(min(n, m_total, self.cap), min(d, m_total, self.cap))

    def fit(self, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ModulePlanner]:
        """Top-K bases of both stacks and a planner over them."""
        opts = {"n_oversamples": self.config.n_oversamples, "n_iter": self.config.n_iter}
        beta, sB = principal_basis(self.stack_B, min(K, self.cap), seed=self.config.seed, **opts)
        alpha, sA = principal_basis(self.stack_A, min(K, self.cap), seed=self.config.seed + 1, **opts)
        beta64, alpha64 = beta.double().cpu(), alpha.double().cpu()
        fits = [TaskFit(s=s, Eb=beta64.T @ Bc, Ea=alpha64.T @ Ac) for (Bc, Ac, s) in self.canon]
        return beta, alpha, sB, sA, ModulePlanner(self.n, self.d, fits)


def consolidate_module(
    name: str,
    n: int,
    d: int,
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    budget_params: int | None = None,
) -> ModuleResult:
    """Bases, plan, coefficients, private factors and errors for one module."""
    stack = ModuleStack(n, d, members, config)
    full = stack.full
    if config.mode() == "fixed":
        K = min(config.k or 0, full)
    elif config.mode() == "energy" or stack.stack_B.shape[1] <= 512:
        K = full
    else:
        K = min(64, full)
    while True:
        beta, alpha, sB, sA, planner = stack.fit(K)
        plan = _choose(planner, config, stack.stack_B, stack.stack_A, sB, sA, budget_params)
        # the best k may lie beyond the vectors computed: compute more and plan again
        at_edge = max(plan.k_B, plan.k_A) >= K and K < full
        if config.mode() in ("fixed", "energy") or not at_edge:
            break
        K = min(2 * K, full)
    canon, norms, weights = stack.canon, stack.norms, stack.weights
    result = ModuleResult(plan=plan)
    beta_s, alpha_s = store_bases(name, beta, alpha, plan, dtype, result)
    for i, (m, (Bc, Ac, _s)) in enumerate(zip(members, canon)):
        tensors, record = encode_task(m, Bc, Ac, plan.private_ranks[i], beta_s, alpha_s, dtype, n, d, norms[i])
        result.tensors.update({f"tasks/{m.task}/{name}/{part}": t for part, t in tensors.items()})
        result.records[m.task] = record
    store_grams(name, result, [(m.task, weights[i]) for i, m in enumerate(members)], plan)
    return result


def store_bases(name: str, beta, alpha, plan: ModulePlan, dtype: torch.dtype, result: ModuleResult):
    """Round the chosen bases to the storage dtype and add them to ``result``."""
    if not (plan.k_B and plan.k_A):
        return None, None
    beta_s, alpha_s = beta[:, : plan.k_B].cpu().to(dtype), alpha[:, : plan.k_A].cpu().to(dtype)
    result.tensors[f"modules/{name}/basis_B"] = beta_s
    result.tensors[f"modules/{name}/basis_A"] = alpha_s
    return beta_s, alpha_s


def store_grams(name: str, result: ModuleResult, weighted_tasks: list[tuple[str, float]], plan: ModulePlan) -> None:
    """Σ_i w_i E_i E_iᵀ over the stored coefficients, per side: the stack as the checkpoint knows it
    (spec, section 5). Kept so that later updates cost nothing per old task."""
    if not (plan.k_B and plan.k_A):
        return
    for side, k in (("B", plan.k_B), ("A", plan.k_A)):
        G = torch.zeros(k, k, dtype=torch.float64)
        for task, w in weighted_tasks:
            c = result.tensors.get(f"tasks/{task}/{name}/coef_{side}")
            if c is not None:
                c = c.double()
                G += w * (c @ c.T)
        result.tensors[f"modules/{name}/gram_{side}"] = G


def encode_task(
    m: ModuleMember,
    Bc: torch.Tensor,
    Ac: torch.Tensor,
    q: int,
    beta_s: torch.Tensor | None,
    alpha_s: torch.Tensor | None,
    dtype: torch.dtype,
    n: int,
    d: int,
    norm: float,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One task's coefficients and private factors in stored bases, and its exact ΔW error."""
    tensors: dict[str, torch.Tensor] = {}
    Bh = [torch.zeros(n, 0, dtype=torch.float64)]
    Ah = [torch.zeros(d, 0, dtype=torch.float64)]
    p = 0
    if beta_s is not None:
        b64, a64 = beta_s.double(), alpha_s.double()
        Eb, Ea = b64.T @ Bc, a64.T @ Ac  # coordinates in the stored (rounded) bases
        cB, cA, _ = canonicalize(Eb, Ea)  # balanced core E_B E_Aᵀ of rank p ≤ r (spec, section 2.7)
        p = cB.shape[1]
        if p:
            tensors["coef_B"], tensors["coef_A"] = cB.to(dtype), cA.to(dtype)
            Bh.append(b64 @ tensors["coef_B"].double())
            Ah.append(a64 @ tensors["coef_A"].double())
    if q:
        shared_B, shared_A = torch.cat(Bh, 1), torch.cat(Ah, 1)
        # residual R = ΔW − ΔŴ_shared as factors [Bc, −B̂] [Ac, Â]ᵀ; keep its best rank-q part (spec, section 6)
        PB, PA, _ = canonicalize(torch.cat([Bc, -shared_B], 1), torch.cat([Ac, shared_A], 1), max_rank=q)
        q = PB.shape[1]
        if q:
            tensors["private_B"], tensors["private_A"] = PB.to(dtype), PA.T.contiguous().to(dtype)
            Bh.append(tensors["private_B"].double())
            Ah.append(tensors["private_A"].double().T)
    err = relative_error(m.factors.B, m.factors.A.T, torch.cat(Bh, 1), torch.cat(Ah, 1))
    record: dict[str, Any] = {
        "rank": p,
        "private_rank": q,
        "original_rank": int(m.factors.B.shape[1]),
        "error": err,
        "norm": norm,
    }
    if m.prior is not None:  # the input was itself a reconstruction: bound the error to the original
        prior_err, prior_norm, prior_bound = m.prior
        drift = err * norm / prior_norm if prior_norm > 0 else 0.0
        record.update(error=prior_err + drift, norm=prior_norm, bound=prior_bound or drift > 1e-6)
    return tensors, record


def _choose(planner: ModulePlanner, config, stack_B, stack_A, sB, sA, budget_params) -> ModulePlan:
    mode = config.mode()
    if mode == "fixed":
        return planner.fixed(config.k, config.private_rank)
    if mode == "energy":
        kB = _energy_k(sB, float(stack_B.double().pow(2).sum()), config.energy)
        kA = _energy_k(sA, float(stack_A.double().pow(2).sum()), config.energy)
        return planner.evaluate(kB, kA, [0] * len(planner.fits))
    if mode == "budget":
        return planner.for_budget(budget_params)
    return planner.for_target(config.target_error, config.target_metric)


def _energy_k(s: torch.Tensor, total: float, tau: float) -> int:
    if total <= 0 or s.numel() == 0:
        return 0
    cum = (s**2).cumsum(0) / total
    hits = (cum >= tau * (1 - 1e-9)).nonzero()
    return int(hits[0]) + 1 if hits.numel() else s.numel()


def module_budget(config: ConsolidationConfig, n: int, d: int, ranks: list[int], total_original: int) -> int | None:
    """Parameters allowed for one module under ``--budget`` (a size is split in proportion)."""
    if config.budget is None:
        return None
    kind, value = parse_budget(config.budget)
    original = sum(ranks) * (n + d)
    if kind == "ratio":
        return int(original / value)
    bytes_per = 4 if config.dtype in ("auto", "float32") else 2
    return int(value / bytes_per * original / max(total_original, 1))


def merge(
    sources: Sequence[TaskSource],
    output: str | Path,
    config: ConsolidationConfig | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    history: list[dict[str, Any]] | None = None,
    op: str = "merge",
) -> dict[str, Any]:
    """Consolidate ``sources`` into the Share checkpoint ``output``; return its manifest.

    Nothing is written unless every input is valid: the file appears atomically at the end.
    """
    config = config or ConsolidationConfig()
    config.validate()
    output = Path(output)
    if not sources:
        raise InvalidOptionError("no inputs were given", hint="Pass adapter folders, files or globs")
    check_output(output, force)
    modules = check_compatible(sources)
    dtype = storage_dtype(config, [s.weights_dtype for s in sources])
    total_original = sum(r * (n + d) for s in sources for (n, d, r) in s.module_shapes().values())
    manifest_modules: dict[str, Any] = {}
    with CheckpointWriter(output) as writer:
        for src in sources:
            for key, t in src.read_heads().items():
                writer.add(f"tasks/{src.task}/heads/{key}", t)
        for step, (name, (n, d, idx)) in enumerate(modules.items()):
            if progress:
                progress(name, step, len(modules))
            members = [
                prepare_member(sources[i].task, sources[i].read_module(name), config, sources[i].prior(name))
                for i in idx
            ]
            budget = module_budget(config, n, d, [m.factors.B.shape[1] for m in members], total_original)
            res = consolidate_module(name, n, d, members, config, dtype, budget)
            for tname in sorted(res.tensors, key=lambda t: (not t.startswith("modules/"), t)):
                writer.add(tname, res.tensors[tname])
            manifest_modules[name] = module_record(n, d, res, dtype)
        if progress:
            progress("", len(modules), len(modules))
        manifest = build_manifest(config, sources, manifest_modules, history or [], op)
        writer.finish(manifest)
    return manifest


def module_record(n: int, d: int, res: ModuleResult, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "out_features": n,
        "in_features": d,
        "k_B": res.plan.k_B,
        "k_A": res.plan.k_A,
        "kind": res.plan.kind,
        "alternatives": res.plan.alternatives,
        "params": res.plan.params,
        "dtype": str(dtype).replace("torch.", ""),
        "tasks": res.records,
    }


def task_errors(modules: dict[str, Any], task: str) -> dict[str, float]:
    errs = [m["tasks"][task]["error"] for m in modules.values() if task in m["tasks"]]
    if not errs:
        return {"mean": 0.0, "max": 0.0}
    return {"mean": sum(errs) / len(errs), "max": max(errs)}


def build_manifest(
    config: ConsolidationConfig,
    sources: Sequence[TaskSource],
    modules: dict[str, Any],
    history: list[dict[str, Any]],
    op: str,
) -> dict[str, Any]:
    tasks = {s.task: dict(s.task_record()) for s in sources}
    for name, rec in tasks.items():
        if "original_params" in rec:
            continue  # a task from an earlier checkpoint keeps its originals' size
        # the originals counted are what this checkpoint replaces: the LoRA tensors of its modules, and the heads
        lora = sum(
            m["tasks"][name]["original_rank"] * (m["out_features"] + m["in_features"])
            for m in modules.values()
            if name in m["tasks"]
        )
        itemsize = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}.get(rec.get("weights_dtype", "F32"), 4)
        rec["original_params"] = lora + rec.get("head_params", 0)
        rec["original_bytes"] = lora * itemsize + rec.get("head_bytes", 0)
    entry = {
        "op": op,
        "tasks_added": [s.task for s in sources if not s.task_record().get("from_checkpoint")],
        "errors": {t: task_errors(modules, t) for t in tasks},
    }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "tasks": tasks,
        "modules": modules,
        "history": [*history, entry],
    }
