"""The host-side egress proxy of one sandbox: decide each connection, then relay its bytes.

Connections arrive as anyio ``ByteStream`` objects, whatever carried them (the agent tunnel,
a socket in tests). A proxy connection speaks HTTP proxy (``CONNECT host:port`` or an
absolute-URI request) or SOCKS5, told apart by the first byte; a forward connection is raw
TCP to a fixed ``host:port``. Every destination goes through the policy's ``decide`` with the
addresses the proxy resolved itself, and only those addresses are dialled, so a name cannot
be re-pointed (DNS rebinding) between the check and the connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import ByteStream

from stockade.egress.fastpath import SocketByteStream, splice_relay
from stockade.egress.log import (
    DEFAULT_LOG_SIZE,
    ConnectionDecision,
    ConnectionKind,
    ConnectionLog,
    ConnectionRecord,
    RelayCounters,
)
from stockade.policy.rules import is_ip_literal

if TYPE_CHECKING:
    from stockade.policy.decide import NetworkRules

__all__ = [
    "MAX_HEADER_BYTES",
    "Connector",
    "Decider",
    "DecisionLike",
    "EgressProxy",
    "Resolver",
    "TunnelHandler",
    "connect_tcp",
    "relay",
    "resolve_host",
]

logger = logging.getLogger(__name__)

#: Largest HTTP request line + header block accepted from the sandbox.
MAX_HEADER_BYTES = 16 * 1024

_HANDSHAKE_TIMEOUT = 30.0  # for the client to finish its request head / SOCKS handshake
_ANSWER_TIMEOUT = 5.0  # for an error answer to be written
_LINGER_TIMEOUT = 1.0  # to drain unread request bytes so the error answer is not reset
_LINGER_BYTES = 1024 * 1024

# Errors that mean "this connection is over", from sockets, the tunnel or TLS.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)

_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION_RE = re.compile(rb"HTTP/1\.[01]")
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")

# Never forwarded by a proxy (RFC 9110 7.6.1), plus the proxy's own credentials.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
# Named in a client's Connection header they would still not be dropped: removing framing
# or Host would make the upstream read the request differently from how it was checked.
_NEVER_DROPPED = frozenset({b"host", b"content-length", b"transfer-encoding"})

_SOCKS_VERSION = 0x05
_SOCKS_NO_AUTH = 0x00
_SOCKS_NO_ACCEPTABLE = 0xFF
_SOCKS_CONNECT = 0x01
_SOCKS_OK = 0x00
_SOCKS_FAILURE = 0x01
_SOCKS_NOT_ALLOWED = 0x02
_SOCKS_HOST_UNREACHABLE = 0x04
_SOCKS_REFUSED = 0x05
_SOCKS_BAD_COMMAND = 0x07
_SOCKS_BAD_ADDRESS = 0x08

_REASONS = {
    400: "Bad Request",
    403: "Forbidden by stockade network policy",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class DecisionLike(Protocol):
    """What ``decide`` returns (``stockade.policy.decide.Decision``)."""

    @property
    def allowed(self) -> bool: ...
    @property
    def rule(self) -> str | None: ...
    @property
    def reason(self) -> str: ...


class Decider(Protocol):
    """The policy's pure decision function (``stockade.policy.decide.decide``)."""

    def __call__(
        self, host: str, port: int, rules: NetworkRules, /, *, resolved: Sequence[str] = ()
    ) -> DecisionLike: ...


#: ``(host, port) -> addresses`` (IP address strings, in the order to try them).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
#: ``(address, port) -> stream`` connecting to one IP address; never resolves names.
Connector = Callable[[str, int], Awaitable[ByteStream]]


class TunnelHandler(Protocol):
    """Carries an established CONNECT / SOCKS5 tunnel; the default is ``relay``.

    The place for the TLS-interception layer: it gets the sandbox side and the connected
    upstream, must add what it relays to ``counters`` and close both streams on return.
    """

    def __call__(
        self,
        client: ByteStream,
        upstream: ByteStream,
        *,
        kind: ConnectionKind,
        host: str,
        port: int,
        counters: RelayCounters,
    ) -> Awaitable[None]: ...


