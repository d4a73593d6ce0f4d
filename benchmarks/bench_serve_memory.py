"""Serving memory and mixed-batch time on the default precision plan: the Share runtime (kept quantized or
dequantized at load) against PEFT, side by side in one run (issue 27).

Two sets of tasks on a GPT-2-sized model (GPT2Config defaults, random weights, 12 layers × 768):

- ``real``: the nine real GPT-2 adapters of the test data (``gpt2-c_attn``: 5, ``gpt2-c_attn+c_proj``: 4),
  their heads left out (LoRA tensors only, so that PEFT and the runtime hold the same thing);
- ``planted``: ``--tasks`` synthetic adapters on every ``attn.c_attn`` (r = 8) with a planted shared
  subspace of rank 16 (share_convert.io.synthetic).

Each set is merged twice: with the default options (``precision="auto"``: the precision planner's
default plan, what ``share-convert merge`` writes) and with ``precision="float"`` (every factor float32,
the plan before precisions). Served, per set:

- ``peft``: every adapter loaded in one PeftModel, a mixed batch with ``adapter_names=``;
- ``float_plan``: the float checkpoint;
- ``default``: the default plan's checkpoint dequantized at load (``keep_quantized=False``), and
  ``default_kept``: the same checkpoint held as its codes (``keep_quantized=True``: bases,
  coefficients and private rows stay int8/NF4, each call dequantizes what it uses, per layer);
- stand-ins, labelled so: the float plan rewritten with every factor as int8 (``int8_all``) or NF4
  (``nf4_all``) codes (tests/builders/quantized.requantize), dequantized and ``*_kept``: they exercise
  a precision the default plan may not pick for a set (NF4 everywhere).

Memory: adapter tensor bytes (PEFT: every ``lora_`` parameter; runtime: ``memory_report().adapters``).
Time: a mixed batch of ``--rows`` rows × ``--seq`` tokens, the rows cycling over the tasks; the time
above the bare base model per round, median over ``--repeat`` rounds taking the variants in turn (one
intra-op thread); for the whole forward pass and for one injected layer (``h.0.attn.c_attn``) alone.
The machine is shared with other processes: read the ratios, not the seconds.

    python benchmarks/bench_serve_memory.py --work /tmp/bench-serve-memory --out benchmarks/results/serve-memory-default-plan.json
"""

from __future__ import annotations

import argparse
import json
import os
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


#: variant -> (checkpoint, keep_quantized)
VARIANTS = {
    "float_plan": ("float", False),
    "default": ("default", False),
    "default_kept": ("default", True),
    "int8_all": ("int8_all", False),
    "int8_all_kept": ("int8_all", True),
    "nf4_all": ("nf4_all", False),
    "nf4_all_kept": ("nf4_all", True),
}
#: kept variant -> the same checkpoint dequantized at load (the unquantized runtime it is compared with)
KEPT_OVER = {"default_kept": "default", "int8_all_kept": "int8_all", "nf4_all_kept": "nf4_all"}


def plan_of(path: Path) -> dict:
    """The stored plan: per role, the precisions it is stored at (modules counted), and k_B."""
    from share_convert.checkpoint.reader import Checkpoint

    roles: dict[str, dict[str, int]] = {}
    with Checkpoint(path) as ckpt:
        for module in ckpt.modules:
            for role, precision in ckpt.module(module).precision.items():
                roles.setdefault(role, {}).setdefault(precision, 0)
                roles[role][precision] += 1
        k = sorted({info["k_B"] for info in ckpt.modules.values()})
        return {"roles": roles, "k_B": k, "stored_factor_bytes": ckpt.storage_by_precision()}


