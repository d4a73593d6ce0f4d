"""ΔW error of a vLoRA subspace against the original adapters (run in vLoRA's own environment).

Usage: python vlora_error.py SUBSPACE_DIR ADAPTERS_DIR  → JSON {task: mean relative ΔW error over modules}
The relative error ‖BA − B̂Â‖/‖BA‖ does not depend on the LoRA scale, which both sides share.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import load_file
from vlora import SharedSubspace


def frob2(B, A):
    return float(((B.T @ B) * (A @ A.T)).sum())


def inner(B1, A1, B2, A2):
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


sub = SharedSubspace.load(sys.argv[1])
adapters = Path(sys.argv[2])
out = {}
for task in sub.tasks:
    w = sub.reconstruct(task)
    orig = load_file(str(adapters / task / "adapter_model.safetensors"))
    errs = []
    for layer in w.layer_names:
        A0 = orig[f"base_model.model.{layer}.lora_A.weight"].double()
        B0 = orig[f"base_model.model.{layer}.lora_B.weight"].double()
        A1, B1 = w.lora_a[layer].double(), w.lora_b[layer].double()
        ref = frob2(B0, A0)
        errs.append(max(ref - 2 * inner(B0, A0, B1, A1) + frob2(B1, A1), 0.0) ** 0.5 / ref**0.5)
    out[task] = sum(errs) / len(errs)
print(json.dumps(out))
