"""The runtime (ShareModel), proven by PEFT: for each architecture, built from a small config, the
runtime's outputs equal PeftModel's outputs with the task extracted from the same checkpoint
(float32, relative 1e-5), one task at a time and in batches that mix tasks row by row."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from share_convert import ConsolidationConfig, ShareModel, api
from share_convert.checkpoint import Checkpoint
from share_convert.engine import add, chain, merge
from share_convert.errors import (
    BatchMismatchError,
    DeviceMismatchError,
    InvalidOptionError,
    ModelMismatchError,
    ShareError,
    UnknownTaskError,
)
from share_convert.io import open_adapters, write_synthetic_adapters
from share_convert.runtime import ShareHead, ShareLayer

from .builders.models import bert_classifier, distilbert, gpt2_classifier, gpt2_lm, llama, pixels, tokens, vit
from .builders.quantized import requantize

TOLERANCE = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- cases: a checkpoint of real adapters, a model class, PEFT's outputs per task ----------------------------------


@dataclass
class Case:
    checkpoint: Path
    tasks: list[str]
    build: Callable[[int], nn.Module]
    labels: dict[str, int]  # head width per task (the model's default where a task has no head)
    inputs: dict[str, torch.Tensor]
    reference: dict[str | None, tuple[torch.Tensor, torch.Tensor]]  # task -> (last hidden state, logits)
    base: nn.Module

    def share_model(self, **kwargs) -> ShareModel:
        return ShareModel.from_checkpoint(copy.deepcopy(self.base), self.checkpoint, tasks=self.tasks, **kwargs)


def run(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, **kwargs)
    return out.hidden_states[-1], out.logits


def derived_adapter(src: Path, out: Path, labels: int | None, seed: int) -> Path:
    """A second task from a real adapter: its factors changed at random, and a head of ``labels`` outputs."""
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    new = {}
    for key, value in tensors.items():
        if "lora_" in key:
            new[key] = value * -0.7 + 0.5 * value.std() * torch.randn(value.shape, generator=g)
        elif labels is not None and key.endswith("classifier.weight"):
            new[key] = torch.randn(labels, value.shape[1], generator=g) * 0.05
        elif labels is not None and key.endswith("classifier.bias"):
            new[key] = torch.randn(labels, generator=g) * 0.05
        else:
            new[key] = value
    out.mkdir(parents=True)
    save_file(new, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return out


def vit_adapter_for_this_transformers(src: Path, out: Path) -> Path:
    """The real ViT adapter, its keys renamed where this transformers version renamed ViT's modules.

    transformers 5 calls ``vit.encoder.layer.N.attention.attention.query`` ``vit.layers.N.attention.q_proj``;
    PEFT targets neither name across versions, so the weights are kept and only the names follow the model.
    """
    if "vit.encoder.layer.0.attention.attention.query" in dict(vit().named_modules()):
        return src
    tensors = load_file(str(src / "adapter_model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
        key = key.replace("vit.encoder.layer.", "vit.layers.").replace(".attention.attention.", ".attention.")
        renamed[key.replace(".query.", ".q_proj.").replace(".value.", ".v_proj.")] = value
    out.mkdir(parents=True)
    save_file(renamed, str(out / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def head_width(ckpt: Checkpoint, task: str, default: int) -> int:
    widths = [v.shape[0] for k, v in ckpt.heads(task).items() if k.endswith(("score.weight", "classifier.weight"))]
    return widths[0] if widths else default


def make_case(root: Path, name: str, real: Path, merged: Callable[..., Path]) -> Case:
    """Merge the case's adapters (or take conftest's shared merge of them), extract every task and
    record PEFT's outputs for it."""
    folder = root / name
    folder.mkdir()
    path = folder / "share.safetensors"
    if name in ("gpt2", "gpt2-lm"):
        # shared bases and private corrections in every module; 9 real adapters, c_proj in 4 of them
        # (one checkpoint, merged once, for both cases: each serves the tasks of its own type)
        path, sources = merged("gpt2-c_attn", "gpt2-c_attn+c_proj", k=16, private_rank=2), None
        build, inputs = gpt2_classifier, tokens()
        wanted = "CAUSAL_LM" if name == "gpt2-lm" else "SEQ_CLS"
        if name == "gpt2-lm":
            build = gpt2_lm
    elif name == "distilbert":  # the planner's own choice (private-only here); different targets and heads
        path, sources = merged("distilbert"), None
        build, inputs, wanted = distilbert, tokens(), None
    elif name == "bert-tiny":  # stored in bfloat16, served on a float32 model
        derived = derived_adapter(real / "bert-tiny/YeshwanthrajG__bert-tiny-checkpoint-7500", folder / "b2", 2, 1)
        sources = open_adapters([str(real / "bert-tiny"), f"bert-derived={derived}"])
        config, build, inputs, wanted = (
            ConsolidationConfig(k=24, private_rank=4, dtype="bfloat16"),
            bert_classifier,
            tokens(),
            None,
        )
    elif name == "vit":  # heads of different widths: 7 labels (real) and 3 (derived)
        adapter = vit_adapter_for_this_transformers(real / "vit-base/sdonatti__vit-skin-cancer", folder / "v1")
        derived = derived_adapter(adapter, folder / "v2", 3, 2)
        sources = open_adapters([f"sdonatti__vit-skin-cancer={adapter}", f"vit-3-labels={derived}"])
        config, build, inputs, wanted = ConsolidationConfig(k=20, private_rank=3), vit, pixels(), None
    elif name == "llama":  # two families of synthetic tasks: modules with two groups of bases
        paths = write_synthetic_adapters(
            folder / "a", count=3, layers=2, hidden=64, shared_rank=6, noise=0.05, seed=1, prefix="a"
        )
        paths += write_synthetic_adapters(
            folder / "b", count=3, layers=2, hidden=64, shared_rank=6, noise=0.05, seed=2, prefix="b"
        )
        sources = open_adapters([str(p) for p in paths])
        # in float: in fewer bits, each group's tasks would keep their own directions (no bases to serve)
        config, build, inputs, wanted = ConsolidationConfig(groups="2", precision="float"), llama, tokens(), None
    elif name == "llama-chain":  # two adds whose old rows stay in earlier bases (a rotation chain, format v3)
        paths = write_synthetic_adapters(folder / "c", count=6, layers=2, hidden=64, noise=0.05, seed=3, prefix="c")
        sources = open_adapters([str(p) for p in paths])
        config, build, inputs, wanted = ConsolidationConfig(k=8), llama, tokens(), None
    else:
        raise AssertionError(name)
    if name == "llama-chain":
        merge(sources[:4], path, config)
        chain_min, chain.CHAIN_MIN_BYTES = chain.CHAIN_MIN_BYTES, 0  # chain these small tensors too
        try:
            for src in sources[4:]:
                add(path, [src], path, config)
        finally:
            chain.CHAIN_MIN_BYTES = chain_min
        assert Checkpoint(path).manifest["format_version"] == 3
    elif sources is not None:  # not one of conftest's shared merges
        merge(sources, path, config)
    ckpt = Checkpoint(path)
    tasks = [t for t in ckpt.tasks if wanted is None or ckpt.tasks[t]["adapter_config"]["task_type"] == wanted]
    built: dict[int, nn.Module] = {}  # one model per head width, built once (a build seeds: copies are equal)

    def fresh(labels: int) -> nn.Module:
        if labels not in built:
            built[labels] = build(labels)
        return copy.deepcopy(built[labels])

    if name in ("llama", "llama-chain", "gpt2-lm"):
        default = 0
    else:
        first = build()
        default = first.config.num_labels
        built[default] = first
    labels = {t: head_width(ckpt, t, default) for t in tasks}
    reference = {None: run(fresh(default), inputs)}
    (folder / "x").mkdir()
    for t in tasks:
        api.extract(path, folder / "x" / t, task=t)
        model = PeftModel.from_pretrained(fresh(labels[t]), str(folder / "x" / t)).eval()
        reference[t] = run(model, inputs)
    ckpt.close()
    return Case(path, tasks, build, labels, inputs, reference, fresh(default))


