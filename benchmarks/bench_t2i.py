"""SDXL-shaped kohya LoRAs at scale: merge, then extract one back as kohya, whole processes.

The LoRAs are kohya ``.safetensors`` files with the module names and shapes of the real SDXL
UNet and its two text encoders (built on torch's meta device from SDXL's configuration, so no
weights are allocated or downloaded; needs diffusers, which is a test-only extra): UNet
attention (attn1/attn2 q/k/v/out, ff, proj_in/out), UNet convolutions (resnet conv1/conv2/
conv_shortcut 3×3 and 1×1, down/upsamplers; kohya's "conv_dim") and every linear layer of both
text encoders, in SGM block naming as kohya's SDXL trainer writes it. Each LoRA's update in a
module has a planted shared part, ΔW_i = U C_i Vᵀ + noise (U, V fixed per module, C_i per LoRA),
as a collection of LoRAs trained from one base and style family would.

It measures (wall time and peak resident memory from wait4, per whole process):
reading every tensor once (the floor for any tool), ``share-convert merge`` with its defaults,
and ``share-convert extract --format kohya`` of one task; then the report's mean ΔW error and
the stored sizes. ``--modules`` keeps a subset of the modules (a regex on the diffusers path)
when the full set would not fit the machine's time.

Example (the issue's setting):

    python benchmarks/bench_t2i.py --count 100 --rank 32 --work /tmp/t2i-bench --out benchmarks/results/t2i.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

from share_convert.io import path_to_sgm  # noqa: E402

HERE = Path(__file__).parent
READ_ONCE = """
import sys
from pathlib import Path
from safetensors import safe_open
total = 0
for p in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(p), framework="pt") as f:
        for key in f.keys():
            total += f.get_tensor(key).numel()
print(total)
"""


def sdxl_modules() -> list[tuple[str, tuple[int, ...]]]:
    """(kohya name, weight shape) of every module a kohya SDXL LoRA with conv layers adapts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):  # SDXL base 1.0's unet/config.json and text encoders' configs
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
        te1 = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
            )
        )
    out = []
    for name, m in unet.named_modules():
        attention = isinstance(m, torch.nn.Linear) and "attentions" in name
        conv = isinstance(m, torch.nn.Conv2d) and ("resnets" in name or "samplers" in name)
        if attention or conv:
            out.append((name, "lora_unet_" + path_to_sgm(name), tuple(m.weight.shape)))
    for prefix, te in (("lora_te1_", te1), ("lora_te2_", te2)):
        for name, m in te.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                path = name if name.startswith("text_model.") else "text_model." + name
                out.append((path, prefix + path.replace(".", "_"), tuple(m.weight.shape)))
    return [(lora, shape) for path, lora, shape in out if KEEP.search(path)]


KEEP = re.compile("")


def write_loras(folder: Path, modules, count: int, rank: int, shared: int, noise: float, seed: int) -> None:
    """``count`` kohya files, one at a time; U, V of each module are regenerated from its seed."""
    folder.mkdir(parents=True, exist_ok=True)
    alpha = rank / 2
    for i in range(count):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
        tensors = {}
        for j, (lora, shape) in enumerate(modules):
            n, d = shape[0], math.prod(shape[1:])
            gm = torch.Generator().manual_seed(seed * 7919 + j)
            U = torch.randn(n, shared, generator=gm) / math.sqrt(n)
            V = torch.randn(d, shared, generator=gm) / math.sqrt(d)
            B = U @ torch.randn(shared, rank, generator=g) + noise * torch.randn(n, rank, generator=g) / math.sqrt(n)
            A = (
                V @ torch.randn(shared, rank, generator=g) + noise * torch.randn(d, rank, generator=g) / math.sqrt(d)
            ).T
            down = A.reshape(rank, *shape[1:]) if len(shape) == 4 else A
            up = B.reshape(n, rank, 1, 1) if len(shape) == 4 else B
            tensors[f"{lora}.lora_down.weight"] = down.to(torch.float16).contiguous()
            tensors[f"{lora}.lora_up.weight"] = (up / (alpha / rank)).to(torch.float16).contiguous()
            tensors[f"{lora}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        from safetensors.torch import save_file

        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)}),
            "ss_base_model_version": "sdxl_base_v1-0",
        }
        save_file(tensors, str(folder / f"style-{i:03d}.safetensors"), metadata=meta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--shared-rank", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--modules", default="", help="keep only modules whose diffusers path matches this regex")
    p.add_argument("--work", default="/tmp/t2i-bench")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    global KEEP
    KEEP = re.compile(a.modules)
    modules = sdxl_modules()
    work = Path(a.work)
    pool = work / "loras"
    if pool.exists():
        shutil.rmtree(pool)
    write_loras(pool, modules, a.count, a.rank, a.shared_rank, a.noise, seed=0)
    files = sorted(pool.glob("*.safetensors"))
    row: dict = {
        "loras": len(files),
        "modules_per_lora": len(modules),
        "conv_modules": sum(len(s) == 4 for _, s in modules),
        "rank": a.rank,
        "dtype": "float16",
        "input_bytes": sum(f.stat().st_size for f in files),
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "platform": platform.platform()},
        "command": " ".join(sys.argv),
    }
    r = measure([sys.executable, "-c", READ_ONCE, str(pool)])
    assert r.returncode == 0, r.stderr
    row["read_once"] = r.summary()
    sc = [sys.executable, "-m", "share_convert.cli"]
    ckpt = work / "share.safetensors"
    r = measure([*sc, "merge", str(pool), "-o", str(ckpt), "--force", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    row["merge"] = {
        **r.summary(),
        "mean_error": rep["totals"]["mean_error"],
        "max_error": rep["totals"]["max_error"],
        "checkpoint_bytes": ckpt.stat().st_size,
        "ratio": rep["totals"]["ratio"],
        "modules_by_kind": rep["plan"]["modules_by_kind"],
    }
    out = work / "style-000-extracted.safetensors"
    r = measure([*sc, "extract", str(ckpt), "--task", "style-000", "-o", str(out), "--force"])
    assert r.returncode == 0, r.stderr
    row["extract_kohya"] = {**r.summary(), "bytes": out.stat().st_size}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
