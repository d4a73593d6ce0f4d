"""Extraction: a task back out of a Share checkpoint as a standard PEFT LoRA adapter (spec, section 3).

The exported factors are the balanced SVD form of ΔŴ = β E_B (α E_A)ᵀ + P_B P_A with the scale
folded in, so the config says ``r = lora_alpha`` (scale 1). Every module gets the same rank
(modules that need less are padded with zero directions, which change nothing), because serving
engines such as vLLM read one ``r`` per adapter and ignore ``rank_pattern``.
Only the tensors of the requested task (and the bases of its modules) are read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint.publish import check_parent_writable
from ..checkpoint.reader import Checkpoint
from ..errors import InvalidOptionError, OutputExistsError
from ..files.atomic import publish_dir, temp_dir_beside
from ..math.linalg import canonicalize, deterministic
from ..names import path_under
from . import t2i
from .formats import PEFT_PREFIX

_DTYPES = {"F32": torch.float32, "F64": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

#: vLLM's default ``--max-lora-rank``; adapters of a higher rank need that option raised.
ENGINE_RANK_LIMIT = 16


@dataclass
class ExtractedAdapter:
    """What :func:`extract` wrote."""

    task: str
    path: Path
    rank: int
    modules: int
    warnings: list[str] = field(default_factory=list)
    truncation_error: dict[str, float] | None = None
    """With ``rank``: the relative ΔW error the truncation adds, ‖ΔŴ − ΔŴ_R‖_F / ‖ΔW‖_F, as the
    mean over the task's modules and the worst module; None when nothing was truncated."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "path": str(self.path),
            "rank": self.rank,
            "modules": self.modules,
            "truncation_error": self.truncation_error,
            "warnings": self.warnings,
        }


def prepare_output_dir(path: Path, force: bool) -> None:
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError("exists and is not a folder", path=path, hint="Choose another output folder")
        if any(path.iterdir()) and not force:
            raise OutputExistsError("exists and is not empty", path=path, hint="Pass --force to replace it")
    check_parent_writable(path)


def adapter_tensors(
    ckpt: Checkpoint,
    task: str,
    rank: int | None,
    truncation: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Per module of ``task``: balanced (B̂ n × p, Â p × d) in ``dtype`` (float64 unless asked),
    truncated to ``rank``; converted module by module, so only one module is ever in float64.

    ``truncation`` receives, per module, the relative error the truncation adds: the dropped
    singular values' norm over the original ‖ΔW‖ (Eckart–Young; over ‖ΔŴ‖ when the original's
    norm is not recorded).
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, record in ckpt.task_modules(task).items():
        Bh, Ah = ckpt.reconstruction(task, module)
        Bc, Ac, _ = canonicalize(Bh, Ah, max_rank=rank)
        if truncation is not None and rank is not None:
            full = canonicalize(Bh, Ah)[2]
            dropped = float(full[rank:].square().sum().sqrt())
            norm = float(record.get("norm") or full.square().sum().sqrt())
            truncation[module] = dropped / norm if norm > 0 else 0.0
        out[module] = (Bc.to(dtype), Ac.T.to(dtype).contiguous())
    width = max((b.shape[1] for b, _ in out.values()), default=0)
    return out, max(width, 1)


def extract(
    checkpoint: str | Path | Checkpoint,
    task: str,
    output: str | Path,
    *,
    rank: int | None = None,
    force: bool = False,
    format: str | None = None,
) -> ExtractedAdapter:
    """Write task ``task`` of ``checkpoint`` to the folder ``output`` as a PEFT LoRA adapter.

    ``rank`` re-truncates every module to its best rank-``rank`` approximation. ``format``
    (``peft``, ``kohya``, ``diffusers``; default: the format the task came in) selects the
    text-to-image writers of :mod:`share_convert.io.t2i`.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    record = ckpt.task(task)
    if rank is not None and rank < 1:
        raise InvalidOptionError(f"--rank must be ≥ 1, got {rank}", hint="For example --rank 16")
    output = Path(output)
    # -- text-to-image hook: kohya / diffusers files (share_convert/t2i.py) --
    fmt = t2i.resolve_format(record, format, task)
    truncation: dict[str, float] = {}
    if fmt != "peft":
        dtype = _DTYPES.get(record.get("weights_dtype", "F32"), torch.float32)
        with deterministic():
            factors, width = adapter_tensors(ckpt, task, rank, truncation, dtype=dtype)
        for m, (B, A) in factors.items():  # in place, so one module at a time holds two copies
            factors[m] = _padded(B, A, width)
        w = t2i.write_lora(factors, width, record, fmt, output, task, force=force)
        return ExtractedAdapter(
            task=task,
            path=w.path,
            rank=w.rank,
            modules=w.modules,
            warnings=w.warnings,
            truncation_error=_added_error(rank, truncation),
        )
    # -- end of hook --
    prepare_output_dir(output, force)
    with deterministic():
        factors, width = adapter_tensors(ckpt, task, rank, truncation)
    dtype = _DTYPES.get(record.get("weights_dtype", "F32"), torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    for module, (B, A) in factors.items():
        B, A = _padded(B, A, width)
        name = t2i.peft_module_name(record, module)  # a UNet's PEFT adapter gets its own names back
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
    return ExtractedAdapter(
        task=task,
        path=output,
        rank=width,
        modules=len(factors),
        warnings=warnings,
        truncation_error=_added_error(rank, truncation),
    )


def _added_error(rank: int | None, truncation: dict[str, float]) -> dict[str, float] | None:
    """The mean and worst relative ΔW error a ``--rank`` truncation adds over the modules (None without one)."""
    if rank is None or not truncation:
        return None
    values = list(truncation.values())
    return {"mean": sum(values) / len(values), "max": max(values)}


def _padded(B: torch.Tensor, A: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero directions appended up to ``width`` (they change nothing in ΔW = B A)."""
    pad = width - B.shape[1]
    return torch.cat([B, B.new_zeros(B.shape[0], pad)], 1), torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)


def extract_all(
    checkpoint: str | Path | Checkpoint,
    output: str | Path,
    *,
    rank: int | None = None,
    force: bool = False,
    format: str | None = None,
) -> list[ExtractedAdapter]:
    """Every task, one sub-folder each (named after the task), under ``output``."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    output = Path(output)
    prepare_output_dir(output, force)
    tmp = temp_dir_beside(output)
    try:  # every task is written under a temporary folder, published in one rename at the end
        for t in ckpt.tasks:  # every format is valid before anything is written
            t2i.resolve_format(ckpt.task(t), format, t)
        # each task's folder is named after it: joined under the temporary folder, never outside it
        results = [extract(ckpt, t, path_under(tmp, t, origin=ckpt.path), rank=rank, format=format) for t in ckpt.tasks]
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for r in results:
        r.path = output / r.path.relative_to(tmp)
    return results


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
