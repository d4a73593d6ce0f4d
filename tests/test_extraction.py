"""Extraction, proven by PEFT: real architectures built from configs (random weights, nothing downloaded)."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint
from share_convert.engine import merge
from share_convert.errors import OutputExistsError, UnknownTaskError
from share_convert.io import extract, extract_all, open_adapters

from .builders.models import bert_classifier, distilbert, gpt2_classifier


def outputs(base, adapter_dir, tokens):
    """(last hidden state, logits) of ``base`` with ``adapter_dir`` loaded (``None``: the base alone)."""
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        out = model(input_ids=tokens, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


CASES = {
    "gpt2": (gpt2_classifier, ["gpt2-c_attn"]),
    "distilbert": (distilbert, ["distilbert"]),
    "bert-tiny": (bert_classifier, ["bert-tiny"]),
}


@pytest.fixture(scope="module")
def bases():
    return {name: build() for name, (build, _) in CASES.items()}


TOKENS = torch.randint(1, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(CASES))
def test_full_k_extraction_gives_the_original_outputs(tmp_path, real, merged, bases, case):
    _, groups = CASES[case]
    sources = open_adapters([str(real / g) for g in groups])
    ckpt = merged(*groups, k=10_000)
    for src in sources:
        extract(ckpt, src.task, tmp_path / src.task)
        h0, y0 = outputs(bases[case], src.weights_path.parent, TOKENS)
        h1, y1 = outputs(bases[case], tmp_path / src.task, TOKENS)
        assert torch.allclose(h0, h1, atol=1e-4, rtol=1e-4), (h0 - h1).abs().max()
        assert torch.allclose(y0, y1, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_default_extraction_differs_no_more_than_the_reported_error(tmp_path, real, merged, bases, case):
    _, groups = CASES[case]
    sources = open_adapters([str(real / g) for g in groups])
    ckpt = Checkpoint(merged(*groups))
    h_base, _ = outputs(bases[case], None, TOKENS)
    for src in sources:
        extract(ckpt, src.task, tmp_path / src.task)
        worst = max(m["tasks"][src.task]["error"] for m in ckpt.modules.values() if src.task in m["tasks"])
        h0, _ = outputs(bases[case], src.weights_path.parent, TOKENS)
        h1, _ = outputs(bases[case], tmp_path / src.task, TOKENS)
        effect = torch.linalg.norm(h0 - h_base)
        # the adapters' effect on the hidden states is close to linear in ΔW at these sizes:
        # the output error relative to the adapter's effect stays within a small multiple of the ΔW error
        assert torch.linalg.norm(h1 - h0) <= 3 * worst * effect + 1e-6 * torch.linalg.norm(h0)  # + float32 noise


def test_heads_give_identical_tensors_and_config_keeps_the_original_fields(tmp_path, real):
    src = open_adapters([str(real / "distilbert/BruceChanJianLe__distilbert-base-uncased-lora")])[0]
    merge([src], tmp_path / "c.safetensors")
    extract(tmp_path / "c.safetensors", src.task, tmp_path / "out")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out/adapter_model.safetensors"))
    for k, v in src.read_heads().items():
        assert torch.equal(saved[k], v)
    cfg = json.loads((tmp_path / "out/adapter_config.json").read_text())
    orig = src.config
    for key in ("target_modules", "task_type", "base_model_name_or_path", "fan_in_fan_out", "modules_to_save"):
        assert cfg[key] == orig[key]
    assert cfg["r"] == cfg["lora_alpha"]


def test_key_names_are_those_of_the_original_adapter(tmp_path, real):
    src = open_adapters([str(real / "gpt2-c_attn/winkitee__peft-lora-gpt2")])[0]
    merge([src], tmp_path / "c.safetensors")
    extract(tmp_path / "c.safetensors", src.task, tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out/adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(src.shapes)


def test_rank_option_truncates_to_the_best_rank_r_approximation(tmp_path, real):
    src = open_adapters([str(real / "gpt2-c_attn/winkitee__peft-lora-gpt2")])[0]
    merge([src], tmp_path / "c.safetensors", ConsolidationConfig(k=10_000))
    r = extract(tmp_path / "c.safetensors", src.task, tmp_path / "out", rank=3)
    assert r.rank == 3
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out/adapter_model.safetensors"))
    module = "base_model.model.transformer.h.5.attn.c_attn"
    f = src.read_module(module)
    W = f.B.double() @ f.A.double()
    W3 = saved[f"{module}.lora_B.weight"].double() @ saved[f"{module}.lora_A.weight"].double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    assert torch.allclose(W3, best, atol=1e-5 * float(S[0]))


def test_merging_extracted_adapters_again_changes_nothing(tmp_path, real, merged):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    extract_all(merged("gpt2-c_attn"), tmp_path / "x1")
    merge(open_adapters([str(tmp_path / "x1")]), tmp_path / "c2.safetensors", ConsolidationConfig(k=10_000))
    extract_all(tmp_path / "c2.safetensors", tmp_path / "x2")
    from safetensors.torch import load_file

    for src in sources:
        a = load_file(str(tmp_path / "x1" / src.task / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "x2" / src.task / "adapter_model.safetensors"))
        for key in a:
            if key.endswith("lora_B.weight"):
                akey = key.replace("lora_B", "lora_A")
                Wa = a[key].double() @ a[akey].double()
                Wb = b[key].double() @ b[akey].double()
                assert torch.allclose(Wa, Wb, atol=1e-5 * float(Wa.abs().max()) + 1e-9)


def test_unknown_task_lists_the_available_ones(tmp_path, merged):
    with pytest.raises(UnknownTaskError, match="winkitee__peft-lora-gpt2"):
        extract(merged("gpt2-c_attn"), "nope", tmp_path / "out")


def test_non_empty_output_folder_is_refused_without_force(tmp_path, merged):
    ckpt = merged("gpt2-c_attn")
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        extract(ckpt, "gsj-rifat__tmp", tmp_path / "out")
    assert (tmp_path / "out/keep.txt").read_text() == "x"
    extract(ckpt, "gsj-rifat__tmp", tmp_path / "out", force=True)
    assert not (tmp_path / "out/keep.txt").exists()


def test_extraction_reads_only_the_task_it_needs(tmp_path, merged, monkeypatch):
    from share_convert.checkpoint import Checkpoint

    ckpt = merged("gpt2-c_attn", k=4, private_rank=1)
    read: list[str] = []
    original = Checkpoint.tensor

    def spy(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "tensor", spy)
    extract(ckpt, "gsj-rifat__tmp", tmp_path / "out")
    assert read and all(n.startswith(("tasks/gsj-rifat__tmp/", "modules/", "records/")) for n in read)
    assert not any(n.endswith(("gram_B", "gram_A")) for n in read)


def test_extract_offers_exactly_the_formats_it_has_writers_for(tmp_path, merged):
    from typer.testing import CliRunner

    from share_convert.cli import app
    from share_convert.io import WRITERS

    ckpt = merged("gpt2-c_attn")
    result = CliRunner().invoke(app, ["extract", str(ckpt), "--all", "--format", "onnx", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"is not one of {', '.join(WRITERS)}" in result.output
    assert "<" + "|".join(WRITERS) + ">" in CliRunner().invoke(app, ["extract", "--help"]).output
    assert not (tmp_path / "o").exists()
