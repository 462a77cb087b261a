"""TLS interception for hosts that carry a secret: terminate, swap placeholders, re-encrypt.

The sandbox's connection is terminated with a leaf certificate from the sandbox CA, a verified
TLS connection is opened to the real host, and HTTP/1.1 is relayed request by request. Only
request header blocks are rewritten (``SecretSet.substitute_headers``); bodies and responses
stream through untouched and are never buffered whole.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import ByteSendStream, ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream, BufferedByteStream
from anyio.streams.tls import TLSStream

from stockade.egress.secrets import SecretSet
from stockade.egress.tls import SandboxCA, normalize_host

__all__ = [
    "MAX_REQUEST_HEAD",
    "MAX_RESPONSE_HEAD",
    "REASON_HEADER",
    "ByteCounters",
    "InterceptCounters",
    "intercept_https",
    "upstream_context",
]

logger = logging.getLogger(__name__)

#: Largest request line + headers accepted from the sandbox; larger ones get 431.
MAX_REQUEST_HEAD = 64 * 1024
#: Largest response status line + headers accepted from the upstream; larger ones end it.
MAX_RESPONSE_HEAD = 256 * 1024
#: Header that says why the interceptor itself answered instead of the upstream.
REASON_HEADER = "X-Stockade-Reason"

_BUFFER = 64 * 1024
_MAX_LINE = 8 * 1024  # a chunk-size or trailer line
_MAX_TRAILERS = 64 * 1024
_HANDSHAKE_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 1.0

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE_RE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_STATUS_LINE_RE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [^\r\n]*)?")
_ABSOLUTE_RE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")

_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.DelimiterNotFound,
    ssl.SSLError,
    OSError,
)

_HANDSHAKE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *_STREAM_ERRORS)

_PHRASES = {
    400: "Bad Request",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
}


class ByteCounters(Protocol):
    """Where the interceptor adds the plaintext bytes it relays (for the connection log)."""

    bytes_up: int
    bytes_down: int


@dataclass
class InterceptCounters:
    """A plain ``ByteCounters``."""

    bytes_up: int = 0
    bytes_down: int = 0


def upstream_context() -> ssl.SSLContext:
    """The default client context for the real host: system trust store, verification on.

    Create it once per sandbox and pass it as ``upstream_ssl``: loading the system store
    takes milliseconds. A context passed in must offer no ALPN protocol but ``http/1.1``.
    """
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class _HttpError(Exception):
    """The interceptor answers the request itself, then closes the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_EXCHANGE_ERRORS: tuple[type[BaseException], ...] = (_HttpError, *_STREAM_ERRORS)


@dataclass
class _Head:
    raw: bytes
    start: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]

    def tokens(self, name: bytes) -> list[bytes]:
        return [t.strip().lower() for v in self.values(name) for t in v.split(b",") if t.strip()]


