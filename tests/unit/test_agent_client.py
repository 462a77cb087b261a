"""The host client treats the guest as hostile: bad frames end the connection with
AgentProtocolError, never a crash or a hang. The peer here is a scripted fake agent over a
real socket pair (an honest fake: the client code under test is the real one)."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Awaitable, Callable

import anyio
import pytest
from anyio.abc import SocketStream

from stockade._errors import AgentProtocolError, SandboxFileNotFoundError, SandboxStateError
from stockade.agent.client import AgentClient
from stockade.protocol.framing import FrameDecoder, encode_frame
from stockade.protocol.messages import FsStatParams, ProcessStartParams

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


HELLO = {
    "protocol": "1.0",
    "agent_version": "test",
    "capabilities": [],
    "pid": 2,
    "uid": 0,
    "kernel": "6.0",
    "hostname": "sandbox",
    "python": "3.11",
}

Peer = Callable[[SocketStream], Awaitable[None]]


async def read_request(stream: SocketStream) -> dict:
    decoder = FrameDecoder()
    while True:
        messages = decoder.feed(await stream.receive())
        if messages:
            return messages[0]


async def run_with_peer(peer: Peer, body: Callable[[AgentClient], Awaitable[None]]) -> None:
    a, b = socket.socketpair()
    client = AgentClient(await SocketStream.from_socket(a))
    peer_stream = await SocketStream.from_socket(b)
    async with anyio.create_task_group() as tg:
        tg.start_soon(peer, peer_stream)
        with anyio.fail_after(5):
            await body(client)
        tg.cancel_scope.cancel()
    await client.aclose()


def answer(req: dict, result: dict) -> bytes:
    return encode_frame({"jsonrpc": "2.0", "id": req["id"], "result": result})


async def test_hello_round_trip() -> None:
    async def peer(s: SocketStream) -> None:
        req = await read_request(s)
        assert req["method"] == "agent.hello"
        await s.send(answer(req, HELLO))
        await anyio.sleep(10)

    async def body(client: AgentClient) -> None:
        info = await client.hello()
        assert info.hostname == "sandbox"

    await run_with_peer(peer, body)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(struct.pack(">I", 10) + b"not json!!", id="not-json"),
        pytest.param(struct.pack(">I", 2**31), id="oversized"),
        pytest.param(struct.pack(">I", 4) + b"[1] ", id="json-array"),
        pytest.param(encode_frame({"jsonrpc": "2.0", "id": 999, "result": {}}), id="unknown-id"),
        pytest.param(encode_frame({"jsonrpc": "1.0", "id": 1, "result": {}}), id="bad-version"),
        pytest.param(
            encode_frame({"jsonrpc": "2.0", "method": "process.output", "params": {"proc": 7}}),
            id="bad-notification",
        ),
        pytest.param(
            encode_frame({"jsonrpc": "2.0", "method": "evil.call", "params": {}}),
            id="unknown-notification",
        ),
        pytest.param(struct.pack(">I", 100) + b'{"jsonrpc"', id="truncated"),
    ],
)
async def test_hostile_frames_raise_protocol_error(garbage: bytes) -> None:
    async def peer(s: SocketStream) -> None:
        await read_request(s)
        await s.send(garbage)
        if garbage.startswith(struct.pack(">I", 100)):
            await s.aclose()  # truncation: the stream ends mid-frame
            return
        await anyio.sleep(10)

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentProtocolError):
            await client.hello()
        assert client.closed
        with pytest.raises(AgentProtocolError):
            await client.call("fs.stat", FsStatParams(path="/x"))

    await run_with_peer(peer, body)


async def test_invalid_result_shape_is_protocol_error() -> None:
    async def peer(s: SocketStream) -> None:
        req = await read_request(s)
        await s.send(answer(req, {"protocol": 5}))
        await anyio.sleep(10)

    async def body(client: AgentClient) -> None:
        with pytest.raises(AgentProtocolError):
            await client.hello()

    await run_with_peer(peer, body)


async def test_output_for_unknown_process_is_protocol_error() -> None:
    async def peer(s: SocketStream) -> None:
        req = await read_request(s)
        await s.send(answer(req, {"proc": 1, "pid": 10}))
        await s.send(
            encode_frame(
                {
                    "jsonrpc": "2.0",
                    "method": "process.output",
                    "params": {"proc": 42, "stream": "stdout", "data": "aGk="},
                }
            )
        )
        await anyio.sleep(10)

    async def body(client: AgentClient) -> None:
        # The bogus output may arrive in the same read as the answer: either call fails.
        with pytest.raises(AgentProtocolError):
            _, events = await client.start_process(ProcessStartParams(argv=["true"]))
            await client.wait_process(events)

    await run_with_peer(peer, body)


async def test_error_codes_map_to_exceptions() -> None:
    async def peer(s: SocketStream) -> None:
        req = await read_request(s)
        await s.send(
            encode_frame(
                {"jsonrpc": "2.0", "id": req["id"], "error": {"code": 1, "message": "nope"}}
            )
        )
        await anyio.sleep(10)

    async def body(client: AgentClient) -> None:
        with pytest.raises(SandboxFileNotFoundError):
            await client.call("fs.stat", FsStatParams(path="/missing"))
        assert not client.closed  # an error answer is not a protocol violation

    await run_with_peer(peer, body)


async def test_peer_closing_cleanly_fails_pending_calls() -> None:
    async def peer(s: SocketStream) -> None:
        await read_request(s)
        await s.aclose()

    async def body(client: AgentClient) -> None:
        with pytest.raises(SandboxStateError):
            await client.hello()

    await run_with_peer(peer, body)


async def test_concurrent_calls_are_multiplexed() -> None:
    async def peer(s: SocketStream) -> None:
        decoder = FrameDecoder()
        requests: list[dict] = []
        while len(requests) < 3:
            requests += decoder.feed(await s.receive())
        for req in reversed(requests):  # answer out of order
            entry = {
                "path": req["params"]["path"],
                "name": "x",
                "type": "file",
                "size": 1,
                "mode": 0o644,
                "mtime": 0.0,
            }
            await s.send(answer(req, entry))
        await anyio.sleep(10)

    async def body(client: AgentClient) -> None:
        results: dict[str, str] = {}

        async def stat(path: str) -> None:
            entry = await client.call("fs.stat", FsStatParams(path=path))
            results[path] = entry.path  # type: ignore[attr-defined]

        async with anyio.create_task_group() as tg:
            for path in ("/a", "/b", "/c"):
                tg.start_soon(stat, path)
        assert results == {"/a": "/a", "/b": "/b", "/c": "/c"}

    await run_with_peer(peer, body)


def test_frame_size_enforced_when_encoding() -> None:
    with pytest.raises(ValueError):
        encode_frame({"data": "x" * 100}, max_frame=10)


def test_decoder_handles_split_frames() -> None:
    frame = encode_frame({"jsonrpc": "2.0", "id": 1, "result": {}})
    decoder = FrameDecoder()
    out = []
    for byte in frame:
        out += decoder.feed(bytes([byte]))
    assert out == [json.loads(frame[4:])]
    decoder.check_eof()


async def test_late_answer_to_an_abandoned_call_is_dropped() -> None:
    async def peer(s: SocketStream) -> None:
        first = await read_request(s)
        await anyio.sleep(0.3)  # the caller gives up before this answer arrives
        await s.send(answer(first, HELLO))
        second = await read_request(s)
        await s.send(answer(second, HELLO))
        await anyio.sleep(10)

    async def body(client: AgentClient) -> None:
        with anyio.move_on_after(0.1):
            await client.hello()
        info = await client.hello()  # the late first answer must not break the connection
        assert info.hostname == "sandbox" and not client.closed

    await run_with_peer(peer, body)
