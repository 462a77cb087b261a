"""The host-side egress proxy of one sandbox: decide each connection, then relay its bytes.

Connections arrive as anyio ``ByteStream`` objects, whatever carried them (the agent tunnel,
a socket in tests). A proxy connection speaks HTTP proxy (``CONNECT host:port`` or an
absolute-URI request) or SOCKS5, told apart by the first byte; a forward connection is raw
TCP to a fixed ``host:port``. Every destination goes through the policy's ``decide`` with the
addresses the proxy resolved itself, and only those addresses are dialled, so a name cannot
be re-pointed (DNS rebinding) between the check and the connection.

The flow of a connection is here; the wire formats beside it: ``request`` (reading a
client's request, its target, refusals), ``http_proxy``, ``socks5``, and ``dial`` (resolve,
connect, relay).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
from anyio.abc import ByteStream

from stockade.egress.dial import (
    STREAM_ERRORS,
    Connector,
    Resolver,
    close_quietly,
    connect_tcp,
    relay,
    resolve_host,
)
from stockade.egress.http_proxy import (
    HTTP_REASONS,
    clean_header_value,
    origin_form_head,
    parse_absolute_uri,
    parse_request_head,
)
from stockade.egress.log import (
    DEFAULT_LOG_SIZE,
    ConnectionDecision,
    ConnectionKind,
    ConnectionLog,
    ConnectionRecord,
    RelayCounters,
)
from stockade.egress.request import (
    ANSWER_TIMEOUT,
    SOCKS_FAILURE,
    SOCKS_HOST_UNREACHABLE,
    SOCKS_NOT_ALLOWED,
    SOCKS_OK,
    SOCKS_REFUSED,
    ClientGone,
    Refusal,
    RequestReader,
    parse_authority,
)
from stockade.egress.socks5 import SOCKS_VERSION, socks_handshake, socks_reply
from stockade.policy.rules import is_ip_literal

if TYPE_CHECKING:
    from stockade.policy.decide import NetworkRules

__all__ = [
    "MAX_HEADER_BYTES",
    "Decider",
    "DecisionLike",
    "EgressProxy",
    "TunnelHandler",
]

logger = logging.getLogger(__name__)

#: Largest HTTP request line + header block accepted from the sandbox.
MAX_HEADER_BYTES = 16 * 1024

_HANDSHAKE_TIMEOUT = 30.0  # for the client to finish its request head / SOCKS handshake
_LINGER_TIMEOUT = 1.0  # to drain unread request bytes so the error answer is not reset
_LINGER_BYTES = 1024 * 1024


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


# --- internal outcomes ----------------------------------------------------------------------


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
            reader = RequestReader(stream, self.buffer_size)
            first = -1
            # A connection over the limit only waits long enough to be told so.
            limit = self.handshake_timeout if admitted else min(self.handshake_timeout, 5.0)
            with anyio.move_on_after(limit):
                first = await reader.peek()
            if first < 0:
                conn.reason = "client sent nothing"
                return
            if first == SOCKS_VERSION:
                conn.kind = "socks5"
                await self._serve_socks(stream, reader, conn, admitted=admitted)
            else:
                await self._serve_http(stream, reader, conn, admitted=admitted)
        except ClientGone as exc:
            conn.reason = conn.reason or f"client closed the connection ({exc})"
        finally:
            if admitted:
                self._active -= 1
            await close_quietly(stream)
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
                parsed = parse_authority(target, default_port=None)
            except Refusal as exc:
                conn.reason = exc.reason
                return
            conn.host, conn.port = parsed.host, parsed.port
            try:
                self._check_forward(conn)
                upstream = await self._open(conn)
            except _Denied:
                return
            except Refusal as exc:
                conn.reason = exc.reason
                return
            await self._carry(stream, upstream, conn, tunnel=True)
        finally:
            if admitted:
                self._active -= 1
            await close_quietly(stream)
            self._finish(conn)

    def record_direct(self, target: str, *, peer: str = "") -> None:
        """Record a direct connection the sandbox tried (refused inside it: no route out)."""
        conn = self._start("direct", peer)
        try:
            parsed = parse_authority(target, default_port=None)
            conn.host, conn.port = parsed.host, parsed.port
        except Refusal:
            conn.host = ""  # the agent's report did not parse; the record still counts
        conn.decision = "denied"
        conn.reason = (
            "direct connections bypass the proxy and are always denied (the sandbox has no "
            "route out); connect through the proxy instead"
        )
        self._finish(conn)

    # --- HTTP -----------------------------------------------------------------------------

    async def _serve_http(
        self, stream: ByteStream, reader: RequestReader, conn: _Connection, *, admitted: bool
    ) -> None:
        if not admitted:
            conn.reason = self._full_reason()
            await self._answer(stream, conn, 503, conn.reason)
            return
        try:
            with anyio.fail_after(self.handshake_timeout):
                head = await reader.head(MAX_HEADER_BYTES)
            method, target, version, headers = parse_request_head(head)
            if method == b"CONNECT":
                conn.kind = "connect"
                parsed = parse_authority(target, default_port=None)
                path = ""
            else:
                parsed, path = parse_absolute_uri(target)
            conn.host, conn.port = parsed.host, parsed.port
            upstream = await self._open(conn)
        except TimeoutError:
            conn.reason = "client did not finish its request in time"
            await self._answer(stream, conn, 400, conn.reason)
            return
        except Refusal as exc:
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
                first = origin_form_head(method, path, version, headers, parsed) + reader.rest()
            if first:
                await upstream.send(first)
                conn.counters.bytes_up += len(first)
        except STREAM_ERRORS as exc:
            conn.reason = f"connection lost before relaying ({type(exc).__name__})"
            await close_quietly(upstream)
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
            ("X-Stockade-Denied", clean_header_value(decision.reason)),
            ("X-Stockade-Rule", clean_header_value(rule)),
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
            f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Error')}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in extra),
        ]
        if status != 403:
            lines.append(f"X-Stockade-Error: {clean_header_value(conn.reason or text)}")
        response = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
        with anyio.move_on_after(ANSWER_TIMEOUT), contextlib.suppress(*STREAM_ERRORS):
            await stream.send(response)
            with contextlib.suppress(NotImplementedError):
                await stream.send_eof()
        # Read what the client still sends (a request body) for a moment: closing with
        # unread bytes makes TCP reset the connection, and the client may lose the answer.
        drained = 0
        with anyio.move_on_after(_LINGER_TIMEOUT), contextlib.suppress(*STREAM_ERRORS):
            while drained < _LINGER_BYTES:
                drained += len(await stream.receive(self.buffer_size))

    # --- SOCKS5 ---------------------------------------------------------------------------

    async def _serve_socks(
        self, stream: ByteStream, reader: RequestReader, conn: _Connection, *, admitted: bool
    ) -> None:
        limit = self.handshake_timeout if admitted else min(self.handshake_timeout, 5.0)
        try:
            with anyio.fail_after(limit):
                parsed = await socks_handshake(stream, reader, conn)
            if parsed is None:
                return
            if not admitted:
                conn.reason = self._full_reason()
                await socks_reply(stream, SOCKS_FAILURE)
                return
            upstream = await self._open(conn)
        except TimeoutError:
            conn.reason = conn.reason or "client did not finish the SOCKS5 handshake in time"
            return
        except Refusal as exc:
            conn.reason = exc.reason
            await socks_reply(stream, exc.socks)
            return
        except _Denied:
            await socks_reply(stream, SOCKS_NOT_ALLOWED)
            return

        try:
            # The bound address is not the sandbox's business: always 0.0.0.0:0.
            await socks_reply(stream, SOCKS_OK, strict=True)
            first = reader.rest()
            if first:
                await upstream.send(first)
                conn.counters.bytes_up += len(first)
        except STREAM_ERRORS as exc:
            conn.reason = f"connection lost before relaying ({type(exc).__name__})"
            await close_quietly(upstream)
            return
        await self._carry(stream, upstream, conn, tunnel=True)

    # --- deciding, connecting, relaying ----------------------------------------------------

    async def _open(self, conn: _Connection) -> ByteStream:
        """Decide ``conn.host:conn.port``, then connect to the checked addresses.

        Raises ``_Denied`` (recorded at once) or ``Refusal`` (resolution or connection
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
                raise Refusal(
                    f"resolving {host} timed out", status=504, socks=SOCKS_HOST_UNREACHABLE
                ) from None
            except OSError as exc:
                raise Refusal(
                    f"cannot resolve {host}: {exc.strerror or exc}",
                    status=502,
                    socks=SOCKS_HOST_UNREACHABLE,
                ) from None
            addresses = tuple(dict.fromkeys(str(ipaddress.ip_address(a)) for a in found))
            if not addresses:
                raise Refusal(f"{host} has no addresses", status=502, socks=SOCKS_HOST_UNREACHABLE)
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
            except STREAM_ERRORS as exc:
                failures.append(f"{address}: {getattr(exc, 'strerror', None) or exc}")
        reason = f"cannot connect to {host}:{port} ({'; '.join(failures)})"
        conn.decision = "error"  # allowed, but it did not happen; the rule stays on record
        if refused:
            raise Refusal(reason, status=502, socks=SOCKS_REFUSED)
        if timed_out:
            raise Refusal(reason, status=504, socks=SOCKS_HOST_UNREACHABLE)
        raise Refusal(reason, status=502, socks=SOCKS_HOST_UNREACHABLE)

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
