"""The one protocol every input reader implements: what consolidation needs of an input task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch

    from .factors import LoraFactors


class Prior(NamedTuple):
    """What a task that is itself a reconstruction (a task of a checkpoint) brings from there."""

    error: float  # its recorded error relative to its original ΔW
    norm: float  # ‖ΔW‖ of its original
    bound: bool  # whether that error is a bound rather than exact


class TaskSource(Protocol):
    """An input task: an adapter file (PEFT, kohya, diffusers) or a task of a Share checkpoint.

    It is opened lazily (its header only); consolidation asks for one module at a time.
    """

    task: str
    origin: str
    config: dict | None
    head_keys: list[str]
    weights_dtype: str

    def module_shapes(self) -> dict[str, tuple[int, int, int]]: ...  # name -> (n, d, r)
    def read_module(self, module: str) -> LoraFactors: ...
    def read_heads(self) -> dict[str, torch.Tensor]: ...
    def task_record(self) -> dict[str, Any]: ...
    def prior(self, module: str) -> Prior | None: ...  # of a reconstruction; None for an adapter
