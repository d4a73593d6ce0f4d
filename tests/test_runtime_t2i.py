"""Serving text-to-image tasks: one task per image in a batch, proven against diffusers' own loader.

Tiny SD 1.5-like, SDXL-like and Flux-like pipelines are built from configs (tests/builders/pipelines.py),
kohya LoRA files are written from their real module names (conv layers included), merged into a
checkpoint and extracted back; each row of a mixed batch served by the runtime must equal the same
input run alone through a copy of the pipeline with that row's extracted task loaded by diffusers'
``load_lora_weights``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("diffusers")

from share_convert import ConsolidationConfig, ShareModel, api  # noqa: E402
from share_convert.checkpoint import Checkpoint  # noqa: E402
from share_convert.engine import merge  # noqa: E402
from share_convert.errors import InvalidOptionError, ModelMismatchError, ShareError  # noqa: E402
from share_convert.io import open_adapters, write_synthetic_adapters  # noqa: E402
from share_convert.runtime.layers import ShareLayer  # noqa: E402

from .builders.pipelines import flux_pipe, kohya_flux, kohya_sd, sd15_pipe, sdxl_pipe  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
FULL = ConsolidationConfig(k=10_000, dtype="float32")  # every task in the shared bases (conv layers included)
TASKS = ["t0", "t1", "t2"]


@dataclass
class Served:
    """A base pipeline (never changed), a checkpoint of its LoRAs and each task extracted back."""

    pipe: Any
    checkpoint: Path
    extracted: dict[str, Path]
    loaded: dict[str | None, Any] = field(default_factory=dict)

    def runtime(self, part: Callable[[Any], Any] | None = None, **kwargs: Any) -> tuple[Any, ShareModel]:
        """A copy of the pipeline (or of its component ``part``) and a ShareModel serving it."""
        served = copy.deepcopy(self.pipe if part is None else part(self.pipe))
        return served, ShareModel.from_checkpoint(served, self.checkpoint, **kwargs)

    def alone(self, task: str | None, run: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """``run`` on a copy of the pipeline with ``task`` loaded by diffusers' ``load_lora_weights``
        (None: the base pipeline); one copy per task, kept for the module's tests."""
        if task not in self.loaded:
            pipe = copy.deepcopy(self.pipe)
            if task is not None:
                pipe.load_lora_weights(str(self.extracted[task]), adapter_name="x")
            self.loaded[task] = pipe
        with torch.no_grad():
            return run(self.loaded[task])


def serve(tmp: Path, pipe: Any, write: Callable[..., Any], config: ConsolidationConfig) -> Served:
    files = []
    for i, task in enumerate(TASKS):
        write(pipe, tmp / f"{task}.safetensors", seed=i)
        files.append(tmp / f"{task}.safetensors")
    api.merge([str(f) for f in files], tmp / "share.safetensors", config, force=True)
    # diffusers' layout: its kohya-Flux reader assumes Flux-dev's widths, which the tiny Flux lacks
    written = api.extract(tmp / "share.safetensors", tmp / "extracted", all_tasks=True, format="diffusers", force=True)
    return Served(pipe, tmp / "share.safetensors", {r.task: r.path for r in written})


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return serve(tmp_path_factory.mktemp("sd15"), sd15_pipe(), kohya_sd, FULL)


@pytest.fixture(scope="module")
def sd15_private(tmp_path_factory, sd15):
    """The same LoRAs at the default error target: independent random LoRAs are held as private factors.
    Their tasks are the same ΔW as ``sd15``'s, so that fixture's diffusers runs serve as references."""
    served = serve(tmp_path_factory.mktemp("sd15p"), sd15.pipe, kohya_sd, ConsolidationConfig())
    with Checkpoint(served.checkpoint) as ckpt:
        assert all(info["k_B"] == 0 for info in ckpt.modules.values())
    served.loaded = sd15.loaded
    return served


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return serve(tmp_path_factory.mktemp("sdxl"), sdxl_pipe(), kohya_sd, FULL)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return serve(tmp_path_factory.mktemp("flux"), flux_pipe(), kohya_flux, ConsolidationConfig(k=6, dtype="float32"))


