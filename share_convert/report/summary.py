"""Reports: what a checkpoint holds, how faithful it is, and what it saves (spec, section 4).

:func:`summarize` turns a checkpoint into plain data (the ``--json`` output), with the sentences
that judge it (:func:`why`, :func:`verdict`); share_convert.report.render draws that data as rich
tables. ``merge`` and ``info`` use the same two functions, so they always show the same figures.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from ..checkpoint.reader import Checkpoint

#: A task whose ‖ΔW‖ in a module is at most this fraction of the largest task's there counts as zero
#: in that module (float32 rounding of an untouched lora_B leaves exact zeros; 1e-7 is far below
#: any trained adapter).
ZERO_NORM_RTOL = 1e-7
#: Above these, the report warns that the checkpoint is a poor copy of the adapters.
LARGE_MEAN_ERROR = 0.10
LARGE_MAX_ERROR = 0.50
#: The operations after which the planner's alternatives describe the whole checkpoint.
FULL_PLAN_OPS = ("merge", "remove+refit")


#: The role of a checkpoint tensor, from the last part of its name (format versions 1 to 3; a
#: chain's rotations count with the coefficients they rotate, its row ranges with the records).
ROLES = {
    "basis_B": "bases",
    "basis_A": "bases",
    "gram_B": "grams",
    "gram_A": "grams",
    "coef_B": "coefficients",
    "coef_A": "coefficients",
    "coefs_B": "coefficients",
    "coefs_A": "coefficients",
    "rotations_B": "coefficients",
    "rotations_A": "coefficients",
    "private_B": "private",
    "private_A": "private",
}
STORAGE_ROLES = ("bases", "grams", "coefficients", "private", "heads", "records")


#: Suffix of the tensor that holds a quantized factor's per-block scales (format version 4).
SCALES = ".scales"
#: The LoRA data: what bits per stored number are counted over.
FACTOR_ROLES = ("bases", "coefficients", "private")


def storage_role(name: str) -> str:
    """bases, grams, coefficients, private (LoRA data), heads, or records (the per-(task, module)
    figures of format version 2). A quantized factor's scales count with the factor."""
    if name.startswith("records/"):
        return "records"
    if name.startswith("tasks/") and "/heads/" in name:
        return "heads"
    return ROLES.get(name.removesuffix(SCALES).rsplit("/", 1)[-1], "records")


def stored_numbers(ckpt: Checkpoint) -> dict[str, tuple[str, int, int]]:
    """Per tensor of the file: (precision, numbers it holds, bytes it takes), a quantized factor's
    codes and scales together under the factor's name (its numbers: the values the codes stand for)."""
    out: dict[str, tuple[str, int, int]] = {}
    names = ckpt.manifest.get("tensors", {})
    for name in names:
        if name.endswith(SCALES) and ckpt.code_precision(name.removesuffix(SCALES)) is not None:
            continue  # counted with its codes
        out[name] = ckpt.stored_size(name)
    return out


def storage_breakdown(
    ckpt: Checkpoint, numbers: dict[str, tuple[str, int, int]] | None = None
) -> dict[str, dict[str, int]]:
    """Parameters (numbers stored) and bytes of the checkpoint's tensors by role, from the file's header."""
    parts = {k: {"params": 0, "bytes": 0} for k in STORAGE_ROLES}
    for name, (_precision, count, size) in (numbers or stored_numbers(ckpt)).items():
        role = storage_role(name)
        parts[role]["params"] += count
        parts[role]["bytes"] += size
    return parts


