"""The commands that move a checkpoint to and from the Hugging Face Hub: ``push`` and ``pull``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from .options import ForceOpt, JsonOpt, NoWaitOpt
from .shell import emit_json, fail, out, say_waiting, warn


def push(
    checkpoint: Annotated[
        str, typer.Argument(help="The Share checkpoint to upload.", show_default=False, metavar="CHECKPOINT")
    ],
    repo: Annotated[
        str | None,
        typer.Argument(
            help="owner/name of the Hub repository (created when needed).  [required]",
            show_default=False,
            metavar="REPO",
        ),
    ] = None,
    repo_option: Annotated[
        str | None, typer.Option("--repo", help="Deprecated: give the repository after the checkpoint.", hidden=True)
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created when needed).")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="Hub token (default: HF_TOKEN or the saved login). Never printed.")
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", metavar="MESSAGE", help="Commit message.")
    ] = None,
    license: Annotated[
        str | None, typer.Option("--license", help="Licence for the model card (e.g. mit, apache-2.0).")
    ] = None,
    no_local_paths: Annotated[
        bool,
        typer.Option(
            "--no-local-paths",
            help="Refuse to push when a recorded value looks like a local path (by default: a warning per value).",
        ),
    ] = False,
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait",
            help="When another share-convert is writing the checkpoint, fail at once (exit 2) instead of waiting "
            "to upload it whole.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Upload a checkpoint to the Hub with a machine-readable config and a model card.

    Before uploading, says which recorded values look like local paths (a base_model_name_or_path
    that is a folder, an absolute path in kohya metadata): they would be published. Local inputs
    are recorded by their own name only; hf:// addresses are kept. Everything goes up in one commit:
    a push cut off leaves the repository as it was.

    Example: share-convert push share.safetensors alice/my-share
    """
    if repo_option is not None:
        if repo is not None and repo != repo_option:
            fail(f"two repositories were given ({repo} and --repo {repo_option}): give it once, after the checkpoint")
        warn(f"--repo is deprecated: write 'share-convert push {checkpoint} {repo_option}'")
        repo = repo_option
    if repo is None:
        fail("no repository was given: share-convert push CHECKPOINT OWNER/NAME")
    local: list[dict[str, Any]] = []

    def tell(found: list) -> None:  # before anything is uploaded
        then = "" if no_local_paths else " and will be published with the checkpoint"
        for value in found:
            warn(f"{value.describe()} looks like a local path{then}")
            local.append(value.as_json())

    url = api.push(
        checkpoint,
        repo,
        private=private,
        revision=revision,
        token=token,
        commit_message=commit_message,
        license=license,
        on_local_paths=tell,
        refuse_local_paths=no_local_paths,
        wait=not no_wait,
        on_wait=say_waiting,
    )
    if as_json:
        emit_json({"checkpoint": checkpoint, "repo": repo, "revision": revision, "url": url, "local_paths": local})
        return
    out.print(f"pushed {checkpoint} to {repo}: {url}", highlight=False, markup=False)


def pull(
    repo: Annotated[
        str,
        typer.Argument(
            help="owner/name (or hf://owner/name@revision) of a pushed checkpoint.",
            show_default=False,
            metavar="REPO",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", metavar="DIR", help="Folder to download into.  [required]", show_default=False),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Hub token (default: HF_TOKEN). Never printed.")] = None,
    force: ForceOpt = False,
    no_wait: NoWaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Download a checkpoint pushed with 'share-convert push'.

    Example: share-convert pull alice/my-share -o share/
    """
    if output is None:
        fail("no output folder was given: pass -o DIR")
    path = api.pull(repo, output, revision=revision, token=token, force=force, wait=not no_wait, on_wait=say_waiting)
    if as_json:
        emit_json({"repo": repo, "revision": revision, "checkpoint": str(path)})
        return
    out.print(f"wrote {path}", highlight=False, markup=False)
