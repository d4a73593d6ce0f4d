"""Adapter files written from given factors: PEFT folders, kohya files and diffusers files.

The tests compute what they expect from the tensors they pass in, never from the reader under test,
so these writers do nothing but lay the tensors out under each format's key names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

Factors = tuple[torch.Tensor, torch.Tensor]


def random_factors(n: int, d: int, r: int, seed: int, dtype=torch.float32) -> Factors:
    """Random LoRA factors (A r×d, B n×r) of one module, from their own generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d, generator=g).to(dtype), torch.randn(n, r, generator=g).to(dtype)


def write_adapter(
    folder: Path,
    modules: dict[str, Factors],
    *,
    r: int | None = None,
    alpha: float = 16,
    config: dict | None = None,
    heads: dict[str, torch.Tensor] | None = None,
    fmt: str = "safetensors",
    write_config: bool = True,
) -> Path:
    """Write a PEFT adapter folder: ``modules`` maps module names to (A r×d, B n×r).

    ``heads`` are extra tensors stored as they are (a classifier, say); ``fmt="bin"`` writes
    ``adapter_model.bin`` with ``torch.save``; ``config`` overrides fields of the written
    ``adapter_config.json`` (rank ``r``, default the first module's, and ``alpha``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A, B) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    tensors.update(heads or {})
    if fmt == "safetensors":
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    if write_config:
        rank = r if r is not None else next(iter(modules.values()))[0].shape[0]
        cfg = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "test/base",
            "fan_in_fan_out": False,
            "bias": "none",
        }
        cfg.update(config or {})
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def write_small_adapters(root: Path) -> list[Path]:
    """Four adapters over two modules (16×12 and 8×12), mixed ranks and alphas: ``root/a0`` … ``root/a3``."""
    paths = []
    for i, (r, alpha) in enumerate([(4, 8), (2, 16), (3, 3), (4, 32)]):
        mods = {"layers.0.q": random_factors(16, 12, r, 10 * i), "layers.0.v": random_factors(8, 12, r, 10 * i + 1)}
        paths.append(write_adapter(root / f"a{i}", mods, alpha=alpha))
    return paths


def write_kohya(
    path: Path,
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float | torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a kohya LoRA file: ``modules`` maps kohya names (``lora_unet_…``, ``lora_te_…``) to
    (down r×in…, up out×r…); ``alpha`` (when given: a number, or a 0-d tensor of the wanted dtype) is
    stored as each module's ``.alpha`` tensor."""
    tensors = {}
    for name, (down, up) in modules.items():
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            # a tensor of its own per module: safetensors refuses tensors that share memory
            tensors[f"{name}.alpha"] = alpha.clone() if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_diffusers(
    path: Path, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, lora_config: dict | None = None
) -> Path:
    """Write a diffusers LoRA file: ``modules`` maps ``component.path`` names (``unet.…``) to (A, B);
    ``lora_config`` (when given) is stored as the ``lora_adapter_metadata`` diffusers reads."""
    tensors = {}
    for name, (down, up) in modules.items():
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
    metadata = None if lora_config is None else {"format": "pt", "lora_adapter_metadata": json.dumps(lora_config)}
    save_file(tensors, str(path), metadata=metadata)
    return path
