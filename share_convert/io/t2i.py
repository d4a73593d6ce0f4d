"""Text-to-image LoRA files: the kohya-ss and diffusers layouts of SD 1.x/2.x, SDXL and Flux.

Every module is read under one canonical name per base architecture: the diffusers module path
behind its pipeline component (``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``),
e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. So a kohya file (in
diffusers or SGM block naming) and a diffusers file of the same base share their modules.

A convolution LoRA (down ``r × in × kh × kw``, up ``out × r × 1 × 1``) is the matrix update
ΔW = up[:, :, 0, 0] @ down.flatten(1) of shape ``out × (in·kh·kw)``, and is consolidated as
such; the kernel shape is kept in the task record so that extraction writes the conv form back.
Flux kohya files fuse projections (``img_attn_qkv``, ``linear1``): they are read as the diffusers
modules they fuse (the rows of ``up`` split, ``down`` shared), and fused again when written.

PEFT adapters of a UNet or Flux transformer are read under the same names
(:class:`PeftComponentSource`), so they consolidate with kohya and diffusers files of their base.

The source format, base, naming, kernel shapes and kohya ``ss_*`` metadata of each task go into
its task record (the checkpoint's manifest), which extraction reads back. User guide:
docs/text-to-image.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint.publish import check_parent_writable
from ..errors import BadAdapterError, IncompatibleAdaptersError, InvalidOptionError, OutputExistsError, first_line
from ..files.atomic import publish_dir, publish_file, temp_dir_beside, temp_file_beside
from ..names import path_under
from .formats import SUPPORTED_DTYPES, LoraFactors, itemsize, validate_task_name
from .provenance import recorded_source

T2I_FORMATS = ("kohya", "diffusers")
EXTRACT_FORMATS = ("peft", *T2I_FORMATS)
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
#: metadata values longer than this (tag frequencies, dataset folders) are not kept in the manifest
MAX_METADATA_VALUE = 4096

# Tensors of adapter kinds that are not LoRA: one clear refusal each (checked before anything else).
_REFUSED = (
    (re.compile(r"\.(hada_w[12]_[ab]|hada_t[12])$"), "a LyCORIS LoHa adapter (hada_* tensors)"),
    (re.compile(r"\.(lokr_w[12](_[ab])?|lokr_t2)$"), "a LyCORIS LoKr adapter (lokr_* tensors)"),
    (re.compile(r"\.lora_mid\.weight$"), "a LyCORIS LoCon adapter with a CP-decomposed kernel (lora_mid)"),
    (re.compile(r"\.dora_scale$|\.lora_magnitude_vector(\.weight)?$"), "a DoRA adapter (dora_scale)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R)(\.weight)?$"), "a LyCORIS OFT adapter"),
    (re.compile(r"\.(diff|diff_b|w_norm|b_norm)$"), "a LyCORIS full-weight or norm adapter"),
)

# -- canonical module names ----------------------------------------------------------------------
# Identifiers that contain '_' in diffusers / transformers module paths; kohya joins path parts
# with '_', so a kohya name is split back by matching these first (longest first).
_WORDS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
        "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "proj_in", "proj_out", "proj_mlp", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj",
        "k_proj", "v_proj", "out_proj", "text_projection", "ff_context", "norm1_context", "norm_out",
        "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "guidance_embedder",
        "text_embedder", "wi_0", "wi_1",
    },
    key=lambda w: -w.count("_"),
)  # fmt: skip
_RESNET = r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
_ATTN = (
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
_GRAMMAR = {
    "unet": re.compile(
        r"^(conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]|"
        rf"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.({_RESNET}|{_ATTN}|(down|up)samplers\.0\.conv))$"
    ),
    "text_encoder": re.compile(
        r"^(text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|text_projection|"
        r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo)))$"
    ),
    "transformer": re.compile(
        r"^(x_embedder|context_embedder|proj_out|norm_out\.linear|"
        r"time_text_embed\.(timestep|guidance|text)_embedder\.linear_[12]|"
        r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|"
        r"ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)|"
        r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear))$"
    ),
}
_GRAMMAR["text_encoder_2"] = _GRAMMAR["text_encoder"]

# Flux: BFL (kohya) module → the diffusers modules it holds, in the order of its output rows.
# A part of None rows is the rest of the rows; "swap" exchanges the two halves (shift, scale).
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",  # rows (shift, scale) in BFL, (scale, shift) in diffusers
}
_SWAPPED = {"norm_out.linear"}


def underscored_to_path(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` → ``down_blocks.0.attentions.0.proj_in`` (kohya's '_' joins)."""
    parts = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for word in _WORDS:
            n = word.count("_") + 1
            if "_".join(parts[i : i + n]) == word:
                out.append(word)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


