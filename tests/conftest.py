"""Shared fixtures: the real adapters in ../shared/data/real-adapters and small synthetic ones."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from .real_adapters import RealAdaptersUnavailable, real_adapters_dir

# No test may reach the real Hub: anything not pointed at a local server fails fast on a closed port.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

# One torch thread in this process and in the processes the tests start, unless OMP_NUM_THREADS
# says otherwise (the thread-count tests set it per process). The tensors here are small, and on
# cores shared with other work torch's OpenMP threads spin against each other: on this 2-core
# machine at load 5-7, test_planning.py + test_extraction.py took 180-233 s with 2 threads and
# 31-44 s with 1 (CPU time 99-135 s against 20-21 s).
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real adapters: $SHARE_REAL_ADAPTERS, ../shared/data/real-adapters, or fetched once
    into a cache from the adapters' source repositories (tests/real_adapters.py).

    Looked up when a test first asks for it, not when this file is imported, so that tests that do not
    use real adapters collect and run without them. When none can be had, every test that asks fails
    with the reason and what to do (the lookup is tried once per session: pytest keeps the failure).
    """
    try:
        return real_adapters_dir()
    except RealAdaptersUnavailable as e:
        reason = str(e)
    pytest.fail(reason, pytrace=False)


@pytest.fixture(scope="session")
def merged(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """Checkpoints of the real adapters, each merged once per session and shared by the tests.

    ``merged("gpt2-c_attn", k=6)`` merges ``real/gpt2-c_attn`` with ``ConsolidationConfig(k=6)``
    the first time it is asked for and returns the same file afterwards. Tests must not change it
    (copy it into ``tmp_path`` first); at the end of the session every shared file is checked to
    be byte for byte what was merged, so a test that changed one is reported.
    """
    from share_convert.engine import ConsolidationConfig, merge
    from share_convert.io import open_adapters

    root = tmp_path_factory.mktemp("merged")
    made: dict[tuple, tuple[Path, str]] = {}

    def get(*groups: str, **config: Any) -> Path:
        key = (groups, tuple(sorted(config.items())))
        if key not in made:
            out = root / str(len(made)) / "share.safetensors"
            out.parent.mkdir()
            merge(open_adapters([str(real / g) for g in groups]), out, ConsolidationConfig(**config))
            made[key] = (out, hashlib.sha256(out.read_bytes()).hexdigest())
        return made[key][0]

    yield get
    changed = [str(p) for p, digest in made.values() if hashlib.sha256(p.read_bytes()).hexdigest() != digest]
    assert not changed, f"a test changed a shared checkpoint (copy it first): {changed}"


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


# SHARE_EMULATED_CUDA=1: every test runs with a CUDA device emulated on the CPU (tests/emulated_cuda.py),
# so that 'auto' and 'cuda' take the device path and any tensor left on the wrong side fails as it
# would on a GPU. The engine's own tests run this way in tests/test_device_path.py.
if os.environ.get("SHARE_EMULATED_CUDA") == "1":

    @pytest.fixture(autouse=True)
    def _emulated_cuda() -> Iterator[None]:
        from .emulated_cuda import emulated_cuda

        with emulated_cuda():
            yield
