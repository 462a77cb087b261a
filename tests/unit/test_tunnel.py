"""The host side of the egress tunnel: flow control and stream lifecycle, driven directly."""

from __future__ import annotations

import base64
from typing import Any

import anyio
import pytest

from stockade._errors import AgentProtocolError
from stockade.agent.tunnel import ACK_BATCH, BINARY_CHUNK, TunnelMux, TunnelStream
from stockade.protocol.framing import FrameDecoder, StreamChunk
from stockade.protocol.messages import (
    STREAM_WINDOW,
    NetAcceptParams,
    NetDirectParams,
    StreamAckParams,
    StreamCloseParams,
    StreamDataParams,
    StreamEofParams,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Harness:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.chunks: list[StreamChunk] = []  # binary stream frames the host sent
        self.accepted: list[TunnelStream] = []
        self.mux = TunnelMux(self.send, self.accepted.append)
        self._decoder = FrameDecoder(binary=True)

    async def send(self, message: dict[str, Any] | bytes | list[bytes]) -> None:
        # Bulk data and acks arrive as whole frames; decode them as the agent would.
        if isinstance(message, dict):
            self.sent.append(message)
            return
        if isinstance(message, list):
            message = b"".join(message)
        for frame in self._decoder.feed_frames(message):
            if isinstance(frame, StreamChunk):
                self.chunks.append(frame)
            else:
                self.sent.append(frame)
        assert not self._decoder.pending, "a frame was sent in pieces"

    def open(self, stream: int = 1) -> TunnelStream:
        self.mux.dispatch("net.accept", NetAcceptParams(stream=stream, kind="proxy"))
        return self.accepted[-1]

    def data(self, stream: int, payload: bytes) -> None:
        encoded = base64.b64encode(payload).decode()
        self.mux.dispatch("stream.data", StreamDataParams(stream=stream, data=encoded))

    def sent_data(self) -> bytes:
        return b"".join(
            base64.b64decode(m["params"]["data"]) for m in self.sent if m["method"] == "stream.data"
        ) + b"".join(chunk.data for chunk in self.chunks)


async def test_receive_acknowledges_delivered_bytes_in_batches() -> None:
    h = Harness()
    stream = h.open()
    h.data(1, b"hello")
    assert await stream.receive() == b"hello"
    acks = [m["params"]["bytes"] for m in h.sent if m["method"] == "stream.ack"]
    assert acks == []  # a short request costs no ack; the window is far from full
    h.data(1, b"x" * ACK_BATCH)
    assert len(await stream.receive(2 * ACK_BATCH)) == ACK_BATCH
    acks = [m["params"]["bytes"] for m in h.sent if m["method"] == "stream.ack"]
    assert acks == [ACK_BATCH + 5]


async def test_agent_exceeding_the_window_is_a_protocol_error() -> None:
    h = Harness()
    h.open()
    h.data(1, b"x" * STREAM_WINDOW)
    with pytest.raises(AgentProtocolError):
        h.data(1, b"y")


async def test_send_respects_the_window_until_acked() -> None:
    h = Harness()
    stream = h.open()
    payload = b"z" * (STREAM_WINDOW + 1000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.send, payload)
        await anyio.sleep(0.05)
        assert len(h.sent_data()) == STREAM_WINDOW  # blocked on credit
        h.mux.dispatch("stream.ack", StreamAckParams(stream=1, bytes=ACK_BATCH))
    assert h.sent_data() == payload


async def test_eof_and_close() -> None:
    h = Harness()
    stream = h.open()
    h.data(1, b"tail")
    h.mux.dispatch("stream.eof", StreamEofParams(stream=1))
    assert await stream.receive() == b"tail"
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()
    await stream.send(b"still allowed after the peer's eof")
    h.mux.dispatch("stream.close", StreamCloseParams(stream=1, error="reset"))
    with pytest.raises(anyio.BrokenResourceError):
        await stream.send(b"x")
    assert len(h.mux) == 0


async def test_reused_stream_id_is_a_protocol_error() -> None:
    h = Harness()
    h.open(7)
    with pytest.raises(AgentProtocolError):
        h.open(7)


async def test_host_close_tells_the_agent() -> None:
    h = Harness()
    stream = h.open(3)
    await stream.aclose()
    assert h.sent[-1] == {"jsonrpc": "2.0", "method": "stream.close", "params": {"stream": 3}}
    h.data(3, b"late")  # late data for a closed stream is dropped, not an error


async def test_binary_mode_sends_frames_within_the_agents_window() -> None:
    h = Harness()
    h.mux.binary = True
    h.mux.send_window = 4 * BINARY_CHUNK  # what the agent's hello answer granted
    stream = h.open(5)
    payload = bytes(range(256)) * (5 * BINARY_CHUNK // 256)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream.send, payload)
        await anyio.sleep(0.05)
        assert len(h.sent_data()) == 4 * BINARY_CHUNK  # blocked on credit
        assert all(c.stream == 5 and len(c.data) <= BINARY_CHUNK for c in h.chunks)
        assert not [m for m in h.sent if m["method"] == "stream.data"]
        h.mux.dispatch("stream.ack", StreamAckParams(stream=5, bytes=BINARY_CHUNK))
    assert h.sent_data() == payload


async def test_binary_chunks_are_handed_on_whole_and_acknowledged() -> None:
    h = Harness()
    h.mux.recv_window = 1024 * 1024
    stream = h.open(2)
    big = b"a" * (512 * 1024)
    h.mux.feed(2, big)
    h.mux.feed(2, b"b" * 100)
    first = await stream.receive(1024 * 1024)
    assert first is big  # no copy on the way to the proxy
    assert await stream.receive(10) == b"b" * 10
    assert await stream.receive() == b"b" * 90
    acks = [m["params"]["bytes"] for m in h.sent if m["method"] == "stream.ack"]
    assert sum(acks) == len(big)  # the last 100 bytes wait for a batch
    h.mux.feed(99, b"late")  # an unknown (closed) stream: dropped


async def test_agent_exceeding_the_negotiated_window_is_a_protocol_error() -> None:
    h = Harness()
    h.mux.recv_window = 512 * 1024
    h.open()
    h.mux.feed(1, b"x" * (512 * 1024))
    with pytest.raises(AgentProtocolError):
        h.mux.feed(1, b"y")


async def test_direct_connection_reports_reach_the_callback_only() -> None:
    reports: list[NetDirectParams] = []
    mux = TunnelMux(Harness().send, lambda stream: None, reports.append)
    mux.dispatch("net.direct", NetDirectParams(target="203.0.113.9:443", peer="127.0.0.1:5"))
    assert [r.target for r in reports] == ["203.0.113.9:443"] and len(mux) == 0
