"""The pipeline over modules: merge reads, consolidates and writes every module in order.

:func:`merge` checks its inputs, spends a ``--budget`` across modules (:mod:`.budget`), then
reads each module's members, consolidates them (:func:`.consolidation.consolidate_module`) and
writes the result (:func:`write_module`) as the writer takes modules in order; :func:`build_manifest`
assembles the manifest. ``add`` writes its modules through the same functions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.format import FORMAT_NAME, FORMAT_VERSION
from ..checkpoint.publish import check_output
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable
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
from .parallel import auto_workers, check_executor, executor_session, ordered_map, prefetched
from .results import ModuleResult, module_rows, quantize_for_writing
from .stacks import ModuleStack


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
    executor: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Consolidate ``sources`` into the Share checkpoint ``output``; return its manifest.

    Nothing is written unless every input is valid: the file appears atomically at the end.
    ``timings``, when given, receives the seconds spent reading, canonicalizing, decomposing
    (bases and planning), encoding (coefficients, private factors, errors) and writing, summed
    over workers. ``workers`` modules are processed at once (default: one per CPU core, at most
    4); memory holds that many modules' stacks. Tensors taking more than ``max_shard_size`` bytes
    (an int, or text such as '5GB') are written in shards with an index.

    ``executor`` ``"ray"`` computes each module as a task on a Ray cluster (at ``ray_address``, else
    Ray's own resolution: :func:`.ray_executor.ray_session`); the output is the same, byte for byte.
    """
    config = config or ConsolidationConfig()
    config.validate()
    check_executor(executor, ray_address)
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
    # each adapter file opened once for the whole merge (up to a limit)
    with OpenFiles() as files, executor_session(executor, ray_address):
        return _merge_into(
            sources, output, config, modules, dtype, workers, total_original, fixed_bytes, files,
            progress=progress, history=history, op=op, timings=timings, max_shard_size=max_shard_size,
            executor=executor,
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
    executor: str,
) -> dict[str, Any]:
    """The body of :func:`merge`, once its inputs are checked: the budget's targets, then every
    module read, consolidated and written in order."""
    manifest_modules: dict[str, Any] = {}
    clock = dict.fromkeys(("read", "canonicalize", "decompose", "encode", "write"), 0.0)
    # a --budget is spent across modules: first each module's error against storage, then a target per module
    # what the budget pass built, for the modules it can keep: not read again (on this process only)
    kept = KeptStacks() if executor != "ray" else None
    with deterministic():
        targets = budget_targets(sources, modules, config, dtype, total_original, fixed_bytes, workers, files, kept)
    with deterministic(), CheckpointWriter(output, max_shard_size) as writer:
        for src in sources:
            for key, t in src.read_heads().items():
                writer.add(f"tasks/{src.task}/heads/{key}", t)
        items = list(modules.items())
        if executor == "ray":
            results = ray_results(sources, items, config, dtype, targets, clock)
        else:
            results = local_results(sources, items, config, dtype, targets, clock, workers, files, kept)
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


Item = tuple[str, tuple[int, int, list[int]]]


def merge_module(
    name: str,
    n: int,
    d: int,
    readers: Sequence[TaskSource],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    target: float | None,
    files: OpenFiles | None = None,
    read_ahead: tuple[LoraStack | list[LoraFactors], float] | None = None,
    stack: ModuleStack | None = None,
) -> tuple[ModuleResult, dict[str, float]]:
    """One module of a merge: its members read from ``readers`` (or ``read_ahead``: the stack read
    and the seconds it took), canonicalized and consolidated, under ``target`` (a ``--budget``'s
    error target for this module) when given. Returns the result and the seconds each step took.
    The same function whichever process computes it (a thread here, a Ray worker). ``stack``: the
    budget pass's stack of this module (read, canonicalized and decomposed already)."""
    clock = dict.fromkeys(("read", "canonicalize", "decompose", "encode", "write"), 0.0)
    module_config = config
    if target is not None:  # under --budget: this module's share, as an error target
        metric = "max" if config.target_metric == "max" else "mean"
        module_config = dc_replace(config, budget=None, target_error=target, target_metric=metric)
    if stack is not None:
        res = consolidate_module(name, n, d, stack.members, module_config, dtype, clock, stack=stack)
        return _ready_to_write(name, res, dtype, clock), clock
    t0 = time.perf_counter()
    factors = read_ahead[0] if read_ahead else read_module_stack(list(readers), name, files, config.torch_device())
    clock["read"] = read_ahead[1] if read_ahead else time.perf_counter() - t0
    t1 = time.perf_counter()
    members = prepare_members(  # read_members, with the reading timed apart
        [s.task for s in readers], factors, config, [s.prior(name) for s in readers],
        [original_rank(s, name) for s in readers],
    )  # fmt: skip
    del factors
    clock["canonicalize"] += time.perf_counter() - t1
    res = consolidate_module(name, n, d, members, module_config, dtype, clock)
    return _ready_to_write(name, res, dtype, clock), clock


