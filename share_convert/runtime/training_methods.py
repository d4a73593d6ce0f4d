"""The training half of :class:`~share_convert.runtime.model.ShareModel`'s API (docs/training.md).

:class:`TrainingMethods` is a base class of ShareModel: adding a task trained inside the checkpoint's
subspaces (share_convert.runtime.training), choosing which tasks train, and saving or folding a trained
task (share_convert.runtime.saving). Each method hands the model to those modules, which know it by the
members they use (:class:`~share_convert.runtime.training.ServingModel`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE

if TYPE_CHECKING:
    from ..config import ConsolidationConfig
    from ..report.summary import Report
    from .training import TrainableTask


class TrainingMethods:
    """ShareModel's methods for training new tasks; ``self`` is the ShareModel."""

    _trainable: dict[str, TrainableTask]

    def add_task(
        self,
        name: str,
        *,
        rank: int = 8,
        new_directions: int = 0,
        modules: Sequence[str] | None = None,
        heads: Sequence[str] | None = None,
        k: int | None = None,
        energy: float | None = None,
        seed: int = 0,
    ) -> TrainableTask:
        """Add a new task trained in the checkpoint's subspaces (coefficients and ``new_directions``
        temporary directions only); it becomes the task that trains (others frozen: switch with
        :meth:`train_task`); see :func:`share_convert.runtime.training.add_trainable_task`."""
        from .training import add_trainable_task

        return add_trainable_task(
            self,
            name,
            rank=rank,
            new_directions=new_directions,
            modules=modules,
            heads=heads,
            k=k,
            energy=energy,
            seed=seed,
        )

    def train_task(self, *names: str) -> list[nn.Parameter]:
        """Make the added tasks ``names`` the ones that train (every other parameter frozen); returns their
        parameters. :meth:`add_task` makes the new task the one that trains; see
        :func:`share_convert.runtime.training.set_training`."""
        from .training import set_training

        return set_training(self, names)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of the tasks added with :meth:`add_task` that require grad, for an optimizer."""
        return [p for task in self._trainable.values() for p in task.parameters() if p.requires_grad]

    def save_task(self, name: str, path: str | Path, *, force: bool = False) -> Path:
        """Write trainable task ``name`` as a standard PEFT LoRA adapter; see :func:`share_convert.runtime.saving.save_task`."""
        from .saving import save_task

        return save_task(self, name, path, force=force)

    def fold_into(
        self,
        name: str,
        checkpoint: str | Path,
        output: str | Path,
        *,
        config: ConsolidationConfig | None = None,
        k: int | None = None,
        target_error: float | None = None,
        alpha: float | None = None,
        device: str | None = None,
        replace: bool = False,
        force: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        wait: bool = True,
        on_wait: Callable[[str], None] | None = None,
        executor: str = "local",
        ray_address: str | None = None,
    ) -> Report:
        """Fold trainable task ``name`` into ``checkpoint`` (the engine of ``add``); returns ``add``'s report;
        see :func:`share_convert.runtime.saving.fold_into`."""
        from .saving import fold_into

        return fold_into(
            self,
            name,
            checkpoint,
            output,
            config=config,
            k=k,
            target_error=target_error,
            alpha=alpha,
            device=device,
            replace=replace,
            force=force,
            progress=progress,
            max_shard_size=max_shard_size,
            wait=wait,
            on_wait=on_wait,
            executor=executor,
            ray_address=ray_address,
        )


__all__ = ["TrainingMethods"]
