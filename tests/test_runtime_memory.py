"""Serving memory follows the checkpoint: private factors held without padding, quantized ones kept as codes.

One query/value layer pair of a tiny BERT holds three tasks' private factors only (k = 0): ``a`` of
rank 2 in both modules, ``b`` of rank 8 in both, ``c`` of rank 2 in ``value`` only (private rank 0 in
``query``). PEFT serving each adapter is the reference for single-task, mixed and merged calls; the
same checkpoint with int8 / NF4 private rows, served with ``keep_quantized=True``, is compared with
itself served dequantized. A second checkpoint of the same adapters with shared bases (k = 4) and
private rows, every role rewritten as int8 / NF4 codes (and the mixed plan: NF4 bases, int8
coefficients), checks bases and coefficients kept as codes the same way.
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
from .builders.quantized import MIXED, requantize

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
    shared = ConsolidationConfig(k=4, private_rank=2, device="cpu")
    api.merge([f"{t}={out[t]}" for t in RANKS], root / "shared.safetensors", shared)
    for name, spec in {"shared-int8": "int8", "shared-nf4": "nf4", "shared-mixed": MIXED}.items():
        out[name] = requantize(root / "shared.safetensors", root / f"{name}.safetensors", spec)
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
    plain = ShareModel.from_checkpoint(base(), world[precision], keep_quantized=False)
    rows = ["b", None, "a", "c"]
    assert rel(logits(kept, task=rows), logits(plain, task=rows)) < TOLERANCE
    for task in RANKS:
        assert rel(logits(kept, task=task), logits(plain, task=task)) < TOLERANCE


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_kept_quantized_rows_are_held_as_their_codes(world, precision):
    kept = ShareModel.from_checkpoint(base(), world[precision], keep_quantized=True).memory_report()
    plain = ShareModel.from_checkpoint(base(), world[precision], keep_quantized=False).memory_report()
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
    plain = ShareModel.from_checkpoint(base(), world["nf4"], keep_quantized=False).to(torch.float64)
    assert rel(logits(kept, task="b"), logits(plain, task="b")) < 1e-12


def test_a_quantized_task_merged_equals_its_dequantized_merge(world):
    kept = ShareModel.from_checkpoint(base(), world["int8"], keep_quantized=True)
    plain = ShareModel.from_checkpoint(base(), world["int8"], keep_quantized=False)
    assert rel(logits(kept.merge_and_unload("b")), logits(plain.merge_and_unload("b"))) < TOLERANCE


def test_a_task_loaded_into_a_quantized_model_is_quantized_like_the_others(world):
    model = ShareModel.from_checkpoint(base(), world["int8"], tasks=["b", "c"], keep_quantized=True)
    model.load_task(world["a"], "a")
    model.delete_task("b")
    assert set(model.memory_report().held) == {"int8", "int64"}
    assert rel(logits(model, task="a"), peft_logits(world["a"])) < 0.05  # int8 rows: ~1% error
    c = ShareModel.from_checkpoint(base(), world["int8"], tasks=["c"], keep_quantized=True)
    assert torch.equal(logits(model, task="c"), logits(c, task="c"))


# -- bases and coefficients kept as codes ----------------------------------------------------------------------

SHARED = ["shared-int8", "shared-nf4", "shared-mixed"]


@pytest.mark.parametrize("name", SHARED)
def test_kept_bases_and_coefficients_serve_each_task_as_the_dequantized_checkpoint(world, name):
    kept = ShareModel.from_checkpoint(base(), world[name], keep_quantized=True)
    plain = ShareModel.from_checkpoint(base(), world[name], keep_quantized=False)
    for task in RANKS:
        assert rel(logits(kept, task=task), logits(plain, task=task)) < TOLERANCE, task


@pytest.mark.parametrize("name", SHARED)
def test_kept_bases_and_coefficients_serve_a_mixed_batch_as_the_dequantized_checkpoint(world, name):
    kept = ShareModel.from_checkpoint(base(), world[name], keep_quantized=True)
    plain = ShareModel.from_checkpoint(base(), world[name], keep_quantized=False)
    rows = ["b", None, "a", "c", "b", "a"]
    assert rel(logits(kept, rows=6, task=rows), logits(plain, rows=6, task=rows)) < TOLERANCE


def test_a_task_merged_from_kept_bases_and_coefficients_equals_its_dequantized_merge(world):
    kept = ShareModel.from_checkpoint(base(), world["shared-nf4"], keep_quantized=True)
    plain = ShareModel.from_checkpoint(base(), world["shared-nf4"], keep_quantized=False)
    assert rel(logits(kept.merge_and_unload("b")), logits(plain.merge_and_unload("b"))) < TOLERANCE


def test_every_role_kept_as_codes_holds_what_the_file_stores_and_nothing_dequantized(world):
    kept = ShareModel.from_checkpoint(base(), world["shared-mixed"], keep_quantized=True).memory_report()
    plain = ShareModel.from_checkpoint(base(), world["shared-mixed"], keep_quantized=False).memory_report()
    assert kept.by_role["bases"] == {"nf4": kept.bases} and kept.by_role["coefficients"] == {"int8": kept.coefficients}
    assert kept.by_role["private"] == plain.by_role["private"] == {"float32": plain.private}  # bfloat16 in the file
    assert kept.dequantized_from == {}
    assert kept.held["nf4"] + kept.held["int8"] == sum(plain.dequantized_from.values())


def test_coefficients_kept_as_codes_are_held_without_padding(world):
    """Ranks 2 and 4 in one module: the float stacks pad to 4 (and hold a zero slot), the codes do not."""
    kept = ShareModel.from_checkpoint(base(), world["shared-int8"], keep_quantized=True).memory_report()
    plain = ShareModel.from_checkpoint(base(), world["shared-int8"], keep_quantized=False).memory_report()
    assert kept.coefficient_padding == 0 < plain.coefficient_padding
    with Checkpoint(world["shared-int8"]) as ckpt:  # every task loaded: the file's coefficient codes and scales
        stored = sum(ckpt.stored_size(name)[2] for name in _factor_tensors(ckpt) if "/coefs_" in name)
    assert kept.coefficients == stored


def test_deleting_a_task_with_kept_coefficients_leaves_the_others_as_loaded_without_it(world):
    model = ShareModel.from_checkpoint(base(), world["shared-int8"], keep_quantized=True)
    model.delete_task("a")
    without = ShareModel.from_checkpoint(base(), world["shared-int8"], tasks=["b", "c"], keep_quantized=True)
    assert model.memory_report().coefficients == without.memory_report().coefficients
    rows = ["c", "b", None, "c"]
    assert torch.equal(logits(model, task=rows), logits(without, task=rows))


@pytest.mark.parametrize("name", ["shared-int8", "shared-nf4"])
def test_a_task_loaded_into_kept_codes_reports_the_error_of_what_is_held(world, name):
    """``load_task`` quantizes the new task's rows like the stored ones, and encodes it knowing so: the
    error it reports per module is that of the rows held, against the adapter's ΔW."""
    model = ShareModel.from_checkpoint(base(), world[name], tasks=["b", "c"], keep_quantized=True)
    report = model.load_task(world["a"], "a")
    merged = PeftModel.from_pretrained(base(), str(world["a"])).merge_and_unload()
    for module in report.modules:
        layer = model._layers[module.module]
        delta = merged.get_submodule(module.module).weight.double() - layer.base_layer.weight.double()
        held = layer.delta_weight(model.tasks.index("a"))
        assert rel(held, delta) == pytest.approx(module.error, rel=1e-3, abs=1e-6), module


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
