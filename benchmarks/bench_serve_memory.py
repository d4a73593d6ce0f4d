"""Serving memory and mixed-batch time: the Share runtime (ragged private factors, float or kept quantized)
against PEFT, side by side in one run (issue 27).

Two sets of tasks on a GPT-2-sized model (GPT2Config defaults, random weights, 12 layers × 768):

- ``real``: the nine real GPT-2 adapters of the test data (``gpt2-c_attn``: 5, ``gpt2-c_attn+c_proj``: 4),
  their heads left out (LoRA tensors only, so that PEFT and the runtime hold the same thing);
- ``planted``: ``--tasks`` synthetic adapters on every ``attn.c_attn`` (r = 8) with a planted shared
  subspace of rank 16 (share_convert.io.synthetic).

Each set is merged with the default options (the float plan: 5% mean ΔW error target), then rewritten
with every factor as int8 codes and as NF4 codes (tests/builders/quantized.requantize: the stand-in for
the precision planner's default plan, which is not merged yet). Served, per set:

- ``peft``: every adapter loaded in one PeftModel, a mixed batch with ``adapter_names=``;
- ``share``: the float checkpoint; ``int8`` / ``nf4``: the rewrites, dequantized at load;
  ``int8_kept`` / ``nf4_kept``: the rewrites with ``keep_quantized=True`` (private rows kept as codes,
  dequantized per call per layer; bases and coefficients are dequantized at load in this version).

Memory: adapter tensor bytes (PEFT: every ``lora_`` parameter; runtime: ``memory_report().adapters``).
Time: a mixed batch of ``--rows`` rows × ``--seq`` tokens, the rows cycling over the tasks; the time
above the bare base model per round, median over ``--repeat`` rounds taking the variants in turn (one
intra-op thread); for the whole forward pass and for one injected layer (``h.0.attn.c_attn``) alone.
The machine is shared with other processes: read the ratios, not the seconds.

Also, on the ``real`` set's float runtime, one layer: the ragged private factors applied task by task
on their rows (what the runtime does) against a gather with index tensors into the same store (per
row, zero-masked to the largest rank: ``bmm``), the alternative the issue asked to measure.

    python benchmarks/bench_serve_memory.py --work /tmp/bench-serve-memory --out benchmarks/results/serve-memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from bench_serve import SIZE, base_model, timed  # noqa: E402

from share_convert import ShareModel  # noqa: E402
from share_convert.engine import ConsolidationConfig, merge  # noqa: E402
from share_convert.io import open_adapters, write_synthetic_adapters  # noqa: E402
from tests.builders.quantized import requantize  # noqa: E402

REAL = Path("/work/shared/data/real-adapters")


def lora_only(source: Path, out: Path) -> Path:
    """A copy of a PEFT adapter with its LoRA tensors only (no heads, no task type)."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(modules_to_save=None, task_type=None)
    (out / "adapter_config.json").write_text(json.dumps(config))
    st = source / "adapter_model.safetensors"
    tensors = (
        load_file(st)
        if st.is_file()
        else torch.load(source / "adapter_model.bin", map_location="cpu", weights_only=True)
    )
    save_file({k: v.contiguous() for k, v in tensors.items() if "lora_" in k}, out / "adapter_model.safetensors")
    return out


def adapters(kind: str, work: Path, count: int) -> list[Path]:
    if kind == "real":
        sources = sorted(p for g in ("gpt2-c_attn", "gpt2-c_attn+c_proj") for p in (REAL / g).iterdir())
        return [lora_only(p, work / "adapters" / p.name) for p in sources]
    modules = {f"transformer.h.{i}.attn.c_attn": (3 * SIZE["n_embd"], SIZE["n_embd"]) for i in range(SIZE["n_layer"])}
    return write_synthetic_adapters(
        work / "adapters",
        count=count,
        rank=8,
        shared_rank=16,
        modules=modules,
        fan_in_fan_out=True,
        task_type=None,
        base_model="gpt2",
    )


def peft_with(paths: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(base_model(), str(paths[0]), adapter_name=paths[0].name)
    for path in paths[1:]:
        model.load_adapter(str(path), adapter_name=path.name)
    return model.eval()


def gathered(layer, x: torch.Tensor, task_of_row: list[int]) -> torch.Tensor:
    """The private part of ``layer``'s output gathered with index tensors from its ragged store: per row,
    its task's rows (zero-masked to the largest rank) and two ``bmm``."""
    f = layer.factors
    spans = [f.private_ranks.get(t, (0, 0)) for t in task_of_row]
    width = max(q for _, q in spans)
    offsets = torch.tensor([o for o, _ in spans])[:, None] + torch.arange(width)
    mask = (torch.arange(width) < torch.tensor([q for _, q in spans])[:, None]).to(x.dtype)
    index = offsets.clamp(max=f.private_A.rows - 1)
    A = f.private_A.values[index] * mask[..., None]  # (R, Q, d)
    Bt = f.private_Bt.values[index] * mask[..., None]  # (R, Q, n)
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), Bt)