def assert_rows_match(batch: torch.Tensor, alone: list[torch.Tensor], base: torch.Tensor) -> None:
    """Row i of ``batch`` equals ``alone[i]``; the tasks change the output (else nothing is proven)."""
    for i, y in enumerate(alone):
        assert torch.allclose(batch[i], y[0], atol=2e-5, rtol=1e-4), (i, float((batch[i] - y[0]).abs().max()))
    assert all((a[0] - base[0]).abs().max() > 1e-2 for a in alone[:2]), "a task that changes nothing proves nothing"


# -- inputs of each component ----------------------------------------------------------------------
G = torch.Generator().manual_seed(0)
SAMPLE, TEXT = torch.randn(3, 4, 8, 8, generator=G), torch.randn(3, 7, 32, generator=G)
IDS = torch.randint(3, 1000, (3, 7), generator=G)
FLUX_IN = {
    "hidden_states": torch.randn(3, 16, 4, generator=G),
    "encoder_hidden_states": torch.randn(3, 7, 32, generator=G),
    "pooled_projections": torch.randn(3, 32, generator=G),
    "timestep": torch.full((3,), 0.5),
}


def unet(rows: slice = slice(None)) -> Callable[[Any], torch.Tensor]:
    return lambda p: p.unet(SAMPLE[rows], 10, encoder_hidden_states=TEXT[rows], return_dict=False)[0]


