"""The egress proxy between real loopback TCP sockets: 50 MB through CONNECT and plain HTTP.

Client, proxy and servers listen on 127.0.0.1 only, with random ports; the servers are
allowed by address. tracemalloc shows the proxy streams instead of buffering bodies.
Throughput is bench/bench_egress.py's business, not a test's.
"""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute

from stockade.egress.fastpath import SocketByteStream
from stockade.egress.log import ConnectionRecord
from stockade.egress.proxy import EgressProxy
from stockade.policy.decide import compile_rules, decide, with_allowed

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

LOOPBACK = "127.0.0.1"
TOTAL = 50 * 1024 * 1024
CHUNK = 64 * 1024
PEAK_LIMIT = 20 * 1024 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class AddressDecision:
    allowed: bool
    rule: str | None
    reason: str


def allow_loopback_address(
    host: str, port: int, rules: object, /, *, resolved: Sequence[str] = ()
) -> AddressDecision:
    """Allows exactly 127.0.0.1, like an explicit address rule would."""
    if host == LOOPBACK and tuple(resolved) == (LOOPBACK,):
        return AddressDecision(True, LOOPBACK, "allowed by address")
    return AddressDecision(False, None, "not allowed")


# --- loopback servers -----------------------------------------------------------------------


async def read_head(stream: ByteStream) -> tuple[bytes, bytes]:
    data = bytearray()
    while b"\r\n\r\n" not in data:
        assert len(data) < 65536, "no end of head"
        data += await stream.receive()
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    return head, rest


async def send_pattern(stream: ByteStream, total: int) -> None:
    block = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    while sent < total:
        piece = block[: min(CHUNK, total - sent)]
        await stream.send(piece)
        sent += len(piece)


async def count_until_eof(stream: ByteStream, already: int = 0) -> int:
    count = already
    while True:
        try:
            count += len(await stream.receive(CHUNK))
        except anyio.EndOfStream:
            return count


async def echo(stream: ByteStream) -> None:
    async with stream:
        while True:
            try:
                data = await stream.receive(CHUNK)
            except anyio.EndOfStream:
                break
            await stream.send(data)
        await stream.send_eof()


@dataclass
class HttpServer:
    """GET /bytes/N streams N bytes; POST /upload counts the body and answers the count."""

    heads: list[bytes] = field(default_factory=list)

    async def __call__(self, stream: ByteStream) -> None:
        async with stream:
            head, rest = await read_head(stream)
            self.heads.append(head)
            request_line = head.split(b"\r\n", 1)[0]
            method, target, _ = request_line.split(b" ")
            if method == b"GET" and target.startswith(b"/bytes/"):
                size = int(target.split(b"?")[0].rsplit(b"/", 1)[1])
                await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                await send_pattern(stream, size)
            elif method == b"POST":
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")[1:]
                    if line.lower().startswith(b"content-length:")
                )
                received = len(rest)
                while received < length:
                    received += len(await stream.receive(CHUNK))
                body = b"%d" % received
                await stream.send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
            else:
                await stream.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


@asynccontextmanager
async def serve(handler: object) -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


@pytest.fixture(params=["stream", "socket"])
def client_kind(request: pytest.FixtureRequest) -> str:
    """How client connections reach the proxy: as a ByteStream (what the framed tunnel
    gives it), or as the plain socket itself (what the fd path gives it: kernel relay)."""
    kind: str = request.param
    return kind


@asynccontextmanager
async def proxy_listener(proxy: EgressProxy, kind: str = "stream") -> AsyncIterator[int]:
    """The proxy behind a loopback socket: the socket plays the agent tunnel."""

    async def handle(stream: ByteStream) -> None:
        await proxy.handle_proxy_stream(stream, peer="loopback")

    if kind == "stream":
        async with serve(handle) as port:
            yield port
        return
    # The socket itself, as a connection handed over by the agent arrives.
    listener = socket.create_server((LOOPBACK, 0))
    listener.setblocking(False)

    async def accept_forever() -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.wait_readable(listener)
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                tg.start_soon(handle, SocketByteStream(conn))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept_forever)
            try:
                yield listener.getsockname()[1]
            finally:
                tg.cancel_scope.cancel()
    finally:
        listener.close()


def make_proxy() -> tuple[EgressProxy, list[ConnectionRecord]]:
    events: list[ConnectionRecord] = []
    proxy = EgressProxy(
        rules=object(), decide=allow_loopback_address, on_event=events.append, sandbox="it"
    )
    return proxy, events


@asynccontextmanager
async def measured() -> AsyncIterator[list[int]]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    result: list[int] = []
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


async def wait_for_records(events: list[ConnectionRecord], count: int) -> None:
    with anyio.fail_after(10):
        while len(events) < count:
            await anyio.sleep(0.01)


# --- tests ----------------------------------------------------------------------------------


async def test_connect_streams_50_mb_each_way_in_bounded_memory(client_kind: str) -> None:
    proxy, events = make_proxy()
    async with serve(echo) as echo_port, proxy_listener(proxy, client_kind) as proxy_port:
        async with measured() as peak:
            with anyio.fail_after(90):
                client = await anyio.connect_tcp(LOOPBACK, proxy_port)
                async with client:
                    await client.send(
                        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % echo_port
                    )
                    head, rest = await read_head(client)
                    assert head == b"HTTP/1.1 200 Connection established"
                    received = 0
                    async with anyio.create_task_group() as tg:

                        async def upload() -> None:
                            await send_pattern(client, TOTAL)
                            await client.send_eof()

                        tg.start_soon(upload)
                        received = await count_until_eof(client, len(rest))
        await wait_for_records(events, 1)
    assert received == TOTAL
    assert peak[0] < PEAK_LIMIT
    [record] = events
    assert (record.kind, record.decision, record.host) == ("connect", "allowed", LOOPBACK)
    assert (record.bytes_up, record.bytes_down) == (TOTAL, TOTAL)
    assert record.addresses == (LOOPBACK,)


