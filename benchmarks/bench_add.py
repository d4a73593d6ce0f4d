"""Adding one adapter to checkpoints of growing size: the cost must not grow with the old tasks.

Builds checkpoints with N old tasks (merged once, untimed, in this process), then times the whole process
``share-convert add CKPT NEW -o OUT`` for each N, side by side in one run, together with the
start-up of the CLI alone (``share-convert --help``: Python, torch and the CLI imported) as the floor.
Also times the library call alone (``share_convert.engine.add_tasks.add`` timed inside a fresh process,
best of the rounds): the update without start-up, reading of the new adapter's header, or the report.

    python benchmarks/bench_add.py --tasks 10,50,100,200,500 --work /tmp/bench-add --out benchmarks/results/add.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

from share_convert import api  # noqa: E402
from share_convert.io import write_synthetic_adapters  # noqa: E402

#: Times the library call alone in a fresh process (this one stays small: a child's peak RSS
#: counts what it inherited before exec).
LIBRARY_ADD = """
import sys, time
from share_convert.engine import add
from share_convert.io import open_adapters
sources = open_adapters([sys.argv[2]])
t = time.perf_counter()
add(sys.argv[1], sources, sys.argv[3], force=True)
print(time.perf_counter() - t)
"""


def time_library_add(ckpt: Path, new: Path, out: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", LIBRARY_ADD, str(ckpt), str(new), str(out)], check=True, capture_output=True, text=True
    )
    return float(proc.stdout.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="10,50,100,200,500")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--work", default="/tmp/share-bench-add")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    counts = [int(x) for x in a.tasks.split(",")]
    work = Path(a.work)
    pool = work / "pool"
    if not pool.exists():
        write_synthetic_adapters(pool, count=max(counts), layers=a.layers, hidden=a.hidden, rank=a.rank, shared_rank=16)
        write_synthetic_adapters(
            work / "new", count=1, layers=a.layers, hidden=a.hidden, rank=a.rank, shared_rank=16, seed=0, prefix="new"
        )
    new = work / "new" / "new-000"
    sc = [sys.executable, "-m", "share_convert.cli"]
    checkpoints = {}
    for n in counts:
        ckpt = work / f"ckpt-{n}.safetensors"  # made anew by this version of the code, untimed
        folder = work / f"n{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for x in sorted(pool.iterdir())[:n]:
            (folder / x.name).symlink_to(x.resolve())
        api.merge([str(folder)], ckpt, force=True)  # what `share-convert merge FOLDER -o CKPT --force` writes
        checkpoints[n] = ckpt
    # Round-robin: every repeat times the start-up and each N once, so that a slower spell of the
    # machine falls on all of them alike.
    startup: list[float] = []
    runs: dict[int, list] = {n: [] for n in counts}
    library: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(a.repeat):
        startup.append(measure([*sc, "--help"]).wall_s)
        for n in counts:
            r = measure([*sc, "add", str(checkpoints[n]), str(new), "-o", str(work / "out.safetensors"), "--force"])
            assert r.returncode == 0, r.stderr
            runs[n].append(r)
            library[n].append(time_library_add(checkpoints[n], new, work / "out.safetensors"))
    rows = []
    for n in counts:
        best = min(runs[n], key=lambda r: r.wall_s)
        row = {
            "old_tasks": n,
            "checkpoint_bytes": checkpoints[n].stat().st_size,
            "wall_s_best": best.wall_s,
            "wall_s_all": [r.wall_s for r in runs[n]],
            "peak_rss_mb": best.peak_rss_mb,
            "library_add_s_best": min(library[n]),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    startup_s = min(startup)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "setting": vars(a),
                "startup_s": startup_s,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
