"""``combine``: a new task made from a checkpoint's tasks in coefficient space (docs/combine.md).

Per module, the new task comes from :func:`~share_convert.engine.combination.combine_module`; the
module's bases stay as they are, so no other task changes. Its rows are appended to the module's
stacked tensors (the stored rows and their block checksums copied, as ``add`` appends), the Gram
matrices of its bases gain its term, and modules none of the inputs adapt are copied. The writer,
publishing and the history are ``add``'s and ``remove``'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint.publish import check_output, same_checkpoint
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable, TaskRows
from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..checkpoint.writer import CheckpointWriter
from ..errors import DuplicateTaskError, InvalidOptionError, InvalidTaskNameError
from ..math.linalg import deterministic
from ..math.merging import METHODS
from ..names import task_name_problem
from .combination import CombinedModule, combine_module
from .members import Progress, named_dtype
from .old_tasks import carry_module, dropped_here, grams_of, one_per_group
from .pipeline import build_manifest
from .planning import task_weight
from .tasks import KeptTask, config_of

#: Fields of a task's manifest record that describe its original adapter, not a combination of tasks.
_NOT_INHERITED = ("source", "from_checkpoint", "original_params", "original_bytes", "alpha_assumed")
_HEAD_FIELDS = ("heads", "head_dtypes", "head_params", "head_bytes")


def combine(
    checkpoint: str | Path | Checkpoint,
    task: str,
    weights: Mapping[str, float],
    output: str | Path,
    *,
    method: str = "linear",
    density: float | None = None,
    seed: int | None = None,
    head_from: str | None = None,
    replace: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Write ``checkpoint`` with a new task ``task`` = the combination of ``weights`` (task -> weight)
    by ``method`` to ``output`` (may be the same path); return the manifest written, with the
    combination's figures under ``"combined"``.

    ``density`` (required by ``ties`` and ``dare``) is the fraction of each task's coefficients
    kept; ``seed`` (``dare``, default 0) seeds the drops. The new task's heads (``modules_to_save``)
    are those its inputs share, or ``head_from``'s. Every check is made before anything is written.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    max_shard_size = parse_size(max_shard_size)
    density, seed = check_options(ckpt, task, weights, method, density, seed, replace)
    source = heads_source(ckpt, list(weights), head_from)
    output = Path(output)
    check_output(output, force or same_checkpoint(output, ckpt))
    config = config_of(ckpt)
    dropped = [task] if task in ckpt.tasks else []
    kept = [t for t in ckpt.tasks if t not in dropped]
    modules_out: dict[str, Any] = {}
    outside: list[float] = []
    with deterministic(), CheckpointWriter(output, max_shard_size) as writer:
        for t in kept:
            for key in ckpt.task(t).get("heads", []):
                ckpt.copy_to(writer, f"tasks/{t}/heads/{key}")
        for key in ckpt.task(source).get("heads", []):
            writer.add_raw(f"tasks/{task}/heads/{key}", *ckpt.raw(f"tasks/{source}/heads/{key}"))
        modules = list(ckpt.modules)
        for step, name in enumerate(modules):
            if progress:
                progress(name, step, len(modules))
            entry = ckpt.module(name)
            if not any(entry.has_task(t) for t in weights):
                carried = carry_module(ckpt, writer, name, kept, dropped, config.weighting)
                if carried is not None:
                    modules_out[name] = carried
                continue
            dtype = named_dtype(entry.dtype)
            comb = combine_module(ckpt, name, weights, method, dtype, density=density, seed=seed)
            modules_out[name] = write_combined(ckpt, writer, name, task, kept, dropped, comb, config.weighting)
            outside.append(comb.outside)
        if progress:
            progress("", len(modules), len(modules))
        new = NewTask(task, new_record(ckpt, list(weights), source, method, weights, density, seed))
        manifest = build_manifest(
            config, [*(KeptTask(ckpt, t) for t in kept), new], modules_out, ckpt.history, "combine", added=[task]
        )
        history = manifest["history"][-1]
        history["combined"] = new.record["combined"]
        if dropped:
            history["tasks_replaced"] = dropped
        writer.finish(manifest)
    manifest["combined"] = {
        "task": task,
        **new.record["combined"],
        "modules": len(outside),
        # modules where some input's part lies outside the new task's bases (private factors, other
        # groups): summed as it is, by every method; and its largest share of the new task's ‖ΔW‖
        "modules_outside_bases": sum(x > 0 for x in outside),
        "outside_max": max(outside, default=0.0),
    }
    return manifest


def check_options(
    ckpt: Checkpoint,
    task: str,
    weights: Mapping[str, float],
    method: str,
    density: float | None,
    seed: int | None,
    replace: bool,
) -> tuple[float, int]:
    """Refuse, before anything is read or written, what ``combine`` cannot do; return the density
    and seed the method uses (1 and 0 where it uses none)."""
    if method not in METHODS:
        raise InvalidOptionError(
            f"--method {method!r} is not one of {', '.join(METHODS)}", hint="For example --method ties"
        )
    problem = task_name_problem(task)
    if problem is not None:
        raise InvalidTaskNameError(f"task name {task!r} {problem}", hint="Choose a folder-like name: --task NAME")
    if not weights:
        raise InvalidOptionError("no tasks to combine were given", hint="For example --weights a=0.7,b=0.3")
    for t, w in weights.items():
        ckpt.task(t)  # UnknownTaskError, with the checkpoint's tasks
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidOptionError(
                f"the weight of task {t!r} is {w!r}, not a finite number", hint="For example a=0.7"
            )
    if task in ckpt.tasks and not replace:
        raise DuplicateTaskError(
            f"task {task!r} already exists in the checkpoint",
            path=ckpt.path,
            hint="Pass --replace to replace it, or choose another name with --task",
        )
    if method == "linear" and density is not None:
        raise InvalidOptionError("--density applies to --method ties and dare", hint="Leave it out for linear")
    if method != "linear" and density is None:
        raise InvalidOptionError(
            f"--method {method} needs --density D, the fraction of each task's coefficients kept (0 < D ≤ 1)",
            hint="For example --density 0.5",
        )
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidOptionError(f"--density {density!r} is not in (0, 1]", hint="For example --density 0.5")
    if method != "dare" and seed is not None:
        raise InvalidOptionError("--seed applies to --method dare (its random drops)", hint="Leave it out")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidOptionError(f"--seed {seed!r} is not a non-negative integer", hint="For example --seed 0")
    if method != "linear" and not has_coefficients(ckpt, list(weights)):
        named = ", ".join(list(weights)[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
        raise InvalidOptionError(
            f"--method {method} applies its rule to the tasks' coefficients in shared bases, and no module holds "
            f"any for {named} (the plan kept each task's own directions); nothing was written",
            path=ckpt.path,
            hint="Use --method linear, or merge the adapters with --k K (shared bases only) and combine there",
        )
    return (1.0 if density is None else float(density)), (0 if seed is None else seed)


def has_coefficients(ckpt: Checkpoint, tasks: list[str]) -> bool:
    """Whether any of ``tasks`` has coefficients in shared bases in some module (from the records)."""
    for info in ckpt.modules.values():
        table = RecordTable.from_dicts(info["tasks"])
        here = [t for t in tasks if t in table]
        if here and bool((table.select(here).int_column("rank") > 0).any()):
            return True
    return False


def heads_source(ckpt: Checkpoint, tasks: list[str], head_from: str | None) -> str:
    """The task whose heads (``modules_to_save``) and adapter config the new task takes: ``head_from``,
    else the first input, when every input carries the same heads (keys and bytes)."""
    if head_from is not None:
        if head_from not in tasks:
            raise InvalidOptionError(
                f"--head-from {head_from!r} is not one of the combined tasks ({', '.join(tasks)})",
                hint="Name one of the tasks given in --weights",
            )
        return head_from
    digests = ckpt.manifest["tensors"]

    def heads(t: str) -> tuple:
        keys = sorted(ckpt.task(t).get("heads", []))
        return tuple((k, digests.get(f"tasks/{t}/heads/{k}")) for k in keys)

    first = heads(tasks[0])
    for t in tasks[1:]:
        if heads(t) != first:
            raise InvalidOptionError(
                f"tasks {tasks[0]!r} and {t!r} carry different heads (modules_to_save), and a combined task has "
                "one set; nothing was written",
                path=ckpt.path,
                hint="Pass --head-from TASK to give the new task that task's heads",
            )
    return tasks[0]


class NewTask:
    """The combined task as the manifest builder sees a source: its name and record."""

    def __init__(self, task: str, record: dict[str, Any]):
        self.task = task
        self.record = record

    def task_record(self) -> dict[str, Any]:
        return self.record


def new_record(
    ckpt: Checkpoint,
    tasks: list[str],
    source: str,
    method: str,
    weights: Mapping[str, float],
    density: float,
    seed: int,
) -> dict[str, Any]:
    """The new task's manifest record: the heads' task's (its config, format, heads), less what
    describes an original adapter, with how it was made. Its original parameters are what a LoRA
    holding it needs (its rank per module, counted by the manifest builder)."""
    template = ckpt.task(source)
    record = {k: v for k, v in template.items() if k not in _NOT_INHERITED}
    combined: dict[str, Any] = {"method": method, "weights": {t: float(w) for t, w in weights.items()}}
    if method != "linear":
        combined["density"] = density
    if method == "dare":
        combined["seed"] = seed
    record["source"] = "combine"
    record["combined"] = combined
    config = record.get("adapter_config")
    targets = [(ckpt.task(t).get("adapter_config") or {}).get("target_modules") for t in tasks]
    if isinstance(config, dict) and all(isinstance(x, list) for x in targets):  # the union: every input's layers
        record["adapter_config"] = dict(config, target_modules=sorted({m for x in targets for m in x}))
    if not template.get("heads"):
        record = {k: v for k, v in record.items() if k not in _HEAD_FIELDS}
    return record


def write_combined(
    ckpt: Checkpoint,
    writer: CheckpointWriter,
    name: str,
    task: str,
    kept: list[str],
    dropped: list[str],
    comb: CombinedModule,
    weighting: str,
) -> dict[str, Any]:
    """Write one module with the new task's rows after the kept tasks'; return its manifest entry."""
    info = ckpt.modules[name]
    entry = ckpt.module(name)
    n, d = entry.shape
    dtype = named_dtype(entry.dtype)
    table = RecordTable.from_dicts(info["tasks"])
    keep = set(kept)
    left = table.select([t for t in table.tasks if t in keep])
    coef_B = comb.parts.get("coef_B")
    weight = task_weight(comb.record["norm"], weighting)
    for prefix in sorted({ckpt.bases_prefix(name, t) for t in one_per_group(entry, table)} - {None}):
        for part in ("basis_B", "basis_A"):
            ckpt.copy_to(writer, f"{prefix}{part}")
        mine = prefix == comb.prefix and coef_B is not None
        if dropped_here(ckpt, name, prefix, dropped):
            grams = grams_of(ckpt, name, prefix, left.tasks, weighting)
        elif mine:
            grams = {side: ckpt.tensor(f"{prefix}gram_{side}").to(torch.float64) for side in "BA"}
        else:
            for side in "BA":
                ckpt.copy_to(writer, f"{prefix}gram_{side}")
            continue
        if mine:  # the new task's term w c cᵀ, from its coefficients as stored
            for side in "BA":
                c = comb.parts[f"coef_{side}"].to(torch.float64)
                grams[side] = grams[side] + weight * (c @ c.T)
        for side in "BA":
            writer.add(f"{prefix}gram_{side}", grams[side].to(torch.float32))
    own_prefix = comb.prefix or (f"modules/{name}/g{comb.group}/" if comb.group is not None else f"modules/{name}/")
    new_rows = TaskRows.of_parts([(task, own_prefix, comb.parts)], dtype)
    if not left.tasks:
        rows = new_rows
    elif ckpt.version >= 2 and len(left) == len(table):  # every task stays: their rows copied as stored
        rows = appended_rows(ckpt, name, left, new_rows)
    else:
        rows = TaskRows.concat([ckpt.task_rows(name, left.tasks), new_rows], dtype)
    writer.add_module(name, rows)

    # the kept tasks are untouched (no drift); the new task's record follows theirs
    records = RecordTable.concat(
        [left.updated(error_before=left.float_column("error"), drift=0.0), RecordTable.from_dicts({task: comb.record})]
    )
    p, q = comb.record["rank"], comb.record["private_rank"]
    out = {**info, "tasks": records}
    if entry.grouped:
        groups = []
        for j, g in enumerate(info["groups"]):
            g = dict(g, tasks=[t for t in g["tasks"] if t in keep])
            if j == comb.group:
                g["tasks"].append(task)
                g["params"] = g["params"] + p * (g["k_B"] + g["k_A"]) + q * (n + d)
                g["kind"] = "mixed" if q and g["kind"] == "shared" else g["kind"]
            groups.append(g)
        out["groups"] = groups
        k_B, k_A = (info["groups"][comb.group][k] for k in ("k_B", "k_A"))
    else:
        k_B, k_A = info.get("k_B", 0), info.get("k_A", 0)
    if "params" in out:
        out["params"] = out["params"] + p * (k_B + k_A) + q * (n + d)
    if q and out["kind"] == "shared":
        out["kind"] = "mixed"
    return out


def appended_rows(ckpt: Checkpoint, name: str, left: RecordTable, new_rows: TaskRows) -> TaskRows:
    """The module's rows with the new task's after every stored row: each stacked tensor (with its
    chain, if any) copied as it is stored, with its block checksums, and the new rows appended."""
    entry = ckpt.module(name)
    prefixes = [f"modules/{name}/g{j}/" for j in range(len(entry.groups))] if entry.grouped else [f"modules/{name}/"]
    base: dict[str, int] = {}
    chains = {}
    for prefix in prefixes:
        if ckpt.has(f"{prefix}coefs_B"):
            base[prefix] = ckpt.tensor_meta(f"{prefix}coefs_B")[0][0]
            chain = ckpt.chain(prefix)
            if chain is not None:
                chains[prefix] = chain
    if ckpt.has(f"modules/{name}/private_B"):
        base["private"] = ckpt.tensor_meta(f"modules/{name}/private_B")[0][0]
    own = new_rows.prefixes[0]
    groups = left.int_column("group").tolist()
    return TaskRows(
        tasks=[*left.tasks, *new_rows.tasks],
        prefixes=[prefixes[g] if entry.grouped else prefixes[0] for g in groups] + [own],
        coefs=new_rows.coefs,
        coef_row=np.concatenate([left.int_column("coef_row"), new_rows.coef_row + base.get(own, 0)]),
        private=new_rows.private,
        private_row=np.concatenate([left.int_column("private_row"), new_rows.private_row + base.get("private", 0)]),
        chains=chains,
        base=base,
        source=ckpt,
    )
