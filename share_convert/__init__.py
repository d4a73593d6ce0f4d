"""share-convert: many LoRA adapters in, one Share checkpoint out, any task back as a PEFT adapter.

The library API lives in :mod:`share_convert.api`; the pieces it is built from:

- :mod:`~share_convert.io.sources` classifies inputs and reads them lazily, one module at a time;
- :mod:`~share_convert.math.linalg` holds the linear algebra (canonical factors, bases, errors);
- :mod:`~share_convert.config` holds the options (:class:`ConsolidationConfig`);
- :mod:`~share_convert.engine.planning` chooses the shared rank k and private ranks per module;
- :mod:`~share_convert.engine.consolidation` streams modules through both into a checkpoint;
- :mod:`~share_convert.checkpoint` writes and reads the checkpoint file;
- :mod:`~share_convert.io.extraction` writes a task back out as a PEFT, kohya or diffusers adapter;
- :mod:`~share_convert.report.summary` summarizes a checkpoint; :mod:`~share_convert.cli` is the CLI;
- :mod:`~share_convert.runtime.model` serves a checkpoint's tasks in PyTorch (:class:`ShareModel`).
"""

from typing import TYPE_CHECKING, Any

from .config import ConsolidationConfig
from .errors import ShareError

if TYPE_CHECKING:
    from .runtime.model import ShareModel

__version__ = "0.1.0"
__all__ = ["ConsolidationConfig", "ShareError", "ShareModel", "__version__"]


def __getattr__(name: str) -> Any:
    # the runtime imports torch: loaded on first use, so that importing the package (and the CLI's
    # light commands: --help, tasks, info) does not pay for it
    if name == "ShareModel":
        from .runtime.model import ShareModel

        return ShareModel
    raise AttributeError(f"module 'share_convert' has no attribute {name!r}")
