"""A task's ΔW in the base weights: merging and unmerging it, or handing the base model back with it.

Every task merges the same way, whether the checkpoint holds it (its ΔW from the layer's stacked
tensors, :meth:`~share_convert.runtime.layers.ShareLayer.delta_weight`) or it was trained in the model
(share_convert.runtime.training: ΔW = B A from its trainable factors). A trained task merges exactly
only (the original weights kept), since its ΔW changes when it trains; while it is merged, its
parameters are frozen (its forward hooks add nothing: the weights hold ΔW, so a gradient would not
reach them) and :meth:`ShareModel.unmerge` makes them trainable again.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..errors import InvalidOptionError
from .layers import ShareLayer, replace_module
from .selection import BASE, LoadedTasks
from .training import ServingModel, TrainableTask


class MergingHost(ServingModel, Protocol):
    """The members of a ShareModel that merging reads and changes."""

    _tasks: LoadedTasks
    _unloaded: bool

    def _check_loaded(self) -> None: ...


def _task_id(model: MergingHost, task: str, what: str) -> int:
    model._check_loaded()
    if not isinstance(task, str):
        raise InvalidOptionError(f"{what} needs a task name, got {task!r}", hint="Name a loaded task")
    tid = model._tasks.id_of(task)
    assert tid != BASE
    return tid


def _trained_delta(task: TrainableTask, path: str) -> torch.Tensor:
    """A trained task's ΔW (n × d, float64) in the module at ``path``."""
    B, A = task.module(path).factors()
    return B.detach().double() @ A.detach().double()


def _deltas(model: MergingHost, task: str, tid: int) -> dict[str, torch.Tensor | None]:
    """Per layer that ``task`` changes, its ΔW where the layer does not hold it (a trained task), else None."""
    trained = model._trainable.get(task)
    if trained is not None:
        return {path: _trained_delta(trained, path) for path in trained.module_names}
    return {path: None for path, layer in model._layers.items() if layer.serves(tid)}


@torch.no_grad()
def merge_task(model: MergingHost, task: str, exact: bool) -> None:
    """Add ``task``'s ΔW to the base weights; see :meth:`ShareModel.merge`."""
    tid = _task_id(model, task, "merge")
    trained = model._trainable.get(task)
    if trained is not None and not exact:
        raise InvalidOptionError(
            f"task {task!r} was trained in this model: it merges only with exact=True (its ΔW changes as it "
            "trains, so subtracting it again would not restore the weights)",
            hint=f"Call model.merge({task!r})",
        )
    unmerge_task(model)
    for path, delta in _deltas(model, task, tid).items():
        model._layers[path].merge(tid, exact, delta=delta)
    model._selection.merged = tid
    if trained is not None:
        trained.frozen_by_merge = [p for p in trained.parameters() if p.requires_grad]
        trained.requires_grad_(False)


def unmerge_task(model: MergingHost) -> None:
    """Restore the original base weights; see :meth:`ShareModel.unmerge`."""
    merged = model._selection.merged
    for layer in model._layers.values():
        layer.unmerge()
    model._selection.merged = None
    trained = next((t for t in model._trainable.values() if t.task_id == merged), None)
    if trained is not None:
        for p in trained.frozen_by_merge:
            p.requires_grad_(True)
        trained.frozen_by_merge = []


@torch.no_grad()
def merge_and_unload(model: MergingHost, task: str) -> nn.Module:
    """The base model with ``task``'s ΔW added into its weights and its heads in place; see
    :meth:`ShareModel.merge_and_unload`."""
    tid = _task_id(model, task, "merge_and_unload")
    unmerge_task(model)
    for path, delta in _deltas(model, task, tid).items():
        layer: ShareLayer = model._layers[path]
        delta = layer.delta_weight(tid) if delta is None else delta
        weight = layer.base_layer.weight
        weight.copy_((weight.double() + layer.kind.as_weight(delta, weight.shape).to(weight.device)).to(weight.dtype))
    for path, layer in model._layers.items():
        replace_module(model.base_model, path, layer.base_layer)
    for path, head in model._heads.items():
        replace_module(model.base_model, path, head.module_for(tid))
    model._unloaded = True
    return model.base_model


__all__ = ["merge_and_unload", "merge_task", "unmerge_task"]