def _parse_head(raw: bytes) -> _Head:
    """Split a head into its start line and headers; refuse what servers disagree about."""
    lines = raw.split(b"\r\n")
    head = _Head(raw=raw, start=lines[0])
    for line in lines[1:]:
        if not line:
            continue
        if b"\n" in line or b"\r" in line or b"\0" in line:
            raise _HttpError(400, "bare CR, LF or NUL in the header block")
        if line[:1] in (b" ", b"\t"):
            raise _HttpError(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise _HttpError(400, "malformed header line")
        head.headers.append((name, value.strip(b" \t")))
    return head


def _split_authority(authority: bytes) -> str:
    text = authority.decode("latin-1").rpartition("@")[2]
    if text.startswith("["):
        return text[: text.find("]") + 1]
    return text.partition(":")[0]


def _same_host(candidate: str, host: str) -> bool:
    try:
        return normalize_host(candidate) == host
    except ValueError:
        return False


@dataclass
class _Framing:
    chunked: bool = False
    length: int | None = None  # None with chunked=False: until the connection closes


def _content_length(head: _Head) -> int | None:
    values = {v.strip() for raw in head.values(b"content-length") for v in raw.split(b",")}
    if not values:
        return None
    if len(values) != 1:
        raise _HttpError(400, "conflicting Content-Length headers")
    (value,) = values
    if not value.isdigit() or len(value) > 18:
        raise _HttpError(400, "invalid Content-Length")
    return int(value)


def _request_framing(head: _Head, version: int) -> _Framing:
    encodings = head.tokens(b"transfer-encoding")
    if encodings:
        if version == 0:
            raise _HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if encodings != [b"chunked"]:
            raise _HttpError(400, "only 'Transfer-Encoding: chunked' is supported in requests")
        if head.values(b"content-length"):
            raise _HttpError(400, "both Transfer-Encoding and Content-Length")
        return _Framing(chunked=True)
    return _Framing(length=_content_length(head) or 0)


def _response_framing(head: _Head, method: bytes, status: int) -> _Framing:
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return _Framing(length=0)
    encodings = head.tokens(b"transfer-encoding")
    if encodings:
        return _Framing(chunked=encodings[-1] == b"chunked")
    try:
        return _Framing(length=_content_length(head))
    except _HttpError as exc:
        raise _HttpError(502, f"upstream sent {exc.reason}") from None


async def intercept_https(
    client: ByteStream,
    host: str,
    port: int,
    upstream: ByteStream,
    *,
    ca: SandboxCA,
    secrets: SecretSet,
    upstream_ssl: ssl.SSLContext | None = None,
    counters: ByteCounters | None = None,
    idle_timeout: float = 120.0,
) -> None:
    """Relay one intercepted HTTPS connection; return when either side is done.

    ``client`` is the sandbox's connection after the CONNECT answer, ``upstream`` an open TCP
    connection to ``host``:``port`` (the proxy decided and resolved already). Both are
    closed on return. ``upstream_ssl`` defaults to ``upstream_context()``. A connection left
    idle between requests for ``idle_timeout`` seconds is closed.
    """
    client_tls: TLSStream | None = None
    upstream_tls: TLSStream | None = None
    try:
        host = normalize_host(host)
        with anyio.move_on_after(_HANDSHAKE_TIMEOUT):
            client_tls = await TLSStream.wrap(
                client,
                server_side=True,
                ssl_context=ca.leaf_context(host),
                standard_compatible=False,
            )
        if client_tls is None:
            logger.info("TLS handshake with the sandbox for %s:%d timed out", host, port)
            return
    except _STREAM_ERRORS as exc:
        # Typically a client that does not trust the sandbox CA (its trust variables unset).
        logger.info("TLS handshake with the sandbox for %s:%d failed: %s", host, port, exc)
        return
    finally:
        if client_tls is None:
            await anyio.aclose_forcefully(client)
            await anyio.aclose_forcefully(upstream)

    session = _Session(BufferedByteStream(client_tls), host, secrets, counters, idle_timeout)
    try:
        try:
            with anyio.fail_after(_HANDSHAKE_TIMEOUT):
                upstream_tls = await TLSStream.wrap(
                    upstream,
                    hostname=host,
                    ssl_context=upstream_ssl or upstream_context(),
                    standard_compatible=False,
                )
        except _HANDSHAKE_ERRORS as exc:
            reason = getattr(exc, "verify_message", None) or type(exc).__name__
            logger.info("TLS to %s:%d failed: %s", host, port, reason)
            await session.refuse_first(502, f"TLS to {host}:{port} failed: {reason}")
            return
        session.upstream = BufferedByteStream(upstream_tls)
        await session.run()
    finally:
        await _close_tls(client_tls)
        if upstream_tls is not None:
            await anyio.aclose_forcefully(upstream_tls)
        else:
            await anyio.aclose_forcefully(upstream)


async def _close_tls(stream: TLSStream) -> None:
    # Send close_notify so that a client reading a close-delimited body sees a clean end
    # (OpenSSL 3 clients report a bare EOF as an error); do not wait long for its reply.
    with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
        with contextlib.suppress(*_STREAM_ERRORS):
            await stream.unwrap()
    await anyio.aclose_forcefully(stream)


class _Session:
    """One intercepted connection: requests in, responses out, in order."""

    def __init__(
        self,
        client: BufferedByteStream,
        host: str,
        secrets: SecretSet,
        counters: ByteCounters | None,
        idle_timeout: float,
    ) -> None:
        self.client = client
        self.upstream: BufferedByteStream | None = None
        self.host = host
        self.secrets = secrets
        self.counters = counters if counters is not None else InterceptCounters()
        self.idle_timeout = idle_timeout
        self.broken = False
        self.requests = 0

    async def run(self) -> None:
        while True:
            try:
                keep_alive = await self._exchange()
            except _HttpError as exc:
                await self._answer(exc.status, exc.reason)
                return
            except _STREAM_ERRORS as exc:
                logger.debug("intercepted connection to %s ended: %r", self.host, exc)
                return
            if not keep_alive:
                return

    async def refuse_first(self, status: int, reason: str) -> None:
        """Answer the first request ourselves (once it has arrived), then end."""
        try:
            with anyio.move_on_after(5):
                await self._read_head(self.client, MAX_REQUEST_HEAD, status_on_overflow=431)
            await self._answer(status, reason)
        except _EXCHANGE_ERRORS:
            pass

    async def _answer(self, status: int, reason: str) -> None:
        body = f"stockade egress: {reason}\n".encode()
        head = (
            f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\n"
            f"{REASON_HEADER}: {reason}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1", "replace")
        with contextlib.suppress(*_STREAM_ERRORS):
            await self.client.send(head + body)

    async def _read_head(
        self, stream: BufferedByteReceiveStream, limit: int, *, status_on_overflow: int
    ) -> bytes | None:
        try:
            return await stream.receive_until(b"\r\n\r\n", limit) + b"\r\n\r\n"
        except anyio.IncompleteRead:
            return None
        except anyio.DelimiterNotFound:
            raise _HttpError(
                status_on_overflow, f"header block larger than {limit} bytes"
            ) from None

    async def _exchange(self) -> bool:
        """Relay one request and its response; True if the connection may carry another."""
        assert self.upstream is not None
        raw: bytes | None = None
        with anyio.move_on_after(self.idle_timeout):
            raw = await self._read_head(self.client, MAX_REQUEST_HEAD, status_on_overflow=431)
        if raw is None:
            return False
        match = _REQUEST_LINE_RE.fullmatch(raw.split(b"\r\n", 1)[0])
        if match is None:
            # Not HTTP/1.x: nothing we could answer in a way the peer understands.
            logger.info("sandbox sent no HTTP/1.x request line to %s; closing", self.host)
            return False
        method, target, version = match.group(1), match.group(2), int(match.group(3))
        self.requests += 1
        head = _parse_head(raw)
        if method == b"CONNECT":
            raise _HttpError(400, "CONNECT inside an intercepted connection")
        self._check_destination(head, target)
        framing = _request_framing(head, version)
        block, names = self.secrets.substitute_headers(self.host, raw)
        if names:
            logger.debug("substituted secrets %s for %s", names, self.host)
        tokens = head.tokens(b"connection")
        keep_alive = b"close" not in tokens and (version == 1 or b"keep-alive" in tokens)
        await self.upstream.send(block)
        self.counters.bytes_up += len(block)

        response_keep_alive = False
        upgraded = False
        failure: BaseException | None = None
        # The body goes up while the response comes down: a server may answer early (100
        # Continue, 413) and a client may wait for that answer before sending its body.
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._request_body, framing, tg.cancel_scope)
            try:
                response_keep_alive, upgraded = await self._response(method)
            except _EXCHANGE_ERRORS as exc:
                # Raised outside the task group, so that callers see it unwrapped.
                failure = exc
                tg.cancel_scope.cancel()
            else:
                if not response_keep_alive:
                    tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if self.broken:
            return False
        if upgraded:
            await self._raw_relay()
            return False
        return keep_alive and response_keep_alive

    def _check_destination(self, head: _Head, target: bytes) -> None:
        # The real host serves the request for the name in Host (or in an absolute target).
        # On a shared front end that may be another site: never send a secret there.
        hosts = head.values(b"host")
        if len(hosts) > 1:
            raise _HttpError(400, "more than one Host header")
        absolute = _ABSOLUTE_RE.match(target)
        names = [_split_authority(absolute.group(1))] if absolute else []
        names += [_split_authority(h) for h in hosts]
        for name in names:
            if not _same_host(name, self.host):
                raise _HttpError(421, f"request for {name!r} on a connection to {self.host!r}")

    async def _request_body(self, framing: _Framing, scope: anyio.CancelScope) -> None:
        assert self.upstream is not None
        try:
            if framing.chunked:
                await self._chunked(self.client, self.upstream, up=True, verbatim=False)
            elif framing.length:
                await self._exact(self.client, self.upstream, framing.length, up=True)
        except _STREAM_ERRORS as exc:
            logger.debug("request body to %s broke off: %r", self.host, exc)
            self.broken = True
            scope.cancel()

    async def _response(self, method: bytes) -> tuple[bool, bool]:
        """Relay the response; return (keep-alive, upgraded)."""
        assert self.upstream is not None
        sent_any = False
        while True:
            raw = await self._read_head(self.upstream, MAX_RESPONSE_HEAD, status_on_overflow=502)
            if raw is None:
                if sent_any:
                    return False, False
                if self.requests > 1:
                    # The upstream ended an idle keep-alive connection, as servers do: end
                    # ours the same way, so the client retries on a new one.
                    raise anyio.EndOfStream
                raise _HttpError(502, f"{self.host} closed the connection without answering")
            match = _STATUS_LINE_RE.fullmatch(raw.split(b"\r\n", 1)[0])
            if match is None:
                raise _HttpError(502, f"{self.host} sent no valid HTTP/1.x status line")
            head = _parse_head_upstream(raw)
            status = int(match.group(2))
            framing = _response_framing(head, method, status)
            await self.client.send(raw)
            self.counters.bytes_down += len(raw)
            sent_any = True
            if status == 101:
                return True, True
            if status >= 200:
                break
        if framing.chunked:
            await self._chunked(self.upstream, self.client, up=False, verbatim=True)
        elif framing.length is None:
            await self._until_eof(self.upstream, self.client)
            return False, False
        elif framing.length:
            await self._exact(self.upstream, self.client, framing.length, up=False)
        tokens = head.tokens(b"connection")
        keep = b"close" not in tokens and (match.group(1) == b"1" or b"keep-alive" in tokens)
        return keep, False

    # --- body relays --------------------------------------------------------------------

    def _count(self, up: bool, n: int) -> None:
        if up:
            self.counters.bytes_up += n
        else:
            self.counters.bytes_down += n

    async def _exact(
        self, src: BufferedByteReceiveStream, dst: ByteSendStream, length: int, *, up: bool
    ) -> None:
        remaining = length
        while remaining:
            try:
                data = await src.receive(min(remaining, _BUFFER))
            except anyio.EndOfStream:
                raise anyio.IncompleteRead from None
            await dst.send(data)
            self._count(up, len(data))
            remaining -= len(data)

    async def _until_eof(self, src: BufferedByteReceiveStream, dst: ByteSendStream) -> None:
        while True:
            try:
                data = await src.receive(_BUFFER)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            await dst.send(data)
            self._count(False, len(data))

    async def _chunked(
        self, src: BufferedByteReceiveStream, dst: ByteSendStream, *, up: bool, verbatim: bool
    ) -> None:
        # Requests are re-serialized (extensions dropped) so that the upstream frames them
        # exactly as we did; responses are passed through byte for byte.
        while True:
            line = await src.receive_until(b"\r\n", _MAX_LINE)
            match = _CHUNK_SIZE_RE.fullmatch(line)
            if match is None:
                raise anyio.BrokenResourceError("malformed chunk size line")
            size = int(match.group(1), 16)
            out = line + b"\r\n" if verbatim else b"%x\r\n" % size
            await dst.send(out)
            self._count(up, len(out))
            if size == 0:
                break
            await self._exact(src, dst, size, up=up)
            if await src.receive_exactly(2) != b"\r\n":
                raise anyio.BrokenResourceError("chunk not followed by CRLF")
            await dst.send(b"\r\n")
            self._count(up, 2)
        total = 0
        while True:
            line = await src.receive_until(b"\r\n", _MAX_LINE)
            total += len(line) + 2
            if total > _MAX_TRAILERS or (line and not verbatim and b":" not in line):
                raise anyio.BrokenResourceError("malformed or oversized trailers")
            await dst.send(line + b"\r\n")
            self._count(up, len(line) + 2)
            if not line:
                return

    async def _raw_relay(self) -> None:
        assert self.upstream is not None
        upstream = self.upstream

        async def pump(
            src: BufferedByteReceiveStream, dst: ByteSendStream, up: bool, scope: anyio.CancelScope
        ) -> None:
            try:
                while True:
                    data = await src.receive(_BUFFER)
                    await dst.send(data)
                    self._count(up, len(data))
            except _STREAM_ERRORS:
                pass
            finally:
                # TLS cannot half-close: when one direction ends, the exchange is over.
                scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, self.client, upstream, True, tg.cancel_scope)
            tg.start_soon(pump, upstream, self.client, False, tg.cancel_scope)


def _parse_head_upstream(raw: bytes) -> _Head:
    try:
        return _parse_head(raw)
    except _HttpError as exc:
        raise _HttpError(502, f"upstream sent a {exc.reason}") from None
