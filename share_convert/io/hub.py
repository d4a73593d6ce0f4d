"""The Hugging Face Hub: adapters and checkpoints in, checkpoints out.

Addresses look like ``hf://owner/name[@revision][/subfolder]``. Downloads go through
huggingface_hub's cache and honour ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` (read
when a call is made, not only at import). Every failure becomes a :class:`HubError` with one
line that says what to do; tokens never appear in messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.sharding import INDEX_SUFFIX, shard_name
from ..errors import HubError, OutputExistsError
from ..files.locking import lock_path
from .provenance import LocalValue, local_path_values, looks_local

if TYPE_CHECKING:
    from ..checkpoint.reader import Checkpoint

CHECKPOINT_NAME = "share.safetensors"
#: A checkpoint pushed in shards: this index and share-00001-of-0000N.safetensors ... beside it.
INDEX_NAME = CHECKPOINT_NAME + INDEX_SUFFIX
SHARD_PATTERN = "share-*-of-*.safetensors"
CONFIG_NAME = "share_config.json"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
_ADDRESS = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?$")


@dataclass(frozen=True)
class HubAddress:
    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"hf://{self.repo_id}{rev}{sub}"


def is_hub_address(text: str) -> bool:
    return str(text).startswith("hf://")


def parse_address(text: str) -> HubAddress:
    m = _ADDRESS.match(text.rstrip("/"))
    if not m:
        raise HubError(
            f"{text!r} is not a Hub address", hint="Write hf://owner/name, optionally @revision and /subfolder"
        )
    return HubAddress(m["repo"], m["rev"], m["sub"])


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def _scrub(text: str, token: str | None) -> str:
    text = text.splitlines()[0] if text else ""
    return text.replace(token, "***") if token else text


def _logged_in(token: str | None) -> bool:
    """Whether a token is at hand: ``--token``, ``HF_TOKEN`` or a saved login (``hf auth login``)."""
    if token:
        return True
    from huggingface_hub import get_token

    return bool(get_token())


def _unreachable(what: str, e: BaseException, token: str | None) -> HubError:
    """No connection to the Hub: say where we tried and what failed, not a guess about offline mode."""
    cause: BaseException | None = e
    while cause is not None and cause.__cause__ is not None and cause is not cause.__cause__:
        cause = cause.__cause__
    reason = _scrub(str(cause or e), token)[:120] or type(e).__name__
    where = _endpoint() or "https://huggingface.co"
    return HubError(
        f"{what}: no connection to the Hub at {where} ({reason})",
        hint="Check the network or HF_ENDPOINT; to use only what is cached, set HF_HUB_OFFLINE=1",
    )


def _translate(e: Exception, what: str, token: str | None, *, writing: bool = False) -> HubError:
    """One clear line for each way a Hub call fails: no connection, not logged in, or not found."""
    from huggingface_hub import errors as hf

    if isinstance(e, hf.GatedRepoError):
        return HubError(f"{what}: the repository is gated", hint="Accept its terms on the Hub and set HF_TOKEN")
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(f"{what}: revision not found", hint="Check the branch, tag or commit after @")
    if isinstance(e, hf.RepositoryNotFoundError):
        which = "repository or revision" if "@" in what else "repository"
        if not _logged_in(token):
            return HubError(
                f"{what}: {which} not found, or private and you are not logged in",
                hint="Check the name; for a private repository run 'hf auth login', set HF_TOKEN or pass --token",
            )
        return HubError(
            f"{what}: {which} not found (or private and not visible to your token)",
            hint="Check the name and your token's permissions",
        )
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if _offline():
            return HubError(
                f"{what}: offline mode (HF_HUB_OFFLINE) is on and there is no cached copy",
                hint="Download it once while online, or unset HF_HUB_OFFLINE",
            )
        return HubError(
            f"{what}: no connection to the Hub at {_endpoint() or 'https://huggingface.co'} and no cached copy",
            hint="Check the network or HF_ENDPOINT, then try again",
        )
    if isinstance(e, hf.EntryNotFoundError):
        return HubError(f"{what}: file not found in the repository", hint="Check the subfolder")
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            if not _logged_in(token):
                return HubError(
                    f"{what}: not logged in (the Hub answered HTTP {status})",
                    hint="Run 'hf auth login', set HF_TOKEN or pass --token",
                )
            return HubError(
                f"{what}: authentication failed (HTTP {status})", hint="Check HF_TOKEN or --token and its permissions"
            )
        return HubError(
            f"{what}: the Hub answered HTTP {status} ({_scrub(str(e), token)[:160]})", hint="Try again later"
        )
    err = _unreachable(what, e, token)
    if writing and not _logged_in(token):
        err = HubError(
            err.message + "; you are not logged in either",
            hint="Check the network or HF_ENDPOINT, and log in for pushing: 'hf auth login', HF_TOKEN or --token",
        )
    return err


def _quiet_progress(show: bool) -> None:
    """Progress bars on a terminal only; huggingface_hub's own warnings never reach the user's screen."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars, logging

    logging.set_verbosity_error()
    enable_progress_bars() if show else disable_progress_bars()


