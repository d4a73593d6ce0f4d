"""Which task each row of a running call uses: the runtime's task selection, per thread and async task.

A :class:`~share_convert.runtime.model.ShareModel` does not pass the selected tasks through the base
model's layers (it cannot: the layers are called by the base model's own code). They are held in a
:class:`contextvars.ContextVar` that every injected module reads, so that:

- a nested selection (``model(x, task="b")`` inside ``with model.use("a"):``) restores the outer
  one when it ends, instead of leaving the base model selected;
- each thread and each asyncio task sees only the selection it made: two threads serving different
  tasks with one model never run each other's task (a new thread starts with nothing selected: the
  base model);
- the recomputation of checkpointed layers during ``backward()`` sees the selection of the code that
  called ``backward()``, also where autograd runs it on its own device threads (CUDA): torch stashes
  the caller's context for them, and :attr:`TaskSelection.current` reads it there.

Which task is merged into the weights is model-wide (the weights are shared), held beside it.
:class:`LoadedTasks` turns what a call names (``task=``: a name, None, or one per row) into task ids.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import BatchMismatchError, InvalidOptionError, UnknownTaskError

#: The task id of the base model (no task) in a selection. Negative: as an index into a layer's slot
#: map it picks the last entry, which is the base model's (always slot 0, no tensors).
BASE = -1
#: ``task=`` left out: the merged task when one is merged, an error otherwise.
UNSET: Any = object()


class Selection:
    """The tasks of one call, fixed once made.

    ``single`` is set when every row uses one task (possibly :data:`BASE`); otherwise ``ids`` lists one
    task id per row. ``distinct`` holds the ids that occur. Index tensors are built once per device
    and reused by every layer of the call.
    """

    __slots__ = ("single", "ids", "distinct", "_cache", "_doubled")

    def __init__(self, ids: int | Sequence[int]):
        self.ids: tuple[int, ...] | None = None
        self._cache: dict[Any, torch.Tensor] = {}
        self._doubled: Selection | None = None
        if isinstance(ids, int):
            self.single: int | None = ids
            self.distinct: tuple[int, ...] = (ids,)
            return
        self.distinct = tuple(sorted(set(ids)))
        if len(self.distinct) == 1:
            self.single = self.distinct[0]
        else:
            self.single, self.ids = None, tuple(ids)

    @property
    def batch(self) -> int:
        """The number of rows of a mixed batch (0 when every row uses one task)."""
        return len(self.ids) if self.ids is not None else 0

    def for_rows(self, rows: int) -> Selection | None:
        """This mixed selection as it applies to a tensor of ``rows`` rows, or None when it cannot.

        ``rows`` equal to the batch: itself. Twice the batch: classifier-free guidance, which runs
        the unconditional and the conditional halves in one batch ([uncond, cond], diffusers'
        order): every row's task applies to its row in both halves.
        """
        if rows == self.batch:
            return self
        if rows != 2 * self.batch or self.ids is None:
            return None
        if self._doubled is None:
            self._doubled = Selection(self.ids + self.ids)
        return self._doubled

    def index(self, device: torch.device) -> torch.Tensor:
        """The task id of every row (:data:`BASE` for the base model's), as a long tensor on ``device``."""
        key = ("index", device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.ids, dtype=torch.long, device=device)
        return self._cache[key]

    def rows(self, ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The rows whose task is one of ``ids``."""
        key = ("rows", ids, device)
        if key not in self._cache:
            wanted = set(ids)
            rows = [i for i, t in enumerate(self.ids or ()) if t in wanted]
            self._cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._cache[key]


#: What a thread or task that selected nothing runs: the base model.
NOTHING = Selection(BASE)


class TaskSelection:
    """The selection shared by every injected module of one ShareModel.

    :attr:`current` is the running call's :class:`Selection`, held in a context variable of this
    object (one per model); :attr:`merged` is the task merged into the weights, model-wide.
    """

    def __init__(self) -> None:
        self.merged: int | None = None
        self._var: contextvars.ContextVar[Selection] = contextvars.ContextVar("share_convert_task_selection")

    @property
    def current(self) -> Selection:
        """The selection of this thread or async task (or of the code running the current backward pass)."""
        selected = self._var.get(None)
        if selected is None:
            selected = _in_backward_caller(self._var)
        return NOTHING if selected is None else selected

    def select(self, ids: int | Sequence[int]) -> contextvars.Token[Selection]:
        """Select ``ids`` (one task id, or one per row) here; :meth:`restore` with the token undoes it."""
        return self._var.set(Selection(ids))

    def selected_here(self) -> bool:
        """Whether this thread or async task selected tasks (a ``use`` block or a call is running here)."""
        return self._var.get(None) is not None

    def restore(self, token: contextvars.Token[Selection]) -> None:
        """Give back the selection that :meth:`select` replaced (the outer one, or nothing)."""
        self._var.reset(token)

    # a context variable cannot be copied or pickled: a copy of the model gets its own, empty one
    def __getstate__(self) -> dict[str, Any]:
        return {"merged": self.merged}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.merged = state["merged"]


#: torch's thread-local objects (absent from older torch versions: then only the caller's thread sees it)
_IS_KEY_IN_TLS = getattr(torch._C, "_is_key_in_tls", None)
_GET_OBJ_IN_TLS = getattr(torch._C, "_get_obj_in_tls", None)


class LoadedTasks:
    """The tasks a model serves, by id (the base model is :data:`BASE`), and what a call's ``task=``
    names in ids.

    A task's id is its position in the layers' slot maps, fixed while it is loaded. A deleted task's
    id is free (``names[id]`` is None) and the next task loaded takes it, so that loading and deleting
    tasks in a long-running process does not grow the slot maps. :attr:`ids` lists the loaded tasks
    in load order.
    """

    def __init__(self, names: Sequence[str]):
        self.names: list[str | None] = list(names)
        self.ids = {t: i for i, t in enumerate(names)}

    def append(self, name: str) -> int:
        """Add ``name`` as the last loaded task, under the lowest free id or a new last one; returns its id."""
        tid = next((i for i, t in enumerate(self.names) if t is None), len(self.names))
        if tid == len(self.names):
            self.names.append(name)
        else:
            self.names[tid] = name
        self.ids[name] = tid
        return tid

    def remove(self, name: str) -> int:
        """Forget task ``name`` (its id becomes free); returns the id it had."""
        tid = self.id_of(name)
        del self.ids[name]
        self.names[tid] = None
        return tid

    def name_of(self, tid: int) -> str:
        """The name of the loaded task with id ``tid``."""
        name = self.names[tid]
        assert name is not None, f"task id {tid} is free"
        return name

    def id_of(self, task: str | None) -> int:
        """The id of task ``task`` (None: the base model); an error naming the loaded tasks otherwise."""
        if task is None:
            return BASE
        tid = self.ids.get(task) if isinstance(task, str) else None
        if tid is None:
            shown = task if isinstance(task, str) else repr(task)
            loaded = list(self.ids)
            names = ", ".join(loaded[:20]) + (", …" if len(loaded) > 20 else "")
            raise UnknownTaskError(
                f"no task named {shown!r} is loaded", hint=f"Use one of: {names} (or None for the base model)"
            )
        return tid

    def resolve(self, task: Any, batch: int | None, merged: int | None) -> int | list[int]:
        """The ids a call with ``task=`` runs (one, or one per row of a batch of ``batch`` rows); while task
        ``merged`` is merged into the weights only it can run, and it is the default."""
        if task is UNSET:
            if merged is None:
                raise InvalidOptionError(
                    "no task given",
                    hint="Pass task='name' (one task) or task=[...] (one per row), or call set_task('name') once",
                )
            return merged
        if isinstance(task, (list, tuple)):
            if batch is not None and len(task) != batch:
                raise BatchMismatchError(
                    f"{len(task)} tasks given for a batch of {batch} rows",
                    hint="Give one task per row, or one task name for the whole batch",
                )
            ids: int | list[int] = [self.id_of(t) for t in task]
        else:
            ids = self.id_of(task)
        if merged is not None and set([ids] if isinstance(ids, int) else ids) != {merged}:
            raise InvalidOptionError(
                f"task {self.name_of(merged)!r} is merged into the base weights: only it can run",
                hint="Call unmerge() to serve other tasks",
            )
        return ids


def _in_backward_caller(var: contextvars.ContextVar[Selection]) -> Selection | None:
    """``var`` in the context that started the running backward pass, if one is running here.

    Autograd runs CUDA nodes on its own device threads, whose context is empty; the recomputation
    of checkpointed layers runs there. torch stashes the caller's context in the thread-local state
    it carries to those threads (``torch.autograd.graph._engine_run_backward``).
    """
    if _IS_KEY_IN_TLS is None or _GET_OBJ_IN_TLS is None or not _IS_KEY_IN_TLS("context"):
        return None
    caller = _GET_OBJ_IN_TLS("context")
    return caller.get(var) if isinstance(caller, contextvars.Context) else None


__all__ = ["BASE", "NOTHING", "UNSET", "LoadedTasks", "Selection", "TaskSelection"]
