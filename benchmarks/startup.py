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
    from share_convert.io import write_synthetic_adapters

    write_synthetic_adapters(folder / "adapters", count=6)
    ckpt = folder / "share.safetensors"
    api.merge([str(folder / "adapters")], ckpt, force=True)
    return ckpt


def checkout_env(checkout: Path, scratch: Path) -> dict[str, str]:
    """The environment that runs ``checkout``; checks that python really imports it from there.

    Processes run from the scratch folder: with -c, the current folder comes first on sys.path
    and would shadow PYTHONPATH's checkout."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import share_convert; print(share_convert.__file__)"],
        env=env,
        cwd=scratch,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not where.startswith(str(checkout)):
        raise SystemExit(f"{checkout}: python imports share_convert from {where!r}")
    return env


def time_once(env: dict[str, str], args: list[str], scratch: Path) -> tuple[float, bool]:
    """One whole-process run of the CLI: wall-clock seconds, and whether it imported torch."""
    flag = scratch / "torch-loaded"
    code = PROBE.format(flag=str(flag), args=args)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=scratch, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with PYTHONPATH={env['PYTHONPATH']}: {proc.stderr.strip()[-500:]}")
    return elapsed, flag.read_text() == "True"


def torch_only(scratch: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, cwd=scratch)
    return time.perf_counter() - start


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
        envs = {label: checkout_env(path, scratch) for label, path in checkouts.items()}
        # runs interleaved (each round times every command of every checkout once), so that load
        # from other processes on the machine falls on all of them alike
        samples: dict = {name: {label: [] for label in checkouts} for name in commands}
        torch_times = []
        for _ in range(opts.runs):
            torch_times.append(torch_only(scratch))
            for name, args in commands.items():
                for label, env in envs.items():
                    samples[name][label].append(time_once(env, args, scratch))
        results: dict = {
            "python": sys.version.split()[0],
            "runs": opts.runs,
            "torch_import_process_median_s": statistics.median(torch_times),
            "commands": {
                name: {
                    label: {
                        "median_s": statistics.median(t for t, _ in runs),
                        "min_s": min(t for t, _ in runs),
                        "imports_torch": any(loaded for _, loaded in runs),
                    }
                    for label, runs in row.items()
                }
                for name, row in samples.items()
            },
        }
        torch_import_s = results["torch_import_process_median_s"]
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
