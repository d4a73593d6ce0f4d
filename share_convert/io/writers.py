"""The extraction writers, one per output format, by name: what ``extract --format`` offers.

Each :class:`Writer` says whether a task can be written in its format (from the task's record,
before anything is computed) and writes it. This module is light (the CLI reads the format names
from it at start-up); a writer imports torch and its file layout when it writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import InvalidOptionError
from .written import Extraction, Written


class Writer(Protocol):
    """How a task of a checkpoint is written out in one format."""

    name: str

    def check(self, record: dict[str, Any], task: str) -> None:
        """Raise :class:`InvalidOptionError` when ``task`` (of record ``record``) cannot be written in this format."""
        ...

    def write(self, job: Extraction) -> Written:
        """Write ``job.task`` at ``job.output``."""
        ...


@dataclass(frozen=True)
class PeftWriter:
    """A PEFT adapter folder (:mod:`share_convert.io.peft_writer`)."""

    name: str = "peft"

    def check(self, record: dict[str, Any], task: str) -> None:
        t2i = record.get("t2i")
        if t2i and not t2i.get("peft_component"):
            raise InvalidOptionError(
                f"task {task} came from a {record.get('format')} text-to-image LoRA, whose modules span several "
                "pipeline components; a PEFT folder adapts one model",
                hint="Extract it with --format kohya or --format diffusers",
            )

    def write(self, job: Extraction) -> Written:
        from .peft_writer import write_peft

        return write_peft(job)


@dataclass(frozen=True)
class T2IWriter:
    """A kohya or diffusers text-to-image LoRA file (:mod:`share_convert.io.t2i.writing`)."""

    name: str

    def check(self, record: dict[str, Any], task: str) -> None:
        if not record.get("t2i"):
            raise InvalidOptionError(
                f"task {task} came from a PEFT adapter, which says nothing about a diffusion pipeline's components; "
                f"it cannot be written as a {self.name} file",
                hint="Extract it with --format peft",
            )

    def write(self, job: Extraction) -> Written:
        from .t2i.writing import write_t2i

        return write_t2i(job, self.name)


#: format name → its writer, in the order ``--format`` lists them
WRITERS: dict[str, Writer] = {w.name: w for w in (PeftWriter(), T2IWriter("kohya"), T2IWriter("diffusers"))}
#: the formats a task can be extracted in
FORMATS = tuple(WRITERS)
#: the dtypes ``extract --dtype`` offers for the written factors (default: the original's)
DTYPES = ("float32", "float16", "bfloat16")


def writer_for(record: dict[str, Any], requested: str | None, task: str) -> Writer:
    """The writer of ``task``: the requested format's, else that of the format it came in (PEFT for
    PEFT inputs); :class:`InvalidOptionError` for an unknown format or one the task cannot be written in."""
    fmt = requested or record.get("format") or "peft"
    if fmt not in FORMATS:  # a tuple: a record's unhashable value is refused too, not a TypeError
        raise InvalidOptionError(
            f"--format {fmt!r} is not one of {', '.join(FORMATS)}", hint="For example --format kohya"
        )
    writer = WRITERS[fmt]
    writer.check(record, task)
    return writer
