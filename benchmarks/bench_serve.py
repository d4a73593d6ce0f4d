"""Serving mixed-task batches: the Share runtime against PEFT's mixed-adapter batches (issues 14 and 25).

A GPT-2-sized model (GPT2Config defaults: 12 layers, 768 wide, random weights) and synthetic
adapters on every ``attn.c_attn`` (Conv1D, 2304 × 768, r = 8) with a planted shared subspace
(``share_convert.io.synthetic``; ``--families N``: N families of adapters, each from its own planted
subspace, merged with ``groups=N`` so that each module holds one basis per family). The adapters are
merged once into a Share checkpoint (default options: 5% mean ΔW error target) and every task is
extracted back as a PEFT adapter; both sides serve the same extracted tasks, so their outputs are
compared too.

- Throughput: one forward pass of a batch of ``--rows`` rows × ``--seq`` tokens whose rows cycle
  over ``--serve`` tasks, with those tasks loaded on both sides: PEFT with ``adapter_names=``,
  the runtime with ``task=[...]``. Also the base model alone, and the runtime with one task for
  the whole batch and with that task merged. One warm-up, then ``--repeat`` rounds taking the
  variants in turn, under ``torch.no_grad()``; one intra-op thread by default (``--threads``).
  Each call is timed in wall time and in this thread's CPU time (``time.thread_time``): with one
  intra-op thread torch computes in the calling thread, so CPU time leaves out the time other
  processes of a shared machine take the core away, which wall time counts.
- Overhead: the time a variant takes above the bare base model, per round (the variant's call minus
  the base model's call of the same round), median over the rounds; and the runtime's overhead over
  PEFT's (target: ≤ 0.5). Given for the whole forward pass and for one injected layer alone
  (``--layer-repeat`` rounds), where the adapter's own cost is not buried under the base model's.
- Memory with ``--tasks`` tasks loaded: the bytes of the adapter tensors held (PEFT: every
  ``lora_`` parameter; runtime: ``memory_report().adapters``: bases, coefficients, private factors,
  heads, slot maps); and, whole process, three fresh processes that build the base model and load
  nothing / the PEFT adapters / the Share tasks (``--load``), each measured for its peak resident
  memory (``measure.py``) and its resident memory once loaded.

    python benchmarks/bench_serve.py --tasks 32 --serve 32 --work /tmp/bench-serve --out benchmarks/results/serve-32.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2ForSequenceClassification

sys.path.insert(0, str(Path(__file__).parent))
from measure import measure  # noqa: E402

from share_convert import ShareModel, api  # noqa: E402
from share_convert.engine import ConsolidationConfig, merge  # noqa: E402
from share_convert.io import (
    open_adapters,  # noqa: E402
    write_synthetic_adapters,  # noqa: E402
)


def rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def timed(calls: dict[str, Callable[[], object]], repeat: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each call of each variant: one warm-up each, then ``repeat`` rounds taking
    the variants in turn, so that load from other processes falls on all of them alike."""
    for call in calls.values():
        call()
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in calls}, "cpu": {n: [] for n in calls}}
    for _ in range(repeat):
        for name, call in calls.items():
            t, c = time.perf_counter(), time.thread_time()
            call()
            times["cpu"][name].append(time.thread_time() - c)
            times["wall"][name].append(time.perf_counter() - t)
    return times


def fastest(times: dict[str, list[float]]) -> dict[str, float]:
    """The fastest call of each variant: load from other processes only ever adds time."""
    return {name: min(ts) for name, ts in times.items()}


def overhead(times: dict[str, list[float]], peft: str = "peft_mixed", share: str = "share_mixed") -> dict:
    """Each variant's time above the base model's: per round (its call minus the base model's call of the
    same round), median over the rounds; and the runtime's overhead over PEFT's."""
    above = {
        name: statistics.median(t - b for t, b in zip(ts, times["base"]))
        for name, ts in times.items()
        if name != "base"
    }
    best = fastest(times)
    return {
        "seconds_above_base_median_of_rounds": above,
        "seconds_above_base_fastest": {n: best[n] - best["base"] for n in above},
        "share_over_peft_median_of_rounds": above[share] / above[peft],
        "share_over_peft_fastest": (best[share] - best["base"]) / (best[peft] - best["base"]),
    }


#: The model's size: GPT-2's by default; ``--layers``/``--hidden`` shrink it for smoke tests.
SIZE = {"n_layer": 12, "n_embd": 768}


def base_model() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(**SIZE, pad_token_id=0, num_labels=2)).eval()


