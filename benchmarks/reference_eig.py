"""The authors' reference decomposition, timed on a few modules: the n × n covariance of the
(centered) stack and a general (non-symmetric) eigensolver, as the spec describes (section 2.4).

Usage: python reference_eig.py ADAPTERS_DIR MODULES  → JSON {seconds_per_module, modules_timed}
"""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

folders = sorted(Path(sys.argv[1]).iterdir())
count = int(sys.argv[2])
with safe_open(str(folders[0] / "adapter_model.safetensors"), framework="pt") as f:
    modules = sorted(k[: -len(".lora_B.weight")] for k in f.keys() if k.endswith("lora_B.weight"))[:count]
times = []
for module in modules:
    t = time.perf_counter()
    cols = []
    for folder in folders:
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            cols.append(f.get_tensor(f"{module}.lora_B.weight").float())
    stack = torch.cat(cols, 1)
    stack = stack - stack.mean(1, keepdim=True)
    cov = stack @ stack.T  # n × n
    torch.linalg.eig(cov)  # general eigensolver, complex output
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds_per_module": sum(times) / len(times), "modules_timed": len(times), "side": "B only"}))
