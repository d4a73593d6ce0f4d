"""Issue 26's targets for the bases, side by side in one run (whole processes, `measure.py`).

- ``noisy``: 64 noisy 7B-shaped q/v adapters (32 layers, hidden 4096, r 16, planted shared rank
  48 + 5% of their own directions, float32, 2.15 GB): reading the input once, share-convert's
  default merge, ``--k 48``, and ``vlora compress`` (``--vlora``); the targets are the default ≥ 2×
  and ``--k 48`` ≥ 6× faster than vLoRA, both at ≤ 1 GB peak.
- ``1b``: 64 adapters shaped like a 1B model's all-linear LoRAs (16 layers × 7 modules, r 16,
  planted shared rank 32 + 10%, bfloat16): share-convert's default merge against the floor
  (`decomposition_floor.py`: the inputs read once and one exact decomposition per module side);
  the target is ≤ 2× the floor.
- ``tiny``: 1000 tiny all-linear adapters (32 layers × 7 modules, hidden 64, r 4): the default
  merge; the target is ≤ 30 s.

With ``--base DIR`` (a checkout of the code before the change), its default merges run in the
same session, right after this code's, for a before/after on the same machine.

    python benchmarks/bench_bases.py --work /tmp/bench-bases --vlora /tmp/vlora/bin/vlora \\
        --base /tmp/old-checkout --out benchmarks/results/bases-26.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_scale import LAYERS, TARGETS, layout_1b  # noqa: E402
from measure import Run, measure  # noqa: E402

from share_convert.io import write_synthetic_adapters  # noqa: E402

SETS = {
    "noisy": {"count": 64, "layers": 32, "hidden": 4096, "rank": 16, "shared_rank": 48, "noise": 0.05},
    "1b": {"count": 64, "rank": 16, "shared_rank": 32, "noise": 0.1, "dtype": "bfloat16", "modules": "1b"},
    "tiny": {"count": 1000, "layers": LAYERS, "targets": TARGETS, "hidden": 64, "rank": 4, "shared_rank": 8,
             "noise": 0.1},
}  # fmt: skip


def prepare(work: Path, name: str) -> Path:
    """The set's adapters under ``work/name`` (written once), read once to warm the page cache."""
    folder = work / name
    spec = dict(SETS[name])
    if not (folder / ".done").exists():
        if spec.get("modules") == "1b":
            spec["modules"] = layout_1b()
        write_synthetic_adapters(folder, **spec)
        (folder / ".done").write_text("")
    for path in folder.iterdir():
        if path.is_dir():
            for f in path.iterdir():
                f.read_bytes()
    return folder


#: What is kept of every measured process (benchmarks/measure.py)
PROCESS_FIGURES = ("wall_s", "peak_rss_mb", "cpu_s", "system_s", "minor_faults")


def figures(run: Run) -> dict:
    """The :data:`PROCESS_FIGURES` of one measured process."""
    return {k: v for k, v in run.summary().items() if k in PROCESS_FIGURES}


def merge(code: Path, folder: Path, out: Path, *options: str) -> dict:
    """One ``share-convert merge`` with the code at ``code``: wall, peak RSS, its report and timings."""
    timings = out.with_suffix(".timings.json")
    env = {"PYTHONPATH": str(code)}
    # -P: the working directory does not come first on the path (a checkout there would win over PYTHONPATH)
    cmd = [sys.executable, "-P", "-m", "share_convert.cli", "merge", str(folder), "-o", str(out), "--force", "--json"]
    run = measure([*cmd, "--timings", str(timings), *options], env=env)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    report = json.loads(run.stdout)
    return {
        **figures(run),
        "options": list(options),
        "code": str(code),
        "mean_error": report["totals"]["mean_error"],
        "stored_bytes": out.stat().st_size,
        "modules_by_kind": report["plan"]["modules_by_kind"],
        "timings": json.loads(timings.read_text()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-bases")
    p.add_argument("--sets", default="noisy,1b,tiny")
    p.add_argument("--vlora", default=None, help="the vlora executable (its own environment); omit to skip")
    p.add_argument("--base", default=None, help="a checkout of the code before the change, run side by side")
    p.add_argument(
        "--runs", default="read_once,floor,floor_k48,default,default_before,k48,vlora", help="which runs to do"
    )
    p.add_argument("--out", required=True)
    a = p.parse_args()
    runs = set(a.runs.split(","))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    code = HERE.parent
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setting": vars(a),
        "load_before": os.getloadavg(),
        "sets": {},
    }

    def record(set_name: str, key: str, value: dict) -> None:
        value["load_1min_after"] = os.getloadavg()[0]
        results["sets"].setdefault(set_name, {})[key] = value
        print(set_name, key, {k: value[k] for k in ("wall_s", "peak_rss_mb") if k in value}, flush=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")

    for name in a.sets.split(","):
        folder = prepare(work, name)
        out = work / f"{name}.safetensors"
        if name == "noisy" and "read_once" in runs:
            run = measure([sys.executable, str(HERE / "read_once.py"), str(folder)])
            record(name, "read_once", figures(run))
        floors = [("floor", [])] if name in ("1b", "noisy") and "floor" in runs else []
        if name == "noisy" and "floor_k48" in runs:  # the floor of a merge at --k 48
            floors.append(("floor_k48", ["--k", "48"]))
        for key, extra in floors:
            env = {"PYTHONPATH": str(code)}
            floor = [sys.executable, str(HERE / "decomposition_floor.py"), str(folder), *extra, "--tuned-process"]
            run = measure(floor, env=env)
            if run.returncode != 0:
                raise SystemExit(run.stderr[-3000:])
            record(name, key, {**figures(run), **json.loads(run.stdout)})
        if "default" in runs:
            record(name, "default", merge(code, folder, out))
        if a.base and name in ("noisy", "1b") and "default_before" in runs:
            record(name, "default_before", merge(Path(a.base), folder, out))
        if name == "noisy":
            if "k48" in runs:
                record(name, "k48", merge(code, folder, out, "--k", "48"))
            if a.vlora and "vlora" in runs:
                vout = work / "vlora-out"
                t = time.perf_counter()
                run = measure(
                    [a.vlora, "compress", *[str(x) for x in sorted(folder.iterdir()) if x.is_dir()], "-o", str(vout)]
                )
                if run.returncode != 0:
                    raise SystemExit(run.stderr[-3000:])
                record(
                    name,
                    "vlora",
                    {
                        **figures(run),
                        "outer_s": time.perf_counter() - t,
                    },
                )
    results["load_after"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
