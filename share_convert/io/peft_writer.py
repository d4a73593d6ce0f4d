"""Writing a task as a PEFT LoRA adapter folder (spec, section 3).

The exported factors are the balanced SVD form of ΔŴ = β E_B (α E_A)ᵀ + P_B P_A with the scale
folded in, so the config says ``r = lora_alpha`` (scale 1). Every module gets the same rank
(modules that need less are padded with zero directions, which change nothing), because serving
engines such as vLLM read one ``r`` per adapter and ignore ``rank_pattern``.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import torch
from safetensors.torch import save_file

from ..dtypes import kept_as
from ..files.atomic import publish_dir, temp_dir_beside
from ..math.linalg import deterministic
from .export import adapter_tensors, padded, prepare_output_dir
from .peft import PEFT_PREFIX
from .t2i.source import peft_module_name
from .written import Extraction, Written

#: vLLM's default ``--max-lora-rank``; adapters of a higher rank need that option raised.
ENGINE_RANK_LIMIT = 16


def write_peft(job: Extraction) -> Written:
    """Write ``job.task`` to the folder ``job.output``: ``adapter_model.safetensors`` (the factors in
    the dtype the task came in, or ``job.dtype``, and its heads as stored) and ``adapter_config.json``."""
    ckpt, task, record, output = job.ckpt, job.task, job.record, job.output
    prepare_output_dir(output, job.force)
    with deterministic():
        factors, width = adapter_tensors(ckpt, task, job.rank, job.truncation)
    dtype = kept_as(job.weights_dtype)
    tensors: dict[str, torch.Tensor] = {}
    for module, (B, A) in factors.items():
        B, A = padded(B, A, width)
        name = peft_module_name(record, module)  # a UNet's PEFT adapter gets its own names back
        tensors[f"{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = B.to(dtype).contiguous()
    heads = ckpt.heads(task)
    tensors.update(heads)
    config = exported_config(record, list(factors), width)
    warnings = engine_warnings(record, heads, width)
    tmp = temp_dir_beside(output)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        publish_dir(tmp, output)  # with the modes the umask gives (safetensors writes 0600, mkdtemp 0700)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Written(path=output, rank=width, modules=len(factors), warnings=warnings)


def exported_config(record: dict[str, Any], modules: list[str], rank: int) -> dict[str, Any]:
    """The original adapter_config with the scale folded: r = lora_alpha = rank (spec, section 3)."""
    cfg = dict(record.get("adapter_config") or {})
    if not cfg:
        names = sorted({m.rsplit(".", 1)[-1] for m in modules})
        cfg = {
            "peft_type": "LORA",
            "target_modules": names,
            "bias": "none",
            "fan_in_fan_out": False,
            "task_type": None,
            "base_model_name_or_path": None,
        }
    cfg.update(
        {
            "r": rank,
            "lora_alpha": rank,
            "use_rslora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
            "peft_type": "LORA",
            "inference_mode": True,
        }
    )
    return cfg


def engine_warnings(record: dict[str, Any], heads: dict[str, torch.Tensor], rank: int) -> list[str]:
    """What serving engines will refuse or need told about this adapter: non-LoRA tensors, a rank above vLLM's default."""
    warnings = []
    if heads:
        names = sorted({k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k for k in heads})
        warnings.append(
            f"carries non-LoRA tensors ({', '.join(names[:3])}{'…' if len(names) > 3 else ''}) saved through "
            "modules_to_save: PEFT loads them, but serving engines such as vLLM reject such adapters"
        )
    if rank > ENGINE_RANK_LIMIT:
        warnings.append(
            f"rank {rank}: vLLM needs --max-lora-rank {rank} or more (its default is {ENGINE_RANK_LIMIT}); "
            "re-extract with --rank to truncate"
        )
    return warnings