def _ready_to_write(name: str, res: ModuleResult, dtype: torch.dtype, clock: dict[str, float]) -> ModuleResult:
    """``res`` stacked and quantized for the writer here, on the worker (timed as writing)."""
    t0 = time.perf_counter()
    quantize_for_writing(name, res, dtype)
    clock["write"] += time.perf_counter() - t0
    return res


def local_results(
    sources: Sequence[TaskSource],
    items: list[Item],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    targets: dict[str, float] | None,
    clock: dict[str, float],
    workers: int,
    files: OpenFiles,
    kept: KeptStacks | None = None,
) -> Iterator[ModuleResult]:
    """Every module's result in order, computed on ``workers`` threads of this process (the seconds
    each step took are added to ``clock``); the modules in ``kept`` from the budget pass's stacks."""
    lock = threading.Lock()
    device = config.torch_device()

    def read(item: Item) -> tuple[LoraStack | list[LoraFactors], float]:
        name, (_n, _d, idx) = item
        if kept is not None and name in kept:  # the budget pass kept it: nothing to read ahead
            return [], 0.0
        t0 = time.perf_counter()
        return read_module_stack([sources[i] for i in idx], name, files, device), time.perf_counter() - t0

    def work(item: Item, read_ahead: tuple[Any, float] | None = None) -> ModuleResult:
        name, (n, d, idx) = item
        target = targets[name] if targets else None
        stack = kept.take(name) if kept is not None else None
        readers = [sources[i] for i in idx]
        res, local = merge_module(name, n, d, readers, config, dtype, target, files, read_ahead, stack)
        with lock:
            for k, v in local.items():
                clock[k] += v
        return res

    # Modules are independent: workers compute them concurrently (each numeric op on one
    # thread, so results do not depend on the thread count) and the writer takes them in order.
    # Several workers overlap one's reading with the others' compute; a single one (large
    # modules) has the next module read on a thread of its own while it computes this one.
    if workers <= 1:
        return (work(item, ahead) for item, ahead in zip(items, prefetched(read, items)))
    return ordered_map(work, items, workers)


def ray_results(
    sources: Sequence[TaskSource],
    items: list[Item],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    targets: dict[str, float] | None,
    clock: dict[str, float],
) -> Iterator[ModuleResult]:
    """Every module's result in order, each computed as a Ray task (:mod:`.ray_executor`): a task is
    sent where its module's factors lie, not the sources."""
    from .ray_executor import module_reads, ray_map

    calls = (
        (name, n, d, module_reads([sources[i] for i in idx], name), config, dtype, targets[name] if targets else None)
        for name, (n, d, idx) in items
    )
    gpus = 1 if config.torch_device().type == "cuda" else 0
    for res, local in ray_map(merge_module_portable, calls, names=[name for name, _ in items], gpus=gpus):
        for k, v in local.items():
            clock[k] += v
        yield res


def merge_module_portable(*args: Any) -> tuple[ModuleResult, dict[str, float]]:
    """:func:`merge_module` as a Ray task runs it: the result without the planner's fits, which
    only the module's own computation uses (what returns to the driver is what is written)."""
    with OpenFiles() as files:
        res, clock = merge_module(*args, files=files)
    res.planner = None
    return res, clock


def write_module(
    writer: CheckpointWriter, name: str, res: ModuleResult, dtype: torch.dtype, source: Checkpoint | None = None
) -> None:
    """Write one module: its bases and Gram matrices, then every task's tensors stacked (format v2).

    ``source`` is the checkpoint that ``res.carried`` tensors are copied from, byte for byte.
    """
    for tname in sorted(res.tensors):
        role = tname.rsplit("/", 1)[-1]
        if role in res.precision:
            writer.add(tname, res.tensors[tname], res.precision[role])
        else:
            writer.add(tname, res.tensors[tname])
    for tname in res.carried:
        source.copy_to(writer, tname)
    writer.add_module(name, module_rows(name, res, dtype))


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


def stored_config(config: ConsolidationConfig) -> dict[str, Any]:
    """The options as the manifest stores them. ``precision`` 'float' is left out: a checkpoint without
    it (every file older than precisions) stores every factor in its float dtype, so a float checkpoint
    is byte for byte what it was before precisions existed."""
    stored = asdict(config)
    if stored.get("precision") == "float":
        del stored["precision"]
    return stored


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
        "config": stored_config(config),
        "tasks": tasks,
        "modules": modules,
        "history": [*history, entry],
    }
