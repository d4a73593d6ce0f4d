"""Precision as a second axis of the plan (issue 24), side by side with the code before, in one run.

For each set of adapters, the whole process ``share-convert merge INPUTS -o OUT`` (default options)
is run with the code before (``--before``: a folder holding that code's ``share_convert`` package,
e.g. ``git archive 8fa6687 share_convert | tar -x -C /tmp/before``) and with this checkout's code
(the default, ``--precision auto``, and ``--precision float``), the runs of one set interleaved
(``--repeats`` rounds: before, auto, float, before, …) so that a machine shared with other work
slows them alike; each is timed as a whole process (benchmarks/measure.py) and its checkpoint read
back by this checkout's ``info --json``: compression in bytes (every tensor of the checkpoint, against
the originals' bytes), mean and worst ΔW error, bits per stored number, and bytes by precision.

Sets: ``gpt2`` (the nine real GPT-2 adapters: gpt2-c_attn and gpt2-c_attn+c_proj), ``7b-noisy``
(16 noisy 7B-shaped q/v LoRAs, 2 layers, hidden 4096, r 16, planted shared rank 48, noise 0.05) and
``1b`` (16 adapters shaped like a 1B model's all-linear LoRAs, 2 layers, bfloat16), the last two as
benchmarks/identity.py generates them.

    python benchmarks/bench_precision_sets.py --before /tmp/before --real ../shared/data/real-adapters \\
        --work /tmp/bench-precision --out benchmarks/results/precision-sets.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from identity_inputs import llama_modules, write_peft  # noqa: E402
from measure import measure  # noqa: E402

HERE = Path(__file__).resolve().parent.parent


def make_inputs(name: str, work: Path, real: Path) -> list[str]:
    """The inputs of one set (generated once into ``work``)."""
    if name == "gpt2":
        return [str(real / "gpt2-c_attn"), str(real / "gpt2-c_attn+c_proj")]
    folder = work / "inputs" / name
    if not folder.exists():
        if name == "7b-noisy":
            modules = llama_modules(2, hidden=4096, kv=4096, inter=0, targets=("q_proj", "v_proj"))
            write_peft(folder, modules, count=16, rank=16, shared_rank=48, noise=0.05, seed=41)
        else:
            modules = llama_modules(2, hidden=2048, kv=512, inter=8192, targets=TINY_TARGETS)
            write_peft(folder, modules, count=16, rank=16, shared_rank=32, noise=0.05, seed=31, dtype="bfloat16")
    return [str(folder)]


TINY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_merge(code: Path, inputs: list[str], out: Path, extra: list[str]) -> dict:
    """One whole-process merge by the code in ``code`` (a folder holding ``share_convert``)."""
    env = {**os.environ, "PYTHONPATH": str(code), "CUDA_VISIBLE_DEVICES": ""}
    argv = [sys.executable, "-m", "share_convert.cli", "merge", *inputs, "-o", str(out), "--force", *extra]
    m = measure(argv, env=env)
    if m.returncode != 0:
        raise SystemExit(f"merge failed ({code}, {extra}): exit {m.returncode}: {m.stderr[-2000:]}")
    return {"wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb}


def read_back(out: Path) -> dict:
    """What this checkout's ``info --json`` says of a checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", "info", str(out), "--json"], env=env, capture_output=True, text=True
    )
    totals = json.loads(proc.stdout)["totals"]
    return {
        "ratio_bytes": totals["ratio"],
        "checkpoint_bytes": totals["checkpoint_bytes"],
        "mean_error": totals["mean_error"],
        "max_error": totals["max_error"],
        "bits_per_number": totals.get("bits_per_number"),
        "storage_by_precision": totals.get("storage_by_precision"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="folder holding the code before (share_convert/)")
    ap.add_argument("--real", type=Path, default=HERE.parent / "shared" / "data" / "real-adapters")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sets", default="gpt2,7b-noisy,1b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.work, args.out = args.work.resolve(), args.out.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    # each merge runs in the work folder: ``python -m`` puts the current folder first on sys.path, and
    # the code under test must be the one PYTHONPATH names (not this checkout's, for --before)
    os.chdir(args.work)
    runs = {"before": (args.before, []), "auto": (HERE, []), "float": (HERE, ["--precision", "float"])}
    results: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "sets": {}}
    for name in args.sets.split(","):
        inputs = make_inputs(name, args.work, args.real)
        walls: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for label, (code, extra) in runs.items():
                walls[label].append(run_merge(code, inputs, args.work / f"{name}-{label}.safetensors", extra)["wall_s"])
        entry = {}
        for label in runs:
            entry[label] = {"wall_s": walls[label], "median_wall_s": statistics.median(walls[label])}
            entry[label].update(read_back(args.work / f"{name}-{label}.safetensors"))
        entry["time_ratio_auto_vs_before"] = entry["auto"]["median_wall_s"] / entry["before"]["median_wall_s"]
        results["sets"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
