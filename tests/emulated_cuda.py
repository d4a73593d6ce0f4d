"""A CUDA device emulated on the CPU, for testing the ``--device cuda`` path on machines without a GPU.

Tensors "on cuda:0" are CPU tensors wrapped in :class:`OnDevice`, a tensor subclass that reports
``device == cuda:0``. Every operation runs on the wrapped CPU data (so results are those of the CPU
path) while device placement is checked as CUDA checks it: an operation mixing a device tensor with
a CPU tensor of one or more dimensions raises "Expected all tensors to be on the same device", and so
does ``.numpy()`` of a device tensor. What each operation touched is recorded (``Emulator.ops``), so a
test can ask which work ran on the device and which stayed on the CPU.

It is a test utility, not a GPU: timings mean nothing, and CUDA-only behaviour (streams, kernels'
own rounding, memory) is not modelled; third-party code that probes CUDA further than
``is_available``, ``device_count``, ``current_device`` and pinned memory may fail under it. Use::

    with emulated_cuda() as emulator:
        merge(..., ConsolidationConfig(device="cuda"))
    assert emulator.cpu_work(min_numel=...) == []
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
_aten = torch.ops.aten
#: operations that may take tensors of both devices (copies between them, and CUDA's CPU indices)
_CROSS_DEVICE = {
    _aten._to_copy.default,
    _aten.copy_.default,
    _aten._copy_from.default,
    _aten._copy_from_and_resize.default,
    _aten.index.Tensor,
    _aten.index_put_.default,
    _aten.index_put.default,
    _aten._index_put_impl_.default,
    _aten.lift_fresh.default,
    _aten.lift_fresh_copy.default,
}
#: operations whose cost is memory traffic, not arithmetic: not counted as work
_MOVES = {
    _aten._to_copy.default,
    _aten.copy_.default,
    _aten.clone.default,
    _aten.detach.default,
    _aten.lift_fresh.default,
    _aten.lift_fresh_copy.default,
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.zeros.default,
    _aten.full.default,
    _aten.cat.default,
    _aten.stack.default,
    _aten.new_zeros.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.zero_.default,
    _aten.fill_.Scalar,
    _aten.split_with_sizes.default,
    _aten.contiguous.default if hasattr(_aten, "contiguous") else _aten.clone.default,
}


class OnDevice(torch.Tensor):
    """A CPU tensor that reports living on cuda:0."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=CUDA,
            requires_grad=elem.requires_grad,
        )
        out.elem = elem
        return out

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Python-level conversions check the device before dispatch: answer them from the CPU data
        if func in _SCALAR_READS:
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.Tensor.numpy:
            raise TypeError(
                "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


_SCALAR_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.__complex__,
    torch.Tensor.__format__,
}


def _unwrap(x):
    return x.elem if isinstance(x, OnDevice) else x


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


@dataclass
class Op:
    """One operation run: its name, the device it ran on and the largest tensor it touched."""

    name: str
    device: str
    numel: int
    #: where it was called from (the innermost frames of share_convert), for messages
    where: str = ""


@dataclass
class Emulator:
    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: CPU operations touching this many elements or more record where they were called from
    where_from: int = 4096

    def cpu_work(self, min_numel: int) -> list[Op]:
        """Arithmetic that ran on the CPU on a tensor of at least ``min_numel`` elements."""
        return [op for op in self.ops if op.device == "cpu" and op.numel >= min_numel]

    def device_work(self, min_numel: int = 0) -> list[Op]:
        return [op for op in self.ops if op.device == "cuda" and op.numel >= min_numel]


_ACTIVE: Emulator | None = None
#: set while an operation on device data runs outside dispatch (see _on_data): its work is the device's
_ON_DEVICE = threading.local()


