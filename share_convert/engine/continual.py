"""Continual updates of a Share checkpoint without the original adapters (spec, section 5).

- :func:`add` folds new adapters (or another checkpoint's tasks) into a checkpoint. Per module,
  the old tasks are known only through the bases and their coefficients: the new bases come from
  a QR of ``[β, B'_new]`` and the eigendecomposition of a (k+m) × (k+m) matrix weighted by the old
  tasks' Gram matrix (Brand 2006), so the n-sized work does not grow with the number of old
  tasks; the old coefficients are rotated into the new bases as one batch (k-sized work).
  In a module with groups of bases, only the groups that new tasks join are updated.
- :func:`remove` drops tasks, optionally refitting the bases to the tasks that remain.

Old tasks' errors can only be bounded after an update (their originals are gone): the new error
is at most the old error plus the drift ‖ΔŴ_before − ΔŴ_after‖ / ‖ΔW‖, both recorded, and less
where the stored task was a projection in the old bases (:func:`share_convert.engine.planning.drift_bound`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.format import BLOCK_BYTES, CHAIN_PARTS
from ..checkpoint.publish import check_output, same_checkpoint
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import Chain, RecordTable, TaskRows
from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..checkpoint.writer import CheckpointWriter
from ..dtypes import st_name as st_dtype
from ..errors import DuplicateTaskError, IncompatibleAdaptersError, InvalidOptionError, UnknownTaskError
from ..io.checkpoint_source import CheckpointTask
from ..math.linalg import RANK_RTOL, canonicalize_padded, deterministic, fix_signs, left_batched, load_linalg
from .consolidation import (
    _DTYPES,
    ConsolidationConfig,
    ModuleMember,
    ModulePlan,
    ModuleResult,
    Progress,
    TaskSource,
    _ordered_map,
    auto_workers,
    build_manifest,
    check_compatible,
    consolidate_module,
    merge,
    module_record,
    natural_key,
    read_members,
    storage_dtype,
    write_module,
)
from .encoding import StoredBases, encode_task, store_bases, store_grams
from .planning import FrozenTasks, ModulePlanner, TaskFit, drift_bound, energy_k, task_weight, task_weights


def config_of(ckpt: Checkpoint) -> ConsolidationConfig:
    """The options ``ckpt`` was made with, for its updates; where to compute is this machine's
    choice (``device`` is 'auto'), not the checkpoint's: one made on a GPU is extended on a CPU."""
    fields = ConsolidationConfig.__dataclass_fields__
    return ConsolidationConfig(**{k: v for k, v in ckpt.config.items() if k in fields and k != "device"})


def _carry_module(
    ckpt: Checkpoint, writer: CheckpointWriter, name: str, keep: list[str], dropped: Sequence[str], weighting: str
) -> dict[str, Any] | None:
    """Copy one module unchanged for the tasks in ``keep``; recompute its Gram matrices without ``dropped``."""
    info = ckpt.modules[name]
    table = RecordTable.from_dicts(info["tasks"])
    kept = set(keep)
    left_tasks = [t for t in table.tasks if t in kept]
    if not left_tasks:
        return None
    prefixes = sorted({ckpt.bases_prefix(name, t) for t in _one_per_group(info, table)} - {None})
    for prefix in prefixes:
        for part in ("basis_B", "basis_A"):
            ckpt.copy_to(writer, f"{prefix}{part}")
        if _dropped_here(ckpt, name, prefix, dropped):
            grams = _grams_of(ckpt, name, prefix, left_tasks, weighting)
            for side in ("B", "A"):
                writer.add(f"{prefix}gram_{side}", grams[side].to(torch.float32))
        else:
            for side in ("B", "A"):
                ckpt.copy_to(writer, f"{prefix}gram_{side}")
    left = table.select(left_tasks)
    if ckpt.version >= 2 and len(left) == len(table):  # every task stays: the stacked tensors as they are
        stacked = [f"{p}{part}" for p in prefixes for part in ("coefs_B", "coefs_A", *CHAIN_PARTS)]
        for tname in [*stacked, f"modules/{name}/private_B", f"modules/{name}/private_A"]:
            if ckpt.has(tname):
                ckpt.copy_to(writer, tname)
        writer.set_module_rows(name, left.tasks, left.int_column("coef_row"), left.int_column("private_row"))
    else:
        writer.add_module(name, ckpt.task_rows(name, left_tasks))
    # untouched by this update: no drift
    out = {**info, "tasks": left.updated(error_before=left.float_column("error"), drift=0.0)}
    if "groups" in info:
        out["groups"] = [dict(g, tasks=[t for t in g["tasks"] if t in kept]) for g in info["groups"]]
    return out


def _one_per_group(info: dict[str, Any], table: RecordTable) -> list[str]:
    """One task of each group of bases in a module (the only one when it has no groups)."""
    if "groups" not in info:
        return table.tasks[:1]
    first: dict[int, str] = {}
    for t, g in zip(table.tasks, table.int_column("group").tolist()):
        first.setdefault(g, t)
    return list(first.values())


def _task_prefix(name: str, info: dict[str, Any], task: str) -> str:
    """Where a task's coefficients are stored in format version 2: beside the bases it uses."""
    return f"modules/{name}/g{info['tasks'][task]['group']}/" if "groups" in info else f"modules/{name}/"


def _dropped_here(ckpt: Checkpoint, name: str, prefix: str, dropped: Sequence[str]) -> bool:
    info = ckpt.modules[name]
    return any(t in info["tasks"] and ckpt.bases_prefix(name, t) == prefix for t in dropped)


def _grams_of(
    ckpt: Checkpoint, name: str, prefix: str, tasks: Sequence[str], weighting: str
) -> dict[str, torch.Tensor]:
    """Σ_i w_i c_i c_iᵀ (float64) over ``tasks``' stored coefficients, for the bases under ``prefix``.

    Used when tasks leave a basis: subtracting their terms from the stored float32 matrices would
    leave rounding noise that reads as spurious directions in the next update.
    """
    info = ckpt.modules[name]
    here = [t for t in tasks if ckpt.bases_prefix(name, t) == prefix]
    k_B, k_A = (ckpt.tensor_meta(f"{prefix}basis_{side}")[0][1] for side in ("B", "A"))
    old = _OldCoefficients(ckpt, name, here, k_B, k_A, prefix)
    norms = RecordTable.from_dicts(info["tasks"]).select(here).float_column("norm")
    root = task_weights(norms, weighting).sqrt()[:, None, None]
    return {"B": _gram(old.XB * root), "A": _gram(old.XA * root)}


