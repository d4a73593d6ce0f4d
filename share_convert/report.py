"""Reports: what a checkpoint holds, how faithful it is, and what it saves (spec, section 4).

:func:`summarize` turns a checkpoint into plain data (the ``--json`` output); :func:`render`
draws that data as rich tables. ``merge`` and ``info`` use the same two functions, so they
always show the same figures.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .checkpoint import Checkpoint
from .consolidation import ConsolidationConfig, task_errors
from .formats import itemsize


def storage_breakdown(ckpt: Checkpoint) -> dict[str, dict[str, int]]:
    """Parameters and bytes of the checkpoint's tensors by role, from the file's header."""
    parts = {k: {"params": 0, "bytes": 0} for k in ("bases", "grams", "coefficients", "private", "heads")}
    for name in ckpt.manifest.get("tensors", {}):
        shape, dtype = ckpt.tensor_meta(name)
        numel = math.prod(shape)
        nbytes = numel * itemsize(dtype)
        if name.startswith("modules/"):
            role = "grams" if name.endswith(("gram_B", "gram_A")) else "bases"
        elif "/heads/" in name:
            role = "heads"
        elif name.endswith(("private_B", "private_A")):
            role = "private"
        else:
            role = "coefficients"
        parts[role]["params"] += numel
        parts[role]["bytes"] += nbytes
    return parts


def summarize(ckpt: Checkpoint) -> dict[str, Any]:
    """Everything ``info`` shows, as JSON-ready data."""
    modules = ckpt.modules
    tasks = []
    for name, rec in ckpt.tasks.items():
        errs = task_errors(modules, name)
        tmods = [m for m in modules.values() if name in m["tasks"]]
        tasks.append(
            {
                "task": name,
                "source": rec.get("source"),
                "format": rec.get("format", "peft"),  # peft, kohya or diffusers (share_convert/t2i.py)
                "modules": len(tmods),
                "mean_error": errs["mean"],
                "max_error": errs["max"],
                "error_is_bound": any(m["tasks"][name].get("bound") for m in tmods),
                "original_rank": max((m["tasks"][name]["original_rank"] for m in tmods), default=0),
                "shared_rank": max((m["tasks"][name]["rank"] for m in tmods), default=0),
                "private_rank": max((m["tasks"][name]["private_rank"] for m in tmods), default=0),
                "original_params": rec.get("original_params", 0),
                "original_bytes": rec.get("original_bytes", 0),
                "alpha_assumed": rec.get("alpha_assumed"),
            }
        )
    parts = storage_breakdown(ckpt)
    ckpt_params = sum(p["params"] for p in parts.values())
    ckpt_bytes = sum(p["bytes"] for p in parts.values())
    orig_params = sum(t["original_params"] for t in tasks)
    orig_bytes = sum(t["original_bytes"] for t in tasks)
    head_bytes = parts["heads"]["bytes"]
    per_task_bytes = parts["coefficients"]["bytes"] + parts["private"]["bytes"]
    kinds = {"shared": 0, "mixed": 0, "private": 0}
    for m in modules.values():
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
    all_errs = [t["mean_error"] for t in tasks]
    totals = {
        "tasks": len(tasks),
        "modules": len(modules),
        "original_params": orig_params,
        "original_bytes": orig_bytes,
        "checkpoint_params": ckpt_params,
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_file_bytes": ckpt.path.stat().st_size,
        "ratio": orig_bytes / ckpt_bytes if ckpt_bytes else math.inf,
        "ratio_excluding_shared_bases": (orig_bytes - head_bytes) / per_task_bytes if per_task_bytes else None,
        "mean_error": sum(all_errs) / len(all_errs) if all_errs else 0.0,
        "max_error": max((t["max_error"] for t in tasks), default=0.0),
        "storage": parts,
    }
    try:
        describe = ConsolidationConfig(**ckpt.config).describe()
    except TypeError:
        describe = str(ckpt.config)
    return {
        "checkpoint": str(ckpt.path),
        "format_version": ckpt.manifest["format_version"],
        "plan": {"rule": describe, "modules_by_kind": kinds, "verdict": verdict(kinds, totals), **why(modules)},
        "config": ckpt.config,
        "tasks": tasks,
        "totals": totals,
        "modules": {
            name: {
                "k_B": m["k_B"],
                "k_A": m["k_A"],
                "kind": m["kind"],
                "private_rank_total": sum(t["private_rank"] for t in m["tasks"].values()),
            }
            for name, m in modules.items()
        },
        "history": ckpt.history,
    }


def why(modules: dict[str, Any]) -> dict[str, Any]:
    """What the plan cost against the two extremes that meet the same target, summed over modules."""
    alts = [m.get("alternatives") for m in modules.values()]
    if not alts or any(a is None for a in alts):
        return {}
    chosen = sum(m.get("params", 0) for m in modules.values())
    shared_missing = sum(a["shared"] is None for a in alts)
    shared = None if shared_missing else sum(a["shared"] for a in alts)
    private = None if any(a["private"] is None for a in alts) else sum(a["private"] for a in alts)
    parts = [f"the cheapest representation meeting the target was chosen per module: {chosen:,} LoRA parameters in all"]
    parts.append(
        f"pure sharing would need {shared:,}"
        if shared is not None
        else f"pure sharing cannot meet the target in {shared_missing} modules"
    )
    if private is not None:
        parts.append(f"independent truncation {private:,}")
    relaxed = sum(bool(m.get("target_relaxed")) for m in modules.values())
    if relaxed:
        parts.append(
            f"in {relaxed} modules the errors the tasks brought from earlier checkpoints already exceed the "
            "target, so there it held the error this step adds"
        )
    return {
        "chosen_params": chosen,
        "pure_sharing_params": shared,
        "no_sharing_params": private,
        "modules_target_relaxed": relaxed,
        "why": "; ".join(parts) + ".",
    }


def verdict(kinds: dict[str, int], totals: dict[str, Any]) -> str:
    """One sentence: do these adapters share enough structure for consolidation to pay off?"""
    n = sum(kinds.values()) or 1
    sharing = kinds["shared"] + kinds["mixed"]
    ratio = totals["ratio"]
    size = f"{ratio:.2f}× smaller" if ratio >= 1 else f"{1 / ratio:.2f}× larger than the original adapters"
    if sharing == 0:
        return (
            f"These adapters share little: at this setting no module is worth a shared basis, so every module keeps "
            f"each task's own top directions (independent truncation): {size}, by truncation alone."
        )
    if sharing < n / 2:
        return (
            f"These adapters share some structure: {sharing} of {n} modules use a shared basis and the rest are "
            f"cheaper as independent truncations; overall {size}."
        )
    return (
        f"These adapters share structure: {sharing} of {n} modules use a shared basis "
        f"({kinds['mixed']} with private corrections); overall {size}."
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


#: Terminal tables show at most this many task rows (the ones that matter most); ``--json`` has all.
MAX_ROWS = 30
#: The history table shows at most this many updates as columns (the latest); ``--json`` has all.
MAX_HISTORY_COLUMNS = 6


def _clip(items: list, importance, keep: set[str], name) -> tuple[list, int]:
    """At most MAX_ROWS items: those in ``keep`` (the tasks just added) first, then the most
    important; shown in their original order. Returns the rows shown and how many were left out."""
    if len(items) <= MAX_ROWS:
        return items, 0
    order = sorted(range(len(items)), key=lambda i: (name(items[i]) not in keep, -importance(items[i])))
    shown = sorted(order[:MAX_ROWS])
    return [items[i] for i in shown], len(items) - len(shown)


def _just_added(history: list[dict[str, Any]]) -> set[str]:
    """The tasks the last update added (always shown); none after a merge, where every task is new."""
    return set(history[-1].get("tasks_added", [])) if history and history[-1].get("op") == "add" else set()


def _left_out(console: Console, count: int, what: str) -> None:
    if count:
        console.print(f"  … and {count} more {what} (every row: --json)")


def render(summary: dict[str, Any], console: Console) -> None:
    """Draw a summary as tables (long task lists clipped to the rows that matter most)."""
    history = summary.get("history") or []
    added = _just_added(history)
    rows, hidden = _clip(summary["tasks"], lambda t: t["mean_error"], added, lambda t: t["task"])
    title = f"Share checkpoint {escape(summary['checkpoint'])}"
    if hidden:
        title += f": the {len(rows)} tasks with the largest errors or just added, of {len(summary['tasks'])}"
    table = Table(title=title, title_justify="left")
    for col in ("task", "modules", "rank (orig → shared+private)", "mean ΔW error", "worst ΔW error"):
        table.add_column(col, justify="left" if col == "task" else "right", overflow="fold")
    for t in rows:
        mark = " ≤" if t["error_is_bound"] else ""
        table.add_row(
            escape(t["task"]),
            str(t["modules"]),
            f"{t['original_rank']} → {t['shared_rank']}+{t['private_rank']}",
            f"{mark}{t['mean_error']:.2%}",
            f"{mark}{t['max_error']:.2%}",
        )
    console.print(table)
    _left_out(console, hidden, "tasks")
    tot = summary["totals"]
    st = tot["storage"]
    sizes = Table(title="Storage (tensor data; heads counted on both sides)", title_justify="left")
    for col in ("", "parameters", "bytes"):
        sizes.add_column(col, justify="right")
    sizes.add_row("original adapters", f"{tot['original_params']:,}", human_bytes(tot["original_bytes"]))
    sizes.add_row("checkpoint, all tensors", f"{tot['checkpoint_params']:,}", human_bytes(tot["checkpoint_bytes"]))
    for role in ("bases", "grams", "coefficients", "private", "heads"):
        if st[role]["params"]:
            sizes.add_row(f"  {role}", f"{st[role]['params']:,}", human_bytes(st[role]["bytes"]))
    console.print(sizes)
    console.print(
        f"Compression: [bold]{tot['ratio']:.2f}×[/bold] (shared bases counted; file {human_bytes(tot['checkpoint_file_bytes'])})"
    )
    if tot["ratio_excluding_shared_bases"]:
        console.print(
            f"  per-task data only, excluding shared bases and heads: {tot['ratio_excluding_shared_bases']:.1f}×"
        )
    kinds = summary["plan"]["modules_by_kind"]
    console.print(
        f"Plan: {summary['plan']['rule']}; modules: {kinds['shared']} shared, {kinds['mixed']} shared + private, "
        f"{kinds['private']} private only"
    )
    console.print(
        f"Mean ΔW error {tot['mean_error']:.2%} (per task the mean over its modules, then the mean over tasks); "
        f"worst single task and module {tot['max_error']:.2%}."
    )
    if summary["plan"].get("why"):
        console.print("Why: " + summary["plan"]["why"])
    console.print(summary["plan"]["verdict"])
    render_history(summary["history"], console)
    assumed = [t for t in summary["tasks"] if t.get("alpha_assumed") is not None]
    for t in assumed:
        console.print(
            f"[yellow]Assumed lora_alpha={t['alpha_assumed']:g} for {t['task']} (no config beside its weights).[/yellow]"
        )
    if any(t["error_is_bound"] for t in summary["tasks"]):
        console.print(
            "≤: the error is an upper bound (the task came from an earlier checkpoint, its original is gone)."
        )


def render_history(history: list[dict[str, Any]], console: Console) -> None:
    """How each task's mean ΔW error evolved across the latest updates, and the last update's drift."""
    if len(history) < 2:
        return
    first = max(len(history) - MAX_HISTORY_COLUMNS, 0)
    shown = list(enumerate(history, 1))[first:]
    title = "History: mean ΔW error per task after each update"
    if first:
        title += f" (the last {len(shown)} of {len(history)})"
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    for i, h in shown:
        table.add_column(f"#{i} {h['op']}", justify="right")
    tasks: list[str] = []
    seen: set[str] = set()
    for _, h in shown:
        for t in h.get("errors", {}):
            if t not in seen:
                seen.add(t)
                tasks.append(t)
    last = history[-1]
    latest = lambda t: max((h.get("errors", {}).get(t, {}).get("mean", 0.0) for _, h in shown), default=0.0)  # noqa: E731
    rows, hidden = _clip(tasks, latest, _just_added(history), lambda t: t)
    for t in rows:
        row = [escape(t)]
        for _, h in shown:
            e = h.get("errors", {}).get(t)
            row.append("" if e is None else f"{e['mean']:.2%}")
        table.add_row(*row)
    console.print(table)
    _left_out(console, hidden, "tasks")
    if last.get("drift"):
        items = list(last["drift"].items())
        rows, hidden = _clip(items, lambda x: x[1]["max"], set(), lambda x: x[0])
        title = f"Last update ({last['op']}): old tasks before → after"
        if hidden:
            title += f", the {len(rows)} with the largest drift of {len(items)}"
        drift = Table(title=title, title_justify="left")
        for col in ("task", "mean ΔW error before", "after (bound)", "mean drift", "worst drift"):
            drift.add_column(col, justify="left" if col == "task" else "right")
        for t, d in rows:
            before = last.get("errors_before", {}).get(t, {}).get("mean")
            after = last.get("errors", {}).get(t, {}).get("mean")
            drift.add_row(
                escape(t),
                "" if before is None else f"{before:.2%}",
                "" if after is None else f"≤{after:.2%}",
                f"{d['mean']:.2%}",
                f"{d['max']:.2%}",
            )
        console.print(drift)
        _left_out(console, hidden, "old tasks")
        worst = max(d["max"] for _, d in items)
        mean = sum(d["mean"] for _, d in items) / len(items)
        console.print(
            f"Drift over all {len(items)} old tasks (‖ΔŴ_before − ΔŴ_after‖ / ‖ΔW‖): {mean:.2%} on average "
            f"(per task the mean over its modules, then the mean over tasks); worst single task and module {worst:.2%}."
        )


def render_plan(result: dict[str, Any], console: Console) -> None:
    """Draw the result of ``plan``: error against compression for each rule, the default plan, the verdict."""
    table = Table(
        title=f"{result['tasks']} adapters, {result['modules']} modules: mean ΔW error at each budget",
        title_justify="left",
    )
    table.add_column("budget", justify="right")
    columns = {
        "shared_unweighted": "pure sharing (paper)",
        "shared": "pure sharing, equal weights",
        "private": "no sharing, equal ranks",
        "private_allocated": "no sharing, allocated",
        "mixed": "shared + private (planner)",
        "groups": "with groups",
    }
    for title in columns.values():
        table.add_column(title, justify="right")
    for row in result["curves"]:
        cells = [f"{row['budget_ratio']:g}×"]
        for key in columns:
            c = row[key]
            cells.append(f"{c['mean_error']:.1%} @ {c['ratio']:.2f}×" if c["ratio"] else "–")
        table.add_row(*cells)
    console.print(table)
    dp = result["default_plan"]
    same = dp["at_same_storage"]
    console.print(
        f"Default plan ({dp['rule']}): {dp['ratio']:.2f}× with {dp['mean_error']:.1%} mean ΔW error; at the same "
        f"storage pure sharing gives {same['shared']:.1%} and no sharing (equal ranks) {same['private']:.1%}."
    )
    console.print(result["verdict"])
