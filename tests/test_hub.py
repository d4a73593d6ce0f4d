"""The Hub, against real Hub-compatible servers on 127.0.0.1: olah for downloads, a small upload server for pushes.

The CLI runs in this process with the environment a fresh process would get (hub_settings);
the tests that a token never reaches the screen run it in a real process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from share_convert.cli import app

from .hub_servers import CuttingProxy, Olah, UploadServer, hub_env, hub_settings, make_repo

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


def test_pull_into_an_existing_empty_folder_needs_no_force(olah, uploads, tmp_path, merged):
    ckpt = merged("gpt2-c_attn")
    assert cli(["push", ckpt, "fay/share"], hub_env(uploads.url, tmp_path / "h1")).returncode == 0
    (tmp_path / "empty").mkdir()
    pulled = cli(["pull", "fay/share", "-o", tmp_path / "empty"], hub_env(olah.url, tmp_path / "h2"))
    assert pulled.returncode == 0, pulled.stderr
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "README.md",
        "share.safetensors",
        "share_config.json",
    ]


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
    # a task taken from a Hub checkpoint records its address, not where the Hub cache put it
    from share_convert.checkpoint import Checkpoint

    assert Checkpoint(tmp_path / "z.safetensors").task("gsj-rifat__tmp")["from_checkpoint"] == "hf://erin/share@v2"
    assert str(tmp_path / "h2").encode() not in (tmp_path / "z.safetensors").read_bytes()


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


def checkpoint_with_base(real, tmp_path, base: str):
    """A checkpoint of one real gpt2 adapter whose config names ``base`` as its base model."""
    adapter = tmp_path / "imdb"
    shutil.copytree(real / GOOD, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=base)))
    out = tmp_path / "share.safetensors"
    assert cli(["merge", adapter, "-o", out], {}).returncode == 0
    return out


def test_push_tells_which_recorded_values_look_like_local_paths_before_uploading(olah, uploads, tmp_path, real):
    ckpt = checkpoint_with_base(real, tmp_path, "/home/alice/models/gpt2")
    push = cli(["push", ckpt, "hana/share", "--json"], hub_env(uploads.url, tmp_path / "h1"))
    assert push.returncode == 0, push.stderr
    field = "adapter_config.base_model_name_or_path"
    assert json.loads(push.stdout)["local_paths"] == [
        {"task": "imdb", "field": field, "value": "/home/alice/models/gpt2"}
    ]
    warnings = push.stderr.strip().splitlines()
    assert len(warnings) == 1 and "task 'imdb'" in warnings[0] and field in warnings[0] and "published" in warnings[0]
    assert cli(["pull", "hana/share", "-o", tmp_path / "p"], hub_env(olah.url, tmp_path / "h2")).returncode == 0
    assert "/home/alice" not in (tmp_path / "p/README.md").read_text()  # the card names no local base


@pytest.mark.parametrize("base", ["/home/alice/models/gpt2", "~/gpt2", "C:\\Users\\alice\\gpt2", "gpt2-here"])
def test_push_with_no_local_paths_refuses_them_and_uploads_nothing(olah, uploads, tmp_path, real, monkeypatch, base):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2-here").mkdir()  # a base model named by a folder of this machine
    ckpt = checkpoint_with_base(real, tmp_path, base)
    push = cli(["push", ckpt, "ivan/share", "--no-local-paths"], hub_env(uploads.url, tmp_path / "h1"))
    assert push.returncode == 2
    lines = push.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning:") and "nothing was uploaded" in lines[1], push.stderr
    assert uploads.received == [] and not (olah.mirrors / "models/ivan/share").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # cut off
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # one byte changed
        lambda data: b"not a checkpoint",
    ],
    ids=["truncated", "changed", "other"],
)
def test_pull_of_a_damaged_checkpoint_writes_nothing(olah, tmp_path, merged, damage, request):
    repo = f"judy/{request.node.callspec.id}"
    make_repo(olah.mirrors, repo, {"share.safetensors": damage(merged(GOOD).read_bytes())})
    pulled = cli(["pull", repo, "-o", tmp_path / "p"], hub_env(olah.url, tmp_path / "h"))
    assert pulled.returncode == 2 and len(pulled.stderr.strip().splitlines()) == 1, pulled.stderr
    assert "integrity check" in pulled.stderr and str(tmp_path / "h") not in pulled.stderr
    assert not (tmp_path / "p").exists()


@pytest.fixture
def quick_retries(monkeypatch):
    """huggingface_hub's retries of a cut-off transfer, with waits a hundred times shorter.

    huggingface_hub tries a failed request five times more before it gives up: a request through
    utils.http_backoff after waits of 1, 2, 4, 8 and 8 s, a download (file_download.http_get) after
    1 s each. Those waits are what a test of a cut would spend most of its time on; here they are
    10 ms to 80 ms. The tries themselves still happen and are cut: the client and the servers are
    the real ones, only the pauses between tries are shorter.
    """
    import inspect
    import time
    import types

    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    for function in (_http.http_backoff, inspect.unwrap(_http.http_stream_backoff)):
        monkeypatch.setattr(function, "__kwdefaults__", {**function.__kwdefaults__, "base_wait_time": 0.01})
    # file_download uses its module `time` for this sleep alone
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda seconds: time.sleep(seconds / 100)))


def test_a_pull_cut_off_mid_file_writes_nothing_and_a_rerun_completes(olah, uploads, tmp_path, merged, quick_retries):
    ckpt = merged(GOOD)
    assert cli(["push", ckpt, "kate/share"], hub_env(uploads.url, tmp_path / "h1")).returncode == 0
    proxy = CuttingProxy(olah.url)
    try:
        proxy.cut_download("share.safetensors", ckpt.stat().st_size // 2, times=20)  # and each resumed try
        env = hub_env(proxy.url, tmp_path / "h2")
        cut = cli(["pull", "kate/share", "-o", tmp_path / "p"], env)
        assert cut.returncode == 2 and len(cut.stderr.strip().splitlines()) == 1 and proxy.cuts, cut.stderr
        assert not (tmp_path / "p").exists()
        proxy.disarm()
        again = cli(["pull", "kate/share", "-o", tmp_path / "p"], env)
        assert again.returncode == 0, again.stderr
        assert (tmp_path / "p/share.safetensors").read_bytes() == ckpt.read_bytes()
    finally:
        proxy.stop()


def test_a_push_cut_off_mid_upload_leaves_the_repository_as_it_was(olah, uploads, tmp_path, merged, quick_retries):
    first, second = merged(GOOD), merged("gpt2-c_attn")
    assert cli(["push", first, "leo/share"], hub_env(uploads.url, tmp_path / "h")).returncode == 0
    repo = olah.mirrors / "models/leo/share"
    head = subprocess.run(["git", "-C", repo, "rev-parse", "main"], capture_output=True, text=True).stdout
    proxy = CuttingProxy(uploads.url)
    try:
        proxy.cut_upload("share.safetensors", times=20)  # the commit and every retry of it
        cut = cli(["push", second, "leo/share", "--license", "mit"], hub_env(proxy.url, tmp_path / "h"))
        assert cut.returncode == 2 and len(cut.stderr.strip().splitlines()) == 1 and proxy.cuts, cut.stderr
    finally:
        proxy.stop()
    assert subprocess.run(["git", "-C", repo, "rev-parse", "main"], capture_output=True, text=True).stdout == head
    assert cli(["pull", "leo/share", "-o", tmp_path / "a"], hub_env(olah.url, tmp_path / "h2")).returncode == 0
    assert (tmp_path / "a/share.safetensors").read_bytes() == first.read_bytes()
    assert cli(["push", second, "leo/share"], hub_env(uploads.url, tmp_path / "h")).returncode == 0
    assert cli(["pull", "leo/share", "-o", tmp_path / "b"], hub_env(olah.url, tmp_path / "h3")).returncode == 0
    assert (tmp_path / "b/share.safetensors").read_bytes() == second.read_bytes()
