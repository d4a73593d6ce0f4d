"""The training half of :class:`~share_convert.runtime.model.ShareModel`'s API (docs/training.md).

:class:`TrainingMethods` is a base class of ShareModel: adding a task trained inside the checkpoint's
subspaces (share_convert.runtime.training), choosing which tasks train, and saving or folding a trained
task (share_convert.runtime.saving). Each method hands the model to those modules, which know it by the
members they use (:class:`~share_convert.runtime.training.ServingModel`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .saving import fold_into, save_task
from .training import add_trainable_task, set_training

if TYPE_CHECKING:
    from .training import TrainableTask


class TrainingMethods:
    """ShareModel's methods for training new tasks; ``self`` is the ShareModel."""

    _trainable: dict[str, TrainableTask]

    #: Add a new task trained in the checkpoint's subspaces (coefficients and ``new_directions`` temporary
    #: directions only); it becomes the task that trains (:func:`.training.add_trainable_task`, bound
    #: as a method: one signature, one docstring).
    add_task = add_trainable_task

    def train_task(self, *names: str) -> list[nn.Parameter]:
        """Make the added tasks ``names`` the ones that train (every other parameter frozen); returns their
        parameters. :meth:`add_task` makes the new task the one that trains; see
        :func:`share_convert.runtime.training.set_training`."""
        return set_training(self, names)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of the tasks added with :meth:`add_task` that require grad, for an optimizer."""
        return [p for task in self._trainable.values() for p in task.parameters() if p.requires_grad]

    #: Write a trainable task as a standard PEFT adapter (:func:`.saving.save_task`, bound as a method).
    save_task = save_task
    #: Fold a trainable task into a checkpoint through ``add`` (:func:`.saving.fold_into`, bound as a
    #: method: its options are ``api.add``'s, written once).
    fold_into = fold_into


__all__ = ["TrainingMethods"]
