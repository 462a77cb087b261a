"""Egress through the tunnel, end to end on the namespace backend (real bwrap, real proxy).

Servers are on this machine's loopback only; the one exception is the pip check against the
package index, which the egress issue allows.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from sandbox_helpers import HelloHandler, QuietHandler, serve_http, write_trusted_config
from stockade import Sandbox

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def host_server() -> Iterator[int]:
    with serve_http(HelloHandler) as port:
        yield port


@pytest.fixture(autouse=True, params=["fd", "framed"])
def egress_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both paths of the namespace backend: sockets handed to the host
    (protocol 1.3, the default there) and framed streams (the path of every other backend)."""
    path: str = request.param
    monkeypatch.setenv("STOCKADE_INTERNAL_EGRESS_FD", "1" if path == "fd" else "0")
    return path


def write_config(project: Path, body: str) -> None:
    write_trusted_config(project, body)  # loopback allow rules and secrets need trust


VIA_PROXY = 'curl -sS --noproxy "" -x http://127.0.0.1:3128'


def test_default_policy_denies_everything_and_says_why(
    namespace_backend: str, project: Path
) -> None:
    with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
        env = sb.commands.run("env").stdout
        assert "HTTPS_PROXY=http://127.0.0.1:3128" in env and "https_proxy=" in env
        r = sb.commands.run("curl -sS -D - -o /dev/null http://example.com/")
        assert "403 Forbidden by stockade network policy" in r.stdout
        assert "X-Stockade-Denied: example.com is not in the allow list" in r.stdout
        r = sb.commands.run("curl -sS https://example.com/")
        assert r.exit_code != 0 and "403" in r.stderr
        # A raw socket reaches nothing outside: the namespace sends every direct connection
        # to the agent, which answers with the policy's refusal and closes.
        script = (
            "import socket\n"
            "s = socket.create_connection(('203.0.113.9', 443), timeout=3)\n"
            "data = b''\n"
            "while chunk := s.recv(4096):\n"
            "    data += chunk\n"
            "print(data.decode())\n"
        )
        r = sb.commands.run(["python3", "-c", script])
        assert r.stdout.startswith("HTTP/1.1 403 Forbidden by stockade network policy"), r
        assert "network policy denied a direct connection to 203.0.113.9:443" in r.stdout
        if sb.commands.run("test -e /proc/net/if_inet6").exit_code == 0:  # IPv6 here too
            v6 = script.replace("'203.0.113.9'", "'2001:db8::9'")
            r = sb.commands.run(["python3", "-c", v6])
            assert "denied a direct connection to [2001:db8::9]:443" in r.stdout, r
        r = sb.commands.run("curl -sS -f --noproxy '*' http://198.51.100.7:8080/")
        assert r.exit_code != 0 and "403" in r.stderr
        # ...and the sandbox cannot change how its namespace routes: it does not own it.
        for cmd in ("/usr/sbin/ip route add default dev lo", "/usr/sbin/iptables -t nat -F"):
            assert sb.commands.run(cmd).exit_code != 0, cmd
        log = sb.network.log()
        assert {(c["host"], c["decision"]) for c in log} >= {("example.com", "denied")}
        direct = [c for c in log if c["kind"] == "direct"]
        assert direct and direct[0]["host"] == "203.0.113.9" and direct[0]["port"] == 443
        assert direct[0]["decision"] == "denied" and direct[0]["bytes_up"] == 0
    events = [json.loads(line) for line in sb.audit_path.read_text().splitlines()]
    denied = [e for e in events if e["action"] == "egress.denied"]
    assert denied and denied[0]["target"].startswith("example.com:")
    assert "203.0.113.9:443" in {e["target"] for e in denied}  # the direct attempt too


def test_loopback_name_refused_unless_address_allowed(
    namespace_backend: str, project: Path, host_server: int
) -> None:
    write_config(project, '[network]\nallow = ["localhost"]\n')
    url = f"http://localhost:{host_server}/"
    with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
        r = sb.commands.run(f"{VIA_PROXY} -D - -o /dev/null {url}")
        assert "403" in r.stdout and "loopback" in r.stdout
        sb.network.allow("127.0.0.1")  # live change, no restart
        r = sb.commands.run(f"{VIA_PROXY} {url}")
        assert r.stdout == "hello from the host", r.stderr


def test_live_allow_and_deny(namespace_backend: str, project: Path, host_server: int) -> None:
    with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
        url = f"http://127.0.0.1:{host_server}/"
        assert "403" in sb.commands.run(f"{VIA_PROXY} -D - -o /dev/null {url}").stdout
        sb.network.allow(f"127.0.0.1:{host_server}")
        assert sb.commands.run(f"{VIA_PROXY} {url}").stdout == "hello from the host"
        sb.network.deny("127.0.0.1")
        assert "403" in sb.commands.run(f"{VIA_PROXY} -D - -o /dev/null {url}").stdout
        records = sb.network.log()
        assert [r["decision"] for r in records] == ["denied", "allowed", "denied"]
        assert records[1]["bytes_down"] > 0


