"""Write synthetic PEFT adapters with a planted shared subspace per module, one adapter at a time.

Example (64 adapters shaped like a 7B model's q_proj/v_proj LoRAs, float32, 2.1 GB):

    python benchmarks/generate.py /tmp/bench/a64 --count 64 --layers 32 --hidden 4096 --rank 16
"""

from __future__ import annotations

import argparse
import time

from share_convert.io import write_synthetic_adapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shared-rank", type=int, default=32, help="rank of the planted shared subspace per module")
    p.add_argument("--noise", type=float, default=0.02, help="size of each adapter's private part, relative")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t = time.perf_counter()
    paths = write_synthetic_adapters(
        a.folder,
        count=a.count,
        layers=a.layers,
        targets=tuple(a.targets.split(",")),
        hidden=a.hidden,
        rank=a.rank,
        shared_rank=a.shared_rank,
        noise=a.noise,
        dtype=a.dtype,
        seed=a.seed,
    )
    print(f"wrote {len(paths)} adapters to {a.folder} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
