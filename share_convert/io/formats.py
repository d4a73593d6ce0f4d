"""Reading LoRA adapters: PEFT folders, bare ``.safetensors`` / ``.bin`` files, globs.

An :class:`AdapterSource` is lazy, like ``safetensors.safe_open``: opening it reads only the
header (names, shapes, dtypes) and the config; :meth:`AdapterSource.read_module` hands over
one module's factors when asked. Consolidation walks module by module, so memory holds one
module's stack at a time, whatever the number of adapters.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from ..errors import BadAdapterError, DuplicateTaskError, first_line
from ..names import MAX_TASK_NAME, key_problem, validate_task_name  # noqa: F401 (re-exported: the rules live in names.py)
from .provenance import recorded_source

if TYPE_CHECKING:  # torch is imported where tensors are read, so that light commands start fast
    import torch

    from .t2i import PeftComponentSource, T2ISource

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
#: The safetensors dtypes of LoRA factors that can be read (all are converted to float32).
SUPPORTED_DTYPES = ("F32", "F16", "BF16", "F64")


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a supported safetensors dtype name (``"F32"`` → ``torch.float32``)."""
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[name]


def _torch_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` → ``"F32"``)."""
    import torch

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
    return names.get(dtype, str(dtype))


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


@dataclass
class LoraFactors:
    """One module's update with the scale folded in: ΔW = B @ A (spec, section 2, step 1).

    ``B`` is ``out × r`` and ``A`` is ``r × in``, both float32.
    """

    B: torch.Tensor
    A: torch.Tensor


@dataclass
class LoraStack:
    """Many tasks' factors of one module, stacked: ``B`` is ``T × out × r`` and ``A`` is
    ``T × r × in``, float32, scales folded (what :class:`LoraFactors` is for one task)."""

    B: torch.Tensor
    A: torch.Tensor

    def __len__(self) -> int:
        return int(self.B.shape[0])

    def __getitem__(self, i: int) -> LoraFactors:
        return LoraFactors(B=self.B[i], A=self.A[i])

    def __iter__(self) -> Iterator[LoraFactors]:
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class ModuleLocation:
    """Where one module's factors lie in a safetensors file: what a batched read needs."""

    path: Path
    dtype: str
    shape_B: tuple[int, ...]
    shape_A: tuple[int, ...]
    span_B: tuple[int, int]
    span_A: tuple[int, int]
    scale: float


class OpenFiles:
    """Adapter files held open for positioned reads during one merge, so that each is opened once.

    At most ``limit`` files are held (by default a quarter of the process's file-descriptor
    limit, at most 4096); files beyond it are opened for each read, as are all files where the
    platform has no positioned reads. Reads from several threads share the descriptors safely
    (``os.preadv`` has no file position). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, limit: int | None = None):
        if limit is None:
            try:
                import resource

                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                limit = min(4096, max(soft, 0) // 4) if soft != resource.RLIM_INFINITY else 4096
            except (ImportError, OSError, ValueError):
                limit = 0
        self.limit = limit if hasattr(os, "preadv") else 0
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read_into(self, path: Path, offset: int, view: memoryview) -> int:
        """Read ``len(view)`` bytes of ``path`` at ``offset`` into ``view``; the count read."""
        fd = self._fds.get(path)
        if fd is None and self.limit:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None and len(self._fds) < self.limit:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if fd is not None:
            done = 0
            while done < len(view):  # preadv may return fewer bytes than asked
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    break
                done += got
            return done
        with open(path, "rb") as f:
            f.seek(offset)
            return f.readinto(view) or 0

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> OpenFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_module_stack(
    sources: list[Any], module: str, files: OpenFiles | None = None, device: torch.device | None = None
) -> LoraStack | list[LoraFactors]:
    """One module of every source in ``sources``, as :meth:`AdapterSource.read_module` gives it.

    When every source is a safetensors adapter storing the module with one dtype and shape (the
    common case: adapters of one base), the bytes are read straight into one buffer per side and
    converted, scaled and checked as one tensor: two reads per file and a few tensor operations
    per module, instead of a dozen operations per task. Otherwise, one source at a time.
    ``files`` keeps the files open between modules (see :class:`OpenFiles`). With ``device``, the
    stack's bytes move there as stored (bfloat16 moves half the bytes of float32) and are converted
    and checked there.
    """
    import torch

    locate = [getattr(s, "locate", None) for s in sources]
    places = [f(module) if f is not None else None for f in locate]
    first = places[0] if places else None
    if first is None or any(
        p is None or (p.dtype, p.shape_B, p.shape_A) != (first.dtype, first.shape_B, first.shape_A) for p in places
    ):
        return [s.read_module(module) for s in sources]
    T = len(places)
    size_B, size_A = first.span_B[1] - first.span_B[0], first.span_A[1] - first.span_A[0]
    raw_B, raw_A = bytearray(T * size_B), bytearray(T * size_A)
    view_B, view_A = memoryview(raw_B), memoryview(raw_A)
    files = files or OpenFiles(limit=0)
    for i, p in enumerate(places):
        try:
            for (begin, _end), view, size in ((p.span_B, view_B, size_B), (p.span_A, view_A, size_A)):
                _read_exactly(files, p.path, begin, view[i * size : (i + 1) * size])
        except Exception as e:
            raise BadAdapterError(
                f"cannot read tensors ({first_line(e)})", path=p.path, hint="Re-download the adapter"
            ) from None
    dtype = _torch_dtype(first.dtype)
    scales = torch.tensor([p.scale for p in places], dtype=torch.float32, device=device)[:, None, None]
    B = _from_bytes(raw_B, dtype, (T, *first.shape_B)).to(device).to(torch.float32) * scales
    A = _from_bytes(raw_A, dtype, (T, *first.shape_A)).to(device).to(torch.float32)
    finite = torch.isfinite(B.sum((1, 2)) + A.sum((1, 2)))  # one reduction per task and side
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        sources[bad].read_module(module)  # names the tensor (or passes: only a sum overflowed)
    return LoraStack(B=B, A=A)


def _read_exactly(files: OpenFiles, path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``path`` at ``offset``; ValueError when the file ends first."""
    if files.read_into(path, offset, view) != len(view):
        raise ValueError("the file is shorter than its header says: it changed since it was opened")


def _from_bytes(raw: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    return torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.zeros(shape, dtype=dtype)


def task_name_for(path: Path) -> str:
    """The default task name: the folder of a PEFT adapter, or the file's stem."""
    if path.is_dir():
        return path.resolve().name
    if path.name in WEIGHT_NAMES:
        return path.resolve().parent.name
    return path.name.split(".")[0] if path.name.endswith(".safetensors") else path.stem


def _data_offsets(path: Path, shared: dict[tuple, tuple]) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file (absolute offsets), from its header."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    start = 8 + size
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
        #: equal tuples (shapes, offsets) kept once among adapters opened together (``open_adapters``)
        self._shared: dict[tuple, tuple] = shared if shared is not None else {}
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
        shapes, dtypes = self._read_header()
        self.modules, self.head_keys = _parse_keys(shapes, dtypes, self.weights_path)
        self.dtypes = dtypes
        self.shapes = shapes
        self.weights_dtype = _dominant_dtype(dtypes, self.modules)
        #: each module's scale, validated against the config up front
        self._scales = {spec.name: self.scale(spec.name) for spec in self.modules.values()}

    # -- header -------------------------------------------------------------------------------
    def _read_header(self) -> tuple[dict[str, list[int]], dict[str, str]]:
        shapes: dict[str, list[int]] = {}
        dtypes: dict[str, str] = {}
        if self.weights_path.suffix == ".bin":
            for key, tensor in self._load_bin().items():
                shapes[key] = list(tensor.shape)
                dtypes[key] = _torch_dtype_name(tensor.dtype)
            return shapes, dtypes
        try:
            with safe_open(self.weights_path, framework="pt") as f:  # validates the header and offsets
                for key in f.keys():
                    sl = f.get_slice(key)
                    key = sys.intern(key)
                    shapes[key] = _one_copy(self._shared, tuple(sl.get_shape()))
                    dtypes[key] = sys.intern(sl.get_dtype())
            self._offsets = _data_offsets(self.weights_path, self._shared)
        except Exception as e:  # safetensors raises several types for malformed files
            raise BadAdapterError(
                f"not a readable safetensors file ({first_line(e)})",
                path=self.weights_path,
                hint="Re-download or re-save the adapter",
            ) from None
        return shapes, dtypes

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
    def scale(self, module: str) -> float:
        """s = lora_alpha / r (or / sqrt(r) with rsLoRA), with rank/alpha patterns applied."""
        spec = self.modules[module]
        if self.config is None:
            return self.alpha_assumed / spec.rank  # type: ignore[operator]
        cfg = self.config
        name = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
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
            if all(self.dtypes[k] in SUPPORTED_DTYPES for k in keys):
                out = {}
                with OpenFiles(limit=1) as files:  # the file opened once for these tensors
                    for k in keys:
                        begin, end = self._offsets[k]
                        raw = bytearray(end - begin)
                        _read_exactly(files, self.weights_path, begin, memoryview(raw))
                        out[k] = _from_bytes(raw, _torch_dtype(self.dtypes[k]), tuple(self.shapes[k]))
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
        if bool(torch.isfinite(A.sum() + B.sum())):  # one reduction: finite sums have finite terms
            return LoraFactors(B=B, A=A)
        for key, x in ((spec.key_A, A), (spec.key_B, B)):  # which one (or only an overflowing sum)
            if not torch.isfinite(x).all():
                raise BadAdapterError(
                    f"tensor {key} contains NaN or Inf",
                    path=self.weights_path,
                    hint="This adapter is broken; retrain or re-export it",
                )
        return LoraFactors(B=B, A=A)

    def locate(self, module: str) -> ModuleLocation | None:
        """Where ``module``'s factors lie in the weights file, for :func:`read_module_stack`;
        None when they cannot be read as raw bytes (a ``.bin`` file, an unusual dtype)."""
        spec = self.modules[module]
        if self.weights_path.suffix == ".bin":
            return None
        dtype = self.dtypes[spec.key_B]
        if dtype not in SUPPORTED_DTYPES or self.dtypes[spec.key_A] != dtype:
            return None
        return ModuleLocation(
            self.weights_path,
            dtype,
            tuple(self.shapes[spec.key_B]),
            tuple(self.shapes[spec.key_A]),
            self._offsets[spec.key_B],
            self._offsets[spec.key_A],
            self._scales[module],
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


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (``"F32"`` → 4)."""
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(
        dtype, 4
    )


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


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies when the module name ends with it (on a '.' boundary)."""
    for key, value in patterns.items():
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
            if dtypes[k] not in SUPPORTED_DTYPES:
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


def _dominant_dtype(dtypes: dict[str, str], modules: dict[str, ModuleSpec]) -> str:
    seen = sorted({dtypes[s.key_A] for s in modules.values()} | {dtypes[s.key_B] for s in modules.values()})
    for pref in ("F64", "F32", "BF16", "F16"):
        if pref in seen:
            return pref
    return "F32"


@dataclass
class InputSpec:
    """One input as typed: an optional explicit task name and a path (or pattern)."""

    path: str
    task: str | None = None


def parse_input(text: str) -> InputSpec:
    """``NAME=PATH`` names the task explicitly; anything else is a path, glob or hf:// address."""
    if "=" in text and not text.startswith("hf://"):
        name, _, rest = text.partition("=")
        if name and "/" not in name and not os.path.exists(text):
            return InputSpec(path=rest, task=name)
    return InputSpec(path=text)


def expand_paths(text: str) -> list[Path]:
    """A path, a glob, or a folder of adapters, expanded to adapter paths (sorted)."""
    if glob.has_magic(text) and not os.path.exists(text):
        matches = sorted(glob.glob(text))
        if not matches:
            raise BadAdapterError("no file matches this pattern", path=text, hint="Check the pattern")
        return [Path(m) for m in matches]
    path = Path(text)
    if path.is_dir() and not any((path / n).is_file() for n in WEIGHT_NAMES) and not (path / CONFIG_NAME).is_file():
        found = sorted(
            p
            for p in path.iterdir()
            if (p.is_dir() and (p / CONFIG_NAME).is_file()) or p.suffix in (".safetensors", ".bin")
        )
        if not found:
            raise BadAdapterError(
                "folder holds no adapter", path=text, hint="Pass PEFT adapter folders or weights files"
            )
        return found
    return [path]


def open_adapters(
    inputs: list[str], *, alpha: float | None = None, shared: dict[tuple, tuple] | None = None
) -> list[AdapterSource]:
    """Open every input (paths, globs, folders, ``NAME=PATH``) as an :class:`AdapterSource`.

    Raises a :class:`~share_convert.errors.ShareError` for the first bad input, and
    :class:`DuplicateTaskError` when two inputs would share a task name. ``shared`` (a dict,
    empty at first) lets adapters opened by several calls keep one copy of their equal shapes
    and offsets.
    """
    shared = shared if shared is not None else {}
    sources: list[AdapterSource] = []
    for text in inputs:
        spec = parse_input(text)
        paths = expand_paths(spec.path)
        if spec.task is not None and len(paths) != 1:
            raise BadAdapterError("NAME=PATH needs exactly one adapter", path=text, hint="Name each adapter separately")
        for p in paths:
            sources.append(open_adapter(p, task=spec.task, alpha=alpha, origin=str(p), shared=shared))
    check_unique_tasks([s.task for s in sources], [s.origin for s in sources])
    from .t2i import check_same_base

    check_same_base(sources)
    return sources


def open_adapter(
    path: Path,
    *,
    task: str | None = None,
    alpha: float | None = None,
    origin: str | None = None,
    shared: dict[tuple, tuple] | None = None,
) -> AdapterSource | T2ISource | PeftComponentSource:
    """One adapter file or folder: a text-to-image LoRA file (kohya or diffusers layout, see
    :mod:`share_convert.io.t2i`) when its tensor names say so, else a PEFT adapter."""
    from .t2i import as_component, open_source  # t2i builds on this module

    source = open_source(Path(path), task=task, alpha=alpha, origin=origin or str(path))
    if source is not None:
        return source
    # a PEFT adapter of a UNet or Flux transformer is read under the text-to-image module names
    return as_component(AdapterSource(path, task=task, alpha=alpha, origin=origin, shared=shared))


def check_unique_tasks(names: list[str], origins: list[str]) -> None:
    seen: dict[str, str] = {}
    for name, origin in zip(names, origins):
        if name in seen:
            raise DuplicateTaskError(
                f"task name {name!r} is used by both {seen[name]} and {origin}",
                hint="Name them explicitly: NAME=PATH",
            )
        seen[name] = origin
