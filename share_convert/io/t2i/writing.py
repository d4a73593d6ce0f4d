"""Writing a task as a kohya or diffusers text-to-image LoRA file (one ``.safetensors`` with a
sorted header; the scale folded, so that every alpha equals its module's rank)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...checkpoint.publish import check_parent_writable
from ...dtypes import kept_as, st_name
from ...errors import OutputExistsError
from ...files.atomic import publish_dir, publish_file, temp_dir_beside, temp_file_beside
from ...math.linalg import deterministic
from ...names import path_under
from ..export import adapter_tensors, padded, prepare_output_dir
from ..written import Extraction, Written
from .naming import (
    DIFFUSERS_WEIGHT_NAME,
    FLUX_DOUBLE,
    FLUX_SINGLE,
    FLUX_TOP,
    METADATA_KEY,
    SWAPPED,
    kohya_prefix,
    path_to_sgm,
)

if TYPE_CHECKING:  # torch is imported when a file is written, so that light commands start fast
    import torch

#: module → (B n×width, A width×d): one task's factors, padded to one rank
Factors = dict[str, tuple["torch.Tensor", "torch.Tensor"]]
#: (tensors, metadata, modules written) of a file in one layout
Layout = tuple[dict[str, "torch.Tensor"], dict[str, str], int]


def write_t2i(job: Extraction, fmt: str) -> Written:
    """Write ``job.task`` as a ``fmt`` (kohya or diffusers) file, in the dtype it came in (or ``job.dtype``).

    ``job.output`` ending in ``.safetensors`` is the file; otherwise it is a folder that receives
    ``pytorch_lora_weights.safetensors`` (diffusers, so ``load_lora_weights(folder)`` finds it) or
    ``TASK.safetensors`` (kohya).
    """
    record = job.record
    dtype = kept_as(job.weights_dtype)
    with deterministic():
        factors, width = adapter_tensors(job.ckpt, job.task, job.rank, job.truncation, dtype=dtype)
    for m, (B, A) in factors.items():  # in place, so one module at a time holds two copies
        factors[m] = padded(B, A, width)
    return write_lora(factors, width, record, fmt, job.output, job.task, force=job.force, dtype=dtype)


def write_lora(
    factors: Factors,
    width: int,
    record: dict[str, Any],
    fmt: str,
    output: Path,
    task: str,
    *,
    force: bool,
    dtype: torch.dtype | None = None,
) -> Written:
    """Write one task's padded factors as a ``fmt`` file at ``output`` (see :func:`write_t2i`), in
    ``dtype`` (default: the dtype the task came in)."""
    dtype = dtype or kept_as(record.get("weights_dtype", "F32"))
    tensors, metadata, modules = _LAYOUTS[fmt](factors, width, record["t2i"], dtype)
    target = output
    if output.suffix != ".safetensors":
        name = DIFFUSERS_WEIGHT_NAME if fmt == "diffusers" else f"{task}.safetensors"
        target = path_under(output, name)  # a file named after the task: in the folder, never outside it
        prepare_output_dir(output, force)
        tmp = temp_dir_beside(output)
        try:
            save_sorted(tensors, tmp / target.name, metadata)
            publish_dir(tmp, output)  # with the modes the umask gives
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        if output.exists() and not force:
            raise OutputExistsError("exists", path=output, hint="Pass --force to replace it")
        if output.is_dir():
            raise OutputExistsError("is a folder", path=output, hint="Give a file name ending in .safetensors")
        check_parent_writable(output)
        fd, tmp_file = temp_file_beside(output)
        os.close(fd)
        try:
            save_sorted(tensors, tmp_file, metadata)
            publish_file(tmp_file, output)
        except BaseException:
            tmp_file.unlink(missing_ok=True)
            raise
    return Written(path=target, rank=width, modules=modules)


def _kohya(factors: Factors, width: int, t2i: dict[str, Any], dtype: torch.dtype) -> Layout:
    """kohya-ss layout: ``lora_unet_…`` / ``lora_te…`` names (SGM or BFL naming where the task came
    so), ``lora_down``/``lora_up``/``alpha`` tensors, and the ``ss_*`` metadata kept and updated."""
    import torch

    kernels = t2i.get("kernels", {})
    tensors: dict[str, torch.Tensor] = {}
    base, naming = t2i["base"], t2i.get("naming", "diffusers")
    flux = {n: f for n, f in factors.items() if n.startswith("transformer.")}
    named: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (B, A) in factors.items():
        if name in flux:
            continue
        component, path = name.split(".", 1)
        under = path_to_sgm(path) if component == "unet" and naming == "sgm" else path.replace(".", "_")
        named[kohya_prefix(component, base) + under] = _conv(name, B, A, kernels)
    for bfl, (B, A) in _fuse_flux(flux, width).items():
        named["lora_unet_" + bfl] = (A, B)
    for lora_name, (down, up) in sorted(named.items()):
        tensors[f"{lora_name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{lora_name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{lora_name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    metadata = dict(t2i.get("metadata") or {})
    metadata.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(width),
            "ss_network_alpha": str(width),
            "ss_base_model_version": metadata.get("ss_base_model_version")
            or {"sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd2": "sd_v2"}.get(base, "sd_v1"),
        }
    )
    if kernels and "ss_network_args" in metadata:
        try:
            args = json.loads(metadata["ss_network_args"])
            if isinstance(args, dict) and "conv_dim" in args:
                args.update(conv_dim=str(width), conv_alpha=str(width))
                metadata["ss_network_args"] = json.dumps(args)
        except json.JSONDecodeError:
            pass
    metadata["format"] = "pt"
    return tensors, metadata, len(named)


def _diffusers(factors: Factors, width: int, t2i: dict[str, Any], dtype: torch.dtype) -> Layout:
    """diffusers layout: canonical names with ``lora_A``/``lora_B`` tensors and each component's
    LoraConfig (r = lora_alpha = width) in the ``lora_adapter_metadata`` metadata."""
    kernels = t2i.get("kernels", {})
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for name, (B, A) in factors.items():
        down, up = _conv(name, B, A, kernels)
        tensors[f"{name}.lora_A.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = up.to(dtype).contiguous()
        component, path = name.split(".", 1)
        if component.startswith("text_encoder"):
            # matches CLIP with and without the text_model wrapper (transformers ≥ 5 has none)
            path = path.removeprefix("text_model.")
        config.setdefault(f"{component}.target_modules", []).append(path)
        config[f"{component}.r"] = width
        config[f"{component}.lora_alpha"] = width
    for k in [k for k in config if k.endswith(".target_modules")]:
        config[k] = sorted(config[k])
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return tensors, metadata, len(factors)


#: format → how a task's tensors and metadata are laid out in a file of it
_LAYOUTS: dict[str, Callable[[Factors, int, dict[str, Any], torch.dtype], Layout]] = {
    "kohya": _kohya,
    "diffusers": _diffusers,
}


def _conv(
    name: str, B: torch.Tensor, A: torch.Tensor, kernels: dict[str, list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) in the module's own layout: a conv's down is ``p × in × kh × kw``, its up ``out × p × 1 × 1``."""
    kernel = kernels.get(name)
    if kernel is None:
        return A, B
    kh, kw = kernel
    return A.reshape(A.shape[0], -1, kh, kw), B.reshape(B.shape[0], B.shape[1], 1, 1)