async def resolve_host(host: str, port: int) -> list[str]:
    """The default resolver: the system's ``getaddrinfo``, addresses deduplicated in order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def connect_tcp(address: str, port: int) -> ByteStream:
    """The default connector: a TCP connection to one IP address.

    The proxy tries the checked addresses one after the other itself, so this skips
    ``anyio.connect_tcp``'s name handling and happy-eyeballs task group (a measurable share of
    the per-connection cost).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect((address, port))
        except BlockingIOError:
            await anyio.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error)) from None
        # No read-ahead: a relay between two such sockets can then run in the kernel.
        return SocketByteStream(sock)
    except BaseException:
        sock.close()
        raise


async def relay(
    a: ByteStream,
    b: ByteStream,
    *,
    buffer_size: int,
    counters: RelayCounters,
    limiter: anyio.CapacityLimiter | None = None,
) -> None:
    """Copy ``a`` -> ``b`` (``bytes_up``) and ``b`` -> ``a`` (``bytes_down``) until both end.

    Between two plain sockets (a connection the guest handed over, and the upstream) and with
    a thread ``limiter``, the bytes are copied in the kernel (``fastpath.splice_relay``).
    Otherwise at most ``buffer_size`` bytes per direction are held at once. End of stream on
    one side becomes ``send_eof`` on the other (where the stream supports half-closing), so a client
    that half-closes still gets its answer. An error on either side ends both directions.
    Both streams are closed on return.
    """

    if limiter is not None and type(b) is SocketByteStream and isinstance(a, SocketByteStream):
        await splice_relay(a, b, counters=counters, limiter=limiter)
        return

    async def pump(src: ByteStream, dst: ByteStream, *, up: bool) -> None:
        while True:
            try:
                data = await src.receive(buffer_size)
            except anyio.EndOfStream:
                break
            await dst.send(data)
            if up:
                counters.bytes_up += len(data)
            else:
                counters.bytes_down += len(data)
        with contextlib.suppress(NotImplementedError):
            await dst.send_eof()

    try:
        async with anyio.create_task_group() as tg:

            async def guarded(src: ByteStream, dst: ByteStream, *, up: bool) -> None:
                try:
                    await pump(src, dst, up=up)
                except _STREAM_ERRORS as exc:
                    logger.debug("relay ended: %s", type(exc).__name__)
                    tg.cancel_scope.cancel()

            tg.start_soon(lambda: guarded(a, b, up=True))
            await guarded(b, a, up=False)  # in this task: one task fewer per connection
    finally:
        await _close_quietly(a)
        await _close_quietly(b)


async def _close_quietly(stream: ByteStream) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(*_STREAM_ERRORS):
        with anyio.move_on_after(_ANSWER_TIMEOUT):
            await stream.aclose()
            return
        await anyio.aclose_forcefully(stream)


# --- internal outcomes ----------------------------------------------------------------------