def add(
    checkpoint: str | Path | Checkpoint,
    sources: Sequence[TaskSource],
    output: str | Path,
    config: ConsolidationConfig | None = None,
    *,
    replace: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Fold ``sources`` into ``checkpoint`` and write the result to ``output`` (may be the same path).

    ``config`` defaults to the checkpoint's own options. Existing task names are an error unless
    ``replace``, in which case the old task is dropped first. ``workers`` modules are updated at
    once, as in :func:`merge` (the output does not depend on it).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    config = config or config_of(ckpt)
    config.validate()
    max_shard_size = parse_size(max_shard_size)
    output = Path(output)
    if not sources:
        raise InvalidOptionError("no new adapters were given", hint="Pass adapter folders, files, globs or checkpoints")
    check_output(output, force or same_checkpoint(output, ckpt))
    clashes = [s.task for s in sources if s.task in ckpt.tasks]
    if clashes and not replace:
        raise DuplicateTaskError(
            f"task {clashes[0]!r} already exists in the checkpoint",
            path=ckpt.path,
            hint="Pass --replace to replace it, or rename: NAME=PATH",
        )
    old_tasks = [t for t in ckpt.tasks if t not in clashes]
    clashed = set(clashes)
    new_shapes = check_compatible(list(sources))
    for name, (n, d, _) in new_shapes.items():
        if name in ckpt.modules:
            info = ckpt.modules[name]
            if (info["out_features"], info["in_features"]) != (n, d):
                raise IncompatibleAdaptersError(
                    f"module {name} is {n}×{d} in the new adapters but {info['out_features']}×{info['in_features']} "
                    "in the checkpoint: they adapt different base models",
                    path=ckpt.path,
                    hint="Add adapters of the checkpoint's base model",
                )
    if not set(new_shapes) & set(ckpt.modules):
        raise IncompatibleAdaptersError(
            "the new adapters share no module with the checkpoint: they adapt a different base model",
            path=ckpt.path,
            hint="Add adapters of the checkpoint's base model",
        )
    dtype = storage_dtype(config, [s.weights_dtype for s in sources]) if config.dtype != "auto" else None
    modules_out: dict[str, Any] = {}
    all_modules = sorted(set(ckpt.modules) | set(new_shapes), key=natural_key)
    drifted: set[str] = set()
    worst = 0.0
    with deterministic(), CheckpointWriter(output, max_shard_size) as writer:
        for t in old_tasks:
            for key in ckpt.task(t).get("heads", []):
                ckpt.copy_to(writer, f"tasks/{t}/heads/{key}")
        for src in sources:
            for key, tensor in src.read_heads().items():
                writer.add(f"tasks/{src.task}/heads/{key}", tensor)
        # updates never plan against a budget (budgets are per merge): a new module keeps the error target
        module_config = dc_replace(config, budget=None) if config.mode() == "budget" else config

        def work(name: str) -> ModuleResult | None:
            """One module's update (None: no new task has it, it is carried as it is)."""
            old_info = ckpt.modules.get(name)
            mdtype = module_dtype(name)
            members = read_members([s for s in sources if name in s.module_shapes()], name, config)
            if old_info is None:
                n, d, _ = new_shapes[name]
                return consolidate_module(name, n, d, members, module_config, mdtype)
            if not members:
                return None
            # in the module's own order (its stored rows' order), without the replaced tasks
            kept = [t for t in old_info["tasks"] if t not in clashed]
            if "groups" in old_info:
                return update_grouped_module(ckpt, name, kept, clashes, members, module_config, mdtype)
            res = update_module(ckpt, name, kept, members, module_config, mdtype)
            n, d = old_info["out_features"], old_info["in_features"]
            if stored_params(res, n, d) > original_params(res, n, d):
                # the incremental update keeps the shared bases; here that stores more than the originals
                # did, so consolidate the module again from the old tasks' reconstructions, as merge
                # would (it may keep each task's own directions instead), and keep the smaller
                alternative = refit_module(ckpt, name, kept, members, module_config, mdtype)
                if stored_params(alternative, n, d) < stored_params(res, n, d):
                    return alternative
            return res

        def module_dtype(name: str) -> torch.dtype:
            old_info = ckpt.modules.get(name)
            if dtype is not None:
                return dtype
            return _DTYPES[old_info["dtype"]] if old_info else storage_dtype(config, [s.weights_dtype for s in sources])

        load_linalg(config.torch_device())
        shapes = [s.module_shapes() for s in sources]
        new_params = [sum(sh[m][2] for sh in shapes if m in sh) * (n + d) for m, (n, d, _) in new_shapes.items()]
        if workers is None:
            workers = auto_workers(max(new_params, default=0))
        # modules are computed concurrently and written in order (as in merge)
        for step, (name, res) in enumerate(zip(all_modules, _ordered_map(work, all_modules, workers))):
            if progress:
                progress(name, step, len(all_modules))
            if res is None:
                carried = _carry_module(ckpt, writer, name, old_tasks, clashes, config.weighting)
                if carried is not None:
                    modules_out[name] = carried
                continue
            table = RecordTable.from_dicts(res.records)
            moved = table.float_column("drift")
            drifted.update(compress(table.tasks, (moved >= 0).tolist()))
            worst = max(worst, float(moved.max(initial=0.0)))
            write_module(writer, name, res, module_dtype(name), ckpt)
            modules_out[name] = module_record(*_shape(ckpt, new_shapes, name), res, module_dtype(name))
        if progress:
            progress("", len(all_modules), len(all_modules))
        old_sources = [_OldTask(ckpt, t) for t in old_tasks]
        manifest = build_manifest(
            config, [*old_sources, *sources], modules_out, ckpt.history, "add", added=[s.task for s in sources]
        )
        entry = manifest["history"][-1]
        entry["tasks_replaced"] = clashes
        entry["drift_summary"] = {"tasks": len(drifted), "max": worst}
        writer.finish(manifest)
    return manifest


def stored_params(res: ModuleResult, n: int, d: int) -> int:
    """Parameters one module's result stores: bases and their Gram matrices, every task's
    coefficients and private factors."""
    table = RecordTable.from_dicts(res.records)
    k_B, k_A = res.plan.k_B, res.plan.k_A
    ranks, private = table.int_column("rank"), table.int_column("private_rank")
    bases = k_B * n + k_A * d + k_B * k_B + k_A * k_A
    return bases + int(ranks.sum()) * (k_B + k_A) + int(private.sum()) * (n + d)


def original_params(res: ModuleResult, n: int, d: int) -> int:
    """Parameters the originals of one module's tasks had (LoRA factors, r × (n + d) each)."""
    return int(RecordTable.from_dicts(res.records).int_column("original_rank").sum()) * (n + d)


def _shape(ckpt: Checkpoint, new_shapes: dict, name: str) -> tuple[int, int]:
    if name in ckpt.modules:
        return ckpt.modules[name]["out_features"], ckpt.modules[name]["in_features"]
    return new_shapes[name][0], new_shapes[name][1]


class _OldTask:
    """A task kept as it is: only its manifest record travels."""

    def __init__(self, ckpt: Checkpoint, task: str):
        self.task = task
        self._rec = ckpt.task(task)

    def task_record(self) -> dict[str, Any]:
        return self._rec


def _updated_basis(
    basis: torch.Tensor | None, gram: torch.Tensor | None, new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of [β E … , N] from β, G = Σ w E Eᵀ and N (spec, section 5).

    M Mᵀ = β G βᵀ + N Nᵀ = Q R blockdiag(G, I) Rᵀ Qᵀ with Q R = qr([β, N]); the eigenvectors U of
    the small middle matrix give the new basis Q U. Cost O(n (k+m)²), whatever the number of old tasks.
    """
    n = new.shape[0]
    k = 0 if basis is None else basis.shape[1]
    parts = ([basis.double()] if k else []) + [new.double()]
    Q, R = torch.linalg.qr(torch.cat(parts, 1))
    middle = torch.zeros(R.shape[1], R.shape[1], dtype=torch.float64)
    if k:
        middle[:k, :k] = gram.double()
    middle[k:, k:] = torch.eye(new.shape[1], dtype=torch.float64)
    K = R @ middle @ R.T
    evals, U = torch.linalg.eigh((K + K.T) / 2)
    evals, U = evals.flip(0).clamp_min(0), U.flip(1)
    s = evals.sqrt()
    rank = int((s > RANK_RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    B = (Q @ U[:, :rank]) if rank else torch.zeros(n, 0, dtype=torch.float64)
    B = B * fix_signs(B)
    return B.to(torch.float32), s[:rank]


class _OldCoefficients:
    """The old tasks of one module in coordinates, zero-padded to one width and batched.

    ``XB`` (T × k × r) and ``XA`` hold each task's coefficients in the current bases (rows written
    under older bases come rotated through the chain); the padding changes no product below, so
    every per-task quantity of an update is a batched k-sized product.
    """

    def __init__(self, ckpt: Checkpoint, name: str, tasks: list[str], k_B: int, k_A: int, prefix: str | None = None):
        self.tasks = tasks
        if k_B and k_A and tasks:
            self.XB = ckpt.coefficients(name, tasks, "B", prefix)
            self.XA = ckpt.coefficients(name, tasks, "A", prefix)
            table = RecordTable.from_dicts(ckpt.modules[name]["tasks"]).select(tasks)
            self.ranks = torch.from_numpy(table.int_column("rank").copy())
        else:
            self.XB = torch.zeros(len(tasks), k_B, 0, dtype=torch.float64)
            self.XA = torch.zeros(len(tasks), k_A, 0, dtype=torch.float64)
            self.ranks = torch.zeros(len(tasks), dtype=torch.int64)
        self._cores: torch.Tensor | None = None

    def form(self, terms: Sequence[tuple[float, torch.Tensor | None, torch.Tensor | None]]) -> torch.Tensor:
        """:func:`quadratic_form` of these tasks (their cores computed once)."""
        if self._cores is None and _use_cores(self.XB, self.XA):
            self._cores = _cores(self.XB, self.XA)
        return quadratic_form(self.XB, self.XA, terms, self._cores)


def _use_cores(XB: torch.Tensor, XA: torch.Tensor) -> bool:
    """Whether products go through each task's core X_B X_Aᵀ (k_B · k_A numbers, and a
    (k_B · k_A)² matrix for the form): when that is not much more than its coefficients."""
    k_B, r, k_A = XB.shape[1], XB.shape[2], XA.shape[1]
    return bool(r) and k_B * k_A <= max(4 * r * (k_B + k_A), 64)


def _cores(XB: torch.Tensor, XA: torch.Tensor) -> torch.Tensor:
    """Every task's core X_B X_Aᵀ, flattened row-major: ``T × (k_B · k_A)`` (a sum of r outer products)."""
    T, k_B, r = XB.shape
    C = torch.zeros(T, k_B, XA.shape[1], dtype=torch.float64)
    for j in range(r):
        C += XB[:, :, j, None] * XA[:, None, :, j]
    return C.reshape(T, -1)


