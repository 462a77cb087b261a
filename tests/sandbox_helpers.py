"""Helpers shared by the sandbox tests: host process scans, a local HTTP server, a run of
this Python as an unprivileged user, and git on the host."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

NOBODY_SETPRIV = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def host_pids(marker: str) -> list[int]:
    """The host processes (not this one) whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing."""

    def log_message(self, *args: object) -> None:
        pass

    def send_body(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ReachableHandler(QuietHandler):
    """Answers every GET with 200 and ``reachable`` (no Content-Length)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"reachable")


class HelloHandler(QuietHandler):
    """Answers every GET with 200 and ``hello from the host``."""

    def do_GET(self) -> None:
        self.send_body(b"hello from the host")


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """Serve ``handler`` on a loopback port (yielded) in a thread, shut down on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def run_as_nobody(
    create_args: str, command: str, *, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """As uid 65534 (as the caller when that is not root already), with a fresh HOME and
    state dir: create a sandbox (``Sandbox.create(project_dir=..., <create_args>)``) on a
    project holding ``a.txt``, run ``command`` there and a curl to example.com, and print
    ``<exit code> <stdout words> <changed paths> <curl's HTTP code>``.

    Skips when this Python environment is not readable by uid 65534.
    """
    uid_cmd: list[str] = []
    if os.getuid() == 0:
        uid_cmd = NOBODY_SETPRIV
        probe = subprocess.run(
            [*uid_cmd, sys.executable, "-c", "import stockade.sandbox"], capture_output=True
        )
        if probe.returncode != 0:
            pytest.skip(
                "this Python environment is not readable by uid 65534: "
                + probe.stderr.decode(errors="replace")[-200:]
            )
    home = Path(tempfile.mkdtemp(prefix="stockade-nobody-", dir="/tmp"))
    (home / "project").mkdir(parents=True)
    (home / "project" / "a.txt").write_text("a\n")
    if os.getuid() == 0:
        for p in [home, home / "project", home / "project" / "a.txt"]:
            os.chown(p, 65534, 65534)
    script = (
        "from stockade import Sandbox\n"
        f"with Sandbox.create(project_dir={str(home / 'project')!r}, {create_args}) as sb:\n"
        f"    r = sb.commands.run({command!r})\n"
        "    net = sb.commands.run('curl -s -o /dev/null -w %{http_code} http://example.com/')\n"
        "    print(r.exit_code, r.stdout.split(), sorted(c.path for c in sb.workspace.diff()),\n"
        "          net.stdout)\n"
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "STOCKADE_STATE_DIR": str(home / "state"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }
    try:
        return subprocess.run(
            [*uid_cmd, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            cwd=home,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


def write_trusted_config(project: Path, body: str) -> Path:
    """Write the project's ``stockade.toml`` and trust it, as its user does with ``stockade
    trust``: settings such as ``[secrets]`` or loopback allow rules are honoured from a
    project file only once it is trusted (in the test's own XDG_CONFIG_HOME)."""
    from stockade.config import trust_store
    from stockade.config.trust import file_digest

    path = project / "stockade.toml"
    path.write_text(body)
    trust_store().trust(path, file_digest(path.read_bytes()))
    return path


def git(repo: Path, *args: str, user: str = "u") -> str:
    """Run ``git *args`` in ``repo`` as ``user`` (name and email), with no system or global
    configuration; assert it succeeds and return its stdout (undecodable bytes escaped)."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(repo),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
    }
    argv = ["git", "-c", f"user.name={user}", "-c", f"user.email={user}@x", *args]
    proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8", "surrogateescape")


#: Forks until fork fails (bounded, in case the limit failed), prints how many children it
#: got, then kills and reaps them all: what follows runs with the whole pids budget again.
FORK_BOMB = (
    "import os, signal\n"
    "children = []\n"
    "for _ in range(2000):\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid == 0:\n"
    "        signal.pause(); os._exit(0)\n"
    "    children.append(pid)\n"
    "print(len(children), flush=True)\n"
    "for pid in children:\n"
    "    os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)\n"
)
