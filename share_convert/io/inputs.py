"""What the user typed as inputs: ``NAME=PATH``, paths, globs and folders of adapters."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadAdapterError, DuplicateTaskError
from .peft import CONFIG_NAME, WEIGHT_NAMES


@dataclass
class InputSpec:
    """One input as typed: an optional explicit task name and a path (or pattern)."""

    path: str
    task: str | None = None


def parse_input(text: str) -> InputSpec:
    """``NAME=PATH`` names the task explicitly; anything else is a path, glob or hf:// address."""
    if "=" in text and not text.startswith("hf://"):
        name, _, rest = text.partition("=")
        if name and "/" not in name and not os.path.exists(text):
            return InputSpec(path=rest, task=name)
    return InputSpec(path=text)


def expand_paths(text: str) -> list[Path]:
    """A path, a glob, or a folder of adapters, expanded to adapter paths (sorted)."""
    if glob.has_magic(text) and not os.path.exists(text):
        matches = sorted(glob.glob(text))
        if not matches:
            raise BadAdapterError("no file matches this pattern", path=text, hint="Check the pattern")
        return [Path(m) for m in matches]
    path = Path(text)
    if path.is_dir() and not any((path / n).is_file() for n in WEIGHT_NAMES) and not (path / CONFIG_NAME).is_file():
        found = sorted(
            p
            for p in path.iterdir()
            if (p.is_dir() and (p / CONFIG_NAME).is_file()) or p.suffix in (".safetensors", ".bin")
        )
        if not found:
            raise BadAdapterError(
                "folder holds no adapter", path=text, hint="Pass PEFT adapter folders or weights files"
            )
        return found
    return [path]


def check_unique_tasks(names: list[str], origins: list[str]) -> None:
    """Refuse two inputs of one task name, naming both (``NAME=PATH`` tells them apart)."""
    seen: dict[str, str] = {}
    for name, origin in zip(names, origins):
        if name in seen:
            raise DuplicateTaskError(
                f"task name {name!r} is used by both {seen[name]} and {origin}",
                hint="Name them explicitly: NAME=PATH",
            )
        seen[name] = origin
