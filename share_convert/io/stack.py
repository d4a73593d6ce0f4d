"""Reading one module of many adapters at once, straight from their files' bytes.

A merge reads module by module; :func:`read_module_stack` reads one module of every input as one
stack (two positioned reads per file when the adapters share a dtype and shapes), and
:class:`OpenFiles` keeps the files open between modules so that each is opened once.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import torch_dtype
from ..errors import BadAdapterError, first_line
from .factors import LoraFactors, LoraStack

if TYPE_CHECKING:  # torch is imported where tensors are read, so that light commands start fast
    import torch

    from .task_source import Prior


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
    #: the tensors' names (B, A), for messages
    keys: tuple[str, str] = ("lora_B", "lora_A")


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
        """Read ``len(view)`` bytes of ``path`` at ``offset`` into ``view``; the count read.

        A file of huggingface_hub's cache that this machine lacks (a Ray worker on a node other
        than the one that downloaded an ``hf://`` input) is read from the Hub: those bytes only,
        one ranged request (:func:`~share_convert.io.hub.read_range`).
        """
        try:
            return self._read_local(path, offset, view)
        except FileNotFoundError:
            from .hub import cached_file_address, read_range

            address = cached_file_address(path)
            if address is None:
                raise
            data = read_range(address, offset, len(view))
            view[: len(data)] = data
            return len(data)

    def _read_local(self, path: Path, offset: int, view: memoryview) -> int:
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
    """One module of every source in ``sources``, as :meth:`~share_convert.io.peft.AdapterSource.read_module` gives it.

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
    # uninitialized buffers (a bytearray would be zero-filled first: a pass over every byte read)
    raw_B, raw_A = torch.empty(T * size_B, dtype=torch.uint8), torch.empty(T * size_A, dtype=torch.uint8)
    view_B, view_A = memoryview(raw_B.numpy()), memoryview(raw_A.numpy())
    files = files or OpenFiles(limit=0)
    for i, p in enumerate(places):
        try:
            for (begin, _end), view, size in ((p.span_B, view_B, size_B), (p.span_A, view_A, size_A)):
                read_exactly(files, p.path, begin, view[i * size : (i + 1) * size])
        except Exception as e:
            raise BadAdapterError(
                f"cannot read tensors ({first_line(e)})", path=p.path, hint="Re-download the adapter"
            ) from None
    dtype = torch_dtype(first.dtype)
    scales = torch.tensor([p.scale for p in places], dtype=torch.float32, device=device)[:, None, None]
    # scaled in place: the buffer just read is this function's own (or a converted copy of it)
    B = from_bytes(raw_B, dtype, (T, *first.shape_B)).to(device).to(torch.float32).mul_(scales)
    A = from_bytes(raw_A, dtype, (T, *first.shape_A)).to(device).to(torch.float32)
    finite = torch.isfinite(B.sum((1, 2)) + A.sum((1, 2)))  # one reduction per task and side
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        sources[bad].read_module(module)  # names the tensor (or passes: only a sum overflowed)
    return LoraStack(B=B, A=A)


def read_exactly(files: OpenFiles, path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` from ``path`` at ``offset``; ValueError when the file ends first."""
    if files.read_into(path, offset, view) != len(view):
        raise ValueError("the file is shorter than its header says: it changed since it was opened")


def from_bytes(raw: bytearray | torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``raw`` (bytes, or a uint8 tensor; no copy), of ``dtype`` and ``shape``; zeros when
    ``raw`` is empty."""
    import torch

    if not len(raw):
        return torch.zeros(shape, dtype=dtype)
    if isinstance(raw, torch.Tensor):
        return raw.view(dtype).reshape(shape)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


@dataclass(frozen=True)
class ModuleRead:
    """One task's module as another process reads it (a Ray worker of ``--executor ray``).

    What is sent is small: where the module's factors lie in the adapter's file (a path, two byte
    ranges and a scale: :class:`ModuleLocation`) and what consolidation asks of the task there
    (its name, prior and original rank). The receiver reads those bytes and nothing else of the file.
    A module that cannot be read as raw bytes (a ``.bin`` file, a task of a checkpoint) travels as
    its ``source`` instead. It is a task source for one module: :func:`read_module_stack` and
    ``engine.members.read_members`` read it as they read the source it stands for, to the same values.
    """

    task: str
    location: ModuleLocation | None
    source: Any = None
    prior_of_task: Prior | None = None
    rank: int | None = None

    def locate(self, module: str) -> ModuleLocation | None:
        return self.location

    def read_module(self, module: str) -> LoraFactors:
        if self.source is not None:
            return self.source.read_module(module)
        assert self.location is not None
        return read_located(self.location)

    def prior(self, module: str) -> Prior | None:
        return self.prior_of_task

    def original_rank(self, module: str) -> int | None:
        return self.rank


def read_located(place: ModuleLocation) -> LoraFactors:
    """One module's factors read from where ``place`` says, scale folded, as float32; rejects NaN
    and Inf. The values and messages of :meth:`~share_convert.io.peft.AdapterSource.read_module`."""
    import torch

    raw = []
    try:
        with OpenFiles(limit=1) as opened:  # the file opened once for both factors
            for begin, end in (place.span_B, place.span_A):
                raw.append(bytearray(end - begin))
                read_exactly(opened, place.path, begin, memoryview(raw[-1]))
    except Exception as e:
        raise BadAdapterError(
            f"cannot read tensors ({first_line(e)})", path=place.path, hint="Re-download the adapter"
        ) from None
    dtype = torch_dtype(place.dtype)
    B = from_bytes(raw[0], dtype, place.shape_B).to(torch.float32) * place.scale
    A = from_bytes(raw[1], dtype, place.shape_A).to(torch.float32)
    return LoraFactors.checked(B, A, place.keys, place.path)
