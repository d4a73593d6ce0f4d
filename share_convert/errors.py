"""The errors share-convert raises.

Every error a user can cause is a :class:`ShareError`. Each carries the file it is about and
a hint saying what to do, so that the CLI can print it as one line and exit with code 2.
Anything else that escapes is a bug in share-convert, not a user error.
"""

from __future__ import annotations

from pathlib import Path


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type's name), for quoting in a ShareError."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:limit]


class ShareError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """``<file>: <problem>. <what to do>`` on a single line (no newlines, no control characters)."""
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text = f"{text.rstrip('.')}. {self.hint}"
        return "".join(ch if ch.isprintable() else "?" for ch in text)


class BadAdapterError(ShareError):
    """An input adapter cannot be read or is not a LoRA adapter share-convert supports."""


class IncompatibleAdaptersError(ShareError):
    """Adapters (or checkpoints) that cannot be consolidated together, e.g. different bases."""


class DuplicateTaskError(ShareError):
    """Two inputs would get the same task name, or a task already exists in a checkpoint."""


class InvalidTaskNameError(ShareError):
    """A task name that cannot be used (path separators, control characters, too long...)."""


class CorruptCheckpointError(ShareError):
    """A file that is not a Share checkpoint, or one whose content fails its checksums."""


class UnsupportedFormatError(ShareError):
    """A Share checkpoint written by an unknown (newer) format version."""


class UnknownTaskError(ShareError):
    """A task name that the checkpoint does not hold."""


class OutputExistsError(ShareError):
    """The output already exists and ``--force`` was not given."""


class TargetBusyError(ShareError):
    """Another process is writing the checkpoint (or pushing it), and the command was told not to wait."""


class InvalidOptionError(ShareError):
    """Options that contradict each other or are out of range."""


class HubError(ShareError):
    """A Hugging Face Hub repository that cannot be read or written."""


class ExecutorError(ShareError):
    """The distributed executor (``--executor ray``) cannot run the work: no cluster to connect to,
    or a module whose worker was lost more times than it is retried."""


class ModelMismatchError(ShareError):
    """A checkpoint that does not fit the model it is loaded into: a module it names is missing,
    has other shapes, or is of a layer type the runtime cannot serve."""


class DeviceMismatchError(ShareError):
    """Tensors that cannot compute together: inputs on another device than the model, weights of
    a non-float dtype, a requested device or dtype that contradicts the model's."""


class BatchMismatchError(ShareError):
    """A call whose tasks do not fit its batch: a task list whose length differs from the number of
    rows, or a model that reshapes rows so that a layer no longer sees one row per task."""


class UntrainedTaskError(ShareError):
    """A task added for training that was never trained (its update is still exactly zero), given to
    be saved or folded: writing it would store an adapter that changes nothing."""