def test_raw_tcp_forward(namespace_backend: str, project: Path, host_server: int) -> None:
    write_config(project, f'[network]\nallow = ["127.0.0.1"]\ntcp = ["127.0.0.1:{host_server}"]\n')
    with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
        forwards = sb.commands.run("echo $STOCKADE_TCP_FORWARDS").stdout.strip()
        local = forwards.rsplit(":", 1)[1]
        r = sb.commands.run(f"curl -sS --noproxy '*' http://127.0.0.1:{local}/")
        assert r.stdout == "hello from the host", r.stderr


def test_cli_net_commands(namespace_backend: str, project: Path, host_server: int) -> None:
    import os
    import subprocess
    import sys

    def stockade(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stockade.cli.main", *args],
            capture_output=True, text=True, timeout=60, env={**os.environ},
        )  # fmt: skip

    name = f"n-{uuid.uuid4().hex[:8]}"
    assert stockade("create", "--name", name, "-C", str(project)).returncode == 0
    try:
        url = f"http://127.0.0.1:{host_server}/"
        r = stockade(
            "exec", name, "--", "sh", "-c", f"{VIA_PROXY} -o /dev/null -w '%{{http_code}}' {url}"
        )
        assert r.stdout == "403"
        assert stockade("net", "allow", name, "127.0.0.1").returncode == 0
        r = stockade("exec", name, "--", "sh", "-c", f"{VIA_PROXY} {url}")
        assert r.stdout == "hello from the host"
        log = stockade("net", "log", name).stdout
        assert "denied" in log and "allowed" in log
        rows = [
            json.loads(line) for line in stockade("net", "log", name, "--json").stdout.splitlines()
        ]
        assert rows[-1]["decision"] == "allowed" and rows[-1]["rule"] == "127.0.0.1"
    finally:
        stockade("rm", "--force", name)


def _pypi_reachable() -> str | None:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        return f"pypi.org:443 is not reachable from this host ({exc})"
    return None


def test_pip_install_through_the_proxy(namespace_backend: str, project: Path) -> None:
    problem = _pypi_reachable()
    if problem:
        pytest.skip(problem)
    write_config(project, '[network]\npresets = ["python-packages"]\n')
    with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
        venv = sb.commands.run("python3 -m venv /tmp/v", timeout=120)
        if venv.exit_code != 0:
            pytest.skip(f"python3 -m venv does not work in the sandbox: {venv.stderr[-300:]}")
        pip = "/tmp/v/bin/pip install --no-cache-dir --disable-pip-version-check"
        r = sb.commands.run(f"{pip} six==1.16.0", timeout=150)
        assert r.exit_code == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert (
            sb.commands.run("/tmp/v/bin/python -c 'import six; print(six.__version__)'").stdout
            == "1.16.0\n"
        )
        r = sb.commands.run("curl -sS -D - -o /dev/null http://example.com/")
        assert "X-Stockade-Denied: example.com is not in the allow list" in r.stdout


def test_pip_fails_with_the_policy_reason_by_default(namespace_backend: str, project: Path) -> None:
    with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
        venv = sb.commands.run("python3 -m venv /tmp/v", timeout=120)
        if venv.exit_code != 0:
            pytest.skip(f"python3 -m venv does not work in the sandbox: {venv.stderr[-300:]}")
        r = sb.commands.run(
            "/tmp/v/bin/pip install --no-cache-dir --retries 1 --timeout 5 six", timeout=120
        )
        assert r.exit_code != 0
        assert "stockade network policy" in r.stdout + r.stderr


class _RecordingHandler(QuietHandler):
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(
            (self.headers.get("Host", ""), self.headers.get("Authorization", ""))
        )
        body = b"recorded"
        self.send_body(body)


