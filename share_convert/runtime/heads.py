"""Heads saved with ``modules_to_save`` (classifier, score...): one copy per task, each run on its rows.

:class:`ShareHead` replaces such a module in the base model; the model (share_convert.runtime.model)
builds it at load and training (share_convert.runtime.training) adds a trained task's copy to it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BatchMismatchError
from .selection import TaskSelection


class ShareHead(nn.Module):
    """A module replaced per task (PEFT's ``modules_to_save``: classifier, score...).

    Each row runs through its task's copy; a task without its own copy uses the base module. When
    the copies' outputs differ in their last dimension (tasks with different label counts), a
    mixed batch returns them padded on the right with ``pad_value`` (default ``-inf``: softmax
    gives the missing labels probability 0 and argmax never picks one); row i's own values are
    ``out[i, ..., :width]`` with ``width`` the output size of its task's head
    (:meth:`ShareModel.heads_of`).
    """

    def __init__(
        self,
        base_module: nn.Module,
        name: str,
        copies: dict[int, nn.Module],
        selection: TaskSelection,
        pad_value: float,
    ):
        super().__init__()
        self.base_module = base_module
        self.name = name
        self.copies = nn.ModuleDict({str(t): m for t, m in copies.items()})
        self.selection = selection
        self.pad_value = pad_value

    def module_for(self, task: int) -> nn.Module:
        return self.copies[str(task)] if str(task) in self.copies else self.base_module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sel = self.selection.current
        if sel.single is not None:
            return self.module_for(sel.single)(x, *args, **kwargs)
        groups: dict[int, list[int]] = {}
        for t in sel.distinct:
            groups.setdefault(id(self.module_for(t)), []).append(t)
        if len(groups) == 1:
            return self.module_for(sel.distinct[0])(x, *args, **kwargs)
        rows_of = sel.for_rows(x.shape[0])
        if rows_of is None:
            raise BatchMismatchError(
                f"{self.name} received {x.shape[0]} rows for a batch of {sel.batch} tasks",
                hint="Run one task per call for this model",
            )
        sel = rows_of
        parts = []
        for tasks in groups.values():
            rows = sel.rows(tuple(tasks), x.device)
            parts.append((rows, self.module_for(tasks[0])(x.index_select(0, rows), *args, **kwargs)))
        width = max(y.shape[-1] for _, y in parts)
        first = parts[0][1]
        if any(y.shape[1:-1] != first.shape[1:-1] for _, y in parts):
            raise BatchMismatchError(
                f"the tasks' {self.name} heads give outputs of different shapes", hint="Run one task per call"
            )
        out = first.new_full((sel.batch, *first.shape[1:-1], width), self.pad_value)
        for rows, y in parts:
            if y.shape[-1] < width:
                y = F.pad(y, (0, width - y.shape[-1]), value=self.pad_value)
            out.index_copy_(0, rows, y.to(out.dtype))
        return out


__all__ = ["ShareHead"]