async def test_plain_http_download_and_upload_50_mb_in_bounded_memory(
    client_kind: str,
) -> None:
    proxy, events = make_proxy()
    server = HttpServer()
    async with serve(server) as http_port, proxy_listener(proxy, client_kind) as proxy_port:
        async with measured() as peak:
            with anyio.fail_after(90):
                client = await anyio.connect_tcp(LOOPBACK, proxy_port)
                async with client:
                    await client.send(
                        b"GET http://127.0.0.1:%d/bytes/%d?x=1 HTTP/1.1\r\n"
                        b"Host: 127.0.0.1\r\nProxy-Connection: keep-alive\r\n\r\n"
                        % (http_port, TOTAL)
                    )
                    head, rest = await read_head(client)
                    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                    downloaded = await count_until_eof(client, len(rest))

            with anyio.fail_after(90):
                client = await anyio.connect_tcp(LOOPBACK, proxy_port)
                async with client:
                    await client.send(
                        b"POST http://127.0.0.1:%d/upload HTTP/1.1\r\n"
                        b"Content-Length: %d\r\n\r\n" % (http_port, TOTAL)
                    )
                    await send_pattern(client, TOTAL)
                    head, rest = await read_head(client)
                    body = rest
                    while True:
                        try:
                            body += await client.receive()
                        except anyio.EndOfStream:
                            break
        await wait_for_records(events, 2)
    assert downloaded == TOTAL
    assert body == b"%d" % TOTAL
    assert peak[0] < PEAK_LIMIT
    assert server.heads[0] == (
        b"GET /bytes/%d?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close"
        % (TOTAL, http_port)
    )
    assert [e.kind for e in events] == ["http", "http"]
    assert events[0].bytes_down > TOTAL and events[1].bytes_up > TOTAL


async def test_socks5_and_denial_over_real_sockets(client_kind: str) -> None:
    proxy, events = make_proxy()
    async with serve(echo) as echo_port, proxy_listener(proxy, client_kind) as proxy_port:
        with anyio.fail_after(10):
            client = await anyio.connect_tcp(LOOPBACK, proxy_port)
            async with client:
                await client.send(b"\x05\x01\x00")
                assert await client.receive() == b"\x05\x00"
                await client.send(
                    b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")
                )
                reply = await client.receive()
                assert reply[:2] == b"\x05\x00"
                await client.send(b"ping")
                await client.send_eof()
                assert await client.receive() == b"ping"

            # Another loopback address is not the one allowed.
            client = await anyio.connect_tcp(LOOPBACK, proxy_port)
            async with client:
                await client.send(b"CONNECT 127.0.0.2:%d HTTP/1.1\r\n\r\n" % echo_port)
                head, _ = await read_head(client)
        await wait_for_records(events, 2)
    assert head.startswith(b"HTTP/1.1 403 Forbidden by stockade network policy\r\n")
    assert b"X-Stockade-Denied: not allowed\r\nX-Stockade-Rule: none" in head
    assert [e.decision for e in events] == ["allowed", "denied"]


async def test_real_policy_refuses_a_name_rebound_to_loopback_until_the_address_is_allowed(
    client_kind: str,
) -> None:
    """An allowed name resolving to 127.0.0.1 is refused; allowing 127.0.0.1 permits it."""

    async def resolver(host: str, port: int) -> list[str]:
        assert host == "api.example.com"  # only allowed names are ever looked up
        return [LOOPBACK]

    events: list[ConnectionRecord] = []
    proxy = EgressProxy(
        rules=compile_rules(["api.example.com"], []),
        decide=decide,
        resolver=resolver,
        on_event=events.append,
        sandbox="it",
    )
    async with serve(echo) as echo_port, proxy_listener(proxy, client_kind) as proxy_port:
        request = b"CONNECT api.example.com:%d HTTP/1.1\r\n\r\n" % echo_port
        with anyio.fail_after(10):
            client = await anyio.connect_tcp(LOOPBACK, proxy_port)
            async with client:
                await client.send(request)
                denied, _ = await read_head(client)

            proxy.set_rules(with_allowed(proxy.rules, LOOPBACK))
            client = await anyio.connect_tcp(LOOPBACK, proxy_port)
            async with client:
                await client.send(request + b"ping")
                await client.send_eof()
                answer = await count_bytes_and_tail(client)
        await wait_for_records(events, 2)
    assert denied.startswith(b"HTTP/1.1 403 Forbidden by stockade network policy\r\n")
    assert b"resolves to 127.0.0.1, a loopback address" in denied
    assert answer.endswith(b"HTTP/1.1 200 Connection established\r\n\r\nping")
    assert [(e.decision, e.rule) for e in events] == [
        ("denied", None),
        ("allowed", "api.example.com"),
    ]
    assert events[1].addresses == (LOOPBACK,)


async def count_bytes_and_tail(stream: ByteStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return bytes(data)
