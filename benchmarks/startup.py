"""Start-up time of the light commands: ``--help``, ``tasks`` and ``info``, as whole processes.

Each command is started ``--runs`` times as a fresh ``python -m share_convert.cli`` process and
the median wall-clock time is reported (start of the process to its exit, interpreter start-up and
imports included), with whether the process imported torch. ``--compare DIR`` also times another
checkout of share-convert (for example the main branch) in the same run, on the same checkpoint.
The checkpoint is a small one (six synthetic adapters, as in ``share-convert demo``), built once
before timing: the light commands read only its header and manifest (``info`` also hashes its tensors).

    python benchmarks/startup.py --runs 7 --compare ../main --out benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import runpy, sys, atexit\n"
    "atexit.register(lambda: open({flag!r}, 'w').write(str('torch' in sys.modules)))\n"
    "sys.argv = ['share-convert', *{args!r}]\n"
    "runpy.run_module('share_convert.cli', run_name='__main__')\n"
)


def build_checkpoint(folder: Path) -> Path:
    """A small checkpoint made with this checkout (not timed)."""
    sys.path.insert(0, str(REPO))
    from share_convert import api
    from share_convert.synthetic import write_synthetic_adapters

    write_synthetic_adapters(folder / "adapters", count=6)
    ckpt = folder / "share.safetensors"
    api.merge([str(folder / "adapters")], ckpt, force=True)
    return ckpt


def time_command(checkout: Path, args: list[str], runs: int, scratch: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    times, torch_loaded = [], []
    flag = scratch / "torch-loaded"
    for _ in range(runs):
        code = PROBE.format(flag=str(flag), args=args)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed in {checkout}: {proc.stderr.strip()[-500:]}")
        torch_loaded.append(flag.read_text() == "True")
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": runs, "imports_torch": any(torch_loaded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--compare", type=Path, help="another checkout of share-convert to time beside this one")
    parser.add_argument("--out", type=Path)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="share-convert-startup-") as tmp:
        scratch = Path(tmp)
        ckpt = str(build_checkpoint(scratch))
        commands = {"--help": ["--help"], "tasks": ["tasks", ckpt], "info": ["info", ckpt]}
        checkouts = {"this checkout": REPO}
        if opts.compare:
            checkouts["compared"] = opts.compare.resolve()
        torch_times = []
        for _ in range(opts.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            torch_times.append(time.perf_counter() - start)
        torch_import_s = statistics.median(torch_times)
        results: dict = {"python": sys.version.split()[0], "torch_import_process_s": torch_import_s, "commands": {}}
        for name, args in commands.items():
            results["commands"][name] = {
                label: time_command(path, args, opts.runs, scratch) for label, path in checkouts.items()
            }
    print(f"{'command':10} " + " ".join(f"{label:>24}" for label in checkouts))
    for name, row in results["commands"].items():
        cells = [f"{r['median_s']:.2f} s{' (torch)' if r['imports_torch'] else '':>9}" for r in row.values()]
        print(f"{name:10} " + " ".join(f"{c:>24}" for c in cells))
    print(f"(a process that only imports torch: {torch_import_s:.2f} s, median)")
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
