"""Local Hub-compatible servers for the tests: olah (downloads) and a tiny upload server.

olah serves git repositories under ``<mirrors>/models/<owner>/<name>`` offline, with its
upstream pointed at a closed local port. olah has no upload API, so :class:`UploadServer`
implements the endpoints huggingface_hub's ``create_repo``, ``create_branch`` and
``upload_folder`` use, committing what it receives into those same git repositories, so that a
push followed by a pull goes through both servers. :class:`CuttingProxy`, put in front of
either, passes everything through but can cut a connection in the middle of a file, once, as a
network failure would.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

GIT = ["git", "-c", "user.email=tests@share-convert", "-c", "user.name=tests"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_repo(mirrors: Path, repo_id: str, files: dict[str, bytes | Path], *, tag: str | None = None) -> Path:
    """A git repository holding ``files`` (path in repo -> content or file to copy), committed on main."""
    path = mirrors / "models" / repo_id
    path.mkdir(parents=True, exist_ok=True)
    if not (path / ".git").exists():
        subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    for name, content in files.items():
        dst = path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    subprocess.run([*GIT, "-C", str(path), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(path), "commit", "-q", "-m", "files"], check=True)
    if tag:
        subprocess.run([*GIT, "-C", str(path), "tag", tag], check=True)
    return path


class Olah:
    """An olah server on 127.0.0.1, offline, serving ``mirrors``."""

    def __init__(self, root: Path):
        self.root = root
        self.mirrors = root / "mirrors"
        self.mirrors.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        closed = free_port()  # nothing listens there: olah's upstream is unreachable
        config = root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{root / "cache"}"\nmirrors-path = ["{self.mirrors}"]\n'
            f'hf-scheme = "http"\nhf-netloc = "127.0.0.1:{closed}"\nhf-lfs-netloc = "127.0.0.1:{closed}"\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n"
        )
        olah = Path(sys.executable).with_name("olah-cli")
        self.proc = subprocess.Popen(
            [str(olah), "-c", str(config)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("olah exited at start") from None
                time.sleep(0.2)
        raise RuntimeError("olah did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class UploadServer:
    """create_repo, create_branch, preupload and commit (with added and deleted files; plus
    validate-yaml, which upload_folder calls for a README, and the file list of a revision, which
    its delete_patterns reads), writing into git repos under ``mirrors``."""

    def __init__(self, mirrors: Path, *, require_token: str | None = None):
        self.mirrors, self.require_token = mirrors, require_token
        self.received: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                """The file list of a revision (list_repo_files, which upload_folder's delete_patterns uses)."""
                m = re.match(r"^/api/models/(.+?)/tree/([^?/]+)", self.path)
                repo = server.mirrors / "models" / m.group(1) if m else None
                if repo is None or not repo.exists():
                    return self.reply(404, {"error": "Repository not found"})
                listed = subprocess.run(
                    ["git", "-C", str(repo), "ls-tree", "-r", "-l", m.group(2)], capture_output=True, text=True
                )
                if listed.returncode:
                    return self.reply(404, {"error": "Revision not found"})
                files = []
                for line in listed.stdout.splitlines():
                    info, path = line.split("\t", 1)
                    _, _, oid, size = info.split()
                    files.append({"type": "file", "path": path, "oid": oid, "size": int(size)})
                return self.reply(200, files)

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.received.append(self.path)
                if server.require_token and self.headers.get("Authorization") != f"Bearer {server.require_token}":
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                if self.path == "/api/repos/create":
                    p = json.loads(body)
                    repo_id = f"{p['organization']}/{p['name']}" if p.get("organization") else p["name"]
                    repo = server.mirrors / "models" / repo_id
                    if not (repo / ".git").exists():
                        repo.mkdir(parents=True, exist_ok=True)
                        subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
                        subprocess.run(
                            [*GIT, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "init"], check=True
                        )
                    return self.reply(200, {"url": f"{server.url}/{repo_id}", "name": repo_id})
                if self.path.startswith("/api/validate-yaml"):  # huggingface_hub checks a README's front matter
                    return self.reply(200, {"errors": [], "warnings": []})
                m = re.match(r"^/api/models/(.+?)/(preupload|commit|branch)/([^?]+)", self.path)
                if not m:
                    return self.reply(404, {"error": "not found"})
                repo_id, verb, rev = m.groups()
                repo = server.mirrors / "models" / repo_id
                if not repo.exists():
                    return self.reply(404, {"error": "Repository not found"})
                if verb == "branch":
                    subprocess.run([*GIT, "-C", str(repo), "branch", "-f", rev], check=True, capture_output=True)
                    return self.reply(200, {})
                if verb == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                subprocess.run([*GIT, "-C", str(repo), "checkout", "-q", rev], check=True, capture_output=True)
                for item in lines:
                    if item["key"] == "file":
                        dst = repo / item["value"]["path"]
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        dst.write_bytes(base64.b64decode(item["value"]["content"]))
                    elif item["key"] == "deletedFile":
                        (repo / item["value"]["path"]).unlink(missing_ok=True)
                subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True)
                subprocess.run(  # a commit that changes nothing (the same checkpoint again) is still one
                    [*GIT, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", header["summary"]], check=True
                )
                oid = subprocess.run(
                    ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
                ).stdout.strip()
                subprocess.run([*GIT, "-C", str(repo), "checkout", "-q", "main"], check=True, capture_output=True)
                return self.reply(
                    200, {"commitUrl": f"{server.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class CuttingProxy:
    """A proxy on 127.0.0.1 in front of a local Hub server (``upstream``) that passes requests and
    answers through, except for the cuts armed with :meth:`cut_download` and :meth:`cut_upload`:
    each fires once, on the next matching request, and closes the connection mid-transfer.

    With ``ranges``, a GET with a ``Range: bytes=A-B`` header is answered as the Hub answers it
    (206, those bytes only: olah ignores ranges), and ``gets`` lists every GET as (path, its Range
    header or None)."""

    def __init__(self, upstream: str, *, ranges: bool = False):
        self.upstream = urlsplit(upstream).netloc
        self.ranges = ranges
        self.gets: list[tuple[str, str | None]] = []
        self._download: tuple[str, int, int] | None = None  # file name, bytes sent, downloads cut
        self._upload: tuple[str, int] | None = None  # file name, commits cut
        self.cuts: list[str] = []  # the paths of the requests that were cut
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def cut(self) -> None:
                proxy.cuts.append(self.path)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

            def forward(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                armed = proxy._upload
                if armed and self.command == "POST" and "/commit/" in self.path and f'"{armed[0]}"'.encode() in body:
                    proxy._upload = (armed[0], armed[1] - 1) if armed[1] > 1 else None
                    return self.cut()  # the commit never reaches the server whole: the line went down
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                status, wanted = answer.status, self.headers.get("Range")
                if self.command == "GET":
                    proxy.gets.append((self.path, wanted))
                if proxy.ranges and wanted and status == 200 and self.command == "GET":
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    data, status = data[int(first) : int(last) + 1], 206
                self.send_response(status)
                head = self.command == "HEAD"  # its Content-Length is the file's: passed on as it is
                for key, value in answer.getheaders():
                    if key.lower() in ("transfer-encoding", "connection", "server", "date"):
                        continue
                    if key.lower() == "content-length" and not head:
                        continue
                    self.send_header(key, value.replace(proxy.upstream, proxy.netloc))  # redirects come back here
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    return
                armed = proxy._download
                if armed and self.command == "GET" and self.path.split("?")[0].endswith("/" + armed[0]) and data:
                    name, after, times = armed
                    proxy._download = (name, 0, times - 1) if times > 1 else None  # later tries get nothing
                    self.wfile.write(data[:after])
                    return self.cut()
                self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = forward  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.netloc = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"http://{self.netloc}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def cut_download(self, name: str, after: int, *, times: int = 1) -> None:
        """Cut the next download of a file named ``name`` after its first ``after`` bytes, and the
        ``times - 1`` tries after it (a resumed download) before their first byte."""
        self._download = (name, after, times)

    def cut_upload(self, name: str, *, times: int = 1) -> None:
        """Cut the next ``times`` commits that carry a file named ``name`` (a first one and the
        client's retries), before the server has all of it."""
        self._upload = (name, times)

    def disarm(self) -> None:
        """Cut nothing more: pass everything through."""
        self._download = self._upload = None

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a process that sees only ``endpoint`` as the Hub, with its own cache under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}, **extra)
    return env


@contextmanager
def hub_settings(env: dict[str, str]) -> Iterator[None]:
    """This process set up as a fresh one started with ``env`` would be, for huggingface_hub.

    The ``HF_*`` variables are set as in ``env`` (the others removed), and huggingface_hub's
    constants, which it reads from the environment once at import (cache folder, token file,
    endpoint, offline mode), are recomputed from them by running its ``constants`` module afresh;
    everything is restored on exit. This lets the Hub tests run the CLI in-process.
    """
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("HF_") and k not in env]:
            mp.delenv(key)
        for key, value in env.items():
            if key.startswith("HF_"):
                mp.setenv(key, value)
        spec = importlib.util.spec_from_file_location("_fresh_hf_constants", constants.__file__)
        fresh = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fresh)
        for name in dir(fresh):
            if name.isupper() and getattr(fresh, name) != getattr(constants, name, None):
                mp.setattr(constants, name, getattr(fresh, name), raising=False)
        yield
