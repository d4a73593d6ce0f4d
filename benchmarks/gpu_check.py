"""The GPU path of the decomposition, measured in one short run on a machine with a CUDA device.

1. The randomized basis of one large module stack (4096 × 16·adapters), CPU vs CUDA, in-process,
   after a warm-up (the decomposition alone: no reading, no writing).
2. Whole-process ``share-convert merge`` of N synthetic 7B-shaped adapters (32 layers × q_proj,
   v_proj, hidden 4096, r = 16, float32), ``--device cpu`` then ``--device cuda``, same inputs,
   same run: wall time, peak RSS, the plan, the mean ΔW error and where the time went (phases
   summed over worker threads, from the hidden ``merge --timings``).

    python benchmarks/gpu_check.py --work /tmp/gpu --count 64 --out benchmarks/results/gpu.json

Issue 12's GPU targets (when a GPU is lent; one short script, leave time to rerun it):

    python benchmarks/gpu_check.py --work /tmp/gpu --count 256 --out gpu-256.json     # CUDA ≥ 5× the CPU
    python benchmarks/gpu_check.py --work /tmp/gpu --count 1000 --dtype bfloat16 --devices cuda \
        --out gpu-1000-bf16.json                                                      # ≤ 60 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

from share_convert.checkpoint import Checkpoint  # noqa: E402
from share_convert.io import write_synthetic_adapters  # noqa: E402
from share_convert.math import principal_basis  # noqa: E402


def time_basis(stack: torch.Tensor, k: int, device: str, repeat: int = 3) -> tuple[float, list[float]]:
    s = stack.to(device)
    principal_basis(s, k)  # warm-up (CUDA context, kernels, workspace)
    best, S = float("inf"), None
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        _, S, _ = principal_basis(s, k)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, S[:5].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/share-gpu")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the adapters' dtype")
    p.add_argument("--devices", default="cpu,cuda", help="which merges to run: cpu,cuda or cuda alone (1000 adapters)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check here")
    result: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "setting": vars(a),
    }
    g = torch.Generator().manual_seed(0)
    m = 16 * 1000  # 1000 adapters of rank 16 in one module
    stack = (torch.randn(4096, 64, generator=g) @ torch.randn(64, m, generator=g)) + 0.01 * torch.randn(
        4096, m, generator=g
    )
    for dev in ("cpu", "cuda"):
        best, top = time_basis(stack, 64, dev)
        result[f"basis_4096x{m}_k64_{dev}_s"] = best
        result[f"basis_top_singular_values_{dev}"] = top
    print(json.dumps(result, indent=2), flush=True)

    work = Path(a.work)
    folder = work / f"a{a.count}-{a.dtype}"
    if not folder.exists():
        t = time.perf_counter()
        write_synthetic_adapters(
            folder, count=a.count, layers=32, hidden=4096, rank=16, shared_rank=32, dtype=a.dtype
        )  # fmt: skip
        result["generate_s"] = time.perf_counter() - t
    sc = [sys.executable, "-m", "share_convert.cli"]
    for dev in a.devices.split(","):
        out = work / f"{dev}.safetensors"
        timings = work / f"timings-{dev}.json"
        r = measure(
            [*sc, "merge", str(folder), "-o", str(out), "--force", "--device", dev, "--json", "--timings", str(timings)]
        )
        assert r.returncode == 0, r.stderr
        ckpt = Checkpoint(out)
        errors = [t["error"] for info in ckpt.modules.values() for t in info["tasks"].values()]
        result[f"merge_{dev}"] = {
            "wall_s": r.wall_s,
            "peak_rss_mb": r.peak_rss_mb,
            "mean_error": sum(errors) / len(errors),
            "k_B": sorted({info["k_B"] for info in ckpt.modules.values()}),
            "bytes": out.stat().st_size,
            "timings": json.loads(timings.read_text()),
        }
        print(json.dumps(result[f"merge_{dev}"]), flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
