"""Consolidation: scale folding, canonicalization, k clamping, errors against brute force, planning."""

import torch

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint
from share_convert.engine import merge
from share_convert.io import AdapterSource, open_adapters

from .builders.adapters import random_factors, write_adapter


def dense_delta(src: AdapterSource, module: str) -> torch.Tensor:
    f = src.read_module(module)
    return f.B.double() @ f.A.double()


def dense_recon(ckpt: Checkpoint, task: str, module: str) -> torch.Tensor:
    Bh, Ah = ckpt.reconstruction(task, module)
    return Bh @ Ah.T


def rel(W, What):
    return float(torch.linalg.norm(W - What) / torch.linalg.norm(W))


def test_full_k_reconstructs_every_delta_w_across_mixed_alpha_rank_and_rslora(tmp_path):
    configs = [
        ({"r": 4, "lora_alpha": 8}, 4),
        ({"r": 2, "lora_alpha": 16, "use_rslora": True}, 2),
        ({"r": 6, "lora_alpha": 3}, 6),
    ]
    paths = [
        write_adapter(tmp_path / f"a{i}", {"layers.0.q": random_factors(16, 12, r, i)}, config=cfg)
        for i, (cfg, r) in enumerate(configs)
    ]
    sources = open_adapters([str(p) for p in paths])
    merge(sources, tmp_path / "c.safetensors", ConsolidationConfig(k=1000))
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    for src in sources:
        W = dense_delta(src, "base_model.model.layers.0.q")
        assert rel(W, dense_recon(ckpt, src.task, "base_model.model.layers.0.q")) < 1e-5


def test_k_is_clamped_to_the_numerical_rank(tmp_path):
    p = write_adapter(tmp_path / "a", {"layers.0.q": random_factors(16, 12, 3, 0)})
    merge(open_adapters([str(p)]), tmp_path / "c.safetensors", ConsolidationConfig(k=50))
    info = Checkpoint(tmp_path / "c.safetensors").modules["base_model.model.layers.0.q"]
    assert (info["k_B"], info["k_A"]) == (3, 3)


def test_rank_larger_than_dimensions_is_clamped_on_bert_tiny(tmp_path, real):
    src = open_adapters([str(real / "bert-tiny")])
    merge(src, tmp_path / "c.safetensors", ConsolidationConfig(k=500))
    for info in Checkpoint(tmp_path / "c.safetensors").modules.values():
        assert info["k_B"] <= 32 and info["k_A"] <= 32
        assert all(t["error"] < 1e-5 for t in info["tasks"].values())


def test_a_gauge_transformed_copy_gives_the_same_result(tmp_path):
    A, B = random_factors(16, 12, 4, 1)
    R = torch.randn(4, 4, generator=torch.Generator().manual_seed(9)) + 3 * torch.eye(4)
    others = {f"o{i}": random_factors(16, 12, 4, 20 + i) for i in range(3)}
    for variant, (AA, BB) in {"plain": (A, B), "gauge": (torch.linalg.inv(R) @ A, B @ R)}.items():
        write_adapter(tmp_path / variant / "x", {"layers.0.q": (AA, BB)})
        for name, f in others.items():
            write_adapter(tmp_path / variant / name, {"layers.0.q": f})
    results = []
    for variant in ("plain", "gauge"):
        merge(open_adapters([str(tmp_path / variant)]), tmp_path / f"{variant}.safetensors", ConsolidationConfig(k=5))
        ckpt = Checkpoint(tmp_path / f"{variant}.safetensors")
        results.append((ckpt, {t: dense_recon(ckpt, t, "base_model.model.layers.0.q") for t in ckpt.tasks}))
    (c1, r1), (c2, r2) = results
    for t in r1:
        assert torch.allclose(r1[t], r2[t], atol=1e-4 * float(r1[t].abs().max()))
    assert torch.allclose(
        c1.tensor("modules/base_model.model.layers.0.q/basis_B"),
        c2.tensor("modules/base_model.model.layers.0.q/basis_B"),
        atol=1e-4,
    )


def test_stored_errors_equal_brute_force_dense_errors(tmp_path, small_adapters):
    sources = open_adapters([str(p) for p in small_adapters])
    for cfg in (
        ConsolidationConfig(k=3),
        ConsolidationConfig(k=2, private_rank=1),
        ConsolidationConfig(target_error=0.3),
    ):
        merge(sources, tmp_path / "c.safetensors", cfg, force=True)
        ckpt = Checkpoint(tmp_path / "c.safetensors")
        for module, info in ckpt.modules.items():
            for src in sources:
                e = rel(dense_delta(src, module), dense_recon(ckpt, src.task, module))
                assert abs(info["tasks"][src.task]["error"] - e) < 1e-6


def test_modules_are_consolidated_over_the_adapters_that_have_them(tmp_path):
    a = write_adapter(
        tmp_path / "a", {"layers.0.q": random_factors(8, 6, 2, 0), "layers.0.v": random_factors(8, 6, 2, 1)}
    )
    b = write_adapter(tmp_path / "b", {"layers.0.q": random_factors(8, 6, 2, 2)})
    merge(open_adapters([str(a), str(b)]), tmp_path / "c.safetensors")
    mods = Checkpoint(tmp_path / "c.safetensors").modules
    assert set(mods["base_model.model.layers.0.q"]["tasks"]) == {"a", "b"}
    assert set(mods["base_model.model.layers.0.v"]["tasks"]) == {"a"}


def test_heads_are_carried_byte_for_byte(tmp_path, real):
    src = open_adapters([str(real / "distilbert/BruceChanJianLe__distilbert-base-uncased-lora")])
    merge(src, tmp_path / "c.safetensors")
    heads = Checkpoint(tmp_path / "c.safetensors").heads(src[0].task)
    for k, v in src[0].read_heads().items():
        assert torch.equal(heads[k], v) and heads[k].dtype == v.dtype


def test_same_inputs_give_a_byte_identical_checkpoint(tmp_path, real):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    merge(sources, tmp_path / "1.safetensors")
    merge(sources, tmp_path / "2.safetensors")
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_energy_target_keeps_that_fraction_of_the_stack(tmp_path, small_adapters):
    sources = open_adapters([str(p) for p in small_adapters])
    merge(sources, tmp_path / "lo.safetensors", ConsolidationConfig(energy=0.5))
    merge(sources, tmp_path / "hi.safetensors", ConsolidationConfig(energy=1.0))
    lo = Checkpoint(tmp_path / "lo.safetensors").modules
    hi = Checkpoint(tmp_path / "hi.safetensors").modules
    for m in lo:
        assert lo[m]["k_B"] < hi[m]["k_B"]
        assert all(t["error"] < 1e-5 for t in hi[m]["tasks"].values())


def test_the_error_target_is_met_in_every_module(tmp_path, real):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    for metric in ("mean", "max"):
        merge(
            sources, tmp_path / "c.safetensors", ConsolidationConfig(target_error=0.1, target_metric=metric), force=True
        )
        for info in Checkpoint(tmp_path / "c.safetensors").modules.values():
            errs = [t["error"] for t in info["tasks"].values()]
            bound = sum(errs) / len(errs) if metric == "mean" else max(errs)
            assert bound <= 0.1 + 1e-4