def precision_breakdown(ckpt: Checkpoint, numbers: dict[str, tuple[str, int, int]]) -> dict[str, Any]:
    """The LoRA data (bases, coefficients, private factors) by precision, and bits per stored number
    overall and per module (scales included: what each number really costs)."""
    by_precision: dict[str, dict[str, Any]] = {}
    per_module: dict[str, list[int]] = {}
    for name, (precision, count, size) in numbers.items():
        if storage_role(name) not in FACTOR_ROLES:
            continue
        entry = by_precision.setdefault(precision, {"numbers": 0, "bytes": 0})
        entry["numbers"] += count
        entry["bytes"] += size
        module = module_of(name, ckpt.modules)
        if module is not None:
            acc = per_module.setdefault(module, [0, 0])
            acc[0] += count
            acc[1] += size
    for entry in by_precision.values():
        entry["bits_per_number"] = 8 * entry["bytes"] / entry["numbers"] if entry["numbers"] else 0.0
    total_numbers = sum(e["numbers"] for e in by_precision.values())
    total_bytes = sum(e["bytes"] for e in by_precision.values())
    return {
        "bits_per_number": 8 * total_bytes / total_numbers if total_numbers else 0.0,
        "by_precision": dict(sorted(by_precision.items())),
        "modules": {m: 8 * b / n if n else 0.0 for m, (n, b) in per_module.items()},
    }


def module_of(name: str, modules: dict[str, Any]) -> str | None:
    """The module a factor tensor belongs to (``modules/<module>/…`` or ``modules/<module>/g<j>/…``)."""
    if not name.startswith("modules/"):
        return None
    head = name[len("modules/") :].rsplit("/", 1)[0]
    if head in modules:
        return head
    parent = head.rsplit("/", 1)[0]
    return parent if parent in modules else None


def _task_statistics(ckpt: Checkpoint) -> tuple[list[dict[str, Any]], set[str], dict[str, int]]:
    """Per task: modules, mean and worst error, bounds and ranks over its modules; the zero-ΔW
    tasks; each module's total private rank. Computed on the record tables (tasks × modules
    arrays), so that ``info`` on thousands of tasks × hundreds of modules stays fast."""
    import numpy as np

    from ..checkpoint.records import FLOAT, INT

    ints, floats = ckpt.record_tables()
    present = ints[:, :, INT["position"]] >= 0
    count = present.sum(1)
    norm = np.where(present, floats[:, :, FLOAT["norm"]], 0.0)
    error = np.where(present, floats[:, :, FLOAT["error"]], 0.0)
    mean_error = error.sum(1) / np.maximum(count, 1)
    max_error = error.max(1, initial=0.0)
    bound = (present & (ints[:, :, INT["bound"]] > 0)).any(1)
    # zero ΔW: at most ZERO_NORM_RTOL of the largest norm in every module the task has
    top = norm.max(0, initial=0.0)
    nonzero = (present & (norm > ZERO_NORM_RTOL * top[None, :])).any(1)
    zero = present.any(1) & ~nonzero
    ranks = {}
    for part, key in (("original", "original_rank"), ("shared", "rank"), ("private", "private_rank")):
        values = ints[:, :, INT[key]].astype(np.int64)
        ranks[part] = (
            np.where(present, values, np.iinfo(np.int64).max).min(1, initial=np.iinfo(np.int64).max),
            np.where(present, values, 0).max(1, initial=0),
            np.where(present, values, 0).sum(1) / np.maximum(count, 1),
        )
    names = list(ckpt.tasks)
    zeros = {names[i] for i in np.nonzero(zero)[0].tolist()}
    private_total = np.where(present, ints[:, :, INT["private_rank"]], 0).sum(0)
    tasks = []
    for i, (name, rec) in enumerate(ckpt.tasks.items()):
        spread = {
            part: {
                "min": int(lo[i]) if count[i] else 0,
                "max": int(hi[i]),
                "mean": float(mean[i]),
            }
            for part, (lo, hi, mean) in ranks.items()
        }
        tasks.append(
            {
                "task": name,
                "source": rec.get("source"),
                "format": rec.get("format", "peft"),  # peft, kohya or diffusers (share_convert/t2i.py)
                "modules": int(count[i]),
                "mean_error": float(mean_error[i]),
                "max_error": float(max_error[i]),
                "error_is_bound": bool(bound[i]),
                "zero_delta": name in zeros,
                # the largest over the task's modules; "ranks" has the range and the mean
                "original_rank": spread["original"]["max"],
                "shared_rank": spread["shared"]["max"],
                "private_rank": spread["private"]["max"],
                "ranks": spread,
                "original_params": rec.get("original_params", 0),
                "original_bytes": rec.get("original_bytes", 0),
                "alpha_assumed": rec.get("alpha_assumed"),
            }
        )
    return tasks, zeros, {m: int(private_total[j]) for j, m in enumerate(ckpt.modules)}


