"""The egress proxy over in-memory streams: request forms, decisions, SOCKS5, bad input, limits.

The sandbox side and every "upstream server" are memory streams; names resolve through a
fake resolver and connections go through a fake connector, so nothing touches the network.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from stockade.egress.dial import relay
from stockade.egress.log import ConnectionLog, ConnectionRecord, RelayCounters
from stockade.egress.proxy import MAX_HEADER_BYTES, EgressProxy
from stockade.policy.decide import compile_rules, decide, with_allowed, with_denied

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- in-memory plumbing ---------------------------------------------------------------------


class MemoryByteStream(ByteStream):
    """One end of an in-memory, half-closable byte pipe."""

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self._pending = b""
        self.closed = False
        self.eof_sent = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            self._pending = await self._receive.receive()
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        if self.eof_sent:
            raise anyio.ClosedResourceError
        await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        self.eof_sent = True
        await self._send.aclose()

    async def aclose(self) -> None:
        self.closed = True
        await self._send.aclose()
        await self._receive.aclose()


def stream_pair() -> tuple[MemoryByteStream, MemoryByteStream]:
    a_send, b_receive = anyio.create_memory_object_stream[bytes](4)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](4)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)


async def read_all(stream: ByteStream) -> bytes:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return bytes(data)


async def read_exactly(stream: ByteStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        data += await stream.receive(count - len(data))
    return bytes(data)


async def read_head(stream: ByteStream) -> bytes:
    data = bytearray()
    while b"\r\n\r\n" not in data:
        data += await stream.receive(1)
    return bytes(data)


# --- fakes: policy, resolver, connector, servers --------------------------------------------


@dataclass(frozen=True)
class FakeDecision:
    allowed: bool
    rule: str | None
    reason: str


@dataclass
class FakeRules:
    allow: set[str] = field(default_factory=set)
    calls: list[tuple[str, int, tuple[str, ...]]] = field(default_factory=list)
    tcp: tuple[Any, ...] = ()  # raw forwards are tested with the real rules


def fake_decide(
    host: str, port: int, rules: FakeRules, /, *, resolved: Sequence[str] = ()
) -> FakeDecision:
    rules.calls.append((host, port, tuple(resolved)))
    for pattern in (f"{host}:{port}", host):
        if pattern in rules.allow:
            return FakeDecision(True, pattern, f"allowed by {pattern}")
    return FakeDecision(False, None, "no rule allows this host")


Server = Callable[[ByteStream], Awaitable[None]]


async def echo_server(stream: ByteStream) -> None:
    async with stream:
        while True:
            try:
                data = await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                break
            await stream.send(data)
        await stream.send_eof()


@dataclass
class Net:
    """Fake DNS + fake TCP: servers by (address, port), served in a task group."""

    tg: TaskGroup
    dns: dict[str, list[str]] = field(default_factory=dict)
    servers: dict[tuple[str, int], Server] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    connects: list[tuple[str, int]] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    hang: set[str] = field(default_factory=set)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.dns:
            raise OSError(-2, "Name or service not known")
        return list(self.dns[host])

    async def connect(self, address: str, port: int) -> ByteStream:
        self.connects.append((address, port))
        if address in self.hang:
            await anyio.sleep(math.inf)
        server = self.servers.get((address, port))
        if server is None or address in self.refused:
            raise ConnectionRefusedError(111, "Connection refused")
        client, server_side = stream_pair()
        self.tg.start_soon(server, server_side)
        return client


@asynccontextmanager
async def network() -> AsyncIterator[Net]:
    async with anyio.create_task_group() as tg:
        yield Net(tg)
        tg.cancel_scope.cancel()


def make_proxy(net: Net, rules: Any, **kwargs: Any) -> tuple[EgressProxy, list[ConnectionRecord]]:
    events: list[ConnectionRecord] = []
    kwargs.setdefault("decide", fake_decide)
    proxy = EgressProxy(
        rules=rules,
        resolver=net.resolve,
        connector=net.connect,
        on_event=events.append,
        sandbox="sb1",
        **kwargs,
    )
    return proxy, events


@asynccontextmanager
async def client_of(
    proxy: EgressProxy, *, forward: str | None = None
) -> AsyncIterator[MemoryByteStream]:
    """A sandbox-side client connected to a proxy handler running in the background."""
    client, proxy_side = stream_pair()
    async with anyio.create_task_group() as tg:
        if forward is None:
            tg.start_soon(lambda: proxy.handle_proxy_stream(proxy_side, peer="127.0.0.1:5000"))
        else:
            tg.start_soon(lambda: proxy.handle_forward_stream(proxy_side, forward, peer="p"))
        try:
            yield client
        finally:
            await client.aclose()


# --- HTTP CONNECT ---------------------------------------------------------------------------


async def test_connect_tunnels_bytes_both_ways_with_half_close() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.servers[("93.184.216.34", 443)] = echo_server
        proxy, events = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            assert await read_head(c) == b"HTTP/1.1 200 Connection established\r\n\r\n"
            await c.send(b"hello ")
            await c.send(b"world")
            await c.send_eof()
            assert await read_all(c) == b"hello world"
        [record] = events
        assert record.kind == "connect"
        assert (record.host, record.port, record.addresses) == (
            "example.com",
            443,
            ("93.184.216.34",),
        )
        assert (record.decision, record.rule, record.sandbox) == ("allowed", "example.com", "sb1")
        assert (record.bytes_up, record.bytes_down) == (11, 11)
        assert record.peer == "127.0.0.1:5000"
        assert proxy.log() == [record]
        assert proxy.active_connections == 0


async def test_connect_forwards_bytes_sent_right_after_the_request() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.servers[("93.184.216.34", 443)] = echo_server
        proxy, _ = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\nclient-hello")
            await c.send_eof()
            assert await read_all(c) == b"HTTP/1.1 200 Connection established\r\n\r\nclient-hello"


async def test_connect_to_ipv6_literal() -> None:
    async with network() as net:
        net.servers[("2001:db8::1", 8443)] = echo_server
        rules = FakeRules({"2001:db8::1"})
        proxy, events = make_proxy(net, rules)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT [2001:DB8::1]:8443 HTTP/1.1\r\n\r\nx")
            await c.send_eof()
            assert (await read_all(c)).endswith(b"\r\n\r\nx")
        assert net.lookups == []  # an address is not looked up
        assert rules.calls == [("2001:db8::1", 8443, ("2001:db8::1",))]
        assert events[0].addresses == ("2001:db8::1",)


# --- absolute-URI requests ------------------------------------------------------------------


@dataclass
class RecordingHttpServer:
    response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    received: bytes = b""

    async def __call__(self, stream: ByteStream) -> None:
        async with stream:
            self.received = await read_all(stream)
            await stream.send(self.response)


async def test_absolute_uri_request_is_rewritten_to_origin_form() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        server = RecordingHttpServer()
        net.servers[("93.184.216.34", 80)] = server
        proxy, events = make_proxy(net, FakeRules({"example.com"}))
        request = (
            b"GET http://Example.COM/path/x?token=s3cret HTTP/1.1\r\n"
            b"Host: attacker.invalid\r\n"
            b"User-Agent: curl/8\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            b"Proxy-Connection: Keep-Alive\r\n"
            b"Connection: keep-alive, X-Hop\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Hop: 1\r\n"
            b"Accept: */*\r\n"
            b"\r\n"
        )
        async with client_of(proxy) as c:
            await c.send(request)
            await c.send_eof()
            assert await read_all(c) == server.response
        assert server.received == (
            b"GET /path/x?token=s3cret HTTP/1.1\r\n"
            b"Host: Example.COM\r\n"
            b"User-Agent: curl/8\r\n"
            b"Accept: */*\r\n"
            b"Connection: close\r\n"
            b"\r\n"
        )
        [record] = events
        assert (record.kind, record.host, record.port) == ("http", "example.com", 80)
        assert record.bytes_up == len(server.received)
        assert record.bytes_down == len(server.response)
        # Nothing of the URL's path or query, nor header values, is recorded.
        text = repr(record) + repr(record.to_dict())
        for secret in ("s3cret", "path/x", "Zm9v", "curl/8"):
            assert secret not in text


async def test_absolute_uri_with_port_and_no_path() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        server = RecordingHttpServer()
        net.servers[("93.184.216.34", 8080)] = server
        proxy, _ = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(b"HEAD http://example.com:8080?q HTTP/1.0\r\n\r\n")
            await c.send_eof()
            await read_all(c)
        assert server.received.startswith(b"HEAD /?q HTTP/1.0\r\nHost: example.com:8080\r\n")


async def test_post_body_streams_through_unchanged() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        server = RecordingHttpServer()
        net.servers[("93.184.216.34", 80)] = server
        proxy, events = make_proxy(net, FakeRules({"example.com"}), buffer_size=7)
        body = b"".join(b"%d," % i for i in range(2000))
        async with client_of(proxy) as c:
            await c.send(
                b"POST http://example.com/upload HTTP/1.1\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n\r\n"
                + b"%x\r\n"
                % len(body)
            )
            for i in range(0, len(body), 1000):
                await c.send(body[i : i + 1000])
            await c.send(b"\r\n0\r\n\r\n")
            await c.send_eof()
            await read_all(c)
        head, _, rest = server.received.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head  # framing is never dropped
        assert rest == b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        assert events[0].bytes_up == len(server.received)


# --- denials --------------------------------------------------------------------------------


async def test_denied_connect_answers_403_with_reason_and_rule_headers() -> None:
    async with network() as net:
        net.dns["evil.example"] = ["203.0.113.9"]
        net.servers[("203.0.113.9", 443)] = echo_server
        seen_at_answer: list[int] = []
        proxy, events = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
            head = await read_head(c)
            seen_at_answer.append(len(events))
            body = await read_all(c)
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 403 Forbidden by stockade network policy"
        assert "X-Stockade-Denied: no rule allows this host" in lines
        assert "X-Stockade-Rule: none" in lines
        assert "Connection: close" in lines
        assert f"Content-Length: {len(body)}" in lines
        text = body.decode()
        assert "evil.example:443" in text and "no rule allows this host" in text
        assert "stockade net allow sb1 evil.example" in text
        assert seen_at_answer == [1]  # the denial was reported before the answer arrived
        [record] = events
        assert (record.decision, record.rule, record.kind) == ("denied", None, "connect")
        assert record.reason == "no rule allows this host"
        # A denied name is never resolved (no DNS leak) and never dialled.
        assert net.lookups == [] and net.connects == []


async def test_denied_rule_is_named_and_header_values_are_sanitised() -> None:
    def deny_with_rule(
        host: str, port: int, rules: object, /, *, resolved: Sequence[str] = ()
    ) -> FakeDecision:
        return FakeDecision(False, "deny evil.*", "listed\r\nX-Injected: 1 in deny")

    async with network() as net:
        proxy, _ = make_proxy(net, FakeRules(), decide=deny_with_rule)
        async with client_of(proxy) as c:
            await c.send(b"GET http://evil.example/ HTTP/1.1\r\n\r\n")
            head = await read_head(c)
        lines = head.decode().split("\r\n")
        assert "X-Stockade-Rule: deny evil.*" in lines
        assert "X-Stockade-Denied: listed  X-Injected: 1 in deny" in lines
        assert not any(line.startswith("X-Injected") for line in lines)


async def test_denied_after_resolution_uses_the_resolved_addresses() -> None:
    def deny_private(
        host: str, port: int, rules: object, /, *, resolved: Sequence[str] = ()
    ) -> FakeDecision:
        if any(a.startswith("10.") for a in resolved):
            return FakeDecision(False, None, f"{host} resolves to a private address")
        return FakeDecision(True, host, "allowed")

    async with network() as net:
        net.dns["intranet.example"] = ["10.0.0.5"]
        proxy, events = make_proxy(net, FakeRules(), decide=deny_private)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT intranet.example:443 HTTP/1.1\r\n\r\n")
            head = await read_head(c)
        assert head.startswith(b"HTTP/1.1 403 Forbidden by stockade network policy\r\n")
        assert b"resolves to a private address" in head
        assert net.connects == []
        assert events[0].addresses == ("10.0.0.5",)


async def test_set_rules_applies_to_the_next_connection() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.servers[("93.184.216.34", 443)] = echo_server
        proxy, events = make_proxy(net, FakeRules())
        for _ in range(2):
            async with client_of(proxy) as c:
                await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
                await read_head(c)
            proxy.set_rules(FakeRules({"example.com"}))
        assert [e.decision for e in events] == ["denied", "allowed"]


# --- SOCKS5 ---------------------------------------------------------------------------------


def socks_request(atyp: int, address: bytes, port: int, command: int = 1) -> bytes:
    return bytes([5, command, 0, atyp]) + address + port.to_bytes(2, "big")


async def socks_connect(c: ByteStream, request: bytes) -> bytes:
    await c.send(b"\x05\x02\x00\x02")  # offers no-auth and user/password
    assert await read_exactly(c, 2) == b"\x05\x00"
    await c.send(request)
    return await read_exactly(c, 10)


@pytest.mark.parametrize(
    ("request_bytes", "host", "address"),
    [
        (socks_request(3, b"\x0bexample.com", 22), "example.com", "93.184.216.34"),
        (socks_request(1, bytes([93, 184, 216, 34]), 22), "93.184.216.34", "93.184.216.34"),
        (
            socks_request(4, bytes.fromhex("20010db8000000000000000000000001"), 22),
            "2001:db8::1",
            "2001:db8::1",
        ),
    ],
    ids=["domain", "ipv4", "ipv6"],
)
async def test_socks5_connect(request_bytes: bytes, host: str, address: str) -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.servers[(address, 22)] = echo_server
        proxy, events = make_proxy(net, FakeRules({host}))
        async with client_of(proxy) as c:
            # Bound address 0.0.0.0:0: the host's addresses are not the sandbox's business.
            assert await socks_connect(c, request_bytes) == b"\x05\x00\x00\x01" + bytes(6)
            await c.send(b"SSH-2.0-test\r\n")
            await c.send_eof()
            assert await read_all(c) == b"SSH-2.0-test\r\n"
        [record] = events
        assert (record.kind, record.host, record.port, record.decision) == (
            "socks5",
            host,
            22,
            "allowed",
        )
        assert net.connects == [(address, 22)]


async def test_socks5_request_pipelined_with_greeting_and_data() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.servers[("93.184.216.34", 22)] = echo_server
        proxy, _ = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(b"\x05\x01\x00" + socks_request(3, b"\x0bexample.com", 22) + b"early")
            await c.send_eof()
            assert await read_all(c) == b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6) + b"early"


async def test_socks5_denied_replies_not_allowed_by_ruleset() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules())
        async with client_of(proxy) as c:
            reply = await socks_connect(c, socks_request(3, b"\x0cevil.example", 443))
            assert reply[:2] == b"\x05\x02"
            assert await read_all(c) == b""
        assert events[0].decision == "denied"
        assert net.lookups == []


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (socks_request(3, b"\x0bexample.com", 22, command=2), 0x07),  # BIND
        (socks_request(3, b"\x0bexample.com", 22, command=3), 0x07),  # UDP ASSOCIATE
        (bytes([5, 1, 0, 9]) + b"xxxxxx", 0x08),  # unknown address type
        (socks_request(3, b"\x07bad host", 22), 0x08),
        (socks_request(3, b"\x0bexample.com", 0), 0x01),
    ],
    ids=["bind", "udp", "atyp", "bad-name", "port-0"],
)
async def test_socks5_bad_requests(request_bytes: bytes, code: int) -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            reply = await socks_connect(c, request_bytes)
            assert reply[:2] == bytes([5, code])
        assert events[0].decision == "error"
        assert net.connects == []


async def test_socks5_without_no_auth_method_is_refused() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules())
        async with client_of(proxy) as c:
            await c.send(b"\x05\x01\x02")
            assert await read_all(c) == b"\x05\xff"
        assert "no supported method" in events[0].reason


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",  # origin-form: not a proxy request
        b"GET https://example.com/ HTTP/1.1\r\n\r\n",
        b"GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n",
        b"GET http://example.com/ HTTP/2.0\r\n\r\n",
        b"GET  http://example.com/ HTTP/1.1\r\n\r\n",
        b"CONNECT example.com HTTP/1.1\r\n\r\n",  # no port
        b"CONNECT example.com:99999 HTTP/1.1\r\n\r\n",
        b"CONNECT exa mple.com:443 HTTP/1.1\r\n\r\n",
        b"CONNECT [::1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT bad_label-.com:443 HTTP/1.1\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n folded: x\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nNo colon\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nA: b\nc\r\n\r\n",
    ],
)
async def test_bad_requests_get_400(request_bytes: bytes) -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(request_bytes)
            response = await read_all(c)
        assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"X-Stockade-Error: " in response
        assert events[0].decision == "error"
        assert net.connects == []


async def test_oversized_header_block_gets_400_without_reading_it_all() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n")
            filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
            with anyio.move_on_after(2):  # the proxy stops reading at the limit
                for _ in range(MAX_HEADER_BYTES // len(filler) + 1):
                    await c.send(filler)
            response = await read_all(c)
        assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"larger than 16384 bytes" in response
        assert events[0].decision == "error"


async def test_client_closing_mid_request_is_recorded_not_raised() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules())
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:4")
            await c.send_eof()
            assert await read_all(c) == b""
        [record] = events
        assert record.decision == "error"
        assert "client closed" in record.reason


async def test_client_that_sends_nothing_times_out() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules(), handshake_timeout=0.05)
        async with client_of(proxy) as c:
            assert await read_all(c) == b""
        assert events[0].reason == "client sent nothing"


async def test_slow_request_head_times_out_with_400() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules(), handshake_timeout=0.1)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n")
            response = await read_all(c)
        assert response.startswith(b"HTTP/1.1 400 ")
        assert "in time" in events[0].reason


# --- upstream failures ----------------------------------------------------------------------


async def test_tries_each_checked_address_in_order_and_never_re_resolves() -> None:
    async with network() as net:
        net.dns["example.com"] = ["2001:db8::7", "93.184.216.34"]
        net.refused.add("2001:db8::7")
        net.servers[("93.184.216.34", 443)] = echo_server
        rules = FakeRules({"example.com"})
        proxy, events = make_proxy(net, rules)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            assert (await read_head(c)).startswith(b"HTTP/1.1 200 ")
        assert net.lookups == ["example.com"]
        assert rules.calls == [
            ("example.com", 443, ()),
            ("example.com", 443, ("2001:db8::7", "93.184.216.34")),
        ]
        assert net.connects == [("2001:db8::7", 443), ("93.184.216.34", 443)]
        assert events[0].addresses == ("2001:db8::7", "93.184.216.34")


async def test_unresolvable_name_gets_502() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules({"nowhere.example"}))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT nowhere.example:443 HTTP/1.1\r\n\r\n")
            response = await read_all(c)
        assert response.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert b"cannot resolve nowhere.example" in response
        assert events[0].decision == "error"


async def test_refused_connection_gets_502_and_socks_code_5() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        proxy, _ = make_proxy(net, FakeRules({"example.com"}))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            assert (await read_all(c)).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        async with client_of(proxy) as c:
            reply = await socks_connect(c, socks_request(3, b"\x0bexample.com", 443))
            assert reply[:2] == b"\x05\x05"


async def test_connect_timeout_gets_504() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.hang.add("93.184.216.34")
        proxy, events = make_proxy(net, FakeRules({"example.com"}), connect_timeout=0.05)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            assert (await read_all(c)).startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
        assert "timed out" in events[0].reason


# --- limits ---------------------------------------------------------------------------------


async def test_connections_beyond_the_limit_get_503_or_socks_failure() -> None:
    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.servers[("93.184.216.34", 443)] = echo_server
        proxy, events = make_proxy(net, FakeRules({"example.com"}), max_connections=1)
        async with client_of(proxy) as first:
            await first.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            await read_head(first)
            assert proxy.active_connections == 1
            async with client_of(proxy) as second:
                await second.send(b"C")  # the answer does not wait for the request
                response = await read_all(second)
            assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"max_connections=1" in response
            async with client_of(proxy) as third:
                reply = await socks_connect(third, socks_request(3, b"\x0bexample.com", 443))
                assert reply[:2] == b"\x05\x01"
            async with client_of(proxy, forward="example.com:443") as fourth:
                assert await read_all(fourth) == b""
            assert net.connects == [("93.184.216.34", 443)]
        assert proxy.active_connections == 0
        assert [e.decision for e in events] == ["error", "error", "error", "allowed"]
        assert all("max_connections=1" in e.reason for e in events[:3])
        # The slot is free again.
        async with client_of(proxy) as again:
            await again.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            assert (await read_head(again)).startswith(b"HTTP/1.1 200 ")


async def test_log_is_a_bounded_ring() -> None:
    async with network() as net:
        proxy, events = make_proxy(net, FakeRules(), log_size=3)
        for i in range(5):
            async with client_of(proxy) as c:
                await c.send(b"CONNECT host%d.example:443 HTTP/1.1\r\n\r\n" % i)
                await read_all(c)
        assert len(events) == 5
        assert [r.host for r in proxy.log()] == [f"host{i}.example" for i in (2, 3, 4)]


def test_connection_log_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="maxlen"):
        ConnectionLog(0)


async def test_failing_on_event_callback_does_not_break_the_proxy() -> None:
    def explode(record: ConnectionRecord) -> None:
        raise RuntimeError("audit sink down")

    async with network() as net:
        proxy = EgressProxy(
            rules=FakeRules(), decide=fake_decide, resolver=net.resolve, on_event=explode
        )
        async with client_of(proxy) as c:
            await c.send(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
            assert (await read_all(c)).startswith(b"HTTP/1.1 403 ")
        assert len(proxy.log()) == 1


# --- raw TCP forwards (with the real policy) ------------------------------------------------


async def test_forward_relays_a_target_named_by_a_tcp_rule() -> None:
    async with network() as net:
        net.dns["git.example.com"] = ["140.82.112.3"]
        net.servers[("140.82.112.3", 22)] = echo_server
        rules = compile_rules(allow=[], deny=[], tcp=["git.example.com:22"])
        proxy, events = make_proxy(net, rules, decide=decide)
        async with client_of(proxy, forward="git.example.com:22") as c:
            await c.send(b"SSH-2.0-x\r\n")
            await c.send_eof()
            assert await read_all(c) == b"SSH-2.0-x\r\n"
        [record] = events
        assert (record.kind, record.decision, record.rule) == (
            "forward",
            "allowed",
            "git.example.com:22",
        )
        assert (record.bytes_up, record.bytes_down, record.peer) == (11, 11, "p")
        assert record.addresses == ("140.82.112.3",)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("git.example.com:2222", "not a [network] tcp rule"),
        ("web.example.com:443", "not a [network] tcp rule"),  # allowed for HTTP, not raw TCP
        ("git.example.com:22x", "not a valid port"),
        ("nope", "needs a port"),
    ],
)
async def test_forward_without_a_tcp_rule_is_closed(target: str, reason: str) -> None:
    async with network() as net:
        net.dns["git.example.com"] = ["140.82.112.3"]
        net.servers[("140.82.112.3", 2222)] = echo_server
        rules = compile_rules(allow=["web.example.com"], deny=[], tcp=["git.example.com:22"])
        proxy, events = make_proxy(net, rules, decide=decide)
        async with client_of(proxy, forward=target) as c:
            assert await read_all(c) == b""
        assert events[0].decision in ("denied", "error")
        assert reason in events[0].reason
        assert net.lookups == [] and net.connects == []


async def test_forward_tcp_rule_still_passes_the_policy_on_resolved_addresses() -> None:
    async with network() as net:
        net.dns["db.example.com"] = ["10.1.2.3"]
        net.servers[("10.1.2.3", 5432)] = echo_server
        rules = compile_rules(allow=[], deny=[], tcp=["db.example.com:5432"])
        proxy, events = make_proxy(net, rules, decide=decide)
        async with client_of(proxy, forward="db.example.com:5432") as c:
            assert await read_all(c) == b""
        assert events[0].decision == "denied"
        assert "private address" in events[0].reason
        assert net.connects == []


# --- the real policy: DNS rebinding ---------------------------------------------------------


async def test_allowed_name_resolving_to_loopback_is_refused_unless_address_allowed() -> None:
    async with network() as net:
        net.dns["api.example.com"] = ["127.0.0.1"]
        net.servers[("127.0.0.1", 443)] = echo_server
        proxy, events = make_proxy(net, compile_rules(["api.example.com"], []), decide=decide)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n")
            head = await read_head(c)
        assert head.startswith(b"HTTP/1.1 403 Forbidden by stockade network policy\r\n")
        assert b"loopback" in head and b"X-Stockade-Rule: none" in head
        async with client_of(proxy) as c:
            await socks_connect(c, socks_request(3, b"\x0fapi.example.com", 443))
        assert net.connects == []
        assert [e.decision for e in events] == ["denied", "denied"]

        proxy.set_rules(with_allowed(proxy.rules, "127.0.0.1"))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\nhi")
            await c.send_eof()
            assert (await read_all(c)).endswith(b"200 Connection established\r\n\r\nhi")
        assert net.connects == [("127.0.0.1", 443)]
        assert events[-1].decision == "allowed"


async def test_a_name_with_some_special_addresses_dials_only_the_allowed_ones() -> None:
    """localhost is 127.0.0.1 and ::1 on Debian: allowing 127.0.0.1 lets it through to that
    address alone; a public name that also resolves to the metadata address dials only the
    public one; a deny rule covering one of the addresses still refuses the name."""
    async with network() as net:
        net.dns["localhost"] = ["::1", "127.0.0.1"]
        net.dns["mixed.example.com"] = ["169.254.169.254", "93.184.216.34"]
        net.servers[("127.0.0.1", 80)] = echo_server
        net.servers[("93.184.216.34", 443)] = echo_server
        rules = compile_rules(["localhost", "127.0.0.1", "mixed.example.com"], [])
        proxy, events = make_proxy(net, rules, decide=decide)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT localhost:80 HTTP/1.1\r\n\r\n")
            assert (await read_head(c)).startswith(b"HTTP/1.1 200 ")
        async with client_of(proxy) as c:
            await c.send(b"CONNECT mixed.example.com:443 HTTP/1.1\r\n\r\n")
            assert (await read_head(c)).startswith(b"HTTP/1.1 200 ")
        assert net.connects == [("127.0.0.1", 80), ("93.184.216.34", 443)]

        proxy.set_rules(with_denied(proxy.rules, "127.0.0.1"))
        async with client_of(proxy) as c:
            await c.send(b"CONNECT localhost:80 HTTP/1.1\r\n\r\n")
            assert (await read_head(c)).startswith(b"HTTP/1.1 403 ")
        assert net.connects == [("127.0.0.1", 80), ("93.184.216.34", 443)]
        assert [e.decision for e in events] == ["allowed", "allowed", "denied"]


async def test_rebinding_between_check_and_connect_cannot_happen() -> None:
    """The name is resolved once; the connector only ever gets the checked addresses."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])

    async with network() as net:
        net.servers[("93.184.216.34", 443)] = echo_server

        async def rebinding_resolver(host: str, port: int) -> list[str]:
            net.lookups.append(host)
            return next(answers)

        proxy = EgressProxy(
            rules=compile_rules(["example.com"], []),
            decide=decide,
            resolver=rebinding_resolver,
            connector=net.connect,
        )
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            assert (await read_head(c)).startswith(b"HTTP/1.1 200 ")
        assert net.lookups == ["example.com"]
        assert net.connects == [("93.184.216.34", 443)]


