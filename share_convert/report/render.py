"""Drawing reports on a terminal: a checkpoint's summary, its history, and a plan's curves, as rich tables.

The data comes from share_convert.report.summary (``merge``, ``info``, ``add``, ``remove``) and
share_convert.report.curves (``plan``); ``--json`` prints the same data instead. Long task lists are
clipped to the rows that matter most (the largest errors, the tasks just added).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .summary import STORAGE_ROLES, human_bytes

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
    columns = ("modules", "rank per module: orig → shared+private", "mean ΔW error", "worst ΔW error")
    table = _task_table(title, columns, overflow="fold")
    for t in rows:
        mark = " ≤" if t["error_is_bound"] else ""
        table.add_row(
            escape(t["task"]),
            str(t["modules"]),
            rank_cell(t),
            "zero ΔW" if t.get("zero_delta") else f"{mark}{t['mean_error']:.2%}",
            "zero ΔW" if t.get("zero_delta") else f"{mark}{t['max_error']:.2%}",
        )
    console.print(table)
    _left_out(console, hidden, "tasks")
    if any("ranks" in t and t["ranks"]["private"]["min"] != t["ranks"]["private"]["max"] for t in rows) or any(
        "ranks" in t and t["ranks"]["original"]["min"] != t["ranks"]["original"]["max"] for t in rows
    ):
        console.print("  ranks that differ between a task's modules are shown as a range, lowest–highest")
    tot = summary["totals"]
    st = tot["storage"]
    sizes = Table(title="Storage (tensor data; heads counted on both sides)", title_justify="left")
    for col in ("", "parameters", "bytes"):
        sizes.add_column(col, justify="right")
    sizes.add_row("original adapters", f"{tot['original_params']:,}", human_bytes(tot["original_bytes"]))
    sizes.add_row("checkpoint, all tensors", f"{tot['checkpoint_params']:,}", human_bytes(tot["checkpoint_bytes"]))
    for role in STORAGE_ROLES:
        if st.get(role, {}).get("params"):
            sizes.add_row(f"  {role}", f"{st[role]['params']:,}", human_bytes(st[role]["bytes"]))
    console.print(sizes)
    by_precision = tot.get("storage_by_precision") or {}
    if by_precision:
        split = ", ".join(
            f"{name} {human_bytes(e['bytes'])} ({e['bits_per_number']:.1f} bits)" for name, e in by_precision.items()
        )
        console.print(
            f"Stored numbers (bases, coefficients, private factors): {tot['bits_per_number']:.2f} bits each on average, "
            f"scales included; by precision: {split}"
        )
    console.print(
        f"Compression: [bold]{tot['ratio']:.2f}×[/bold] (shared bases counted; on disk {human_bytes(tot['checkpoint_file_bytes'])}, every file of the checkpoint)"
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
    for w in summary.get("warnings", []):
        console.print(f"[yellow]Warning: {escape(w)}[/yellow]")
    if any(t["error_is_bound"] for t in summary["tasks"]):
        console.print(
            "≤: the error is an upper bound (the task came from an earlier checkpoint, its original is gone)."
        )


def task_column(table: Table) -> None:
    """The task column: folded over lines when the table is too wide, never cut with '…', so that two
    tasks whose names share a long prefix stay distinguishable on any terminal."""
    table.add_column("task", justify="left", overflow="fold")


def _task_table(title: str, columns: Sequence[str], **style: Any) -> Table:
    """A table of tasks: the task column, then ``columns`` of figures (right-justified, with ``style``)."""
    table = Table(title=title, title_justify="left")
    task_column(table)
    for col in columns:
        table.add_column(col, justify="right", **style)
    return table


def _range(r: dict[str, float]) -> str:
    return f"{r['min']:g}" if r["min"] == r["max"] else f"{r['min']:g}–{r['max']:g}"


def rank_cell(task: dict[str, Any]) -> str:
    """'8 → 0+4–8': the original, shared and private ranks over the task's modules (a range where they differ)."""
    r = task.get("ranks")
    if r is None:  # a summary from an older version
        return f"{task['original_rank']} → {task['shared_rank']}+{task['private_rank']}"
    return f"{_range(r['original'])} → {_range(r['shared'])}+{_range(r['private'])}"