CASES = ["gpt2", "gpt2-lm", "distilbert", "bert-tiny", "vit", "llama", "llama-chain"]


@pytest.fixture(scope="session")
def case_of(tmp_path_factory, real, merged) -> Callable[[str], Case]:
    root = tmp_path_factory.mktemp("runtime")
    return functools.cache(lambda name: make_case(root, name, real, merged))


# -- equality with PEFT --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_each_task_alone_equals_peft_with_the_extracted_adapter(case_of, name):
    case = case_of(name)
    model = case.share_model()
    for task in case.tasks:
        hidden, logits = run(model, case.inputs, task=task)
        ref_hidden, ref_logits = case.reference[task]
        assert rel(hidden, ref_hidden) <= TOLERANCE, task
        assert rel(logits, ref_logits) <= TOLERANCE, task
        # the adapter's effect is far above the tolerance, so the equality says something
        assert rel(case.reference[None][0], ref_hidden) > 100 * TOLERANCE, task


@pytest.mark.parametrize("name", CASES)
def test_a_mixed_batch_equals_peft_row_by_row(case_of, name):
    case = case_of(name)
    model = case.share_model()
    rows = [case.tasks[i % len(case.tasks)] for i in range(3)] + [None]  # one row on the base model
    batch = {k: torch.cat([v, v[:2]]) for k, v in case.inputs.items()}  # 6 rows: a task repeats
    rows += [case.tasks[-1], case.tasks[0]]
    hidden, logits = run(model, batch, task=rows)
    for i, task in enumerate(rows):
        ref_hidden, ref_logits = case.reference[task]
        j = i % 4
        assert rel(hidden[i], ref_hidden[j]) <= TOLERANCE, (i, task)
        width = case.labels.get(task) or ref_logits.shape[-1]
        assert rel(logits[i, ..., :width], ref_logits[j]) <= TOLERANCE, (i, task)


