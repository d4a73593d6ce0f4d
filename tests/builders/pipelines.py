"""Tiny text-to-image pipelines and the LoRA files written from their modules.

SD 1.5-like, SDXL-like and Flux-like diffusers pipelines are built from diffusers / transformers
configs (random weights, nothing downloaded). The kohya and diffusers LoRA files are written from
the models' real module names and shapes with this module's own key conventions; each writer
returns the ΔW the file means per canonical module name (``component.path``), computed here from
the tensors written, never by the reader under test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .adapters import write_diffusers, write_kohya

RANK = 4  # the rank of every LoRA file written here (unless a writer is given another)


# -- tiny models ----------------------------------------------------------------------------------
def clip(cls=CLIPTextModel, seed=0, hidden=32):
    """A two-layer CLIP text encoder (hidden 32, vocabulary 1000) of class ``cls``, seeded with ``seed``."""
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return cls(cfg).eval()


def vae():
    """A one-block VAE with 4 latent channels."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def sd15_pipe() -> StableDiffusionPipeline:
    """An SD 1.5-like pipeline: a two-block UNet (cross-attention 32) and one CLIP text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=clip(),
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipe() -> StableDiffusionXLPipeline:
    """An SDXL-like pipeline: a two-block UNet with text-time embeddings and two CLIP text encoders."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,  # SDXL's, which the SGM block numbering depends on
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
    ).eval()
    return StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=clip(seed=1),
        text_encoder_2=clip(CLIPTextModelWithProjection, seed=2),
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=DDIMScheduler(),
    )


def flux_pipe() -> FluxPipeline:
    """A Flux-like pipeline: one double and one single transformer block and one CLIP text encoder."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(),
        text_encoder=clip(seed=3),
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def targets(model, text: bool) -> list[tuple[str, torch.nn.Module]]:
    """The modules a LoRA file adapts: every Linear (and, outside text encoders, Conv2d) but the embedders."""
    kinds = (torch.nn.Linear,) if text else (torch.nn.Linear, torch.nn.Conv2d)
    skip = ("time_embedding", "add_embedding", "conv_in", "conv_out", "embedder", "x_embedder", "proj_out")
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and (text or not name.startswith(skip)):
            out.append((name, mod))
    return out


def factors(mod: torch.nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) in the module's layout: a conv's down is r×in×kh×kw and its up out×r×1×1."""
    w = mod.weight
    if w.dim() == 4:
        return 0.3 * torch.randn(rank, *w.shape[1:], generator=g), 0.3 * torch.randn(
            w.shape[0], rank, 1, 1, generator=g
        )
    return 0.3 * torch.randn(rank, w.shape[1], generator=g), 0.3 * torch.randn(w.shape[0], rank, generator=g)


def delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · up @ down in float64, a conv's factors flattened (out × in·kh·kw)."""
    return scale * (up.double().flatten(1) @ down.double().flatten(1))


def sgm_names(unet) -> dict[str, str]:
    """diffusers UNet path → SGM name, by walking the model's blocks (SDXL numbering: 3 slots per block)."""
    table = {"conv_in": "input_blocks_0_0", "conv_out": "out_2"}
    res = {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    }
    for b, block in enumerate(unet.down_blocks):
        for i in range(len(block.resnets)):
            for k, v in res.items():
                table[f"down_blocks.{b}.resnets.{i}.{k}"] = f"input_blocks_{1 + 3 * b + i}_0_{v}"
            table[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks_{1 + 3 * b + i}_1"
        table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks_{3 + 3 * b}_0_op"
    for k, v in res.items():
        table[f"mid_block.resnets.0.{k}"] = f"middle_block_0_{v}"
        table[f"mid_block.resnets.1.{k}"] = f"middle_block_2_{v}"
    table["mid_block.attentions.0"] = "middle_block_1"
    for b, block in enumerate(unet.up_blocks):
        for i in range(len(block.resnets)):
            for k, v in res.items():
                table[f"up_blocks.{b}.resnets.{i}.{k}"] = f"output_blocks_{3 * b + i}_0_{v}"
            table[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks_{3 * b + i}_1"
        has_attn = getattr(block, "attentions", None) is not None
        table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks_{3 * b + 2}_{2 if has_attn else 1}_conv"
    return table


def to_sgm(path: str, table: dict[str, str]) -> str:
    """The SGM name of a diffusers UNet module path, by its longest prefix in ``table`` (:func:`sgm_names`)."""
    if path in table:
        return table[path]
    for n in (3, 4):  # mid_block.attentions.0, down_blocks.1.attentions.0
        head = ".".join(path.split(".")[:n])
        if head in table:
            return table[head] + "_" + path[len(head) + 1 :].replace(".", "_")
    raise AssertionError(path)


def kohya_sd(
    pipe, file: Path, *, seed: int, sgm: bool = False, conv: bool = True, alpha: float | None = 2.0, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """A kohya file over the UNet (attention, and conv layers when ``conv``) and the text encoder(s),
    in SGM block names when ``sgm``, without ``.alpha`` tensors when ``alpha`` is None.

    Returns the expected ΔW per canonical module name.
    """
    g = torch.Generator().manual_seed(seed)
    xl = isinstance(pipe, StableDiffusionXLPipeline)
    modules, expected = {}, {}
    table = sgm_names(pipe.unet) if sgm else {}
    parts = [("unet", pipe.unet, "lora_unet_")]
    parts.append(("text_encoder", pipe.text_encoder, "lora_te1_" if xl else "lora_te_"))
    if xl:
        parts.append(("text_encoder_2", pipe.text_encoder_2, "lora_te2_"))
    for component, model, prefix in parts:
        text = component != "unet"
        for name, mod in targets(model, text):
            if not conv and isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1):
                continue
            if text and "projection" in name:
                continue
            path = ("text_model." + name) if text and not name.startswith("text_model.") else name
            lora = prefix + (to_sgm(path, table) if sgm and not text else path.replace(".", "_"))
            down, up = factors(mod, RANK, g)
            modules[lora] = (down.to(dtype), up.to(dtype))
            a = alpha if alpha is not None else RANK
            expected[f"{component}.{path}"] = delta(down.to(dtype), up.to(dtype), a / RANK)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(alpha)}
    meta["ss_base_model_version"] = "sdxl_base_v1-0" if xl else "sd_v1"
    write_kohya(file, modules, alpha=None if alpha is None else torch.tensor(alpha, dtype=dtype), metadata=meta)
    return expected


FLUX_DOUBLE = {  # BFL name → (diffusers parts, rows of each part as multiples of hidden, with "rest")
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "txt_mod_lin": ["norm1_context.linear"],
}
FLUX_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}


