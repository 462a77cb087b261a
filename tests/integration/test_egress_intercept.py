"""TLS interception end to end on loopback: sandbox client -> intercept_https -> HTTPS server.

The upstream is a real threaded HTTPS server whose certificate (for 127.0.0.1) comes from a
test CA; the "sandbox" client trusts only the sandbox CA. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import http.server
import ipaddress
import json
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stockade.egress.intercept import InterceptCounters, intercept_https
from stockade.egress.secrets import SecretSet
from stockade.egress.tls import SandboxCA
from stockade.policy.secret_config import SecretConfig

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LOOPBACK = "127.0.0.1"
REAL_TOKEN = "real-token-value-for-loopback-9f8e7d"
OTHER_VALUE = "real-value-of-a-secret-for-another-host"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- a test CA and an HTTPS server that reports what it received ------------------------


def _test_server_context(tmp_path: Path) -> tuple[ssl.SSLContext, bytes]:
    """A server context for 127.0.0.1 signed by a fresh test CA; returns (ctx, CA PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = tmp_path / "upstream.pem"
    pem.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    return context, ca.public_bytes(serialization.Encoding.PEM)


@dataclass
class Seen:
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: set[tuple[str, int]] = field(default_factory=set)


class EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EchoServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                assert self.rfile.read(2) == b"\r\n"
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _handle(self) -> None:
        body = self._body()
        self.server.seen.connections.add(self.client_address)
        record = {
            "method": self.command,
            "path": self.path,
            "headers": list(self.headers.items()),
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_start": body[:200].decode("latin-1"),
        }
        self.server.seen.requests.append(record)
        if self.path == "/close-delimited":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 100_000)
            self.close_connection = True
            return
        if self.path == "/chunked-response":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"alpha", b"beta" * 10_000, b"gamma"):
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Trailer: done\r\n\r\n")
            return
        if self.path == "/ws":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while data := self.rfile.read1(65536):
                self.wfile.write(data.upper())
                self.wfile.flush()
            self.close_connection = True
            return
        payload = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _handle


class EchoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__((LOOPBACK, 0), EchoHandler)
        self.context = context
        self.seen = Seen()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS per connection, in the connection's own thread.
        request.settimeout(20)
        with self.context.wrap_socket(request, server_side=True) as tls:
            self.RequestHandlerClass(tls, client_address, self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[EchoServer, bytes]]:
    context, ca_pem = _test_server_context(tmp_path)
    server = EchoServer(context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server, ca_pem
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- the interceptor under test, on a loopback listener ---------------------------------


@dataclass
class Proxy:
    port: int
    ca: SandboxCA
    secrets: SecretSet
    accepted: int = 0
    counters: InterceptCounters = field(default_factory=InterceptCounters)
    errors: list[BaseException] = field(default_factory=list)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca.cert_pem.decode())

    def placeholder(self, name: str) -> str:
        return self.secrets.sandbox_env()[name]


@pytest.fixture
async def proxy(
    tmp_path: Path, upstream: tuple[EchoServer, bytes]
) -> AsyncIterator[tuple[Proxy, EchoServer]]:
    server, upstream_ca = upstream
    ca = SandboxCA.create(tmp_path / "sandbox-ca", name="itest")
    secrets = SecretSet.load(
        {
            "TOKEN": SecretConfig(env="HOST_TOKEN", hosts=(LOOPBACK,)),
            "OTHER": SecretConfig(env="HOST_OTHER", hosts=("api.example.com",)),
        },
        {"HOST_TOKEN": REAL_TOKEN, "HOST_OTHER": OTHER_VALUE},
        tmp_path,
        sandbox_id="itest",
    )
    upstream_ssl = ssl.create_default_context(cadata=upstream_ca.decode())
    upstream_port = server.server_address[1]
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    state = Proxy(port=listener.extra(anyio.abc.SocketAttribute.local_port), ca=ca, secrets=secrets)

    async def handle(client: SocketStream) -> None:
        state.accepted += 1
        try:
            up = await anyio.connect_tcp(LOOPBACK, upstream_port)
            await intercept_https(
                client,
                LOOPBACK,
                upstream_port,
                up,
                ca=ca,
                secrets=secrets,
                upstream_ssl=upstream_ssl,
                counters=state.counters,
            )
        except Exception as exc:  # surfaced by the test, never swallowed
            state.errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield state, server
        tg.cancel_scope.cancel()
    assert not state.errors, state.errors


def _connection(proxy: Proxy) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        LOOPBACK, proxy.port, context=proxy.client_context(), timeout=20
    )


