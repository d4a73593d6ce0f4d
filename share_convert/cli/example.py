"""The ``demo`` command: six small example adapters, consolidated, reported and one extracted."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .options import JsonOpt
from .shell import emit_json, out, show


def demo(
    keep: Annotated[
        Path | None,
        typer.Option(
            "--keep",
            metavar="DIR",
            help="Write the demo's files (adapters, checkpoint, extracted task) to this folder and keep them; "
            "without it they go to a temporary folder that is removed at the end.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build six small example adapters with a shared structure, consolidate them, report, extract one.

    Example: share-convert demo --keep demo/
    """
    from ..config import ConsolidationConfig
    from ..io.synthetic import write_synthetic_adapters

    say = (lambda text: None) if as_json else (lambda text: out.print(text, highlight=False, markup=False))  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="share-convert-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        where = "" if keep else " (a temporary folder, removed when the demo ends; --keep DIR keeps the files)"
        say(f"Writing 6 example adapters (rank 8, 2 layers × q_proj,v_proj, hidden 64) to {root / 'adapters'}{where}")
        write_synthetic_adapters(root / "adapters", count=6)
        ckpt = root / "share.safetensors"
        say(f"$ share-convert merge {root / 'adapters'} -o {ckpt}")
        summary = api.merge([str(root / "adapters")], ckpt, ConsolidationConfig(), force=True)
        if not as_json:
            show(summary, False)
        target = root / "task-000"
        say(f"$ share-convert extract {ckpt} --task task-000 -o {target}")
        r = api.extract(ckpt, target, task="task-000", force=True)[0]
        say(
            f"wrote {r.path} (rank {r.rank}, {r.modules} modules): a PEFT adapter, loadable with PeftModel.from_pretrained"
        )
        if as_json:
            emit_json({"folder": str(root), "kept": keep is not None, "merge": summary, "extract": r.as_dict()})
        elif keep:
            say(f"The demo's files are in {root}.")
        else:
            say(f"Removed {root} and everything in it; run 'share-convert demo --keep DIR' to keep the files.")
