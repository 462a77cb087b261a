"""Binary stream frames (protocol 1.2): strict decoding, and their negotiation by the client.

The host treats the guest as hostile: a binary frame that was not agreed, that is empty, that
names stream 0 or that announces more than the frame limit ends the connection with
AgentProtocolError. The peer in the client tests is a scripted fake agent over a real socket
pair (the client code under test is the real one).
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream

from stockade._errors import AgentProtocolError
from stockade.agent.client import AgentClient
from stockade.agent.tunnel import TunnelMux, TunnelStream
from stockade.protocol.framing import (
    BINARY_FLAG,
    HEADER,
    FrameDecoder,
    StreamChunk,
    encode_frame,
    encode_stream_header,
)
from stockade.protocol.messages import MAX_STREAM_WINDOW, STREAM_WINDOW, AgentHelloParams

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def chunk_frame(stream: int, data: bytes) -> bytes:
    return encode_stream_header(stream, len(data)) + data


# --- the decoder ------------------------------------------------------------------------------


def test_binary_and_json_frames_decode_in_order_across_any_split() -> None:
    wire = (
        encode_frame({"jsonrpc": "2.0", "method": "stream.eof", "params": {"stream": 3}})
        + chunk_frame(3, b"hello")
        + chunk_frame(9, bytes(range(256)))
        + encode_frame({"jsonrpc": "2.0", "id": 1, "result": {}})
    )
    expected = [
        {"jsonrpc": "2.0", "method": "stream.eof", "params": {"stream": 3}},
        StreamChunk(3, b"hello"),
        StreamChunk(9, bytes(range(256))),
        {"jsonrpc": "2.0", "id": 1, "result": {}},
    ]
    assert FrameDecoder(binary=True).feed_frames(wire) == expected
    for split in range(1, len(wire)):
        decoder = FrameDecoder(binary=True)
        out = decoder.feed_frames(wire[:split]) + decoder.feed_frames(wire[split:])
        assert out == expected, split
        decoder.check_eof()
    decoder = FrameDecoder(binary=True)
    bytewise = [frame for byte in wire for frame in decoder.feed_frames(bytes([byte]))]
    assert bytewise == expected


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        pytest.param(HEADER.pack(BINARY_FLAG | 4) + b"\0\0\0\1", "without data", id="empty"),
        pytest.param(HEADER.pack(BINARY_FLAG | 2) + b"\0\1", "without data", id="short"),
        pytest.param(HEADER.pack(BINARY_FLAG | 5) + b"\0\0\0\0x", "stream 0", id="stream-0"),
        pytest.param(HEADER.pack(BINARY_FLAG | (64 * 1024 * 1024)), "limit", id="oversized"),
    ],
)
def test_malformed_binary_frames_are_protocol_errors(wire: bytes, why: str) -> None:
    with pytest.raises(AgentProtocolError, match=why):
        FrameDecoder(binary=True).feed_frames(wire)


def test_binary_frame_not_agreed_is_a_protocol_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(AgentProtocolError, match="not agreed"):
        decoder.feed(chunk_frame(1, b"x"))
    with pytest.raises(RuntimeError):
        FrameDecoder(binary=True).feed(b"")


def test_truncated_binary_frame_is_reported_at_eof() -> None:
    decoder = FrameDecoder(binary=True)
    assert decoder.feed_frames(chunk_frame(1, b"abcdef")[:-1]) == []
    with pytest.raises(AgentProtocolError, match="middle of a frame"):
        decoder.check_eof()


def test_stream_header_refuses_what_the_peer_would_reject() -> None:
    with pytest.raises(ValueError):
        encode_stream_header(1, 0)
    with pytest.raises(ValueError):
        encode_stream_header(0, 10)
    with pytest.raises(ValueError):
        encode_stream_header(1, 1024, max_frame=1024)
    assert encode_stream_header(7, 1020, max_frame=1024)[:4] == HEADER.pack(BINARY_FLAG | 1024)


# --- negotiation in the client ------------------------------------------------------------------


def hello_result(**extra: Any) -> dict[str, Any]:
    return {
        "protocol": "1.2",
        "agent_version": "test",
        "capabilities": ["net", "stream-binary"],
        "pid": 2,
        "uid": 0,
        "kernel": "6.0",
        "hostname": "sandbox",
        "python": "3.11",
        **extra,
    }


async def with_fake_agent(
    answer_hello: dict[str, Any], after_hello: bytes, *, tunnel: bool = True
) -> tuple[AgentClient, list[TunnelStream], dict[str, Any], Exception | None]:
    """Run hello against a fake agent that sends ``after_hello`` right behind its answer
    (in the same write), then let the client read until that is dispatched or it fails.

    Returns the client, the streams it accepted, the hello request, and hello's error.
    """
    a, b = socket.socketpair()
    client = AgentClient(await SocketStream.from_socket(a))
    accepted: list[TunnelStream] = []
    if tunnel:
        client.tunnel = TunnelMux(client.notify, accepted.append)
        client.tunnel.recv_window = 1024 * 1024
    peer = await SocketStream.from_socket(b)
    seen: dict[str, Any] = {}
    error: Exception | None = None

    async def agent() -> None:
        decoder = FrameDecoder()
        while not (requests := decoder.feed(await peer.receive())):
            pass
        seen.update(requests[0])
        reply = {"jsonrpc": "2.0", "id": requests[0]["id"], "result": answer_hello}
        await peer.send(encode_frame(reply) + after_hello)

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent)
        with anyio.fail_after(5):
            try:
                await client.hello()
            except AgentProtocolError as exc:
                error = exc
        if error is None:  # keep reading, so that the fake agent's write completes
            with anyio.move_on_after(0.5):
                await client.serve_forever()
            error = client._failure if isinstance(client._failure, AgentProtocolError) else None
    await peer.aclose()
    return client, accepted, seen, error


def accept_frame(stream: int) -> bytes:
    params = {"stream": stream, "kind": "proxy", "peer": "127.0.0.1:5"}
    return encode_frame({"jsonrpc": "2.0", "method": "net.accept", "params": params})


async def test_hello_offers_binary_frames_and_the_window_and_takes_the_agents() -> None:
    data = b"d" * 1000
    client, accepted, seen, error = await with_fake_agent(
        hello_result(stream_window=4 * 1024 * 1024), accept_frame(1) + chunk_frame(1, data)
    )
    assert error is None
    params = AgentHelloParams.model_validate(seen["params"])
    assert params.stream_binary and params.stream_window == 1024 * 1024
    assert client.tunnel is not None
    assert client.tunnel.binary and client.tunnel.send_window == 4 * 1024 * 1024
    # The chunk right behind the answer reached its stream: the decoder took binary frames
    # from the offer on, not only once hello() returned.
    assert not client.closed
    (stream,) = accepted
    assert await stream.receive() == data
    await client.aclose()


async def test_an_agent_without_the_capability_keeps_json_and_the_default_window() -> None:
    answer = hello_result(capabilities=["net"])
    client, _, _, error = await with_fake_agent(answer, b"")
    assert error is None and client.tunnel is not None
    assert not client.tunnel.binary and client.tunnel.send_window == STREAM_WINDOW
    await client.aclose()


async def test_binary_frames_without_a_tunnel_end_the_connection() -> None:
    client, _, seen, error = await with_fake_agent(
        hello_result(), chunk_frame(1, b"x"), tunnel=False
    )
    assert "stream_binary" not in seen["params"]
    assert "not agreed" in str(error)
    assert client.closed


@pytest.mark.parametrize("window", [STREAM_WINDOW - 1, MAX_STREAM_WINDOW + 1])
async def test_an_agent_window_outside_the_bounds_ends_the_connection(window: int) -> None:
    a, b = socket.socketpair()
    client = AgentClient(await SocketStream.from_socket(a))
    client.tunnel = TunnelMux(client.notify, lambda stream: None)
    peer = await SocketStream.from_socket(b)

    async def agent() -> None:
        decoder = FrameDecoder()
        while not (requests := decoder.feed(await peer.receive())):
            pass
        reply = {"jsonrpc": "2.0", "id": requests[0]["id"], "result": hello_result()}
        reply["result"]["stream_window"] = window
        await peer.send(encode_frame(reply))

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent)
        with anyio.fail_after(5), pytest.raises(AgentProtocolError, match=r"agent\.hello"):
            await client.hello()
    assert client.closed
    await peer.aclose()
    await client.aclose()


async def test_a_chunk_beyond_the_offered_window_ends_the_connection() -> None:
    too_much = chunk_frame(1, b"x" * (1024 * 1024)) + chunk_frame(1, b"y")
    client, accepted, _, error = await with_fake_agent(hello_result(), accept_frame(1) + too_much)
    assert "window" in str(error)
    assert client.closed
    (stream,) = accepted
    assert len(await stream.receive(2 * 1024 * 1024)) == 1024 * 1024  # what fit the window
    with pytest.raises(anyio.BrokenResourceError):
        await stream.receive()  # then the stream ended with the connection
