"""``add``: new adapters (or another checkpoint's tasks) folded into a checkpoint (spec, section 5).

Old tasks' errors can only be bounded after an update (their originals are gone): the new error
is at most the old error plus the drift ‖ΔŴ_before − ΔŴ_after‖ / ‖ΔW‖, both recorded, and less
where the stored task was a projection in the old bases (:func:`share_convert.math.bounds.drift_bound`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace as dc_replace
from itertools import compress
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.publish import check_output, same_checkpoint
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable
from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..checkpoint.writer import CheckpointWriter
from ..config import ConsolidationConfig
from ..errors import DuplicateTaskError, IncompatibleAdaptersError, InvalidOptionError
from ..math.linalg import deterministic, load_linalg
from ..math.quantize import stored_bytes
from .consolidation import consolidate_module
from .members import Progress, TaskSource, check_compatible, named_dtype, natural_key, read_members, storage_dtype
from .old_tasks import carry_module
from .parallel import auto_workers, check_executor, executor_session, ordered_map
from .pipeline import build_manifest, module_record, write_module
from .ray_executor import module_reads, ray_map
from .refit import refit_module
from .results import ModuleResult
from .tasks import KeptTask, config_of
from .update import update_grouped_module, update_module


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
    executor: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Fold ``sources`` into ``checkpoint`` and write the result to ``output`` (may be the same path).

    ``config`` defaults to the checkpoint's own options. Existing task names are an error unless
    ``replace``, in which case the old task is dropped first. ``workers`` modules are updated at
    once, as in :func:`merge` (the output does not depend on it); ``executor`` and ``ray_address``
    as in :func:`merge`.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    config = config or config_of(ckpt)
    config.validate()
    check_executor(executor, ray_address)
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
    new_shapes = check_compatible(list(sources))
    for name, (n, d, _) in new_shapes.items():
        if name in ckpt.modules:
            entry = ckpt.module(name)
            if entry.shape != (n, d):
                raise IncompatibleAdaptersError(
                    f"module {name} is {n}×{d} in the new adapters but {entry.out_features}×{entry.in_features} "
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
    with deterministic(), executor_session(executor, ray_address), CheckpointWriter(output, max_shard_size) as writer:
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
            readers = [s for s in sources if name in s.module_shapes()]
            return update_one(ckpt, name, readers, clashes, config, module_config, module_dtype(name), new_shapes)

        def module_dtype(name: str) -> torch.dtype:
            if dtype is not None:
                return dtype
            if name in ckpt.modules:
                return named_dtype(ckpt.module(name).dtype)
            return storage_dtype(config, [s.weights_dtype for s in sources])

        load_linalg(config.torch_device())
        shapes = [s.module_shapes() for s in sources]
        new_params = [sum(sh[m][2] for sh in shapes if m in sh) * (n + d) for m, (n, d, _) in new_shapes.items()]
        if workers is None:
            workers = auto_workers(max(new_params, default=0))
        # modules are computed concurrently (or as Ray tasks) and written in order (as in merge)
        if executor == "ray":
            # only the modules a new task has are sent out; the others are carried as they are
            readers = {name: [s for s in sources if name in s.module_shapes()] for name in all_modules}
            todo = [name for name in all_modules if readers[name]]
            calls = (
                (ckpt, name, module_reads(readers[name], name), clashes, config, module_config, module_dtype(name),
                 {name: new_shapes[name]} if name in new_shapes else {})
                for name in todo
            )  # fmt: skip
            gpus = 1 if config.torch_device().type == "cuda" else 0
            computed = ray_map(update_one_portable, calls, names=todo, gpus=gpus)
            results = (next(computed) if readers[name] else None for name in all_modules)
        else:
            results = ordered_map(work, all_modules, workers)
        for step, (name, res) in enumerate(zip(all_modules, results)):
            if progress:
                progress(name, step, len(all_modules))
            if res is None:
                carried = carry_module(ckpt, writer, name, old_tasks, clashes, config.weighting)
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
        old_sources = [KeptTask(ckpt, t) for t in old_tasks]
        manifest = build_manifest(
            config, [*old_sources, *sources], modules_out, ckpt.history, "add", added=[s.task for s in sources]
        )
        entry = manifest["history"][-1]
        entry["tasks_replaced"] = clashes
        entry["drift_summary"] = {"tasks": len(drifted), "max": worst}
        writer.finish(manifest)
    return manifest


def update_one(
    ckpt: Checkpoint,
    name: str,
    readers: Sequence[TaskSource],
    clashes: list[str],
    config: ConsolidationConfig,
    module_config: ConsolidationConfig,
    mdtype: torch.dtype,
    new_shapes: dict[str, tuple[int, int, list[int]]],
) -> ModuleResult | None:
    """One module of ``add``: the new tasks read from ``readers`` folded into the checkpoint's module
    (None: no new task has it, it is carried as it is), or consolidated where the checkpoint has no
    such module. The same function whichever process computes it (a thread here, a Ray worker)."""
    old = ckpt.module(name) if name in ckpt.modules else None
    members = read_members(readers, name, config)
    if old is None:
        n, d, _ = new_shapes[name]
        return consolidate_module(name, n, d, members, module_config, mdtype)
    if not members:
        return None
    # in the module's own order (its stored rows' order), without the replaced tasks
    clashed = set(clashes)
    kept = [t for t in old.task_names if t not in clashed]
    if old.grouped:
        return update_grouped_module(ckpt, name, kept, clashes, members, module_config, mdtype)
    res = update_module(ckpt, name, kept, members, module_config, mdtype)
    n, d = old.shape
    # in bytes once any factor is stored at another precision (parameters, as before, otherwise)
    in_bytes = bool(res.precision) or module_config.precision != "float"
    if stored_cost(res, n, d, mdtype, in_bytes) > original_cost(res, n, d, mdtype, in_bytes):
        # the incremental update keeps the shared bases; here that stores more than the originals
        # did, so consolidate the module again from the old tasks' reconstructions, as merge
        # would (it may keep each task's own directions instead), and keep the smaller
        alternative = refit_module(ckpt, name, kept, members, module_config, mdtype)
        if stored_cost(alternative, n, d, mdtype, in_bytes) < stored_cost(res, n, d, mdtype, in_bytes):
            return alternative
    return res


def update_one_portable(*args: Any) -> ModuleResult | None:
    """:func:`update_one` as a Ray task runs it: the result without the planner's fits, which only
    the module's own computation uses."""
    res = update_one(*args)
    if res is not None:
        res.planner = None
    return res


