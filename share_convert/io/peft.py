"""PEFT LoRA adapters: a PEFT folder, or a bare ``.safetensors`` / ``.bin`` weights file.

An :class:`AdapterSource` is lazy, like ``safetensors.safe_open``: opening it reads only the
header (names, shapes, dtypes) and the config; :meth:`AdapterSource.read_module` hands over
one module's factors when asked. Consolidation walks module by module, so memory holds one
module's stack at a time, whatever the number of adapters.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from ..dtypes import FLOAT_NAMES, itemsize, torch_dtype
from ..errors import BadAdapterError, first_line
from ..names import key_problem, validate_task_name
from .factors import LoraFactors
from .provenance import recorded_source
from .stack import ModuleLocation, OpenFiles, from_bytes, read_exactly

if TYPE_CHECKING:  # torch is imported where tensors are read, so that light commands start fast
    import torch

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
#: A safetensors header is at most 100 MB (safetensors' own limit): no more is read before it refuses it.
HEADER_LIMIT = 100_000_000
#: Entries of the dictionary shared by adapters opened together, past which headers are no longer kept.
SHARED_LIMIT = 1_000_000


def _st_name(dtype: torch.dtype) -> str:
    """The safetensors name of a float torch dtype (``torch.float32`` → ``"F32"``); torch's own
    name for another dtype (a ``.bin`` file's integer head), as the task record has always said."""
    return {torch_dtype(name): name for name in FLOAT_NAMES}.get(dtype, str(dtype))


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_REFUSED_KEYS = {
    "lora_embedding_A": "embedding LoRA (lora_embedding_A/B) is not supported",
    "lora_embedding_B": "embedding LoRA (lora_embedding_A/B) is not supported",
    "lora_magnitude_vector": "DoRA adapters (lora_magnitude_vector) are not supported",
}


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted layer as the header describes it: ΔW is ``out_features × in_features``."""

    name: str
    out_features: int
    in_features: int
    rank: int
    key_A: str
    key_B: str


def task_name_for(path: Path) -> str:
    """The default task name: the folder of a PEFT adapter, or the file's stem."""
    if path.is_dir():
        return path.resolve().name
    if path.name in WEIGHT_NAMES:
        return path.resolve().parent.name
    return path.name.split(".")[0] if path.name.endswith(".safetensors") else path.stem


def _raw_header(path: Path) -> tuple[bytes, int]:
    """A safetensors file's header as stored (its length prefix and JSON text), and the file's size."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        (size,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        raw = prefix + f.read(min(size, HEADER_LIMIT))
        return raw, os.fstat(f.fileno()).st_size


def _data_offsets(raw: bytes, shared: dict[tuple, tuple]) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file (absolute offsets), from its header
    (``raw``: the length prefix and the JSON text)."""
    header = json.loads(raw[8:])
    start = len(raw)
    # names interned: many adapters of one base share them, and a merge holds every adapter's header
    return {
        sys.intern(k): _one_copy(shared, (start + v["data_offsets"][0], start + v["data_offsets"][1]))
        for k, v in header.items()
        if k != "__metadata__"
    }


def _one_copy(shared: dict[tuple, tuple], value: tuple) -> tuple:
    """One copy of equal tuples (shapes, pairs of offsets) among the adapters opened together:
    adapters of one base repeat them, and a merge holds every adapter's header."""
    return shared.setdefault(value, value)


class AdapterSource:
    """A LoRA adapter on disk, opened lazily (only its header and config are read).

    Args:
        path: a PEFT folder, or a ``.safetensors`` / ``.bin`` weights file.
        task: the task name; defaults to the folder or file name.
        alpha: ``lora_alpha`` to assume when no config is found beside a bare weights file.
        origin: what the user typed, for messages.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        task: str | None = None,
        alpha: float | None = None,
        origin: str | None = None,
        shared: dict[tuple, tuple] | None = None,
    ):
        path = Path(path)
        self.origin = origin or str(path)
        #: equal tuples (shapes, offsets) kept once among adapters opened together (``open_adapters``),
        #: and what was read from each distinct header (adapters of one base share their headers)
        shared = shared if shared is not None else {}
        self.config, self.weights_path, self.config_path = _locate(path, self.origin)
        self.alpha_assumed: float | None = None
        if self.config is None:
            if alpha is None:
                stem = self.weights_path.name[: -len(self.weights_path.suffix)]
                looked = [f"{stem}.json", f"{stem}_config.json"]
                if self.weights_path.name in WEIGHT_NAMES:
                    looked.insert(0, CONFIG_NAME)
                raise BadAdapterError(
                    f"no config beside this weights file ({' or '.join(looked)}), so its scale is unknown",
                    path=self.weights_path,
                    hint="Give --alpha (the lora_alpha it was trained with) or put its config beside it",
                )
            self.alpha_assumed = float(alpha)
        _check_config(self.config, self.config_path)
        self.task = validate_task_name(task if task is not None else task_name_for(path), origin=self.origin)
        self._bin: dict[str, torch.Tensor] | None = None
        shapes, dtypes, raw = self._read_header(shared)
        parsed = shared.get(("keys", raw)) if raw is not None else None
        if parsed is None:
            modules, heads = _parse_keys(shapes, dtypes, self.weights_path)
            weights_dtype = dominant_dtype({dtypes[k] for s in modules.values() for k in (s.key_A, s.key_B)})
            parsed = (modules, tuple(heads), weights_dtype)
            if raw is not None:
                shared[("keys", raw)] = parsed
        modules, heads, self.weights_dtype = parsed
        self.modules, self.head_keys = dict(modules), list(heads)
        self.dtypes = dtypes
        self.shapes = shapes
        #: each module's scale, validated against the config up front
        self._scales = self._module_scales()

    def __getstate__(self) -> dict[str, Any]:
        """Sent to another process (a Ray worker) without the tensors of a ``.bin`` file loaded
        here: the receiver loads them from the file when it reads them."""
        return {**self.__dict__, "_bin": None}

    # -- header -------------------------------------------------------------------------------
    def _read_header(self, shared: dict[tuple, tuple]) -> tuple[dict[str, Any], dict[str, str], bytes | None]:
        """Shapes and dtypes by tensor key (and the offsets, in ``_offsets``), and the header as stored
        (None for a ``.bin`` file). A header seen before in ``shared`` (adapters of one base have the
        same bytes there) is not parsed again: safetensors' checks depend only on the header and the
        file's size, so a file of the same size with the same header passes them as the first did.
        The dictionaries are then shared between those adapters: they are read, never changed."""
        shapes: dict[str, Any] = {}
        dtypes: dict[str, str] = {}
        if self.weights_path.suffix == ".bin":
            for key, tensor in self._load_bin().items():
                shapes[key] = list(tensor.shape)
                dtypes[key] = _st_name(tensor.dtype)
            return shapes, dtypes, None
        try:
            raw, file_size = _raw_header(self.weights_path)
        except OSError:  # safetensors says why, below
            raw, file_size = None, None
        seen = shared.get(("header", raw)) if raw is not None else None
        if seen is not None and seen[0] == file_size:
            _, shapes, dtypes, self._offsets = seen
            return shapes, dtypes, raw
        try:
            with safe_open(self.weights_path, framework="pt") as f:  # validates the header and offsets
                for key in f.keys():
                    sl = f.get_slice(key)
                    key = sys.intern(key)
                    shapes[key] = _one_copy(shared, tuple(sl.get_shape()))
                    dtypes[key] = sys.intern(sl.get_dtype())
            if raw is None:
                raw, file_size = _raw_header(self.weights_path)
            self._offsets = _data_offsets(raw, shared)
        except Exception as e:  # safetensors raises several types for malformed files
            raise BadAdapterError(
                f"not a readable safetensors file ({first_line(e)})",
                path=self.weights_path,
                hint="Re-download or re-save the adapter",
            ) from None
        if len(shared) < SHARED_LIMIT:  # inputs with thousands of layouts keep the old cost, not the memory
            shared[("header", raw)] = (file_size, shapes, dtypes, self._offsets)
        return shapes, dtypes, raw

    def _load_bin(self) -> dict[str, torch.Tensor]:
        import torch

        if self._bin is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's warnings about pickle protocols are not the user's concern
                try:
                    obj = torch.load(self.weights_path, map_location="cpu", weights_only=True, mmap=True)
                except Exception:
                    try:  # old (non-zip) torch files cannot be memory-mapped
                        obj = torch.load(self.weights_path, map_location="cpu", weights_only=True)
                    except Exception as e:
                        raise BadAdapterError(
                            f"cannot be loaded safely as a tensor file ({first_line(e)}); nothing in it was executed",
                            path=self.weights_path,
                            hint="Convert it to .safetensors from a trusted environment",
                        ) from None
            if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
            ):
                raise BadAdapterError(
                    "is not a dictionary of named tensors",
                    path=self.weights_path,
                    hint="Pass a PEFT adapter_model.bin or .safetensors file",
                )
            self._bin = obj
        return self._bin

    # -- scale ----------------------------------------------------------------------------------
    def _module_scales(self) -> dict[str, float]:
        """:meth:`scale` of every module (the first whose rank disagrees with the config raises).
        Without rank or alpha patterns a module's scale depends on its rank alone: computed once per rank."""
        cfg = self.config
        if cfg is not None and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
            return {spec.name: self.scale(spec.name) for spec in self.modules.values()}
        by_rank: dict[int, float] = {}
        out: dict[str, float] = {}
        for spec in self.modules.values():
            value = by_rank.get(spec.rank)
            if value is None:
                value = by_rank[spec.rank] = self.scale(spec.name)
            out[spec.name] = value
        return out

    def scale(self, module: str) -> float:
        """s = lora_alpha / r (or / sqrt(r) with rsLoRA), with rank/alpha patterns applied."""
        spec = self.modules[module]
        if self.config is None:
            return self.alpha_assumed / spec.rank  # type: ignore[operator]
        cfg = self.config
        name = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
        if int(r) != spec.rank:
            raise BadAdapterError(
                f"module {module} has rank {spec.rank} in the weights but r={r} in the config",
                path=self.config_path,
                hint="Fix r or rank_pattern in adapter_config.json",
            )
        if cfg.get("use_rslora"):
            return float(alpha) / math.sqrt(spec.rank)
        return float(alpha) / spec.rank

    # -- data -----------------------------------------------------------------------------------
    def _get(self, keys: list[str]) -> dict[str, torch.Tensor]:

        if self.weights_path.suffix == ".bin":
            data = self._load_bin()
            return {k: data[k] for k in keys}
        try:
            # opened per call: a handle kept open keeps the file's pages mapped, and memory would
            # grow with the number of adapters. The header was parsed once, on open: a read is a
            # seek and a read per tensor, not a parse of the whole header per module.
            if all(self.dtypes[k] in FLOAT_NAMES for k in keys):
                out = {}
                with OpenFiles(limit=1) as files:  # the file opened once for these tensors
                    for k in keys:
                        begin, end = self._offsets[k]
                        raw = bytearray(end - begin)
                        read_exactly(files, self.weights_path, begin, memoryview(raw))
                        out[k] = from_bytes(raw, torch_dtype(self.dtypes[k]), tuple(self.shapes[k]))
                return out
            with safe_open(self.weights_path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:
            raise BadAdapterError(
                f"cannot read tensors ({first_line(e)})", path=self.weights_path, hint="Re-download the adapter"
            ) from None

    def read_module(self, module: str) -> LoraFactors:
        """One module's factors, scale folded, as float32; rejects NaN and Inf."""
        import torch

        spec = self.modules[module]
        t = self._get([spec.key_A, spec.key_B])
        A = t[spec.key_A].to(torch.float32)
        B = t[spec.key_B].to(torch.float32) * self._scales[module]
        return LoraFactors.checked(B, A, (spec.key_B, spec.key_A), self.weights_path)

    def locate(self, module: str) -> ModuleLocation | None:
        """Where ``module``'s factors lie in the weights file, for :func:`read_module_stack`;
        None when they cannot be read as raw bytes (a ``.bin`` file, an unusual dtype)."""
        spec = self.modules[module]
        if self.weights_path.suffix == ".bin":
            return None
        dtype = self.dtypes[spec.key_B]
        if dtype not in FLOAT_NAMES or self.dtypes[spec.key_A] != dtype:
            return None
        return ModuleLocation(
            self.weights_path,
            dtype,
            tuple(self.shapes[spec.key_B]),
            tuple(self.shapes[spec.key_A]),
            self._offsets[spec.key_B],
            self._offsets[spec.key_A],
            self._scales[module],
            (spec.key_B, spec.key_A),
        )

    def read_heads(self) -> dict[str, torch.Tensor]:
        """The non-LoRA tensors (classifier heads, ``modules_to_save``), unchanged."""
        return self._get(list(self.head_keys)) if self.head_keys else {}

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Module name → (out_features, in_features, rank)."""
        return {m.name: (m.out_features, m.in_features, m.rank) for m in self.modules.values()}

    def prior(self, module: str) -> None:
        """An adapter is an original: its ΔW is exact (no prior reconstruction error)."""
        return None

    def task_record(self) -> dict[str, Any]:
        """What the checkpoint keeps about this task (manifest ``tasks`` entry)."""
        return {
            "source": recorded_source(self.origin),  # its own name, or its hf:// address
            "adapter_config": self.config,
            "alpha_assumed": self.alpha_assumed,
            "weights_dtype": self.weights_dtype,
            "heads": list(self.head_keys),
            "head_dtypes": {k: self.dtypes[k] for k in self.head_keys},
            "head_params": sum(math.prod(self.shapes[k]) for k in self.head_keys),
            "head_bytes": sum(math.prod(self.shapes[k]) * itemsize(self.dtypes[k]) for k in self.head_keys),
        }


def _locate(path: Path, origin: str) -> tuple[dict | None, Path, Path | None]:
    """Find the weights file and config for ``path``; read the config if any."""
    if not path.exists():
        raise BadAdapterError("no such file or folder", path=origin, hint="Check the path")
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise BadAdapterError(
                "folder holds no adapter_model.safetensors or adapter_model.bin",
                path=origin,
                hint="Pass a PEFT adapter folder or the weights files themselves",
            )
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise BadAdapterError(
                "PEFT folder without adapter_config.json",
                path=origin,
                hint="Restore the config, or pass the weights file with --alpha",
            )
        return _read_config(config_path), weights, config_path
    if path.suffix not in (".safetensors", ".bin"):
        raise BadAdapterError(
            "is not a .safetensors or .bin file", path=origin, hint="Pass PEFT folders or adapter weights files"
        )
    stem = path.name[: -len(path.suffix)]
    candidates = [path.parent / f"{stem}.json", path.parent / f"{stem}_config.json"]
    if path.name in WEIGHT_NAMES:
        candidates.insert(0, path.parent / CONFIG_NAME)
    for c in candidates:
        if c.is_file():
            return _read_config(c), path, c
    return None, path, None


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadAdapterError(
            f"config is not valid JSON ({first_line(e)})", path=path, hint="Fix or restore adapter_config.json"
        ) from None
    if not isinstance(cfg, dict):
        raise BadAdapterError("config is not a JSON object", path=path, hint="Fix or restore adapter_config.json")
    return cfg


def _check_config(cfg: dict | None, path: Path | None) -> None:
    if cfg is None:
        return
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise BadAdapterError(
            f"is a {peft_type} adapter; only LoRA adapters can be consolidated",
            path=path,
            hint="Remove it from the inputs",
        )
    if cfg.get("use_dora"):
        raise BadAdapterError(
            "is a DoRA adapter (use_dora=true), which share-convert does not support",
            path=path,
            hint="Remove it from the inputs",
        )
    for key in ("r", "lora_alpha"):
        if key in cfg and not (isinstance(cfg[key], (int, float)) and not isinstance(cfg[key], bool) and cfg[key] > 0):
            raise BadAdapterError(
                f"config has an invalid {key}: {cfg[key]!r}", path=path, hint="Fix adapter_config.json"
            )


def pattern_value(patterns: dict | None, name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies when the module name ends with it (on a '.' boundary)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _parse_keys(
    shapes: dict[str, list[int]], dtypes: dict[str, str], path: Path
) -> tuple[dict[str, ModuleSpec], list[str]]:
    pairs: dict[str, dict[str, str]] = {}
    heads: list[str] = []
    for key in sorted(shapes):
        problem = key_problem(key)
        if problem:
            raise BadAdapterError(
                f"a tensor's key {problem}", path=path, hint="Re-save the adapter with plain tensor names"
            )
        for marker, why in _REFUSED_KEYS.items():
            if f".{marker}" in key:
                raise BadAdapterError(why, path=path, hint="Remove this adapter from the inputs")
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["side"]] = key
        elif ".lora_" in key:
            raise BadAdapterError(
                f"unsupported LoRA tensor {key}", path=path, hint="Only lora_A/lora_B weights are supported"
            )
        else:
            heads.append(key)
    if not pairs:
        raise BadAdapterError(
            "holds no LoRA tensors (no *.lora_A.weight / *.lora_B.weight)", path=path, hint="Pass a LoRA adapter"
        )
    modules: dict[str, ModuleSpec] = {}
    for module, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            missing = "lora_B" if "B" not in sides else "lora_A"
            raise BadAdapterError(
                f"module {module} has no {missing} weight", path=path, hint="The adapter is incomplete"
            )
        kA, kB = sides["A"], sides["B"]
        for k in (kA, kB):
            if dtypes[k] not in FLOAT_NAMES:
                raise BadAdapterError(
                    f"tensor {k} has dtype {dtypes[k]}; LoRA weights must be float32, float16 or bfloat16",
                    path=path,
                    hint="Re-export the adapter in a floating-point dtype",
                )
            if len(shapes[k]) != 2 or 0 in shapes[k]:
                raise BadAdapterError(
                    f"tensor {k} has shape {shapes[k]}, not a non-empty matrix", path=path, hint="The adapter is broken"
                )
        (ra, d), (n, rb) = shapes[kA], shapes[kB]
        if ra != rb:
            raise BadAdapterError(
                f"module {module}: lora_A has rank {ra} but lora_B has rank {rb}",
                path=path,
                hint="The adapter is broken",
            )
        modules[module] = ModuleSpec(sys.intern(module), n, d, ra, kA, kB)
    for k in heads:
        if 0 in shapes[k]:
            raise BadAdapterError(f"tensor {k} is empty (shape {shapes[k]})", path=path, hint="The adapter is broken")
    return modules, heads


def dominant_dtype(seen: set[str]) -> str:
    """The widest float dtype among ``seen`` (what a task's factors are written back in); F32 when none."""
    return next((d for d in FLOAT_NAMES if d in seen), "F32")