def test_the_same_task_on_every_row_equals_one_task_for_the_batch(case_of):
    case = case_of("llama")
    model = case.share_model()
    task = case.tasks[1]
    assert torch.equal(run(model, case.inputs, task=[task] * 4)[1], run(model, case.inputs, task=task)[1])


def test_grouped_modules_are_served(case_of):
    case = case_of("llama")
    with Checkpoint(case.checkpoint) as ckpt:
        assert any("groups" in info for info in ckpt.modules.values())
    layer = case.share_model().base_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, ShareLayer)
    # both groups' bases side by side, held once
    assert layer.basis_A.shape[1] == sum(g["k_A"] for g in _module_groups(case, "model.layers.0.self_attn.q_proj"))


def test_grouped_bases_and_coefficients_kept_as_codes_serve_as_dequantized(case_of, tmp_path):
    """Each group's bases and coefficients kept as NF4 codes: a batch mixing both groups' tasks and the
    base model gives the checkpoint's outputs dequantized at load."""
    case = case_of("llama")
    coded = requantize(case.checkpoint, tmp_path / "nf4.safetensors", "nf4")
    kept = ShareModel.from_checkpoint(copy.deepcopy(case.base), coded, keep_quantized=True)
    plain = ShareModel.from_checkpoint(copy.deepcopy(case.base), coded, keep_quantized=False)
    assert len(kept.base_model.model.layers[0].self_attn.q_proj.coded_A.parts) == 2  # one per group
    rows = [case.tasks[0], case.tasks[-1], None, case.tasks[1]]  # one family, the other, none
    torch.testing.assert_close(run(kept, case.inputs, task=rows)[1], run(plain, case.inputs, task=rows)[1])


