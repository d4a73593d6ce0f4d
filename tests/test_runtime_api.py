"""The runtime's PEFT-style API (ShareModel.set_task, load_task, delete_task, merge_and_unload, merging a
trained task), proven by PEFT on a one-layer BERT built from a config and small synthetic adapters.

Two adapters ``a`` (with a classifier head) and ``b`` of rank 2 on ``query`` and ``value`` are merged
with k = 4, so the bases span both exactly. Adapters loaded later either lie in those bases, lie
partly outside them, or lie entirely outside; PEFT serving the same adapter file is the reference.
"""

from __future__ import annotations

import copy
import inspect
import typing
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from share_convert import ConsolidationConfig, ShareModel, api
from share_convert.errors import (
    DuplicateTaskError,
    InvalidOptionError,
    ModelMismatchError,
    ShareError,
    UnknownTaskError,
)
from share_convert.io import write_synthetic_adapters
from share_convert.report.summary import Report
from share_convert.runtime import LoadReport, TrainableTask

from .builders.adapters import random_factors, write_adapter
from .builders.models import bert_classifier, gpt2_classifier, llama, tokens
from .hub_servers import Olah, hub_env, hub_settings, make_repo

VOCAB, HIDDEN, RANK, ALPHA = 100, 32, 2, 4
QUERY = "bert.encoder.layer.0.attention.self.query"
VALUE = "bert.encoder.layer.0.attention.self.value"
KEY = "bert.encoder.layer.0.attention.self.key"  # not in the checkpoint
TARGET_ERROR = 1e-5  # the checkpoint's error target: what load_task holds new tasks within
TOLERANCE = 1e-5


def base() -> nn.Module:
    return bert_classifier(layers=1, hidden=HIDDEN, heads=2, intermediate=64, vocab=VOCAB)


def inputs() -> dict[str, torch.Tensor]:
    return tokens(rows=4, vocab=VOCAB)


def adapter(folder: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, head: int | None = None, **config):
    """A PEFT adapter of the tiny BERT (r = A's rows, lora_alpha = ALPHA); ``head`` seeds a classifier copy."""
    heads = None
    if head is not None:
        g = torch.Generator().manual_seed(head)
        heads = {
            "base_model.model.classifier.weight": torch.randn(2, HIDDEN, generator=g) * 0.1,
            "base_model.model.classifier.bias": torch.randn(2, generator=g) * 0.1,
        }
        config.setdefault("modules_to_save", ["classifier"])
    r = next(iter(modules.values()))[0].shape[0]
    config = {"task_type": None, "base_model_name_or_path": "test/base", **config}
    return write_adapter(folder, modules, r=r, alpha=ALPHA, config=config, heads=heads)


