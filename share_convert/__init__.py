"""share-convert: many LoRA adapters in, one Share checkpoint out, any task back as a PEFT adapter.

The library API lives in :mod:`share_convert.api`; the pieces it is built from:

- :mod:`~share_convert.formats` reads adapters lazily, one module at a time;
- :mod:`~share_convert.linalg` holds the linear algebra (canonical factors, bases, errors);
- :mod:`~share_convert.planning` chooses the shared rank k and private ranks per module;
- :mod:`~share_convert.consolidation` streams modules through both into a checkpoint;
- :mod:`~share_convert.checkpoint` writes and reads the checkpoint file;
- :mod:`~share_convert.extraction` writes a task back out as a PEFT adapter;
- :mod:`~share_convert.report` summarizes a checkpoint; :mod:`~share_convert.cli` is the CLI.
"""

from typing import Any

from .errors import ShareError

__version__ = "0.1.0"
__all__ = ["ConsolidationConfig", "ShareError", "__version__"]


def __getattr__(name: str) -> Any:
    # ConsolidationConfig lives with the engine, which imports torch: loaded on first use, so that
    # importing the package (and the CLI's light commands) does not pay for torch.
    if name == "ConsolidationConfig":
        from .consolidation import ConsolidationConfig

        return ConsolidationConfig
    raise AttributeError(f"module 'share_convert' has no attribute {name!r}")