def quadratic_form(
    XB: torch.Tensor,
    XA: torch.Tensor,
    terms: Sequence[tuple[float, torch.Tensor | None, torch.Tensor | None]],
    cores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_terms w · tr((X_Bᵀ G X_B)(X_Aᵀ H X_A)) per task, for ``terms`` (w, G, H) (None: identity).

    With G = βᵀβ', H = αᵀα' a term is w ⟨β X_B (α X_A)ᵀ, β' X_B (α' X_A)ᵀ⟩ (G, H symmetric), so
    squared norms, inner products and drifts of the old tasks' shared parts come from k-sized
    products (spec, section 4). Through the cores c = vec(X_B X_Aᵀ) the sum is the one quadratic
    form cᵀ (Σ w G ⊗ H) c: one matrix product for all terms, whose cancellations (a drift) happen
    in the k-sized matrix. For k ≫ r, per term the r × r blocks Xᵀ G X of each side instead.
    """
    T, k_B, r = XB.shape
    k_A = XA.shape[1]
    if r == 0 or T == 0:
        return torch.zeros(T, dtype=torch.float64)
    eye_B, eye_A = torch.eye(k_B, dtype=torch.float64), torch.eye(k_A, dtype=torch.float64)
    if cores is None and _use_cores(XB, XA):
        cores = _cores(XB, XA)
    if cores is not None:
        if all(G is None and H is None for _, G, H in terms):  # a multiple of ‖C‖²: no product needed
            return sum(w for w, _, _ in terms) * cores.pow(2).sum(1)
        K = sum(w * torch.kron(eye_B if G is None else G, eye_A if H is None else H) for w, G, H in terms)
        return ((cores @ K) * cores).sum(1)
    return block_form(XB, XA, terms)


def block_form(
    XB: torch.Tensor, XA: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor | None, torch.Tensor | None]]
) -> torch.Tensor:
    """:func:`quadratic_form` through each task's r × r blocks Xᵀ G X, per term: k² r work per task
    and term rather than the cores' (k_B k_A)², for sums whose cancellations float64 can afford."""
    T = XB.shape[0]
    out = torch.zeros(T, dtype=torch.float64)
    if XB.shape[2] == 0:
        return out
    for w, G, H in terms:
        QB = XB.transpose(1, 2) @ (XB if G is None else G @ XB)  # r × r per task
        QA = XA.transpose(1, 2) @ (XA if H is None else H @ XA)
        out += w * (QB * QA).sum((1, 2))
    return out


