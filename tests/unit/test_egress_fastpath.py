"""The kernel-copy relay of the egress fast path, between real loopback TCP sockets.

Short connections stay on the event loop; longer ones are promoted to splice threads. Both
must deliver every byte in order, half-close, count, and close both sockets however they
end (also when the caller is cancelled in either phase).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import anyio
import pytest

from stockade.egress.fastpath import PROMOTE_AFTER, SocketByteStream, splice_relay
from stockade.egress.log import RelayCounters

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    outer.settimeout(20)
    return outer, inner


def closed(sock: socket.socket) -> bool:
    return sock.fileno() == -1


async def run_relay(size_up: int, size_down: int) -> tuple[RelayCounters, str, str]:
    """client <-> [a relay b] <-> server; each end sends its bytes, half-closes, reads all."""
    client, a = tcp_pair()
    b, server = tcp_pair()
    counters = RelayCounters()
    pattern = bytes(range(251)) * 4000
    digests: dict[str, str] = {}

    def end(sock: socket.socket, size: int, name: str) -> None:
        def send() -> None:
            left = size
            while left:
                piece = pattern[: min(left, len(pattern))]
                sock.sendall(piece)
                left -= len(piece)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        while data := sock.recv(1 << 20):
            digest.update(data)
        sender.join()
        digests[name] = digest.hexdigest()
        sock.close()

    threads = [
        threading.Thread(target=end, args=(client, size_up, "client")),
        threading.Thread(target=end, args=(server, size_down, "server")),
    ]
    for thread in threads:
        thread.start()
    limiter = anyio.CapacityLimiter(4)
    with anyio.fail_after(30):
        await splice_relay(
            SocketByteStream(a), SocketByteStream(b), counters=counters, limiter=limiter
        )
    for thread in threads:
        thread.join(10)
    assert closed(a) and closed(b)

    def expected(size: int) -> str:
        return hashlib.sha256((pattern * (size // len(pattern) + 1))[:size]).hexdigest()

    assert digests["server"] == expected(size_up)  # what the server received
    assert digests["client"] == expected(size_down)
    return counters, digests["client"], digests["server"]


@pytest.mark.parametrize(
    ("up", "down"),
    [
        (100, 2),  # a short request: stays on the event loop
        (0, PROMOTE_AFTER * 3 + 17),  # a download: promoted mid-way
        (PROMOTE_AFTER * 2 + 5, 10),  # an upload
        (PROMOTE_AFTER * 5, PROMOTE_AFTER * 5),  # both ways at once
    ],
)
async def test_every_byte_arrives_in_order_and_is_counted(up: int, down: int) -> None:
    counters, _, _ = await run_relay(up, down)
    assert (counters.bytes_up, counters.bytes_down) == (up, down)


@pytest.mark.parametrize("phase", ["event loop", "splice threads"])
async def test_cancelled_relay_closes_both_sockets(phase: str) -> None:
    client, a = tcp_pair()
    b, server = tcp_pair()
    counters = RelayCounters()
    if phase == "splice threads":
        # More than PROMOTE_AFTER moves, then the connection idles in the splice threads.
        server.sendall(bytes(PROMOTE_AFTER + 1))
    with anyio.move_on_after(1):
        await splice_relay(
            SocketByteStream(a), SocketByteStream(b), counters=counters,
            limiter=anyio.CapacityLimiter(4),
        )  # fmt: skip
    if phase == "splice threads":
        assert counters.bytes_down > PROMOTE_AFTER  # it did reach the threads
    deadline = time.monotonic() + 5
    while not (closed(a) and closed(b)):
        assert time.monotonic() < deadline, "the relay left a socket open"
        await anyio.sleep(0.05)
    client.close()
    server.close()