def stored_params(res: ModuleResult, n: int, d: int) -> int:
    """Parameters one module's result stores: bases and their Gram matrices, every task's
    coefficients and private factors."""
    table = RecordTable.from_dicts(res.records)
    k_B, k_A = res.plan.k_B, res.plan.k_A
    ranks, private = table.int_column("rank"), table.int_column("private_rank")
    bases = k_B * n + k_A * d + k_B * k_B + k_A * k_A
    return bases + int(ranks.sum()) * (k_B + k_A) + int(private.sum()) * (n + d)


def stored_cost(res: ModuleResult, n: int, d: int, dtype: torch.dtype, in_bytes: bool) -> int:
    """What an update's result of one module is compared by: :func:`stored_params` (as before
    precisions existed), or ``in_bytes`` the bytes of its factors, each role at its precision
    (``dtype`` where it has none; scales included), and of the Gram matrices."""
    if not in_bytes:
        return stored_params(res, n, d)
    table = RecordTable.from_dicts(res.records)
    k_B, k_A = res.plan.k_B, res.plan.k_A
    rows, private = int(table.int_column("rank").sum()), int(table.int_column("private_rank").sum())
    fallback = str(dtype).replace("torch.", "")

    def size(r: int, c: int, role: str) -> int:
        return stored_bytes(r, c, res.precision.get(role, fallback)) if r and c else 0

    grams = 4 * (k_B * k_B + k_A * k_A)
    return (
        size(n, k_B, "basis_B") + size(d, k_A, "basis_A") + grams + size(rows, k_B, "coefs_B")
        + size(rows, k_A, "coefs_A") + size(private, n, "private_B") + size(private, d, "private_A")
    )  # fmt: skip


def original_cost(res: ModuleResult, n: int, d: int, dtype: torch.dtype, in_bytes: bool) -> int:
    """The originals of one module's tasks in the unit of :func:`stored_cost` (bytes: in the module's dtype)."""
    params = original_params(res, n, d)
    return params * torch.empty((), dtype=dtype).element_size() if in_bytes else params


def original_params(res: ModuleResult, n: int, d: int) -> int:
    """Parameters the originals of one module's tasks had (LoRA factors, r × (n + d) each)."""
    return int(RecordTable.from_dicts(res.records).int_column("original_rank").sum()) * (n + d)


def _shape(ckpt: Checkpoint, new_shapes: dict, name: str) -> tuple[int, int]:
    if name in ckpt.modules:
        return ckpt.module(name).shape
    return new_shapes[name][0], new_shapes[name][1]