def _run(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    on_device = any(isinstance(x, OnDevice) for x in tensors)
    target = kwargs.get("device")
    if func not in _CROSS_DEVICE and on_device:
        for x in tensors:
            if not isinstance(x, OnDevice) and x.dim() > 0:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                    f"(in {func})"
                )
    kwargs = dict(kwargs)
    kwargs.pop("pin_memory", None)  # no pinned allocator without CUDA: plain CPU memory
    if "device" in kwargs and _is_cuda(target):
        kwargs["device"] = CPU
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if func is _aten._to_copy.default:
        to_device = _is_cuda(target) or (target is None and on_device)
    elif func in (_aten.copy_.default,):
        to_device = isinstance(args[0], OnDevice)
    else:
        to_device = on_device or _is_cuda(target)
    if _ACTIVE is not None and func not in _MOVES and not func.is_view:
        numel = max((x.numel() for x in tensors), default=0)
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        numel = max([numel, *(x.numel() for x in outs)])
        on_device = to_device or getattr(_ON_DEVICE, "active", False)
        where = ""
        if not on_device and numel >= _ACTIVE.where_from:  # the caller, for large CPU work only (slow)
            frames = [f for f in traceback.extract_stack() if "share_convert" in f.filename]
            where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[::-1][:3])
        with _ACTIVE.lock:
            _ACTIVE.ops.append(Op(str(func), "cuda" if on_device else "cpu", numel, where))
    originals = {id(_unwrap(x)): x for x in flat if isinstance(x, OnDevice)}

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in originals:  # an in-place op returns its argument
            return originals[id(x)]
        return OnDevice(x) if to_device else x

    return tree_map(wrap, out)


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _move(func, args, kwargs):
    """``Tensor.to``, ``.cuda`` and ``.cpu``, whose bindings check the device before dispatch."""
    self, rest = args[0], list(args[1:])
    if func is torch.Tensor.cpu:
        return self.elem.clone() if isinstance(self, OnDevice) else self
    if func is torch.Tensor.cuda:
        return self if isinstance(self, OnDevice) else OnDevice(self.clone())
    target = kwargs.pop("device", None)
    for i, a in enumerate(rest):
        if isinstance(a, (str, torch.device)):  # the data stays on the CPU: only the wrapper says where
            target, rest[i] = a, CPU
            break
        if isinstance(a, torch.Tensor):  # .to(other): its dtype and device
            rest[i] = a.dtype
            target = a.device
            break
    to_device = _is_cuda(target) if target is not None else isinstance(self, OnDevice)
    with torch._C.DisableTorchFunctionSubclass():
        out = torch.Tensor.to(_unwrap(self), *rest, **kwargs)
    if out is _unwrap(self):  # nothing to do: the tensor itself, where it was
        if isinstance(self, OnDevice) == to_device:
            return self
        out = out.clone()
    return OnDevice(out) if to_device else out


class _FunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return _move(func, args, kwargs)
        if func is torch.Tensor.pin_memory:
            return args[0]
        kwargs.pop("pin_memory", None)
        if _is_cuda(kwargs.get("device")):  # a factory (torch.tensor, zeros, eye, ...): made here, then "moved"
            kwargs["device"] = CPU
            with _device_work():
                out = func(*args, **kwargs)
            return tree_map(
                lambda x: OnDevice(x) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x, out
            )
        if args and isinstance(args[0], OnDevice):
            if func in _SCALAR_READS:
                return func(args[0].elem, *args[1:], **kwargs)
            if func is torch.Tensor.numpy:
                raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:  # a binding that guards the device before dispatch (indexing, ...)
            if "not linked with support for cuda" not in str(e):
                raise
        return _on_data(func, args, kwargs)


def _on_data(func, args, kwargs):
    """``func`` run on the wrapped data, its tensor results on the device when an input was."""
    flat, _ = tree_flatten((args, kwargs))
    wrapped = {id(x.elem): x for x in flat if isinstance(x, OnDevice)}
    if func not in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
        for x in flat:
            if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) and x.dim() > 0 and wrapped:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found cuda:0 and cpu! (in {func})"
                )
    with torch._C.DisableTorchFunctionSubclass(), _device_work(bool(wrapped)):
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

    def wrap(x):
        if not isinstance(x, torch.Tensor) or isinstance(x, OnDevice):
            return x
        return wrapped.get(id(x)) or (OnDevice(x) if wrapped else x)

    return tree_map(wrap, out)


@contextmanager
def _device_work(active: bool = True) -> Iterator[None]:
    before = getattr(_ON_DEVICE, "active", False)
    _ON_DEVICE.active = active
    try:
        yield
    finally:
        _ON_DEVICE.active = before


@contextmanager
def _modes() -> Iterator[None]:
    with _FunctionMode(), _Mode():
        yield


@contextmanager
def emulated_cuda() -> Iterator[Emulator]:
    """Make ``torch.cuda.is_available()`` true and ``device='cuda'`` tensors :class:`OnDevice`,
    in this thread and in every thread started inside the block."""
    global _ACTIVE
    emulator = Emulator()
    real_run = threading.Thread.run

    def run(self):
        with _modes():
            real_run(self)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "is_available", lambda: True))
        stack.enter_context(mock.patch.object(torch.cuda, "device_count", lambda: 1))
        stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(torch.cuda, "_lazy_init", lambda: None))
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        stack.enter_context(mock.patch.object(threading.Thread, "run", run))
        _ACTIVE = emulator
        try:
            with _modes():
                yield emulator
        finally:
            _ACTIVE = None