def _gram(X: torch.Tensor) -> torch.Tensor:
    """Σ_i X_i X_iᵀ over a batch ``T × k × r``."""
    flat = X.transpose(0, 1).reshape(X.shape[1], X.shape[0] * X.shape[2])
    return flat @ flat.T


def _prefix_tasks(ckpt: Checkpoint, name: str, prefix: str) -> list[str]:
    """The tasks whose coefficient rows are stored under ``prefix``, in their order in the module."""
    info = ckpt.modules[name]
    table = RecordTable.from_dicts(info["tasks"])
    if "groups" not in info:
        return list(table.tasks)
    group = int(prefix.rstrip("/").rsplit("/g", 1)[1])
    return [t for t, g in zip(table.tasks, table.int_column("group").tolist()) if g == group]


#: Unit roundoff of each storage dtype: a stored coefficient is within this fraction of the computed one.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def projection_slack(
    ckpt: Checkpoint,
    info: dict[str, Any],
    table: RecordTable,
    old: _OldCoefficients,
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
    eligible = _projection_eligible(ckpt, table)
    if not eligible.any():
        return inf
    n, d = info["out_features"], info["in_features"]
    u = UNIT_ROUNDOFF.get(info.get("dtype", "float32"), 2.0**-8) + max(n, d) ** 0.5 * 2.0**-23

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


def _projection_eligible(ckpt: Checkpoint, table: RecordTable) -> np.ndarray:
    """Which tasks of ``table`` :func:`projection_slack` can bound (from their records alone)."""
    eligible = (
        (table.int_column("bound") == 0)
        & (table.float_column("drift") < 0)
        & (table.int_column("private_rank") == 0)
        & (table.float_column("norm") > 0)
    )
    reconstructed = _reconstructed_tasks(ckpt)
    if reconstructed:
        eligible &= ~np.isin(np.asarray(table.tasks, dtype=object), reconstructed)
    return eligible


_RECONSTRUCTED: weakref.WeakKeyDictionary[Checkpoint, list[str]] = weakref.WeakKeyDictionary()


def _reconstructed_tasks(ckpt: Checkpoint) -> list[str]:
    """The tasks of ``ckpt`` taken from another checkpoint (their originals were reconstructions),
    found once per checkpoint rather than once per module."""
    if ckpt not in _RECONSTRUCTED:
        _RECONSTRUCTED[ckpt] = [t for t, rec in ckpt.tasks.items() if rec.get("from_checkpoint")]
    return _RECONSTRUCTED[ckpt]