class _Refusal(Exception):
    """The proxy answers the client itself (an error, not a policy decision) and closes."""

    def __init__(self, reason: str, *, status: int = 400, socks: int = _SOCKS_FAILURE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.socks = socks


class _Denied(Exception):
    def __init__(self, decision: DecisionLike) -> None:
        super().__init__(decision.reason)
        self.decision = decision


@dataclass(frozen=True)
class _Verdict:
    """A refusal the proxy makes itself, shaped like a policy decision."""

    allowed: bool
    rule: str | None
    reason: str


class _ClientGone(Exception):
    """The client closed or broke the connection before finishing its request."""


class _Reader:
    """Reads a request head from the client, keeping what came after it for the upstream."""

    def __init__(self, stream: ByteStream, chunk: int) -> None:
        self._stream = stream
        self._chunk = chunk
        self.buffer = bytearray()

    async def _fill(self) -> None:
        try:
            data = await self._stream.receive(self._chunk)
        except _STREAM_ERRORS as exc:
            raise _ClientGone(type(exc).__name__) from None
        self.buffer += data

    async def peek(self) -> int:
        if not self.buffer:
            await self._fill()
        return self.buffer[0]

    async def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            await self._fill()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def head(self, limit: int) -> bytes:
        scanned = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                if end + 4 > limit:
                    break
                data = bytes(self.buffer[: end + 4])
                del self.buffer[: end + 4]
                return data
            scanned = len(self.buffer)
            if scanned >= limit:
                break
            await self._fill()
        raise _Refusal(f"request header block larger than {limit} bytes")

    def rest(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


@dataclass
class _Connection:
    """What the record of one connection will say; filled in as the connection proceeds."""

    kind: ConnectionKind
    peer: str
    started: float
    wall: float
    host: str = ""
    port: int = 0
    addresses: tuple[str, ...] = ()
    decision: ConnectionDecision = "error"
    rule: str | None = None
    reason: str = ""
    emitted: bool = False

    def __post_init__(self) -> None:
        self.counters = RelayCounters()


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    authority: str  # as it goes into a Host header


def _normalize_host(raw: str) -> str:
    """An IP address in canonical form, or a lower-case DNS name; anything else refused."""
    host = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if raw.startswith("["):
        raise _Refusal(f"not an IPv6 address: {raw!r}", socks=_SOCKS_BAD_ADDRESS)
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(p) for p in name.split(".")):
        raise _Refusal(f"not a valid host name: {raw[:80]!r}", socks=_SOCKS_BAD_ADDRESS)
    return name


def _parse_port(raw: str) -> int:
    if not _PORT_RE.fullmatch(raw) or not 0 < int(raw) < 65536:
        raise _Refusal(f"not a valid port: {raw[:16]!r}")
    return int(raw)


def _parse_authority(authority: str, *, default_port: int | None) -> _Target:
    if "@" in authority:
        raise _Refusal("user information in the target is not supported")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise _Refusal(f"unterminated IPv6 address: {authority[:80]!r}")
        raw_host, rest = authority[: close + 1], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise _Refusal(f"not a valid target: {authority[:80]!r}")
        raw_port = rest[1:] if rest else None
    else:
        raw_host, sep, port_text = authority.rpartition(":")
        if not sep:
            raw_host, raw_port = authority, None
        else:
            raw_port = port_text
    if raw_port is None:
        if default_port is None:
            raise _Refusal(f"target needs a port: {authority[:80]!r}")
        port = default_port
    else:
        port = _parse_port(raw_port)
    return _Target(_normalize_host(raw_host), port, authority)


def _clean_header_value(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", " ", text)[:512]


# --- the proxy ------------------------------------------------------------------------------


class EgressProxy:
    """The egress proxy of one sandbox. Call a handler for each tunnelled connection.

    ``rules`` can be replaced while connections run (``set_rules``); a connection is decided
    once, against the rules current when it asked. Each connection ends with one
    ``ConnectionRecord``, kept in ``log()`` and passed to ``on_event``.
    """

    def __init__(
        self,
        *,
        rules: NetworkRules,
        decide: Decider,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        on_event: Callable[[ConnectionRecord], None] | None = None,
        max_connections: int = 128,
        buffer_size: int = 64 * 1024,
        connect_timeout: float = 10.0,
        handshake_timeout: float = _HANDSHAKE_TIMEOUT,
        sandbox: str = "",
        log_size: int = DEFAULT_LOG_SIZE,
        tunnel: TunnelHandler | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.rules = rules
        self._decide = decide
        self._resolve: Resolver = resolver or resolve_host
        self._connect: Connector = connector or connect_tcp
        self._on_event = on_event
        self.max_connections = max_connections
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.sandbox = sandbox
        self._tunnel = tunnel
        self._log = ConnectionLog(log_size)
        self._active = 0
        #: Worker threads of kernel-copy relays (fd-carried connections): one per connection.
        self.relay_threads = anyio.CapacityLimiter(max_connections)

    # --- public ---------------------------------------------------------------------------

    def set_rules(self, rules: NetworkRules) -> None:
        """Use ``rules`` for every connection decided from now on."""
        self.rules = rules

    @property
    def active_connections(self) -> int:
        return self._active

    def log(self) -> list[ConnectionRecord]:
        """The most recent connection records, oldest first."""
        return self._log.records()

    async def handle_proxy_stream(self, stream: ByteStream, *, peer: str = "") -> None:
        """Serve one HTTP-proxy or SOCKS5 client connection; return when it is over.

        The stream is closed on return.
        """
        conn = self._start("http", peer)
        admitted = self._admit()
        try:
            reader = _Reader(stream, self.buffer_size)
            first = -1
            # A connection over the limit only waits long enough to be told so.
            limit = self.handshake_timeout if admitted else min(self.handshake_timeout, 5.0)
            with anyio.move_on_after(limit):
                first = await reader.peek()
            if first < 0:
                conn.reason = "client sent nothing"
                return
            if first == _SOCKS_VERSION:
                conn.kind = "socks5"
                await self._serve_socks(stream, reader, conn, admitted=admitted)
            else:
                await self._serve_http(stream, reader, conn, admitted=admitted)
        except _ClientGone as exc:
            conn.reason = conn.reason or f"client closed the connection ({exc})"
        finally:
            if admitted:
                self._active -= 1
            await _close_quietly(stream)
            self._finish(conn)

    async def handle_forward_stream(
        self, stream: ByteStream, target: str, *, peer: str = ""
    ) -> None:
        """Relay one raw TCP connection to ``target`` (``host:port``) if the policy allows it.

        Raw forwards cannot carry an answer, so a refused one is simply closed. The stream
        is closed on return.
        """
        conn = self._start("forward", peer)
        admitted = self._admit()
        try:
            if not admitted:
                conn.reason = self._full_reason()
                return
            try:
                parsed = _parse_authority(target, default_port=None)
            except _Refusal as exc:
                conn.reason = exc.reason
                return
            conn.host, conn.port = parsed.host, parsed.port
            try:
                self._check_forward(conn)
                upstream = await self._open(conn)
            except _Denied:
                return
            except _Refusal as exc:
                conn.reason = exc.reason
                return
            await self._carry(stream, upstream, conn, tunnel=True)
        finally:
            if admitted:
                self._active -= 1
            await _close_quietly(stream)
            self._finish(conn)

    def record_direct(self, target: str, *, peer: str = "") -> None:
        """Record a direct connection the sandbox tried (refused inside it: no route out)."""
        conn = self._start("direct", peer)
        try:
            parsed = _parse_authority(target, default_port=None)
            conn.host, conn.port = parsed.host, parsed.port
        except _Refusal:
            conn.host = ""  # the agent's report did not parse; the record still counts
        conn.decision = "denied"
        conn.reason = (
            "direct connections bypass the proxy and are always denied (the sandbox has no "
            "route out); connect through the proxy instead"
        )
        self._finish(conn)

    # --- HTTP -----------------------------------------------------------------------------

    async def _serve_http(
        self, stream: ByteStream, reader: _Reader, conn: _Connection, *, admitted: bool
    ) -> None:
        if not admitted:
            conn.reason = self._full_reason()
            await self._answer(stream, conn, 503, conn.reason)
            return
        try:
            with anyio.fail_after(self.handshake_timeout):
                head = await reader.head(MAX_HEADER_BYTES)
            method, target, version, headers = _parse_request_head(head)
            if method == b"CONNECT":
                conn.kind = "connect"
                parsed = _parse_authority(target, default_port=None)
                path = ""
            else:
                parsed, path = _parse_absolute_uri(target)
            conn.host, conn.port = parsed.host, parsed.port
            upstream = await self._open(conn)
        except TimeoutError:
            conn.reason = "client did not finish its request in time"
            await self._answer(stream, conn, 400, conn.reason)
            return
        except _Refusal as exc:
            conn.reason = exc.reason
            await self._answer(stream, conn, exc.status, exc.reason)
            return
        except _Denied as exc:
            await self._answer_denied(stream, conn, exc.decision)
            return

        try:
            if conn.kind == "connect":
                await stream.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = reader.rest()
            else:
                first = _origin_form_head(method, path, version, headers, parsed) + reader.rest()
            if first:
                await upstream.send(first)
                conn.counters.bytes_up += len(first)
        except _STREAM_ERRORS as exc:
            conn.reason = f"connection lost before relaying ({type(exc).__name__})"
            await _close_quietly(upstream)
            return
        await self._carry(stream, upstream, conn, tunnel=conn.kind == "connect")

    async def _answer_denied(
        self, stream: ByteStream, conn: _Connection, decision: DecisionLike
    ) -> None:
        rule = decision.rule or "none"
        name = self.sandbox or "NAME"
        body = (
            f"stockade: the network policy denied {conn.host}:{conn.port}: {decision.reason}"
            f" (rule: {rule}).\n"
            f"To allow it, run on the host: stockade net allow {name} {conn.host}\n"
        )
        extra = [
            ("X-Stockade-Denied", _clean_header_value(decision.reason)),
            ("X-Stockade-Rule", _clean_header_value(rule)),
        ]
        await self._answer(stream, conn, 403, body, extra=extra)

    async def _answer(
        self,
        stream: ByteStream,
        conn: _Connection,
        status: int,
        text: str,
        *,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        body = (text if text.endswith("\n") else text + "\n").encode("utf-8", "replace")
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in extra),
        ]
        if status != 403:
            lines.append(f"X-Stockade-Error: {_clean_header_value(conn.reason or text)}")
        response = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
        with anyio.move_on_after(_ANSWER_TIMEOUT), contextlib.suppress(*_STREAM_ERRORS):
            await stream.send(response)
            with contextlib.suppress(NotImplementedError):
                await stream.send_eof()
        # Read what the client still sends (a request body) for a moment: closing with
        # unread bytes makes TCP reset the connection, and the client may lose the answer.
        drained = 0
        with anyio.move_on_after(_LINGER_TIMEOUT), contextlib.suppress(*_STREAM_ERRORS):
            while drained < _LINGER_BYTES:
                drained += len(await stream.receive(self.buffer_size))

    # --- SOCKS5 ---------------------------------------------------------------------------

    async def _serve_socks(
        self, stream: ByteStream, reader: _Reader, conn: _Connection, *, admitted: bool
    ) -> None:
        limit = self.handshake_timeout if admitted else min(self.handshake_timeout, 5.0)
        try:
            with anyio.fail_after(limit):
                parsed = await self._socks_handshake(stream, reader, conn)
            if parsed is None:
                return
            if not admitted:
                conn.reason = self._full_reason()
                await _socks_reply(stream, _SOCKS_FAILURE)
                return
            upstream = await self._open(conn)
        except TimeoutError:
            conn.reason = conn.reason or "client did not finish the SOCKS5 handshake in time"
            return
        except _Refusal as exc:
            conn.reason = exc.reason
            await _socks_reply(stream, exc.socks)
            return
        except _Denied:
            await _socks_reply(stream, _SOCKS_NOT_ALLOWED)
            return

        try:
            # The bound address is not the sandbox's business: always 0.0.0.0:0.
            await _socks_reply(stream, _SOCKS_OK, strict=True)
            first = reader.rest()
            if first:
                await upstream.send(first)
                conn.counters.bytes_up += len(first)
        except _STREAM_ERRORS as exc:
            conn.reason = f"connection lost before relaying ({type(exc).__name__})"
            await _close_quietly(upstream)
            return
        await self._carry(stream, upstream, conn, tunnel=True)

    async def _socks_handshake(
        self, stream: ByteStream, reader: _Reader, conn: _Connection
    ) -> _Target | None:
        version, count = await reader.exactly(2)
        methods = await reader.exactly(count)
        if _SOCKS_NO_AUTH not in methods:
            conn.reason = "SOCKS5 client offers no supported method (only 'no authentication')"
            await _socks_send(stream, bytes([_SOCKS_VERSION, _SOCKS_NO_ACCEPTABLE]))
            return None
        await _socks_send(stream, bytes([_SOCKS_VERSION, _SOCKS_NO_AUTH]), strict=True)
        version, command, _reserved, atyp = await reader.exactly(4)
        if version != _SOCKS_VERSION:
            conn.reason = f"SOCKS5 request with version {version}"
            await _socks_reply(stream, _SOCKS_FAILURE)
            return None
        if command != _SOCKS_CONNECT:
            conn.reason = f"SOCKS5 command {command} not supported (only CONNECT)"
            await _socks_reply(stream, _SOCKS_BAD_COMMAND)
            return None
        if atyp == 0x01:
            raw = str(ipaddress.IPv4Address(await reader.exactly(4)))
        elif atyp == 0x04:
            raw = str(ipaddress.IPv6Address(await reader.exactly(16)))
        elif atyp == 0x03:
            (length,) = await reader.exactly(1)
            name = await reader.exactly(length)
            try:
                raw = name.decode("ascii")
            except UnicodeDecodeError:
                raise _Refusal("SOCKS5 host name is not ASCII", socks=_SOCKS_BAD_ADDRESS) from None
        else:
            conn.reason = f"SOCKS5 address type {atyp} not supported"
            await _socks_reply(stream, _SOCKS_BAD_ADDRESS)
            return None
        port = int.from_bytes(await reader.exactly(2), "big")
        if port == 0:
            raise _Refusal("SOCKS5 request for port 0", socks=_SOCKS_FAILURE)
        host = _normalize_host(raw)
        conn.host, conn.port = host, port
        return _Target(host, port, raw)

    # --- deciding, connecting, relaying ----------------------------------------------------

    async def _open(self, conn: _Connection) -> ByteStream:
        """Decide ``conn.host:conn.port``, then connect to the checked addresses.

        Raises ``_Denied`` (recorded at once) or ``_Refusal`` (resolution or connection
        failed).
        """
        rules = self.rules  # one connection, one policy, even if it changes meanwhile
        host, port = conn.host, conn.port
        if is_ip_literal(host):
            addresses: tuple[str, ...] = (host,)
        else:
            # Decide on the name first: a denied name is never looked up, so the sandbox
            # cannot leak data through DNS queries for names it may not reach.
            self._check(conn, self._decide(host, port, rules, resolved=()), final=False)
            try:
                with anyio.fail_after(self.connect_timeout):
                    found = await self._resolve(host, port)
            except TimeoutError:
                raise _Refusal(
                    f"resolving {host} timed out", status=504, socks=_SOCKS_HOST_UNREACHABLE
                ) from None
            except OSError as exc:
                raise _Refusal(
                    f"cannot resolve {host}: {exc.strerror or exc}",
                    status=502,
                    socks=_SOCKS_HOST_UNREACHABLE,
                ) from None
            addresses = tuple(dict.fromkeys(str(ipaddress.ip_address(a)) for a in found))
            if not addresses:
                raise _Refusal(
                    f"{host} has no addresses", status=502, socks=_SOCKS_HOST_UNREACHABLE
                )
        decision = self._decide(host, port, rules, resolved=addresses)
        if not decision.allowed and decision.rule is None and len(addresses) > 1:
            # A name with several addresses, some special (localhost is 127.0.0.1 and ::1):
            # dial only those the policy allows on their own. A deny rule covering any of
            # them (decision.rule set) still refuses the name, and nothing unchecked is dialled.
            kept = tuple(
                a for a in addresses if self._decide(host, port, rules, resolved=(a,)).allowed
            )
            if kept:
                addresses = kept
                decision = self._decide(host, port, rules, resolved=kept)
        conn.addresses = addresses
        self._check(conn, decision, final=True)

        failures: list[str] = []
        timed_out = refused = False
        for address in addresses:
            try:
                with anyio.fail_after(self.connect_timeout):
                    return await self._connect(address, port)
            except TimeoutError:
                timed_out = True
                failures.append(f"{address}: timed out")
            except ConnectionRefusedError:
                refused = True
                failures.append(f"{address}: connection refused")
            except _STREAM_ERRORS as exc:
                failures.append(f"{address}: {getattr(exc, 'strerror', None) or exc}")
        reason = f"cannot connect to {host}:{port} ({'; '.join(failures)})"
        conn.decision = "error"  # allowed, but it did not happen; the rule stays on record
        if refused:
            raise _Refusal(reason, status=502, socks=_SOCKS_REFUSED)
        if timed_out:
            raise _Refusal(reason, status=504, socks=_SOCKS_HOST_UNREACHABLE)
        raise _Refusal(reason, status=502, socks=_SOCKS_HOST_UNREACHABLE)

    def _check_forward(self, conn: _Connection) -> None:
        """A raw forward needs a ``tcp`` rule naming its target, not just any allow rule."""
        host, port = conn.host, conn.port
        if any(rule.matches(host, port) for rule in self.rules.tcp):
            return
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = (
            f"{target} is not a [network] tcp rule; raw TCP forwards need one "
            f"(add '{target}' to [network] tcp)"
        )
        self._check(conn, _Verdict(allowed=False, rule=None, reason=reason), final=True)

    def _check(self, conn: _Connection, decision: DecisionLike, *, final: bool) -> None:
        conn.rule, conn.reason = decision.rule, decision.reason
        if decision.allowed:
            if final:
                conn.decision = "allowed"
            return
        conn.decision = "denied"
        self._finish(conn)  # denials are reported at once, before the answer is written
        raise _Denied(decision)

    async def _carry(
        self, client: ByteStream, upstream: ByteStream, conn: _Connection, *, tunnel: bool
    ) -> None:
        if tunnel and self._tunnel is not None:
            await self._tunnel(
                client,
                upstream,
                kind=conn.kind,
                host=conn.host,
                port=conn.port,
                counters=conn.counters,
            )
        else:
            await relay(
                client,
                upstream,
                buffer_size=self.buffer_size,
                counters=conn.counters,
                limiter=self.relay_threads,
            )

    # --- bookkeeping ----------------------------------------------------------------------

    def _admit(self) -> bool:
        if self._active >= self.max_connections:
            return False
        self._active += 1
        return True

    def _full_reason(self) -> str:
        return f"too many connections (max_connections={self.max_connections})"

    def _start(self, kind: ConnectionKind, peer: str) -> _Connection:
        return _Connection(kind=kind, peer=peer, started=anyio.current_time(), wall=time.time())

    def _finish(self, conn: _Connection) -> None:
        if conn.emitted:
            return
        conn.emitted = True
        record = ConnectionRecord(
            time=conn.wall,
            sandbox=self.sandbox,
            kind=conn.kind,
            host=conn.host,
            port=conn.port,
            addresses=conn.addresses,
            decision=conn.decision,
            rule=conn.rule,
            reason=conn.reason,
            bytes_up=conn.counters.bytes_up,
            bytes_down=conn.counters.bytes_down,
            duration=max(0.0, anyio.current_time() - conn.started),
            peer=conn.peer,
        )
        self._log.append(record)
        logger.debug(
            "%s %s:%d %s (%s)", record.kind, record.host, record.port, record.decision, record.rule
        )
        if self._on_event is not None:
            try:
                self._on_event(record)
            except Exception:
                # The audit hook is the caller's code; its failure must not take the
                # connection handling down with it.
                logger.exception("egress on_event callback failed")


# --- HTTP request heads ---------------------------------------------------------------------


def _parse_request_head(head: bytes) -> tuple[bytes, str, bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _Refusal("malformed request line")
    method, raw_target, version = parts
    if not _TOKEN_RE.fullmatch(method) or not _VERSION_RE.fullmatch(version):
        raise _Refusal("malformed request line")
    if not raw_target or any(c <= 0x20 or c >= 0x7F for c in raw_target):
        raise _Refusal("malformed request target")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise _Refusal("malformed header line")
        value = value.strip(b" \t")
        if any(c in b"\r\n\x00" for c in value):
            raise _Refusal("malformed header value")
        headers.append((name, value))
    return method, raw_target.decode("ascii"), version, headers


def _parse_absolute_uri(target: str) -> tuple[_Target, str]:
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise _Refusal(
            "this is a proxy: send CONNECT host:port or an absolute http:// URI"
            " (origin-form requests are not served)"
        )
    if scheme.lower() != "http":
        raise _Refusal(f"scheme {scheme[:16]!r} not supported; use CONNECT for https")
    end = len(rest)
    for delimiter in "/?#":
        index = rest.find(delimiter)
        if index >= 0:
            end = min(end, index)
    authority, path = rest[:end], rest[end:]
    path = path.split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    return _parse_authority(authority, default_port=80), path


def _origin_form_head(
    method: bytes,
    path: str,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    target: _Target,
) -> bytes:
    dropped = set(_HOP_BY_HOP)
    for name, value in headers:
        if name.lower() in (b"connection", b"proxy-connection"):
            for item in value.split(b","):
                token = item.strip().lower()
                if token and token not in _NEVER_DROPPED:
                    dropped.add(token)
    # Host comes from the URI that was checked, never from a header the client chose
    # (which would let it reach another site on the same address).
    out = [method + b" " + path.encode("ascii") + b" " + version]
    out.append(b"Host: " + target.authority.encode("ascii"))
    for name, value in headers:
        lower = name.lower()
        if lower in dropped or lower == b"host" or lower.startswith(b"proxy-"):
            continue
        out.append(name + b": " + value)
    # One request per upstream connection: the relay after the head is byte-for-byte, so a
    # second request on the same connection would bypass the rewrite.
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n"


# --- SOCKS5 replies -------------------------------------------------------------------------


async def _socks_send(stream: ByteStream, data: bytes, *, strict: bool = False) -> None:
    if strict:
        await stream.send(data)
        return
    with anyio.move_on_after(_ANSWER_TIMEOUT), contextlib.suppress(*_STREAM_ERRORS):
        await stream.send(data)


async def _socks_reply(stream: ByteStream, code: int, *, strict: bool = False) -> None:
    reply = bytes([_SOCKS_VERSION, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
    await _socks_send(stream, reply, strict=strict)