def peft_with(adapters: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(base_model(), str(adapters[0]), adapter_name=adapters[0].name)
    for path in adapters[1:]:
        model.load_adapter(str(path), adapter_name=path.name)
    return model.eval()


def load_only(kind: str, work: Path, count: int) -> None:
    """Build the base model and load ``count`` tasks with ``kind``; print the resident memory then."""
    model = base_model()
    tasks = sorted(p.name for p in (work / "extracted").iterdir())[:count]
    if kind == "peft":
        model = peft_with([work / "extracted" / t for t in tasks])
    elif kind == "share":
        model = ShareModel.from_checkpoint(model, work / "share.safetensors", tasks=tasks)
    gc.collect()
    print(json.dumps({"rss_loaded": rss()}))


def whole_process(kind: str, work: Path, count: int) -> dict:
    size = ["--layers", str(SIZE["n_layer"]), "--hidden", str(SIZE["n_embd"])]
    run = measure([sys.executable, __file__, "--load", kind, "--work", str(work), "--tasks", str(count), *size])
    if run.returncode:
        raise subprocess.CalledProcessError(run.returncode, run.command, run.stdout, run.stderr)
    return {"peak_rss_mb": run.peak_rss_mb, "rss_loaded_mb": json.loads(run.stdout)["rss_loaded"] / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=100, help="tasks loaded for the memory comparison")
    p.add_argument("--serve", type=int, default=32, help="tasks in the mixed batch (and loaded for throughput)")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--shared-rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--layer-repeat", type=int, default=30)
    p.add_argument("--layers", type=int, default=12, help="GPT-2 layers (12: GPT-2's size)")
    p.add_argument(
        "--hidden", type=int, default=768, help="GPT-2 width, a multiple of its 12 heads (768: GPT-2's size)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--mixed-only", action="store_true", help="time only the base model and the two mixed batches (whole forward)"
    )
    p.add_argument(
        "--families",
        type=int,
        default=1,
        help="planted subspaces, one family of adapters each (>1: merged with groups)",
    )
    p.add_argument("--work", default="/tmp/share-bench-serve")
    p.add_argument("--out")
    p.add_argument("--load", choices=["base", "peft", "share"], help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    SIZE.update(n_layer=a.layers, n_embd=a.hidden)
    if a.load:
        return load_only(a.load, work, a.tasks)
    if not a.out:
        p.error("--out is required")
    cfg = GPT2Config(**SIZE)
    modules = {f"transformer.h.{i}.attn.c_attn": (3 * cfg.n_embd, cfg.n_embd) for i in range(cfg.n_layer)}
    paths = []
    for family in range(a.families):  # tasks of family f: every f-th (so that a mixed batch holds them all)
        paths += write_synthetic_adapters(
            work / "adapters",
            count=len(range(family, a.tasks, a.families)),
            rank=a.rank,
            shared_rank=a.shared_rank,
            modules=modules,
            fan_in_fan_out=True,
            task_type=None,
            base_model="gpt2",
            seed=family,
            prefix=f"family{family}-task" if a.families > 1 else "task",
        )
    ckpt = work / "share.safetensors"
    config = ConsolidationConfig(groups=str(a.families)) if a.families > 1 else ConsolidationConfig()
    t = time.perf_counter()
    report = merge(open_adapters([str(p) for p in paths]), ckpt, config, force=True)
    merge_s = time.perf_counter() - t
    extracted = [r.path for r in api.extract(ckpt, work / "extracted", all_tasks=True, force=True)]
    if a.families > 1:  # interleave the families, so that the tasks served cover every group
        by_family = [[p for p in extracted if p.name.startswith(f"family{f}-")] for f in range(a.families)]
        extracted = [p for group in zip(*by_family) for p in group]
    tasks = [r.name for r in extracted]
    mean_error = statistics.mean(rec["error"] for info in report["modules"].values() for rec in info["tasks"].values())

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (a.rows, a.seq), generator=gen)
    rows = [tasks[i % a.serve] for i in range(a.rows)]
    results: dict = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": a.threads},
        "setup": {
            "model": f"GPT2ForSequenceClassification(GPT2Config({SIZE})) random weights",
            "parameters": sum(p.numel() for p in base_model().parameters()),
            "modules": f"{len(modules)} × attn.c_attn (Conv1D {3 * cfg.n_embd}×{cfg.n_embd})",
            "adapters": {"count": a.tasks, "rank": a.rank, "planted_shared_rank": a.shared_rank},
            "batch": {"rows": a.rows, "tokens_per_row": a.seq, "tasks_in_batch": a.serve},
            "merge_seconds": round(merge_s, 2),
            "checkpoint_mean_delta_w_error": mean_error,
            "k": sorted({info["k_B"] for info in report["modules"].values()}),
            "families": a.families,
            "groups_k": sorted(
                {tuple(g["k_B"] for g in info.get("groups", [])) for info in report["modules"].values()}
            ),
        },
    }

    with torch.no_grad():
        # throughput, `serve` tasks loaded on both sides; the merged runtime on its own copy of the model
        m = {
            "peft": peft_with(extracted[: a.serve]),
            "share": ShareModel.from_checkpoint(base_model(), ckpt, tasks=tasks[: a.serve]),
            "merged": ShareModel.from_checkpoint(base_model(), ckpt, tasks=tasks[:1]),
            "base": base_model(),
        }
        m["merged"].merge(tasks[0])
        calls = {
            "base": lambda: m["base"](input_ids=ids),
            "peft_mixed": lambda: m["peft"](input_ids=ids, adapter_names=rows),
            "share_mixed": lambda: m["share"](input_ids=ids, task=rows),
            "share_one_task": lambda: m["share"](input_ids=ids, task=tasks[0]),
            "share_merged": lambda: m["merged"](input_ids=ids),
        }
        if a.mixed_only:  # more rounds in the same time for the overhead of mixed batches
            calls = {name: calls[name] for name in ("base", "peft_mixed", "share_mixed")}
        seconds = timed(calls, a.repeat)
        # one injected layer alone (transformer.h.0.attn.c_attn) on hidden states of the batch's shape:
        # the adapter's own cost, which the whole forward pass buries under the base model's
        x = torch.randn(a.rows, a.seq, cfg.n_embd, generator=gen)
        peft_layer = m["peft"].base_model.model.transformer.h[0].attn.c_attn
        share_layer = m["share"].base_model.transformer.h[0].attn.c_attn

        def share_mixed_layer() -> None:
            with m["share"].use(rows):
                share_layer(x)

        layer_seconds = timed(
            {
                "base": lambda: share_layer.base_layer(x),
                "peft_mixed": lambda: peft_layer(x, adapter_names=rows),
                "share_mixed": share_mixed_layer,
            },
            a.layer_repeat,
        )
        y_peft = m["peft"](input_ids=ids, adapter_names=rows).logits
        y_share = m["share"](input_ids=ids, task=rows).logits
        m.clear()
        gc.collect()
    tokens = a.rows * a.seq
    wall, cpu, layer_wall, layer_cpu = seconds["wall"], seconds["cpu"], layer_seconds["wall"], layer_seconds["cpu"]
    best, layer_best = fastest(wall), fastest(layer_wall)
    results["throughput"] = {
        "unit": "tokens per second, one forward pass, fastest of the rounds (wall time)",
        "tokens_per_second": {name: tokens / s for name, s in best.items()},
        "share_mixed_over_peft_mixed": best["peft_mixed"] / best["share_mixed"],
        "seconds_fastest": best,
        "seconds_median": {name: statistics.median(ts) for name, ts in wall.items()},
        "seconds_all": wall,
        "cpu_seconds_all": cpu,
        "logits_relative_difference_share_vs_peft": float((y_share - y_peft).norm() / y_peft.norm()),
        "one_layer_seconds_fastest": layer_best,
        "one_layer_seconds_median": {name: statistics.median(ts) for name, ts in layer_wall.items()},
        "one_layer_adapter_seconds": {
            "peft_mixed": layer_best["peft_mixed"] - layer_best["base"],
            "share_mixed": layer_best["share_mixed"] - layer_best["base"],
        },
        "one_layer_seconds_all": layer_wall,
        "one_layer_cpu_seconds_all": layer_cpu,
    }
    results["overhead"] = {
        "note": "time above the bare base model; 'cpu' is this thread's CPU time, 'wall' includes waiting for a core",
        "whole_forward": {"cpu": overhead(cpu), "wall": overhead(wall)},
        "one_layer": {"cpu": overhead(layer_cpu), "wall": overhead(layer_wall)},
    }

    # memory, `tasks` tasks loaded
    peft = peft_with(extracted[: a.tasks])
    peft_bytes = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n)
    del peft
    memory = ShareModel.from_checkpoint(base_model(), ckpt, tasks=tasks[: a.tasks]).memory_report()
    processes = {kind: whole_process(kind, work, a.tasks) for kind in ("base", "peft", "share")}
    results["memory"] = {
        "tasks": a.tasks,
        "peft_lora_tensor_bytes": peft_bytes,
        "share_adapter_bytes": memory.adapters,
        "ratio": peft_bytes / memory.adapters,
        "share_report": memory.as_dict(),
        "whole_process_mb": processes,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
