"""Markdown tables of a benchmarks/bench_precision.py result, for benchmarks/RESULTS.md.

python benchmarks/precision_tables.py benchmarks/results/precision-baseline.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def side_label(result: dict, side: str) -> str:
    m = result["meta"][side]
    options = " ".join(m["merge_args"])
    return f"{side} ({(m.get('commit') or '?')[:7]}{', ' + options if options else ''})"


def gpt2_table(result: dict) -> list[str]:
    g = result["gpt2"]
    out = [
        "| code | merge wall | ratio (info) | ratio, all but heads | ratio, factors only | bits per LoRA param "
        "| mean ΔW error: info / recomputed | worst module: info / recomputed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in g["sides"].items():
        if "sizes" not in r:
            out.append(f"| {side_label(result, side)} | failed: {r.get('error')} | | | | | | |")
            continue
        t, s, e = r["info"]["totals"], r["sizes"], r["recomputed"]
        out.append(
            f"| {side_label(result, side)} | {r['merge_wall_s']:.1f} s | {t['ratio']:.2f}× | {s['ratio']:.2f}× "
            f"| {s['ratio_factors_only']:.2f}× | {s['bits_per_lora_param']:.2f} "
            f"| {pct(t['mean_error'])} / {pct(e['mean_error'])} | {pct(t['max_error'])} / {pct(e['max_error'])} |"
        )
    return out


def cls_tables(result: dict) -> list[str]:
    c = result["cls"]
    out = [
        "| rule | code | ratio, all but heads | bits per LoRA param (factors only) | mean ΔW error | worst task's "
        "agreement | mean agreement |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for config, spec in c["configs"].items():
        for side, r in spec["sides"].items():
            rule = f"{config} (`{spec['options']}`)" if spec["options"] else config
            if "sizes" not in r:
                out.append(f"| {rule} | {side_label(result, side)} | failed: {r.get('error')} | | | | |")
                continue
            s = r["sizes"]
            worst = min(r["per_task"], key=lambda n: r["per_task"][n]["agreement"])
            out.append(
                f"| {rule} | {side_label(result, side)} | {s['ratio']:.2f}× | {s['bits_per_lora_param']:.2f} "
                f"({s['bits_per_lora_param_factors_only']:.2f}) | {pct(r['recomputed']['mean_error'])} "
                f"| {pct(r['min_agreement'])} ({worst}) | {pct(r['mean_agreement'])} |"
            )
    sides = [s for s in ("before", "after") if s in result["meta"]]
    configs = list(c["configs"])
    head = " | ".join(f"{cfg} {s}" for cfg in configs for s in sides)
    out += [
        "",
        "Agreement with the original adapter's held-out predictions, per task (accuracy of the original "
        "in the second column):",
        "",
        f"| task | held-out words | original accuracy | {head} |",
        "|---|---:|---:|" + "---:|" * (len(configs) * len(sides)),
    ]
    for task, t in c["tasks"].items():
        cells = []
        for cfg in configs:
            for s in sides:
                p = c["configs"][cfg]["sides"][s].get("per_task", {}).get(task)
                cells.append(f"{100 * p['agreement']:.1f}%" if p else "–")
        out.append(f"| {task} | {t['held_out']} | {100 * t['accuracy']:.1f}% | {' | '.join(cells)} |")
    return out


def time_table(result: dict) -> list[str]:
    out = [
        "| set | before: wall per round | after: wall per round | median before | median after | after / before "
        "| peak RSS before / after |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, s in result["time"]["sets"].items():
        runs = {side: [r for r in s["runs"] if r["side"] == side] for side in ("before", "after")}
        walls = {k: ", ".join(f"{r['wall_s']:.1f} s" for r in v) for k, v in runs.items()}
        rss = {k: max((r["peak_rss_mb"] for r in v), default=0) for k, v in runs.items()}
        med = s.get("median_wall_s", {})
        ratio = f"{s['ratio_after_over_before']:.2f}×" if "ratio_after_over_before" in s else "–"
        p = s["params"]
        modules = p.get("module_count") or p.get("modules") or 2 * p["layers"]
        out.append(
            f"| {name} ({s['params'].get('dtype')}, {result['time']['count']} adapters × {modules} modules) "
            f"| {walls['before']} "
            f"| {walls['after']} | {med.get('before', 0):.1f} s | {med.get('after', 0):.1f} s | {ratio} "
            f"| {rss['before']} / {rss['after']} MB |"
        )
    return out


def render(result: dict) -> str:
    parts = []
    if "gpt2" in result:
        parts += ["**GPT-2, the nine real adapters, default target**", "", *gpt2_table(result), ""]
    if "cls" in result:
        parts += ["**Classification adapters trained here (seven tasks)**", "", *cls_tables(result), ""]
    if "time" in result:
        parts += ["**Merge time, whole process**", "", *time_table(result), ""]
    parts += ["Targets (after side):", "", *[f"- {v}" for v in result.get("verdicts", [])]]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))
