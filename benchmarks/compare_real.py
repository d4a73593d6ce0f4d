"""Fidelity on real, independently trained adapters (issue: make consolidation worth it).

For each collection: the default merge, and at the same storage pure sharing (paper: weighted by
‖ΔW‖; and with equal task weights — "weighting alone"), independent truncation (equal ranks and
allocated ranks), the planner's mix, and vLoRA where it can read the adapters.

    python benchmarks/compare_real.py --real ../shared/data/real-adapters --vlora /tmp/vlora/bin/vlora \\
        --out benchmarks/results/real.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from share_convert import api
from share_convert.api import open_inputs
from share_convert.engine import ConsolidationConfig, only_modules
from share_convert.report import plan_collection

HERE = Path(__file__).parent


def vlora_run(vlora: str, folders: list[Path], modules: str | None) -> dict | None:
    # vLoRA reads only adapter_model.safetensors and needs one rank for all: keep the largest such subset
    readable = [f for f in folders if (f / "adapter_model.safetensors").is_file()]
    ranks = {f: json.loads((f / "adapter_config.json").read_text()).get("r") for f in readable}
    common = max(set(ranks.values()), key=lambda r: sum(v == r for v in ranks.values()), default=None)
    usable = [f for f in readable if ranks[f] == common]
    if len(usable) < 2:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "v"
        proc = subprocess.run([vlora, "compress", *map(str, usable), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            return {
                "error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed",
                "adapters": len(usable),
            }
        links = Path(tmp) / "adapters"
        links.mkdir()
        for f in usable:
            (links / f.name).symlink_to(f.resolve())
        py = str(Path(vlora).with_name("python"))
        errs = json.loads(
            subprocess.run(
                [py, str(HERE / "vlora_error.py"), str(out), str(links)], capture_output=True, text=True, check=True
            ).stdout
        )
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        return {
            "adapters": len(usable),
            "skipped": [f.name for f in folders if f not in usable],
            "mean_error": sum(errs.values()) / len(errs),
            "stored_bytes": size,
            "note": "error over all of each adapter's modules" + (f" (not only {modules})" if modules else ""),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", default=str(HERE.parent.parent / "shared" / "data" / "real-adapters"))
    p.add_argument("--vlora", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    real = Path(a.real)
    collections = {
        "gpt2-c_attn (5 adapters)": ([real / "gpt2-c_attn"], None),
        "c_attn of all nine GPT-2 adapters": ([real / "gpt2-c_attn", real / "gpt2-c_attn+c_proj"], "attn\\.c_attn"),
    }
    results = {}
    for name, (groups, modules) in collections.items():
        sources = only_modules(open_inputs([str(g) for g in groups]), modules)
        curves = plan_collection(sources, ConsolidationConfig())
        with tempfile.TemporaryDirectory() as tmp:
            summary = api.merge([str(g) for g in groups], Path(tmp) / "c.safetensors", modules=modules)
        folders = sorted(f for g in groups for f in g.iterdir() if f.is_dir())
        results[name] = {
            "default_merge": {
                "ratio": summary["totals"]["ratio"],
                "mean_error": summary["totals"]["mean_error"],
                "modules_by_kind": summary["plan"]["modules_by_kind"],
                "why": summary["plan"].get("why"),
                "verdict": summary["plan"]["verdict"],
            },
            "plan_default": curves["default_plan"],
            "curves": curves["curves"],
            "collection_verdict": curves["verdict"],
            "vlora": vlora_run(a.vlora, folders, modules) if a.vlora and shutil.which(a.vlora) else None,
        }
        print(name, json.dumps(results[name]["default_merge"]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