def _inside(old: torch.Tensor, new: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """V (k_old × k) with ‖V x‖ = ‖Π_old new x‖ for every x, Π_old the orthogonal projection onto
    span(``old``): with G = oldᵀold = L Lᵀ (``L``, computed once per basis), V = L⁻¹ oldᵀ new (G is
    the identity but for rounding)."""
    return torch.linalg.solve_triangular(L, old.T @ new, upper=False)


def update_module(
    ckpt: Checkpoint,
    name: str,
    old_tasks: list[str],
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    *,
    prefix: str | None = None,
) -> ModuleResult:
    """Fold new members into one module of ``ckpt`` incrementally; old tasks keep their private parts.

    Old tasks are handled as one batch of k-sized coefficient matrices: rotating them into the new
    bases and measuring their drift are a few batched products (spec, section 5). Tasks not in
    ``old_tasks`` (replaced ones) leave the bases' weights. ``prefix`` names one group's bases in a
    module with groups (``old_tasks`` are then that group's tasks).

    When every old task stays and the bases keep their widths, the old coefficient rows stay as
    they are stored: the rotation β_newᵀ β_old joins the chain (format version 3), the stored rows
    are copied with their block checksums and only the new tasks' rows are written and hashed, and
    no old task is rebalanced (spec, section 5: E ← β_newᵀ β_old E). Otherwise (a task replaced,
    the widths or the dtype changed, small rows, or a chain that would take more bytes than the rows
    it rotates; see :func:`_chain_step`) the old rows are rotated, rebalanced and written again,
    chain-free.
    """
    info = ckpt.modules[name]
    n, d = info["out_features"], info["in_features"]
    # an incremental update is k-sized products over the old tasks' coefficients as read from the
    # checkpoint, and a few new tasks: CPU work, where a GPU would pay a transfer and a launch per step
    members = [m.to(torch.device("cpu")) for m in members]
    prefix = prefix or f"modules/{name}/"
    beta = alpha = None
    if ckpt.has(f"{prefix}basis_B"):
        beta, alpha = ckpt.tensor(f"{prefix}basis_B"), ckpt.tensor(f"{prefix}basis_A")
    b_old = beta.double() if beta is not None else torch.zeros(n, 0, dtype=torch.float64)
    a_old = alpha.double() if alpha is not None else torch.zeros(d, 0, dtype=torch.float64)
    # Old tasks stay in coordinates: their shared part is β x_b (α x_a)ᵀ with (x_b, x_a) their
    # coefficients, so nothing n-sized is computed per old task (section 5). Their weighted Gram
    # matrix E Eᵀ is recomputed from them in float64 (they are read anyway, for the drift): the
    # stored float32 copy would add rounding noise that reads as weak extra directions.
    old = _OldCoefficients(ckpt, name, old_tasks, b_old.shape[1], a_old.shape[1], prefix)
    table = RecordTable.from_dicts(info["tasks"]).select(old_tasks)
    old_norms, old_errors = table.float_column("norm"), table.float_column("error")
    root = task_weights(old_norms, config.weighting).sqrt()[:, None, None]
    GB, GA = _gram(old.XB * root), _gram(old.XA * root)
    norms = [float((m.s**2).sum()) ** 0.5 for m in members]
    weights = [task_weight(nm, config.weighting) for nm in norms]
    NB = torch.cat([m.stacked[0].double() * w**0.5 for m, w in zip(members, weights)], 1)
    NA = torch.cat([m.stacked[1].double() * w**0.5 for m, w in zip(members, weights)], 1)
    new_beta, sB = _updated_basis(beta, GB, NB)
    new_alpha, sA = _updated_basis(alpha, GA, NA)
    nb64, na64 = new_beta.double(), new_alpha.double()
    norm2 = old.form([(1.0, None, None)])  # ‖shared part‖², the bases taken as orthonormal (as the planner does)
    gram_B, gram_A = b_old.T @ b_old, a_old.T @ a_old  # the old bases' Grams, used below four times
    slack = projection_slack(ckpt, info, table, old, b_old, a_old, norm2, (gram_B, gram_A))
    inside = None
    if bool(torch.isfinite(slack).any()):
        LB, LA = torch.linalg.cholesky(gram_B), torch.linalg.cholesky(gram_A)
        inside = (_inside(b_old, nb64, LB), _inside(a_old, na64, LA))
    frozen = FrozenTasks(
        Eb=left_batched(nb64.T @ b_old, old.XB),
        Ea=left_batched(na64.T @ a_old, old.XA),
        norm2=norm2,
        ranks=old.ranks,
        prior=torch.from_numpy(old_errors.copy()),
        scale=task_weights(old_norms, "equal"),
        slack=slack,
        inside=inside,
    )
    fits = [TaskFit.of(m.s, nb64.T @ m.Bc.double(), na64.T @ m.Ac.double(), m.prior) for m in members]
    planner = ModulePlanner(n, d, fits, frozen=frozen)
    mode = config.mode()
    if mode == "fixed":
        plan = planner.fixed(config.k, config.private_rank)
    elif mode == "energy":
        kB = energy_k(sB, float((sB**2).sum()), config.energy)
        kA = energy_k(sA, float((sA**2).sum()), config.energy)
        plan = planner.evaluate(kB, kA, [0] * len(fits))
    else:  # budgets are per merge; an update keeps the error target
        plan = planner.for_target(config.target_error, config.target_metric)
    result = ModuleResult(plan=plan)
    beta_s, alpha_s = store_bases(name, new_beta, new_alpha, plan, dtype, result, prefix)
    stored = StoredBases.of(beta_s, alpha_s)
    chain = _chain_step(ckpt, name, prefix, old_tasks, b_old.shape[1], a_old.shape[1], plan, dtype)
    # drift² = ‖before‖² − 2⟨before, after⟩ + ‖after‖², all from k-sized products (batched); for the
    # tasks drift_bound can do more for, outside² = ‖after‖² − ‖Π_old after‖² (before is inside the old span)
    before = (1.0, gram_B, gram_A)
    T = len(old_tasks)
    known = None
    outside2 = torch.zeros(T, dtype=torch.float64)
    tighter = inside is not None
    if stored is not None:
        RB, RA = stored.beta.T @ b_old, stored.alpha.T @ a_old  # old coordinates -> new (k × k_old)
        if tighter:
            VB, VA = _inside(b_old, stored.beta, LB), _inside(a_old, stored.alpha, LA)
        if chain is not None:
            # the rows stay; readers rotate them: after = β_new (R_B x_b)(α_new R_A x_a)ᵀ exactly
            ranks = old.ranks
            # ⟨before, after⟩ with R = β_newᵀβ_old (G = R_BᵀR_B), ‖after‖² with the stored bases' Grams
            after = (1.0, RB.T @ stored.gram_beta @ RB, RA.T @ stored.gram_alpha @ RA)
            drift2 = old.form([before, (-2.0, RB.T @ RB, RA.T @ RA), after])
            # f² as a difference of float64 sums: rounding (~1e-16 ‖after‖²) moves f by ~1e-8 ‖after‖
            # at most, far below the slack: the blocks, much cheaper than the cores here, suffice
            if tighter:
                WB, WA = VB @ RB, VA @ RA
                outside2 = block_form(old.XB, old.XA, [after, (-1.0, WB.T @ WB, WA.T @ WA)])
            known = {"B": RB @ GB @ RB.T, "A": RA @ GA @ RA.T}  # the old tasks' part of Σ w c cᵀ
        else:
            EB, EA = left_batched(RB, old.XB), left_batched(RA, old.XA)
            CB, CA, _S, ranks = canonicalize_padded(EB, EA)
            CB, CA = CB.to(dtype), CA.to(dtype)  # as stored
            CB64, CA64 = CB.double(), CA.double()
            cross = ((EB.transpose(-1, -2) @ CB64) * (EA.transpose(-1, -2) @ CA64)).sum((-1, -2))
            after2 = quadratic_form(CB64, CA64, [(1.0, stored.gram_beta, stored.gram_alpha)])
            drift2 = old.form([before]) - 2 * cross + after2
            if tighter:
                gram = (1.0, stored.gram_beta, stored.gram_alpha)
                outside2 = block_form(CB64, CA64, [gram, (-1.0, VB.T @ VB, VA.T @ VA)])
            known = {side: _gram(C * root) for side, C in (("B", CB64), ("A", CA64))}
    else:
        ranks = torch.zeros(T, dtype=torch.int64)
        drift2 = old.form([before])  # nothing is kept: the drift is the shared part, inside the old span
    drifts_abs = drift2.clamp_min(0).sqrt().numpy()
    drift = np.where(old_norms > 0, drifts_abs / np.where(old_norms > 0, old_norms, 1.0), 0.0)
    outside = outside2.clamp_min(0).sqrt() * task_weights(old_norms, "equal")
    error = drift_bound(torch.from_numpy(old_errors.copy()), torch.from_numpy(drift), outside, slack).numpy()
    result.records = table.updated(
        error_before=old_errors,
        drift=drift,
        error=error,
        rank=ranks.numpy(),
        bound=table.int_column("bound") | (drift > 1e-6),
    )
    weighted, new_records = [], {}
    for j, m in enumerate(members):
        tensors, rec = encode_task(m, plan.private_ranks[j], stored, dtype, norms[j])
        result.task_parts[m.task] = tensors
        new_records[m.task] = rec
        weighted.append((m.task, weights[j]))
    store_grams(name, result, weighted, plan, prefix, known=known)
    new_rows = TaskRows.of_parts([(m.task, prefix, result.task_parts[m.task]) for m in members], dtype)
    if chain is not None:
        result.rows = _appended_rows(ckpt, name, prefix, table, new_rows, chain, RB, RA)
    else:
        # the old tasks' rows rewritten: coefficients rotated into the new bases, private factors unchanged
        old_rows = ckpt.task_rows(name, old_tasks)
        coef_row = ranks.cumsum(0) - ranks
        coefs = {}
        if stored is not None and T:
            kept = torch.arange(CB.shape[2])[None, :] < ranks[:, None]  # T × p_max: each task's columns
            coefs[prefix] = (CB.transpose(1, 2)[kept], CA.transpose(1, 2)[kept])
        old_rows = TaskRows(old_tasks, [prefix] * T, coefs, coef_row.numpy(), old_rows.private, old_rows.private_row)
        result.rows = TaskRows.concat([old_rows, new_rows], dtype)
    result.records = RecordTable.concat([result.records, new_records])
    return result


#: Coefficient tensors up to this size (bytes, one side) are written again rather than chained: a
#: chain pays when copying the old rows with their block checksums saves real work (the format's
#: blocks start at this size).
CHAIN_MIN_BYTES = BLOCK_BYTES


def _chain_step(
    ckpt: Checkpoint,
    name: str,
    prefix: str,
    old_tasks: list[str],
    k_B: int,
    k_A: int,
    plan: ModulePlan,
    dtype: torch.dtype,
) -> Chain | None:
    """The chain of ``prefix`` before this update (empty if it has none) when the update can keep
    the old rows where they are; None when they must be written again. This update's rotation is
    added by :func:`_appended_rows`."""
    if ckpt.version < 2 or not (k_B and k_A) or (plan.k_B, plan.k_A) != (k_B, k_A):
        return None
    if not ckpt.has(f"{prefix}coefs_B") or old_tasks != _prefix_tasks(ckpt, name, prefix):
        return None  # no rows yet, or some of them belong to tasks that leave
    (rows, _), stored_dtype = ckpt.tensor_meta(f"{prefix}coefs_B")
    if stored_dtype != st_dtype(dtype):
        return None  # stored in another dtype than this update writes
    itemsize = dtype.itemsize
    if rows * k_B * itemsize <= CHAIN_MIN_BYTES:
        return None  # small: written again costs nothing worth a chain
    old = ckpt.chain(prefix)
    covered = int(old.ends[-1]) if old is not None else 0
    length = (len(old) if old is not None else 0) + (rows > covered)
    # a chain whose rotations (float64) would take more bytes than the rows they rotate is folded into them
    if length * (k_B * k_B + k_A * k_A) * 8 > rows * (k_B + k_A) * itemsize:
        return None
    if old is None:
        f64 = torch.float64
        return Chain(torch.zeros(0, k_B, k_B, dtype=f64), torch.zeros(0, k_A, k_A, dtype=f64), np.zeros(0, np.int64))
    return old


def _appended_rows(
    ckpt: Checkpoint,
    name: str,
    prefix: str,
    table: RecordTable,
    new_rows: TaskRows,
    chain: Chain,
    RB: torch.Tensor,
    RA: torch.Tensor,
) -> TaskRows:
    """The module's rows after an update that keeps the old rows where they are: the stored
    tensors copied, the new tasks' rows after them, and the chain extended by this update's
    rotation (R_B = β_newᵀ β_old, R_A = α_newᵀ α_old): every older version's rotation to the
    current bases is composed with it, and the rows written under the old bases become a version."""
    rows = ckpt.tensor_meta(f"{prefix}coefs_B")[0][0]
    covered = int(chain.ends[-1]) if len(chain) else 0
    rotations_B, rotations_A, ends = RB @ chain.rotations_B, RA @ chain.rotations_A, chain.ends
    if rows > covered:
        rotations_B, rotations_A = torch.cat([rotations_B, RB[None]]), torch.cat([rotations_A, RA[None]])
        ends = np.append(ends, rows)
    T = len(table)
    base = {prefix: rows}
    private, private_row = new_rows.private, np.concatenate([np.zeros(T, dtype=np.int64), new_rows.private_row])
    private_name = f"modules/{name}/private_B"
    if ckpt.has(private_name) and prefix == f"modules/{name}/":  # one set of bases: the private rows are all ours
        stored = ckpt.tensor_meta(private_name)[0][0]
        base["private"] = stored
        private_row = np.concatenate([table.int_column("private_row"), new_rows.private_row + stored])
    elif ckpt.has(private_name):  # a group's tasks: their private rows gathered from the module's
        old = ckpt.task_rows(name, table.tasks)
        gathered = old.private[0].shape[0] if old.private is not None else 0
        private_row = np.concatenate([old.private_row, new_rows.private_row + gathered])
        if old.private is not None:
            parts = [old.private] + ([new_rows.private] if new_rows.private is not None else [])
            private = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return TaskRows(
        tasks=[*table.tasks, *new_rows.tasks],
        prefixes=[prefix] * (T + len(new_rows.tasks)),
        coefs={prefix: new_rows.coefs[prefix]} if prefix in new_rows.coefs else {},
        coef_row=np.concatenate([table.int_column("coef_row"), new_rows.coef_row + rows]),
        private=private,
        private_row=private_row,
        chains={prefix: Chain(rotations_B, rotations_A, ends)},
        base=base,
        source=ckpt,
    )


def update_grouped_module(
    ckpt: Checkpoint,
    name: str,
    old_tasks: list[str],
    dropped: Sequence[str],
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
) -> ModuleResult:
    """Fold new members into a module with groups of bases: each joins the group whose bases
    capture most of it, and only those groups are updated (incrementally, as one module each);
    the other groups are copied unchanged. Falls back to :func:`refit_module` when a group would
    be left empty or no group has bases."""
    info = ckpt.modules[name]
    groups = info["groups"]
    kept = set(old_tasks)
    members = [m.to(torch.device("cpu")) for m in members]  # as in update_module
    prefixes = [f"modules/{name}/g{j}/" if g["k_B"] else None for j, g in enumerate(groups)]
    if not any(prefixes) or any(not [t for t in g["tasks"] if t in kept] for g in groups):
        return refit_module(ckpt, name, old_tasks, members, config, dtype)
    joins: dict[int, list[ModuleMember]] = {}
    for m in members:
        captured = []
        for prefix in prefixes:
            if prefix is None:
                captured.append(-1.0)
                continue
            Eb = ckpt.tensor(f"{prefix}basis_B").double().T @ m.Bc.double()
            Ea = ckpt.tensor(f"{prefix}basis_A").double().T @ m.Ac.double()
            captured.append(float(((Eb.T @ Eb) * (Ea.T @ Ea)).sum()))
        joins.setdefault(max(range(len(groups)), key=lambda j: captured[j]), []).append(m)
    result = ModuleResult(plan=ModulePlan(0, 0, [], [], 0, info.get("alternatives")))
    result.groups = []
    blocks: list[TaskRows] = []
    for j, g in enumerate(groups):
        tasks = [t for t in g["tasks"] if t in kept]
        if j in joins:
            res = update_module(ckpt, name, tasks, joins[j], config, dtype, prefix=prefixes[j])
            result.tensors.update(res.tensors)
            blocks.append(res.rows)
            result.carried += res.carried
            records = res.records
            part = {"k_B": res.plan.k_B, "k_A": res.plan.k_A, "kind": res.plan.kind, "params": res.plan.params}
        else:  # unchanged: bases and tasks copied; the Gram matrices are recomputed without dropped tasks
            if prefixes[j] is not None:
                result.carried += [f"{prefixes[j]}basis_B", f"{prefixes[j]}basis_A"]
                if _dropped_here(ckpt, name, prefixes[j], dropped):
                    grams = _grams_of(ckpt, name, prefixes[j], tasks, config.weighting)
                    for side in ("B", "A"):
                        result.tensors[f"{prefixes[j]}gram_{side}"] = grams[side].to(torch.float32)
                else:
                    result.carried += [f"{prefixes[j]}gram_B", f"{prefixes[j]}gram_A"]
            blocks.append(ckpt.task_rows(name, tasks))
            records = {t: dict(info["tasks"][t], error_before=info["tasks"][t]["error"], drift=0.0) for t in tasks}
            gone = [t for t in g["tasks"] if t not in kept]
            freed = sum(
                info["tasks"][t]["rank"] * (g["k_B"] + g["k_A"])
                + info["tasks"][t]["private_rank"] * (info["out_features"] + info["in_features"])
                for t in gone
            )
            part = {k: g[k] for k in ("k_B", "k_A", "kind")} | {"params": g["params"] - freed}
        new_tasks = [m.task for m in joins.get(j, [])]
        result.groups.append(dict(part, tasks=tasks + new_tasks))
        for t, rec in records.items():
            result.records[t] = dict(rec, group=j)
        result.plan.k_B += part["k_B"]
        result.plan.k_A += part["k_A"]
        result.plan.params += part["params"]
    # order the records as the module's tasks were, new ones last; private ranks in that order
    order = [t for t in info["tasks"] if t in kept] + [m.task for m in members]
    result.records = {t: result.records[t] for t in order}
    result.plan.private_ranks = [result.records[t]["private_rank"] for t in order]
    result.plan.predicted_errors = [result.records[t]["error"] for t in order]
    result.rows = TaskRows.concat(blocks, dtype)
    return result


def refit_module(
    ckpt: Checkpoint,
    name: str,
    old_tasks: list[str],
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
) -> ModuleResult:
    """Consolidate one module again from its old tasks' reconstructions and the new members.

    The fallback of :func:`update_grouped_module` when a group would be left empty or no group
    has bases; its cost grows with the number of old tasks of that module. Old tasks' errors
    become bounds: the error before plus the drift, or :func:`share_convert.engine.planning.drift_bound`
    where the old reconstruction was a projection (:func:`projection_slack`).
    """
    sources = [CheckpointTask(ckpt, t) for t in old_tasks]
    old_members = read_members(sources, name, config)  # on the compute device, where the new join them
    members = [m.to(config.torch_device()) for m in members]
    info = ckpt.modules[name]
    projections = _old_projections(ckpt, name, old_tasks)
    for m in old_members:  # the planner counts the tighter bounds of plans that stay in the old span
        if m.task in projections:
            m.slack = projections[m.task][0]
    res = consolidate_module(name, info["out_features"], info["in_features"], old_members + members, config, dtype)
    for t in old_tasks:
        rec = res.records[t]
        before = info["tasks"][t]["error"]
        rec["error_before"] = before
        rec["drift"] = max(rec["error"] - before, 0.0)
    _tighten_refit(res, name, projections)
    return res


def _old_projections(ckpt: Checkpoint, name: str, old_tasks: list[str]) -> dict[str, tuple[float, OldSpan]]:
    """The old tasks of one module whose stored part is a projection in their bases
    (:func:`projection_slack` finite): task -> (η, β, α of those bases, float64)."""
    info = ckpt.modules[name]
    table = RecordTable.from_dicts(info["tasks"]).select(old_tasks)
    by_prefix: dict[str, list[str]] = {}
    for t in old_tasks:
        prefix = ckpt.bases_prefix(name, t)
        if prefix is not None:
            by_prefix.setdefault(prefix, []).append(t)
    out: dict[str, tuple[float, OldSpan]] = {}
    for prefix, tasks in by_prefix.items():
        if not _projection_eligible(ckpt, table.select(tasks)).any():
            continue  # decided by the records: nothing to read
        beta, alpha = ckpt.tensor(f"{prefix}basis_B").double(), ckpt.tensor(f"{prefix}basis_A").double()
        old = _OldCoefficients(ckpt, name, tasks, beta.shape[1], alpha.shape[1], prefix)
        gram_B, gram_A = beta.T @ beta, alpha.T @ alpha
        norm2 = old.form([(1.0, None, None)])
        slack = projection_slack(ckpt, info, table.select(tasks), old, beta, alpha, norm2, (gram_B, gram_A))
        eligible = torch.isfinite(slack).nonzero().flatten().tolist()
        if eligible:  # the Cholesky factors once per set of bases, not once per task
            span = OldSpan(beta, alpha, torch.linalg.cholesky(gram_B), torch.linalg.cholesky(gram_A))
            for i in eligible:
                out[tasks[i]] = (float(slack[i]), span)
    return out


@dataclass(frozen=True)
class OldSpan:
    """One set of old bases and the Cholesky factors of their Gram matrices (see :func:`_inside`)."""

    beta: torch.Tensor
    alpha: torch.Tensor
    L_B: torch.Tensor
    L_A: torch.Tensor


def _tighten_refit(res: ModuleResult, name: str, projections: dict[str, tuple[float, OldSpan]]) -> None:
    """Replace the bound error before + drift of :func:`refit_module`'s old tasks by :func:`drift_bound`
    where their stored part was a projection in the old bases (``projections``).

    The refit encodes each old task's reconstruction ΔŴ_before afresh as ΔŴ_after, so D = ΔŴ_before −
    ΔŴ_after and its part outside the old span is ΔŴ_after's: ‖(I − Π_old) ΔŴ_after‖² = ‖ΔŴ_after‖² −
    ‖Π_old ΔŴ_after‖², from products of the new factors with the old bases (n-sized, per task, as the
    refit itself is). When the refit keeps each task's own top directions, ΔŴ_after lies in the old span
    and the bound is Pythagoras', √(e² + d²).
    """
    f64 = torch.float64
    for t, (slack, span) in projections.items():
        rec = res.records[t]
        Bn, An = _result_factors(res, name, t)
        outside = 0.0
        if Bn.shape[1]:
            VB, VA = _inside(span.beta, Bn, span.L_B), _inside(span.alpha, An, span.L_A)
            within = ((VB.T @ VB) * (VA.T @ VA)).sum()
            outside = float((((Bn.T @ Bn) * (An.T @ An)).sum() - within).clamp_min(0).sqrt()) / rec["norm"]
        before, drift = (torch.tensor([rec[c]], dtype=f64) for c in ("error_before", "drift"))
        bound = drift_bound(before, drift, torch.tensor([outside], dtype=f64), torch.tensor([slack], dtype=f64))
        rec["error"] = min(float(bound), rec["error"])


def _result_factors(res: ModuleResult, name: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's ΔŴ in a freshly consolidated module as column factors (n × w, d × w), float64."""
    parts = res.task_parts.get(task, {})
    rec = res.records[task]
    prefix = f"modules/{name}/g{rec['group']}/" if res.groups else f"modules/{name}/"
    cols_B, cols_A = [], []
    if "coef_B" in parts:
        cols_B.append(res.tensors[f"{prefix}basis_B"].double() @ parts["coef_B"].double())
        cols_A.append(res.tensors[f"{prefix}basis_A"].double() @ parts["coef_A"].double())
    if "private_B" in parts:
        cols_B.append(parts["private_B"].double())
        cols_A.append(parts["private_A"].double().T)
    if not cols_B:  # nothing stored: ΔŴ_after = 0
        return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64)
    return torch.cat(cols_B, 1), torch.cat(cols_A, 1)


def remove(
    checkpoint: str | Path | Checkpoint,
    tasks: Sequence[str],
    output: str | Path,
    *,
    refit: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Drop ``tasks``. Without ``refit`` the bases stay (their Gram matrices are recomputed from the
    remaining tasks); with ``refit`` the bases are recomputed from the remaining tasks' reconstructions."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    max_shard_size = parse_size(max_shard_size)
    for t in tasks:
        ckpt.task(t)  # raises UnknownTaskError with the list
    keep = [t for t in ckpt.tasks if t not in tasks]
    if not keep:
        raise UnknownTaskError(
            "removing every task would leave an empty checkpoint", path=ckpt.path, hint="Delete the file instead"
        )
    output = Path(output)
    check_output(output, force or same_checkpoint(output, ckpt))
    config = config_of(ckpt)
    if refit:
        return merge(
            [CheckpointTask(ckpt, t) for t in keep],
            output,
            dc_replace(config),
            force=True,
            progress=progress,
            history=ckpt.history,
            op="remove+refit",
            max_shard_size=max_shard_size,
        )
    modules_out: dict[str, Any] = {}
    # the Gram matrices are recomputed: one thread, as merge, add and extract compute (same bytes anywhere)
    with deterministic(), CheckpointWriter(output, max_shard_size) as writer:
        for t in keep:
            for key in ckpt.task(t).get("heads", []):
                ckpt.copy_to(writer, f"tasks/{t}/heads/{key}")
        modules = list(ckpt.modules)
        for step, name in enumerate(modules):
            if progress:
                progress(name, step, len(modules))
            carried = _carry_module(ckpt, writer, name, keep, tasks, config.weighting)
            if carried is not None:
                modules_out[name] = carried
        if progress:
            progress("", len(modules), len(modules))
        manifest = build_manifest(
            config, [_OldTask(ckpt, t) for t in keep], modules_out, ckpt.history, "remove", added=[]
        )
        manifest["history"][-1]["tasks_removed"] = list(tasks)
        manifest["history"][-1]["tasks_added"] = []
        manifest["history"][-1]["errors"] = {}
        writer.finish(manifest)
    return manifest