def run_set(kind: str, a: argparse.Namespace) -> dict:
    work = Path(a.work) / kind
    paths = adapters(kind, work, a.tasks)
    sources = [str(p) for p in paths]
    ckpts = {"default": work / "default.safetensors", "float": work / "float.safetensors"}
    t = time.perf_counter()
    report = merge(open_adapters(sources), ckpts["default"], ConsolidationConfig(), force=True)
    merge_s = time.perf_counter() - t
    merge(open_adapters(sources), ckpts["float"], ConsolidationConfig(precision="float"), force=True)
    for precision in ("int8", "nf4"):
        ckpts[f"{precision}_all"] = requantize(ckpts["float"], work / f"{precision}_all.safetensors", precision)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50257, (a.rows, a.seq), generator=gen)
    out: dict = {
        "tasks": len(paths),
        "default_merge_seconds": round(merge_s, 1),
        "default_plan": plan_of(ckpts["default"]),
        "mean_delta_w_error_default_plan": statistics.mean(
            rec["error"] for info in report["modules"].values() for rec in info["tasks"].values()
        ),
    }
    with torch.no_grad():
        models = {"base": base_model(), "peft": peft_with(paths)}
        for name, (ckpt, keep) in VARIANTS.items():
            models[name] = ShareModel.from_checkpoint(base_model(), ckpts[ckpt], keep_quantized=keep)
        tasks = models["default"].tasks
        rows = [tasks[i % len(tasks)] for i in range(a.rows)]
        peft_bytes = sum(p.numel() * p.element_size() for n, p in models["peft"].named_parameters() if "lora_" in n)
        memory: dict = {"peft_lora_bytes": peft_bytes}
        for name in VARIANTS:
            r = models[name].memory_report()
            memory[name] = {
                "adapters": r.adapters,
                "by_role": r.by_role,
                "coefficient_padding": r.coefficient_padding,
                "peft_over_this": peft_bytes / r.adapters,
            }
        out["memory"] = memory

        def call(name: str):
            if name == "base":
                return lambda: models["base"](input_ids=ids)
            if name == "peft":
                return lambda: models["peft"](input_ids=ids, adapter_names=rows)
            return lambda: models[name](input_ids=ids, task=rows)

        names = ["base", "peft", *VARIANTS]
        whole = timed({n: call(n) for n in names}, a.repeat)["cpu"]
        x = torch.randn(a.rows, a.seq, SIZE["n_embd"], generator=gen)
        layers = {n: models[n].base_model.transformer.h[0].attn.c_attn for n in VARIANTS}
        peft_layer = models["peft"].base_model.model.transformer.h[0].attn.c_attn

        def layer_call(name: str):
            if name == "base":
                return lambda: layers["default"].base_layer(x)
            if name == "peft":
                return lambda: peft_layer(x, adapter_names=rows)

            def run() -> None:
                with models[name].use(rows):
                    layers[name](x)

            return run

        one = timed({n: layer_call(n) for n in names}, a.layer_repeat)["cpu"]
        y = {n: models[n](input_ids=ids, task=rows).logits for n in VARIANTS}
        y["peft"] = models["peft"](input_ids=ids, adapter_names=rows).logits

    def above(times: dict[str, list[float]]) -> dict[str, float]:
        return {
            n: statistics.median(t - b for t, b in zip(ts, times["base"])) for n, ts in times.items() if n != "base"
        }

    def spread(times: dict[str, list[float]], name: str) -> list[float]:
        """The quartiles of a variant's time above the base model over the rounds (the noise)."""
        diffs = sorted(t - b for t, b in zip(times[name], times["base"]))
        q = statistics.quantiles(diffs, n=4)
        return [q[0], q[2]]

    whole_above, one_above = above(whole), above(one)
    out["time"] = {
        "unit": "CPU seconds of this thread above the base model, median of rounds",
        "rounds": {"whole_forward": a.repeat, "one_layer": a.layer_repeat},
        "whole_forward": whole_above,
        "one_layer": one_above,
        "one_layer_quartiles": {n: spread(one, n) for n in names if n != "base"},
        "kept_over_dequantized": {
            "one_layer": {k: one_above[k] / one_above[v] for k, v in KEPT_OVER.items()},
            "whole_forward": {k: whole_above[k] / whole_above[v] for k, v in KEPT_OVER.items()},
        },
        "over_peft_one_layer": {n: one_above[n] / one_above["peft"] for n in VARIANTS},
        "base_forward_seconds_median": statistics.median(whole["base"]),
    }
    out["outputs"] = {
        "float_plan_vs_peft": float((y["float_plan"] - y["peft"]).norm() / y["peft"].norm()),
        "default_vs_peft": float((y["default"] - y["peft"]).norm() / y["peft"].norm()),
        **{f"{k}_vs_{v}": float((y[k] - y[v]).norm() / y[v].norm()) for k, v in KEPT_OVER.items()},
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=32, help="planted tasks")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--layer-repeat", type=int, default=100)
    p.add_argument("--sets", default="real,planted")
    p.add_argument("--work", default="/tmp/bench-serve-memory")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": 1,
            "note": "shared with other sessions (2 cores); CPU only, no GPU lent",
            "load_average_start": os.getloadavg(),
        },
        "batch": {"rows": a.rows, "tokens_per_row": a.seq},
    }
    for kind in a.sets.split(","):
        results[kind] = run_set(kind, a)
    results["machine"]["load_average_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
