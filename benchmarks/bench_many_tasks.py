"""Checkpoints of thousands of tasks × hundreds of modules: open, info, extract and add stay fast.

Builds, untimed, Share checkpoints of N tasks over 32 layers × 7 all-linear modules (q, k, v, o:
64 × 64; gate, up: 172 × 64; down: 64 × 172), each task a rank-4 update inside a shared basis of
k = 8 per module (as a merge of such adapters with a planted shared subspace stores them), written
with the library's own CheckpointWriter straight from the stored tensors. (A merge of 2000 such
adapters is measured separately, with its engine; this benchmark isolates the format and the
reader.) Then times whole processes, side by side in one run:

- `share-convert --help` (start-up: Python, the CLI and its imports), the floor of the others;
- `python -c "safe_open(...)"` opening the file with safetensors alone and listing its tensors;
- `share-convert info CKPT --json`;
- `share-convert extract CKPT --task T -o DIR`;
- `share-convert add CKPT NEW -o OUT` (one new adapter with every module).

    python benchmarks/bench_many_tasks.py --tasks 10,2000 --work /tmp/bench-many --out benchmarks/results/many-tasks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

from share_convert.checkpoint import (  # noqa: E402
    CheckpointWriter,  # noqa: E402
    RecordTable,
    TaskRows,
)
from share_convert.engine import ConsolidationConfig  # noqa: E402

LAYERS = 32
SHAPES = {  # module -> (out_features n, in_features d)
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (64, 64),
    "self_attn.v_proj": (64, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (172, 64),
    "mlp.up_proj": (172, 64),
    "mlp.down_proj": (64, 172),
}
K, RANK = 8, 4


def adapter_config() -> dict:
    """The adapter_config.json of every task (scale 1: lora_alpha = r)."""
    return {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": RANK,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in SHAPES}),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "synthetic/llama-like",
        "fan_in_fan_out": False,
        "bias": "none",
    }


def module_names() -> list[tuple[str, int, int]]:
    return [
        (f"base_model.model.model.layers.{layer}.{m}", n, d) for layer in range(LAYERS) for m, (n, d) in SHAPES.items()
    ]


def build_checkpoint(path: Path, tasks: int, seed: int = 0) -> None:
    """A valid Share checkpoint of ``tasks`` tasks: bases, Grams, balanced coefficients, exact records."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"task-{i:05d}" for i in range(tasks)]
    modules: dict[str, dict] = {}
    config = adapter_config()
    with CheckpointWriter(path) as w:
        for module, n, d in module_names():
            beta = torch.linalg.qr(torch.randn(n, K, generator=gen)).Q
            alpha = torch.linalg.qr(torch.randn(d, K, generator=gen)).Q
            # balanced coefficients: E_B E_Aᵀ in SVD form with orthogonal columns
            cores = torch.randn(tasks, K, K, generator=gen, dtype=torch.float64)
            U, S, Vh = torch.linalg.svd(cores)
            EB = (U[:, :, :RANK] * S[:, None, :RANK].sqrt()).float()
            EA = (Vh.transpose(1, 2)[:, :, :RANK] * S[:, None, :RANK].sqrt()).float()
            norms = (S[:, :RANK] ** 2).sum(1).sqrt()
            w.add(f"modules/{module}/basis_B", beta)
            w.add(f"modules/{module}/basis_A", alpha)
            weights = (1 / norms).sqrt()[:, None, None]  # equal weighting: w = 1 / ‖ΔW‖
            for side, E in (("B", EB), ("A", EA)):
                flat = (E.double() * weights).transpose(0, 1).reshape(K, -1)
                w.add(f"modules/{module}/gram_{side}", (flat @ flat.T).float())
            w.add_module(
                module,
                TaskRows(
                    names,
                    [f"modules/{module}/"] * tasks,
                    {
                        f"modules/{module}/": (
                            EB.transpose(1, 2).reshape(tasks * RANK, K).contiguous(),
                            EA.transpose(1, 2).reshape(tasks * RANK, K).contiguous(),
                        )
                    },
                    np.arange(tasks) * RANK,
                    None,
                    np.zeros(tasks, dtype=np.int64),
                ),
            )
            modules[module] = {
                "out_features": n,
                "in_features": d,
                "k_B": K,
                "k_A": K,
                "kind": "shared",
                "alternatives": {"shared": None, "private": None},
                "params": K * (n + d) + tasks * RANK * 2 * K,
                "dtype": "float32",
                "tasks": RecordTable(
                    names,
                    np.column_stack(
                        [np.arange(tasks), np.full((tasks, 3), RANK) * [1, 0, 1], np.full(tasks, -1)]
                        + [np.arange(tasks) * RANK, np.zeros(tasks), np.zeros(tasks)]
                    ),
                    np.column_stack([norms.numpy(), np.zeros(tasks), np.full(tasks, -1.0), np.full(tasks, -1.0)]),
                ),
            }
        lora = sum(RANK * (n + d) for _, n, d in module_names())
        task_records = {
            t: {
                "source": f"synthetic/{t}",
                "adapter_config": config,
                "alpha_assumed": None,
                "weights_dtype": "F32",
                "heads": [],
                "head_dtypes": {},
                "original_params": lora,
                "original_bytes": 4 * lora,
            }
            for t in names
        }
        from dataclasses import asdict

        w.finish(
            {
                "format": "share-convert",
                "format_version": 2,
                "config": asdict(ConsolidationConfig(k=K)),
                "tasks": task_records,
                "modules": modules,
                "history": [{"op": "merge", "tasks_added": names[:3], "errors": {}}],
            }
        )