async def test_real_policy_denial_headers_and_no_lookup_for_unlisted_names() -> None:
    async with network() as net:
        net.dns["evil.example"] = ["203.0.113.9"]
        proxy, events = make_proxy(
            net, compile_rules(["pypi.org"], ["*.pythonhosted.org"]), decide=decide
        )
        async with client_of(proxy) as c:
            await c.send(b"GET http://evil.example/x HTTP/1.1\r\n\r\n")
            head, _, body = (await read_all(c)).partition(b"\r\n\r\n")
        assert b"X-Stockade-Denied: evil.example is not in the allow list" in head
        assert b"stockade net allow sb1 evil.example" in body
        async with client_of(proxy) as c:
            await c.send(b"CONNECT files.pythonhosted.org:443 HTTP/1.1\r\n\r\n")
            head = await read_head(c)
        assert b"X-Stockade-Rule: *.pythonhosted.org\r\n" in head
        assert net.lookups == []
        assert [e.rule for e in events] == [None, "*.pythonhosted.org"]


# --- the tunnel hook and relay --------------------------------------------------------------


async def test_tunnel_hook_carries_connect_and_socks_but_not_plain_http() -> None:
    calls: list[tuple[str, str, int]] = []

    async def tunnel(
        client: ByteStream,
        upstream: ByteStream,
        *,
        kind: str,
        host: str,
        port: int,
        counters: RelayCounters,
    ) -> None:
        calls.append((kind, host, port))
        await relay(client, upstream, buffer_size=1024, counters=counters)

    async with network() as net:
        net.dns["example.com"] = ["93.184.216.34"]
        net.servers[("93.184.216.34", 443)] = echo_server
        net.servers[("93.184.216.34", 80)] = RecordingHttpServer()
        proxy, _ = make_proxy(net, FakeRules({"example.com"}), tunnel=tunnel)
        async with client_of(proxy) as c:
            await c.send(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            await read_head(c)
        async with client_of(proxy) as c:
            await socks_connect(c, socks_request(3, b"\x0bexample.com", 443))
        async with client_of(proxy) as c:
            await c.send(b"GET http://example.com/ HTTP/1.1\r\n\r\n")
            await c.send_eof()
            await read_all(c)
        assert calls == [("connect", "example.com", 443), ("socks5", "example.com", 443)]


async def test_relay_propagates_half_close_and_counts() -> None:
    a_far, a = stream_pair()
    b, b_far = stream_pair()
    counters = RelayCounters()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: relay(a, b, buffer_size=3, counters=counters))
        await a_far.send(b"request")
        await a_far.send_eof()
        assert await read_all(b_far) == b"request"  # EOF arrived at the far side
        await b_far.send(b"answer after half-close")
        await b_far.send_eof()
        assert await read_all(a_far) == b"answer after half-close"
    assert (counters.bytes_up, counters.bytes_down) == (7, 23)
    assert a.closed and b.closed


async def test_relay_error_on_one_side_closes_both() -> None:
    class Broken(MemoryByteStream):
        async def receive(self, max_bytes: int = 65536) -> bytes:
            raise anyio.BrokenResourceError("reset")

    a_far, a = stream_pair()
    b_send, _b_receive_far = anyio.create_memory_object_stream[bytes](4)
    _b_send_far, b_receive = anyio.create_memory_object_stream[bytes](4)
    b = Broken(b_send, b_receive)
    with anyio.fail_after(5):
        await relay(a, b, buffer_size=16, counters=RelayCounters())
    assert a.closed and b.closed
    await a_far.aclose()
    await _b_receive_far.aclose()
    await _b_send_far.aclose()
