"""The test adapters for a clone without ../shared: fetched from their source repositories into a
cache, checked, and a clear message when that cannot be done (tests/real_adapters.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .real_adapters import RealAdaptersUnavailable, real_adapters_dir

SOME = ("gpt2-c_attn/winkitee__peft-lora-gpt2", "gpt2-c_attn/gsj-rifat__tmp")


@pytest.fixture
def source_server(real, tmp_path):
    """A raw-file server laid out like raw.githubusercontent.com (OWNER/REPO/COMMIT/PATH), holding
    two of the real adapters as their source repositories published them, and an index of those two."""
    entries = [e for e in json.loads((real / "index.json").read_text()) if e["folder"] in SOME]
    root = tmp_path / "www"
    for e in entries:
        at = root / e["source_repo"] / e["source_commit"]
        weights = at / e["source_path"]
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes((real / e["folder"] / e["weights_file"]).read_bytes())
        (weights.parent / "adapter_config.json").write_bytes((real / e["folder"] / "adapter_config.json").read_bytes())
        licence = real / "licenses" / f"{e['source_repo'].replace('/', '__')}.LICENSE"
        (at / "LICENSE").write_bytes(licence.read_bytes())
    index = tmp_path / "index.json"
    index.write_text(json.dumps(entries))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", index
    httpd.shutdown()
    httpd.server_close()


def test_without_a_local_copy_the_adapters_are_fetched_into_the_cache_once(real, source_server, tmp_path):
    url, index = source_server
    cache = tmp_path / "cache"
    got = real_adapters_dir(index=index, cache=cache, base_url=url, local=[tmp_path / "no-shared"])
    assert got == cache and (cache / "index.json").read_bytes() == index.read_bytes()
    for folder in SOME:
        for f in (real / folder).iterdir():
            assert (cache / folder / f.name).read_bytes() == f.read_bytes()
    assert sorted(p.name for p in (cache / "licenses").iterdir()) == [
        "gsj-rifat__Lightweight-Fine-Tuning-with-PEFT.LICENSE",
        "winkitee__Lightweight-Fine-Tuning-Project.LICENSE",
    ]
    # the second call reads the cache, with no server at all
    again = real_adapters_dir(index=index, cache=cache, base_url="http://127.0.0.1:9", local=[tmp_path / "no"])
    assert again == cache


def test_a_local_copy_is_used_as_it_is(real, tmp_path):
    assert real_adapters_dir(cache=tmp_path / "unused", local=[real]) == real
    assert not (tmp_path / "unused").exists()


def test_no_local_copy_and_no_network_is_one_clear_message_and_leaves_no_cache(tmp_path):
    with pytest.raises(RealAdaptersUnavailable) as info:
        real_adapters_dir(cache=tmp_path / "cache", base_url="http://127.0.0.1:9", local=[tmp_path / "no-shared"])
    message = str(info.value)
    assert "SHARE_REAL_ADAPTERS" in message and "http://127.0.0.1:9" in message and str(tmp_path / "cache") in message
    assert not (tmp_path / "cache").exists() and list(tmp_path.iterdir()) == []


def test_tests_that_use_no_real_adapters_collect_and_run_without_them(tmp_path):
    """conftest looks the real adapters up for the tests that ask for them only: with none to be had (no
    local copy, an empty cache, a closed port), tests/test_linalg.py collects and passes, and a test that
    asks for them errors with the reason. A real pytest process: collection is what is tested."""
    env = {
        **os.environ,
        "SHARE_REAL_ADAPTERS": str(tmp_path / "none"),
        "SHARE_REAL_ADAPTERS_CACHE": str(tmp_path / "cache"),
        "SHARE_REAL_ADAPTERS_URL": "http://127.0.0.1:9",
    }
    wanting = "tests/test_real_adapters.py::test_a_local_copy_is_used_as_it_is"
    # one process (-n 0): the workers of the default run (pyproject addopts) would only add their start
    args = ["tests/test_linalg.py", wanting, "-q", "-rA", "-n", "0", "-p", "no:cacheprovider", "-p", "no:randomly"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=root, env=env, capture_output=True, text=True)
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("PASSED", "FAILED", "ERROR"))]
    linalg = [line for line in summary if "test_linalg.py" in line]
    assert linalg and all(line.startswith("PASSED") for line in linalg), proc.stdout + proc.stderr
    # only the test that asks for them does not pass: it errors in its setup, saying why and what to do
    assert [line for line in summary if not line.startswith("PASSED")] == [line for line in summary if wanting in line]
    assert f"ERROR at setup of {wanting.rsplit(':', 1)[1]}" in proc.stdout and "Set SHARE_REAL_ADAPTERS" in proc.stdout
    assert not (tmp_path / "cache").exists()


def test_a_file_of_the_wrong_size_is_refused(real, source_server, tmp_path):
    url, index = source_server
    entries = json.loads(index.read_text())
    entries[0]["bytes"] += 1
    index.write_text(json.dumps(entries))
    with pytest.raises(RealAdaptersUnavailable, match="bytes, not"):
        real_adapters_dir(index=index, cache=tmp_path / "cache", base_url=url, local=[tmp_path / "no"])
    assert not (tmp_path / "cache").exists()


def test_the_index_copy_matches_the_shared_index(real):
    assert (Path(__file__).parent / "data" / "real-adapters-index.json").read_bytes() == (
        real / "index.json"
    ).read_bytes()


def test_the_method_description_in_the_repository_is_the_shared_spec():
    shared = Path(__file__).resolve().parents[2] / "shared" / "docs" / "share-method.md"
    if not shared.is_file():
        pytest.skip("no ../shared/docs here to compare with")
    ours = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    assert ours.split("\n", 2)[2] == shared.read_text()