def flux_transformer(rows: slice = slice(None)) -> Callable[[Any], torch.Tensor]:
    def run(p: Any) -> torch.Tensor:
        inputs = {k: v[rows] for k, v in FLUX_IN.items()}
        ids = {"img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(7, 3)}
        return p.transformer(**inputs, **ids, return_dict=False)[0]

    return run


def one(i: int) -> slice:
    return slice(i, i + 1)


# == one task per row ==============================================================================
@pytest.mark.parametrize("held", ["sd15", "sd15_private"])
def test_each_row_of_a_unet_batch_equals_diffusers_with_its_task(held, request):
    served = request.getfixturevalue(held)  # shared bases, or private factors only: both paths, conv layers too
    _, model = served.runtime(lambda p: p.unet)
    with torch.no_grad():
        batch = model(SAMPLE, 10, encoder_hidden_states=TEXT, return_dict=False, task=["t0", "t1", None])[0]
    alone = [served.alone(t, unet(one(i))) for i, t in enumerate(["t0", "t1", None])]
    assert_rows_match(batch, alone, served.alone(None, unet(one(0))))


def test_each_row_of_a_flux_transformer_batch_equals_diffusers_with_its_task(flux):
    transformer, model = flux.runtime(lambda p: p.transformer)
    with model.use(["t2", "t0", "t1"]), torch.no_grad():
        batch = flux_transformer()(SimpleNamespace(transformer=transformer))
    alone = [flux.alone(t, flux_transformer(one(i))) for i, t in enumerate(["t2", "t0", "t1"])]
    assert_rows_match(batch, alone, flux.alone(None, flux_transformer(one(0))))


def test_a_pipeline_serves_its_text_encoders_loras_too(sdxl):
    pipe, model = sdxl.runtime()
    with model.use(["t1", "t2", None]), torch.no_grad():
        batch = [pipe.text_encoder(IDS).last_hidden_state, pipe.text_encoder_2(IDS).last_hidden_state]
    for encoder, got in zip(("text_encoder", "text_encoder_2"), batch):
        alone = [
            sdxl.alone(t, lambda p, i=i, e=encoder: getattr(p, e)(IDS[one(i)]).last_hidden_state)
            for i, t in enumerate(["t1", "t2", None])
        ]
        base = sdxl.alone(None, lambda p, e=encoder: getattr(p, e)(IDS[one(0)]).last_hidden_state)
        assert_rows_match(got, alone, base)


def test_a_whole_pipeline_with_guidance_gives_each_image_its_task(sd15):
    """``with model.use([...]): pipe(...)``: the UNet sees the doubled [uncond, cond] batch."""
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    negative = torch.zeros_like(TEXT)

    def generate(rows: slice) -> Callable[[Any], torch.Tensor]:
        return lambda p: (
            p(
                prompt_embeds=TEXT[rows],
                negative_prompt_embeds=negative[rows],
                latents=latents[rows],
                height=8,
                width=8,
                num_inference_steps=2,
                guidance_scale=5.0,
                output_type="latent",
            ).images
        )

    pipe, model = sd15.runtime()
    with model.use(["t1", None, "t0"]), torch.no_grad():
        images = generate(slice(None))(pipe)
    alone = [sd15.alone(t, generate(one(i))) for i, t in enumerate(["t1", None, "t0"])]
    for i, y in enumerate(alone):
        assert torch.allclose(images[i], y[0], atol=2e-5, rtol=1e-4), (i, float((images[i] - y[0]).abs().max()))
    assert (alone[0] - sd15.alone(None, generate(one(0)))).abs().max() > 1e-3


def test_a_task_list_applies_to_both_halves_of_a_guidance_batch(sd15):
    unet_, model = sd15.runtime(lambda p: p.unet)
    doubled = {"sample": torch.cat([SAMPLE, SAMPLE]), "encoder_hidden_states": torch.cat([TEXT, TEXT.flip(0)])}
    with torch.no_grad():
        with model.use(["t0", "t1", "t2"]):
            halves = unet_(timestep=10, **doubled, return_dict=False)[0]
        rows = model(timestep=10, **doubled, return_dict=False, task=["t0", "t1", "t2"] * 2)[0]
    assert torch.equal(halves, rows)


def test_a_task_list_for_neither_the_batch_nor_its_double_is_refused(sd15):
    unet_, model = sd15.runtime(lambda p: p.unet)
    with pytest.raises(ShareError, match="rows for a batch of 2 tasks"), torch.no_grad(), model.use(["t0", "t1"]):
        unet_(SAMPLE, 10, encoder_hidden_states=TEXT, return_dict=False)


# == merging and components =========================================================================
def test_a_merged_task_with_conv_layers_gives_its_outputs_and_unmerge_restores_the_weights(sd15):
    unet_, model = sd15.runtime(lambda p: p.unet)
    before = sd15.pipe.unet.state_dict()
    with torch.no_grad():
        served = model(SAMPLE, 10, encoder_hidden_states=TEXT, return_dict=False, task="t2")[0]
        model.merge("t2")
        merged = model(SAMPLE, 10, encoder_hidden_states=TEXT, return_dict=False)[0]
    assert torch.allclose(merged, served, atol=2e-5, rtol=1e-4)
    model.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.unload().state_dict().items())


def test_serving_a_unet_leaves_the_text_encoders_loras_out(sd15):
    pipe = copy.deepcopy(sd15.pipe)
    model = ShareModel.from_checkpoint(pipe.unet, sd15.checkpoint)
    assert model.memory_report().modules == sum(isinstance(m, ShareLayer) for m in pipe.unet.modules()) > 0
    assert not any(isinstance(m, ShareLayer) for m in pipe.text_encoder.modules())


def test_unloading_a_pipeline_gives_each_component_its_own_modules_back(sd15):
    pipe = copy.deepcopy(sd15.pipe)
    originals = {(c, n): m for c in ("unet", "text_encoder") for n, m in getattr(pipe, c).named_modules()}
    model = ShareModel.from_checkpoint(pipe, sd15.checkpoint)
    assert any(isinstance(m, ShareLayer) for m in pipe.text_encoder.modules())
    assert model.unload() is pipe
    after = {(c, n): m for c in ("unet", "text_encoder") for n, m in getattr(pipe, c).named_modules()}
    assert after.keys() == originals.keys() and all(after[n] is m for n, m in originals.items())


