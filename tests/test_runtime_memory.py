"""Serving memory follows the checkpoint: private factors held without padding, quantized ones kept as codes.

One query/value layer pair of a tiny BERT holds three tasks' private factors only (k = 0): ``a`` of
rank 2 in both modules, ``b`` of rank 8 in both, ``c`` of rank 2 in ``value`` only (private rank 0 in
``query``). PEFT serving each adapter is the reference for single-task, mixed and merged calls; the
same checkpoint with int8 / NF4 private rows, served with ``keep_quantized=True``, is compared with
itself served dequantized.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from share_convert import ConsolidationConfig, ShareModel, api
from share_convert.checkpoint.reader import Checkpoint
from share_convert.math.quantize import dequantize, quantize
from share_convert.runtime.factors import RowStore

from .builders.adapters import random_factors, write_adapter
from .builders.models import bert_classifier, gpt2_classifier, tokens
from .builders.quantized import requantize

VOCAB, HIDDEN, ALPHA = 100, 32, 4
QUERY = "bert.encoder.layer.0.attention.self.query"
VALUE = "bert.encoder.layer.0.attention.self.value"
RANKS = {"a": 2, "b": 8, "c": 2}
MODULES = {"a": (QUERY, VALUE), "b": (QUERY, VALUE), "c": (VALUE,)}
TOLERANCE = 1e-5


def base() -> nn.Module:
    return bert_classifier(layers=1, hidden=HIDDEN, heads=2, intermediate=64, vocab=VOCAB)


def inputs(rows: int = 4) -> dict[str, torch.Tensor]:
    return tokens(rows=rows, vocab=VOCAB)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The three adapters, their private-only checkpoint and its int8 and NF4 rewrites."""
    root = tmp_path_factory.mktemp("runtime-memory")
    out: dict[str, Path] = {}
    for seed, (task, rank) in enumerate(RANKS.items()):
        factors = {m: random_factors(HIDDEN, HIDDEN, rank, 10 * seed + i) for i, m in enumerate(MODULES[task])}
        config = {"task_type": None, "base_model_name_or_path": "test/base"}
        out[task] = write_adapter(root / task, factors, r=rank, alpha=ALPHA, config=config)
    config = ConsolidationConfig(k=0, private_rank=8, device="cpu")
    api.merge([f"{t}={out[t]}" for t in RANKS], root / "share.safetensors", config)
    out["checkpoint"] = root / "share.safetensors"
    for precision in ("int8", "nf4"):
        spec = {"private_B": precision, "private_A": precision}
        out[precision] = requantize(out["checkpoint"], root / f"{precision}.safetensors", spec)
    return out


@torch.no_grad()
def logits(model: nn.Module, rows: int = 4, **kwargs) -> torch.Tensor:
    return model(**inputs(rows), **kwargs).logits


@torch.no_grad()
def peft_logits(folder: Path, rows: int = 4) -> torch.Tensor:
    return PeftModel.from_pretrained(base(), str(folder)).eval()(**inputs(rows)).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def private_bytes(ranks: dict[str, int], modules: dict[str, tuple[str, ...]]) -> int:
    """Bytes of the tasks' private factors, unpadded, in float32: q (n + d) per task and module."""
    return sum(ranks[t] * 2 * HIDDEN * 4 * len(modules[t]) for t in ranks)


# -- no padding ------------------------------------------------------------------------------------------------


def test_private_factors_of_ranks_0_2_and_8_are_held_without_padding(world):
    model = ShareModel.from_checkpoint(base(), world["checkpoint"])
    assert model._layers[QUERY].factors.private_ranks.keys() == {0, 1}  # c has rank 0 here
    report = model.memory_report()
    assert report.private == private_bytes(RANKS, MODULES) == report.lora_equivalent


@pytest.mark.parametrize("task", list(RANKS))
def test_each_task_alone_equals_peft(world, task):
    model = ShareModel.from_checkpoint(base(), world["checkpoint"])
    assert rel(logits(model, task=task), peft_logits(world[task])) < TOLERANCE


def test_a_mixed_batch_of_ragged_ranks_equals_peft_row_by_row(world):
    model = ShareModel.from_checkpoint(base(), world["checkpoint"])
    rows = ["b", "a", None, "c", "b", "c"]
    mixed = logits(model, rows=len(rows), task=rows)
    for i, task in enumerate(rows):
        want = logits(base(), rows=len(rows)) if task is None else peft_logits(world[task], rows=len(rows))
        assert rel(mixed[i], want[i]) < TOLERANCE, (i, task)


@pytest.mark.parametrize("task", ["b", "c"])
def test_merge_and_unload_of_a_ragged_task_equals_peft(world, task):
    model = ShareModel.from_checkpoint(base(), world["checkpoint"])
    ours = logits(model.merge_and_unload(task))
    peft = PeftModel.from_pretrained(base(), str(world[task])).merge_and_unload()
    assert rel(ours, logits(peft)) < TOLERANCE


def test_deleting_the_middle_task_moves_the_rows_above_it_down(world):
    model = ShareModel.from_checkpoint(base(), world["checkpoint"])
    model.delete_task("b")
    without = ShareModel.from_checkpoint(base(), world["checkpoint"], tasks=["a", "c"])
    assert model.memory_report().private == without.memory_report().private
    assert model._layers[VALUE].factors.private_ranks == {0: (0, 2), 2: (2, 2)}
    rows = ["c", "a", "c"]
    mixed = logits(model, rows=3, task=rows)
    for i, task in enumerate(rows):
        assert rel(mixed[i], peft_logits(world[task], rows=3)[i]) < TOLERANCE


