"""The Hub, against real Hub-compatible servers on 127.0.0.1: olah for downloads, a small upload server for pushes.

The CLI runs in this process with the environment a fresh process would get (hub_settings);
the tests that a token never reaches the screen run it in a real process.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from share_convert.cli import app

from .hub_servers import Olah, UploadServer, hub_env, hub_settings, make_repo

GOOD = "gpt2-c_attn/winkitee__peft-lora-gpt2"


@pytest.fixture(scope="module")
def olah(tmp_path_factory, real):
    root = tmp_path_factory.mktemp("olah")
    server = Olah(root)
    m = server.mirrors
    make_repo(
        m, "alice/imdb", {f: real / GOOD / f for f in ("adapter_config.json", "adapter_model.safetensors")}, tag="v1"
    )
    src = real / "gpt2-c_attn/ShutterStack__peft_model"
    make_repo(
        m, "bob/collection", {f"shutter/{f}": src / f for f in ("adapter_config.json", "adapter_model.safetensors")}
    )
    make_repo(m, "bob/collection", {"README.md": b"# a second commit on main\n"})
    make_repo(m, "carol/empty", {"README.md": b"# nothing here\n"})
    yield server
    server.stop()


@dataclass
class Ran:
    """What a run of the CLI gave: its exit code and what it printed on each stream."""

    returncode: int
    stdout: str
    stderr: str


def cli(args, env) -> Ran:
    """Run the CLI in this process, set up as a fresh process started with ``env`` would be."""
    with hub_settings(env):
        result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug: show its traceback
    return Ran(result.exit_code, result.stdout, result.stderr)


def cli_process(args, env) -> subprocess.CompletedProcess:
    """Run the CLI in a real process with only the local servers reachable.

    For the tests that a token never reaches the screen: a real process shows everything that
    would reach the user's terminal, huggingface_hub's log records and warnings included.
    """
    return subprocess.run(
        [sys.executable, "-m", "share_convert.cli", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_huggingface_hub_downloads_and_revisions_work_against_olah(olah, tmp_path, real):
    from huggingface_hub import hf_hub_download, snapshot_download

    with hub_settings(hub_env(olah.url, tmp_path / "home")):
        snapshot_download("alice/imdb", revision="v1")
        cfg = hf_hub_download("alice/imdb", "adapter_config.json")
    assert open(cfg, "rb").read() == (real / GOOD / "adapter_config.json").read_bytes()


def test_merge_reads_adapters_from_the_hub_with_revision_and_subfolder(olah, tmp_path, real):
    env = hub_env(olah.url, tmp_path / "home")
    out = tmp_path / "c.safetensors"
    proc = cli(["merge", "hf://alice/imdb@v1", "hf://bob/collection/shutter", "-o", out, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    import json

    tasks = {t["task"]: t for t in json.loads(proc.stdout)["tasks"]}
    assert set(tasks) == {"imdb", "shutter"}
    assert tasks["imdb"]["source"] == "hf://alice/imdb@v1"


@pytest.mark.parametrize(
    "address, needle",
    [
        ("hf://alice/nope", "repository not found"),
        ("hf://alice/imdb@nope", "revision not found"),  # olah answers "repository not found" for a bad revision
        ("hf://carol/empty", "holds no adapter"),
        ("hf://alice", "not a Hub address"),
    ],
)
def test_hub_errors_are_one_clear_line(olah, tmp_path, address, needle):
    proc = cli(["merge", address, "-o", tmp_path / "c.safetensors"], hub_env(olah.url, tmp_path / "home"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and (needle in lines[0] or "repository or revision not found" in lines[0]), proc.stderr
    assert not (tmp_path / "c.safetensors").exists()


def test_offline_without_a_cached_copy_is_one_clear_line(olah, tmp_path):
    proc = cli(
        ["merge", "hf://alice/imdb", "-o", tmp_path / "c.safetensors"],
        hub_env(olah.url, tmp_path / "home", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2 and "offline" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_offline_with_a_cached_copy_works(olah, tmp_path):
    home = tmp_path / "home"
    assert cli(["merge", "hf://alice/imdb", "-o", tmp_path / "a.safetensors"], hub_env(olah.url, home)).returncode == 0
    proc = cli(
        ["merge", "hf://alice/imdb", "-o", tmp_path / "b.safetensors"],
        hub_env("http://127.0.0.1:9", home, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def uploads(olah):
    server = UploadServer(olah.mirrors)
    yield server
    server.stop()


def test_push_then_pull_through_olah_is_byte_identical(olah, uploads, tmp_path, merged):
    ckpt = merged("gpt2-c_attn")
    push = cli(
        ["push", ckpt, "dave/share-gpt2", "--token", "hf_secret_value", "--license", "mit"],
        hub_env(uploads.url, tmp_path / "h1"),
    )
    assert push.returncode == 0, push.stderr
    assert "hf_secret_value" not in push.stdout + push.stderr
    assert any(p.startswith("/api/repos/create") for p in uploads.received)
    pulled = cli(["pull", "dave/share-gpt2", "-o", tmp_path / "pulled"], hub_env(olah.url, tmp_path / "h2"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled/share.safetensors").read_bytes() == ckpt.read_bytes()
    card = (tmp_path / "pulled/README.md").read_text()
    assert card.startswith("---\nlibrary_name: share-convert\nbase_model: gpt2\nlicense: mit\ntags:\n- lora\n- share")
    assert "share-convert extract hf://dave/share-gpt2 --task" in card and "| gsj-rifat__tmp |" in card
    assert (tmp_path / "pulled/share_config.json").is_file()


def test_hub_checkpoints_work_wherever_a_path_does(olah, uploads, tmp_path, real, merged):
    ckpt = merged("gpt2-c_attn")
    assert cli(["push", ckpt, "erin/share", "--revision", "v2"], hub_env(uploads.url, tmp_path / "h1")).returncode == 0
    env = hub_env(olah.url, tmp_path / "h2")
    info = cli(["info", "hf://erin/share@v2", "--json"], env)
    assert info.returncode == 0, info.stderr
    ext = cli(["extract", "hf://erin/share@v2", "--task", "gsj-rifat__tmp", "-o", tmp_path / "x"], env)
    assert ext.returncode == 0 and (tmp_path / "x/adapter_model.safetensors").is_file()
    add = cli(
        [
            "add",
            "hf://erin/share@v2",
            str(real / "gpt2-c_attn+c_proj/parikshit-06__legal"),
            "-o",
            tmp_path / "y.safetensors",
        ],
        env,
    )
    assert add.returncode == 0, add.stderr
    merged = cli(
        [
            "merge",
            "hf://erin/share@v2",
            str(real / "gpt2-c_attn+c_proj/parikshit-06__medical"),
            "-o",
            tmp_path / "z.safetensors",
        ],
        env,
    )
    assert merged.returncode == 0, merged.stderr


def test_authentication_failure_is_one_line_and_never_shows_the_token(olah, tmp_path, merged):
    server = UploadServer(olah.mirrors, require_token="hf_right")
    try:
        ckpt = merged(GOOD)
        proc = cli_process(
            ["push", ckpt, "frank/x", "--token", "hf_wrong_token_123"], hub_env(server.url, tmp_path / "h")
        )
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "authentication failed" in lines[0]
        assert "hf_wrong_token_123" not in proc.stdout + proc.stderr
    finally:
        server.stop()


def test_pull_of_a_repository_without_a_checkpoint_fails_cleanly(olah, tmp_path):
    proc = cli(["pull", "alice/imdb", "-o", tmp_path / "p"], hub_env(olah.url, tmp_path / "h"))
    assert proc.returncode == 2 and "holds no share.safetensors" in proc.stderr


def test_hf_token_from_the_environment_is_used_and_never_shown(olah, tmp_path, merged):
    server = UploadServer(olah.mirrors, require_token="hf_from_env_456")
    try:
        ckpt = merged(GOOD)
        proc = cli_process(["push", ckpt, "gina/x"], hub_env(server.url, tmp_path / "h", HF_TOKEN="hf_from_env_456"))
        assert proc.returncode == 0, proc.stderr
        assert "hf_from_env_456" not in proc.stdout + proc.stderr
    finally:
        server.stop()