def download(
    address: str | HubAddress,
    *,
    patterns: list[str] | None = None,
    token: str | None = None,
    local_dir: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """Download (through the cache) the files of a repository matching ``patterns``; return the folder."""
    from huggingface_hub import snapshot_download

    addr = parse_address(address) if isinstance(address, str) else address
    token = _token(token)
    if patterns is not None and addr.subfolder:
        patterns = [f"{addr.subfolder}/{p}" for p in patterns]
    _quiet_progress(progress)
    try:
        warnings.filterwarnings("ignore", module="huggingface_hub")
        path = snapshot_download(
            addr.repo_id,
            revision=addr.revision,
            allow_patterns=patterns,
            token=token,
            endpoint=_endpoint(),
            local_files_only=_offline(),
            local_dir=str(local_dir) if local_dir else None,
        )
    except Exception as e:
        raise _translate(e, str(addr), token) from None
    # may not exist when nothing matched the patterns: callers say what was missing
    return Path(path) / addr.subfolder if addr.subfolder else Path(path)


def cached_file_address(path: str | Path) -> str | None:
    """The Hub file that ``path``, a file of huggingface_hub's cache, is a copy of, as ``HfFileSystem``
    names it (``owner/name@commit/file``; ``datasets/…`` for a dataset); None for any other path.

    Read from the path's own parts (``…/models--owner--name/snapshots/<commit>/<file>``), so that a
    process that lacks that cache (a Ray worker on another node) can still name the file.
    """
    parts = Path(path).parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i] != "snapshots":
            continue
        kind, _, repo = parts[i - 1].partition("--")
        prefix = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}.get(kind)
        if prefix is None or not repo:
            return None
        return f"{prefix}{repo.replace('--', '/')}@{parts[i + 1]}/{'/'.join(parts[i + 2 :])}"
    return None


