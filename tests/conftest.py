"""Shared fixtures: the real adapters in ../shared/data/real-adapters and small synthetic ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .real_adapters import real_adapters_dir

# No test may reach the real Hub: anything not pointed at a local server fails fast on a closed port.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

REPO = Path(__file__).resolve().parents[1]
# $SHARE_REAL_ADAPTERS, ../shared/data/real-adapters, or fetched once into a cache from the adapters'
# source repositories; a clear error when none is possible (tests/real_adapters.py)
REAL = real_adapters_dir()


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real adapters (fails loudly when the shared data is missing)."""
    assert (REAL / "index.json").is_file(), f"real adapters not found at {REAL}; set SHARE_REAL_ADAPTERS"
    return REAL


def write_adapter(
    folder: Path,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int | None = None,
    alpha: float = 16,
    config: dict | None = None,
    heads: dict[str, torch.Tensor] | None = None,
    fmt: str = "safetensors",
    write_config: bool = True,
) -> Path:
    """Write a PEFT adapter folder: ``modules`` maps module names to (A r×d, B n×r)."""
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


def random_factors(n: int, d: int, r: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d, generator=g).to(dtype), torch.randn(n, r, generator=g).to(dtype)


@pytest.fixture
def small_adapters(tmp_path: Path) -> list[Path]:
    """Four adapters over two modules (16×12 and 8×12), mixed ranks and alphas."""
    paths = []
    for i, (r, alpha) in enumerate([(4, 8), (2, 16), (3, 3), (4, 32)]):
        mods = {"layers.0.q": random_factors(16, 12, r, 10 * i), "layers.0.v": random_factors(8, 12, r, 10 * i + 1)}
        paths.append(write_adapter(tmp_path / f"a{i}", mods, alpha=alpha))
    return paths
