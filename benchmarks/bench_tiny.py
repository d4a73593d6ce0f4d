"""Issue 26's third target, side by side: 1000 tiny all-linear adapters merged in ≤ 30 s.

The set is ``bench_bases.py``'s ``tiny`` (1000 adapters, 32 layers × 7 modules, hidden 64, r 4,
planted shared rank 8, noise 0.1; written once under ``--work``). Each round merges it with this
checkout's code and with a baseline commit's, one right after the other, by default and with
``--precision float`` (whole processes, ``measure.py``: wall, peak RSS, CPU seconds, the engine's
phases). The outputs of the two codes must be the same bytes: their sha256 are recorded and
compared. The machine's load average is recorded around every run: other work may share it, and
the ratio between the two codes in one round is the figure to read there.

    python benchmarks/bench_tiny.py --out benchmarks/results/tiny-26.json

The baseline (``--base-commit``, default ffb0fde: main before the planner's search was made fast,
issue 26) is extracted once with ``git archive`` into ``--work``/base-<commit>; ``--base DIR`` uses
a checkout there instead.
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

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_bases import merge, prepare  # noqa: E402
from identity import sha256_file  # noqa: E402

OPTIONS = {"default": (), "float": ("--precision", "float")}


def baseline(work: Path, commit: str) -> Path:
    """The code at ``commit``, extracted once under ``work`` (as ``git archive`` gives it)."""
    folder = work / f"base-{commit}"
    if not (folder / "share_convert").exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", commit], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/bench-bases")
    p.add_argument("--base-commit", default="ffb0fde")
    p.add_argument("--base", default=None, help="a checkout of the baseline (default: --base-commit, extracted)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of (this code, the baseline) per option")
    p.add_argument("--options", default="default,float", help="which of: " + ", ".join(OPTIONS))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    codes = {"after": HERE.parent, "before": Path(a.base) if a.base else baseline(work, a.base_commit)}
    folder = prepare(work, "tiny")
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setting": vars(a),
        "codes": {k: str(v) for k, v in codes.items()},
        "load_before": os.getloadavg(),
        "runs": [],
    }
    for _ in range(a.rounds):
        for option in a.options.split(","):
            for code_name, code in codes.items():
                out = work / f"tiny-{code_name}-{option}.safetensors"
                load = os.getloadavg()[0]
                run = merge(code, folder, out, *OPTIONS[option])
                run.update(code_name=code_name, option=option, sha256=sha256_file(out))
                run.update(load_1min_before=load, load_1min_after=os.getloadavg()[0])
                results["runs"].append(run)
                print(option, code_name, {k: run[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")}, flush=True)
                Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    summary = {}
    for option in a.options.split(","):
        runs = {c: [r for r in results["runs"] if r["option"] == option and r["code_name"] == c] for c in codes}
        med = {c: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")} for c, rs in runs.items()}
        summary[option] = {
            "wall_s": {c: m["wall_s"] for c, m in med.items()},
            "cpu_s": {c: m["cpu_s"] for c, m in med.items()},
            "speedup_wall": med["before"]["wall_s"] / med["after"]["wall_s"],
            "speedup_cpu": med["before"]["cpu_s"] / med["after"]["cpu_s"],
            "same_bytes": len({r["sha256"] for rs in runs.values() for r in rs}) == 1,
        }
        print(option, summary[option], flush=True)
    results["summary"] = summary
    results["load_after"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
