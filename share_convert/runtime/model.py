"""Serving many tasks from one Share checkpoint: a PyTorch runtime with mixed-task batches.

:class:`ShareModel` injects the checkpoint into a base model's target layers. Each injected
layer (:class:`ShareLayer`) holds the module's bases once and every loaded task's coefficients
and private factors, and computes, for the row of task t (spec, sections 1 and 6),

    y = W x + β (E_B,t (E_A,tᵀ (αᵀ x))) + P_B,t (P_A,t x)

with the LoRA scale already folded into the stored tensors. In a batch whose rows belong to
different tasks, ``αᵀ x`` and the product with β are computed once for all rows; only the
k × p coefficient products are per task, gathered per row from zero-padded stacked tensors
(``index_select`` + ``bmm``), with no Python loop over rows or tasks. Heads saved with
``modules_to_save`` are replaced by :class:`ShareHead`, which runs each task's copy on its rows.

The checkpoint is read only through :class:`~share_convert.checkpoint.reader.Checkpoint`'s accessors
(``tasks``, ``modules``, ``bases``, ``task_tensors``, ``heads``). The API is documented in
docs/runtime.md.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.reader import Checkpoint
from ..errors import (
    BatchMismatchError,
    CorruptCheckpointError,
    DeviceMismatchError,
    InvalidOptionError,
    ModelMismatchError,
    UnknownTaskError,
)
from ..io.peft import PEFT_PREFIX
from .selection import BASE, Selection, TaskSelection

#: ``task=`` left out: the merged task when one is merged, an error otherwise.
_UNSET: Any = object()
#: PEFT wrapper segments that may appear in a head's key (``score.modules_to_save.default.weight``).
_WRAPPER_SEGMENT = re.compile(r"\.(?:modules_to_save\.[^.]+|original_module)(?=\.)")
#: Keyword arguments that carry the batch, in the order their first dimension is trusted.
_BATCH_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "attention_mask")


# -- which layers can be served ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """How a base layer's weight relates to the checkpoint's ΔW (n out × d in).

    ``transposed``: the weight is stored d × n (transformers' ``Conv1D``, PEFT's
    ``fan_in_fan_out``). A convolution kind would add how its input is unfolded into rows.
    """

    name: str
    transposed: bool

    def weight_shape(self, n: int, d: int) -> tuple[int, int]:
        return (d, n) if self.transposed else (n, d)

    def as_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW (n × d) laid out like the layer's weight."""
        return delta.T if self.transposed else delta


LINEAR = LayerKind("Linear", transposed=False)
CONV1D = LayerKind("Conv1D", transposed=True)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a layer the runtime can inject into, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    try:  # transformers is optional: without it no model holds a Conv1D
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is in the test extra
        return None
    return CONV1D if isinstance(module, Conv1D) else None


def model_path(key: str) -> str:
    """The base model's submodule name for a PEFT key prefix (``base_model.model.`` stripped)."""
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


# -- one target layer --------------------------------------------------------------------------------------


class TaskFactors(nn.Module):
    """Every loaded task's tensors for one layer, stacked so that a batch gathers them by row.

    Slot 0 of each stack is all zeros (tasks without that part, and the base model); a task's
    slot is ``coef_slot[task id]`` / ``private_slot[task id]``. Shapes (S tasks with coefficients
    here, S' with a private correction, P and Q the largest ranks, zero-padded):

    - ``coef_A`` (S+1, K_A, P) and ``coef_B`` (S+1, K_B, P): E_A and E_B; with groups, K is the sum
      of the groups' k and a task's rows outside its group are zero;
    - ``private_A`` (S'+1, Q, d) and ``private_B`` (S'+1, n, Q): P_A and P_B.

    They are buffers; ``index_select`` and ``bmm`` are differentiable, so a training feature can
    register a stack (or a task's slot of it) as an ``nn.Parameter`` without changing the forward.
    """

    def __init__(
        self,
        coef_A: torch.Tensor,
        coef_B: torch.Tensor,
        coef_slot: torch.Tensor,
        private_A: torch.Tensor,
        private_B: torch.Tensor,
        private_slot: torch.Tensor,
        spans: dict[int, tuple[int, int, int, int, int, int]],
        private_ranks: dict[int, tuple[int, int]],
    ):
        super().__init__()
        self.register_buffer("coef_A", coef_A)
        self.register_buffer("coef_B", coef_B)
        self.register_buffer("coef_slot", coef_slot)
        self.register_buffer("private_A", private_A)
        self.register_buffer("private_B", private_B)
        self.register_buffer("private_slot", private_slot)
        #: task id -> (its slot, rows of its group in K_A: a0, a1 and in K_B: b0, b1, its rank p);
        #: kept on the host so that a single-task call reads no device tensor
        self.spans = spans
        #: task id -> (its slot, its private rank q > 0)
        self.private_ranks = private_ranks


