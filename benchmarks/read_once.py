"""Baseline: read every tensor of every adapter once (what any tool must at least do)."""

import sys
from pathlib import Path

from safetensors import safe_open

total = 0
for folder in sorted(Path(sys.argv[1]).iterdir()):
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            total += f.get_tensor(key).numel()
print(total)
