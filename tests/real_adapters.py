"""Where the tests find the real adapters, for a checkout with or without ``../shared``.

The thirteen real LoRA adapters the tests use were published by their authors in public GitHub
repositories under the MIT licence. In the project's workspace they sit in
``../shared/data/real-adapters``; someone who clones this repository alone does not have that
folder. :func:`real_adapters_dir` then fetches each adapter (its ``adapter_config.json`` and
weights file, at the pinned commit listed in ``tests/data/real-adapters-index.json``, a copy of
the shared ``index.json``) and each source repository's licence into a cache, once, checking
every weights file's size against the index. When neither a local copy nor the network is
available it raises :class:`RealAdaptersUnavailable`, whose message says where it looked, why
the fetch failed and what to do.

Environment:

- ``SHARE_REAL_ADAPTERS``: a folder holding the adapters and ``index.json`` (used as is).
- ``SHARE_REAL_ADAPTERS_CACHE``: where fetched adapters go (default
  ``$XDG_CACHE_HOME/share-convert/real-adapters``, else ``~/.cache/share-convert/real-adapters``).
- ``SHARE_REAL_ADAPTERS_URL``: the raw-file server, ``https://raw.githubusercontent.com`` by
  default (files are read from ``URL/OWNER/REPO/COMMIT/PATH``); the tests of this module point it
  at a local server.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
INDEX = HERE / "data" / "real-adapters-index.json"
SHARED = HERE.parent.parent / "shared" / "data" / "real-adapters"
DEFAULT_URL = "https://raw.githubusercontent.com"
LICENCE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "license", "License")
TIMEOUT_S = 30


class RealAdaptersUnavailable(RuntimeError):
    """Neither a local copy of the real adapters nor a way to fetch them."""


def default_cache() -> Path:
    if os.environ.get("SHARE_REAL_ADAPTERS_CACHE"):
        return Path(os.environ["SHARE_REAL_ADAPTERS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "share-convert" / "real-adapters"


def real_adapters_dir(
    *, index: Path = INDEX, cache: Path | None = None, base_url: str | None = None, local: list[Path] | None = None
) -> Path:
    """A folder with the real adapters and their ``index.json``: ``$SHARE_REAL_ADAPTERS``, else
    ``../shared/data/real-adapters``, else the cache (filled from the adapters' source repositories
    on first use). Raises :class:`RealAdaptersUnavailable` with the reason when none can be had."""
    if local is None:
        env = os.environ.get("SHARE_REAL_ADAPTERS")
        local = [Path(env)] if env else [SHARED]
    for folder in local:
        if (folder / "index.json").is_file():
            return folder
    cache = cache or default_cache()
    if (cache / "index.json").is_file():  # written last: its presence means the fetch completed
        return cache
    base_url = (base_url or os.environ.get("SHARE_REAL_ADAPTERS_URL") or DEFAULT_URL).rstrip("/")
    try:
        fetch(index, cache, base_url)
    except (OSError, ValueError) as e:
        raise RealAdaptersUnavailable(
            f"the real adapters the tests need are not at {', '.join(map(str, local))}, not in the cache "
            f"{cache}, and fetching them from {base_url} failed ({e}). Set SHARE_REAL_ADAPTERS to a folder "
            "holding them (the project's shared/data/real-adapters), or run the tests once with network "
            "access to fill the cache."
        ) from None
    return cache


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (fixed https/http base)
        return response.read()


def _raw(base_url: str, repo: str, commit: str, path: str) -> str:
    return f"{base_url}/{repo}/{commit}/{urllib.parse.quote(path)}"


def fetch(index: Path, cache: Path, base_url: str) -> None:
    """Download every adapter of ``index`` and its repository's licence into ``cache``, atomically."""
    entries = json.loads(index.read_text())
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        licences: dict[str, bytes] = {}
        for e in entries:
            folder = tmp / e["folder"]
            folder.mkdir(parents=True)
            source_dir = e["source_path"].rsplit("/", 1)[0] if "/" in e["source_path"] else ""
            config = f"{source_dir}/adapter_config.json" if source_dir else "adapter_config.json"
            weights = _get(_raw(base_url, e["source_repo"], e["source_commit"], e["source_path"]))
            if len(weights) != e["bytes"]:
                raise ValueError(f"{e['source_path']} of {e['source_repo']} has {len(weights)} bytes, not {e['bytes']}")
            (folder / e["weights_file"]).write_bytes(weights)
            (folder / "adapter_config.json").write_bytes(
                _get(_raw(base_url, e["source_repo"], e["source_commit"], config))
            )
            if e["source_repo"] not in licences:
                licences[e["source_repo"]] = _licence(base_url, e["source_repo"], e["source_commit"])
        (tmp / "licenses").mkdir()
        for repo, text in licences.items():
            (tmp / "licenses" / f"{repo.replace('/', '__')}.LICENSE").write_bytes(text)
        (tmp / "index.json").write_bytes(index.read_bytes())
        if cache.exists():
            shutil.rmtree(cache)  # an earlier, incomplete fetch (no index.json)
        os.replace(tmp, cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _licence(base_url: str, repo: str, commit: str) -> bytes:
    """The licence file at the root of a source repository (it must travel with the adapters)."""
    for name in LICENCE_NAMES:
        try:
            return _get(_raw(base_url, repo, commit, name))
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
    raise ValueError(f"no licence file ({', '.join(LICENCE_NAMES)}) at the root of {repo}@{commit}")