def _json(response: http.client.HTTPResponse) -> dict[str, Any]:
    assert response.status == 200, response.read()
    data: dict[str, Any] = json.loads(response.read())
    return data


def _header(record: dict[str, Any], name: str) -> str:
    return next(v for k, v in record["headers"] if k.lower() == name.lower())


# --- tests ------------------------------------------------------------------------------


async def test_placeholder_becomes_real_value_only_for_its_host(
    proxy: tuple[Proxy, EchoServer],
) -> None:
    state, server = proxy
    token, other = state.placeholder("TOKEN"), state.placeholder("OTHER")

    def client() -> tuple[dict[str, Any], dict[str, Any]]:
        conn = _connection(state)
        conn.request("GET", "/first", headers={"Authorization": f"Bearer {token}"})
        first = _json(conn.getresponse())
        conn.request("GET", "/second", headers={"Authorization": f"Bearer {other}"})
        second = _json(conn.getresponse())
        conn.close()
        return first, second

    with anyio.fail_after(20):
        first, second = await anyio.to_thread.run_sync(client)
    assert _header(first, "Authorization") == f"Bearer {REAL_TOKEN}"
    # OTHER may only go to api.example.com: it reaches 127.0.0.1 as the useless placeholder.
    assert _header(second, "Authorization") == f"Bearer {other}"
    assert OTHER_VALUE not in json.dumps(server.seen.requests)
    # Both requests used one sandbox connection and one upstream connection.
    assert state.accepted == 1
    assert len(server.seen.connections) == 1
    assert state.counters.bytes_up > 0 and state.counters.bytes_down > 0