# SDXL's SGM (original Stability) UNet naming. Layout of SDXL: 2 layers per down block (3 with
# the downsampler), 3 per up block; up blocks 0 and 1 have attentions, so their upsampler is at index 2.
_SGM_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_RESNET_INV = {v: k for k, v in _SGM_RESNET.items()}
_SGM_FIXED = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
_SGM_FIXED_INV = {underscored_to_path(v): k for k, v in _SGM_FIXED.items()}
_SGM_LAYERS = 2
_SGM_UP_ATTENTION = (0, 1)


def is_sgm(name: str) -> bool:
    return name.startswith(("input_blocks_", "middle_block_", "output_blocks_")) or name in _SGM_FIXED


def sgm_to_underscored(name: str) -> str | None:
    """An SGM UNet name (kohya SDXL) as its diffusers name with '_' joins; None when it has no mapping."""
    if name in _SGM_FIXED:
        return _SGM_FIXED[name]

    def resnet(rest: str) -> str | None:
        return _SGM_RESNET.get(rest)

    m = re.match(r"^input_blocks_(\d+)_(\d+)_(.+)$", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = (i - 1) // (_SGM_LAYERS + 1), (i - 1) % (_SGM_LAYERS + 1)
        if i < 1:
            return None
        if layer == _SGM_LAYERS:
            return f"down_blocks_{block}_downsamplers_0_conv" if (j, rest) == (0, "op") else None
        if j == 0:
            r = resnet(rest)
            return f"down_blocks_{block}_resnets_{layer}_{r}" if r else None
        return f"down_blocks_{block}_attentions_{layer}_{rest}" if j == 1 else None
    m = re.match(r"^middle_block_(\d+)_(.+)$", name)
    if m:
        i, rest = int(m[1]), m[2]
        if i == 1:
            return f"mid_block_attentions_0_{rest}"
        r = resnet(rest)
        return f"mid_block_resnets_{i // 2}_{r}" if r and i in (0, 2) else None
    m = re.match(r"^output_blocks_(\d+)_(\d+)_(.+)$", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = i // (_SGM_LAYERS + 1), i % (_SGM_LAYERS + 1)
        if rest == "conv" and j in (1, 2):
            return f"up_blocks_{block}_upsamplers_0_conv"
        if j == 0:
            r = resnet(rest)
            return f"up_blocks_{block}_resnets_{layer}_{r}" if r else None
        return f"up_blocks_{block}_attentions_{layer}_{rest}" if j == 1 else None
    return None


def path_to_sgm(path: str) -> str:
    """The inverse of :func:`sgm_to_underscored` for a diffusers UNet path (SDXL layout)."""
    if path in _SGM_FIXED_INV:
        return _SGM_FIXED_INV[path]
    u = path.replace(".", "_")
    m = re.match(r"^(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)$", u)
    if m:
        side, b, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if side == "down":
            i = b * (_SGM_LAYERS + 1) + layer + 1
            if kind == "downsamplers":
                return f"input_blocks_{b * (_SGM_LAYERS + 1) + _SGM_LAYERS + 1}_0_op"
            if kind == "resnets":
                return f"input_blocks_{i}_0_{_SGM_RESNET_INV[rest]}"
            return f"input_blocks_{i}_1_{rest}"
        i = b * (_SGM_LAYERS + 1) + layer
        if kind == "upsamplers":
            j = 2 if b in _SGM_UP_ATTENTION else 1
            return f"output_blocks_{b * (_SGM_LAYERS + 1) + _SGM_LAYERS}_{j}_conv"
        if kind == "resnets":
            return f"output_blocks_{i}_0_{_SGM_RESNET_INV[rest]}"
        return f"output_blocks_{i}_1_{rest}"
    m = re.match(r"^mid_block_(resnets|attentions)_(\d+)_(.+)$", u)
    if m:
        if m[1] == "attentions":
            return f"middle_block_1_{m[3]}"
        return f"middle_block_{2 * int(m[2])}_{_SGM_RESNET_INV[m[3]]}"
    return u


# -- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class T2IModule:
    """One canonical module of a text-to-image file: where its factors are and how to read them."""

    name: str  # canonical: component + '.' + diffusers path
    out_features: int
    in_features: int  # in·kh·kw for a convolution
    rank: int
    key_down: str
    key_up: str
    alpha: float | None  # None: alpha = rank
    rows: tuple[tuple[int, int], ...] | None = None  # rows of up that are this module's (fused Flux modules)
    kernel: tuple[int, int] | None = None


@dataclass
class _Header:
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


def read_header(path: Path) -> _Header:
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = list(sl.get_shape())
                dtypes[key] = sl.get_dtype()
    except Exception as e:
        raise BadAdapterError(
            f"not a readable safetensors file ({first_line(e)})", path=path, hint="Re-download or re-save the LoRA"
        ) from None
    return _Header(shapes, dtypes, metadata)


def detect_format(keys: Iterable[str]) -> str | None:
    """``"kohya"`` or ``"diffusers"`` when the tensor names are a text-to-image LoRA's; None otherwise."""
    kohya = diffusers = False
    for k in keys:
        if k.startswith(tuple(KOHYA_PREFIXES)) or k.startswith("lora_te3_"):
            kohya = True
        elif k.split(".", 1)[0] in COMPONENTS:
            diffusers = True
    if kohya and diffusers:
        return "mixed"
    return "kohya" if kohya else "diffusers" if diffusers else None


def sniff(path: Path) -> str | None:
    """The text-to-image format of a ``.safetensors`` file from its header, or None (a PEFT file, or not readable)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return detect_format(f.keys())
    except Exception:
        return None  # the PEFT reader reports unreadable files


def _refuse_kinds(keys: Iterable[str], path: Path) -> None:
    for k in sorted(keys):
        for pattern, what in _REFUSED:
            if pattern.search(k):
                raise BadAdapterError(
                    f"is {what} (tensor {k}); only plain LoRA (lora_down/lora_up, lora_A/lora_B) can be consolidated",
                    path=path,
                    hint="Remove it from the inputs",
                )


def _unmapped(key: str, path: Path, fmt: str) -> BadAdapterError:
    return BadAdapterError(
        f"{fmt} tensor {key} names no module share-convert can map (SD 1.x/2.x, SDXL and Flux UNet, "
        "transformer and text encoders)",
        path=path,
        hint="Remove that tensor or this file from the inputs",
    )


def _matrix_shapes(key_down: str, key_up: str, h: _Header, path: Path) -> tuple[int, int, int, tuple[int, int] | None]:
    """(out, in·kh·kw, rank, kernel) of a down/up pair, with every check on dtypes and shapes."""
    for k in (key_down, key_up):
        if h.dtypes[k] not in SUPPORTED_DTYPES:
            raise BadAdapterError(
                f"tensor {k} has dtype {h.dtypes[k]}; LoRA weights must be float32, float16 or bfloat16",
                path=path,
                hint="Re-export the LoRA in a floating-point dtype",
            )
        if len(h.shapes[k]) not in (2, 4) or 0 in h.shapes[k]:
            raise BadAdapterError(
                f"tensor {k} has shape {h.shapes[k]}, not a non-empty matrix or conv kernel",
                path=path,
                hint="The LoRA is broken",
            )
    down, up = h.shapes[key_down], h.shapes[key_up]
    if len(down) != len(up) or (len(up) == 4 and up[2:] != [1, 1]):
        raise BadAdapterError(
            f"tensors {key_down} {down} and {key_up} {up} are not a LoRA pair (linear, or conv with a 1×1 up)",
            path=path,
            hint="The LoRA is broken",
        )
    if down[0] != up[1]:
        raise BadAdapterError(
            f"{key_down} has rank {down[0]} but {key_up} has rank {up[1]}", path=path, hint="The LoRA is broken"
        )
    kernel = (down[2], down[3]) if len(down) == 4 else None
    return up[0], math.prod(down[1:]), down[0], kernel


def _alphas(path: Path, keys: list[str], h: _Header) -> dict[str, float]:
    """The values of the ``alpha`` tensors (one open of the file for all of them)."""
    out: dict[str, float] = {}
    if not keys:
        return out
    with safe_open(path, framework="pt") as f:
        for key in keys:
            if math.prod(h.shapes[key]) != 1:
                raise BadAdapterError(
                    f"alpha tensor {key} has shape {h.shapes[key]}, not a scalar", path=path, hint="The LoRA is broken"
                )
            value = float(f.get_tensor(key).reshape(()).item())
            if not math.isfinite(value) or value <= 0:
                raise BadAdapterError(
                    f"alpha tensor {key} is {value}, not a positive number", path=path, hint="The LoRA is broken"
                )
            out[key] = value
    return out


def _add(modules: dict[str, T2IModule], module: T2IModule, path: Path) -> None:
    """Add ``module``, refusing a second tensor pair for the same module (e.g. both SDXL namings in one file)."""
    if module.name in modules:
        raise BadAdapterError(
            f"tensors {modules[module.name].key_down} and {module.key_down} both adapt module {module.name}",
            path=path,
            hint="Keep one of them",
        )
    modules[module.name] = module


def _split_rows(total: int, parts: int, hidden: int, index: int) -> tuple[int, int]:
    """Rows of part ``index`` of a fused Flux projection: q, k, v are ``hidden`` rows each, the rest is the MLP."""
    if parts == 3:
        size = total // 3
        return index * size, (index + 1) * size
    return (index * hidden, (index + 1) * hidden) if index < 3 else (3 * hidden, total)


def parse_kohya(path: Path, h: _Header) -> tuple[dict[str, T2IModule], str, str]:
    """Canonical modules of a kohya file, its base (sd, sdxl, flux) and UNet naming (diffusers, sgm, bfl)."""
    names: dict[str, dict[str, str]] = {}
    for key in sorted(h.shapes):
        m = re.match(r"^(lora_(?:unet|te|te1|te2)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$", key)
        if not m:
            raise _unmapped(key, path, "kohya")
        names.setdefault(m[1], {})[m[2]] = key
    flux = any(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for n in names)
    sgm = not flux and any(is_sgm(n[len("lora_unet_") :]) for n in names if n.startswith("lora_unet_"))
    te2 = any(n.startswith("lora_te2_") for n in names)
    alphas = _alphas(path, [p["alpha"] for p in names.values() if "alpha" in p], h)
    modules: dict[str, T2IModule] = {}
    for lora_name, parts in names.items():
        for side in ("lora_down.weight", "lora_up.weight"):
            if side not in parts:
                raise BadAdapterError(
                    f"module {lora_name} has no {side} tensor", path=path, hint="The LoRA is incomplete"
                )
        kd, ku = parts["lora_down.weight"], parts["lora_up.weight"]
        out, d, r, kernel = _matrix_shapes(kd, ku, h, path)
        alpha = alphas.get(parts.get("alpha", ""))
        prefix = next(p for p in KOHYA_PREFIXES if lora_name.startswith(p))
        component, rest = KOHYA_PREFIXES[prefix], lora_name[len(prefix) :]
        if flux and component == "unet":
            fused = _flux_parts(rest, out, h.shapes[kd][1])
            if not fused or kernel is not None:
                raise _unmapped(kd, path, "kohya")
            if any(b <= a for _, rows in fused for a, b in rows) or sum(_rows_len(rows) for _, rows in fused) != out:
                raise BadAdapterError(
                    f"{ku} has {out} rows, which do not split into the {len(fused)} projections it fuses",
                    path=path,
                    hint="The LoRA is broken or not for Flux",
                )
            for name, rows in fused:
                _add(modules, T2IModule(f"transformer.{name}", _rows_len(rows), d, r, kd, ku, alpha, rows), path)
            continue
        if component == "unet" and sgm and is_sgm(rest):
            mapped = sgm_to_underscored(rest)
            if mapped is None:
                raise _unmapped(kd, path, "kohya")
            rest = mapped
        name = f"{component}.{underscored_to_path(rest)}"
        if not _GRAMMAR[component].match(name.split(".", 1)[1]):
            raise _unmapped(kd, path, "kohya")
        _add(modules, T2IModule(name, out, d, r, kd, ku, alpha, None, kernel), path)
    base = "flux" if flux else "sdxl" if (te2 or sgm) else _sd_base(modules)
    return modules, base, "bfl" if flux else "sgm" if sgm else "diffusers"


def _rows_len(rows: tuple[tuple[int, int], ...]) -> int:
    return sum(b - a for a, b in rows)


def _flux_parts(rest: str, out: int, hidden: int) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """The diffusers modules (and their rows of ``up``) of one BFL-named Flux module; [] when unknown."""
    m = re.match(r"^(double|single)_blocks_(\d+)_(.+)$", rest)
    if m:
        table, block = (
            (_FLUX_DOUBLE, "transformer_blocks") if m[1] == "double" else (_FLUX_SINGLE, "single_transformer_blocks")
        )
        targets = table.get(m[3])
        if targets is None:
            return []
        if len(targets) == 1:
            return [(f"{block}.{m[2]}.{targets[0]}", ((0, out),))]
        return [(f"{block}.{m[2]}.{t}", (_split_rows(out, len(targets), hidden, i),)) for i, t in enumerate(targets)]
    target = _FLUX_TOP.get(rest)
    if target is None:
        return []
    if target in _SWAPPED:
        return [(target, ((out // 2, out), (0, out // 2)))]
    return [(target, ((0, out),))]


def _sd_base(modules: dict[str, T2IModule]) -> str:
    """SD 1.x/2.x or SDXL from the UNet's structure and cross-attention width (when the file says)."""
    for name in modules:
        if name.startswith("text_encoder_2.") or "add_embedding" in name:
            return "sdxl"
        if re.search(r"transformer_blocks\.[1-9]", name):
            return "sdxl"  # SD 1.x/2.x have one transformer block per attention
    for name, m in modules.items():
        if re.search(r"attn2\.to_k$", name):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(m.in_features, "sd")
    return "sd"


def parse_diffusers(path: Path, h: _Header) -> tuple[dict[str, T2IModule], str, str]:
    """Canonical modules of a diffusers file (``unet.… .lora_A.weight``), its base and naming."""
    pairs: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    for key in sorted(h.shapes):
        m = re.match(r"^(.+)\.lora_(A|B)\.weight$", key)
        if m and m[1].split(".", 1)[0] in COMPONENTS:
            pairs.setdefault(m[1], {})[m[2]] = key
        elif key.endswith(".alpha") and key.split(".", 1)[0] in COMPONENTS:
            alphas[key[: -len(".alpha")]] = key
        else:
            raise _unmapped(key, path, "diffusers")
    config = _diffusers_config(h.metadata, path)
    values = _alphas(path, list(alphas.values()), h)
    modules: dict[str, T2IModule] = {}
    for name, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "B" not in sides else "lora_A"
            raise BadAdapterError(f"module {name} has no {missing} weight", path=path, hint="The LoRA is incomplete")
        component, rest = name.split(".", 1)
        if not _GRAMMAR[component].match(rest):
            raise _unmapped(sides["A"], path, "diffusers")
        out, d, r, kernel = _matrix_shapes(sides["A"], sides["B"], h, path)
        alpha = values[alphas[name]] if name in alphas else _configured_alpha(config, component, rest, r, path)
        modules[name] = T2IModule(name, out, d, r, sides["A"], sides["B"], alpha, None, kernel)
    for name, key in alphas.items():
        if name not in pairs:
            raise _unmapped(key, path, "diffusers")
    if not modules:
        raise BadAdapterError("holds no LoRA tensors", path=path, hint="Pass a LoRA file")
    base = "flux" if any(n.startswith("transformer.") for n in modules) else _sd_base(modules)
    return modules, base, "diffusers"


def _diffusers_config(metadata: dict[str, str], path: Path) -> dict[str, Any] | None:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadAdapterError(
            f"its {METADATA_KEY} metadata is not valid JSON ({first_line(e)})", path=path, hint="Re-save the LoRA"
        ) from None
    if not isinstance(cfg, dict):
        raise BadAdapterError(f"its {METADATA_KEY} metadata is not a JSON object", path=path, hint="Re-save the LoRA")
    if any(cfg.get(k) for k in cfg if k.endswith(".use_dora")):
        raise BadAdapterError(
            "is a DoRA adapter (use_dora in its metadata)", path=path, hint="Remove it from the inputs"
        )
    return cfg


def _configured_alpha(cfg: dict[str, Any] | None, component: str, rest: str, r: int, path: Path) -> float | None:
    """alpha from the component's LoraConfig in the metadata (patterns and rsLoRA applied), as alpha/r = scale."""
    if cfg is None or f"{component}.lora_alpha" not in cfg and f"{component}.r" not in cfg:
        return None

    def pattern(patterns: dict, default: Any) -> Any:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", rest):
                return value
        return default

    rank = pattern(cfg.get(f"{component}.rank_pattern"), cfg.get(f"{component}.r", r))
    alpha = pattern(cfg.get(f"{component}.alpha_pattern"), cfg.get(f"{component}.lora_alpha", rank))
    if int(rank) != r:
        raise BadAdapterError(
            f"module {component}.{rest} has rank {r} in the weights but r={rank} in its {METADATA_KEY}",
            path=path,
            hint="Fix the metadata or re-save the LoRA",
        )
    if cfg.get(f"{component}.use_rslora"):
        return float(alpha) * math.sqrt(r)  # scale alpha/sqrt(r), kept as an alpha over r
    return float(alpha)


class T2ISource:
    """A kohya or diffusers text-to-image LoRA file, opened lazily, under canonical module names.

    Behaves as a consolidation ``TaskSource`` (like :class:`share_convert.io.formats.AdapterSource`).
    """

    def __init__(
        self, path: str | Path, *, task: str | None = None, alpha: float | None = None, origin: str | None = None
    ):
        self.weights_path = Path(path)
        self.origin = origin or str(path)
        h = read_header(self.weights_path)
        self.format = detect_format(h.shapes)
        if self.format not in T2I_FORMATS:
            raise BadAdapterError(
                "mixes kohya (lora_unet_/lora_te_) and diffusers (unet./text_encoder.) tensor names",
                path=self.weights_path,
                hint="Split it into one file per format",
            )
        _refuse_kinds(h.shapes, self.weights_path)
        parse = parse_kohya if self.format == "kohya" else parse_diffusers
        self.modules, self.base, self.naming = parse(self.weights_path, h)
        self.alpha_assumed: float | None = None
        if self.format == "diffusers" and alpha is not None:
            # --alpha stands for a missing config, as for PEFT files
            self.alpha_assumed = float(alpha)
        self.shapes, self.dtypes, self.metadata = h.shapes, h.dtypes, h.metadata
        stem = self.weights_path.name
        default = self.weights_path.resolve().parent.name if stem == DIFFUSERS_WEIGHT_NAME else stem.split(".")[0]
        self.task = validate_task_name(task if task is not None else default, origin=self.origin)
        self.config: dict | None = None
        self.head_keys: list[str] = []
        self._read: set[str] = set()  # modules handed over, for the size of the originals
        seen = {h.dtypes[m.key_down] for m in self.modules.values()} | {
            h.dtypes[m.key_up] for m in self.modules.values()
        }
        self.weights_dtype = next((d for d in ("F64", "F32", "BF16", "F16") if d in seen), "F32")

    def scale(self, module: str) -> float:
        m = self.modules[module]
        if m.alpha is not None:
            return m.alpha / m.rank
        if self.alpha_assumed is not None:
            return self.alpha_assumed / m.rank
        return 1.0  # kohya and diffusers: a missing alpha means alpha = r

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {m.name: (m.out_features, m.in_features, m.rank) for m in self.modules.values()}

    def read_module(self, module: str) -> LoraFactors:
        """ΔW = B @ A with the scale folded into B; a conv's down is flattened to ``r × (in·kh·kw)``."""
        m = self.modules[module]
        self._read.add(module)
        try:
            with safe_open(self.weights_path, framework="pt") as f:
                down, up = f.get_tensor(m.key_down), f.get_tensor(m.key_up)
        except Exception as e:
            raise BadAdapterError(
                f"cannot read tensors ({first_line(e)})", path=self.weights_path, hint="Re-download the LoRA"
            ) from None
        A = down.to(torch.float32).flatten(1)
        B = up.to(torch.float32).flatten(1)
        if m.rows is not None:
            B = torch.cat([B[a:b] for a, b in m.rows], 0)
        B = B * self.scale(module)
        for key, x in ((m.key_down, A), (m.key_up, B)):
            if not torch.isfinite(x).all():
                raise BadAdapterError(
                    f"tensor {key} contains NaN or Inf",
                    path=self.weights_path,
                    hint="This LoRA is broken; retrain or re-export it",
                )
        return LoraFactors(B=B.contiguous(), A=A.contiguous())

    def read_heads(self) -> dict[str, torch.Tensor]:
        return {}

    def prior(self, module: str) -> None:
        return None

    def task_record(self) -> dict[str, Any]:
        """What the manifest keeps: the format, base, naming, conv kernels and kohya metadata.

        Once modules have been read, the size of the originals is that of the file's tensors
        behind them, each counted once: a fused Flux module (``img_attn_qkv``) feeds three
        modules with one ``down``, which a per-module count would count three times.
        """
        record = self._record()
        if self._read:
            keys = {k for name in self._read for k in (self.modules[name].key_down, self.modules[name].key_up)}
            params = sum(math.prod(self.shapes[k]) for k in keys)
            record["original_params"] = params
            record["original_bytes"] = sum(math.prod(self.shapes[k]) * itemsize(self.dtypes[k]) for k in keys)
        return record

    def _record(self) -> dict[str, Any]:
        return {
            "source": recorded_source(self.origin),  # its own name, or its hf:// address
            "format": self.format,
            "adapter_config": None,
            "alpha_assumed": self.alpha_assumed,
            "weights_dtype": self.weights_dtype,
            "heads": [],
            "head_dtypes": {},
            "head_params": 0,
            "head_bytes": 0,
            "t2i": {
                "base": self.base,
                "naming": self.naming,
                "kernels": {m.name: list(m.kernel) for m in self.modules.values() if m.kernel is not None},
                "metadata": kept_metadata(self.metadata),
            },
        }


def kept_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The kohya ``ss_*`` / ``modelspec.*`` metadata worth carrying to an extracted file (short values only)."""
    return {
        k: v
        for k, v in sorted(metadata.items())
        if k.startswith(("ss_", "modelspec.")) and len(v) <= MAX_METADATA_VALUE
    }


def open_source(path: Path, *, task: str | None, alpha: float | None, origin: str) -> T2ISource | None:
    """A :class:`T2ISource` when ``path`` is a kohya or diffusers file, else None (left to the PEFT reader)."""
    fmt = sniff(path)
    if fmt is None:
        return None
    return T2ISource(path, task=task, alpha=alpha, origin=origin)


class PeftComponentSource:
    """A PEFT adapter of one diffusion-pipeline component (a UNet or a Flux transformer, e.g. from
    ``get_peft_model(unet, …)``), under the canonical names (``unet.…``), so that it consolidates
    together with kohya and diffusers files of the same base. Extracted as PEFT, it gets its own
    module names back (:func:`peft_module_name`)."""

    def __init__(self, source: Any, component: str, prefix: str, base: str):
        self._source, self._component, self._prefix = source, component, prefix
        self.task, self.origin, self.config = source.task, source.origin, source.config
        self.head_keys: list[str] = []
        self.weights_dtype = source.weights_dtype
        self._names = {f"{component}.{name[len(prefix) :]}": name for name in source.modules}
        self._base = base

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        shapes = self._source.module_shapes()
        return {canon: shapes[name] for canon, name in self._names.items()}

    def read_module(self, module: str) -> LoraFactors:
        return self._source.read_module(self._names[module])

    def read_heads(self) -> dict[str, torch.Tensor]:
        return {}

    def prior(self, module: str) -> None:
        return None

    def task_record(self) -> dict[str, Any]:
        record = dict(self._source.task_record())
        record["format"] = "peft"
        record["t2i"] = {
            "base": self._base,
            "naming": "diffusers",
            "kernels": {},
            "metadata": {},
            "peft_component": self._component,
            "peft_prefix": self._prefix,
        }
        return record


def as_component(source: Any) -> Any:
    """``source`` as a :class:`PeftComponentSource` when every module of a PEFT adapter (without
    heads) is a module of a diffusers UNet or Flux transformer; else ``source`` unchanged."""
    if getattr(source, "head_keys", None) or not getattr(source, "modules", None):
        return source
    names = list(source.modules)
    prefix = "base_model.model." if all(n.startswith("base_model.model.") for n in names) else ""
    for component in ("unet", "transformer"):
        if all(_GRAMMAR[component].match(n[len(prefix) :]) for n in names):
            modules = {
                f"{component}.{n[len(prefix) :]}": T2IModule(
                    f"{component}.{n[len(prefix) :]}", s.out_features, s.in_features, s.rank, "", "", None
                )
                for n, s in source.modules.items()
            }
            base = "flux" if component == "transformer" else _sd_base(modules)
            return PeftComponentSource(source, component, prefix, base)
    return source


def peft_module_name(record: dict[str, Any], module: str) -> str:
    """The name a module has in a PEFT folder: its own for a PEFT adapter of one pipeline component."""
    t2i = record.get("t2i") or {}
    component = t2i.get("peft_component")
    if component and module.startswith(component + "."):
        return t2i.get("peft_prefix", "") + module[len(component) + 1 :]
    return module


_BASE_NAMES = {"sd": "SD 1.x/2.x", "sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "flux": "Flux"}


def check_same_base(sources: Sequence[Any]) -> None:
    """Refuse text-to-image inputs of different bases (SD 1.5 with SDXL, say), naming both files."""
    first: tuple[str, str] | None = None
    for s in sources:
        base = (s.task_record().get("t2i") or {}).get("base")
        if base is None:
            continue
        if first is None:
            first = (base, s.origin)
            continue
        a, b = first[0], base
        if a != b and not ({a, b} <= {"sd", "sd1"} or {a, b} <= {"sd", "sd2"}):
            raise IncompatibleAdaptersError(
                f"{s.origin} is a {_BASE_NAMES.get(b, b)} LoRA but {first[1]} is a {_BASE_NAMES.get(a, a)} LoRA: "
                "they adapt different base models",
                hint="Consolidate LoRAs of one base model together",
            )


# -- writing ---------------------------------------------------------------------------------------
@dataclass
class WrittenLora:
    """What :func:`write_lora` wrote."""

    path: Path
    rank: int
    modules: int
    warnings: list[str] = field(default_factory=list)


def resolve_format(record: dict[str, Any], requested: str | None, task: str) -> str:
    """The format to extract ``task`` in: the requested one, else the one it came in (PEFT for PEFT inputs)."""
    fmt = requested or record.get("format") or "peft"
    if fmt not in EXTRACT_FORMATS:
        raise InvalidOptionError(
            f"--format {fmt!r} is not one of {', '.join(EXTRACT_FORMATS)}", hint="For example --format kohya"
        )
    t2i = record.get("t2i")
    if fmt in T2I_FORMATS and not t2i:
        raise InvalidOptionError(
            f"task {task} came from a PEFT adapter, which says nothing about a diffusion pipeline's components; "
            f"it cannot be written as a {fmt} file",
            hint="Extract it with --format peft",
        )
    if fmt == "peft" and t2i and not t2i.get("peft_component"):
        raise InvalidOptionError(
            f"task {task} came from a {record.get('format')} text-to-image LoRA, whose modules span several "
            "pipeline components; a PEFT folder adapts one model",
            hint="Extract it with --format kohya or --format diffusers",
        )
    return fmt


def _kohya_prefix(component: str, base: str) -> str:
    if component in ("unet", "transformer"):
        return "lora_unet_"
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if base in ("sdxl", "flux") else "lora_te_"


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
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: set[str] = set()
    for name, (B, A) in factors.items():
        path = name.split(".", 1)[1]
        if name in used:
            continue
        m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", path)
        if m:
            table = _FLUX_DOUBLE if m[1] == "transformer_blocks" else _FLUX_SINGLE
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
        bfl = next(k for k, v in _FLUX_TOP.items() if v == path)
        if path in _SWAPPED:
            half = B.shape[0] // 2
            B = torch.cat([B[half:], B[:half]], 0)
        out[bfl] = (B, A)
    return out


def write_lora(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    width: int,
    record: dict[str, Any],
    fmt: str,
    output: Path,
    task: str,
    *,
    force: bool,
) -> WrittenLora:
    """Write one task's padded factors (module → (B n×width, A width×d)) as a kohya or diffusers file.

    ``output`` ending in ``.safetensors`` is the file; otherwise it is a folder that receives
    ``pytorch_lora_weights.safetensors`` (diffusers, so ``load_lora_weights(folder)`` finds it) or
    ``TASK.safetensors`` (kohya). The scale is folded: every alpha equals its module's rank.
    """
    t2i = record["t2i"]
    dtype = {"F32": torch.float32, "F64": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
        record.get("weights_dtype", "F32"), torch.float32
    )
    kernels = t2i.get("kernels", {})
    tensors: dict[str, torch.Tensor] = {}
    if fmt == "kohya":
        base, naming = t2i["base"], t2i.get("naming", "diffusers")
        flux = {n: f for n, f in factors.items() if n.startswith("transformer.")}
        named: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (B, A) in factors.items():
            if name in flux:
                continue
            component, path = name.split(".", 1)
            under = path_to_sgm(path) if component == "unet" and naming == "sgm" else path.replace(".", "_")
            named[_kohya_prefix(component, base) + under] = _conv(name, B, A, kernels)
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
        modules_written = len(named)
    else:
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
        modules_written = len(factors)
    target = output
    folder = output.suffix != ".safetensors"
    if folder:
        name = DIFFUSERS_WEIGHT_NAME if fmt == "diffusers" else f"{task}.safetensors"
        target = path_under(output, name)  # a file named after the task: in the folder, never outside it
        _prepare_folder(output, force)
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
    return WrittenLora(path=target, rank=width, modules=modules_written)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_sorted(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose header (tensors and metadata) is in sorted order, so that the same
    tensors give the same bytes (``safetensors.torch.save_file`` orders metadata as a hash map does)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _prepare_folder(path: Path, force: bool) -> None:
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError("exists and is not a folder", path=path, hint="Choose another output")
        if any(path.iterdir()) and not force:
            raise OutputExistsError("exists and is not empty", path=path, hint="Pass --force to replace it")
    check_parent_writable(path)
