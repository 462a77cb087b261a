"""The egress fast path's host side: sockets the agent hands over (protocol 1.3, stream-fd).

The test plays a (possibly hostile) agent on the other end of a real AF_UNIX socketpair and
sends real descriptors with SCM_RIGHTS. Every refusal must close what arrived: whether the
host still holds a descriptor is read from /proc/self/fd (by the inode of the object sent).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.abc import UNIXSocketStream

from stockade._errors import AgentProtocolError
from stockade.agent.client import AgentClient
from stockade.agent.tunnel import TunnelMux
from stockade.egress.fastpath import GuestSocketStream
from stockade.protocol.framing import HEADER, FrameDecoder

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def held(obj: int) -> bool:
    """Whether this process still has a descriptor for the object with inode ``obj``."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").endswith(f":[{obj}]"):
                return True
        except FileNotFoundError:
            continue
    return False


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return HEADER.pack(len(body)) + body


def accept(stream: int, *, fd: bool = True) -> bytes:
    params: dict[str, Any] = {"stream": stream, "kind": "proxy", "peer": "127.0.0.1:5"}
    if fd:
        params["fd"] = True
    return frame({"jsonrpc": "2.0", "method": "net.accept", "params": params})


HELLO_RESULT = {
    "protocol": "1.3",
    "agent_version": "test",
    "capabilities": ["net", "stream-binary", "stream-fd"],
    "pid": 2,
    "uid": 0,
    "kernel": "6.0",
    "hostname": "sandbox",
    "python": "3.11",
}


@dataclass
class FdHost:
    """An AgentClient with a tunnel on a socketpair, and the test's agent end."""

    client: AgentClient
    agent: UNIXSocketStream
    accepted: list[Any] = field(default_factory=list)
    hello: dict[str, Any] = field(default_factory=dict)

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            await self.agent.send_fds(data, fds)
        else:
            await self.agent.send(data)

    async def failure(self) -> BaseException | None:
        """Let the client read everything sent so far; its error, if it failed."""
        with anyio.move_on_after(0.5):
            await self.client.serve_forever()
        return self.client._failure


@asynccontextmanager
async def fd_host(
    *, capabilities: list[str] | None = None, offer: bool = True, limit: int | None = None
) -> AsyncIterator[FdHost]:
    host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = await UNIXSocketStream.from_socket(host_sock)
    agent = await UNIXSocketStream.from_socket(agent_sock)
    client = AgentClient(channel)
    state = FdHost(client, agent)
    mux = TunnelMux(client.notify, state.accepted.append)
    mux.offer_fd = offer
    if limit is not None:
        mux.MAX_STREAMS = limit
    client.tunnel = mux
    result = dict(HELLO_RESULT)
    if capabilities is not None:
        result["capabilities"] = capabilities

    async def fake_agent() -> None:
        decoder = FrameDecoder()
        requests: list[dict[str, Any]] = []
        while not requests:
            requests += decoder.feed(await agent.receive())
        state.hello = requests[0]["params"]
        reply = {"jsonrpc": "2.0", "id": requests[0]["id"], "result": result}
        await agent.send(frame(reply))

    async with anyio.create_task_group() as tg:
        tg.start_soon(fake_agent)
        await client.hello()
    try:
        yield state
    finally:
        for stream in state.accepted:
            await stream.aclose()
        await client.aclose()
        await agent.aclose()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the sandbox client's end, the accepted end) of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return outer, inner


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


# --- negotiation -------------------------------------------------------------------------------


async def test_offered_on_a_unix_socket_channel_and_taken_when_the_agent_agrees() -> None:
    async with fd_host() as host:
        assert host.hello["stream_fd"] is True
        assert host.client.tunnel is not None and host.client.tunnel.fd_streams


async def test_not_offered_when_turned_off_and_not_agreed_without_the_capability() -> None:
    async with fd_host(offer=False) as host:
        assert "stream_fd" not in host.hello
        assert host.client.tunnel is not None and not host.client.tunnel.fd_streams
    async with fd_host(capabilities=["net", "stream-binary"]) as host:
        assert host.hello["stream_fd"] is True
        assert host.client.tunnel is not None and not host.client.tunnel.fd_streams


async def test_not_offered_on_a_channel_that_cannot_carry_descriptors() -> None:
    to_agent, from_host = anyio.create_memory_object_stream[bytes](10)
    client = AgentClient(_BytesOver(to_agent, from_host))  # not a UNIX socket
    client.tunnel = TunnelMux(client.notify, lambda stream: None)
    with anyio.move_on_after(0.2):
        await client.hello()
    request = FrameDecoder().feed(from_host.receive_nowait())[0]
    assert "stream_fd" not in request["params"]
    await client.aclose()


class _BytesOver(anyio.abc.ByteStream):
    """A ByteStream over memory (records what the host writes)."""

    def __init__(self, send: Any, receive: Any) -> None:
        self._send, self._receive = send, receive

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(self, item: bytes) -> None:
        self._send.send_nowait(item)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


# --- the accepted path ---------------------------------------------------------------------------


async def test_a_handed_over_connection_becomes_a_socket_stream() -> None:
    async with fd_host() as host:
        outer, inner = tcp_pair()
        with outer:
            await host.send(accept(1), [inner.fileno()])
            inner.close()  # the agent closes its copy once sent
            assert await host.failure() is None
            [stream] = host.accepted
            assert isinstance(stream, GuestSocketStream)
            assert stream.accept.fd and stream.id == 1
            tunnel = host.client.tunnel
            assert tunnel is not None and tunnel.fd_accepted == 1 and tunnel.fd_open == 1
            assert len(tunnel) == 0  # no framed stream exists for it
            outer.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert await stream.receive() == b"GET / HTTP/1.1\r\n\r\n"
            await stream.send(b"answer")
            assert outer.recv(100) == b"answer"
            await stream.aclose()
            assert tunnel.fd_open == 0
            assert outer.recv(100) == b""  # the host's close ends the connection