class ShareLayer(nn.Module):
    """A base layer plus the Share update of every loaded task (the bases held once).

    ``basis_A`` (d × K_A) and ``basis_B`` (n × K_B) are buffers (None where no loaded task has
    coefficients here). The Share part is computed in the dtype of these tensors: the input is cast
    to it and the result back to the base layer's output dtype.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        kind: LayerKind,
        name: str,
        basis_A: torch.Tensor | None,
        basis_B: torch.Tensor | None,
        factors: TaskFactors,
        selection: TaskSelection,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.kind = kind
        self.name = name
        self.register_buffer("basis_A", basis_A)
        self.register_buffer("basis_B", basis_B)
        self.factors = factors
        self.selection = selection
        self.out_features, self.in_features = factors.private_B.shape[1], factors.private_A.shape[2]
        self._backup: torch.Tensor | None = None
        self._merged: int | None = None

    # forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sel = self.selection.current
        if sel.single is not None:
            if sel.single == self.selection.merged or not self.serves(sel.single):
                return self.base_layer(x, *args, **kwargs)
        elif not any(self.serves(t) for t in sel.distinct):
            return self.base_layer(x, *args, **kwargs)
        self._check_input(x)
        result = self.base_layer(x, *args, **kwargs)
        delta = self.delta(x, sel)
        return result if delta is None else result + delta.to(result.dtype)

    def serves(self, task: int) -> bool:
        """Whether ``task`` changes this layer."""
        return task in self.factors.spans or task in self.factors.private_ranks

    def _check_input(self, x: torch.Tensor) -> None:
        here = self.factors.coef_slot.device
        if x.device != here:
            raise DeviceMismatchError(
                f"the input reaching {self.name} is on {x.device}, the model's Share tensors on {here}",
                hint=f"Move the inputs to {here}, or the model with model.to({str(x.device)!r})",
            )
        weight = getattr(self.base_layer, "weight", None)
        if (
            weight is not None
            and x.is_floating_point()
            and x.dtype != weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            raise DeviceMismatchError(
                f"the input reaching {self.name} is {x.dtype}, the layer's weights are {weight.dtype}",
                hint=f"Convert the inputs to {weight.dtype}, or the model with model.to({x.dtype})",
            )

    def delta(self, x: torch.Tensor, sel: Selection | None = None) -> torch.Tensor | None:
        """The Share part of the output for the tasks of ``sel`` (default: the running call's); None when zero."""
        sel, f = sel if sel is not None else self.selection.current, self.factors
        dtype = f.coef_A.dtype
        h = x if x.dtype == dtype else x.to(dtype)
        if sel.single is not None:
            return self._delta_single(h, sel.single)
        batch = sel.batch
        if h.dim() < 2 or h.shape[0] != batch:
            raise BatchMismatchError(
                f"{self.name} received {tuple(x.shape[:-1])} rows for a batch of {batch} tasks: "
                "this model reshapes its rows before this layer",
                hint="Run one task per call for this model",
            )
        rows = h.reshape(batch, -1, h.shape[-1])  # (B, L, d)
        index = sel.index(h.device)  # the base model's rows (id -1) take the last, all-zero slot entry
        out = None
        if self.basis_A is not None and any(t in f.spans for t in sel.distinct):
            slots = f.coef_slot[index]
            z = rows @ self.basis_A  # αᵀx once for all rows: (B, L, K_A)
            u = torch.bmm(z, f.coef_A.index_select(0, slots))  # E_A,tᵀ per row: (B, L, P)
            v = torch.bmm(u, f.coef_B.index_select(0, slots).transpose(1, 2))  # E_B,t: (B, L, K_B)
            out = v @ self.basis_B.T  # β once for all rows
        if any(t in f.private_ranks for t in sel.distinct):
            slots = f.private_slot[index]
            w = torch.bmm(rows, f.private_A.index_select(0, slots).transpose(1, 2))  # (B, L, Q)
            w = torch.bmm(w, f.private_B.index_select(0, slots).transpose(1, 2))  # (B, L, n)
            out = w if out is None else out + w
        return None if out is None else out.reshape(*x.shape[:-1], out.shape[-1])

    def _delta_single(self, h: torch.Tensor, task: int) -> torch.Tensor | None:
        f, out = self.factors, None
        span = f.spans.get(task)
        if span is not None:
            slot, a0, a1, b0, b1, p = span
            z = h @ self.basis_A[:, a0:a1]
            z = (z @ f.coef_A[slot, a0:a1, :p]) @ f.coef_B[slot, b0:b1, :p].T
            out = z @ self.basis_B[:, b0:b1].T
        if task in f.private_ranks:
            slot, q = f.private_ranks[task]
            w = (h @ f.private_A[slot, :q].T) @ f.private_B[slot, :, :q].T
            out = w if out is None else out + w
        return out

    # merging ---------------------------------------------------------------------------------------------
    def delta_weight(self, task: int) -> torch.Tensor:
        """ΔW of ``task`` (n × d, float64): β E_B E_Aᵀ αᵀ + P_B P_A."""
        f = self.factors
        delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float64, device=f.coef_A.device)
        span = f.spans.get(task)
        if span is not None:
            slot, a0, a1, b0, b1, p = span
            B = self.basis_B[:, b0:b1].double() @ f.coef_B[slot, b0:b1, :p].double()
            A = self.basis_A[:, a0:a1].double() @ f.coef_A[slot, a0:a1, :p].double()
            delta += B @ A.T
        if task in f.private_ranks:
            slot, q = f.private_ranks[task]
            delta += f.private_B[slot, :, :q].double() @ f.private_A[slot, :q].double()
        return delta

    @torch.no_grad()
    def merge(self, task: int, exact: bool = True) -> None:
        """Add ``task``'s ΔW to the base weight.

        ``exact`` keeps a copy of the original weight so that :meth:`unmerge` restores it bit for
        bit; without it, unmerging subtracts ΔW again (as PEFT does), which leaves rounding in the weight.
        """
        if not self.serves(task):
            return
        weight = self.base_layer.weight
        self._merged = task
        self._backup = weight.detach().clone() if exact else None
        merged = weight.double() + self.kind.as_weight(self.delta_weight(task)).to(weight.device)
        weight.copy_(merged.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        if self._backup is not None:
            weight.copy_(self._backup)
        elif self._merged is not None:
            delta = self.kind.as_weight(self.delta_weight(self._merged)).to(weight.device)
            weight.copy_((weight.double() - delta).to(weight.dtype))
        self._backup = self._merged = None

    def extra_repr(self) -> str:
        k_a = 0 if self.basis_A is None else self.basis_A.shape[1]
        k_b = 0 if self.basis_B is None else self.basis_B.shape[1]
        return f"{self.kind.name} {self.out_features}×{self.in_features}, k_B={k_b}, k_A={k_a}"


# -- heads (modules_to_save) ---------------------------------------------------------------------------------


class ShareHead(nn.Module):
    """A module replaced per task (PEFT's ``modules_to_save``: classifier, score...).

    Each row runs through its task's copy; a task without its own copy uses the base module. When
    the copies' outputs differ in their last dimension (tasks with different label counts), a
    mixed batch returns them padded on the right with ``pad_value`` (default ``-inf``: softmax
    gives the missing labels probability 0 and argmax never picks one); row i's own values are
    ``out[i, ..., :width]`` with ``width`` the output size of its task's head
    (:meth:`ShareModel.heads_of`).
    """

    def __init__(
        self,
        base_module: nn.Module,
        name: str,
        copies: dict[int, nn.Module],
        selection: TaskSelection,
        pad_value: float,
    ):
        super().__init__()
        self.base_module = base_module
        self.name = name
        self.copies = nn.ModuleDict({str(t): m for t, m in copies.items()})
        self.selection = selection
        self.pad_value = pad_value

    def module_for(self, task: int) -> nn.Module:
        return self.copies[str(task)] if str(task) in self.copies else self.base_module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sel = self.selection.current
        if sel.single is not None:
            return self.module_for(sel.single)(x, *args, **kwargs)
        groups: dict[int, list[int]] = {}
        for t in sel.distinct:
            groups.setdefault(id(self.module_for(t)), []).append(t)
        if len(groups) == 1:
            return self.module_for(sel.distinct[0])(x, *args, **kwargs)
        if x.shape[0] != sel.batch:
            raise BatchMismatchError(
                f"{self.name} received {x.shape[0]} rows for a batch of {sel.batch} tasks",
                hint="Run one task per call for this model",
            )
        parts = []
        for tasks in groups.values():
            rows = sel.rows(tuple(tasks), x.device)
            parts.append((rows, self.module_for(tasks[0])(x.index_select(0, rows), *args, **kwargs)))
        width = max(y.shape[-1] for _, y in parts)
        first = parts[0][1]
        if any(y.shape[1:-1] != first.shape[1:-1] for _, y in parts):
            raise BatchMismatchError(
                f"the tasks' {self.name} heads give outputs of different shapes", hint="Run one task per call"
            )
        out = first.new_full((sel.batch, *first.shape[1:-1], width), self.pad_value)
        for rows, y in parts:
            if y.shape[-1] < width:
                y = F.pad(y, (0, width - y.shape[-1]), value=self.pad_value)
            out.index_copy_(0, rows, y.to(out.dtype))
        return out


# -- memory ---------------------------------------------------------------------------------------------------


@dataclass
class MemoryReport:
    """Bytes held by a :class:`ShareModel` beyond the base model (tensors only, as held).

    ``coefficients`` and ``private`` include the zero padding and the zero slot of the stacks;
    ``lora_equivalent`` is what the same tasks would hold as plain LoRA factors of rank p + q per
    module in the same dtype (unpadded), the figure the Share layout is to be compared with.
    """

    tasks: int
    modules: int
    bases: int
    coefficients: int
    private: int
    heads: int
    index: int
    merge_backup: int
    lora_equivalent: int

    @property
    def adapters(self) -> int:
        """Everything the tasks add: bases, coefficients, private factors, heads and slot maps."""
        return self.bases + self.coefficients + self.private + self.heads + self.index

    @property
    def per_task(self) -> float:
        """Bytes per task beyond the shared bases."""
        return (self.adapters - self.bases) / max(self.tasks, 1)

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), adapters=self.adapters, per_task=self.per_task)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# -- the model ------------------------------------------------------------------------------------------------


