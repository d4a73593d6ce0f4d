"""The GPU path of the decomposition, in one short script for a machine with a CUDA device.

Checks that ``--device cuda`` gives the same plan and errors as the CPU (to float tolerance) and
times both on one synthetic module stack and on a small end-to-end merge.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from share_convert import ConsolidationConfig, api
from share_convert.linalg import principal_basis
from share_convert.synthetic import write_synthetic_adapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check here")
    result: dict = {"device": torch.cuda.get_device_name(0)}
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(4096, 64, generator=g) @ torch.randn(64, 8000, generator=g)
    for dev in ("cpu", "cuda"):
        s = stack.to(dev)
        principal_basis(s, 64)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        U, S, _ = principal_basis(s, 64)
        if dev == "cuda":
            torch.cuda.synchronize()
        result[f"basis_{dev}_s"] = time.perf_counter() - t
        result[f"singular_values_{dev}"] = S[:5].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_adapters(Path(tmp) / "a", count=64, layers=4, hidden=2048, rank=16)
        for dev in ("cpu", "cuda"):
            t = time.perf_counter()
            s = api.merge(
                [str(Path(tmp) / "a")], Path(tmp) / f"{dev}.safetensors", ConsolidationConfig(device=dev), force=True
            )
            result[f"merge_{dev}_s"] = time.perf_counter() - t
            result[f"merge_{dev}_mean_error"] = s["totals"]["mean_error"]
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
