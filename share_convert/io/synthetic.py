"""Synthetic PEFT adapters with a planted shared subspace, for the demo, tests and benchmarks.

Every adapter's update in a module is ΔW_i = U (C_i) Vᵀ + noise, with U, V fixed per module
(the shared subspace of rank ``shared_rank``) and C_i random per task. Adapters are written one
at a time, so generating hundreds never holds more than one in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_synthetic_adapters(
    folder: str | Path,
    *,
    count: int = 6,
    layers: int = 2,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    hidden: int = 64,
    rank: int = 8,
    shared_rank: int = 8,
    noise: float = 0.02,
    alpha: int = 16,
    dtype: str = "float32",
    seed: int = 0,
    base_model: str = "synthetic/llama-like",
    prefix: str = "task",
    modules: dict[str, tuple[int, int]] | None = None,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> list[Path]:
    """Write ``count`` PEFT adapter folders under ``folder``; return their paths.

    ``modules`` maps module names (without ``base_model.model.``) to their (out, in) sizes; by
    default ``model.layers.<i>.self_attn.<target>``, ``hidden`` × ``hidden``, for each layer and target.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    if modules is None:
        modules = {f"model.layers.{layer}.self_attn.{t}": (hidden, hidden) for layer in range(layers) for t in targets}
    else:
        targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in modules}))
    bases = {}
    for name, (n, d) in modules.items():
        U = torch.linalg.qr(torch.randn(n, shared_rank, generator=gen)).Q
        V = torch.linalg.qr(torch.randn(d, shared_rank, generator=gen)).Q
        bases[name] = (U, V)
    paths = []
    scale = alpha / rank
    for i in range(count):
        g = torch.Generator().manual_seed(seed * 100003 + i + 1)
        tensors = {}
        for name, (U, V) in bases.items():
            n, d = U.shape[0], V.shape[0]
            mix_B = torch.randn(shared_rank, rank, generator=g) / shared_rank**0.5
            mix_A = torch.randn(shared_rank, rank, generator=g) / shared_rank**0.5
            B = U @ mix_B + noise * torch.randn(n, rank, generator=g) / n**0.5
            A = (V @ mix_A + noise * torch.randn(d, rank, generator=g) / d**0.5).T
            module = f"base_model.model.{name}"
            tensors[f"{module}.lora_A.weight"] = A.contiguous().to(_DTYPES[dtype])
            tensors[f"{module}.lora_B.weight"] = (B / scale).contiguous().to(_DTYPES[dtype])
        out = folder / f"{prefix}-{i:03d}"
        out.mkdir(exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": list(targets),
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        paths.append(out)
    return paths
