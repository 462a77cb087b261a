"""The host side of the egress tunnel: flow control and stream lifecycle, driven directly."""

from __future__ import annotations

import base64
import json
from typing import Any

import anyio
import pytest

from stockade._errors import AgentProtocolError
from stockade.agent.tunnel import ACK_BATCH, TunnelMux, TunnelStream
from stockade.protocol.messages import (
    STREAM_WINDOW,
    NetAcceptParams,
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
        self.accepted: list[TunnelStream] = []
        self.mux = TunnelMux(self.send, self.accepted.append)

    async def send(self, message: dict[str, Any] | bytes) -> None:
        # Bulk data arrives pre-encoded; decode it so every message is checked alike.
        self.sent.append(json.loads(message) if isinstance(message, bytes) else message)

    def open(self, stream: int = 1) -> TunnelStream:
        self.mux.dispatch("net.accept", NetAcceptParams(stream=stream, kind="proxy"))
        return self.accepted[-1]

    def data(self, stream: int, payload: bytes) -> None:
        encoded = base64.b64encode(payload).decode()
        self.mux.dispatch("stream.data", StreamDataParams(stream=stream, data=encoded))

    def sent_data(self) -> bytes:
        return b"".join(
            base64.b64decode(m["params"]["data"]) for m in self.sent if m["method"] == "stream.data"
        )


async def test_receive_acknowledges_delivered_bytes() -> None:
    h = Harness()
    stream = h.open()
    h.data(1, b"hello")
    assert await stream.receive() == b"hello"
    acks = [m["params"]["bytes"] for m in h.sent if m["method"] == "stream.ack"]
    assert acks == [5]


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
