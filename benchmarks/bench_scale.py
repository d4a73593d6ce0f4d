"""Merge time against the number of tasks, on realistic adapters: every linear layer, noise, many tasks.

Synthetic adapters shaped like a 32-layer model's all-linear LoRAs (q, k, v, o, gate, up, down:
224 modules; hidden 64, r = 4, float32, about 0.5 MB each), each a planted shared subspace of
rank 8 per module plus 10% of its own directions (`share_convert.io.synthetic`). For each count N the
whole process `share-convert merge DIR -o OUT --timings T.json` is timed (default options: the
error target) after the adapters are written and read once (page cache warm), with its phase
breakdown; the cost per (task, module) pair is the time divided by N × 224.

    python benchmarks/bench_scale.py --counts 30,100,300,1000 --work /tmp/bench-scale --out benchmarks/results/scale.json

``--layer-counts 4,8,16``: also time the largest count on the first L layers only (``--modules``),
for time against the number of modules; ``--plot P.png`` draws time against (task, module) pairs
for both sweeps (needs matplotlib: the ``plot`` extra).

``--layout 1b``: adapters shaped like a 1B model's all-linear LoRAs instead (16 layers; q, o:
2048 × 2048; k, v: 512 × 2048; gate, up: 8192 × 2048; down: 2048 × 8192; r = 16, with
``--dtype bfloat16`` 22.5 MB each), issue 12's second setting:

    python benchmarks/bench_scale.py --layout 1b --counts 64 --rank 16 --dtype bfloat16 --shared-rank 32 \
        --work /tmp/bench-1b --out benchmarks/results/scale-1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

from share_convert.io import write_synthetic_adapters  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = 32


def layout_1b() -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of a 1B Llama-like model's linear layers (16 layers)."""
    shapes = {
        "self_attn.q_proj": (2048, 2048),
        "self_attn.k_proj": (512, 2048),
        "self_attn.v_proj": (512, 2048),
        "self_attn.o_proj": (2048, 2048),
        "mlp.gate_proj": (8192, 2048),
        "mlp.up_proj": (8192, 2048),
        "mlp.down_proj": (2048, 8192),
    }
    return {f"model.layers.{i}.{m}": nd for i in range(16) for m, nd in shapes.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="30,100,300")
    p.add_argument("--work", default="/tmp/bench-scale")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--shared-rank", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layout", default="tiny", choices=["tiny", "1b"])
    p.add_argument("--out", default="benchmarks/results/scale.json")
    p.add_argument("--layer-counts", default="", help="also time the largest count on the first L layers")
    p.add_argument("--plot", default=None, help="draw time against tasks and against modules here (PNG)")
    a = p.parse_args()
    work = Path(a.work)
    counts = [int(x) for x in a.counts.split(",")]
    pool = work / "adapters"
    if not pool.exists() or len(list(pool.iterdir())) < max(counts):
        shutil.rmtree(pool, ignore_errors=True)
        write_synthetic_adapters(
            pool, count=max(counts), layers=LAYERS, targets=TARGETS, hidden=a.hidden, rank=a.rank,
            shared_rank=a.shared_rank, noise=a.noise, dtype=a.dtype,
            modules=layout_1b() if a.layout == "1b" else None,
        )  # fmt: skip
    cli = shutil.which("share-convert") or "share-convert"
    results = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "modules": len(layout_1b()) if a.layout == "1b" else LAYERS * len(TARGETS),
        "adapter": vars(a),
        "runs": [],
    }
    layer_counts = [int(x) for x in a.layer_counts.split(",") if x]
    layers_total = 16 if a.layout == "1b" else LAYERS
    sweep = [(n, None) for n in counts] + [(max(counts), L) for L in layer_counts]
    for n, L in sweep:
        folder = work / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in sorted(pool.iterdir())[:n]:
            (folder / path.name).symlink_to(path)
            for f in path.iterdir():
                f.read_bytes()  # warm the page cache: the merge is timed, not the disk
        timings = work / f"timings-{n}.json"
        out = work / f"c{n}.safetensors"
        only = [] if L is None else ["--modules", rf"layers\.({'|'.join(str(i) for i in range(L))})\."]
        load_before = os.getloadavg()[0]
        run = measure([cli, "merge", str(folder), "-o", str(out), "--force", "--timings", str(timings), *only])
        if run.returncode != 0:
            raise SystemExit(run.stderr[-2000:])
        modules = results["modules"] if L is None else results["modules"] * L // layers_total
        pairs = n * modules
        row = {
            "adapters": n,
            "modules": modules,
            "pairs": pairs,
            "wall_s": run.wall_s,
            "peak_rss_mb": run.peak_rss_mb,
            "ms_per_pair": 1000 * run.wall_s / pairs,
            "phases_s": json.loads(timings.read_text()),
            "checkpoint_bytes": out.stat().st_size,
            # the machine is shared: the 1-minute load average before and after the run
            "load_average": [load_before, os.getloadavg()[0]],
        }
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
    if a.plot:
        plot(results, a.plot)


def plot(results: dict, path: str) -> None:
    """Wall time against (task, module) pairs: one series varying the tasks, one the modules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = results["modules"]
    by_tasks = [r for r in results["runs"] if r["modules"] == full]
    by_modules = [r for r in results["runs"] if r["adapters"] == max(x["adapters"] for x in results["runs"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, runs, key, label in (
        (axes[0], by_tasks, "adapters", f"adapters (all {full} modules)"),
        (axes[1], by_modules, "modules", f"modules ({by_modules[0]['adapters']} adapters)"),
    ):
        runs = sorted(runs, key=lambda r: r[key])
        ax.plot([r[key] for r in runs], [r["wall_s"] for r in runs], "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("merge wall time (s), whole process")
        ax.grid(alpha=0.3)
    fig.suptitle("share-convert merge, default options: time against tasks and against modules")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
