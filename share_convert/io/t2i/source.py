"""Text-to-image LoRAs as merge inputs: kohya and diffusers files (:class:`T2ISource`) and PEFT
adapters of one pipeline component (:class:`PeftComponentSource`), under canonical module names."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from ...dtypes import itemsize
from ...errors import BadAdapterError, IncompatibleAdaptersError, first_line
from ...names import validate_task_name
from ..factors import LoraFactors
from ..peft import PEFT_PREFIX, AdapterSource, dominant_dtype
from ..provenance import recorded_source
from .naming import DIFFUSERS_WEIGHT_NAME, GRAMMAR, MAX_METADATA_VALUE, T2I_FORMATS
from .parsing import T2IModule, detect_format, parse_diffusers, parse_kohya, read_header, refuse_kinds, sd_base

if TYPE_CHECKING:  # torch is imported where tensors are read, so that light commands start fast
    import torch


class T2ISource:
    """A kohya or diffusers text-to-image LoRA file, opened lazily, under canonical module names.

    A :class:`~share_convert.io.task_source.TaskSource`, like :class:`~share_convert.io.peft.AdapterSource`.
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
        refuse_kinds(h.shapes, self.weights_path)
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
        self.weights_dtype = dominant_dtype(
            {h.dtypes[k] for m in self.modules.values() for k in (m.key_down, m.key_up)}
        )

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
        import torch

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


class PeftComponentSource:
    """A PEFT adapter of one diffusion-pipeline component (a UNet or a Flux transformer, e.g. from
    ``get_peft_model(unet, …)``), under the canonical names (``unet.…``), so that it consolidates
    together with kohya and diffusers files of the same base. Extracted as PEFT, it gets its own
    module names back (:func:`peft_module_name`)."""

    def __init__(self, source: AdapterSource, component: str, prefix: str, base: str):
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


def as_component(source: AdapterSource) -> AdapterSource | PeftComponentSource:
    """``source`` as a :class:`PeftComponentSource` when every module of a PEFT adapter (without
    heads) is a module of a diffusers UNet or Flux transformer; else ``source`` unchanged."""
    if getattr(source, "head_keys", None) or not getattr(source, "modules", None):
        return source
    names = list(source.modules)
    prefix = PEFT_PREFIX if all(n.startswith(PEFT_PREFIX) for n in names) else ""
    for component in ("unet", "transformer"):
        if all(GRAMMAR[component].match(n[len(prefix) :]) for n in names):
            modules = {
                f"{component}.{n[len(prefix) :]}": T2IModule(
                    f"{component}.{n[len(prefix) :]}", s.out_features, s.in_features, s.rank, "", "", None
                )
                for n, s in source.modules.items()
            }
            base = "flux" if component == "transformer" else sd_base(modules)
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