async def test_accept_frame_split_from_its_descriptor_across_reads() -> None:
    async with fd_host() as host:
        outer, inner = tcp_pair()
        with outer:
            wire = accept(1)
            await host.send(wire[:10], [inner.fileno()])
            inner.close()
            assert await host.failure() is None  # waits for the rest of the frame
            await host.send(wire[10:])
            assert await host.failure() is None
            assert len(host.accepted) == 1


async def test_over_the_limit_a_connection_is_closed_not_the_channel() -> None:
    async with fd_host(limit=1) as host:
        first_outer, first = tcp_pair()
        extra_outer, extra = tcp_pair()
        with first_outer, extra_outer:
            await host.send(accept(1), [first.fileno()])
            await host.send(accept(2), [extra.fileno()])
            ino = inode(extra.fileno())
            first.close()
            extra.close()
            assert await host.failure() is None
            assert len(host.accepted) == 1
            assert not held(ino)
            extra_outer.settimeout(5)
            assert extra_outer.recv(10) == b""


# --- hostile descriptors: refused, closed, and the connection ends ----------------------------


def _pipe_write_end() -> tuple[int, Callable[[], None]]:
    r, w = os.pipe()
    return w, lambda: os.close(r)


def _udp() -> tuple[int, Callable[[], None]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    return sock.detach(), lambda: None


def _unix_stream() -> tuple[int, Callable[[], None]]:
    a, b = socket.socketpair()
    return a.detach(), b.close


def _listening() -> tuple[int, Callable[[], None]]:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock.detach(), lambda: None


def _regular_file() -> tuple[int, Callable[[], None]]:
    return os.open("/proc/self/status", os.O_RDONLY), lambda: None


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_pipe_write_end, "not a socket"),
        (_regular_file, "not a socket"),
        (_udp, "SOCK_DGRAM"),
        (_unix_stream, "AF_UNIX"),
        (_listening, "listening"),
    ],
)
async def test_anything_but_an_accepted_tcp_socket_is_refused_and_closed(
    make: Callable[[], tuple[int, Callable[[], None]]], why: str
) -> None:
    async with fd_host() as host:
        fd, cleanup = make()
        ino = inode(fd)
        await host.send(accept(1), [fd])
        os.close(fd)
        error = await host.failure()
        cleanup()
        assert isinstance(error, AgentProtocolError) and why in str(error), error
        assert not host.accepted
        assert not held(ino)


async def test_a_connection_reset_before_the_host_took_it_is_no_protocol_error() -> None:
    async with fd_host() as host:
        outer, inner = tcp_pair()
        outer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        outer.close()  # RST: the accepted end is no longer connected
        await host.send(accept(1), [inner.fileno()])
        inner.close()
        assert await host.failure() is None
        [stream] = host.accepted
        with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
            await stream.receive()


async def test_two_descriptors_in_one_message_are_both_closed() -> None:
    async with fd_host() as host:
        outer1, inner1 = tcp_pair()
        outer2, inner2 = tcp_pair()
        with outer1, outer2:
            inodes = [inode(inner1.fileno()), inode(inner2.fileno())]
            await host.send(accept(1), [inner1.fileno(), inner2.fileno()])
            inner1.close()
            inner2.close()
            error = await host.failure()
            assert isinstance(error, AgentProtocolError) and "2 descriptors" in str(error)
            assert not host.accepted
            assert not any(held(ino) for ino in inodes)


async def test_a_descriptor_with_another_frame_is_closed() -> None:
    async with fd_host() as host:
        outer, inner = tcp_pair()
        with outer:
            ino = inode(inner.fileno())
            direct = frame(
                {"jsonrpc": "2.0", "method": "net.direct", "params": {"target": "1.2.3.4:80"}}
            )
            await host.send(direct, [inner.fileno()])
            inner.close()
            error = await host.failure()
            assert isinstance(error, AgentProtocolError) and "other than" in str(error)
            assert not held(ino)


async def test_accept_with_fd_but_no_descriptor_is_a_protocol_error() -> None:
    async with fd_host() as host:
        await host.send(accept(1))
        error = await host.failure()
        assert isinstance(error, AgentProtocolError) and "no descriptor" in str(error)


async def test_descriptors_not_agreed_on_never_reach_the_host() -> None:
    # Not offered: the host reads without a control buffer, so the kernel drops the
    # descriptor; the accept that claims one is a protocol error.
    async with fd_host(offer=False) as host:
        outer, inner = tcp_pair()
        with outer:
            ino = inode(inner.fileno())
            await host.send(accept(1), [inner.fileno()])
            inner.close()
            error = await host.failure()
            assert isinstance(error, AgentProtocolError)
            assert not held(ino)


async def test_offered_but_refused_by_the_agent_then_sent_anyway_is_closed() -> None:
    async with fd_host(capabilities=["net", "stream-binary"]) as host:
        outer, inner = tcp_pair()
        with outer:
            ino = inode(inner.fileno())
            await host.send(accept(1), [inner.fileno()])
            inner.close()
            error = await host.failure()
            assert isinstance(error, AgentProtocolError) and "agent.hello" in str(error)
            assert not held(ino)


async def test_a_guest_set_linger_cannot_make_the_hosts_close_block() -> None:
    async with fd_host() as host:
        outer, inner = tcp_pair()
        with outer:
            inner.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x3c\x00\x00\x00"
            )
            await host.send(accept(1), [inner.fileno()])
            inner.close()
            assert await host.failure() is None
            [stream] = host.accepted
            assert stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)[:4] == bytes(4)