def read_range(address: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the Hub file ``address`` (:func:`cached_file_address`): one
    ranged request to the URL huggingface_hub's ``HfFileSystem`` gives that file, never a download
    of the whole file from the Hub, which honours ranges (a server that ignores them, as some
    mirrors do, sends the whole file: the bytes are taken from it, so they are right either way).
    The endpoint and token are this process's (``HF_ENDPOINT``, ``HF_TOKEN`` or a login)."""
    if length <= 0:
        return b""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    token = _token(None)
    url = HfFileSystem(endpoint=_endpoint(), token=token).url(address)
    headers = {**build_hf_headers(token=token), "range": f"bytes={offset}-{offset + length - 1}"}
    try:
        r = http_backoff("GET", url, headers=headers)
        hf_raise_for_status(r)
    except Exception as e:
        raise _translate(e, address, token) from None
    return r.content if r.status_code == 206 else r.content[offset : offset + length]


def download_inputs(address: str, *, token: str | None = None, progress: bool = False) -> list[Path]:
    """The local paths of what an ``hf://`` input holds: a PEFT adapter, or Share checkpoints."""
    addr = parse_address(address)
    folder = download(addr, patterns=[*ADAPTER_FILES, "*.safetensors", "*.json"], token=token, progress=progress)
    if any((folder / n).is_file() for n in ADAPTER_FILES[1:]):
        return [folder]
    from ..checkpoint.index import is_checkpoint

    checkpoints = sorted(p for p in folder.glob("*.safetensors") if is_checkpoint(p))
    checkpoints += sorted(p for p in folder.glob(f"*.safetensors{INDEX_SUFFIX}") if is_checkpoint(p))
    if checkpoints:
        return checkpoints
    raise HubError(
        f"{addr}: holds no adapter (adapter_model.safetensors/.bin) and no Share checkpoint",
        hint="Point at the folder that holds the adapter: hf://owner/name/subfolder",
    )


def checkpoint_path(address: str, *, token: str | None = None, progress: bool = False) -> Path:
    """The local path of the Share checkpoint an ``hf://`` address names: ``share.safetensors``,
    else its shards' index ``share.safetensors.index.json``, else the first checkpoint (file or
    shard index) found there."""
    addr = parse_address(address)
    folder = download(
        addr,
        patterns=[CHECKPOINT_NAME, "*.safetensors", f"*.safetensors{INDEX_SUFFIX}"],
        token=token,
        progress=progress,
    )
    from ..checkpoint.index import is_checkpoint

    found = [p for p in (folder / CHECKPOINT_NAME, folder / INDEX_NAME) if p.is_file()]
    if not found:
        found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob(f"*.safetensors{INDEX_SUFFIX}"))
    found = [p for p in found if is_checkpoint(p)]
    if not found:
        raise HubError(f"{addr}: holds no Share checkpoint", hint="Push one with 'share-convert push'")
    return found[0]


def model_card(summary: dict[str, Any], repo_id: str, *, license: str | None = None) -> str:
    """A README.md for a pushed checkpoint: YAML front matter, the tasks' errors, savings, commands."""
    bases = sorted(
        {str((t.get("adapter_config") or {}).get("base_model_name_or_path")) for t in summary["_task_records"].values()}
        - {"None"}
    )
    bases = [b for b in bases if not looks_local(b, model_key=True)]  # push warns about those; the card omits them
    front = ["---", "library_name: share-convert"]
    if len(bases) == 1:
        front.append(f"base_model: {bases[0]}")
    if license:
        front.append(f"license: {license}")
    front += ["tags:", "- lora", "- share", "- peft", "- share-convert", "---", ""]
    tot = summary["totals"]
    lines = [
        f"# {repo_id}",
        "",
        f"A [Share](https://arxiv.org/abs/2602.06043) checkpoint made with share-convert: {tot['tasks']} LoRA adapters"
        f"{' for ' + bases[0] if len(bases) == 1 else ''} consolidated into shared bases per module plus per-task coefficients"
        " (and private corrections where they pay).",
        "",
        f"- Storage: {tot['checkpoint_bytes']:,} bytes of tensors against {tot['original_bytes']:,} for the original adapters: "
        f"**{tot['ratio']:.2f}×** smaller, shared bases counted.",
        f"- Mean relative ΔW error {tot['mean_error']:.2%}, worst task-module {tot['max_error']:.2%}.",
        f"- Plan: {summary['plan']['rule']}. {summary['plan']['verdict']}",
        "",
        "| task | mean ΔW error | worst ΔW error |",
        "|---|---:|---:|",
    ]
    for t in summary["tasks"]:
        lines.append(f"| {t['task']} | {t['mean_error']:.2%} | {t['max_error']:.2%} |")
    example = summary["tasks"][0]["task"] if summary["tasks"] else "TASK"
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "pip install share-convert",
        f"share-convert tasks hf://{repo_id}",
        f"share-convert extract hf://{repo_id} --task {example} -o {example}/   # a standard PEFT adapter",
        f"share-convert pull {repo_id} -o share/                              # the checkpoint itself",
        "```",
        "",
        "The extracted folder loads with `PeftModel.from_pretrained(base_model, folder)`.",
        "",
    ]
    return "\n".join(front + lines)


