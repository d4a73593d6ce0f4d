"""Which task a call runs (share_convert.runtime.selection): a nested selection restores the outer one, and each
thread and asyncio task sees only its own, on a small Llama built from a config and synthetic tasks.

Each concurrent test makes every worker select its task before any of them computes (a barrier or
events), so that a selection shared between workers would be overwritten, every time, before use."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from share_convert import ConsolidationConfig, ShareModel
from share_convert.engine import merge
from share_convert.io import open_adapters, write_synthetic_adapters

from .builders.models import llama as tiny_llama

TASKS = ["task-000", "task-001", "task-002"]


def llama():
    """A two-layer Llama (64 wide, vocabulary 100) of the synthetic adapters' shapes."""
    return tiny_llama(vocab=100, intermediate=64, positions=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("selection")
    write_synthetic_adapters(root / "a", count=len(TASKS), layers=2, hidden=64, noise=0.05, seed=4)
    merge(open_adapters([str(root / "a")]), root / "share.safetensors", ConsolidationConfig(k=8, private_rank=2))
    return root / "share.safetensors"


@pytest.fixture
def model(checkpoint: Path) -> ShareModel:
    return ShareModel.from_checkpoint(llama(), checkpoint)


IDS = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(0))
MIXED = [TASKS[0], None, TASKS[2]]


@torch.no_grad()
def logits(model: ShareModel, task=None) -> torch.Tensor:
    """The model's output for ``task`` (None: the base model), computed alone on this thread."""
    return model(input_ids=IDS, task=task).logits


@torch.no_grad()
def base_call(model: ShareModel) -> torch.Tensor:
    """A call that bypasses ``task=``: it runs whatever is selected here."""
    return model.base_model(input_ids=IDS).logits


def test_a_nested_call_restores_the_outer_selection(model: ShareModel) -> None:
    outer, inner = TASKS[0], TASKS[1]
    with model.use(outer):
        before = base_call(model)
        logits(model, inner)  # model(..., task=inner) selects, then gives the selection back
        after = base_call(model)
    assert torch.equal(before, logits(model, outer)) and not torch.equal(before, logits(model))
    assert torch.equal(after, before)
    assert torch.equal(base_call(model), logits(model))  # leaving the block: the base model again


def test_nested_use_blocks_restore_the_outer_selection_including_a_mixed_batch(model: ShareModel) -> None:
    with model.use(MIXED):
        with model.use(TASKS[1]):
            assert torch.equal(base_call(model), logits(model, TASKS[1]))
        assert torch.equal(base_call(model), logits(model, MIXED))
    assert torch.equal(base_call(model), logits(model))


def test_threads_serving_different_tasks_each_get_their_own_outputs(model: ShareModel) -> None:
    """Three threads select a task, a mixed batch and nothing at all; all three have selected before
    any computes, and none leaves before all have computed. A trainable task served by a fourth
    thread checks the training hooks too."""
    trained = model.add_task("new", rank=2)
    with torch.no_grad():
        for m in trained.layers.values():
            m.coef_B.normal_(generator=torch.Generator().manual_seed(1))
    work: list = [TASKS[0], MIXED, "nothing", "new"]
    alone = {repr(w): logits(model, None if w == "nothing" else w) for w in work}
    assert len({tuple(t.flatten().tolist()) for t in alone.values()}) == len(work)  # four distinct answers
    barrier = threading.Barrier(len(work))

    def serve(task) -> torch.Tensor:
        if task == "nothing":  # this thread selects nothing: the base model, whatever the others select
            barrier.wait()
            out = base_call(model)
            barrier.wait()
            return out
        with model.use(task):
            barrier.wait()  # every thread has selected its task
            out = base_call(model)
            barrier.wait()  # every thread has computed
        return out

    with ThreadPoolExecutor(len(work)) as pool:
        outs = list(pool.map(serve, work))
    for w, out in zip(work, outs):
        assert torch.equal(out, alone[repr(w)]), w


def test_asyncio_tasks_each_see_their_own_selection(model: ShareModel) -> None:
    async def serve(task: str, selected: asyncio.Event, other: asyncio.Event) -> torch.Tensor:
        with model.use(task):
            selected.set()
            await other.wait()  # the other task has selected its own by now
            return base_call(model)

    async def both() -> list[torch.Tensor]:
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(serve(TASKS[0], a, b), serve(TASKS[1], b, a))

    first, second = asyncio.run(both())
    assert torch.equal(first, logits(model, TASKS[0]))
    assert torch.equal(second, logits(model, TASKS[1]))


def test_a_backward_pass_on_autograd_threads_sees_the_callers_selection(model: ShareModel) -> None:
    """CUDA backward nodes (and so checkpointed layers' recomputation) run on autograd's device threads,
    which start with an empty context; torch stashes the caller's context in the thread-local state it
    hands them. Emulated here as torch does it (no GPU on the test machine): a fresh thread, with the
    caller's context stashed, computes like the caller."""

    def device_thread(out: list) -> None:
        out.append(base_call(model))  # nothing stashed: the base model
        torch._C._stash_obj_in_tls("context", caller)
        try:
            out.append(base_call(model))
        finally:
            torch._C._remove_obj_from_tls("context")

    with model.use(TASKS[2]):
        caller = contextvars.copy_context()
    out: list = []
    thread = threading.Thread(target=device_thread, args=(out,))
    thread.start()
    thread.join()
    assert torch.equal(out[0], logits(model)) and torch.equal(out[1], logits(model, TASKS[2]))


def test_a_copy_of_the_model_serves_like_it_and_has_its_own_selection(model: ShareModel) -> None:
    twin = copy.deepcopy(model)
    with model.use(TASKS[0]):
        assert torch.equal(base_call(twin), logits(model))  # the original's selection is not the copy's
        assert torch.equal(logits(twin, TASKS[1]), logits(model, TASKS[1]))
