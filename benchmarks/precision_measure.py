"""Independent measurements for benchmarks/bench_precision.py: it never imports share_convert.

- :func:`lora_tensors` / :func:`lora_deltas`: a PEFT adapter folder's LoRA tensors and its update
  ΔW = s · B A per module (s = alpha / r, or alpha / √r with rsLoRA; ``rank_pattern`` and
  ``alpha_pattern`` resolved as PEFT does), in float64.
- :func:`delta_errors`: ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F per module between an original and an extracted adapter.
- :func:`checkpoint_bytes`: the bytes of a Share checkpoint's tensors (one file or shards with an
  index), read from the safetensors headers and split by what they hold.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPE_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8})


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def _pattern(patterns: dict | None, module: str, default: float) -> float:
    """PEFT's rule: a key of the pattern applies where the module's name ends with it (dotted)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_tensors(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, int]]:
    """(module → (A, B)) and byte/parameter counts of the LoRA tensors and of everything else."""
    tensors = read_adapter(folder)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    counts = {"lora_bytes": 0, "lora_params": 0, "other_bytes": 0, "other_params": 0}
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        if ".lora_" in key:
            counts["lora_bytes"] += size
            counts["lora_params"] += t.numel()
        else:
            counts["other_bytes"] += size
            counts["other_params"] += t.numel()
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            pairs[module] = (t, tensors[key.replace(".lora_A.", ".lora_B.")])
    return pairs, counts


def lora_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module → ΔW (float64, B A with the LoRA scale) of the PEFT adapter in ``folder``."""
    config = json.loads((folder / "adapter_config.json").read_text())
    pairs, _ = lora_tensors(folder)
    out = {}
    for module, (a, b) in pairs.items():
        name = module.removeprefix("base_model.model.")
        r = _pattern(config.get("rank_pattern"), name, config.get("r") or a.shape[0])
        alpha = _pattern(config.get("alpha_pattern"), name, config.get("lora_alpha") or r)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[module] = scale * (
            b.to(torch.float64).reshape(b.shape[0], -1) @ a.to(torch.float64).reshape(a.shape[0], -1)
        )
    return out


def delta_errors(original: Path, extracted: Path) -> dict[str, float]:
    """module → relative ΔW error of ``extracted`` against ``original`` (1.0 where a module is missing)."""
    ref, got = lora_deltas(original), lora_deltas(extracted)
    out = {}
    for module, dw in ref.items():
        norm = float(torch.linalg.norm(dw))
        if norm == 0.0:
            continue  # a zero update has no relative error (the report leaves such tasks out too)
        hat = got.get(module)
        if hat is None:
            out[module] = 1.0
            continue
        if hat.shape != dw.shape and hat.T.shape == dw.shape:
            hat = hat.T
        out[module] = float(torch.linalg.norm(dw - hat)) / norm
    return out


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path.with_name(path.name + ".index.json")
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [path.parent / n for n in names]


def checkpoint_bytes(path: Path) -> dict[str, int]:
    """Bytes of the checkpoint's tensors by kind, from the headers.

    ``factors``: tensors under ``modules/`` that hold the task updates (bases, coefficients,
    private factors and whatever codes and scales a quantized format stores beside them);
    ``module_aux``: the Gram matrices and rotation chains under ``modules/`` (needed to add tasks,
    not to rebuild one); ``records``: the per-(task, module) tables; ``heads``: the tasks'
    ``modules_to_save`` tensors; ``other``: anything else; ``files``: the files' sizes on disk.
    """
    out = {"factors": 0, "module_aux": 0, "records": 0, "heads": 0, "other": 0, "files": 0}
    for f in checkpoint_files(path):
        out["files"] += f.stat().st_size
        for name, info in _header(f).items():
            if name == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            last = name.rsplit("/", 1)[-1]
            if name.startswith("tasks/") and "/heads/" in name:
                out["heads"] += size
            elif name.startswith("records/"):
                out["records"] += size
            elif name.startswith("modules/") and last.startswith(("gram_", "rotations_", "chain_rows")):
                out["module_aux"] += size
            elif name.startswith("modules/"):
                out["factors"] += size
            else:
                out["other"] += size
    return out


def sizes(ckpt: Path, lora_bytes: int, lora_params: int) -> dict[str, float]:
    """Size ratio and bits per original LoRA parameter of a checkpoint, with what each counts."""
    b = checkpoint_bytes(ckpt)
    stored = b["factors"] + b["module_aux"] + b["records"] + b["other"]
    return {
        **{f"ckpt_{k}_bytes": v for k, v in b.items()},
        "original_lora_bytes": lora_bytes,
        "original_lora_params": lora_params,
        # every stored tensor but the heads (the originals' non-LoRA tensors, kept as they are)
        "ratio": lora_bytes / stored if stored else float("inf"),
        "ratio_factors_only": lora_bytes / b["factors"] if b["factors"] else float("inf"),
        "bits_per_lora_param": 8 * stored / lora_params,
        "bits_per_lora_param_factors_only": 8 * b["factors"] / lora_params,
    }
