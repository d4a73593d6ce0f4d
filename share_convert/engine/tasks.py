"""What an update keeps of a checkpoint: the options it was made with, and tasks kept as they are.
(A checkpoint's tasks as inputs are :class:`share_convert.io.checkpoint_source.CheckpointTask`.)
"""

from __future__ import annotations

from typing import Any

from ..checkpoint.reader import Checkpoint
from ..config import ConsolidationConfig
from ..errors import CorruptCheckpointError, InvalidOptionError


def config_of(ckpt: Checkpoint) -> ConsolidationConfig:
    """The options ``ckpt`` was made with, for its updates; where to compute is this machine's
    choice (``device`` is 'auto'), not the checkpoint's: one made on a GPU is extended on a CPU.
    Options without a ``precision`` (files older than precisions) are updated with 'float'."""
    fields = ConsolidationConfig.__dataclass_fields__
    stored = {k: v for k, v in ckpt.config.items() if k in fields and k != "device"}
    # a checkpoint written before precisions existed stores every factor in its float dtype, and so
    # do its updates: the old tasks' bytes stay as they are
    stored.setdefault("precision", "float")
    config = ConsolidationConfig(**stored)
    try:  # the reader checked each stored option's type; their values are checked as options are
        config.validate()
    except InvalidOptionError as e:
        raise CorruptCheckpointError(
            f"the options stored in the checkpoint are not valid ({e.message})",
            path=ckpt.path,
            hint="Re-create or re-download the checkpoint; it is not one share-convert wrote",
        ) from None
    return config


class KeptTask:
    """A task kept as it is: only its manifest record travels."""

    def __init__(self, ckpt: Checkpoint, task: str):
        self.task = task
        self._rec = ckpt.task(task)

    def task_record(self) -> dict[str, Any]:
        return self._rec
