"""Parsing a text-to-image LoRA file's header: its format (kohya or diffusers), its canonical
modules (with their tensors, alphas, fused rows and conv kernels), its base and its naming."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ...dtypes import FLOAT_NAMES
from ...errors import BadAdapterError, first_line
from ..peft import pattern_value
from .naming import (
    COMPONENTS,
    FLUX_DOUBLE,
    FLUX_SINGLE,
    FLUX_TOP,
    GRAMMAR,
    KOHYA_PREFIXES,
    METADATA_KEY,
    SWAPPED,
    is_sgm,
    sgm_to_underscored,
    underscored_to_path,
)

# Tensors of adapter kinds that are not LoRA: one clear refusal each (checked before anything else).
_REFUSED = (
    (re.compile(r"\.(hada_w[12]_[ab]|hada_t[12])$"), "a LyCORIS LoHa adapter (hada_* tensors)"),
    (re.compile(r"\.(lokr_w[12](_[ab])?|lokr_t2)$"), "a LyCORIS LoKr adapter (lokr_* tensors)"),
    (re.compile(r"\.lora_mid\.weight$"), "a LyCORIS LoCon adapter with a CP-decomposed kernel (lora_mid)"),
    (re.compile(r"\.dora_scale$|\.lora_magnitude_vector(\.weight)?$"), "a DoRA adapter (dora_scale)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_R)(\.weight)?$"), "a LyCORIS OFT adapter"),
    (re.compile(r"\.(diff|diff_b|w_norm|b_norm)$"), "a LyCORIS full-weight or norm adapter"),
)


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


def refuse_kinds(keys: Iterable[str], path: Path) -> None:
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
        if h.dtypes[k] not in FLOAT_NAMES:
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
        if not GRAMMAR[component].match(name.split(".", 1)[1]):
            raise _unmapped(kd, path, "kohya")
        _add(modules, T2IModule(name, out, d, r, kd, ku, alpha, None, kernel), path)
    base = "flux" if flux else "sdxl" if (te2 or sgm) else sd_base(modules)
    return modules, base, "bfl" if flux else "sgm" if sgm else "diffusers"


def _rows_len(rows: tuple[tuple[int, int], ...]) -> int:
    return sum(b - a for a, b in rows)


def _flux_parts(rest: str, out: int, hidden: int) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """The diffusers modules (and their rows of ``up``) of one BFL-named Flux module; [] when unknown."""
    m = re.match(r"^(double|single)_blocks_(\d+)_(.+)$", rest)
    if m:
        table, block = (
            (FLUX_DOUBLE, "transformer_blocks") if m[1] == "double" else (FLUX_SINGLE, "single_transformer_blocks")
        )
        targets = table.get(m[3])
        if targets is None:
            return []
        if len(targets) == 1:
            return [(f"{block}.{m[2]}.{targets[0]}", ((0, out),))]
        return [(f"{block}.{m[2]}.{t}", (_split_rows(out, len(targets), hidden, i),)) for i, t in enumerate(targets)]
    target = FLUX_TOP.get(rest)
    if target is None:
        return []
    if target in SWAPPED:
        return [(target, ((out // 2, out), (0, out // 2)))]
    return [(target, ((0, out),))]


def sd_base(modules: dict[str, T2IModule]) -> str:
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
        if not GRAMMAR[component].match(rest):
            raise _unmapped(sides["A"], path, "diffusers")
        out, d, r, kernel = _matrix_shapes(sides["A"], sides["B"], h, path)
        alpha = values[alphas[name]] if name in alphas else _configured_alpha(config, component, rest, r, path)
        modules[name] = T2IModule(name, out, d, r, sides["A"], sides["B"], alpha, None, kernel)
    for name, key in alphas.items():
        if name not in pairs:
            raise _unmapped(key, path, "diffusers")
    if not modules:
        raise BadAdapterError("holds no LoRA tensors", path=path, hint="Pass a LoRA file")
    base = "flux" if any(n.startswith("transformer.") for n in modules) else sd_base(modules)
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
    rank = pattern_value(cfg.get(f"{component}.rank_pattern"), rest, cfg.get(f"{component}.r", r))
    alpha = pattern_value(cfg.get(f"{component}.alpha_pattern"), rest, cfg.get(f"{component}.lora_alpha", rank))
    if int(rank) != r:
        raise BadAdapterError(
            f"module {component}.{rest} has rank {r} in the weights but r={rank} in its {METADATA_KEY}",
            path=path,
            hint="Fix the metadata or re-save the LoRA",
        )
    if cfg.get(f"{component}.use_rslora"):
        return float(alpha) * math.sqrt(r)  # scale alpha/sqrt(r), kept as an alpha over r
    return float(alpha)
