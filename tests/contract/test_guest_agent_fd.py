"""The guest agent's side of the egress fast path: accepted sockets handed to the host.

The agent runs as a plain subprocess whose stdin and stdout are one end of an AF_UNIX
socketpair (as the namespace backend runs it); the test is the host on the other end and
receives the descriptors with recvmsg.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent_harness import GUEST, GUEST_PYTHON
from stockade.protocol.framing import HEADER, FrameDecoder

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class SocketAgent:
    """The agent with a proxy port, over a socketpair; the test reads frames and fds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.host, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [GUEST_PYTHON, "-S", "-I", str(GUEST), "--net-proxy", str(port)],
            stdin=agent_end,
            stdout=agent_end,
            stderr=self.log,
        )
        agent_end.close()
        self.host.settimeout(10)
        self.decoder = FrameDecoder()
        self.frames: list[tuple[dict[str, Any], list[int]]] = []

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode()
        self.host.sendall(HEADER.pack(len(body)) + body)

    def read(self) -> None:
        """One recvmsg: its frames, the descriptors going with the last one of them."""
        fds = array.array("i")
        data, ancdata, _, _ = self.host.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize))
        assert data, "the agent closed the channel"
        for level, kind, payload in ancdata:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        messages = self.decoder.feed(data)
        for index, message in enumerate(messages):
            self.frames.append((message, list(fds) if index == len(messages) - 1 else []))

    def next_frame(self) -> tuple[dict[str, Any], list[int]]:
        while not self.frames:
            self.read()
        return self.frames.pop(0)

    def hello(self, **params: Any) -> dict[str, Any]:
        self.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "agent.hello",
                "params": {"protocol": "1.3", "stream_binary": True, **params},
            }
        )
        message, fds = self.next_frame()
        assert not fds
        result: dict[str, Any] = message["result"]
        return result

    def connect(self) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the agent never listened"
                time.sleep(0.02)
                continue
            return client

    def sockets_held(self) -> int:
        directory = f"/proc/{self.process.pid}/fd"
        return sum(
            os.readlink(f"{directory}/{name}").startswith("socket:")
            for name in os.listdir(directory)
        )

    def close(self) -> None:
        self.host.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def agent() -> Iterator[SocketAgent]:
    running = SocketAgent(free_port())
    try:
        yield running
    finally:
        running.close()


def test_accepted_socket_goes_to_the_host_and_the_agent_keeps_no_copy(
    agent: SocketAgent,
) -> None:
    hello = agent.hello(stream_fd=True)
    assert "stream-fd" in hello["capabilities"] and hello["protocol"] == "1.3"
    idle = agent.sockets_held()  # the channel and the listener(s)
    client = agent.connect()
    with client:
        message, fds = agent.next_frame()
        assert message["method"] == "net.accept"
        params = message["params"]
        assert params["fd"] is True and params["kind"] == "proxy"
        assert params["peer"] == f"127.0.0.1:{client.getsockname()[1]}"
        [fd] = fds
        handed = socket.socket(fileno=fd)
        with handed:
            assert handed.type == socket.SOCK_STREAM
            assert handed.getpeername() == client.getsockname()
            client.sendall(b"ping")
            assert handed.recv(10) == b"ping"
            handed.sendall(b"pong")
            assert client.recv(10) == b"pong"
            deadline = time.monotonic() + 5
            while agent.sockets_held() != idle:  # its copy closed once sent
                assert time.monotonic() < deadline, "the agent still holds the socket"
                time.sleep(0.02)
        assert client.recv(10) == b""  # the host's copy was the last one


def test_without_the_offer_connections_stay_framed_streams(agent: SocketAgent) -> None:
    hello = agent.hello()
    assert "stream-fd" not in hello["capabilities"]
    with agent.connect():
        message, fds = agent.next_frame()
        assert message["method"] == "net.accept"
        assert "fd" not in message["params"] and not fds


def test_a_pipe_channel_never_agrees_on_descriptors() -> None:
    process = subprocess.Popen(
        [GUEST_PYTHON, "-S", "-I", str(GUEST), "--net-proxy", str(free_port())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "agent.hello",
                "params": {"protocol": "1.3", "stream_fd": True},
            }
        ).encode()
        process.stdin.write(HEADER.pack(len(body)) + body)
        process.stdin.flush()
        decoder = FrameDecoder()
        messages: list[dict[str, Any]] = []
        while not messages:
            messages = decoder.feed(os.read(process.stdout.fileno(), 65536))
        assert "stream-fd" not in messages[0]["result"]["capabilities"]
    finally:
        process.kill()
        process.wait()
