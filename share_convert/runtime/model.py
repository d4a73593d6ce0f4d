"""Serving many tasks from one Share checkpoint: a PyTorch runtime with mixed-task batches.

:class:`ShareModel` injects the checkpoint into a base model's target layers
(share_convert.runtime.loading): each injected layer (:class:`~share_convert.runtime.layers.ShareLayer`)
holds the module's bases once and every loaded task's coefficients and private factors, and heads
saved with ``modules_to_save`` are replaced by :class:`~share_convert.runtime.heads.ShareHead`, which
runs each task's copy on its rows. The model resolves which task each row runs
(share_convert.runtime.selection: a call's ``task=``, else the innermost ``use`` block's, else the task
of :meth:`ShareModel.set_task`, else the merged one), loads and deletes tasks while serving
(share_convert.runtime.tasks, on the layers' stacks through share_convert.runtime.slots), merges a task
into the base weights or hands the base model back with it (share_convert.runtime.merging), reports its
memory (share_convert.runtime.memory) and hands the training of new tasks to share_convert.runtime.training
and share_convert.runtime.saving (its methods for them: share_convert.runtime.training_methods). Those
modules depend on the layers, never on this one. The API is documented in docs/runtime.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint.reader import Checkpoint
from ..errors import InvalidOptionError
from .heads import ShareHead
from .layers import LayerKind, ShareLayer, TaskFactors, layer_kind, replace_module
from .loading import inject
from .memory import MemoryReport, memory_report
from .merging import merge_and_unload, merge_task, unmerge_task
from .selection import UNSET, LoadedTasks, TaskSelection
from .tasks import LoadReport, ServingOptions, delete_task, groups_of, load_task
from .training_methods import TrainingMethods

if TYPE_CHECKING:
    from .training import TrainableTask

#: Keyword arguments that carry the batch, in the order their first dimension is trusted.
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "attention_mask")


class ShareModel(TrainingMethods, nn.Module):
    """A base model serving every task of a Share checkpoint, one task per row if need be.

    Build it with :meth:`from_checkpoint`; call it like the base model plus ``task=``: one task name
    for the whole batch, or a list of one name (or None, the base model) per row; :meth:`set_task` makes
    one task the default of calls without ``task=``, and :meth:`load_task` / :meth:`delete_task` change
    the loaded tasks while it serves. The base model is
    changed in place (as PEFT does); :meth:`unload` gives it back untouched. The tasks of the running
    call are not passed through the layers: they are held per thread and asyncio task
    (share_convert.runtime.selection), so that threads serving different tasks do not see each other's and a
    nested selection restores the outer one. :meth:`merge` changes the weights, for every thread.
    """

    def __init__(
        self,
        base_model: nn.Module,
        tasks: list[str],
        layers: dict[str, ShareLayer],
        heads: dict[str, ShareHead],
        selection: TaskSelection,
        options: ServingOptions | None = None,
    ):
        super().__init__()
        self.base_model = base_model
        self._tasks = LoadedTasks(tasks)
        self._layers = layers
        self._heads = heads
        self._selection = selection
        self._options = options or ServingOptions()
        self._groups = groups_of(layers)  # per layer, its groups' columns in the bases (for load_task)
        self._active: tuple[str | None, ...] = ()  # set_task's task (a name, or None: the base model), if set
        self._unloaded = False
        self._trainable: dict[str, TrainableTask] = {}  # the tasks added with add_task, by name

    # construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        base_model: Any,
        checkpoint: str | Path | Checkpoint,
        *,
        tasks: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        head_pad_value: float = float("-inf"),
        component: str | None = None,
        keep_quantized: bool = True,
    ) -> ShareModel:
        """Inject ``checkpoint`` (a path, ``hf://`` address or open :class:`Checkpoint`) into ``base_model``.

        ``base_model`` is the model the adapters were trained on; for a checkpoint of text-to-image
        LoRAs, a diffusers pipeline (every component the checkpoint adapts: UNet or transformer and
        text encoders) or one component of it (``pipe.unet``, ``pipe.transformer``, ``pipe.text_encoder``:
        the other components' modules are left out); see share_convert.runtime.components.

        Args:
            tasks: the tasks to load (default: all of them).
            dtype: dtype of the Share tensors; default: each target layer's weight dtype (bases stored
                in bfloat16 are converted once at load). A lower dtype saves memory: inputs are then
                cast to it for the Share part and its result back.
            device: where the Share tensors go; default: each target layer's device. Given, it must
                be the model's device (move the model first).
            head_pad_value: fills the missing columns when heads of different widths meet in one batch.
            component: which pipeline component ``base_model`` is (``"unet"``, ``"transformer"``,
                ``"text_encoder"``, ``"text_encoder_2"``), for a text-to-image checkpoint; default: the one
                whose modules and shapes ``base_model`` has (two text encoders of one width need it).
            keep_quantized: factors the checkpoint stores as int8/NF4 codes (bases, coefficients,
                private rows: the default precision plan's) stay codes in memory, with their scales;
                each call dequantizes, layer by layer, what it uses (that layer's bases, the rows of
                the tasks it runs), with outputs equal to the checkpoint dequantized at load. The
                default: measured on the CPU it costs ≤ 1.5× the dequantized runtime's mixed-batch
                time above the base model (benchmarks/RESULTS.md, section 23) for 2–11× less adapter
                memory. ``False`` dequantizes at load (more memory, no per-call dequantization).
                A float checkpoint is held the same either way; see :meth:`memory_report`.

        Nothing is changed in ``base_model`` unless every module and head fits.
        """

        def build(ckpt: Checkpoint) -> ShareModel:
            injected = inject(base_model, ckpt, tasks, dtype, device, head_pad_value, component, keep_quantized)
            return cls(base_model, *injected, ServingOptions.of(ckpt, dtype, head_pad_value))

        if isinstance(checkpoint, Checkpoint):
            return build(checkpoint)
        from ..io.checkpoint_path import open_checkpoint  # paths, folders and hf:// addresses: read in one place

        with open_checkpoint(checkpoint) as ckpt:
            return build(ckpt)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the base model (``config``, ``device``...) read through the runtime, as PEFT does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # tasks -----------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """The loaded tasks, in load order."""
        return list(self._tasks.ids)

    @property
    def merged(self) -> str | None:
        """The task merged into the base weights, if any."""
        m = self._selection.merged
        return None if m is None else self._tasks.name_of(m)

    @property
    def active_task(self) -> str | None:
        """The task calls without ``task=`` run (:meth:`set_task`); None when it is the base model or none is set."""
        return self._active[0] if self._active else None

    def set_task(self, task: str | None) -> None:
        """Make ``task`` (a loaded task's name, or None: the base model) what calls run when they give no
        ``task=``. An explicit ``task=`` and a ``with model.use(...)`` block around the call win over it;
        without it, a merged task runs, else such a call is refused. It is the model's, for every thread."""
        self._check_loaded()
        if task is not None and not isinstance(task, str):
            raise InvalidOptionError(
                f"set_task takes one task name or None, got {task!r}", hint="Use task=[...] per call"
            )
        self._tasks.id_of(task)  # an unknown name: UnknownTaskError, naming the loaded ones
        self._active = (task,)

    def load_task(self, source: str | Path, name: str | None = None, *, check_base_model: bool = True) -> LoadReport:
        """Load a task while serving, held in the shared bases where it lies in them and privately otherwise,
        within the checkpoint's error target; returns how, per module. ``source``: a PEFT adapter folder or
        file, a kohya or diffusers file, an ``hf://`` address, or ``CHECKPOINT::TASK`` (a task of another
        Share checkpoint); see :func:`share_convert.runtime.tasks.load_task`."""
        return load_task(self, source, name, check_base_model=check_base_model)

    def delete_task(self, name: str) -> None:
        """Free task ``name``'s rows (coefficients, private factors, heads); unmerged first if merged, and no
        longer the active task if it was. An unknown name raises :class:`~share_convert.errors.UnknownTaskError`."""
        delete_task(self, name)

    def heads_of(self, task: str) -> dict[str, nn.Module]:
        """The head modules ``task`` runs, by module name (its own copies, or the base module's)."""
        tid = self._tasks.id_of(task)
        return {name: head.module_for(tid) for name, head in self._heads.items()}

    def _resolve(self, task: Any, batch: int | None) -> int | list[int]:
        self._check_loaded()
        if task is UNSET and self._active:
            task = self._active[0]
        return self._tasks.resolve(task, batch, self._selection.merged)

    @contextmanager
    def use(self, task: Any = UNSET, *, batch: int | None = None) -> Iterator[None]:
        """Select ``task`` (a name, None, or one per row) for every call to the base model inside.

        For calls that do not go through :meth:`forward`, e.g. ``base_model.generate``. The selection
        holds in this thread or asyncio task only (threads started inside see none: the base model);
        leaving the block, or a nested selection ending, restores the one that was there before.
        Which task a call runs: its ``task=``, else the innermost ``use`` block's, else :meth:`set_task`'s,
        else the merged task's; with none of them the call is refused.
        """
        if task is UNSET and self._selection.selected_here():  # inside another selection: it stands
            yield
            return
        ids = self._resolve(task, batch)
        token = self._selection.select(ids)
        try:
            yield
        finally:
            self._selection.restore(token)

    def forward(self, *args: Any, task: Any = UNSET, **kwargs: Any) -> Any:
        """The base model's output with ``task`` (a name, None, or one per row) applied."""
        with self.use(task, batch=_batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, task: Any = UNSET, **kwargs: Any) -> Any:
        """``base_model.generate`` with ``task`` applied (one per row: no beam search)."""
        with self.use(task, batch=_batch_size(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    # merging ---------------------------------------------------------------------------------------------
    def merge(self, task: str, *, exact: bool = True) -> None:
        """Add ``task``'s ΔW to the base weights: single-task calls then cost the base model's alone.

        With ``exact`` (the default) the original weights of the changed layers are kept (reported as
        ``merge_backup``) so that :meth:`unmerge` and :meth:`unload` restore them bit for bit; with
        ``exact=False`` nothing is kept and unmerging subtracts ΔW, leaving float rounding in the
        weights. While merged, only that task can run, and ``task=`` may be left out. A task trained
        here (:meth:`add_task`) merges exactly only, and is frozen while merged
        (share_convert.runtime.merging).
        """
        merge_task(self, task, exact)

    def unmerge(self) -> None:
        """Restore the original base weights (exactly)."""
        unmerge_task(self)

    def merge_and_unload(self, task: str) -> nn.Module:
        """The base model with ``task``'s ΔW added into its weights (rounded once from float64) and its
        heads in place: what PEFT's ``merge_and_unload()`` gives for the task's extracted adapter. The
        ShareModel is unloaded afterwards."""
        return merge_and_unload(self, task)

    # reporting and unloading -----------------------------------------------------------------------------
    def memory_report(self) -> MemoryReport:
        """What the loaded tasks hold in memory: bases once per module, then per task, in bytes as held,
        by role and by precision (``by_role``, ``held``: ``int8`` / ``nf4`` for codes kept with their
        scales, the float dtype's name for values); ``dequantized_from``: what the file stores as codes
        but is held dequantized (``keep_quantized=False``); ``coefficient_padding``: the zero padding of
        coefficient stacks held as values (see :class:`MemoryReport`)."""
        return memory_report(len(self._tasks.ids), self._layers, self._heads)

    def unload(self) -> nn.Module:
        """Take every injected module out and return the base model as it was before loading."""
        self._check_loaded()
        self.unmerge()
        for name, layer in self._layers.items():
            replace_module(self.base_model, name, layer.base_layer)
        for name, head in self._heads.items():
            replace_module(self.base_model, name, head.base_module)
        self._unloaded = True
        return self.base_model

    def _check_loaded(self) -> None:
        if self._unloaded:
            raise InvalidOptionError("this ShareModel was unloaded", hint="Load the checkpoint again")

    def _append_task(self, name: str) -> int:
        """Register ``name`` as a task with nothing stored in the layers; returns its id.

        It takes the base model's id (``len(tasks)``) and the base model moves up by one; every
        layer's slot maps get one more zero entry, so stored tasks and mixed batches are unchanged.
        """
        self._check_loaded()
        count = len(self._tasks.names)
        tid = self._tasks.append(name)
        if len(self._tasks.names) > count:  # a new id, not a deleted task's
            for layer in self._layers.values():
                layer.factors.add_empty_task()
        return tid


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The number of rows of a call: the first dimension of its main input tensor."""
    for key in _BATCH_KEYS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


__all__ = [
    "LayerKind",
    "MemoryReport",
    "ShareHead",
    "ShareLayer",
    "ShareModel",
    "TaskFactors",
    "TaskSelection",
    "layer_kind",
]
