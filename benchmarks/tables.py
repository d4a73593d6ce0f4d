"""Render the benchmark results (JSON in benchmarks/results/) as the Markdown tables of RESULTS.md.

python benchmarks/tables.py > /tmp/tables.md
"""

from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).parent / "results"


def mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"


def merge_table(path: Path) -> str:
    d = json.loads(path.read_text())
    out = [
        "| adapters | input | read once | share-convert: time | peak RSS | ΔW error | stored | vLoRA: time | peak RSS | ΔW error | stored | speed-up | share-convert at vLoRA's size: ΔW error (stored) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in d["rows"]:
        sc, v, eq = r["share_convert"], r.get("vlora"), r.get("share_convert_at_vlora_size")
        cells = [
            str(r["adapters"]),
            mb(r["input_bytes"]),
            f"{r['read_once']['wall_s']:.1f} s",
            f"{sc['wall_s']:.1f} s",
            f"{sc['peak_rss_mb'] / 1024:.2f} GB",
            f"{sc['mean_error']:.2%}",
            mb(sc["stored_bytes"]),
        ]
        if v:
            cells += [
                f"{v['wall_s']:.1f} s",
                f"{v['peak_rss_mb'] / 1024:.2f} GB",
                f"{v['mean_error']:.2%}",
                mb(v["stored_bytes"]),
                f"{v['wall_s'] / sc['wall_s']:.1f}×",
                f"{eq['mean_error']:.2%} ({mb(eq['stored_bytes'])})",
            ]
        else:
            cells += ["–"] * 6
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def timing_table(path: Path) -> str:
    d = json.loads(path.read_text())
    out = [
        "| adapters | wall | read | canonicalize | decompose + plan | encode + errors | write | (phases: seconds summed over worker threads) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in d["rows"]:
        t = r["share_convert"]["timings"]
        out.append(
            f"| {r['adapters']} | {r['share_convert']['wall_s']:.1f} s | "
            + " | ".join(f"{t[k]:.1f} s" for k in ("read", "canonicalize", "decompose", "encode", "write"))
            + " | |"
        )
    return "\n".join(out)


def add_table(path: Path) -> str:
    d = json.loads(path.read_text())
    startup = d.get("startup_s")
    out = [
        "| old tasks | checkpoint | add one adapter: best of runs | all runs | best minus CLI start-up | peak RSS | library call alone (best) |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in d["rows"]:
        net = f"{r['wall_s_best'] - startup:.2f} s" if startup is not None else "–"
        out.append(
            f"| {r['old_tasks']} | {mb(r['checkpoint_bytes'])} | {r['wall_s_best']:.2f} s | "
            f"{', '.join(f'{x:.2f}' for x in r['wall_s_all'])} | {net} | {r['peak_rss_mb'] / 1024:.2f} GB | "
            + (f"{r['library_add_s_best']:.2f} s |" if "library_add_s_best" in r else "– |")
        )
    if startup is not None:
        out.append(f"\nCLI start-up alone (`share-convert --help`, best of runs, same run): {startup:.2f} s.")
    return "\n".join(out)


def gpu_table(path: Path) -> str:
    d = json.loads(path.read_text())
    m = d["machine"]
    basis = next(k for k in d if k.startswith("basis_") and k.endswith("_cpu_s"))
    shape = basis[len("basis_") : -len("_cpu_s")]
    out = [
        f"{m['gpu']}, {m['cpus']} CPU cores, torch {m['torch']}; {d['setting']['count']} adapters.\n",
        "| | CPU | CUDA | CPU ÷ CUDA |",
        "|---|---:|---:|---:|",
        f"| randomized basis of one {shape.replace('x', ' × ').replace('_k', ', k = ')} stack, in-process, best of 3 | "
        f"{d[basis]:.3f} s | {d[basis.replace('_cpu_', '_cuda_')]:.3f} s | "
        f"{d[basis] / d[basis.replace('_cpu_', '_cuda_')]:.1f}× |",
    ]
    cpu, gpu = d["merge_cpu"], d["merge_cuda"]
    out.append(
        f"| whole-process `merge` | {cpu['wall_s']:.1f} s | {gpu['wall_s']:.1f} s | {cpu['wall_s'] / gpu['wall_s']:.2f}× |"
    )
    out.append(f"| peak RSS (host) | {cpu['peak_rss_mb'] / 1024:.2f} GB | {gpu['peak_rss_mb'] / 1024:.2f} GB | |")
    out.append(f"| mean ΔW error | {cpu['mean_error']:.4%} | {gpu['mean_error']:.4%} | |")
    out.append(f"| stored | {mb(cpu['bytes'])} | {mb(gpu['bytes'])} | |")
    if "timings" in cpu and "timings" in gpu:
        for phase in ("read", "canonicalize", "decompose", "encode", "write"):
            c, g = cpu["timings"][phase], gpu["timings"][phase]
            out.append(f"| phase: {phase} (summed over worker threads) | {c:.1f} s | {g:.1f} s | |")
    return "\n".join(out)


def real_table(path: Path) -> str:
    d = json.loads(path.read_text())
    parts = []
    for name, r in d.items():
        dp = r["plan_default"]
        parts.append(
            f"**{name}** — default merge: {dp['ratio']:.2f}× with {dp['mean_error']:.1%} mean ΔW error "
            f"(modules: {dp['modules_by_kind']}). At the same storage: pure sharing {dp['at_same_storage']['shared']:.1%}, "
            f"independent truncation (equal ranks) {dp['at_same_storage']['private']:.1%}.\n"
        )
        parts.append(
            "| budget | pure sharing, paper (weighted by ‖ΔW‖) | weighting alone (equal weights) | no sharing, equal ranks | no sharing, allocated ranks | shared + private (planner) | with groups |"
        )
        parts.append("|---:|---:|---:|---:|---:|---:|---:|")
        for row in r["curves"]:
            cells = [f"{row['budget_ratio']:g}×"]
            for s in ("shared_unweighted", "shared", "private", "private_allocated", "mixed", "groups"):
                c = row[s]
                cells.append(f"{c['mean_error']:.1%} @ {c['ratio']:.2f}×" if c["ratio"] else "–")
            parts.append("| " + " | ".join(cells) + " |")
        v = r.get("vlora")
        if v and "mean_error" in v:
            parts.append(
                f"\nvLoRA (`vlora compress`, defaults) on the {v['adapters']} adapters it can read (it needs "
                f"adapter_model.safetensors and one rank for all; skipped: {', '.join(v.get('skipped', [])) or 'none'}): "
                f"{v['mean_error']:.1%} mean ΔW error, {mb(v['stored_bytes'])} stored ({v['note']})."
            )
        elif v:
            parts.append(f"\nvLoRA: did not run ({v.get('error')}).")
        parts.append(f"\nVerdict printed by `share-convert plan`: {r['collection_verdict']}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    for name, fn in (
        ("merge-fp32.json", merge_table),
        ("merge-500-bf16.json", merge_table),
        ("add.json", add_table),
        ("gpu-64.json", gpu_table),
        ("gpu-256.json", gpu_table),
        ("gpu-256-phases.json", gpu_table),
        ("real.json", real_table),
    ):
        p = RES / name
        if p.exists():
            print(f"### {name}\n\n{fn(p)}\n")
            if name.startswith("merge"):
                print(timing_table(p) + "\n")