def test_two_text_encoders_of_one_shape_need_the_component_named(sdxl):
    encoder = copy.deepcopy(sdxl.pipe.text_encoder_2)
    with pytest.raises(InvalidOptionError, match="component="):
        ShareModel.from_checkpoint(encoder, sdxl.checkpoint)
    model = ShareModel.from_checkpoint(encoder, sdxl.checkpoint, component="text_encoder_2")
    with torch.no_grad():
        got = model(IDS[one(0)], task="t1").last_hidden_state
    assert torch.allclose(got, sdxl.alone("t1", lambda p: p.text_encoder_2(IDS[one(0)]).last_hidden_state), atol=2e-5)


def test_a_component_the_checkpoint_does_not_adapt_is_refused_in_one_line(sd15, flux):
    with pytest.raises(ModelMismatchError, match="none of the components") as info:
        ShareModel.from_checkpoint(copy.deepcopy(flux.pipe.transformer), sd15.checkpoint)
    assert "\n" not in str(info.value)


def test_a_grouped_conv_layer_is_refused_in_one_line(sd15):
    unet_ = copy.deepcopy(sd15.pipe.unet)
    conv = unet_.down_blocks[0].resnets[0].conv1
    unet_.down_blocks[0].resnets[0].conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, groups=2)
    with pytest.raises(ModelMismatchError, match="groups=2") as info:
        ShareModel.from_checkpoint(unet_, sd15.checkpoint, component="unet")
    assert "\n" not in str(info.value)


# == grouped modules ================================================================================
@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """Two families of adapters from different planted subspaces: a checkpoint with two groups per module."""
    tmp = tmp_path_factory.mktemp("groups")
    for seed, prefix in ((1, "x"), (2, "y")):
        write_synthetic_adapters(
            tmp / "a", count=4, layers=1, hidden=96, rank=8, shared_rank=8, noise=0.001, seed=seed, prefix=prefix
        )
    merge(open_adapters([str(tmp / "a")]), tmp / "g.safetensors", ConsolidationConfig(target_error=0.02, groups="2"))
    return tmp / "g.safetensors"


def llama_like() -> nn.Module:
    torch.manual_seed(0)
    attn = nn.ModuleDict({"q_proj": nn.Linear(96, 96), "v_proj": nn.Linear(96, 96)})
    return nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"self_attn": attn})])})})


def flops(run: Callable[[], Any]) -> int:
    """The FLOPs ``run`` does, with grad enabled: the layers then add their Share part out of place, with
    products FlopCounterMode counts (it leaves out the in-place ``addmm_`` of inference; both paths
    compute the same pieces)."""
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        run()
    return counter.get_total_flops()


def test_each_row_of_a_grouped_module_pays_its_own_groups_k_only(grouped):
    model = ShareModel.from_checkpoint(llama_like(), grouped)
    layer = model.base_model["model"]["layers"][0]["self_attn"]["q_proj"]
    x_task, y_task = (
        next(t for t in model.tasks if t.startswith("x")),
        next(t for t in model.tasks if t.startswith("y")),
    )
    assert layer.factors.spans[model.tasks.index(x_task)][1:3] != layer.factors.spans[model.tasks.index(y_task)][1:3]
    h = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(0))

    def rows(tasks: list[str], x: torch.Tensor) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            with model.use(tasks):
                return layer(x)

        return run

    mixed = flops(rows([x_task, y_task], h))
    assert mixed == flops(rows([x_task], h[:1])) + flops(rows([y_task], h[1:]))
    with torch.no_grad():
        got = rows([x_task, y_task], h)()
        for i, t in enumerate([x_task, y_task]):
            assert torch.allclose(got[i], rows([t], h[one(i)])()[0], atol=1e-5)


def test_training_a_new_task_on_conv_layers_is_refused_in_one_line(sd15):
    _, model = sd15.runtime(lambda p: p.unet)
    with pytest.raises(InvalidOptionError, match="Conv2d") as info:
        model.add_task("new")
    assert "\n" not in str(info.value) and model.tasks == TASKS
