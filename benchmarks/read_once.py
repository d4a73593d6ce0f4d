"""Baseline: read every tensor of every adapter once (what any tool must at least do)."""

import sys
from pathlib import Path

from safetensors import safe_open

total = 0
for folder in sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_dir()):
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            total += f.get_tensor(key).numel()
print(total)
