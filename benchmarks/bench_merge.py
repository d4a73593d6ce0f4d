"""Merge at scale: share-convert and vLoRA side by side, whole processes, in one run.

For each adapter count N (the first N of one generated set), this measures wall time and peak
resident memory (wait4's ru_maxrss) of:

- reading every tensor once (the floor for any tool);
- ``share-convert merge`` with its defaults (and where its time goes, from ``--timings``);
- ``share-convert merge --budget <vLoRA's stored size>`` (fidelity at equal storage);
- ``vlora compress`` with its defaults (installed in its own environment, not a dependency);

and the mean relative ΔW error (per task: mean over modules; then mean over tasks) and stored
size of each result. The authors' reference decomposition is timed on a few modules.

Example (the issue's setting: 7B-shaped q_proj/v_proj LoRAs, r=16, float32):

    python benchmarks/bench_merge.py --counts 8,16,32,64 --work /tmp/bench --vlora /tmp/vlora/bin/vlora \\
        --out benchmarks/results/merge-fp32.json --plot benchmarks/results/merge-scaling.png
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

from share_convert.io import write_synthetic_adapters  # noqa: E402

HERE = Path(__file__).parent


def subset(src: Path, n: int, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir())[:n]:
        (dst / p.name).symlink_to(p.resolve())
    return dst


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="8,16,32,64")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shared-rank", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--work", default="/tmp/share-bench")
    p.add_argument("--vlora", default=None, help="path to the vlora executable (its own venv); omit to skip")
    p.add_argument("--vlora-max", type=int, default=64, help="skip vLoRA above this many adapters")
    p.add_argument("--reference-modules", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    counts = [int(c) for c in a.counts.split(",")]
    work = Path(a.work)
    pool = work / f"pool-{a.dtype}-{a.hidden}-{a.layers}-{a.rank}"
    if not pool.exists() or len(list(pool.iterdir())) < max(counts):
        write_synthetic_adapters(
            pool,
            count=max(counts),
            layers=a.layers,
            hidden=a.hidden,
            rank=a.rank,
            shared_rank=a.shared_rank,
            noise=a.noise,
            dtype=a.dtype,
        )
    sc = [sys.executable, "-m", "share_convert.cli"]
    vlora_py = str(Path(a.vlora).with_name("python")) if a.vlora else None
    rows = []
    for n in counts:
        folder = subset(pool, n, work / f"n{n}")
        row: dict = {"adapters": n, "input_bytes": sum(size_of(x) for x in folder.iterdir())}
        r = measure([sys.executable, str(HERE / "read_once.py"), str(folder)])
        row["read_once"] = r.summary()
        out = work / f"share-{n}.safetensors"
        r = measure(
            [*sc, "merge", str(folder), "-o", str(out), "--force", "--json", "--timings", str(work / "timings.json")]
        )
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        row["share_convert"] = {
            **r.summary(),
            "mean_error": rep["totals"]["mean_error"],
            "stored_bytes": size_of(out),
            "modules_by_kind": rep["plan"]["modules_by_kind"],
            "timings": json.loads((work / "timings.json").read_text()),
        }
        if a.vlora and n <= a.vlora_max:
            vout = work / f"vlora-{n}"
            shutil.rmtree(vout, ignore_errors=True)
            r = measure([a.vlora, "compress", *[str(x) for x in sorted(folder.iterdir())], "-o", str(vout)])
            assert r.returncode == 0, r.stderr
            errs = json.loads(
                subprocess.run(
                    [vlora_py, str(HERE / "vlora_error.py"), str(vout), str(folder)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            row["vlora"] = {**r.summary(), "mean_error": sum(errs.values()) / len(errs), "stored_bytes": size_of(vout)}
            eq = work / f"share-eq-{n}.safetensors"
            r = measure(
                [
                    *sc,
                    "merge",
                    str(folder),
                    "-o",
                    str(eq),
                    "--force",
                    "--json",
                    "--budget",
                    f"{row['vlora']['stored_bytes']}B",
                ]
            )
            assert r.returncode == 0, r.stderr
            row["share_convert_at_vlora_size"] = {
                **r.summary(),
                "mean_error": json.loads(r.stdout)["totals"]["mean_error"],
                "stored_bytes": size_of(eq),
            }
            shutil.rmtree(vout, ignore_errors=True)
        print(
            json.dumps(
                {
                    k: (
                        v
                        if not isinstance(v, dict)
                        else {
                            kk: vv
                            for kk, vv in v.items()
                            if kk in ("wall_s", "peak_rss_mb", "mean_error", "stored_bytes")
                        }
                    )
                    for k, v in row.items()
                }
            ),
            flush=True,
        )
        rows.append(row)
    ref = (
        json.loads(
            subprocess.run(
                [
                    sys.executable,
                    str(HERE / "reference_eig.py"),
                    str(work / f"n{counts[-1]}"),
                    str(a.reference_modules),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        if a.reference_modules
        else None
    )
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setting": vars(a),
        "rows": rows,
        "reference_decomposition": ref,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    if a.plot:
        plot(rows, a.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for key, label in (
        ("share_convert", "share-convert merge"),
        ("vlora", "vlora compress"),
        ("read_once", "read every tensor once"),
    ):
        pts = [(r["adapters"], r[key]) for r in rows if key in r]
        if pts:
            t_ax.plot([x for x, _ in pts], [v["wall_s"] for _, v in pts], marker="o", label=label)
            m_ax.plot([x for x, _ in pts], [v["peak_rss_mb"] / 1024 for _, v in pts], marker="o", label=label)
    t_ax.set(xlabel="adapters", ylabel="wall time (s, whole process)", title="Time")
    m_ax.set(xlabel="adapters", ylabel="peak resident memory (GB)", title="Memory")
    for ax in (t_ax, m_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