def test_coefficients_under_a_rotation_chain_are_held_dequantized_beside_kept_bases(tmp_path, monkeypatch):
    """int8 rows written under older bases are read rotated (format version 3's chain), so they are
    held as values; the bases stay codes, and the outputs are the checkpoint's dequantized."""
    paths = write_synthetic_adapters(tmp_path / "c", count=6, layers=1, hidden=64, noise=0.05, seed=3, prefix="c")
    sources, path, config = (
        open_adapters([str(p) for p in paths]),
        tmp_path / "s.safetensors",
        ConsolidationConfig(k=8, precision="int8"),
    )
    merge(sources[:4], path, config)
    monkeypatch.setattr(chain, "CHAIN_MIN_BYTES", 0)  # chain these small tensors too
    add(path, sources[4:], path, config)
    kept = ShareModel.from_checkpoint(llama(), path, keep_quantized=True)
    plain = ShareModel.from_checkpoint(llama(), path, keep_quantized=False)
    held = kept.memory_report().by_role
    assert set(held["bases"]) == {"int8"} and set(held["coefficients"]) == {"float32"}
    rows = [kept.tasks[0], kept.tasks[5], None, kept.tasks[2]]
    torch.testing.assert_close(run(kept, tokens(), task=rows)[1], run(plain, tokens(), task=rows)[1])


def _module_groups(case: Case, path: str) -> list[dict]:
    with Checkpoint(case.checkpoint) as ckpt:
        return ckpt.modules[f"base_model.model.{path}"]["groups"]


def test_mixed_generation_equals_each_task_generating_alone(case_of):
    case = case_of("llama")
    model = case.share_model()
    rows = [case.tasks[0], case.tasks[4], None, case.tasks[2]]
    ids = case.inputs["input_ids"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task=rows, **kwargs)
        for i, task in enumerate(rows):
            alone = model.generate(
                input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), task=task, **kwargs
            )
            assert torch.equal(mixed[i], alone[0]), task


# -- heads ------------------------------------------------------------------------------------------------------


def test_heads_of_different_widths_are_padded_with_minus_infinity(case_of):
    case = case_of("vit")
    model = case.share_model()
    seven, three = case.tasks
    assert (case.labels[seven], case.labels[three]) == (7, 3)
    _, logits = run(model, case.inputs, task=[seven, three, three, seven])
    assert logits.shape == (4, 7)
    assert torch.isinf(logits[1:3, 3:]).all() and (logits[1:3, 3:] < 0).all()
    assert torch.isfinite(logits[[0, 3]]).all() and torch.isfinite(logits[1:3, :3]).all()
    assert model.heads_of(three)["classifier"].out_features == 3
    # alone, a task's head keeps its own width
    assert run(model, case.inputs, task=three)[1].shape == (4, 3)


def test_a_task_without_a_head_uses_the_base_models_head(case_of):
    model = case_of("distilbert").share_model()
    head = model.base_model.classifier
    assert isinstance(head, ShareHead)
    assert model.heads_of("aanilgeo__checkpoint-96")["classifier"] is head.base_module
    assert model.heads_of("BruceChanJianLe__distilbert-base-uncased-lora")["classifier"] is not head.base_module


# -- merging and unloading -----------------------------------------------------------------------------------------


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_merged_task_gives_the_same_outputs_and_unmerge_restores_every_weight_bit_for_bit(case_of):
    case = case_of("gpt2")
    base = copy.deepcopy(case.base)
    before = state(base)
    model = ShareModel.from_checkpoint(base, case.checkpoint, tasks=case.tasks)
    task = case.tasks[-1]
    model.merge(task)
    assert model.merged == task
    hidden, logits = run(model, case.inputs)  # task= may be left out while merged
    assert rel(hidden, case.reference[task][0]) <= TOLERANCE
    assert rel(logits, case.reference[task][1]) <= TOLERANCE
    with pytest.raises(InvalidOptionError, match="unmerge"):
        run(model, case.inputs, task=case.tasks[0])
    model.unmerge()
    assert model.merged is None
    restored = model.unload().state_dict()
    assert restored.keys() == before.keys() and all(torch.equal(restored[k], before[k]) for k in before)


