"""The pipeline over modules: merge reads, consolidates and writes every module in order.

:func:`merge` checks its inputs, spends a ``--budget`` across modules (:mod:`.budget`), then
reads each module's members, consolidates them (:func:`.consolidation.consolidate_module`) and
writes the result (:func:`write_module`) as the writer takes modules in order; :func:`build_manifest`
assembles the manifest. ``add`` writes its modules through the same functions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.format import FORMAT_NAME, FORMAT_VERSION
from ..checkpoint.publish import check_output
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable, TaskRows
from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..checkpoint.writer import CheckpointWriter
from ..config import (
    DEFAULT_TARGET_ERROR,  # noqa: F401 (re-exported)
    ConsolidationConfig,
)
from ..dtypes import itemsize
from ..errors import InvalidOptionError
from ..io.factors import LoraFactors, LoraStack
from ..io.stack import OpenFiles, read_module_stack
from ..math.linalg import deterministic, load_linalg
from .budget import KeptStacks, budget_targets
from .consolidation import consolidate_module
from .members import Progress, TaskSource, check_compatible, original_rank, prepare_members, storage_dtype
from .parallel import auto_workers, ordered_map, prefetched
from .results import ModuleResult


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
    kept = KeptStacks()  # what the budget pass built, for the modules it can keep: not read again
    with deterministic():
        targets = budget_targets(sources, modules, config, dtype, total_original, fixed_bytes, workers, files, kept)
    with deterministic(), CheckpointWriter(output, max_shard_size) as writer:
        for src in sources:
            for key, t in src.read_heads().items():
                writer.add(f"tasks/{src.task}/heads/{key}", t)
        lock = threading.Lock()
        device = config.torch_device()

        def read(item: tuple[str, tuple[int, int, list[int]]]) -> tuple[LoraStack | list[LoraFactors], float]:
            name, (_n, _d, idx) = item
            if name in kept:  # the budget pass kept it: nothing to read ahead
                return [], 0.0
            t0 = time.perf_counter()
            return read_module_stack([sources[i] for i in idx], name, files, device), time.perf_counter() - t0

        def work(
            item: tuple[str, tuple[int, int, list[int]]], read_ahead: tuple[Any, float] | None = None
        ) -> ModuleResult:
            name, (n, d, idx) = item
            local = dict.fromkeys(clock, 0.0)
            module_config = config
            if targets:  # under --budget: this module's share, as an error target
                module_config = dc_replace(config, budget=None, target_error=targets[name], target_metric="mean")
            stack = kept.take(name)
            if stack is not None:  # the budget pass's stack: read, canonicalized and decomposed already
                res = consolidate_module(name, n, d, stack.members, module_config, dtype, local, stack=stack)
                with lock:
                    for k, v in local.items():
                        clock[k] += v
                return res
            factors, local["read"] = read_ahead or read(item)
            t1 = time.perf_counter()
            here = [sources[i] for i in idx]
            members = prepare_members(  # read_members, with the reading timed apart
                [s.task for s in here], factors, config, [s.prior(name) for s in here],
                [original_rank(s, name) for s in here],
            )  # fmt: skip
            del factors
            local["canonicalize"] += time.perf_counter() - t1
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
            results = (work(item, ahead) for item, ahead in zip(items, prefetched(read, items)))
        else:
            results = ordered_map(work, items, workers)
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
