"""Text-to-image LoRAs (kohya and diffusers files), proven by diffusers' own loader.

Tiny SD 1.5-like, SDXL-like and Flux-like models are built from diffusers / transformers configs
(random weights, nothing downloaded) by tests/builders/pipelines.py, which also writes the LoRA files
from the models' real module names and shapes with its own key builders; the expected ΔW are computed
from the tensors written, never by the reader under test.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

pytest.importorskip("diffusers")
from diffusers import FluxPipeline, StableDiffusionXLPipeline  # noqa: E402

from share_convert import (
    ConsolidationConfig,  # noqa: E402
    api,  # noqa: E402
)
from share_convert.cli import app  # noqa: E402
from share_convert.errors import BadAdapterError, IncompatibleAdaptersError  # noqa: E402
from share_convert.io import open_adapters  # noqa: E402

from .builders.pipelines import (  # noqa: E402
    RANK,
    delta,
    diffusers_file,
    flux_modules,
    flux_pipe,
    kohya_flux,
    kohya_sd,
    sd15_pipe,
    sdxl_pipe,
    sgm_names,
    targets,
    to_sgm,
)

logging.getLogger("diffusers").setLevel(logging.ERROR)
FULL = ConsolidationConfig(k=10_000, dtype="float32")


@pytest.fixture(scope="session")
def sd15():
    return sd15_pipe()


@pytest.fixture(scope="session")
def sdxl():
    return sdxl_pipe()


@pytest.fixture(scope="session")
def flux():
    return flux_pipe()


def forward(pipe) -> list[torch.Tensor]:
    """The outputs of every adapted component on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (1, 7), generator=g)
    outs = []
    with torch.no_grad():
        if isinstance(pipe, FluxPipeline):
            outs.append(pipe.text_encoder(ids).pooler_output)
            out = pipe.transformer(
                hidden_states=torch.randn(1, 16, 4, generator=g),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                pooled_projections=outs[0],
                timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(7, 3),
                return_dict=False,
            )[0]
            return outs + [out]
        sample = torch.randn(1, 4, 8, 8, generator=g)
        h1 = pipe.text_encoder(ids).last_hidden_state
        outs.append(h1)
        kwargs = {}
        if isinstance(pipe, StableDiffusionXLPipeline):
            o2 = pipe.text_encoder_2(ids)
            outs.append(o2.last_hidden_state)
            h1 = torch.cat([h1, o2.last_hidden_state], -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": o2.text_embeds, "time_ids": torch.zeros(1, 6)}
        outs.append(pipe.unet(sample, 10, encoder_hidden_states=h1, return_dict=False, **kwargs)[0])
    return outs


def with_lora(pipe, path: Path) -> list[torch.Tensor]:
    """Outputs with ``path`` loaded by diffusers' ``load_lora_weights``, on a copy of the pipeline."""
    p = copy.deepcopy(pipe)
    p.load_lora_weights(str(path), adapter_name="x")
    return forward(p)


def with_delta(pipe, deltas: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Outputs with every ΔW added to its weight directly (the reference, independent of any loader)."""
    p = copy.deepcopy(pipe)
    for name, dw in deltas.items():
        component, path = name.split(".", 1)
        model = getattr(p, component)
        if not hasattr(model, "text_model"):
            path = path.removeprefix("text_model.")
        mod = model.get_submodule(path)
        with torch.no_grad():
            mod.weight += dw.reshape(mod.weight.shape).to(mod.weight.dtype)
    return forward(p)


def assert_outputs_match(a: list[torch.Tensor], b: list[torch.Tensor], base: list[torch.Tensor]) -> None:
    for x, y, z in zip(a, b, base):
        assert (x - z).abs().max() > 1e-3, "the LoRA changes nothing: this comparison would prove nothing"
        assert torch.allclose(x, y, atol=2e-4, rtol=1e-4), (x - y).abs().max()


# -- reading ΔW back from written files, with this test's own rules --------------------------------
def read_diffusers(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            m = k[: -len(".lora_A.weight")]
            c = m.split(".")[0]
            out[m] = delta(t[k], t[f"{m}.lora_B.weight"], meta[f"{c}.lora_alpha"] / meta[f"{c}.r"])
    return out


def read_kohya(
    path: Path, names: dict[str, list[str]], widths: dict[str, list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """``names``: kohya name (without .lora_down…) → canonical names of its rows (several for fused Flux)."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k in t:
        if k.endswith(".lora_down.weight"):
            lora = k[: -len(".lora_down.weight")]
            down, up = t[k], t[f"{lora}.lora_up.weight"]
            full = delta(down, up, t[f"{lora}.alpha"].item() / down.shape[0])
            parts = names[lora]
            sizes = (widths or {}).get(lora, [full.shape[0] // len(parts)] * len(parts))
            row = 0
            for p, s in zip(parts, sizes):
                out[p] = full[row : row + s]
                row += s
    return out


def assert_same_deltas(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, dw in expected.items():
        err = (got[name] - dw).norm() / dw.norm()
        assert err <= tol, (name, float(err))


def kohya_names_sd(
    expected: dict[str, torch.Tensor], xl: bool, table: dict[str, str] | None = None
) -> dict[str, list[str]]:
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for name in expected:
        c, p = name.split(".", 1)
        out[prefixes[c] + (to_sgm(p, table) if table and c == "unet" else p.replace(".", "_"))] = [name]
    return out


def merge_extract(tmp: Path, files: list[Path], task: str, fmt: str | None, out: Path, config=FULL) -> Path:
    api.merge([str(f) for f in files], tmp / "share.safetensors", config, force=True)
    return api.extract(tmp / "share.safetensors", out, task=task, format=fmt, force=True)[0].path


# == SD 1.5 ======================================================================================
def test_sd15_kohya_round_trip_at_full_k_keeps_every_delta_and_conv_layout(sd15, tmp_path):
    expected = kohya_sd(sd15, tmp_path / "a.safetensors", seed=1)
    kohya_sd(sd15, tmp_path / "b.safetensors", seed=2)
    out = merge_extract(
        tmp_path, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], "a", None, tmp_path / "a-out.safetensors"
    )
    assert_same_deltas(read_kohya(out, kohya_names_sd(expected, False)), expected)
    with safe_open(str(out), framework="pt") as f:
        assert f.get_slice("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").get_shape()[2:] == [3, 3]
        assert f.get_slice("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight").get_shape()[2:] == [1, 1]
        assert f.get_slice("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight").get_shape()[2:] == [1, 1]
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == str(RANK)


def test_sd15_kohya_and_diffusers_extractions_load_in_diffusers_like_the_original(sd15, tmp_path):
    expected = kohya_sd(sd15, tmp_path / "a.safetensors", seed=1)
    kohya_sd(sd15, tmp_path / "b.safetensors", seed=2)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    kohya = merge_extract(tmp_path, files, "a", "kohya", tmp_path / "k.safetensors")
    diff = api.extract(tmp_path / "share.safetensors", tmp_path / "d", task="a", format="diffusers")[0].path
    assert diff == tmp_path / "d" / "pytorch_lora_weights.safetensors"
    base, original = forward(sd15), with_lora(sd15, tmp_path / "a.safetensors")
    assert_outputs_match(original, with_delta(sd15, expected), base)  # the test's ΔW are diffusers' reading
    assert_outputs_match(with_lora(sd15, kohya), original, base)
    assert_outputs_match(with_lora(sd15, diff.parent), original, base)


# == SDXL ========================================================================================
@pytest.mark.parametrize("sgm", [False, True], ids=["diffusers-naming", "sgm-naming"])
def test_sdxl_kohya_round_trips_in_its_own_naming_and_loads_in_diffusers(sdxl, tmp_path, sgm):
    expected = kohya_sd(sdxl, tmp_path / "a.safetensors", seed=3, sgm=sgm)
    kohya_sd(sdxl, tmp_path / "b.safetensors", seed=4, sgm=sgm)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    out = merge_extract(tmp_path, files, "a", None, tmp_path / "a-out.safetensors")
    table = sgm_names(sdxl.unet) if sgm else None
    assert_same_deltas(read_kohya(out, kohya_names_sd(expected, True, table)), expected)
    base, original = forward(sdxl), with_lora(sdxl, tmp_path / "a.safetensors")
    assert_outputs_match(original, with_delta(sdxl, expected), base)
    assert_outputs_match(with_lora(sdxl, out), original, base)
    diff = api.extract(tmp_path / "share.safetensors", tmp_path / "d.safetensors", task="a", format="diffusers")[0].path
    assert_outputs_match(with_lora(sdxl, diff), original, base)


def test_sdxl_files_in_both_namings_share_their_modules(sdxl, tmp_path):
    kohya_sd(sdxl, tmp_path / "a.safetensors", seed=3, sgm=True)
    kohya_sd(sdxl, tmp_path / "b.safetensors", seed=4, sgm=False)
    diffusers_file(sdxl, tmp_path / "c.safetensors", seed=5)
    a, b, c = open_adapters([str(tmp_path / n) for n in ("a.safetensors", "b.safetensors", "c.safetensors")])
    assert set(a.module_shapes()) == set(b.module_shapes())
    assert set(c.module_shapes()) <= set(a.module_shapes())
    assert a.module_shapes() == b.module_shapes()


# == Flux ========================================================================================
def flux_widths(transformer, names: dict[str, list[str]]) -> dict[str, list[int]]:
    return {f"lora_unet_{k}": [transformer.get_submodule(p).weight.shape[0] for p in v] for k, v in names.items()}


def test_flux_kohya_round_trip_splits_and_refuses_nothing(flux, tmp_path):
    expected = kohya_flux(flux, tmp_path / "a.safetensors", seed=6)
    kohya_flux(flux, tmp_path / "b.safetensors", seed=7)
    out = merge_extract(
        tmp_path, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], "a", None, tmp_path / "o.safetensors"
    )
    names = flux_modules(flux.transformer, True)
    kohya = {f"lora_unet_{k}": [f"transformer.{p}" for p in v] for k, v in names.items()}
    kohya.update(
        {
            "lora_te1_text_model_" + n.replace(".", "_"): [f"text_encoder.text_model.{n}"]
            for n, _ in targets(flux.text_encoder, True)
        }
    )
    got = read_kohya(out, kohya, flux_widths(flux.transformer, names))
    # read_kohya reads BFL rows in order; diffusers' norm_out.linear has the halves swapped
    nl = got["transformer.norm_out.linear"]
    got["transformer.norm_out.linear"] = torch.cat([nl[nl.shape[0] // 2 :], nl[: nl.shape[0] // 2]])
    assert_same_deltas(got, expected)


def test_flux_kohya_extractions_load_in_diffusers_like_the_original(flux, tmp_path):
    # diffusers' kohya-Flux reader hard-codes Flux-dev's linear1 widths and drops final_layer
    # modules (diffusers 0.42), so the file it loads as the original leaves those out; they are
    # checked against this test's own ΔW (round trip above) and the directly merged ΔW (below)
    expected = kohya_flux(flux, tmp_path / "a.safetensors", seed=6, linear1=False, final=False)
    kohya_flux(flux, tmp_path / "b.safetensors", seed=7, linear1=False, final=False)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    out = merge_extract(tmp_path, files, "a", None, tmp_path / "o.safetensors")
    base, original = forward(flux), with_lora(flux, tmp_path / "a.safetensors")
    assert_outputs_match(original, with_delta(flux, expected), base)
    assert_outputs_match(with_lora(flux, out), original, base)
    diff = api.extract(tmp_path / "share.safetensors", tmp_path / "d.safetensors", task="a", format="diffusers")[0].path
    assert_outputs_match(with_lora(flux, diff), original, base)


def test_flux_linear1_is_split_into_q_k_v_and_mlp_as_diffusers_expects(flux, tmp_path):
    expected = kohya_flux(flux, tmp_path / "a.safetensors", seed=8)
    diff = merge_extract(tmp_path, [tmp_path / "a.safetensors"], "a", "diffusers", tmp_path / "d.safetensors")
    assert_same_deltas(read_diffusers(diff), expected)
    assert_outputs_match(with_lora(flux, diff), with_delta(flux, expected), forward(flux))


# == diffusers-format inputs ======================================================================
@pytest.mark.parametrize("model", ["sd15", "sdxl", "flux"])
def test_diffusers_files_round_trip_and_load_in_both_formats(model, request, tmp_path):
    pipe = request.getfixturevalue(model)
    expected = diffusers_file(pipe, tmp_path / "a.safetensors", seed=9)
    diffusers_file(pipe, tmp_path / "b.safetensors", seed=10, alpha=3.0)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    out = merge_extract(tmp_path, files, "a", None, tmp_path / "o.safetensors")
    assert_same_deltas(read_diffusers(out), expected)
    base, original = forward(pipe), with_lora(pipe, tmp_path / "a.safetensors")
    assert_outputs_match(original, with_delta(pipe, expected), base)
    assert_outputs_match(with_lora(pipe, out), original, base)
    kohya = api.extract(tmp_path / "share.safetensors", tmp_path / "k.safetensors", task="a", format="kohya")[0].path
    if model != "flux":  # a Flux kohya file fuses linear1, which diffusers reads only at Flux-dev's widths
        assert_outputs_match(with_lora(pipe, kohya), original, base)


def test_a_diffusers_file_without_metadata_has_scale_one(sd15, tmp_path):
    expected = diffusers_file(sd15, tmp_path / "a.safetensors", seed=11, alpha=RANK)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(tmp_path / "bare.safetensors"))
    out = merge_extract(tmp_path, [tmp_path / "bare.safetensors"], "bare", None, tmp_path / "o.safetensors")
    assert_same_deltas(read_diffusers(out), expected)


def test_kohya_without_alpha_means_alpha_equals_rank(sd15, tmp_path):
    expected = kohya_sd(sd15, tmp_path / "a.safetensors", seed=12, alpha=None, conv=False)
    out = merge_extract(tmp_path, [tmp_path / "a.safetensors"], "a", "diffusers", tmp_path / "o.safetensors")
    assert_same_deltas(read_diffusers(out), expected)


# == refusals: one clear line, no output ===========================================================
def one_file(tmp_path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


LYCORIS_AND_DORA = {
    "loha": ({"lora_unet_a_to_q.hada_w1_a": torch.ones(2, 2), "lora_unet_a_to_q.hada_w1_b": torch.ones(2, 2)}, "LoHa"),
    "lokr": ({"lora_unet_a_to_q.lokr_w1": torch.ones(2, 2), "lora_unet_a_to_q.lokr_w2": torch.ones(2, 2)}, "LoKr"),
    "lora_mid": (
        {
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 4, 1, 1),
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": torch.ones(2, 2, 3, 3),
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(4, 2, 1, 1),
        },
        "lora_mid",
    ),
    "dora": (
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(4, 2),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale": torch.ones(1, 4),
        },
        "DoRA",
    ),
}


@pytest.mark.parametrize("kind", list(LYCORIS_AND_DORA))
def test_lycoris_and_dora_files_are_refused_in_one_line_and_nothing_is_written(kind, tmp_path):
    tensors, word = LYCORIS_AND_DORA[kind]
    path = one_file(tmp_path, tensors)
    result = CliRunner().invoke(app, ["merge", str(path), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and word in line and str(path) in line and "Traceback" not in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_a_diffusers_dora_file_is_refused(tmp_path):
    path = one_file(
        tmp_path,
        {
            "unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3),
            "unet.conv_in.lora_B.weight": torch.ones(32, 2, 1, 1),
            "unet.conv_in.lora_magnitude_vector": torch.ones(32),
        },
    )
    with pytest.raises(BadAdapterError, match="DoRA"):
        open_adapters([str(path)])


def test_an_unmappable_key_is_named(tmp_path):
    path = one_file(
        tmp_path,
        {
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(2, 4, 3, 3),
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(4, 2, 1, 1),
            "lora_unet_down_blocks_0_resnets_0_frobnicator.lora_down.weight": torch.ones(2, 4),
            "lora_unet_down_blocks_0_resnets_0_frobnicator.lora_up.weight": torch.ones(4, 2),
        },
    )
    with pytest.raises(BadAdapterError, match="lora_unet_down_blocks_0_resnets_0_frobnicator.lora_down.weight"):
        open_adapters([str(path)])


def test_a_stray_tensor_in_a_kohya_file_is_named(tmp_path):
    path = one_file(
        tmp_path,
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(4, 2),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.scale": torch.ones(()),
        },
    )
    with pytest.raises(BadAdapterError, match=r"lora_te_text_model_encoder_layers_0_mlp_fc1\.scale"):
        open_adapters([str(path)])


def test_sd15_and_sdxl_loras_together_are_refused_naming_both(sd15, sdxl, tmp_path):
    kohya_sd(sd15, tmp_path / "sd15.safetensors", seed=1, conv=False)
    kohya_sd(sdxl, tmp_path / "sdxl.safetensors", seed=2, conv=False)
    with pytest.raises(IncompatibleAdaptersError, match=r"SDXL LoRA but .*sd15.safetensors is a SD 1.x"):
        api.merge([str(tmp_path / "sd15.safetensors"), str(tmp_path / "sdxl.safetensors")], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_flux_and_sdxl_loras_together_are_refused(flux, sdxl, tmp_path):
    kohya_flux(flux, tmp_path / "f.safetensors", seed=1)
    diffusers_file(sdxl, tmp_path / "x.safetensors", seed=2)
    with pytest.raises(IncompatibleAdaptersError, match="different base models"):
        api.merge([str(tmp_path)], tmp_path / "o.safetensors")


# == the report and the command line ==============================================================
def test_info_says_which_format_each_task_came_from(sdxl, tmp_path):
    kohya_sd(sdxl, tmp_path / "k.safetensors", seed=1, sgm=True, conv=False)
    diffusers_file(sdxl, tmp_path / "d.safetensors", seed=2)
    api.merge([str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors")], tmp_path / "c.safetensors")
    result = CliRunner().invoke(app, ["info", str(tmp_path / "c.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    tasks = {t["task"]: t for t in json.loads(result.output)["tasks"]}
    assert tasks["k"]["format"] == "kohya" and tasks["d"]["format"] == "diffusers"


def test_cli_extract_all_writes_each_task_in_its_own_format_and_on_request_in_another(sd15, tmp_path):
    kohya_sd(sd15, tmp_path / "k.safetensors", seed=1, conv=False)
    diffusers_file(sd15, tmp_path / "d.safetensors", seed=2)
    ckpt = tmp_path / "c.safetensors"
    api.merge([str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors")], ckpt)
    run = CliRunner().invoke
    result = run(app, ["extract", str(ckpt), "--all", "-o", str(tmp_path / "all"), "--json"])
    assert result.exit_code == 0, result.output
    paths = {r["task"]: Path(r["path"]) for r in json.loads(result.output)}
    assert paths == {"k": tmp_path / "all/k/k.safetensors", "d": tmp_path / "all/d/pytorch_lora_weights.safetensors"}
    with safe_open(str(paths["k"]), framework="pt") as f:
        assert any(k.endswith(".alpha") for k in f.keys()) and "ss_network_dim" in f.metadata()
    with safe_open(str(paths["d"]), framework="pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    result = run(
        app, ["extract", str(ckpt), "--task", "d", "--format", "kohya", "-o", str(tmp_path / "d-kohya.safetensors")]
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "d-kohya.safetensors"), framework="pt") as f:
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())


def test_extracting_a_text_to_image_task_as_peft_is_refused_in_one_line(sd15, tmp_path):
    kohya_sd(sd15, tmp_path / "k.safetensors", seed=1, conv=False)
    api.merge([str(tmp_path / "k.safetensors")], tmp_path / "c.safetensors")
    result = CliRunner().invoke(
        app, ["extract", str(tmp_path / "c.safetensors"), "--task", "k", "--format", "peft", "-o", str(tmp_path / "p")]
    )
    assert result.exit_code == 2 and "--format kohya" in result.output and not (tmp_path / "p").exists()


def test_an_existing_output_file_is_kept_without_force(sd15, tmp_path):
    kohya_sd(sd15, tmp_path / "k.safetensors", seed=1, conv=False)
    api.merge([str(tmp_path / "k.safetensors")], tmp_path / "c.safetensors")
    (tmp_path / "o.safetensors").write_bytes(b"keep")
    result = CliRunner().invoke(
        app, ["extract", str(tmp_path / "c.safetensors"), "--task", "k", "-o", str(tmp_path / "o.safetensors")]
    )
    assert result.exit_code == 2 and (tmp_path / "o.safetensors").read_bytes() == b"keep"


def test_extraction_is_byte_identical_across_runs(sdxl, tmp_path):
    kohya_sd(sdxl, tmp_path / "k.safetensors", seed=1, sgm=True)
    api.merge([str(tmp_path / "k.safetensors")], tmp_path / "c.safetensors")
    a = api.extract(tmp_path / "c.safetensors", tmp_path / "a.safetensors", task="k")[0].path.read_bytes()
    b = api.extract(tmp_path / "c.safetensors", tmp_path / "b.safetensors", task="k")[0].path.read_bytes()
    assert a == b


@pytest.mark.parametrize(("dtype", "name", "tol"), [(torch.float16, "F16", 3e-3), (torch.bfloat16, "BF16", 2e-2)])
def test_half_precision_kohya_files_round_trip_within_their_rounding_at_the_default_dtype(
    sd15, tmp_path, dtype, name, tol
):
    expected = kohya_sd(sd15, tmp_path / "a.safetensors", seed=1, dtype=dtype)
    kohya_sd(sd15, tmp_path / "b.safetensors", seed=2, dtype=dtype)
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    out = merge_extract(tmp_path, files, "a", None, tmp_path / "o.safetensors", ConsolidationConfig(k=10_000))
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {name}
    assert_same_deltas(read_kohya(out, kohya_names_sd(expected, False)), expected, tol=tol)


def test_the_pipeline_components_are_ordinary_modules_of_the_checkpoint(sdxl, tmp_path):
    kohya_sd(sdxl, tmp_path / "k.safetensors", seed=1, conv=False)
    summary = api.merge([str(tmp_path / "k.safetensors")], tmp_path / "c.safetensors", FULL)
    from share_convert.checkpoint import Checkpoint

    names = list(Checkpoint(tmp_path / "c.safetensors").modules)
    assert any(n.startswith("unet.") for n in names) and any(n.startswith("text_encoder_2.text_model.") for n in names)
    assert summary["totals"]["max_error"] < 1e-6
    assert math.isfinite(summary["totals"]["ratio"])


def test_the_originals_size_counts_each_tensor_of_a_fused_flux_file_once(flux, tmp_path):
    kohya_flux(flux, tmp_path / "a.safetensors", seed=1)
    summary = api.merge([str(tmp_path / "a.safetensors")], tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        lora_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys() if not k.endswith(".alpha"))
    assert summary["tasks"][0]["original_bytes"] == lora_bytes


@pytest.mark.parametrize(
    "key",
    [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
    ],
    ids=["attention-processor", "lora.down"],
)
def test_older_diffusers_layouts_are_refused_in_one_line(key, tmp_path):
    path = one_file(tmp_path, {key: torch.ones(2, 32), key.replace("down", "up"): torch.ones(32, 2)})
    result = CliRunner().invoke(app, ["merge", str(path), "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert str(path) in result.output and key in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_two_tensor_pairs_for_one_module_are_refused(tmp_path):
    # the same SDXL module in both namings: diffusers' down_blocks.1.attentions.0 is SGM's input_blocks.4.1
    pair = {"lora_down.weight": torch.ones(2, 64), "lora_up.weight": torch.ones(64, 2)}
    tensors = {}
    for name in ("down_blocks_1_attentions_0_proj_in", "input_blocks_4_1_proj_in"):
        tensors.update({f"lora_unet_{name}.{k}": v.clone() for k, v in pair.items()})
    with pytest.raises(BadAdapterError, match="both adapt module unet.down_blocks.1.attentions.0.proj_in"):
        open_adapters([str(one_file(tmp_path, tensors))])


def test_a_fused_flux_module_whose_rows_do_not_split_is_refused(tmp_path):
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 32),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(95, 2),
    }
    with pytest.raises(BadAdapterError, match="do not split"):
        open_adapters([str(one_file(tmp_path, tensors))])


def test_a_kohya_lora_added_to_a_checkpoint_comes_back_as_kohya(sd15, tmp_path):
    kohya_sd(sd15, tmp_path / "a.safetensors", seed=1)
    expected = kohya_sd(sd15, tmp_path / "b.safetensors", seed=2)
    api.merge([str(tmp_path / "a.safetensors")], tmp_path / "c.safetensors", FULL)
    api.add(tmp_path / "c.safetensors", [str(tmp_path / "b.safetensors")], tmp_path / "c2.safetensors", FULL)
    out = api.extract(tmp_path / "c2.safetensors", tmp_path / "b-out.safetensors", task="b")[0].path
    assert_same_deltas(read_kohya(out, kohya_names_sd(expected, False)), expected)


# == PEFT adapters of a UNet, mixed with kohya and diffusers files ==================================
def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=states, return_dict=False)[0]


def test_a_peft_unet_adapter_merges_with_kohya_files_and_comes_back_in_any_format(sd15, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(
        r=RANK, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    peft_unet = get_peft_model(copy.deepcopy(sd15.unet), config)
    peft_unet.save_pretrained(str(tmp_path / "peft-unet"))
    original = unet_output(peft_unet.base_model.model)
    kohya_sd(sd15, tmp_path / "k.safetensors", seed=1)
    api.merge([str(tmp_path / "peft-unet"), str(tmp_path / "k.safetensors")], tmp_path / "c.safetensors", FULL)

    out = api.extract(tmp_path / "c.safetensors", tmp_path / "back", task="peft-unet")[0].path  # as it came: PEFT
    loaded = PeftModel.from_pretrained(copy.deepcopy(sd15.unet), str(out)).base_model.model
    assert (original - unet_output(sd15.unet)).abs().max() > 1e-3
    assert torch.allclose(unet_output(loaded), original, atol=2e-4, rtol=1e-4)

    diff = api.extract(tmp_path / "c.safetensors", tmp_path / "d.safetensors", task="peft-unet", format="diffusers")[
        0
    ].path
    p = copy.deepcopy(sd15)
    p.load_lora_weights(str(diff), adapter_name="x")
    assert torch.allclose(unet_output(p.unet), original, atol=2e-4, rtol=1e-4)


def test_a_peft_unet_adapter_of_another_base_is_refused(sd15, sdxl, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(copy.deepcopy(sd15.unet), LoraConfig(r=2, target_modules=["to_q"])).save_pretrained(
        str(tmp_path / "p")
    )
    kohya_sd(sdxl, tmp_path / "x.safetensors", seed=1, conv=False)
    with pytest.raises(IncompatibleAdaptersError):
        api.merge([str(tmp_path / "p"), str(tmp_path / "x.safetensors")], tmp_path / "o.safetensors")