def _fuse_flux(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], width: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Diffusers Flux modules → BFL (kohya) modules: fused projections get down = [A₁; A₂; …] and a
    block-diagonal up (each part ``width`` wide, the layout diffusers' kohya reader recognises as sparse)."""
    import torch

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: set[str] = set()
    for name, (B, A) in factors.items():
        path = name.split(".", 1)[1]
        if name in used:
            continue
        m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", path)
        if m:
            table = FLUX_DOUBLE if m[1] == "transformer_blocks" else FLUX_SINGLE
            kind = "double" if m[1] == "transformer_blocks" else "single"
            bfl, targets = next((k, t) for k, t in table.items() if m[3] in t)
            members = [f"transformer.{m[1]}.{m[2]}.{t}" for t in targets]
            used.update(members)
            if len(targets) == 1:
                out[f"{kind}_blocks_{m[2]}_{bfl}"] = (B, A)
                continue
            d = A.shape[1]
            sizes = []
            for i, t in enumerate(members):
                if t in factors:
                    sizes.append(factors[t][0].shape[0])
                elif i < 3:
                    sizes.append(d)  # q, k, v are hidden × hidden
                else:
                    sizes.append(4 * d)  # Flux's MLP ratio, for an MLP part the LoRA did not train
            downs, ups = [], torch.zeros(sum(sizes), width * len(members), dtype=B.dtype)
            row = 0
            for i, t in enumerate(members):
                Bt, At = factors[t] if t in factors else (B.new_zeros(sizes[i], width), A.new_zeros(width, d))
                downs.append(At)
                ups[row : row + sizes[i], i * width : (i + 1) * width] = Bt
                row += sizes[i]
            out[f"{kind}_blocks_{m[2]}_{bfl}"] = (ups, torch.cat(downs, 0))
            continue
        bfl = next(k for k, v in FLUX_TOP.items() if v == path)
        if path in SWAPPED:
            half = B.shape[0] // 2
            B = torch.cat([B[half:], B[:half]], 0)
        out[bfl] = (B, A)
    return out


def save_sorted(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose header (tensors and metadata) is in sorted order, so that the same
    tensors give the same bytes (``safetensors.torch.save_file`` orders metadata as a hash map does)."""
    import torch

    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": st_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
