"""Reaching a destination the proxy allowed: resolve it, connect to one checked address, relay.

The proxy resolves names itself and dials only addresses it checked, so these take IP
addresses; ``relay`` copies bytes both ways, in the kernel between two plain sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import ByteStream

from stockade.egress.fastpath import SocketByteStream, splice_relay
from stockade.egress.log import RelayCounters

__all__ = [
    "STREAM_ERRORS",
    "Connector",
    "Resolver",
    "close_quietly",
    "connect_tcp",
    "relay",
    "resolve_host",
]

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 5.0  # for a stream to close before it is closed forcefully

# Errors that mean "this connection is over", from sockets, the tunnel or TLS.
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
)

#: ``(host, port) -> addresses`` (IP address strings, in the order to try them).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
#: ``(address, port) -> stream`` connecting to one IP address; never resolves names.
Connector = Callable[[str, int], Awaitable[ByteStream]]


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
                except STREAM_ERRORS as exc:
                    logger.debug("relay ended: %s", type(exc).__name__)
                    tg.cancel_scope.cancel()

            tg.start_soon(lambda: guarded(a, b, up=True))
            await guarded(b, a, up=False)  # in this task: one task fewer per connection
    finally:
        await close_quietly(a)
        await close_quietly(b)


async def close_quietly(stream: ByteStream) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(*STREAM_ERRORS):
        with anyio.move_on_after(_CLOSE_TIMEOUT):
            await stream.aclose()
            return
        await anyio.aclose_forcefully(stream)