def test_an_inexact_merge_keeps_no_copy_and_unmerges_within_rounding(case_of):
    case = case_of("llama")
    base = copy.deepcopy(case.base)
    before = state(base)
    model = ShareModel.from_checkpoint(base, case.checkpoint)
    model.merge(case.tasks[0], exact=False)
    assert model.memory_report().merge_backup == 0
    model.unmerge()
    after = model.unload().state_dict()
    assert all(torch.allclose(after[k], before[k], rtol=0, atol=1e-6) for k in before)


def test_unload_gives_back_the_untouched_base_model(case_of):
    case = case_of("distilbert")
    base = copy.deepcopy(case.base)
    modules = dict(base.named_modules())
    before = state(base)
    model = ShareModel.from_checkpoint(base, case.checkpoint)
    model.merge(case.tasks[0])
    run(model, case.inputs)
    model.unmerge()
    run(model, case.inputs, task=[case.tasks[0], case.tasks[1], None, case.tasks[0]])
    model.merge(case.tasks[1])  # unload unmerges first
    assert model.unload() is base
    assert dict(base.named_modules()).keys() == modules.keys()
    assert all(m is modules[k] for k, m in base.named_modules())
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert rel(run(base, case.inputs)[0], case.reference[None][0]) == 0


# -- memory --------------------------------------------------------------------------------------------------------


def test_memory_is_the_bases_once_plus_the_tasks_coefficients(case_of):
    case = case_of("llama")
    stored_bases = stored_coefficients = 0
    with Checkpoint(case.checkpoint) as ckpt:
        for module, info in ckpt.modules.items():
            groups = {info["tasks"][t].get("group"): t for t in info["tasks"]}  # one task per group
            for t in groups.values():
                beta, alpha = ckpt.bases(module, t)
                stored_bases += (beta.numel() + alpha.numel()) * 4
            for t in info["tasks"]:
                parts = ckpt.task_tensors(t, module)
                stored_coefficients += sum(parts[k].numel() * 4 for k in ("coef_A", "coef_B") if k in parts)
    one = ShareModel.from_checkpoint(copy.deepcopy(case.base), case.checkpoint, tasks=case.tasks[:1]).memory_report()
    full = case.share_model().memory_report()
    assert full.bases == stored_bases  # each group's bases once per module, whatever the number of tasks
    assert one.bases < full.bases  # one task needs only its own group's bases
    # held with zero padding (to the largest rank, across both groups' rows) and a zero slot
    assert stored_coefficients <= full.coefficients
    assert full.per_task < full.lora_equivalent / full.tasks / 2  # per task, well under a LoRA's factors
    assert full.as_dict()["per_task"] == pytest.approx((full.adapters - full.bases) / 6)


# -- dtype and device -------------------------------------------------------------------------------------------------


def test_bases_stored_in_bfloat16_are_served_by_a_float32_model(case_of):
    case = case_of("bert-tiny")  # equality with PEFT is checked by the tests above
    with Checkpoint(case.checkpoint) as ckpt:
        assert {info["dtype"] for info in ckpt.modules.values()} == {"bfloat16"}
    layer = case.share_model().base_model.bert.encoder.layer[0].attention.self.query
    assert layer.basis_A.dtype == layer.factors.coef_A.dtype == torch.float32


def test_a_lower_dtype_for_the_share_tensors_halves_their_memory_and_stays_close(case_of):
    case = case_of("gpt2")
    full = case.share_model()
    half = case.share_model(dtype=torch.bfloat16)
    assert half.memory_report().adapters * 2 == pytest.approx(full.memory_report().adapters, rel=0.01)
    task = case.tasks[-1]
    base, ref = case.reference[None][0], case.reference[task][0]
    hidden, _ = run(half, case.inputs, task=task)
    assert rel(hidden, ref) < 0.02 * rel(base, ref)  # bfloat16 rounding of the update only


def test_a_device_other_than_the_models_is_refused(case_of):
    case = case_of("llama")
    with pytest.raises(DeviceMismatchError, match=r"Move the model first"):
        case.share_model(device="meta")