def render_history(history: list[dict[str, Any]], console: Console) -> None:
    """How each task's mean ΔW error evolved across the latest updates, and the last update's drift."""
    if len(history) < 2:
        return
    first = max(len(history) - MAX_HISTORY_COLUMNS, 0)
    shown = list(enumerate(history, 1))[first:]
    title = "History: mean ΔW error per task after each update"
    if first:
        title += f" (the last {len(shown)} of {len(history)})"
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
    table = _task_table(title, [f"#{i} {h['op']}" for i, h in shown])
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
        drift = _task_table(title, ("mean ΔW error before", "after (bound)", "mean drift", "worst drift"))
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
    far = 0
    for row in result["curves"]:
        cells = [f"{row['budget_ratio']:g}×"]
        for key in columns:
            c = row[key]
            if not c["ratio"]:
                cells.append("–")
                continue
            off = far_from_budget(c["ratio"], row["budget_ratio"])
            far += off
            cells.append(f"{c['mean_error']:.1%} @ {c['ratio']:.2f}×{'*' if off else ''}")
        table.add_row(*cells)
    console.print(table)
    console.print(
        "Each cell: mean ΔW error @ the compression that rule actually reaches within the budget of its row "
        "(original / stored LoRA parameters, shared bases counted, heads on both sides). Ranks are whole "
        "numbers, so a rule stops at the nearest storage it can reach; – : it cannot reach that budget."
    )
    if far:
        console.print(
            f"*: {far} cells land more than {FAR_FROM_BUDGET:.0%} away from their budget (for example 'no sharing, "
            "equal ranks' must drop one direction from every task at once), so compare rules by their reached "
            "compression, not by the row."
        )
    render_precision_curves(result, console)
    dp = result["default_plan"]
    same = dp["at_same_storage"]
    console.print(
        f"Default plan ({dp['rule']}): {dp['ratio']:.2f}× with {dp['mean_error']:.1%} mean ΔW error (the ratio "
        f"merge reports for these options); at its parameters ({dp.get('ratio_params', dp['ratio']):.2f}× fewer) "
        f"pure sharing gives {same['shared']:.1%} and no sharing (equal ranks) {same['private']:.1%}."
    )
    if dp.get("modules_by_precision"):
        chosen = ", ".join(f"{n} modules {p}" for p, n in sorted(dp["modules_by_precision"].items()))
        console.print(f"  stored as --precision chooses: {chosen}.")
    console.print(result["verdict"])
    for w in result.get("warnings", []):
        console.print(f"[yellow]Warning: {escape(w)}[/yellow]")


def render_precision_curves(result: dict[str, Any], console: Console) -> None:
    """``plan``'s second axis: per way of storing the factors, bytes against error at each target."""
    curves = result.get("precision_curves") or {}
    if not curves:
        return
    targets = sorted({p["target_error"] for points in curves.values() for p in points})
    table = Table(title="Storage precision: compression in bytes at each mean ΔW error target", title_justify="left")
    table.add_column("target", justify="right")
    for name in curves:
        table.add_column(name, justify="right")
    for eps in targets:
        cells = [f"{eps:.1%}"]
        for points in curves.values():
            point = next((p for p in points if p["target_error"] == eps), None)
            ok = point is not None and point["ratio"]
            cells.append(f"{point['ratio']:.2f}× ({point['mean_error']:.1%})" if ok else "–")
        table.add_row(*cells)
    console.print(table)
    console.print(
        "Each cell: original / stored bytes (scales included) of the least-bytes plan whose predicted error "
        "(structure plus rounding) meets the row's target, and that error; – : out of that precision's reach."
    )


#: A plan cell whose reached compression is this far (relative) from its row's budget is marked.
FAR_FROM_BUDGET = 0.25


def far_from_budget(reached: float, budget: float) -> bool:
    """Whether a rule landed far from the budget it was given (either side)."""
    return abs(reached / budget - 1) > FAR_FROM_BUDGET