def push(
    checkpoint: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    on_local_paths: Callable[[list[LocalValue]], None] | None = None,
    refuse_local_paths: bool = False,
    summarize: Callable[[Checkpoint], dict[str, Any]],
) -> str:
    """Upload a checkpoint, its config and a model card to ``repo_id`` (created when needed); return the commit URL.

    ``summarize`` gives the checkpoint's report, from which the model card is written (the report
    layer's :func:`~share_convert.report.summary.summarize`, handed down by the API: io sits below it).

    Before anything is uploaded, the manifest's values that look like local paths (an adapter
    config's ``base_model_name_or_path`` that is a folder, kohya metadata naming files, sources
    recorded by older versions) are handed to ``on_local_paths`` (called only when there are
    some), and with ``refuse_local_paths`` the push stops there with a :class:`HubError`.

    The checkpoint goes up as ``share.safetensors``, or when it is sharded as
    ``share.safetensors.index.json`` and ``share-00001-of-0000N.safetensors`` ...; the commit
    deletes the files of the other form (or of another shard count) that the revision held, so
    that it holds one checkpoint."""
    from huggingface_hub import HfApi

    from ..checkpoint.reader import Checkpoint

    ckpt = Checkpoint(checkpoint)
    ckpt.verify_all()
    found = local_path_values(ckpt.manifest)
    if found and on_local_paths is not None:
        on_local_paths(found)
    if found and refuse_local_paths:
        raise HubError(
            f"{len(found)} recorded value(s) look like local paths and would be published"
            f" (first: {found[0].describe()}); nothing was uploaded",
            path=ckpt.path,
            hint="Give the inputs' configs public values (e.g. base_model_name_or_path: the Hub model id) "
            "and merge again, or push without --no-local-paths",
        )
    ckpt_name = INDEX_NAME if ckpt.sharded else CHECKPOINT_NAME
    summary = summarize(ckpt)
    summary["_task_records"] = ckpt.tasks
    token = _token(token)
    if _offline():
        raise HubError("cannot push while HF_HUB_OFFLINE is set", hint="Unset HF_HUB_OFFLINE")
    api = HfApi(endpoint=_endpoint(), token=token)
    from huggingface_hub.utils import logging

    logging.set_verbosity_error()  # a retried request is not the user's business; a failed one is one line
    with tempfile.TemporaryDirectory(prefix="share-convert-push-") as tmp:
        folder = Path(tmp)
        if ckpt.sharded:
            from ..checkpoint.index import index_text, read_index

            metadata, files, weight_map = read_index(ckpt.path)
            names = {f: shard_name(CHECKPOINT_NAME, i, len(files)) for i, f in enumerate(files, 1)}
            for f, path in zip(files, ckpt.shard_paths):
                shutil.copy(path, folder / names[f])
            (folder / INDEX_NAME).write_text(index_text(metadata, {t: names[f] for t, f in weight_map.items()}))
        else:
            shutil.copy(ckpt.path, folder / CHECKPOINT_NAME)
        (folder / CONFIG_NAME).write_text(
            json.dumps(
                {
                    "format": "share-convert",
                    "format_version": ckpt.manifest["format_version"],
                    "checkpoint": ckpt_name,
                    "tasks": list(ckpt.tasks),
                    "config": ckpt.config,
                },
                indent=2,
            )
            + "\n"
        )
        (folder / "README.md").write_text(model_card(summary, repo_id, license=license))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                revision=revision,
                commit_message=commit_message or f"Share checkpoint: {len(ckpt.tasks)} tasks",
                # the other form, or other shards, of a checkpoint pushed before (files uploaded now are kept)
                delete_patterns=[CHECKPOINT_NAME, INDEX_NAME, SHARD_PATTERN],
            )
        except Exception as e:
            raise _translate(e, f"hf://{repo_id}", token, writing=True) from None
    return str(getattr(info, "commit_url", info))