class ShareModel(nn.Module):
    """A base model serving every task of a Share checkpoint, one task per row if need be.

    Build it with :meth:`from_checkpoint`; call it like the base model plus ``task=``: one task name
    for the whole batch, or a list of one name (or None, the base model) per row. The base model is
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
    ):
        super().__init__()
        self.base_model = base_model
        self._tasks = list(tasks)
        self._ids = {t: i for i, t in enumerate(tasks)}
        self._layers = layers
        self._heads = heads
        self._selection = selection
        self._unloaded = False
        self._trainable: dict[str, Any] = {}  # name -> training.TrainableTask

    # construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        base_model: nn.Module,
        checkpoint: str | Path | Checkpoint,
        *,
        tasks: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        head_pad_value: float = float("-inf"),
    ) -> ShareModel:
        """Inject ``checkpoint`` (a path, ``hf://`` address or open :class:`Checkpoint`) into ``base_model``.

        Args:
            tasks: the tasks to load (default: all of them).
            dtype: dtype of the Share tensors; default: each target layer's weight dtype (bases stored
                in bfloat16 are converted once at load). A lower dtype saves memory: inputs are then
                cast to it for the Share part and its result back.
            device: where the Share tensors go; default: each target layer's device. Given, it must
                be the model's device (move the model first).
            head_pad_value: fills the missing columns when heads of different widths meet in one batch.

        Nothing is changed in ``base_model`` unless every module and head fits.
        """
        if isinstance(checkpoint, Checkpoint):
            return _build(base_model, checkpoint, tasks, dtype, device, head_pad_value)
        from ..api import open_checkpoint

        with open_checkpoint(checkpoint) as ckpt:
            return _build(base_model, ckpt, tasks, dtype, device, head_pad_value)

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
        return list(self._tasks)

    @property
    def merged(self) -> str | None:
        """The task merged into the base weights, if any."""
        m = self._selection.merged
        return None if m is None else self._tasks[m]

    def heads_of(self, task: str) -> dict[str, nn.Module]:
        """The head modules ``task`` runs, by module name (its own copies, or the base module's)."""
        tid = self._task_id(task)
        return {name: head.module_for(tid) for name, head in self._heads.items()}

    def _task_id(self, task: str | None) -> int:
        if task is None:
            return BASE
        tid = self._ids.get(task) if isinstance(task, str) else None
        if tid is None:
            shown = task if isinstance(task, str) else repr(task)
            names = ", ".join(self._tasks[:20]) + (", …" if len(self._tasks) > 20 else "")
            raise UnknownTaskError(
                f"no task named {shown!r} is loaded", hint=f"Use one of: {names} (or None for the base model)"
            )
        return tid

    def _resolve(self, task: Any, batch: int | None) -> int | list[int]:
        self._check_loaded()
        merged = self._selection.merged
        if task is _UNSET:
            if merged is None:
                raise InvalidOptionError(
                    "no task given", hint="Pass task='name' (one task) or task=[...] (one per row)"
                )
            return merged
        if isinstance(task, (list, tuple)):
            if batch is not None and len(task) != batch:
                raise BatchMismatchError(
                    f"{len(task)} tasks given for a batch of {batch} rows",
                    hint="Give one task per row, or one task name for the whole batch",
                )
            ids: int | list[int] = [self._task_id(t) for t in task]
        else:
            ids = self._task_id(task)
        if merged is not None and set([ids] if isinstance(ids, int) else ids) != {merged}:
            raise InvalidOptionError(
                f"task {self._tasks[merged]!r} is merged into the base weights: only it can run",
                hint="Call unmerge() to serve other tasks",
            )
        return ids

    @contextmanager
    def use(self, task: Any = _UNSET, *, batch: int | None = None) -> Iterator[None]:
        """Select ``task`` (a name, None, or one per row) for every call to the base model inside.

        For calls that do not go through :meth:`forward`, e.g. ``base_model.generate``. The selection
        holds in this thread or asyncio task only (threads started inside see none: the base model);
        leaving the block, or a nested selection ending, restores the one that was there before.
        """
        ids = self._resolve(task, batch)
        token = self._selection.select(ids)
        try:
            yield
        finally:
            self._selection.restore(token)

    def forward(self, *args: Any, task: Any = _UNSET, **kwargs: Any) -> Any:
        """The base model's output with ``task`` (a name, None, or one per row) applied."""
        with self.use(task, batch=_batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, task: Any = _UNSET, **kwargs: Any) -> Any:
        """``base_model.generate`` with ``task`` applied (one per row: no beam search)."""
        with self.use(task, batch=_batch_size(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    # merging ---------------------------------------------------------------------------------------------
    def merge(self, task: str, *, exact: bool = True) -> None:
        """Add ``task``'s ΔW to the base weights: single-task calls then cost the base model's alone.

        With ``exact`` (the default) the original weights of the changed layers are kept (reported as
        ``merge_backup``) so that :meth:`unmerge` and :meth:`unload` restore them bit for bit; with
        ``exact=False`` nothing is kept and unmerging subtracts ΔW, leaving float rounding in the
        weights. While merged, only that task can run, and ``task=`` may be left out.
        """
        self._check_loaded()
        tid = self._task_id(task)
        if tid == BASE:
            raise InvalidOptionError("cannot merge the base model", hint="Name a task")
        self.unmerge()
        for layer in self._layers.values():
            layer.merge(tid, exact)
        self._selection.merged = tid

    def unmerge(self) -> None:
        """Restore the original base weights (exactly)."""
        for layer in self._layers.values():
            layer.unmerge()
        self._selection.merged = None

    # reporting and unloading -----------------------------------------------------------------------------
    def memory_report(self) -> MemoryReport:
        """What the loaded tasks hold in memory: bases once per module, then per task."""
        bases = coefficients = private = index = backup = lora = 0
        for layer in self._layers.values():
            f = layer.factors
            bases += _nbytes(layer.basis_A) + _nbytes(layer.basis_B)
            coefficients += _nbytes(f.coef_A) + _nbytes(f.coef_B)
            private += _nbytes(f.private_A) + _nbytes(f.private_B)
            index += _nbytes(f.coef_slot) + _nbytes(f.private_slot)
            backup += _nbytes(layer._backup)
            ranks = {t: s[5] for t, s in f.spans.items()}
            for t, (_, q) in f.private_ranks.items():
                ranks[t] = ranks.get(t, 0) + q
            size = f.coef_A.element_size()
            lora += sum(ranks.values()) * (layer.out_features + layer.in_features) * size
        heads = sum(_nbytes(t) for head in self._heads.values() for m in head.copies.values() for t in _tensors_of(m))
        return MemoryReport(
            tasks=len(self._tasks),
            modules=len(self._layers),
            bases=bases,
            coefficients=coefficients,
            private=private,
            heads=heads,
            index=index,
            merge_backup=backup,
            lora_equivalent=lora,
        )

    def unload(self) -> nn.Module:
        """Take every injected module out and return the base model as it was before loading."""
        self._check_loaded()
        self.unmerge()
        for name, layer in self._layers.items():
            _replace(self.base_model, name, layer.base_layer)
        for name, head in self._heads.items():
            _replace(self.base_model, name, head.base_module)
        self._unloaded = True
        return self.base_model

    def _check_loaded(self) -> None:
        if self._unloaded:
            raise InvalidOptionError("this ShareModel was unloaded", hint="Load the checkpoint again")

    # -- training a new task (share_convert.runtime.training; docs/training.md) ----------------------------------
    def add_task(self, name: str, **options: Any) -> Any:
        """Add a new task trained in the checkpoint's subspaces (coefficients and ``new_directions``
        temporary directions only); it becomes the task that trains (others frozen: switch with
        :meth:`train_task`); see :func:`share_convert.runtime.training.add_trainable_task`."""
        from .training import add_trainable_task

        return add_trainable_task(self, name, **options)

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
        """Write trainable task ``name`` as a standard PEFT LoRA adapter; see :func:`share_convert.runtime.training.save_task`."""
        from .training import save_task

        return save_task(self, name, path, force=force)

    def fold_into(self, name: str, checkpoint: str | Path, output: str | Path, **options: Any) -> dict[str, Any]:
        """Fold trainable task ``name`` into ``checkpoint`` (the engine of ``add``); see
        :func:`share_convert.runtime.training.fold_into`."""
        from .training import fold_into

        return fold_into(self, name, checkpoint, output, **options)

    def _append_task(self, name: str) -> int:
        """Register ``name`` as a task with nothing stored in the layers; returns its id.

        It takes the base model's id (``len(tasks)``) and the base model moves up by one; every
        layer's slot maps get one more zero entry, so stored tasks and mixed batches are unchanged.
        """
        self._check_loaded()
        tid = len(self._tasks)
        self._tasks.append(name)
        self._ids[name] = tid
        for layer in self._layers.values():
            f = layer.factors
            f.coef_slot = torch.cat([f.coef_slot, f.coef_slot.new_zeros(1)])
            f.private_slot = torch.cat([f.private_slot, f.private_slot.new_zeros(1)])
        return tid

    # -- end of training -----------------------------------------------------------------------------------


def _tensors_of(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# -- reading the checkpoint into layers -----------------------------------------------------------------------


def _build(
    base_model: nn.Module,
    ckpt: Checkpoint,
    tasks: Sequence[str] | None,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    pad_value: float,
) -> ShareModel:
    if isinstance(tasks, str):
        raise InvalidOptionError("tasks must be a list of names", hint=f"Use tasks=[{tasks!r}]")
    names = list(ckpt.tasks) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in ckpt.tasks]
    if unknown:
        available = sorted(ckpt.tasks)
        shown = ", ".join(available[:20]) + (", …" if len(available) > 20 else "")
        raise UnknownTaskError(f"no task named {unknown[0]!r}", path=ckpt.path, hint=f"Available tasks: {shown}")
    if len(set(names)) != len(names) or not names:
        raise InvalidOptionError("tasks must name at least one task, each once", path=ckpt.path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidOptionError(
            f"dtype must be a floating torch dtype, got {dtype!r}", hint="For example torch.float32"
        )
    ids = {t: i for i, t in enumerate(names)}
    selection = TaskSelection()
    layers: dict[str, ShareLayer] = {}
    for module, info in ckpt.modules.items():
        present = [t for t in names if t in info["tasks"]]
        if not present:
            continue
        path = model_path(module)
        target = _target(base_model, path, module, ckpt)
        kind = layer_kind(target)
        if kind is None:
            raise ModelMismatchError(
                f"{path} is a {type(target).__name__}; the runtime serves nn.Linear and transformers Conv1D layers",
                path=ckpt.path,
                hint="Use 'share-convert extract' and PEFT for this model",
            )
        n, d = info["out_features"], info["in_features"]
        weight = target.weight
        if tuple(weight.shape) != kind.weight_shape(n, d):
            raise ModelMismatchError(
                f"module {path} of the model has weight {tuple(weight.shape)}, the checkpoint's ΔW is {n}×{d} "
                f"({kind.name} stores {'in×out' if kind.transposed else 'out×in'})",
                path=ckpt.path,
                hint=f"Load it into the base model it was made for ({_base_names(ckpt, present)})",
            )
        here = _placement(weight, device, path)
        held = dtype or weight.dtype
        if not held.is_floating_point:
            raise DeviceMismatchError(
                f"{path} has {weight.dtype} weights (quantized?)",
                path=ckpt.path,
                hint="Pass dtype=torch.bfloat16 (or float32) for the Share tensors",
            )
        basis_A, basis_B, factors = _read_module(ckpt, module, present, ids, len(names), held, here)
        layers[path] = ShareLayer(target, kind, path, basis_A, basis_B, factors, selection)
    heads = _read_heads(base_model, ckpt, names, ids, layers, selection, pad_value)
    for path, layer in layers.items():
        _replace(base_model, path, layer)
    for path, head in heads.items():
        _replace(base_model, path, head)
    return ShareModel(base_model, names, layers, heads, selection)


def _target(model: nn.Module, path: str, module: str, ckpt: Checkpoint) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ModelMismatchError(
            f"the checkpoint's module {module} has no counterpart {path} in the model ({type(model).__name__})",
            path=ckpt.path,
            hint="Load it into the model class the adapters were trained on (the one PEFT wrapped)",
        ) from None


def _base_names(ckpt: Checkpoint, tasks: list[str]) -> str:
    found = sorted({str((ckpt.tasks[t].get("adapter_config") or {}).get("base_model_name_or_path")) for t in tasks})
    return ", ".join(found[:3])


def _placement(weight: torch.Tensor, device: str | torch.device | None, path: str) -> torch.device:
    """The device of a layer's Share tensors: the layer's own, or the requested one if it is the same."""
    if device is None:
        return weight.device
    wanted = torch.device(device)
    same = wanted.type == weight.device.type and (wanted.index is None or wanted.index == weight.device.index)
    if not same:
        raise DeviceMismatchError(
            f"device={str(wanted)!r} was asked for, but {path} of the model is on {weight.device}",
            hint=f"Move the model first (base_model.to({str(wanted)!r})), or leave device unset",
        )
    return weight.device


def _read_module(
    ckpt: Checkpoint,
    module: str,
    present: list[str],
    ids: dict[str, int],
    count: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None, TaskFactors]:
    """One module's bases (groups side by side) and its tasks' stacked factors."""
    info = ckpt.modules[module]
    n, d = info["out_features"], info["in_features"]
    grouped = "groups" in info
    bases: dict[Any, tuple[torch.Tensor, torch.Tensor, int, int]] = {}  # group -> β, α, offsets in K_B, K_A
    k_B = k_A = 0
    coefs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    privates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in present:
        parts = ckpt.task_tensors(t, module)
        if "coef_B" in parts and parts["coef_B"].shape[1] > 0:
            group = info["tasks"][t].get("group") if grouped else None
            if group not in bases:
                beta, alpha = ckpt.bases(module, t)
                if beta is None or alpha is None:
                    raise CorruptCheckpointError(
                        f"module {module} has coefficients of task {t!r} but no bases",
                        path=ckpt.path,
                        hint="Re-create or re-download the checkpoint",
                    )
                bases[group] = (beta, alpha, k_B, k_A)
                k_B, k_A = k_B + beta.shape[1], k_A + alpha.shape[1]
            coefs[ids[t]] = (group, parts["coef_B"], parts["coef_A"])
        if "private_B" in parts and parts["private_B"].shape[1] > 0:
            privates[ids[t]] = (parts["private_B"], parts["private_A"])

    def new(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    P = max((c[1].shape[1] for c in coefs.values()), default=0)
    coef_A, coef_B = new(len(coefs) + 1, k_A, P), new(len(coefs) + 1, k_B, P)
    coef_slot = torch.zeros(count + 1, dtype=torch.long, device=device)
    spans: dict[int, tuple[int, int, int, int, int, int]] = {}
    for slot, (tid, (group, cB, cA)) in enumerate(sorted(coefs.items()), start=1):
        beta, alpha, b0, a0 = bases[group]
        p = cB.shape[1]
        coef_B[slot, b0 : b0 + beta.shape[1], :p] = cB.to(dtype)
        coef_A[slot, a0 : a0 + alpha.shape[1], :p] = cA.to(dtype)
        coef_slot[tid] = slot
        spans[tid] = (slot, a0, a0 + alpha.shape[1], b0, b0 + beta.shape[1], p)
    Q = max((pB.shape[1] for pB, _ in privates.values()), default=0)
    private_A, private_B = new(len(privates) + 1, Q, d), new(len(privates) + 1, n, Q)
    private_slot = torch.zeros(count + 1, dtype=torch.long, device=device)
    ranks: dict[int, tuple[int, int]] = {}
    for slot, (tid, (pB, pA)) in enumerate(sorted(privates.items()), start=1):
        q = pB.shape[1]
        private_B[slot, :, :q] = pB.to(dtype)
        private_A[slot, :q] = pA.to(dtype)
        private_slot[tid] = slot
        ranks[tid] = (slot, q)
    basis_A = basis_B = None
    if bases:
        ordered = sorted(bases.values(), key=lambda b: b[2])
        basis_B = torch.cat([b[0] for b in ordered], 1).to(device=device, dtype=dtype).contiguous()
        basis_A = torch.cat([b[1] for b in ordered], 1).to(device=device, dtype=dtype).contiguous()
    factors = TaskFactors(coef_A, coef_B, coef_slot, private_A, private_B, private_slot, spans, ranks)
    return basis_A, basis_B, factors


def _read_heads(
    base_model: nn.Module,
    ckpt: Checkpoint,
    names: list[str],
    ids: dict[str, int],
    layers: dict[str, ShareLayer],
    selection: TaskSelection,
    pad_value: float,
) -> dict[str, ShareHead]:
    """Per head module, a copy per task that saved one (its tensors replacing the base module's)."""
    copies: dict[str, dict[int, nn.Module]] = {}
    for t in names:
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in ckpt.heads(t).items():
            rel = _WRAPPER_SEGMENT.sub("", model_path(key))
            path, _, leaf = rel.rpartition(".")
            by_module.setdefault(path, {})[leaf] = value
        for path, tensors in by_module.items():
            if any(path == p or path.startswith(p + ".") or p.startswith(path + ".") for p in layers):
                raise ModelMismatchError(
                    f"task {t!r} saves tensors of {path}, which is also a LoRA target",
                    path=ckpt.path,
                    hint="Use 'share-convert extract' and PEFT for this task",
                )
            base = _target(base_model, path, f"{PEFT_PREFIX}{path}", ckpt) if path else None
            if base is None or not all(isinstance(getattr(base, leaf, None), torch.Tensor) for leaf in tensors):
                raise ModelMismatchError(
                    f"task {t!r} saves head tensors {sorted(tensors)} of {path or 'the model'}, which the model lacks",
                    path=ckpt.path,
                    hint="Load it into the model class the adapter was trained with",
                )
            copies.setdefault(path, {})[ids[t]] = _head_copy(base, tensors)
    return {
        path: ShareHead(base_model.get_submodule(path), path, per_task, selection, pad_value)
        for path, per_task in copies.items()
    }


def _head_copy(base: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``base`` holding ``tensors`` (in the base module's dtype and device; shapes may differ)."""
    module = copy.deepcopy(base)
    for leaf, value in tensors.items():
        old = getattr(module, leaf)
        new = value.to(dtype=old.dtype, device=old.device).clone()
        if isinstance(old, nn.Parameter):
            setattr(module, leaf, nn.Parameter(new, requires_grad=False))
        else:
            module.register_buffer(leaf, new)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    return module.requires_grad_(False)


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