async def test_chunked_upload_of_5_mb_arrives_intact_and_body_is_untouched(
    proxy: tuple[Proxy, EchoServer],
) -> None:
    state, _ = proxy
    token = state.placeholder("TOKEN")
    prefix = f"body mentions {token} and must keep it\n".encode()
    body = prefix + os.urandom(5 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 100_003):
            yield body[start : start + 100_003]

    def client() -> tuple[dict[str, Any], dict[str, Any]]:
        conn = _connection(state)
        conn.request(
            "POST",
            "/upload",
            body=chunks(),
            headers={"Transfer-Encoding": "chunked", "X-Key": token},
            encode_chunked=True,
        )
        upload = _json(conn.getresponse())
        conn.request("PUT", "/small", body=b"hello", headers={"Content-Length": "5"})
        small = _json(conn.getresponse())
        conn.close()
        return upload, small

    with anyio.fail_after(30):
        upload, small = await anyio.to_thread.run_sync(client)
    assert upload["body_len"] == len(body)
    assert upload["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert upload["body_start"].startswith(prefix.decode())
    assert _header(upload, "X-Key") == REAL_TOKEN
    assert small["body_len"] == 5


async def test_close_delimited_response_is_relayed(proxy: tuple[Proxy, EchoServer]) -> None:
    state, _ = proxy

    def client() -> bytes:
        conn = _connection(state)
        conn.request("GET", "/close-delimited")
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return data

    with anyio.fail_after(20):
        assert await anyio.to_thread.run_sync(client) == b"x" * 100_000


def _raw_tls(state: Proxy) -> ssl.SSLSocket:
    sock = socket.create_connection((LOOPBACK, state.port), timeout=20)
    return state.client_context().wrap_socket(sock, server_hostname=LOOPBACK)


def _read_head(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


async def test_upgrade_switches_to_raw_relay(proxy: tuple[Proxy, EchoServer]) -> None:
    state, _ = proxy

    def client() -> tuple[bytes, bytes]:
        with _raw_tls(state) as tls:
            tls.sendall(
                b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            )
            head = _read_head(tls)
            tls.sendall(b"raw frames after 101")
            echoed = b""
            while len(echoed) < 20:
                echoed += tls.recv(100)
            return head, echoed

    with anyio.fail_after(20):
        head, echoed = await anyio.to_thread.run_sync(client)
    assert head.startswith(b"HTTP/1.1 101")
    assert echoed == b"RAW FRAMES AFTER 101"


async def test_host_header_for_another_site_is_refused(proxy: tuple[Proxy, EchoServer]) -> None:
    state, server = proxy
    token = state.placeholder("TOKEN")

    def client() -> bytes:
        with _raw_tls(state) as tls:
            tls.sendall(
                f"GET / HTTP/1.1\r\nHost: evil.example.com\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            return _read_head(tls)

    with anyio.fail_after(20):
        head = await anyio.to_thread.run_sync(client)
    assert head.startswith(b"HTTP/1.1 421 ")
    assert b"X-Stockade-Reason:" in head
    assert server.seen.requests == []


async def test_oversized_header_block_gets_431(proxy: tuple[Proxy, EchoServer]) -> None:
    state, server = proxy

    def client() -> bytes:
        with _raw_tls(state) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000)
            return _read_head(tls)

    with anyio.fail_after(20):
        head = await anyio.to_thread.run_sync(client)
    assert head.startswith(b"HTTP/1.1 431 ")
    assert server.seen.requests == []


async def test_non_http_client_is_closed_cleanly(proxy: tuple[Proxy, EchoServer]) -> None:
    state, server = proxy

    def client() -> bytes:
        with _raw_tls(state) as tls:
            tls.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            try:
                return tls.recv(100)
            except ssl.SSLError:
                return b""

    with anyio.fail_after(20):
        assert await anyio.to_thread.run_sync(client) == b""
    assert server.seen.requests == []


async def test_client_not_trusting_the_ca_fails_the_handshake(
    proxy: tuple[Proxy, EchoServer],
) -> None:
    state, server = proxy

    def client() -> None:
        sock = socket.create_connection((LOOPBACK, state.port), timeout=20)
        context = ssl.create_default_context()  # the system store only
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(sock, server_hostname=LOOPBACK)
        sock.close()

    with anyio.fail_after(20):
        await anyio.to_thread.run_sync(client)
    assert server.seen.requests == []


async def test_untrusted_upstream_gets_502(
    tmp_path: Path, upstream: tuple[EchoServer, bytes]
) -> None:
    server, _ = upstream
    ca = SandboxCA.create(tmp_path / "ca", name="bad-upstream")
    secrets = SecretSet.load({}, {}, tmp_path)
    upstream_port = server.server_address[1]
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def handle(client: SocketStream) -> None:
        up = await anyio.connect_tcp(LOOPBACK, upstream_port)
        # Default upstream context: the system store, which does not know the test CA.
        await intercept_https(client, LOOPBACK, upstream_port, up, ca=ca, secrets=secrets)

    def client() -> tuple[int, str]:
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        conn = http.client.HTTPSConnection(LOOPBACK, port, context=context, timeout=20)
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, response.getheader("X-Stockade-Reason") or ""

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        with anyio.fail_after(20):
            status, reason = await anyio.to_thread.run_sync(client)
        tg.cancel_scope.cancel()
    assert status == 502
    assert "certificate" in reason
    assert server.seen.requests == []


async def test_chunked_response_and_expect_continue(proxy: tuple[Proxy, EchoServer]) -> None:
    state, _ = proxy
    token = state.placeholder("TOKEN")

    def client() -> tuple[bytes, bytes, dict[str, Any]]:
        with _raw_tls(state) as tls:
            tls.sendall(b"GET /chunked-response HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while not data.endswith(b"0\r\nX-Trailer: done\r\n\r\n"):
                chunk = tls.recv(65536)
                assert chunk, data[-100:]
                data += chunk
            # Same connection: the client waits for 100 Continue before sending its body.
            tls.sendall(
                f"POST /expect HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Key: {token}\r\n"
                "Expect: 100-continue\r\nContent-Length: 4\r\n\r\n".encode()
            )
            interim = _read_head(tls)
            tls.sendall(b"body")
            rest = b""
            while b"}" not in rest:
                rest += tls.recv(65536)
            record = json.loads(rest.split(b"\r\n\r\n", 1)[1])
            return data, interim, record

    with anyio.fail_after(20):
        data, interim, record = await anyio.to_thread.run_sync(client)
    # Responses pass through byte for byte, chunk extensions and trailers included.
    assert b"5;ext=1\r\nalpha\r\n" in data and data.count(b"beta") == 10_000
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert record["body_len"] == 4 and _header(record, "X-Key") == REAL_TOKEN
    assert state.accepted == 1


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\nHost: evil.example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n",
    ],
    ids=["cl-and-te", "two-lengths", "bare-lf", "folding", "two-hosts"],
)
async def test_ambiguous_requests_get_400(proxy: tuple[Proxy, EchoServer], head: bytes) -> None:
    state, server = proxy

    def client() -> bytes:
        with _raw_tls(state) as tls:
            tls.sendall(head)
            return _read_head(tls)

    with anyio.fail_after(20):
        answer = await anyio.to_thread.run_sync(client)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert server.seen.requests == []