def write_new_adapter(folder: Path, seed: int = 1) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, n, d in module_names():
        tensors[f"{module}.lora_A.weight"] = torch.randn(RANK, d, generator=gen) / d**0.5
        tensors[f"{module}.lora_B.weight"] = torch.randn(n, RANK, generator=gen) / n**0.5
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config()))


OPEN = "import sys; from safetensors import safe_open\nwith safe_open(sys.argv[1], 'numpy') as f: print(len(list(f.keys())))"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="10,2000")
    p.add_argument("--work", default="/tmp/bench-many")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/many-tasks.json")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cli = shutil.which("share-convert") or "share-convert"
    new = work / "new-task"
    write_new_adapter(new)
    counts = [int(x) for x in a.tasks.split(",")]
    files = {}
    for T in counts:
        files[T] = work / f"c{T}.safetensors"
        build_checkpoint(files[T], T)
    results: dict = {"machine": platform.platform(), "python": sys.version.split()[0], "rounds": a.rounds, "runs": []}
    for r in range(a.rounds):  # interleaved rounds: the machine's load affects every row alike
        runs = [("startup", [cli, "--help"])]
        for T in counts:
            f = str(files[T])
            runs += [
                (f"open {T}", [sys.executable, "-c", OPEN, f]),
                (f"info {T}", [cli, "info", f, "--json"]),
                (f"extract {T}", [cli, "extract", f, "--task", "task-00001", "-o", str(work / f"x{T}"), "--force"]),
                (f"add {T}", [cli, "add", f, str(new), "-o", str(work / f"a{T}.safetensors"), "--force"]),
            ]
        for label, cmd in runs:
            load = os.getloadavg()[0]
            run = measure(cmd)
            if run.returncode != 0:
                raise SystemExit(f"{label} failed: {run.stderr[-2000:]}")
            results["runs"].append({"label": label, "round": r, "load_average": load, **run.summary()})
            print(f"{label:>14}: {run.wall_s:6.2f} s  {run.peak_rss_mb:7.1f} MB", flush=True)
    for T in counts:
        results.setdefault("files", {})[T] = {
            "bytes": files[T].stat().st_size,
            "header_bytes": int.from_bytes(files[T].read_bytes()[:8], "little"),
        }
    Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