def run_set(kind: str, a: argparse.Namespace) -> dict:
    work = Path(a.work) / kind
    paths = adapters(kind, work, a.tasks)
    ckpt = work / "share.safetensors"
    t = time.perf_counter()
    report = merge(open_adapters([str(p) for p in paths]), ckpt, ConsolidationConfig(), force=True)
    merge_s = time.perf_counter() - t
    for precision in ("int8", "nf4"):
        requantize(ckpt, work / f"{precision}.safetensors", precision)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50257, (a.rows, a.seq), generator=gen)
    out: dict = {
        "tasks": len(paths),
        "merge_seconds": round(merge_s, 1),
        "k_B": sorted({info["k_B"] for info in report["modules"].values()}),
        "mean_delta_w_error": statistics.mean(
            rec["error"] for info in report["modules"].values() for rec in info["tasks"].values()
        ),
    }
    with torch.no_grad():
        models = {"base": base_model(), "peft": peft_with(paths)}
        for name, path, keep in (
            ("share", ckpt, False),
            ("int8", work / "int8.safetensors", False),
            ("int8_kept", work / "int8.safetensors", True),
            ("nf4", work / "nf4.safetensors", False),
            ("nf4_kept", work / "nf4.safetensors", True),
        ):
            models[name] = ShareModel.from_checkpoint(base_model(), path, keep_quantized=keep)
        tasks = models["share"].tasks
        rows = [tasks[i % len(tasks)] for i in range(a.rows)]
        peft_bytes = sum(p.numel() * p.element_size() for n, p in models["peft"].named_parameters() if "lora_" in n)
        memory = {"peft_lora_bytes": peft_bytes}
        for name in ("share", "int8", "int8_kept", "nf4", "nf4_kept"):
            r = models[name].memory_report()
            memory[name] = {"adapters": r.adapters, "held": r.held, "peft_over_this": peft_bytes / r.adapters}
        out["memory"] = memory

        def call(name: str):
            if name == "base":
                return lambda: models["base"](input_ids=ids)
            if name == "peft":
                return lambda: models["peft"](input_ids=ids, adapter_names=rows)
            return lambda: models[name](input_ids=ids, task=rows)

        names = ["base", "peft", "share", "int8", "int8_kept", "nf4_kept"]
        whole = timed({n: call(n) for n in names}, a.repeat)["cpu"]
        x = torch.randn(a.rows, a.seq, SIZE["n_embd"], generator=gen)
        layers = {n: models[n].base_model.transformer.h[0].attn.c_attn for n in names[2:]}
        peft_layer = models["peft"].base_model.model.transformer.h[0].attn.c_attn

        def layer_call(name: str):
            if name == "base":
                return lambda: layers["share"].base_layer(x)
            if name == "peft":
                return lambda: peft_layer(x, adapter_names=rows)

            def run() -> None:
                with models[name].use(rows):
                    layers[name](x)

            return run

        calls = {n: layer_call(n) for n in names}
        f = layers["share"].factors
        if f.private_ranks and not f.spans:  # private only: the gather alternative on the same store
            ids_of_rows = [tasks.index(t) for t in rows]
            calls["share_gather"] = lambda: layers["share"].base_layer(x) + gathered(layers["share"], x, ids_of_rows)
            with models["share"].use(rows):
                segmented = layers["share"](x) - layers["share"].base_layer(x)
            out["gather_equals_segments"] = float((gathered(layers["share"], x, ids_of_rows) - segmented).abs().max())
        one = timed(calls, a.layer_repeat)["cpu"]
        y = {n: models[n](input_ids=ids, task=rows).logits for n in ("share", "int8", "int8_kept", "nf4", "nf4_kept")}
        y["peft"] = models["peft"](input_ids=ids, adapter_names=rows).logits

    def above(times: dict[str, list[float]]) -> dict[str, float]:
        return {
            n: statistics.median(t - b for t, b in zip(ts, times["base"])) for n, ts in times.items() if n != "base"
        }

    whole_above, one_above = above(whole), above(one)
    out["time"] = {
        "unit": "CPU seconds of this thread above the base model, median of rounds",
        "whole_forward": whole_above,
        "one_layer": one_above,
        "kept_over_dequantized": {
            "whole_forward_int8": whole_above["int8_kept"] / whole_above["int8"],
            "one_layer_int8": one_above["int8_kept"] / one_above["int8"],
            "one_layer_nf4": one_above["nf4_kept"] / one_above["int8"],
        },
        "share_over_peft_one_layer": one_above["share"] / one_above["peft"],
        "base_forward_seconds_median": statistics.median(whole["base"]),
    }
    out["outputs"] = {
        "share_vs_peft": float((y["share"] - y["peft"]).norm() / y["peft"].norm()),
        "int8_kept_vs_int8": float((y["int8_kept"] - y["int8"]).norm() / y["int8"].norm()),
        "nf4_kept_vs_nf4": float((y["nf4_kept"] - y["nf4"]).norm() / y["nf4"].norm()),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=32, help="planted tasks")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--layer-repeat", type=int, default=30)
    p.add_argument("--sets", default="real,planted")
    p.add_argument("--work", default="/tmp/bench-serve-memory")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    results = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1, "note": "shared"},
        "batch": {"rows": a.rows, "tokens_per_row": a.seq},
    }
    for kind in a.sets.split(","):
        results[kind] = run_set(kind, a)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