def test_secret_reaches_only_its_host_and_never_the_sandbox(
    namespace_backend: str, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stockade.egress.tls import SandboxCA

    # An HTTPS server on loopback with a certificate from a test CA the host trusts.
    upstream_ca = SandboxCA.create(tmp_path / "upstream-ca", name="test upstream")
    bundle = tmp_path / "host-trust.pem"
    bundle.write_bytes(upstream_ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    _RecordingHandler.seen = []
    servers = []
    for host in ("127.0.0.1", "localhost"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
        server.socket = upstream_ca.leaf_context(host).wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    secret = f"real-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("TEST_API_TOKEN", secret)
    write_config(
        project,
        '[network]\nallow = ["127.0.0.1", "localhost"]\n'
        '[secrets.API_TOKEN]\nenv = "TEST_API_TOKEN"\nhosts = ["127.0.0.1"]\n',
    )
    try:
        with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
            token = sb.commands.run("printf %s $API_TOKEN").stdout
            assert token.startswith("stockade-secret-API_TOKEN-") and secret not in token
            port_a, port_b = (s.server_address[1] for s in servers)
            auth = '-H "Authorization: Bearer $API_TOKEN"'
            r = sb.commands.run(f"{VIA_PROXY} {auth} https://127.0.0.1:{port_a}/")
            assert r.stdout == "recorded", r.stderr
            r = sb.commands.run(f"{VIA_PROXY} -k {auth} https://localhost:{port_b}/")
            assert r.stdout == "recorded", r.stderr
            assert _RecordingHandler.seen[0] == (f"127.0.0.1:{port_a}", f"Bearer {secret}")
            assert _RecordingHandler.seen[1] == (f"localhost:{port_b}", f"Bearer {token}")
            # Search for the value without ever writing it into the sandbox: two halves,
            # joined only inside the search commands.
            half = len(secret) // 2
            halves = {"A": secret[:half], "B": secret[half:]}
            in_env = sb.commands.run(
                'cat /proc/[0-9]*/environ 2>/dev/null | tr "\\0" "\\n" | grep -c "$A$B"; true',
                env=halves,
            )
            assert in_env.stdout.strip() == "0"
            in_files = sb.commands.run(
                'grep -rl "$A$B" / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr'
                " 2>/dev/null; true",
                env=halves,
            )
            assert in_files.stdout == ""
        assert secret not in sb.audit_path.read_text()
        for path in sb.state_dir.parent.rglob("*") if sb.state_dir.exists() else []:
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    finally:
        for server in servers:
            server.shutdown()


class _PatternHandler(QuietHandler):
    """GET /N answers N bytes of a fixed pattern; POST answers the sha256 of its body."""

    def do_GET(self) -> None:
        size = int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = bytes(range(256)) * 4096
        while size:
            piece = block[: min(size, len(block))]
            self.wfile.write(piece)
            size -= len(piece)

    def do_POST(self) -> None:
        import hashlib

        digest = hashlib.sha256(self.rfile.read(int(self.headers["Content-Length"])))
        body = digest.hexdigest().encode()
        self.send_body(body)


def test_the_agreed_path_carries_every_connection_intact(
    namespace_backend: str, project: Path, egress_path: str
) -> None:
    import hashlib

    server = ThreadingHTTPServer(("127.0.0.1", 0), _PatternHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    size = 20 * 1024 * 1024 + 12345
    block = bytes(range(256)) * 4096
    expected = hashlib.sha256((block * (size // len(block) + 1))[:size]).hexdigest()
    write_config(project, f'[network]\nallow = ["127.0.0.1"]\ntcp = ["127.0.0.1:{port}"]\n')
    try:
        with Sandbox.create(project_dir=project, backend=namespace_backend) as sb:
            url = f"http://127.0.0.1:{port}"
            r = sb.commands.run(f"{VIA_PROXY} {url}/{size} | sha256sum")
            assert r.stdout.split()[0] == expected, r.stderr
            # CONNECT (curl's -p), a POST of 5 MB, and the raw TCP forward.
            r = sb.commands.run(
                f"head -c 5000000 /dev/zero | {VIA_PROXY} -p --data-binary @- {url}/"
            )
            assert r.stdout == hashlib.sha256(bytes(5000000)).hexdigest(), r.stderr
            local = sb.commands.run("echo $STOCKADE_TCP_FORWARDS").stdout.strip().rsplit(":")[-1]
            r = sb.commands.run(f"curl -sS --noproxy '*' http://127.0.0.1:{local}/1000 | wc -c")
            assert r.stdout.strip() == "1000", r.stderr
            runtime = sb._inner._egress
            assert runtime is not None and runtime.tunnel is not None
            tunnel = runtime.tunnel
            # The last connection is recorded (and its framed stream closed) when the proxy
            # sees it end, a moment after curl has exited on a slow machine.
            deadline = time.monotonic() + 10
            while (len(tunnel) or len(sb.network.log()) < 3) and time.monotonic() < deadline:
                time.sleep(0.05)
            if egress_path == "fd":
                assert tunnel.fd_streams and tunnel.fd_accepted == 3
            else:
                assert not tunnel.fd_streams and tunnel.fd_accepted == 0
            assert len(tunnel) == 0  # no framed stream left open (none existed on fd)
            records = sb.network.log()
            assert [r["decision"] for r in records] == ["allowed"] * 3
            assert records[0]["bytes_down"] > size and records[1]["bytes_up"] > 5000000
    finally:
        server.shutdown()