def pull(
    repo: str,
    output: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Download a pushed checkpoint repository into ``output``; return the checkpoint's path
    (``share.safetensors``, or the index of its shards). A checkpoint already in ``output`` is
    replaced as :class:`~share_convert.checkpoint.writer.CheckpointWriter` replaces one: the new files are
    published with the index (or the single file) last, and the old form's files are removed.

    Nothing is written to ``output`` until every file has arrived whole (huggingface_hub checks
    each file's size against the Hub's metadata, and resumes a download cut off in a rerun) and
    the checkpoint has passed its own integrity check (every tensor's SHA-256), so a pull cut
    off, or of a damaged repository, leaves nothing there that reads as a checkpoint."""
    from ..checkpoint.index import read_index
    from ..checkpoint.publish import publish_files
    from ..checkpoint.reader import Checkpoint
    from ..errors import ShareError
    from ..files.atomic import file_mode, publish_file, temp_file_beside

    output = Path(output)
    lock = lock_path(output / CHECKPOINT_NAME)  # held by this pull itself (api.pull): not content
    if output.exists() and any(p != lock for p in output.iterdir()) and not force:
        raise OutputExistsError("exists and is not empty", path=output, hint="Pass --force to replace it")
    addr = parse_address(repo if is_hub_address(repo) else f"hf://{repo}")
    if revision:
        addr = HubAddress(addr.repo_id, revision, addr.subfolder)
    src = download(
        addr,
        patterns=[CHECKPOINT_NAME, INDEX_NAME, SHARD_PATTERN, CONFIG_NAME, "README.md"],
        token=token,
        progress=progress,
    )
    if (src / CHECKPOINT_NAME).is_file():
        files = [CHECKPOINT_NAME]
    elif (src / INDEX_NAME).is_file():
        files = [*read_index(src / INDEX_NAME)[1], INDEX_NAME]  # the index last: the commit point
    else:
        raise HubError(f"{addr}: holds no {CHECKPOINT_NAME}", hint="Is this a repository pushed by share-convert?")
    missing = [name for name in files if not (src / name).is_file()]
    if missing:
        raise HubError(f"{addr}: shard {missing[0]} named by {INDEX_NAME} is missing", hint="Push the checkpoint again")
    try:
        with Checkpoint(src / files[-1]) as downloaded:
            downloaded.verify_all()
    except ShareError as e:  # said of the repository, not of the cache's file names
        raise HubError(
            f"{addr}: the downloaded checkpoint fails its integrity check ({e.message}); nothing was written",
            hint="Pull again; if it fails again, the repository's copy is damaged: push the checkpoint again",
        ) from None
    output.mkdir(parents=True, exist_ok=True)
    target = output / CHECKPOINT_NAME
    written: list[tuple[Path, Path]] = []
    try:
        for name in files:
            fd, tmp = temp_file_beside(target)
            os.close(fd)
            written.append((Path(tmp), output / name))
            shutil.copyfile(src / name, tmp)
            os.chmod(tmp, file_mode(replacing=output / name))
        publish_files(written, target)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for name in (CONFIG_NAME, "README.md"):  # beside the checkpoint, each published whole
        if (src / name).is_file():
            fd, tmp = temp_file_beside(output / name)
            os.close(fd)
            try:
                shutil.copyfile(src / name, tmp)
                publish_file(Path(tmp), output / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return output / files[-1]
