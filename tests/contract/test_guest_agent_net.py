"""The guest agent's side of the egress tunnel, with the test playing both ends.

The agent runs as a plain subprocess (``tests/agent_harness.py``) with ``--net-proxy`` and
``--net-forward``; the test connects to its ports with plain loopback sockets (the sandbox
side) and speaks the stream.* notifications over the channel (the host side). The harness
validates every notification against the protocol models and checks the window.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from agent_harness import AgentHarness, StreamRecord
from stockade.protocol.messages import PROTOCOL_VERSION, STREAM_WINDOW

pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024
FORWARD_TARGET = "db.example.test:5432"
#: Socket timeout of the test's own clients: a broken agent fails the test, never hangs it.
SOCKET_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NetAgent:
    """An agent with a proxy port and one forward port, and the test's host-side helpers."""

    def __init__(self, harness: AgentHarness, proxy_port: int, forward_port: int) -> None:
        self.harness = harness
        self.proxy_port = proxy_port
        self.forward_port = forward_port

    def connect(self, port: int | None = None, host: str = "127.0.0.1") -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        client = socket.socket(family, socket.SOCK_STREAM)
        client.settimeout(SOCKET_TIMEOUT)
        client.connect((host, port or self.proxy_port))
        return client

    def accept(self, port: int | None = None) -> tuple[socket.socket, int]:
        """Connect a client and wait for its net.accept; return (client, stream id)."""
        known = set(self.harness.streams)
        client = self.connect(port)
        self.harness.until(lambda: set(self.harness.streams) - known, "net.accept")
        (stream,) = set(self.harness.streams) - known
        return client, stream

    def record(self, stream: int) -> StreamRecord:
        return self.harness.streams[stream]

    def send(self, stream: int, data: bytes) -> None:
        """Stream data from the host, never more than the agent's window in flight."""
        record = self.record(stream)
        view = memoryview(data)
        while view:
            chunk = bytes(view[:CHUNK])
            room = self.harness.send_window - len(chunk)
            self.harness.until(
                lambda room=room: record.in_flight <= room or record.close,
                f"window room on stream {stream}",
            )
            assert record.close is None, f"stream closed while sending: {record.close}"
            view = view[len(chunk) :]
            self.harness.send_data(stream, chunk)

    def wait_data(self, stream: int, size: int) -> bytes:
        record = self.record(stream)
        self.harness.until(lambda: len(record.data) >= size, f"{size} bytes on stream {stream}")
        return bytes(record.data)

    def wait_eof(self, stream: int) -> bytes:
        record = self.record(stream)
        self.harness.until(lambda: record.eof, f"stream.eof on stream {stream}")
        return bytes(record.data)

    def wait_close(self, stream: int) -> dict[str, object]:
        record = self.record(stream)
        self.harness.until(lambda: record.close is not None, f"stream.close on stream {stream}")
        assert record.close is not None
        return record.close

    def settle(self, seconds: float = 0.3) -> None:
        """Dispatch whatever the agent sends for a while (to see that nothing more comes)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            assert self.harness.pump(left), "the agent closed the channel"

    def open_sockets(self) -> int:
        """Sockets the agent holds: listeners and streams (its channel is pipes)."""
        directory = f"/proc/{self.harness.process.pid}/fd"
        count = 0
        for name in os.listdir(directory):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                count += os.readlink(f"{directory}/{name}").startswith("socket:")
        return count

    def wait_sockets(self, count: int) -> None:
        """Poll until the agent holds ``count`` sockets (it forgot finished streams)."""
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while (held := self.open_sockets()) != count:
            assert time.monotonic() < deadline, f"the agent holds {held} sockets, not {count}"
            self.harness.pump(0.02)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def payload(size: int, seed: int = 0) -> bytes:
    """Bytes that differ along the way, so a reordered or dropped chunk is noticed."""
    block = bytes((seed + index * 7) % 251 for index in range(251))
    return (block * (size // len(block) + 1))[:size]


def read_all(client: socket.socket) -> bytes:
    data = bytearray()
    while chunk := client.recv(1 << 20):
        data += chunk
    return bytes(data)


def in_thread(target: Callable[[], object]) -> Callable[[], object]:
    """Run ``target`` in a thread; the returned function joins it and returns its result."""
    result: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(target())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> object:
        thread.join(SOCKET_TIMEOUT * 2)
        assert not thread.is_alive(), "a client thread hung"
        if errors:
            raise errors[0]
        return result[0]

    return join


def start_agent(tmp_path: Path, *extra: str, binary: bool = False) -> NetAgent:
    proxy_port, forward_port = free_port(), free_port()
    harness = AgentHarness(
        "--workspace",
        str(tmp_path),
        "--net-proxy",
        str(proxy_port),
        "--net-forward",
        f"{forward_port}={FORWARD_TARGET}",
        *extra,
    )
    harness.hello(binary=binary)
    assert harness.binary == binary
    return NetAgent(harness, proxy_port, forward_port)


@pytest.fixture(params=["json", "binary"])
def net(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NetAgent]:
    """An agent speaking JSON stream.data (protocol 1.1 hosts) or binary frames (1.2)."""
    agent = start_agent(tmp_path, binary=request.param == "binary")
    try:
        yield agent
    finally:
        status = agent.harness.close()
        assert status == 0, f"the agent should exit cleanly at EOF:\n{agent.harness.log_text}"


# --- startup -------------------------------------------------------------------------------


def test_hello_announces_net_only_with_a_listener(tmp_path: Path, net: NetAgent) -> None:
    hello = net.harness.hello()
    assert hello["protocol"] == PROTOCOL_VERSION == "1.3"
    assert "net" in hello["capabilities"]
    with AgentHarness("--workspace", str(tmp_path)) as plain:
        assert "net" not in plain.hello()["capabilities"]


def test_listening_costs_no_heavy_imports(tmp_path: Path) -> None:
    """The tunnel uses ``_socket`` directly: no socket/enum/selectors at startup."""
    harness = AgentHarness(
        "--workspace",
        str(tmp_path),
        "--net-proxy",
        str(free_port()),
        python_flags=("-X", "importtime"),
    )
    harness.hello()
    assert harness.close() == 0
    imported = {
        line.split("|")[-1].strip()
        for line in harness.log_text.splitlines()
        if line.startswith("import time:")
    }
    assert not {"socket", "enum", "selectors", "json", "re"} & imported


@pytest.mark.parametrize(
    "args",
    [
        ["--net-proxy", "0"],
        ["--net-proxy", "http"],
        ["--net-forward", "8022"],
        ["--net-forward", "8022=github.com"],
        ["--net-forward", "8022=:22"],
        ["--net-forward", "8022=github.com:99999"],
        ["--net-forward", "x=github.com:22"],
        ["--net-proxy", "8022", "--net-forward", "8022=github.com:22"],
    ],
)
def test_bad_net_options_are_refused(tmp_path: Path, args: list[str]) -> None:
    harness = AgentHarness("--workspace", str(tmp_path), *args)
    assert harness.wait_gone() == 2
    harness.close()


def test_a_port_in_use_is_a_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        harness = AgentHarness("--workspace", str(tmp_path), "--net-proxy", str(port))
        assert harness.wait_gone() == 2
        harness.close()
    assert "cannot listen" in harness.log_text


# --- accepting -----------------------------------------------------------------------------


def test_accept_announces_proxy_and_forward_connections(net: NetAgent) -> None:
    client, stream = net.accept(net.proxy_port)
    accept = net.record(stream).accept
    assert accept["kind"] == "proxy" and accept["target"] is None
    assert accept["peer"] == f"127.0.0.1:{client.getsockname()[1]}"

    forward, forward_stream = net.accept(net.forward_port)
    accept = net.record(forward_stream).accept
    assert accept == {
        "stream": forward_stream,
        "kind": "forward",
        "target": FORWARD_TARGET,
        "peer": f"127.0.0.1:{forward.getsockname()[1]}",
        "fd": False,  # relayed as stream frames: the harness channel is pipes
    }
    assert forward_stream != stream
    client.close()
    forward.close()


def test_ipv6_loopback_is_served_too(net: NetAgent) -> None:
    if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("this machine has no IPv6 loopback")
    known = set(net.harness.streams)
    client = net.connect(net.proxy_port, "::1")
    net.harness.until(lambda: set(net.harness.streams) - known, "net.accept over IPv6")
    (stream,) = set(net.harness.streams) - known
    assert net.record(stream).accept["peer"] == f"[::1]:{client.getsockname()[1]}"
    client.sendall(b"v6")
    assert net.wait_data(stream, 2) == b"v6"
    client.close()


# --- data, eof, close ----------------------------------------------------------------------


def test_round_trip_and_acks(net: NetAgent) -> None:
    client, stream = net.accept()
    client.sendall(b"GET http://example.test/ HTTP/1.1\r\n\r\n")
    assert net.wait_data(stream, 37).startswith(b"GET http://example.test/")
    net.send(stream, b"HTTP/1.1 200 OK\r\n\r\n")
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    record = net.record(stream)
    net.settle(0.1)
    assert record.acked_by_agent == 0  # a short answer costs no ack frame
    body = payload(64 * 1024)
    net.send(stream, body)
    assert read_exactly(client, len(body)) == body
    # Once a batch is written, everything so far is acknowledged at once.
    net.harness.until(lambda: record.acked_by_agent == record.sent_by_host, "the agent's ack")
    client.close()


def test_five_megabytes_each_way_within_the_window(net: NetAgent) -> None:
    size = 5 * 1024 * 1024
    client, stream = net.accept()
    upload, download = payload(size, 1), payload(size, 2)

    def sandbox_side() -> bytes:
        client.sendall(upload)
        client.shutdown(socket.SHUT_WR)
        return read_all(client)

    join = in_thread(sandbox_side)
    net.send(stream, download)  # acks upload data as it arrives (harness.auto_ack)
    net.harness.notify("stream.eof", {"stream": stream})
    assert net.wait_eof(stream) == upload
    assert join() == download
    record = net.record(stream)
    net.harness.until(lambda: record.acked_by_agent == size, "acks for every byte sent")
    assert record.close is None
    client.close()


def test_eof_from_the_sandbox_side_is_a_half_close(net: NetAgent) -> None:
    baseline = net.open_sockets()
    client, stream = net.accept()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert net.wait_eof(stream) == b"request"
    # The other direction still works after the half-close.
    net.send(stream, b"response")
    assert client.recv(100) == b"response"
    net.harness.notify("stream.eof", {"stream": stream})
    assert client.recv(100) == b""
    # Both directions done: the agent forgets the stream and closes its socket.
    net.wait_sockets(baseline)
    assert net.record(stream).close is None
    client.close()


def test_eof_from_the_host_is_a_half_close(net: NetAgent) -> None:
    baseline = net.open_sockets()
    client, stream = net.accept()
    net.send(stream, b"all of it")
    net.harness.notify("stream.eof", {"stream": stream})
    assert read_all(client) == b"all of it"  # data first, then EOF
    client.sendall(b"still talking")
    assert net.wait_data(stream, 13) == b"still talking"
    client.shutdown(socket.SHUT_WR)
    net.wait_eof(stream)
    net.wait_sockets(baseline)
    client.close()


def test_close_from_the_host_closes_the_socket(net: NetAgent) -> None:
    baseline = net.open_sockets()
    client, stream = net.accept()
    net.harness.notify("stream.close", {"stream": stream, "error": "denied by policy"})
    assert client.recv(100) == b""
    net.wait_sockets(baseline)
    # Late traffic for the closed stream is ignored, not an error.
    net.harness.notify("stream.data", {"stream": stream, "data": b64(b"late")})
    net.harness.notify("stream.ack", {"stream": stream, "bytes": 1})
    net.harness.notify("stream.close", {"stream": stream})
    assert net.harness.hello()["protocol"] == PROTOCOL_VERSION


def test_reset_from_the_sandbox_side_sends_close_with_an_error(net: NetAgent) -> None:
    baseline = net.open_sockets()
    client, stream = net.accept()
    net.send(stream, b"unread")  # unread data makes the close below a reset
    assert client.recv(6, socket.MSG_PEEK) == b"unread"  # arrived, and still unread
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    close = net.wait_close(stream)
    assert close["error"], close
    net.wait_sockets(baseline)


def test_write_to_a_vanished_client_sends_close_with_an_error(net: NetAgent) -> None:
    client, stream = net.accept()
    client.close()
    net.wait_eof(stream)
    record = net.record(stream)
    for _ in range(50):  # the first write may still succeed: the reset comes back after it
        if record.close is not None:
            break
        net.send(stream, b"x" * 1024)
        net.settle(0.02)
    close = net.wait_close(stream)
    assert "write failed" in str(close["error"])


# --- flow control --------------------------------------------------------------------------


def test_agent_stops_at_the_window_until_acked(net: NetAgent) -> None:
    net.harness.auto_ack = False
    client, stream = net.accept()
    upload = payload(1024 * 1024, 3)
    join = in_thread(lambda: client.sendall(upload))
    record = net.record(stream)
    assert len(net.wait_data(stream, STREAM_WINDOW)) == STREAM_WINDOW
    net.settle()
    assert len(record.data) == STREAM_WINDOW  # not a byte more without an ack

    net.harness.notify("stream.ack", {"stream": stream, "bytes": 100_000})
    net.wait_data(stream, STREAM_WINDOW + 100_000)
    net.settle()
    assert len(record.data) == STREAM_WINDOW + 100_000

    net.harness.auto_ack = True
    net.harness.notify("stream.ack", {"stream": stream, "bytes": len(record.data) - 100_000})
    assert net.wait_data(stream, len(upload)) == upload
    join()
    client.close()


def test_host_exceeding_the_window_gets_the_stream_closed(net: NetAgent) -> None:
    client, stream = net.accept()
    other, other_stream = net.accept()
    too_much = b"y" * (net.harness.send_window + 1)
    net.harness.send_data(stream, too_much)
    close = net.wait_close(stream)
    assert "window" in str(close["error"])
    assert client.recv(1 << 20) == b""  # nothing of it was delivered
    assert "unacknowledged" in net.harness.stderr()
    # Only that stream: the agent and the other stream carry on.
    other.sendall(b"fine")
    assert net.wait_data(other_stream, 4) == b"fine"
    client.close()
    other.close()


@pytest.mark.parametrize("violation", ["data after eof", "ack of unsent bytes"])
def test_other_stream_violations_close_the_stream(net: NetAgent, violation: str) -> None:
    client, stream = net.accept()
    if violation == "data after eof":
        net.harness.notify("stream.eof", {"stream": stream})
        net.harness.notify("stream.data", {"stream": stream, "data": b64(b"more")})
    else:
        net.harness.notify("stream.ack", {"stream": stream, "bytes": 10})
    assert "protocol violation" in str(net.wait_close(stream)["error"])
    client.close()


def test_channel_backpressure_stops_reading_sockets(net: NetAgent) -> None:
    """Above ~4 MiB of unsent frames the agent reads no socket, whatever the windows allow."""
    net.harness.auto_ack = False
    count, size = 32, 512 * 1024
    clients = [net.accept() for _ in range(count)]
    joins = [
        in_thread(partial(client.sendall, payload(size, seed)))
        for seed, (client, _) in enumerate(clients)
    ]
    time.sleep(1.0)  # not reading the channel: the agent's queue fills up meanwhile
    marker = net.harness.request("agent.hello", {"protocol": PROTOCOL_VERSION})
    net.harness.answer(marker)
    queued = net.harness.stream_bytes_at_answer[marker]
    assert 0 < queued < count * STREAM_WINDOW * 3 // 4, queued  # windows would allow 8 MiB

    net.harness.auto_ack = True
    for _, stream in clients:
        record = net.record(stream)
        if len(record.data) > record.acked_by_host:
            net.harness.notify(
                "stream.ack", {"stream": stream, "bytes": len(record.data) - record.acked_by_host}
            )
    for seed, (client, stream) in enumerate(clients):
        assert net.wait_data(stream, size) == payload(size, seed)
        client.close()
    for join in joins:
        join()


# --- many streams --------------------------------------------------------------------------


def test_many_concurrent_streams_echo(net: NetAgent) -> None:
    count, size = 40, 100_000
    clients = [net.accept(net.forward_port if index % 2 else None) for index in range(count)]

    def client_side(client: socket.socket, seed: int) -> Callable[[], object]:
        def run() -> bytes:
            client.sendall(payload(size, seed))
            client.shutdown(socket.SHUT_WR)
            return read_all(client)

        return run

    joins = [in_thread(client_side(client, seed)) for seed, (client, _) in enumerate(clients)]
    for seed, (_, stream) in enumerate(clients):
        data = net.wait_eof(stream)
        assert data == payload(size, seed)
        net.send(stream, data[::-1])
        net.harness.notify("stream.eof", {"stream": stream})
    for seed, join in enumerate(joins):
        assert join() == payload(size, seed)[::-1]
    for client, _ in clients:
        client.close()


def test_streams_beyond_the_limit_are_refused(net: NetAgent) -> None:
    limit = 256
    clients = [net.connect() for _ in range(limit)]
    net.harness.until(lambda: len(net.harness.streams) == limit, f"{limit} net.accept")
    extra = net.connect()
    assert extra.recv(10) == b""  # accepted and closed at once
    assert len(net.harness.streams) == limit
    assert "refusing a connection" in net.harness.stderr()
    first = min(net.harness.streams)
    net.harness.notify("stream.close", {"stream": first})
    net.harness.hello()  # the agent handled the close before the next connection
    _, stream = net.accept()  # room again
    assert stream > first
    for client in [*clients, extra]:
        client.close()


# --- the host side misbehaving or leaving --------------------------------------------------


def test_invalid_host_notification_is_a_protocol_error(tmp_path: Path) -> None:
    agent = start_agent(tmp_path)
    agent.harness.notify("stream.ack", {"stream": 1, "bytes": 0}, check_params=False)
    assert agent.harness.wait_gone() == 3
    agent.harness.close()
    assert "invalid notification" in agent.harness.log_text


@pytest.mark.parametrize(
    ("offered", "frame", "why"),
    [
        (False, struct.pack(">II", 0x80000000 | 5, 1) + b"x", "did not offer"),
        (True, struct.pack(">II", 0x80000000 | 4, 1), "without data"),
        (True, struct.pack(">II", 0x80000000 | 5, 0) + b"x", "stream 0"),
        (True, struct.pack(">I", 0x80000000 | (64 << 20)), "limit"),
    ],
    ids=["not-offered", "empty", "stream-0", "oversized"],
)
def test_bad_binary_frames_are_protocol_errors(
    tmp_path: Path, offered: bool, frame: bytes, why: str
) -> None:
    agent = start_agent(tmp_path, binary=offered)
    agent.harness.send_bytes(frame)
    assert agent.harness.wait_gone() == 3
    agent.harness.close()
    assert why in agent.harness.log_text


def test_first_hello_sets_framing_and_windows(tmp_path: Path) -> None:
    agent = start_agent(tmp_path)  # JSON, default windows
    later = agent.harness.call(
        "agent.hello", protocol=PROTOCOL_VERSION, stream_binary=True, stream_window=1 << 20
    )
    assert "stream-binary" not in later["capabilities"]
    client, stream = agent.accept()
    client.sendall(b"still json")
    assert agent.wait_data(stream, 10) == b"still json"  # the harness rejects binary here
    client.close()
    assert agent.harness.close() == 0


def test_binary_windows_follow_the_hello(tmp_path: Path) -> None:
    """The agent sends up to the window the host offered, and grants its own."""
    proxy_port, forward_port = free_port(), free_port()
    harness = AgentHarness(
        "--workspace", str(tmp_path), "--net-proxy", str(proxy_port),
        "--net-forward", f"{forward_port}={FORWARD_TARGET}",
    )  # fmt: skip
    hello = harness.hello(binary=True, window=1 << 20)
    assert hello["stream_window"] == harness.send_window >= 1 << 20
    net = NetAgent(harness, proxy_port, forward_port)
    harness.auto_ack = False
    client, stream = net.accept()
    upload = payload(3 << 20, 5)
    join = in_thread(lambda: client.sendall(upload))
    assert len(net.wait_data(stream, 1 << 20)) == 1 << 20
    net.settle()
    assert len(net.record(stream).data) == 1 << 20  # the offered window, not a byte more
    harness.auto_ack = True
    harness.notify("stream.ack", {"stream": stream, "bytes": 1 << 20})
    assert net.wait_data(stream, len(upload)) == upload
    join()
    # The other way: the agent's whole window in one go is fine, a byte more is not.
    net.send(stream, b"z" * harness.send_window)
    assert len(read_exactly(client, harness.send_window)) == harness.send_window
    client.close()
    assert harness.close() == 0


def read_exactly(client: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = client.recv(1 << 20)
        assert chunk, "connection closed early"
        data += chunk
    return bytes(data)


def test_unknown_host_notification_is_ignored(net: NetAgent) -> None:
    net.harness.send({"jsonrpc": "2.0", "method": "stream.rewind", "params": {"stream": 1}})
    assert net.harness.hello()["protocol"] == PROTOCOL_VERSION
    assert "unknown notification" in net.harness.stderr()


def test_channel_end_closes_every_stream(tmp_path: Path) -> None:
    agent = start_agent(tmp_path)
    clients = [agent.accept()[0] for _ in range(3)]
    assert agent.harness.close() == 0
    for client in clients:
        assert client.recv(10) == b""
        client.close()
    with pytest.raises(OSError):
        agent.connect()
