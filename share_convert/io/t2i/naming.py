"""Module names of text-to-image LoRAs: the canonical (diffusers) names, kohya's '_'-joined names,
SDXL's SGM UNet naming and Flux's BFL naming, each mapped both ways."""

from __future__ import annotations

import re

T2I_FORMATS = ("kohya", "diffusers")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
#: metadata values longer than this (tag frequencies, dataset folders) are not kept in the manifest
MAX_METADATA_VALUE = 4096

# -- canonical module names ----------------------------------------------------------------------
# Identifiers that contain '_' in diffusers / transformers module paths; kohya joins path parts
# with '_', so a kohya name is split back by matching these first (longest first).
_WORDS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks",
        "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "proj_in", "proj_out", "proj_mlp", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj",
        "k_proj", "v_proj", "out_proj", "text_projection", "ff_context", "norm1_context", "norm_out",
        "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "guidance_embedder",
        "text_embedder", "wi_0", "wi_1",
    },
    key=lambda w: -w.count("_"),
)  # fmt: skip
_RESNET = r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)"
_ATTN = (
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
)
GRAMMAR = {
    "unet": re.compile(
        r"^(conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]|"
        rf"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.({_RESNET}|{_ATTN}|(down|up)samplers\.0\.conv))$"
    ),
    "text_encoder": re.compile(
        r"^(text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|text_projection|"
        r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo)))$"
    ),
    "transformer": re.compile(
        r"^(x_embedder|context_embedder|proj_out|norm_out\.linear|"
        r"time_text_embed\.(timestep|guidance|text)_embedder\.linear_[12]|"
        r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|"
        r"ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)|"
        r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear))$"
    ),
}
GRAMMAR["text_encoder_2"] = GRAMMAR["text_encoder"]

# Flux: BFL (kohya) module → the diffusers modules it holds, in the order of its output rows.
# A part of None rows is the rest of the rows; "swap" exchanges the two halves (shift, scale).
FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",  # rows (shift, scale) in BFL, (scale, shift) in diffusers
}
SWAPPED = {"norm_out.linear"}


def underscored_to_path(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` → ``down_blocks.0.attentions.0.proj_in`` (kohya's '_' joins)."""
    parts = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for word in _WORDS:
            n = word.count("_") + 1
            if "_".join(parts[i : i + n]) == word:
                out.append(word)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


# SDXL's SGM (original Stability) UNet naming. Layout of SDXL: 2 layers per down block (3 with
# the downsampler), 3 per up block; up blocks 0 and 1 have attentions, so their upsampler is at index 2.
_SGM_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_RESNET_INV = {v: k for k, v in _SGM_RESNET.items()}
_SGM_FIXED = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
_SGM_FIXED_INV = {underscored_to_path(v): k for k, v in _SGM_FIXED.items()}
_SGM_LAYERS = 2
_SGM_UP_ATTENTION = (0, 1)


def is_sgm(name: str) -> bool:
    return name.startswith(("input_blocks_", "middle_block_", "output_blocks_")) or name in _SGM_FIXED


def sgm_to_underscored(name: str) -> str | None:
    """An SGM UNet name (kohya SDXL) as its diffusers name with '_' joins; None when it has no mapping."""
    if name in _SGM_FIXED:
        return _SGM_FIXED[name]

    def resnet(rest: str) -> str | None:
        return _SGM_RESNET.get(rest)

    m = re.match(r"^input_blocks_(\d+)_(\d+)_(.+)$", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = (i - 1) // (_SGM_LAYERS + 1), (i - 1) % (_SGM_LAYERS + 1)
        if i < 1:
            return None
        if layer == _SGM_LAYERS:
            return f"down_blocks_{block}_downsamplers_0_conv" if (j, rest) == (0, "op") else None
        if j == 0:
            r = resnet(rest)
            return f"down_blocks_{block}_resnets_{layer}_{r}" if r else None
        return f"down_blocks_{block}_attentions_{layer}_{rest}" if j == 1 else None
    m = re.match(r"^middle_block_(\d+)_(.+)$", name)
    if m:
        i, rest = int(m[1]), m[2]
        if i == 1:
            return f"mid_block_attentions_0_{rest}"
        r = resnet(rest)
        return f"mid_block_resnets_{i // 2}_{r}" if r and i in (0, 2) else None
    m = re.match(r"^output_blocks_(\d+)_(\d+)_(.+)$", name)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = i // (_SGM_LAYERS + 1), i % (_SGM_LAYERS + 1)
        if rest == "conv" and j in (1, 2):
            return f"up_blocks_{block}_upsamplers_0_conv"
        if j == 0:
            r = resnet(rest)
            return f"up_blocks_{block}_resnets_{layer}_{r}" if r else None
        return f"up_blocks_{block}_attentions_{layer}_{rest}" if j == 1 else None
    return None


def path_to_sgm(path: str) -> str:
    """The inverse of :func:`sgm_to_underscored` for a diffusers UNet path (SDXL layout)."""
    if path in _SGM_FIXED_INV:
        return _SGM_FIXED_INV[path]
    u = path.replace(".", "_")
    m = re.match(r"^(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)$", u)
    if m:
        side, b, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if side == "down":
            i = b * (_SGM_LAYERS + 1) + layer + 1
            if kind == "downsamplers":
                return f"input_blocks_{b * (_SGM_LAYERS + 1) + _SGM_LAYERS + 1}_0_op"
            if kind == "resnets":
                return f"input_blocks_{i}_0_{_SGM_RESNET_INV[rest]}"
            return f"input_blocks_{i}_1_{rest}"
        i = b * (_SGM_LAYERS + 1) + layer
        if kind == "upsamplers":
            j = 2 if b in _SGM_UP_ATTENTION else 1
            return f"output_blocks_{b * (_SGM_LAYERS + 1) + _SGM_LAYERS}_{j}_conv"
        if kind == "resnets":
            return f"output_blocks_{i}_0_{_SGM_RESNET_INV[rest]}"
        return f"output_blocks_{i}_1_{rest}"
    m = re.match(r"^mid_block_(resnets|attentions)_(\d+)_(.+)$", u)
    if m:
        if m[1] == "attentions":
            return f"middle_block_1_{m[3]}"
        return f"middle_block_{2 * int(m[2])}_{_SGM_RESNET_INV[m[3]]}"
    return u


def kohya_prefix(component: str, base: str) -> str:
    """The kohya prefix of a component's modules (``lora_unet_``, ``lora_te1_`` …) for a base."""
    if component in ("unet", "transformer"):
        return "lora_unet_"
    if component == "text_encoder_2":
        return "lora_te2_"
    return "lora_te1_" if base in ("sdxl", "flux") else "lora_te_"
