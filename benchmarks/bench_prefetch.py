"""One worker with and without reading ahead: the same merge by two checkouts, whole processes.

A merge falls back to one worker when its modules are large (``consolidation.auto_workers``); the
device path then reads the next module on a thread of its own while it computes the current one.
This runs ``merge(..., workers=1)`` in a fresh process for each checkout given (the code as it
was before reading ahead, and after), alternating, and records wall time, peak memory and where
the time went (phases summed over threads: with reading ahead, reading runs beside the compute).

    git worktree add /tmp/wt-before 70592b0 --detach
    python benchmarks/bench_prefetch.py --inputs '/tmp/bench-1b/n64/*' --checkouts /tmp/wt-before,. \\
        --rounds 2 --out benchmarks/results/prefetch-1b.json
    python benchmarks/bench_prefetch.py ... --cold --out benchmarks/results/prefetch-1b-cold.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

#: The merge each process runs: argv = inputs glob, output, timings file.
MERGE = """
import glob, json, sys
from share_convert.engine import ConsolidationConfig, merge
from share_convert.io import open_adapters
clock = {}
merge(open_adapters(sorted(glob.glob(sys.argv[1]))), sys.argv[2], ConsolidationConfig(device="cpu"),
      force=True, workers=1, timings=clock)
json.dump(clock, open(sys.argv[3], "w"))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", required=True, help="a glob of adapter folders")
    p.add_argument("--checkouts", required=True, help="comma-separated source trees to compare")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--cold", action="store_true", help="drop the page cache before each run (root only): inputs read from disk"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for tree in args.checkouts.split(","):
                tree = str(Path(tree).resolve())
                commit = subprocess.run(
                    ["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
                ).stdout.strip()
                timings = Path(work) / "timings.json"
                if args.cold:
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("1\n")
                run = measure(
                    [sys.executable, "-c", MERGE, args.inputs, str(Path(work) / "c.safetensors"), str(timings)],
                    env={"PYTHONPATH": tree},
                )
                if run.returncode:
                    raise SystemExit(f"{tree}: merge failed:\n{run.stderr[-2000:]}")
                rows.append(
                    {
                        "round": r,
                        "checkout": tree,
                        "commit": commit,
                        "wall_s": round(run.wall_s, 2),
                        "peak_rss_mb": round(run.peak_rss_mb),
                        "phases_s": {k: round(v, 2) for k, v in json.loads(timings.read_text()).items()},
                        "load_1min": os.getloadavg()[0],
                        "page_cache": "dropped before the run" if args.cold else "as left by the previous run",
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    report = {
        "inputs": args.inputs,
        "command": "python benchmarks/bench_prefetch.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