def test_inputs_on_another_device_or_of_another_dtype_are_refused_in_one_line(case_of):
    case = case_of("llama")
    model = case.share_model()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    with model.use(case.tasks[0]):
        with pytest.raises(DeviceMismatchError, match="is on meta") as err:
            layer(torch.zeros(2, 3, 64, device="meta"))
        assert "\n" not in str(err.value) and "model.to(" in str(err.value)
        with pytest.raises(DeviceMismatchError, match="torch.float64"):
            layer(torch.zeros(2, 3, 64, dtype=torch.float64))


def test_a_non_float_dtype_is_refused(case_of):
    with pytest.raises(InvalidOptionError, match="floating"):
        case_of("llama").share_model(dtype=torch.int8)


# -- bad input ----------------------------------------------------------------------------------------------------


def test_an_unknown_task_names_the_loaded_ones(case_of):
    case = case_of("llama")
    model = case.share_model()
    with pytest.raises(UnknownTaskError, match="a-000"):
        run(model, case.inputs, task="nope")
    with pytest.raises(UnknownTaskError, match="nope"):
        run(model, case.inputs, task=[case.tasks[0], "nope", None, None])
    with pytest.raises(UnknownTaskError, match="a-000"):
        ShareModel.from_checkpoint(copy.deepcopy(case.base), case.checkpoint, tasks=["nope"])


def test_tasks_must_be_a_list_of_names(case_of):
    case = case_of("llama")
    with pytest.raises(InvalidOptionError, match=r"Use tasks=\['a-000'\]"):
        ShareModel.from_checkpoint(copy.deepcopy(case.base), case.checkpoint, tasks="a-000")


def test_a_task_list_of_another_length_than_the_batch_is_refused(case_of):
    case = case_of("llama")
    with pytest.raises(BatchMismatchError, match="3 tasks given for a batch of 4 rows"):
        run(case.share_model(), case.inputs, task=case.tasks[:3])


def test_no_task_is_refused_unless_one_is_merged(case_of):
    case = case_of("llama")
    with pytest.raises(InvalidOptionError, match="task="):
        run(case.share_model(), case.inputs)


def test_a_checkpoint_of_other_shapes_is_refused_and_the_model_left_untouched(case_of):
    case = case_of("llama")
    other = llama(hidden=32, intermediate=64)
    with pytest.raises(ModelMismatchError, match=r"weight \(32, 32\), the checkpoint's ΔW is 64×64") as err:
        ShareModel.from_checkpoint(other, case.checkpoint)
    assert "synthetic/llama-like" in str(err.value)
    assert not any(isinstance(m, (ShareLayer, ShareHead)) for m in other.modules())


def test_a_checkpoint_for_another_architecture_is_refused(case_of):
    with pytest.raises(ModelMismatchError, match="no counterpart model.layers.0.self_attn"):
        ShareModel.from_checkpoint(bert_classifier(), case_of("llama").checkpoint)


def test_every_runtime_error_is_a_share_error_on_one_line(case_of):
    case = case_of("llama")
    model = case.share_model()
    for call in (
        lambda: run(model, case.inputs, task="nope"),
        lambda: run(model, case.inputs, task=case.tasks[:2]),
        lambda: case.share_model(device="meta"),
    ):
        with pytest.raises(ShareError) as err:
            call()
        assert "\n" not in str(err.value)


def test_an_unloaded_model_refuses_to_run(case_of):
    case = case_of("llama")
    model = case.share_model()
    model.unload()
    with pytest.raises(InvalidOptionError, match="unloaded"):
        run(model, case.inputs, task=case.tasks[0])


def test_the_checkpoint_path_may_be_given_as_text(case_of):
    case = case_of("llama")
    model = ShareModel.from_checkpoint(copy.deepcopy(case.base), str(case.checkpoint), tasks=[case.tasks[0]])
    assert model.tasks == [case.tasks[0]]
    assert model.config is model.base_model.config  # the base model's attributes read through
    assert json.dumps(model.memory_report().as_dict())