class Report(TypedDict):
    """What :func:`summarize` returns (the ``--json`` output of ``merge``, ``add``, ``remove`` and ``info``):
    docs/format.md describes each field."""

    checkpoint: str
    format_version: int
    plan: dict[str, Any]
    warnings: list[str]
    config: dict[str, Any]
    tasks: list[dict[str, Any]]
    totals: dict[str, Any]
    modules: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]


def summarize(ckpt: Checkpoint) -> Report:
    """Everything ``info`` shows, as JSON-ready data."""
    modules = ckpt.modules
    tasks, zeros, private_totals = _task_statistics(ckpt)
    numbers = stored_numbers(ckpt)
    parts = storage_breakdown(ckpt, numbers)
    precision = precision_breakdown(ckpt, numbers)
    ckpt_params = sum(p["params"] for p in parts.values())
    ckpt_bytes = sum(p["bytes"] for p in parts.values())
    orig_params = sum(t["original_params"] for t in tasks)
    orig_bytes = sum(t["original_bytes"] for t in tasks)
    head_bytes = parts["heads"]["bytes"]
    per_task_bytes = parts["coefficients"]["bytes"] + parts["private"]["bytes"]
    kinds = {"shared": 0, "mixed": 0, "private": 0}
    for m in modules.values():
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + 1
    all_errs = [t["mean_error"] for t in tasks if not t["zero_delta"]]
    totals = {
        "tasks": len(tasks),
        "modules": len(modules),
        "original_params": orig_params,
        "original_bytes": orig_bytes,
        "checkpoint_params": ckpt_params,
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_file_bytes": sum(f.stat().st_size for f in ckpt.files),
        "ratio": orig_bytes / ckpt_bytes if ckpt_bytes else math.inf,
        "ratio_excluding_shared_bases": (orig_bytes - head_bytes) / per_task_bytes if per_task_bytes else None,
        "mean_error": sum(all_errs) / len(all_errs) if all_errs else 0.0,
        "max_error": max((t["max_error"] for t in tasks), default=0.0),
        "storage": parts,
        # the LoRA data's bits per stored number (scales included) and bytes by precision
        "bits_per_number": precision["bits_per_number"],
        "storage_by_precision": precision["by_precision"],
    }
    last_op = ckpt.history[-1].get("op") if ckpt.history else "merge"
    stored = sum(parts[p]["params"] for p in ("bases", "coefficients", "private"))
    reasons = why(modules, stored, last_op)
    warnings = []
    if zeros:
        warnings.append(
            f"{len(zeros)} task(s) have a zero ΔW in every module (an untrained or broken export?): "
            f"{', '.join(sorted(zeros))}. Their 0% error means nothing and is left out of the overall mean; "
            "check these adapters, and remove them (share-convert remove --task NAME) if they are broken."
        )
    mixed_bases = base_model_warning({name: rec.get("adapter_config") for name, rec in ckpt.tasks.items()})
    if mixed_bases:
        warnings.append(mixed_bases)
    return {
        "checkpoint": str(ckpt.path),
        "format_version": ckpt.manifest["format_version"],
        "plan": {
            "rule": describe_config(ckpt.config),
            "modules_by_kind": kinds,
            "verdict": verdict(kinds, totals, reasons, ckpt.config, last_op),
            **reasons,
        },
        "warnings": warnings,
        "config": ckpt.config,
        "tasks": tasks,
        "totals": totals,
        "modules": {
            name: {
                "k_B": m["k_B"],
                "k_A": m["k_A"],
                "kind": m["kind"],
                "private_rank_total": private_totals[name],
                "precision": m.get("precision") or {},
                "bits_per_number": precision["modules"].get(name, 0.0),
            }
            for name, m in modules.items()
        },
        "history": ckpt.history,
    }


