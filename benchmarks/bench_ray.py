"""``merge --executor local`` against ``--executor ray``, side by side in one run, whole processes.

Synthetic adapters (``io.synthetic.write_synthetic_adapters``) are merged by the CLI in a fresh
process per run, alternating executors, and each output's SHA-256 is recorded: the executors must
write the same bytes. Two Ray set-ups: ``ray-local`` has the command start a local cluster for the
run (``--ray-address local``: its start-up and shutdown are in the time), and
``ray-cluster`` runs against a cluster started once beforehand with ``ray start --head`` (the
per-module cost of Ray alone; the cluster is a ``ray start --head --block`` process of this
benchmark's, stopped by its process id). Peak RSS is the driver's (the command's process); Ray's workers are
processes of their own and are not counted.

    python benchmarks/bench_ray.py --count 64 --layers 4 --hidden 512 --rounds 2 \\
        --out benchmarks/results/ray-executor.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_head(command: list[str], port: int) -> subprocess.Popen:
    """``ray start --head --block`` in a process of its own, once its port answers and its node has
    had a few seconds to join (stopped by sending that process SIGTERM)."""
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(5)
            return head
        except OSError:
            time.sleep(0.5)
    head.kill()
    raise SystemExit("ray start did not answer within 120 s")


def forget_cluster(address: str) -> None:
    """Remove the note Ray leaves of the last cluster started here, when it is ours (now stopped):
    ``ray stop`` would remove it, and a later ``ray.init()`` would otherwise wait for that cluster."""
    note = Path("/tmp/ray/ray_current_cluster")
    port = address.rpartition(":")[2]
    if note.is_file() and note.read_text().strip().endswith(f":{port}"):
        note.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=64, help="adapters")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the cluster started beforehand")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from share_convert.io.synthetic import write_synthetic_adapters

    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        inputs = Path(work) / "adapters"
        write_synthetic_adapters(
            inputs,
            count=args.count,
            layers=args.layers,
            targets=("q_proj", "k_proj", "v_proj", "o_proj"),
            hidden=args.hidden,
            rank=args.rank,
            shared_rank=args.rank,
        )
        address = "127.0.0.1:6390"
        start = [ray_cli, "start", "--head", "--block", "--port=6390", f"--num-cpus={args.cpus}"]
        for r in range(args.rounds):
            for label in ("local", "ray-local", "ray-cluster"):
                extra = {
                    "local": [],
                    "ray-local": ["--ray-address", "local"],
                    "ray-cluster": ["--ray-address", address],
                }[label]
                executor = "local" if label == "local" else "ray"
                head = None
                if label == "ray-cluster":  # started after ray-local, which would otherwise connect to it
                    head = start_head([*start, "--include-dashboard=false"], 6390)
                out = Path(work) / f"{label}.safetensors"
                command = [sys.executable, "-m", "share_convert.cli", "merge", str(inputs), "-o", str(out), "--force"]
                try:
                    # Ray 2.5x clusters authenticate by token: a driver given an address must say so
                    run = measure(
                        [*command, "--executor", executor, *extra], env={"RAY_AUTH_MODE": "token"} if head else None
                    )
                finally:
                    if head is not None:  # this head only, by its process id: its Ray processes stop with it
                        head.send_signal(signal.SIGTERM)
                        head.wait(60)
                        forget_cluster(address)
                if run.returncode != 0:
                    raise SystemExit(f"{label} failed: {run.stderr[-800:]}")
                rows.append({"round": r, "executor": label, **run.summary(), "sha256": sha256(out)})
                print(f"round {r} {label}: {run.wall_s:.2f} s, driver peak {run.peak_rss_mb:.0f} MB", flush=True)
    same = len({row["sha256"] for row in rows}) == 1
    print("outputs identical:", same)
    result = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "rows": rows,
        "identical": same,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