def scaled(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with PEFT's scale lora_alpha / r folded into B, for a rank-r adapter written with ALPHA."""
    return A, B * (ALPHA / A.shape[0])


FACTORS = {
    "a": {m: random_factors(HIDDEN, HIDDEN, RANK, seed) for m, seed in ((QUERY, 1), (VALUE, 2))},
    "b": {m: random_factors(HIDDEN, HIDDEN, RANK, seed) for m, seed in ((QUERY, 3), (VALUE, 4))},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The adapters ``a`` and ``b``, their checkpoint (k = 4: every module shared, errors ~0) and a second
    checkpoint of the same adapters under other names (the same bases)."""
    root = tmp_path_factory.mktemp("runtime-api")
    a = adapter(root / "a", FACTORS["a"], head=7)
    b = adapter(root / "b", FACTORS["b"])
    config = ConsolidationConfig(k=4, target_error=TARGET_ERROR, device="cpu")
    api.merge([f"a={a}", f"b={b}"], root / "share.safetensors", config)
    api.merge([f"c={a}", f"d={b}"], root / "other.safetensors", config)
    return {"a": a, "b": b, "checkpoint": root / "share.safetensors", "other": root / "other.safetensors", "root": root}


def share(world: dict[str, Path]) -> ShareModel:
    return ShareModel.from_checkpoint(base(), world["checkpoint"])


@torch.no_grad()
def logits(model: nn.Module, **kwargs) -> torch.Tensor:
    return model(**inputs(), **kwargs).logits


@torch.no_grad()
def peft_logits(folder: Path) -> torch.Tensor:
    return PeftModel.from_pretrained(base(), str(folder)).eval()(**inputs()).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def in_bases(a: float, b: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors of a · ΔW_a + b · ΔW_b per module (rank 4, written with the same ALPHA): it lies in the bases."""
    out = {}
    for m in (QUERY, VALUE):
        (Aa, Ba), (Ab, Bb) = scaled(*FACTORS["a"][m]), scaled(*FACTORS["b"][m])
        A = torch.cat([Aa, Ab])
        out[m] = (A, torch.cat([a * Ba, b * Bb], 1) / (ALPHA / A.shape[0]))
    return out


# -- set_task and active_task ---------------------------------------------------------------------------------


def test_after_set_task_calls_without_task_run_that_task(world):
    model = share(world)
    expected = logits(model, task="a")
    model.set_task("a")
    assert model.active_task == "a"
    assert torch.equal(logits(model), expected)


def test_an_explicit_task_and_a_use_block_win_over_the_active_task(world):
    model = share(world)
    expected = logits(model, task="b")
    model.set_task("a")
    assert torch.equal(logits(model, task="b"), expected)
    with model.use("b"):
        assert torch.equal(logits(model), expected)


def test_set_task_none_makes_the_base_model_the_default(world):
    model = share(world)
    model.set_task(None)
    assert torch.equal(logits(model), logits(base()))


def test_the_active_task_belongs_to_its_model(world):
    one, other = share(world), share(world)
    one.set_task("a")
    assert other.active_task is None
    with pytest.raises(InvalidOptionError, match="no task given"):
        logits(other)


def test_a_copy_of_the_model_keeps_its_active_task(world):
    model = share(world)
    model.set_task("b")
    assert torch.equal(logits(copy.deepcopy(model)), logits(model))


def test_set_task_of_an_unknown_task_names_the_loaded_ones(world):
    with pytest.raises(UnknownTaskError, match="a, b"):
        share(world).set_task("nope")


# -- load_task ------------------------------------------------------------------------------------------------


def test_a_task_in_the_bases_is_held_as_coefficients_and_equals_peft(world):
    folder = adapter(world["root"] / "mix", in_bases(0.5, -1.0))
    model = share(world)
    report = model.load_task(folder, "mix")
    assert isinstance(report, LoadReport)
    assert [m.placement for m in report.modules] == ["shared", "shared"]
    assert all(m.private_rank == 0 and m.error <= TARGET_ERROR for m in report.modules)
    assert rel(logits(model, task="mix"), peft_logits(folder)) < TOLERANCE


def test_a_task_outside_the_bases_is_held_privately_and_equals_peft(world):
    folder = adapter(world["root"] / "out", {QUERY: random_factors(HIDDEN, HIDDEN, 3, 20)})
    model = share(world)
    report = model.load_task(folder)
    assert report.task == "out"
    (module,) = report.modules
    assert (module.placement, module.rank, module.private_rank) == ("private", 0, 3)
    assert rel(logits(model, task="out"), peft_logits(folder)) < TOLERANCE


def test_a_task_partly_in_the_bases_gets_a_private_correction_of_what_they_miss(world):
    A_in, B_in = in_bases(1.0, 0.5)[QUERY]
    A_out, B_out = random_factors(HIDDEN, HIDDEN, 1, 30)
    folder = adapter(world["root"] / "part", {QUERY: (torch.cat([A_in, A_out]), torch.cat([B_in, B_out], 1))})
    model = share(world)
    (module,) = model.load_task(folder).modules
    # the part outside: rank 1 on each side of the bases, so a correction of rank 2 < 5 holds it
    assert (module.placement, module.private_rank) == ("mixed", 2)
    assert module.error <= TARGET_ERROR
    assert rel(logits(model, task="part"), peft_logits(folder)) < TOLERANCE


def test_a_module_the_checkpoint_lacks_gets_a_layer_of_its_own_and_equals_peft(world, tmp_path):
    folder = adapter(tmp_path / "key", {KEY: random_factors(HIDDEN, HIDDEN, 2, 50), QUERY: FACTORS["a"][QUERY]})
    model = share(world)
    report = model.load_task(folder)
    assert [(m.module, m.placement, m.new_layer) for m in report.modules] == [
        (KEY, "private", True),
        (QUERY, "shared", False),
    ]
    assert rel(logits(model, task="key"), peft_logits(folder)) < TOLERANCE


def test_deleting_the_last_task_of_an_added_layer_puts_the_models_layer_back(world, tmp_path):
    model = share(world)
    original = model.base_model.get_submodule(KEY)
    model.load_task(adapter(tmp_path / "key", {KEY: random_factors(HIDDEN, HIDDEN, 2, 50)}))
    model.delete_task("key")
    assert model.base_model.get_submodule(KEY) is original and KEY not in model._layers


def test_the_reported_error_is_the_error_of_what_is_held(world, tmp_path):
    A, B = random_factors(HIDDEN, HIDDEN, 4, 40)
    folder = adapter(tmp_path / "t", {QUERY: (A, B)})
    model = share(world)
    (module,) = model.load_task(folder).modules
    true = (B @ A).double() * (ALPHA / 4)
    held = model._layers[QUERY].delta_weight(model._tasks.id_of("t"))
    assert rel(held, true) == pytest.approx(module.error, abs=1e-7)


def test_a_task_of_another_checkpoint_with_the_same_bases_is_held_as_coefficients(world):
    model = share(world)
    report = model.load_task(f"{world['other']}::c", "c")
    assert {m.placement for m in report.modules} == {"shared"}
    assert report.heads == ("classifier",)
    assert rel(logits(model, task="c"), logits(model, task="a")) < TOLERANCE


def test_a_task_on_the_hub_is_loaded_by_its_address(world, tmp_path):
    folder = adapter(tmp_path / "mix", in_bases(1.0, 1.0))
    server = Olah(tmp_path / "olah")
    try:
        make_repo(server.mirrors, "alice/mix", {f.name: f for f in folder.iterdir()})
        with hub_settings(hub_env(server.url, tmp_path / "home")):
            report = share(world).load_task("hf://alice/mix")
    finally:
        server.stop()
    assert (report.task, report.source) == ("mix", "hf://alice/mix")
    assert {m.placement for m in report.modules} == {"shared"}


def test_a_checkpoint_of_several_tasks_must_name_one(world):
    with pytest.raises(InvalidOptionError, match="holds 2 tasks") as e:
        share(world).load_task(world["other"])
    assert "::c" in str(e.value)


def test_in_a_module_with_groups_a_task_is_held_in_the_group_that_holds_it(tmp_path):
    families = {
        f: write_synthetic_adapters(tmp_path / f, count=3, layers=1, shared_rank=6, noise=0.0, seed=seed, prefix=f)
        for f, seed in (("a", 1), ("b", 2))
    }
    checkpoint = tmp_path / "share.safetensors"
    api.merge([str(p) for paths in families.values() for p in paths], checkpoint, ConsolidationConfig(groups="2"))
    model = ShareModel.from_checkpoint(llama(layers=1), checkpoint)
    report = model.load_task(families["b"][0], "again")
    layer = model._layers["model.layers.0.self_attn.q_proj"]
    assert len(model._groups[layer.name]) == 2
    assert {m.placement for m in report.modules} == {"shared"}
    spans = layer.factors.spans
    assert spans[model._tasks.id_of("again")][1:5] == spans[model._tasks.id_of(families["b"][0].name)][1:5]


def test_a_loaded_task_runs_in_a_mixed_batch_with_the_stored_ones(world):
    model = share(world)
    model.load_task(world["a"], "again")
    mixed = logits(model, task=["a", "again", "b", None])
    single = {t: logits(model, task=t) for t in ("a", "again", "b", None)}
    for row, t in enumerate(["a", "again", "b", None]):
        assert rel(mixed[row], single[t][row]) < TOLERANCE


def test_an_adapter_of_other_shapes_is_refused_in_one_line_and_changes_nothing(world, tmp_path):
    folder = adapter(tmp_path / "wide", {QUERY: random_factors(HIDDEN, 16, 2, 5)})
    model = share(world)
    with pytest.raises(ModelMismatchError) as e:
        model.load_task(folder)
    assert "\n" not in str(e.value)
    assert model.tasks == ["a", "b"]


def test_an_adapter_of_another_base_model_is_refused(world, tmp_path):
    folder = adapter(
        tmp_path / "other", {QUERY: random_factors(HIDDEN, HIDDEN, 2, 5)}, base_model_name_or_path="x/gpt2"
    )
    with pytest.raises(ModelMismatchError, match="trained on x/gpt2"):
        share(world).load_task(folder)


def test_the_base_model_check_can_be_turned_off(world, tmp_path):
    folder = adapter(
        tmp_path / "other", {QUERY: random_factors(HIDDEN, HIDDEN, 2, 5)}, base_model_name_or_path="x/gpt2"
    )
    model = share(world)
    model.load_task(folder, check_base_model=False)
    assert model.tasks == ["a", "b", "other"]


def test_a_name_already_loaded_is_refused(world):
    with pytest.raises(DuplicateTaskError):
        share(world).load_task(world["b"], "a")


# -- delete_task ----------------------------------------------------------------------------------------------


def test_delete_task_frees_its_rows_and_heads(world):
    model = share(world)
    model.delete_task("a")
    alone = ShareModel.from_checkpoint(base(), world["checkpoint"], tasks=["b"]).memory_report()
    freed = model.memory_report()
    assert (freed.coefficients, freed.private, freed.heads) == (alone.coefficients, alone.private, alone.heads)
    assert model.tasks == ["b"]


def test_the_remaining_tasks_run_as_before_a_deletion(world):
    model = share(world)
    before = logits(model, task="b")
    model.delete_task("a")
    assert torch.equal(logits(model, task="b"), before)


def test_a_deleted_tasks_id_is_reused_and_the_slot_maps_do_not_grow(world):
    model = share(world)
    slots = model._layers[QUERY].factors.coef_slot.numel()
    for _ in range(3):
        model.load_task(world["a"], "again")
        model.delete_task("again")
    assert model._layers[QUERY].factors.coef_slot.numel() == slots + 1


def test_deleting_an_unknown_task_is_refused(world):
    with pytest.raises(UnknownTaskError):
        share(world).delete_task("nope")


def test_deleting_the_active_task_leaves_no_default(world):
    model = share(world)
    model.set_task("a")
    model.delete_task("a")
    assert model.active_task is None
    with pytest.raises(InvalidOptionError, match="no task given"):
        logits(model)


def test_deleting_the_merged_task_restores_the_base_weights_first(world):
    model = share(world)
    model.merge("a")
    model.delete_task("a")
    assert model.merged is None
    original = base().state_dict()
    assert all(torch.equal(v, original[k]) for k, v in model.unload().state_dict().items())


# -- merge_and_unload -----------------------------------------------------------------------------------------


def test_merge_and_unload_equals_peft_merge_and_unload_of_the_extracted_adapter(world, tmp_path):
    api.extract(world["checkpoint"], tmp_path / "a", task="a")
    expected = PeftModel.from_pretrained(base(), str(tmp_path / "a")).merge_and_unload().state_dict()
    merged = share(world).merge_and_unload("a")
    got = merged.state_dict()
    assert type(merged) is type(base()) and got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-6, atol=1e-6), key


def gpt2() -> nn.Module:
    """A one-layer GPT-2 classifier (hidden 32): transformers' Conv1D layers, weights stored in × out."""
    return gpt2_classifier(layers=1, hidden=HIDDEN, heads=2, vocab=VOCAB, positions=16)


def test_on_conv1d_layers_load_task_and_merge_and_unload_equal_peft(tmp_path):
    attn = "transformer.h.0.attn.c_attn"  # ΔW is 96 × 32
    write = {"fan_in_fan_out": True, "modules_to_save": None}
    stored = adapter(tmp_path / "s", {attn: random_factors(3 * HIDDEN, HIDDEN, 2, 60)}, **write)
    new = adapter(tmp_path / "n", {attn: random_factors(3 * HIDDEN, HIDDEN, 2, 61)}, **write)
    api.merge([str(stored)], tmp_path / "share.safetensors", ConsolidationConfig(target_error=TARGET_ERROR))
    model = ShareModel.from_checkpoint(gpt2(), tmp_path / "share.safetensors")
    model.load_task(new)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(gpt2(), str(new)).eval()(**inputs()).logits
        assert rel(model(**inputs(), task="n").logits, expected) < TOLERANCE
    merged = model.merge_and_unload("n").state_dict()
    reference = PeftModel.from_pretrained(gpt2(), str(new)).merge_and_unload().state_dict()
    assert all(torch.allclose(merged[k], v, rtol=1e-6, atol=1e-6) for k, v in reference.items())


# -- a trained task: merge, unmerge, merge_and_unload ---------------------------------------------------------


def trained(world) -> ShareModel:
    """A model with task ``t`` added and its coefficients set as training would (ΔW ≠ 0)."""
    model = share(world)
    task = model.add_task("t", rank=2)
    with torch.no_grad():
        for module in task.layers.values():
            module.coef_B.copy_(torch.randn(module.coef_B.shape, generator=torch.Generator().manual_seed(1)))
    return model


def test_merging_a_trained_task_gives_its_outputs_and_unmerge_restores_every_weight(world):
    model = trained(world)
    expected = logits(model, task="t")
    weights = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    model.merge("t")
    assert rel(logits(model), expected) < TOLERANCE
    assert not torch.equal(model._layers[QUERY].base_layer.weight, weights[f"{QUERY}.base_layer.weight"])
    model.unmerge()
    assert all(torch.equal(v, weights[k]) for k, v in model.base_model.state_dict().items())
    assert model.trainable_parameters()  # trainable again


def test_a_merged_trained_task_is_frozen(world):
    model = trained(world)
    model.merge("t")
    assert model.trainable_parameters() == []
    with pytest.raises(InvalidOptionError, match="unmerge"):
        model.train_task("t")


def test_a_deleted_trained_task_leaves_nothing_behind_and_its_name_can_be_added_again(world):
    model = trained(world)
    model.delete_task("t")
    assert model.tasks == ["a", "b"] and model.trainable_parameters() == []
    assert not any(".trainable_task" in name for name, _ in model.base_model.named_modules())
    task = model.add_task("t", rank=2)
    assert task.task_id == 2 and model.tasks == ["a", "b", "t"]


def test_an_inexact_merge_of_a_trained_task_is_refused_in_one_line(world):
    with pytest.raises(InvalidOptionError, match="exact=True") as e:
        trained(world).merge("t", exact=False)
    assert "\n" not in str(e.value)


def test_merge_and_unload_of_a_trained_task_equals_peft_of_its_saved_adapter(world, tmp_path):
    model = trained(world)
    model.save_task("t", tmp_path / "t")
    expected = PeftModel.from_pretrained(base(), str(tmp_path / "t")).merge_and_unload().state_dict()
    got = model.merge_and_unload("t").state_dict()
    for key, value in expected.items():
        assert torch.allclose(got[key], value, rtol=1e-6, atol=1e-6), key


# -- typed signatures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "result"),
    [("add_task", TrainableTask), ("fold_into", Report), ("load_task", LoadReport), ("merge_and_unload", nn.Module)],
)
def test_the_api_names_its_options_and_types_its_result(method, result):
    function = getattr(ShareModel, method)
    kinds = {p.kind for p in inspect.signature(function).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    names = {"ConsolidationConfig": ConsolidationConfig, "Report": Report, "TrainableTask": TrainableTask}
    assert typing.get_type_hints(function, localns=names)["return"] is result


def test_every_error_of_the_api_is_a_share_error(world):
    model = share(world)
    for call in (lambda: model.set_task(3), lambda: model.delete_task(None), lambda: model.merge_and_unload("x")):
        with pytest.raises(ShareError):
            call()