def base_model_warning(configs: dict[str, dict[str, Any] | None]) -> str | None:
    """A warning when the tasks' adapter configs (task → config) name more than one base model.

    Adapters of different base models with the same module shapes (gpt2 and distilgpt2) consolidate
    without an error, but an adapter only means something on the model it was trained on. Tasks
    without a config or a base model name (bare weights files, text-to-image files) are not counted.
    """
    tasks_of: dict[str, list[str]] = {}
    for task, config in configs.items():
        base = (config or {}).get("base_model_name_or_path")
        if base:
            tasks_of.setdefault(str(base), []).append(task)
    if len(tasks_of) < 2:
        return None

    def which(tasks: list[str]) -> str:
        shown = ", ".join(tasks[:3]) + (f" and {len(tasks) - 3} more" if len(tasks) > 3 else "")
        return f"{len(tasks)} task{'s' if len(tasks) > 1 else ''}: {shown}"

    named = "; ".join(f"{base} ({which(tasks)})" for base, tasks in sorted(tasks_of.items()))
    return (
        f"the adapters' configs name {len(tasks_of)} different base models: {named}. Their modules have the same "
        "shapes, so they were consolidated together, but each adapter only works on the base model it was trained "
        "on: check that they belong together, and consolidate adapters of one base model together otherwise."
    )


def describe_config(config: dict[str, Any]) -> str:
    """The rule a checkpoint was made with, in words (the engine's own description when it loads)."""
    from ..config import ConsolidationConfig

    try:
        # options without a precision are those of a float checkpoint (engine/pipeline.stored_config)
        return ConsolidationConfig(**{"precision": "float", **config}).describe()
    except TypeError:
        return str(config)


def _modules(n: int) -> str:
    return f"{n} module" if n == 1 else f"{n} modules"


def why(modules: dict[str, Any], stored: int, last_op: str) -> dict[str, Any]:
    """What the plan cost against the two extremes that meet the same target, summed over modules.

    ``stored`` is the LoRA parameters the checkpoint holds (bases, coefficients, private factors;
    not the Gram matrices or heads), read from the file. The planner's alternatives describe the
    whole checkpoint only after a merge (or a refit); an update plans its new tasks alone.
    """
    alts = [m.get("alternatives") for m in modules.values()]
    if not alts or any(a is None for a in alts):
        return {}
    if last_op not in FULL_PLAN_OPS:
        return {
            "chosen_params": stored,
            "pure_sharing_params": None,
            "no_sharing_params": None,
            "modules_target_relaxed": sum(bool(m.get("target_relaxed")) for m in modules.values()),
            "why": (
                f"after this update ({last_op}) the checkpoint stores {stored:,} LoRA parameters; "
                + (
                    "combine stores its new task exactly in the bases it found (the others are carried), "
                    if last_op == "combine"
                    else "an update plans only the tasks it adds (the others are carried), "
                )
                + "so it is not compared with pure sharing or independent truncation here: merge the checkpoint "
                "again, or run 'share-convert plan' on the adapters, for that comparison."
            ),
        }
    # a module where a bound ruled sharing out before any basis was fitted knows only a floor
    floors = sum(a["shared"] is None and a.get("shared_at_least") is not None for a in alts)
    shared_missing = sum(a["shared"] is None and a.get("shared_at_least") is None for a in alts)
    shared = None if shared_missing or floors else sum(a["shared"] for a in alts)
    private = None if any(a["private"] is None for a in alts) else sum(a["private"] for a in alts)
    parts = [f"the cheapest representation meeting the target was chosen per module: {stored:,} LoRA parameters in all"]
    if shared_missing:
        parts.append(f"pure sharing cannot meet the target in {_modules(shared_missing)}")
    elif floors:
        at_least = sum(a["shared"] if a["shared"] is not None else a["shared_at_least"] for a in alts)
        parts.append(
            f"pure sharing would need at least {at_least:,} (in {_modules(floors)} a bound from the tasks' own "
            "spectra ruled sharing out before any basis was fitted)"
        )
    else:
        parts.append(f"pure sharing would need {shared:,}")
    if private is not None:
        parts.append(f"independent truncation {private:,}")
    relaxed = sum(bool(m.get("target_relaxed")) for m in modules.values())
    if relaxed:
        parts.append(
            f"in {_modules(relaxed)} the errors the tasks brought from earlier checkpoints already exceed the "
            "target, so there it held the error this step adds"
        )
    return {
        "chosen_params": stored,
        "pure_sharing_params": shared,
        "no_sharing_params": private,
        "modules_target_relaxed": relaxed,
        "why": "; ".join(parts) + ".",
    }