def test_a_task_loaded_again_after_a_deletion_runs_with_the_others(world):
    model = ShareModel.from_checkpoint(base(), world["checkpoint"])
    model.delete_task("a")
    model.load_task(world["a"], "a")
    rows = ["a", "b", "c", "a"]
    mixed = logits(model, rows=4, task=rows)
    for i, task in enumerate(rows):
        assert rel(mixed[i], peft_logits(world[task])[i]) < TOLERANCE


# -- quantized factors kept as codes ---------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_kept_quantized_outputs_equal_the_dequantized_checkpoints(world, precision):
    kept = ShareModel.from_checkpoint(base(), world[precision], keep_quantized=True)
    plain = ShareModel.from_checkpoint(base(), world[precision])
    rows = ["b", None, "a", "c"]
    assert rel(logits(kept, task=rows), logits(plain, task=rows)) < TOLERANCE
    for task in RANKS:
        assert rel(logits(kept, task=task), logits(plain, task=task)) < TOLERANCE


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_kept_quantized_rows_are_held_as_their_codes(world, precision):
    kept = ShareModel.from_checkpoint(base(), world[precision], keep_quantized=True).memory_report()
    plain = ShareModel.from_checkpoint(base(), world[precision]).memory_report()
    assert set(kept.held) == {precision, "int64"} and set(plain.held) == {"float32", "int64"}
    assert kept.held[precision] == kept.private == plain.dequantized_from[precision]
    assert kept.dequantized_from == {}
    assert kept.private * (8 if precision == "nf4" else 4) > plain.private > kept.private * 2


def test_converting_a_kept_model_leaves_its_codes_and_scales_as_stored(world):
    kept = ShareModel.from_checkpoint(base(), world["nf4"], keep_quantized=True)
    store = kept._layers[VALUE].factors.private_A
    before = (store.codes.clone(), store.scales.clone())
    kept.to(torch.float64)
    assert torch.equal(store.codes, before[0]) and torch.equal(store.scales, before[1])
    plain = ShareModel.from_checkpoint(base(), world["nf4"]).to(torch.float64)
    assert rel(logits(kept, task="b"), logits(plain, task="b")) < 1e-12


def test_a_quantized_task_merged_equals_its_dequantized_merge(world):
    kept = ShareModel.from_checkpoint(base(), world["int8"], keep_quantized=True)
    plain = ShareModel.from_checkpoint(base(), world["int8"])
    assert rel(logits(kept.merge_and_unload("b")), logits(plain.merge_and_unload("b"))) < TOLERANCE


def test_a_task_loaded_into_a_quantized_model_is_quantized_like_the_others(world):
    model = ShareModel.from_checkpoint(base(), world["int8"], tasks=["b", "c"], keep_quantized=True)
    model.load_task(world["a"], "a")
    model.delete_task("b")
    assert set(model.memory_report().held) == {"int8", "int64"}
    assert rel(logits(model, task="a"), peft_logits(world["a"])) < 0.05  # int8 rows: ~1% error
    c = ShareModel.from_checkpoint(base(), world["int8"], tasks=["c"], keep_quantized=True)
    assert torch.equal(logits(model, task="c"), logits(c, task="c"))


# -- real adapters ---------------------------------------------------------------------------------------------


def test_on_real_gpt2_adapters_the_runtime_holds_no_more_than_peft_or_the_checkpoint(merged, real):
    """The five real GPT-2 c_attn adapters, the planner's own plan: adapter memory ≤ PEFT's LoRA
    parameters for the same tasks, and its factors ≤ the checkpoint's factor tensors in float32."""
    path = merged("gpt2-c_attn")
    model = ShareModel.from_checkpoint(gpt2_classifier(), path, dtype=torch.float32)
    report = model.memory_report()
    peft_bytes = 0
    for folder in sorted((real / "gpt2-c_attn").iterdir()):
        peft = PeftModel.from_pretrained(gpt2_classifier(), str(folder))
        peft_bytes += sum(p.numel() * 4 for n, p in peft.named_parameters() if "lora_" in n)
    with Checkpoint(path) as ckpt:
        stored = sum(numbers for _, numbers, _ in map(ckpt.stored_size, _factor_tensors(ckpt)))
    assert report.adapters <= peft_bytes
    assert report.bases + report.coefficients + report.private <= stored * 4  # (heads are stored apart)


def _factor_tensors(ckpt: Checkpoint) -> list[str]:
    from share_convert.checkpoint.quantized import role_of

    return [name for name in ckpt.manifest["tensors"] if role_of(name) is not None]


@pytest.mark.parametrize("precision", ["int8", "nf4"])
@pytest.mark.parametrize("cols", [128, 100])  # whole blocks of 64, and a short last block
def test_rows_kept_as_codes_read_back_as_the_format_dequantizes_them(precision, cols):
    x = torch.randn(10, cols, generator=torch.Generator().manual_seed(cols))
    store, codes = RowStore(cols, torch.float32, precision=precision), quantize(x, precision)
    store.append(codes)
    assert torch.equal(store.take(2, 7, torch.float32), dequantize(codes)[2:7])
    assert torch.equal(store.take_index(torch.tensor([9, 0, 4]), torch.float32), dequantize(codes)[[9, 0, 4]])
