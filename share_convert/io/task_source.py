"""The one protocol every input reader implements: what consolidation needs of an input task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from .factors import LoraFactors


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
    def prior(self, module: str) -> tuple[float, float, bool] | None: ...  # (error, ‖ΔW‖, is_bound) of a reconstruction