def size_phrase(totals: dict[str, Any]) -> str:
    """How the checkpoint's tensors compare with the original adapters', without rounding to '1.00×'.

    The ratio counts every tensor of the checkpoint: besides the LoRA data (bases, coefficients,
    private factors; never more parameters than the originals' under the default rule), the per-task
    records and the Gram matrices. Where nothing is shared those make the checkpoint slightly larger
    than the originals, and the phrase says so and by how much.
    """
    ratio = totals["ratio"]
    if not math.isfinite(ratio) or ratio >= 1:
        return f"{ratio:.2f}× smaller" if ratio >= 1.005 else f"{1 - 1 / ratio:.1%} smaller"
    larger = f"{1 / ratio:.2f}× larger" if ratio <= 1 / 1.005 else f"{1 / ratio - 1:.1%} larger"
    st = totals.get("storage") or {}
    part = lambda *roles: sum(st.get(r, {}).get("bytes", 0) for r in roles)  # noqa: E731
    lora = part("bases", "coefficients", "private")
    original_lora = totals["original_bytes"] - part("heads")
    overhead = part("grams", "records")
    if st and lora <= original_lora:
        return (
            f"{larger} than the original adapters: the LoRA tensors take no more than theirs ({human_bytes(lora)} "
            f"against {human_bytes(original_lora)}); the per-task records and Gram matrices ({human_bytes(overhead)}) "
            "make the difference"
        )
    return f"{larger} than the original adapters"


def verdict(
    kinds: dict[str, int], totals: dict[str, Any], reasons: dict[str, Any], config: dict[str, Any], last_op: str
) -> str:
    """Do these adapters share enough structure for consolidation to pay off? Rests on storage at
    equal error: what the checkpoint stores against what truncating each adapter alone needs to meet
    the same error target. Under another rule (--k, --energy, --budget) that comparison is not
    made here, and the sentence says so rather than guess from the plan's shape. Large errors are
    called out whatever the rule."""
    size = size_phrase(totals)
    n = sum(kinds.values()) or 1
    sharing = kinds["shared"] + kinds["mixed"]
    chosen, private = reasons.get("chosen_params"), reasons.get("no_sharing_params")
    if chosen is not None and private:
        saved = 1 - chosen / private
        if saved >= 0.10:
            text = (
                f"These adapters share structure: at the same error target, shared bases ({_modules(sharing)} of "
                f"{n}) store {saved:.0%} fewer LoRA parameters than truncating each adapter alone; overall {size}."
            )
        elif sharing:
            text = (
                f"These adapters share little: at the same error target, shared bases ({_modules(sharing)} of {n}) "
                f"save only {max(saved, 0):.0%} of the LoRA parameters over truncating each adapter alone; "
                f"overall {size}."
            )
        else:
            text = (
                f"These adapters share little: at this error target no module is worth a shared basis, so every "
                f"module keeps each task's own top directions (independent truncation): overall {size}."
            )
    elif last_op not in FULL_PLAN_OPS and "why" in reasons:
        text = (
            f"Overall {size}. Whether these adapters share structure was judged at the last merge; this update "
            "does not recompute it."
        )
    else:
        text = (
            f"Overall {size} with {totals['mean_error']:.1%} mean ΔW error. Whether these adapters share structure "
            "is not judged under this rule: 'share-convert plan' compares shared bases with truncating each "
            "adapter alone at the same storage."
        )
    target = float(config.get("target_error") or 0.0) if config.get("k") is None else 0.0
    large_mean = max(LARGE_MEAN_ERROR, 2 * target)
    if totals["mean_error"] > large_mean or totals["max_error"] > LARGE_MAX_ERROR:
        text += (
            f" Warning: the errors are large (mean {totals['mean_error']:.1%}, worst task and module "
            f"{totals['max_error']:.2%}): extracted adapters will behave unlike the originals; keep more (a larger "
            "--k or --budget, or the default error target)."
        )
    return text


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
