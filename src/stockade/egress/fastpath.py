"""Sockets the egress proxy relays in the kernel: the fast path of backends on the host kernel.

On a namespace sandbox the guest agent hands each accepted client connection's socket to the
host (``net.accept`` with a descriptor, protocol 1.3). ``adopt_guest_socket`` checks such a
descriptor (the guest is hostile), ``SocketByteStream`` is a plain ``ByteStream`` over a
socket (no read-ahead, so the proxy can parse a request and then let go of the socket), and
``splice_relay`` copies between two of them with ``os.splice`` through a pipe per direction,
so the bytes never pass through Python.

The relay runs in worker threads, one per direction: a socket the guest still holds a copy of
may have its file flags flipped back to blocking at any time, and a blocking ``splice`` must
never stall the event loop. Every call on the event loop uses ``MSG_DONTWAIT`` for the same
reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream

from stockade._errors import AgentProtocolError

if TYPE_CHECKING:
    from stockade.egress.log import RelayCounters
    from stockade.protocol.messages import NetAcceptParams

__all__ = ["GuestSocketStream", "SocketByteStream", "adopt_guest_socket", "splice_relay"]

logger = logging.getLogger(__name__)

#: Bytes asked of one splice; the pipe is grown to hold them (the unprivileged maximum).
SPLICE_CHUNK = 1024 * 1024
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = 1 | 2  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK (the pipe side never blocks)
_DONTWAIT = socket.MSG_DONTWAIT
_NOSIGNAL = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
#: Bytes a connection moves on the event loop before its relay goes to splice threads.
PROMOTE_AFTER = 1024 * 1024
_LOOP_CHUNK = 256 * 1024
#: How long a relay thread waits in one poll before it looks at its stop flag again.
_POLL_MS = 1000


def adopt_guest_socket(fd: int) -> socket.socket:
    """Take ownership of a descriptor the guest sent; refuse anything but a TCP stream socket.

    The descriptor is closed when it is refused (``AgentProtocolError``). An accepted one is
    made non-blocking, and its SO_LINGER is cleared: a guest-set linger time would make the
    host's close() block.
    """
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISSOCK(mode):
            raise AgentProtocolError(
                f"guest agent sent a descriptor that is not a socket (mode {stat.filemode(mode)})"
                " with net.accept; only the accepted connection's socket may be sent"
            )
        sock = socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            family = getattr(sock.family, "name", f"family {int(sock.family)}")
            kind = getattr(sock.type, "name", f"type {int(sock.type)}")
            raise AgentProtocolError(
                f"guest agent sent a {family} {kind} socket with net.accept; only an "
                "accepted TCP connection (SOCK_STREAM) is taken"
            )
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise AgentProtocolError(
                "guest agent sent a listening socket with net.accept; only an accepted "
                "connection is taken"
            )
        # Not checked: that it is still connected. A client that reset its connection before
        # the host took it is no protocol error; the proxy just sees it gone.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class SocketByteStream(ByteStream):
    """A connected stream socket as an anyio ``ByteStream``, reading nothing ahead."""

    def __init__(self, sock: socket.socket) -> None:
        # No Python-level timeout: with one, recv/send wait inside the call (MSG_DONTWAIT
        # notwithstanding), on the event loop.
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        self._relaying = False  # handed to splice_relay: its threads own the descriptor

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = self.socket.recv(max_bytes, _DONTWAIT)
            except BlockingIOError:
                await anyio.wait_readable(self.socket)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = self.socket.send(view, _NOSIGNAL)
            except BlockingIOError:
                await anyio.wait_writable(self.socket)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._relaying:
                anyio.notify_closing(self.socket)
                self.socket.close()
        await anyio.lowlevel.checkpoint()


class GuestSocketStream(SocketByteStream):
    """A client connection whose socket the guest agent handed over (net.accept with fd)."""

    def __init__(
        self,
        sock: socket.socket,
        stream_id: int,
        accept: NetAcceptParams,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(sock)
        self.id = stream_id
        self.accept = accept
        self._on_close = on_close

    async def aclose(self) -> None:
        was_closed = self._closed
        await super().aclose()
        if not was_closed and self._on_close is not None:
            self._on_close()


def _wait(fd: int, mask: int, stop: threading.Event) -> None:
    poller = select.poll()
    poller.register(fd, mask)
    while not stop.is_set() and not poller.poll(_POLL_MS):
        pass


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # over the user's pipe quota: the default size
        fcntl.fcntl(w, _F_SETPIPE_SZ, SPLICE_CHUNK)
    return r, w


def _pump(
    src: socket.socket,
    dst: socket.socket,
    counters: RelayCounters,
    up: bool,
    stop: threading.Event,
) -> None:
    """Copy src -> dst through a pipe until EOF, then half-close dst; errors end both."""
    src_fd, dst_fd = src.fileno(), dst.fileno()
    r, w = _pipe()
    try:
        while not stop.is_set():
            try:
                got = os.splice(src_fd, w, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                _wait(src_fd, select.POLLIN | select.POLLRDHUP, stop)
                continue
            if not got:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            while got and not stop.is_set():
                try:
                    put = os.splice(r, dst_fd, got, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    _wait(dst_fd, select.POLLOUT, stop)
                    continue
                got -= put
                if up:
                    counters.bytes_up += put
                else:
                    counters.bytes_down += put
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
            logger.debug("splice relay ended: %s", exc)
        stop.set()
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    finally:
        os.close(r)
        os.close(w)


class _Handoff:
    """Who closes the sockets: the event loop after the threads end, or, when the caller was
    cancelled (and stopped waiting) while they run, the last thread out. Threads that had not
    started yet never touch the sockets."""

    def __init__(self, *socks: socket.socket) -> None:
        self.socks = socks
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._done = False
        self._abandoned = False

    def close(self) -> None:
        for sock in self.socks:
            sock.close()  # idempotent

    def begin(self) -> bool:
        """Called by the relay thread before it uses the sockets; False: it must not."""
        with self._lock:
            if self._abandoned:
                return False
            self._started = True
            return True

    def threads_done(self) -> None:
        with self._lock:
            self._done = True
            if not self._abandoned:
                return
        self.close()

    def abandon(self) -> None:
        self.stop.set()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._abandoned = True
            if self._started and not self._done:
                return  # the last thread out closes them
        self.close()


def _relay_both(
    a: socket.socket,
    b: socket.socket,
    counters: RelayCounters,
    handoff: _Handoff,
    directions: tuple[bool, ...],
) -> None:
    """Splice the directions still open (True: a -> b) in this thread and one more."""
    if not handoff.begin():
        return
    others = [
        threading.Thread(
            target=_pump,
            args=(a if up else b, b if up else a, counters, up, handoff.stop),
            name="stockade-splice",
            daemon=True,
        )
        for up in directions[1:]
    ]
    for thread in others:
        thread.start()
    try:
        if directions:
            up = directions[0]
            _pump(a if up else b, b if up else a, counters, up, handoff.stop)
    finally:
        for thread in others:
            thread.join()
        handoff.threads_done()


class _Loop:
    """The first bytes of a connection, relayed on the event loop (see splice_relay)."""

    def __init__(self, a: socket.socket, b: socket.socket, counters: RelayCounters) -> None:
        self.a, self.b, self.counters = a, b, counters
        self.moved = 0
        self.promote = False
        self.open = {True: True, False: True}  # direction (True: a -> b) not at EOF yet
        self.waiting: dict[bool, anyio.CancelScope] = {}

    async def pump(self, up: bool) -> None:
        src, dst = (self.a, self.b) if up else (self.b, self.a)
        while not self.promote:
            data = b""
            with anyio.CancelScope() as scope:
                # The only place a promotion interrupts: no byte is held here.
                self.waiting[up] = scope
                while True:
                    try:
                        data = src.recv(_LOOP_CHUNK, _DONTWAIT)
                        break
                    except BlockingIOError:
                        await anyio.wait_readable(src)
            self.waiting.pop(up, None)
            if scope.cancelled_caught:
                return
            if not data:
                self.open[up] = False
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[dst.send(view, _NOSIGNAL) :]
                except BlockingIOError:
                    await anyio.wait_writable(dst)
            if up:
                self.counters.bytes_up += len(data)
            else:
                self.counters.bytes_down += len(data)
            self.moved += len(data)
            if self.moved >= PROMOTE_AFTER and not self.promote:
                self.promote = True
                for other in list(self.waiting.values()):
                    other.cancel()


async def splice_relay(
    a: SocketByteStream,
    b: SocketByteStream,
    *,
    counters: RelayCounters,
    limiter: anyio.CapacityLimiter,
) -> None:
    """Copy ``a`` -> ``b`` (``bytes_up``) and back (``bytes_down``) until both directions
    end; both streams are closed on return (as ``dial.relay`` does).

    The first ``PROMOTE_AFTER`` bytes go through the event loop (a short request must not
    pay for waking two threads); a connection that carries more is promoted to splice
    threads for the rest, at a point where no byte is held in Python.
    """
    handoff = _Handoff(a.socket, b.socket)
    a._relaying = b._relaying = True
    finished = False
    try:
        loop = _Loop(a.socket, b.socket, counters)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop.pump, True)
                await loop.pump(False)
        except* OSError as group:  # reset, broken pipe: the connection is over
            logger.debug("relay ended: %s", group.exceptions[0])
            loop.open = {True: False, False: False}
        directions = tuple(up for up in (True, False) if loop.open[up])
        if directions:
            await anyio.to_thread.run_sync(
                _relay_both, a.socket, b.socket, counters, handoff, directions,
                limiter=limiter, abandon_on_cancel=True,
            )  # fmt: skip
        finished = True
    finally:
        if finished:
            handoff.close()
        else:
            handoff.abandon()
        await a.aclose()
        await b.aclose()