def flux_modules(transformer, linear1: bool, final: bool = True) -> dict[str, list[str]]:
    """BFL kohya name → the diffusers paths whose rows it holds (in row order)."""
    out = {}
    for i in range(len(transformer.transformer_blocks)):
        for bfl, parts in FLUX_DOUBLE.items():
            out[f"double_blocks_{i}_{bfl}"] = [f"transformer_blocks.{i}.{p}" for p in parts]
    for i in range(len(transformer.single_transformer_blocks)):
        for bfl, parts in FLUX_SINGLE.items():
            if bfl == "linear1" and not linear1:
                continue
            out[f"single_blocks_{i}_{bfl}"] = [f"single_transformer_blocks.{i}.{p}" for p in parts]
    if final:
        out["final_layer_adaLN_modulation_1"] = ["norm_out.linear"]
    return out


def kohya_flux(pipe, path: Path, *, seed: int, linear1: bool = True, final: bool = True, alpha: float = 8.0):
    """A kohya Flux file (BFL names, fused qkv and linear1) plus the CLIP text encoder."""
    g = torch.Generator().manual_seed(seed)
    tr = pipe.transformer
    tensors, expected = {}, {}
    for bfl, parts in flux_modules(tr, linear1, final).items():
        mods = [tr.get_submodule(p) for p in parts]
        out = sum(m.weight.shape[0] for m in mods)
        down = 0.3 * torch.randn(RANK, mods[0].weight.shape[1], generator=g)
        up = 0.3 * torch.randn(out, RANK, generator=g)
        tensors[f"lora_unet_{bfl}.lora_down.weight"] = down
        tensors[f"lora_unet_{bfl}.lora_up.weight"] = up
        tensors[f"lora_unet_{bfl}.alpha"] = torch.tensor(alpha)
        full = delta(down, up, alpha / RANK)
        if bfl.startswith("final_layer_adaLN"):
            half = out // 2  # BFL stores (shift, scale); diffusers' norm_out wants (scale, shift)
            full = torch.cat([full[half:], full[:half]])
        row = 0
        for p, m in zip(parts, mods):
            expected[f"transformer.{p}"] = full[row : row + m.weight.shape[0]]
            row += m.weight.shape[0]
    for name, mod in targets(pipe.text_encoder, True):
        lora = "lora_te1_text_model_" + name.replace(".", "_")
        down, up = factors(mod, RANK, g)
        tensors[f"{lora}.lora_down.weight"], tensors[f"{lora}.lora_up.weight"] = down, up
        expected[f"text_encoder.text_model.{name}"] = delta(down, up, 1.0)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1", "ss_network_dim": str(RANK)})
    return expected


def diffusers_file(pipe, path: Path, *, seed: int, alpha: float = 8.0, rank: int = RANK) -> dict[str, torch.Tensor]:
    """A diffusers-format file (``unet.…lora_A.weight``) with its LoraConfig in ``lora_adapter_metadata``.

    Returns the expected ΔW per canonical module name.
    """
    g = torch.Generator().manual_seed(seed)
    flux = isinstance(pipe, FluxPipeline)
    parts = [
        ("transformer" if flux else "unet", pipe.transformer if flux else pipe.unet),
        ("text_encoder", pipe.text_encoder),
    ]
    if isinstance(pipe, StableDiffusionXLPipeline):
        parts.append(("text_encoder_2", pipe.text_encoder_2))
    modules, expected, meta = {}, {}, {}
    for component, model in parts:
        text = component.startswith("text")
        names = []
        for name, mod in targets(model, text):
            if text and "projection" in name:
                continue
            path_ = ("text_model." + name) if text and not name.startswith("text_model.") else name
            down, up = factors(mod, rank, g)
            modules[f"{component}.{path_}"] = (down, up)
            expected[f"{component}.{path_}"] = delta(down, up, alpha / rank)
            names.append(name)
        meta.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha, f"{component}.target_modules": names})
    write_diffusers(path, modules, lora_config=meta)
    return expected
