"""Inputs of benchmarks/identity.py: LoRA files with a planted shared subspace, written byte for byte
the same on every run (fixed seeds, torch only, sorted safetensors headers).

It never imports share_convert, so that the inputs do not depend on the code under test. The PEFT
adapters follow share_convert.synthetic's recipe (ΔW_i = U C_i Vᵀ + noise, U and V fixed per module).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """A safetensors file with its header in sorted order: the same tensors always give the same bytes.

    (``safetensors.torch.save_file`` writes the metadata in the order of a Rust hash map, which
    changes from process to process when there are several keys.)
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name in sorted(tensors):
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def llama_modules(
    layers: int, hidden: int, kv: int, inter: int, targets: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """``model.layers.i.{self_attn,mlp}.<target>`` → (out, in) of a Llama-like model, layer-major."""
    shapes = {
        "q_proj": ("self_attn", hidden, hidden),
        "k_proj": ("self_attn", kv, hidden),
        "v_proj": ("self_attn", kv, hidden),
        "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", inter, hidden),
        "up_proj": ("mlp", inter, hidden),
        "down_proj": ("mlp", hidden, inter),
    }
    return {f"model.layers.{i}.{shapes[t][0]}.{t}": shapes[t][1:] for i in range(layers) for t in targets}


def planted_factors(
    modules: dict[str, tuple[int, int]], *, count: int, rank: int, shared_rank: int, noise: float, seed: int, first: int
):
    """Per task i (first ≤ i < first + count): {module: (down r×in, up out×r)} with ΔW = U C_i Vᵀ + noise.

    U, V are fixed per module by ``seed`` (drawn in the modules' order, so a longer dict keeps the
    bases of its first modules); task i draws from its own generator, so tasks do not depend on
    how many are written at once.
    """
    gen = torch.Generator().manual_seed(seed)
    bases = {}
    for name, (n, d) in modules.items():
        bases[name] = (
            torch.linalg.qr(torch.randn(n, shared_rank, generator=gen)).Q,
            torch.linalg.qr(torch.randn(d, shared_rank, generator=gen)).Q,
        )
    for i in range(first, first + count):
        g = torch.Generator().manual_seed(seed * 100003 + i + 1)
        out = {}
        for name, (U, V) in bases.items():
            n, d = U.shape[0], V.shape[0]
            up = U @ torch.randn(shared_rank, rank, generator=g) / shared_rank**0.5
            down = V @ torch.randn(shared_rank, rank, generator=g) / shared_rank**0.5
            up = up + noise * torch.randn(n, rank, generator=g) / n**0.5
            down = down + noise * torch.randn(d, rank, generator=g) / d**0.5
            out[name] = (down.T.contiguous(), up.contiguous())
        yield i, out


def write_peft(
    folder: Path,
    modules: dict[str, tuple[int, int]],
    *,
    count: int,
    rank: int,
    shared_rank: int,
    noise: float,
    seed: int,
    first: int = 0,
    prefix: str = "task",
    alpha: int = 16,
    dtype: str = "float32",
) -> None:
    """PEFT adapter folders ``prefix-NNN`` with a planted shared subspace (like share_convert.synthetic)."""
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    for i, factors in planted_factors(
        modules, count=count, rank=rank, shared_rank=shared_rank, noise=noise, seed=seed, first=first
    ):
        tensors = {}
        for name, (down, up) in factors.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = down.to(_DTYPES[dtype])
            tensors[f"base_model.model.{name}.lora_B.weight"] = (up / (alpha / rank)).to(_DTYPES[dtype])
        out = folder / f"{prefix}-{i:03d}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "synthetic/llama-like",
            "fan_in_fan_out": False,
            "bias": "none",
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


#: SD 1.x-shaped modules (small widths; attn2.to_k/v read the 768-wide text embedding, which marks SD 1.x):
#: canonical name → (out, in, kernel or None).
_BLOCK = "unet.down_blocks.0.attentions.0"
_TEXT = "text_encoder.text_model.encoder.layers.0"
T2I_MODULES: dict[str, tuple[int, int, tuple[int, int] | None]] = {
    f"{_BLOCK}.proj_in": (32, 32, None),
    **{f"{_BLOCK}.transformer_blocks.0.attn1.{p}": (32, 32, None) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    f"{_BLOCK}.transformer_blocks.0.attn2.to_q": (32, 32, None),
    f"{_BLOCK}.transformer_blocks.0.attn2.to_k": (32, 768, None),
    f"{_BLOCK}.transformer_blocks.0.attn2.to_v": (32, 768, None),
    f"{_BLOCK}.transformer_blocks.0.ff.net.0.proj": (256, 32, None),
    f"{_BLOCK}.transformer_blocks.0.ff.net.2": (32, 128, None),
    "unet.down_blocks.0.resnets.0.conv1": (32, 32, (3, 3)),
    "unet.down_blocks.0.resnets.0.conv2": (32, 32, (3, 3)),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64, None),
    **{f"{_TEXT}.self_attn.{p}": (64, 64, None) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
    f"{_TEXT}.mlp.fc1": (256, 64, None),
    f"{_TEXT}.mlp.fc2": (64, 256, None),
}


def write_t2i(folder: Path, *, seed: int = 7, rank: int = 4) -> None:
    """Three kohya files (k-0..k-2) and three diffusers files (d-0..d-2) of one SD 1.x-like base."""
    flat = {name: (n, d * (k[0] * k[1] if k else 1)) for name, (n, d, k) in T2I_MODULES.items()}
    folder.mkdir(parents=True)
    for i, factors in planted_factors(flat, count=6, rank=rank, shared_rank=3, noise=0.05, seed=seed, first=0):
        tensors: dict[str, torch.Tensor] = {}
        if i < 3:  # kohya: lora_unet_… / lora_te_…, lora_down / lora_up / alpha
            for name, (down, up) in factors.items():
                n, d, kernel = T2I_MODULES[name]
                component, rest = name.split(".", 1)
                key = ("lora_unet_" if component == "unet" else "lora_te_") + rest.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down.reshape(rank, d, *kernel) if kernel else down
                tensors[f"{key}.lora_up.weight"] = up.reshape(n, rank, 1, 1) if kernel else up
                tensors[f"{key}.alpha"] = torch.tensor(2.0)
            meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": "2.0"}
            meta["ss_base_model_version"] = "sd_v1"
            save_file(tensors, str(folder / f"k-{i}.safetensors"), metadata=meta)
        else:  # diffusers: unet.… / text_encoder.…, lora_A / lora_B, LoraConfig in the metadata
            config: dict[str, object] = {}
            for name, (down, up) in factors.items():
                n, d, kernel = T2I_MODULES[name]
                tensors[f"{name}.lora_A.weight"] = down.reshape(rank, d, *kernel) if kernel else down
                tensors[f"{name}.lora_B.weight"] = up.reshape(n, rank, 1, 1) if kernel else up
                component, rest = name.split(".", 1)
                config[f"{component}.r"] = rank
                config[f"{component}.lora_alpha"] = 8.0
                config.setdefault(f"{component}.target_modules", []).append(rest)
            meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
            save_file(tensors, str(folder / f"d-{i - 3}.safetensors"), metadata=meta)
