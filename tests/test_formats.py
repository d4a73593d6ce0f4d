"""Reading adapters: every input kind, scales, dtypes, names."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

from share_convert.errors import BadAdapterError, DuplicateTaskError, InvalidTaskNameError
from share_convert.io import AdapterSource, LoraStack, OpenFiles, open_adapters, read_module_stack

from .builders.adapters import random_factors, write_adapter


def test_peft_folder_with_safetensors(real):
    src = AdapterSource(real / "gpt2-c_attn/winkitee__peft-lora-gpt2")
    assert src.task == "winkitee__peft-lora-gpt2"
    assert len(src.modules) == 12
    assert src.head_keys == ["base_model.model.score.weight"]
    f = src.read_module("base_model.model.transformer.h.0.attn.c_attn")
    assert f.B.shape == (2304, 8) and f.A.shape == (8, 768)


def test_peft_folder_with_bin_weights(real):
    src = AdapterSource(real / "gpt2-c_attn/gsj-rifat__tmp")
    assert src.weights_path.name == "adapter_model.bin"
    assert len(src.modules) == 12
    assert src.read_module("base_model.model.transformer.h.3.attn.c_attn").B.dtype == torch.float32


def test_bare_safetensors_uses_config_beside_it(tmp_path, real):
    src_dir = real / "gpt2-c_attn/winkitee__peft-lora-gpt2"
    shutil.copy(src_dir / "adapter_model.safetensors", tmp_path / "imdb.safetensors")
    shutil.copy(src_dir / "adapter_config.json", tmp_path / "imdb.json")
    src = AdapterSource(tmp_path / "imdb.safetensors")
    assert src.task == "imdb" and src.alpha_assumed is None
    assert src.scale("base_model.model.transformer.h.0.attn.c_attn") == 2.0


def test_bare_safetensors_without_config_needs_alpha(tmp_path, real):
    shutil.copy(real / "gpt2-c_attn/winkitee__peft-lora-gpt2/adapter_model.safetensors", tmp_path / "x.safetensors")
    with pytest.raises(BadAdapterError, match="--alpha"):
        AdapterSource(tmp_path / "x.safetensors")
    src = AdapterSource(tmp_path / "x.safetensors", alpha=32)
    assert src.alpha_assumed == 32 and src.scale("base_model.model.transformer.h.0.attn.c_attn") == 4.0


def test_globs_and_folders_of_adapters_expand(real):
    by_glob = open_adapters([str(real / "gpt2-c_attn/*")])
    by_folder = open_adapters([str(real / "gpt2-c_attn")])
    assert [s.task for s in by_glob] == [s.task for s in by_folder]
    assert len(by_glob) == 5


def test_empty_glob_is_an_error(tmp_path):
    with pytest.raises(BadAdapterError, match="no file matches"):
        open_adapters([str(tmp_path / "*.safetensors")])


def test_name_equals_path_names_the_task(real):
    (src,) = open_adapters([f"imdb={real / 'gpt2-c_attn/winkitee__peft-lora-gpt2'}"])
    assert src.task == "imdb"


def test_duplicate_task_names_are_refused(tmp_path, real):
    p = real / "gpt2-c_attn/winkitee__peft-lora-gpt2"
    with pytest.raises(DuplicateTaskError, match="used by both"):
        open_adapters([f"x={p}", f"x={real / 'gpt2-c_attn/ShutterStack__peft_model'}"])


@pytest.mark.parametrize("name", ["a/b", "..", "x" * 101, "bad\x07name", ".hidden"])
def test_unusable_task_names_are_refused(real, name):
    with pytest.raises(InvalidTaskNameError):
        AdapterSource(real / "gpt2-c_attn/winkitee__peft-lora-gpt2", task=name)


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"r": 4, "lora_alpha": 8}, 2.0),
        ({"r": 4, "lora_alpha": 8, "use_rslora": True}, 8 / math.sqrt(4)),
        ({"r": 8, "lora_alpha": 8, "rank_pattern": {"layers.0.q": 4}, "alpha_pattern": {"q": 12}}, 3.0),
    ],
)
def test_scale_follows_alpha_rank_rslora_and_patterns(tmp_path, config, expected):
    write_adapter(tmp_path / "a", {"layers.0.q": random_factors(6, 5, 4, 0)}, config=config)
    src = AdapterSource(tmp_path / "a")
    assert src.scale("base_model.model.layers.0.q") == pytest.approx(expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_read_as_float32(tmp_path, dtype):
    A, B = random_factors(6, 5, 2, 0, dtype)
    write_adapter(tmp_path / "a", {"layers.0.q": (A, B)}, alpha=2)
    f = AdapterSource(tmp_path / "a").read_module("base_model.model.layers.0.q")
    assert f.B.dtype == torch.float32 and torch.equal(f.A, A.float())


def test_heads_are_returned_unchanged(real):
    src = AdapterSource(real / "distilbert/BruceChanJianLe__distilbert-base-uncased-lora")
    heads = src.read_heads()
    assert set(heads) == {
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
        "base_model.model.pre_classifier.bias",
        "base_model.model.pre_classifier.weight",
    }


def test_rank_disagreeing_with_config_is_refused(tmp_path):
    write_adapter(tmp_path / "a", {"layers.0.q": random_factors(6, 5, 4, 0)}, config={"r": 8})
    with pytest.raises(BadAdapterError, match="r=8 in the config"):
        AdapterSource(tmp_path / "a")


def test_non_lora_peft_type_is_refused(tmp_path):
    write_adapter(tmp_path / "a", {"layers.0.q": random_factors(6, 5, 4, 0)}, config={"peft_type": "IA3"})
    with pytest.raises(BadAdapterError, match="IA3 adapter"):
        AdapterSource(tmp_path / "a")


def test_file_without_lora_tensors_is_refused(tmp_path):
    save_file({"classifier.weight": torch.zeros(2, 3)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "x.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    with pytest.raises(BadAdapterError, match="no LoRA tensors"):
        AdapterSource(tmp_path / "x.safetensors")


def _adapters(tmp_path, count: int, *, dtype=torch.float32, alpha: float = 16, fmt: str = "safetensors"):
    g = torch.Generator().manual_seed(11)
    folders = []
    for i in range(count):
        A, B = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
        folders.append(
            write_adapter(tmp_path / f"t{i}", {"layers.0.q": (A.to(dtype), B.to(dtype))}, alpha=alpha + i, fmt=fmt)
        )
    return open_adapters([str(f) for f in folders])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_module_read_as_one_stack_equals_reading_it_task_by_task(tmp_path, dtype):
    sources = _adapters(tmp_path, 3, dtype=dtype)
    module = next(iter(sources[0].modules))
    stack = read_module_stack(sources, module)
    assert isinstance(stack, LoraStack)
    for source, factors in zip(sources, stack):
        one = source.read_module(module)
        assert torch.equal(factors.B, one.B) and torch.equal(factors.A, one.A)


def test_a_module_that_cannot_be_read_as_raw_bytes_is_read_task_by_task(tmp_path):
    sources = _adapters(tmp_path / "st", 1) + _adapters(tmp_path / "bin", 1, fmt="bin")
    module = next(iter(sources[0].modules))
    factors = read_module_stack(sources, module)
    assert isinstance(factors, list)
    assert torch.equal(factors[1].B, sources[1].read_module(module).B)


def test_a_stack_read_names_the_adapter_with_nan(tmp_path):
    sources = _adapters(tmp_path, 2)
    A, B = torch.randn(4, 12), torch.randn(10, 4)
    B[3, 1] = float("nan")
    sources.append(open_adapters([str(write_adapter(tmp_path / "broken", {"layers.0.q": (A, B)}))])[0])
    with pytest.raises(BadAdapterError, match="NaN or Inf") as info:
        read_module_stack(sources, next(iter(sources[0].modules)))
    assert "broken" in str(info.value.path)


def test_open_files_read_what_a_plain_read_gives_within_and_beyond_the_limit(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes(range(i, i + 200)))
    with OpenFiles(limit=2) as files:  # two held open, the third opened per read
        for path in paths * 2:
            buf = bytearray(50)
            assert files.read_into(path, 7, memoryview(buf)) == 50
            assert bytes(buf) == path.read_bytes()[7:57]
        short = bytearray(50)
        assert files.read_into(paths[0], 180, memoryview(short)) == 20  # past the end: what is there


def test_a_merge_closes_the_adapter_files_it_held_open(tmp_path, small_adapters):
    import os

    from share_convert.api import merge

    before = len(os.listdir("/proc/self/fd"))
    merge([str(p) for p in small_adapters], tmp_path / "c.safetensors")
    assert len(os.listdir("/proc/self/fd")) == before


def test_each_input_kind_is_classified_once_into_the_reader_of_its_kind(tmp_path, small_adapters):
    from share_convert import api
    from share_convert.io import READERS, classify

    kohya, diffusers = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    A, B = random_factors(8, 8, 2, seed=0)
    save_file({"lora_unet_conv_in.lora_down.weight": A, "lora_unet_conv_in.lora_up.weight": B}, str(kohya))
    save_file({"unet.conv_in.lora_A.weight": A, "unet.conv_in.lora_B.weight": B}, str(diffusers))
    api.merge([str(p) for p in small_adapters], tmp_path / "one.safetensors")
    api.merge([str(p) for p in small_adapters], tmp_path / "sharded.safetensors", max_shard_size=1000)
    expected = {
        small_adapters[0]: "peft",
        small_adapters[1] / "adapter_model.safetensors": "peft",
        kohya: "kohya",
        diffusers: "diffusers",
        tmp_path / "one.safetensors": "checkpoint",
        tmp_path / "sharded.safetensors.index.json": "checkpoint",
    }
    assert {path: classify(path).kind for path in expected} == expected
    assert set(expected.values()) <= set(READERS)
