"""A Share checkpoint's tasks as merge inputs: each task's factors are its reconstruction ΔŴ
(the paper's asynchronous continual learning: groups consolidated separately, merged later)."""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint.reader import Checkpoint
from .factors import LoraFactors
from .provenance import recorded_source
from .task_source import Prior


class CheckpointTask:
    """One task of a Share checkpoint, seen as an input: its factors are the reconstruction ΔŴ."""

    def __init__(self, ckpt: Checkpoint, task: str, *, rename: str | None = None, address: str | None = None):
        self.ckpt, self.source_task = ckpt, task
        self.task = rename or task
        self.origin = f"{address or ckpt.path}:{task}"
        #: what the new manifest records as the checkpoint it came from: its own file name, or the
        #: ``hf://`` address it was read from (never the local folders above it, nor the Hub cache)
        self.from_checkpoint = recorded_source(address or str(ckpt.path))
        rec = ckpt.task(task)
        self.record = rec
        self.config = rec.get("adapter_config")
        self.head_keys = list(rec.get("heads", []))
        self.weights_dtype = rec.get("weights_dtype", "F32")

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        for name, info in self.ckpt.modules.items():
            if self.source_task in info["tasks"]:
                t = info["tasks"][self.source_task]
                out[name] = (info["out_features"], info["in_features"], max(t["rank"] + t["private_rank"], 1))
        return out

    def read_module(self, module: str) -> LoraFactors:
        Bh, Ah = self.ckpt.reconstruction(self.source_task, module)
        if Bh.shape[1] == 0:  # an all-zero update: keep one zero direction
            Bh, Ah = Bh.new_zeros(Bh.shape[0], 1), Ah.new_zeros(Ah.shape[0], 1)
        return LoraFactors(B=Bh.to(torch.float32), A=Ah.T.contiguous().to(torch.float32))

    def read_heads(self) -> dict[str, torch.Tensor]:
        return self.ckpt.heads(self.source_task)

    def original_rank(self, module: str) -> int:
        """The rank of the adapter this task came from (what it stores here may be less)."""
        return int(self.ckpt.modules[module]["tasks"][self.source_task]["original_rank"])

    def prior(self, module: str) -> Prior:
        t = self.ckpt.modules[module]["tasks"][self.source_task]
        return Prior(t["error"], t["norm"], bool(t.get("bound")))

    def task_record(self) -> dict[str, Any]:
        return dict(self.record, from_checkpoint=self.from_checkpoint)


def checkpoint_tasks(ckpt: Checkpoint, *, address: str | None = None) -> list[CheckpointTask]:
    """Every task of ``ckpt`` as an input; ``address`` is the ``hf://`` address it was downloaded from."""
    return [CheckpointTask(ckpt, t, address=address) for t in ckpt.tasks]
