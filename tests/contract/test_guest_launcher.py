"""The microVM launcher drives the guest agent it ships with: the seam between the two files.

``images/guest/launcher.py`` loads ``agent/guest.py`` as a module and serves the protocol
through the agent's own objects (its channel, process table and tunnel), giving it per-sandbox
options while it runs. Here the launcher's own functions (``load_agent``, ``make_server``,
``apply_agent_options``, ``serve``) run in a plain subprocess on one end of a socketpair, with
no VM, and the test speaks the protocol on the other end.
"""

from __future__ import annotations

import base64
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_harness import GUEST, GUEST_PYTHON, PATIENCE
from stockade.protocol.framing import FrameDecoder, encode_frame
from stockade.protocol.messages import PROTOCOL_VERSION, AgentHelloResult

LAUNCHER = GUEST.parents[1] / "images" / "guest" / "launcher.py"

#: What the launcher's ``main`` does once it has a channel, minus the VM: the agent loaded
#: through ``load_agent``, served on descriptor argv[1] with the options argv[2:].
DRIVER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("stockade_launcher", sys.argv[1])
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)
launcher.AGENT = sys.argv[2]
agent = launcher.load_agent()
server = launcher.make_server(agent, int(sys.argv[3]))
launcher.add_methods(agent, server)
launcher.apply_agent_options(agent, server, sys.argv[4:])
sys.exit(launcher.serve(agent, server, {"serving": True}))
"""


class LauncherPeer:
    """The host's end of the launcher's channel: frames in and out, nothing else."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(PATIENCE)
        self.decoder = FrameDecoder()
        self.pending: list[dict[str, Any]] = []
        self.ids = 0

    def receive(self) -> dict[str, Any]:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the launcher closed the channel"
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def request(self, method: str, **params: Any) -> int:
        self.ids += 1
        message = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}
        self.sock.sendall(encode_frame(message))
        return self.ids

    def answer(self, request_id: int, seen: list[dict[str, Any]]) -> dict[str, Any]:
        """The answer to ``request_id``; notifications that come first go to ``seen``."""
        while True:
            message = self.receive()
            if message.get("id") == request_id:
                return message
            assert "id" not in message, message
            seen.append(message)


@pytest.fixture
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def launcher(
    tmp_path: Path, free_port: int
) -> Iterator[tuple[LauncherPeer, subprocess.Popen[bytes]]]:
    ours, theirs = socket.socketpair()
    driver = [GUEST_PYTHON, "-S", "-I", "-B", "-c", DRIVER, str(LAUNCHER), str(GUEST)]
    options = ["--workspace", str(tmp_path), "--rlimit", "cpu=100", "--net-proxy", str(free_port)]
    process = subprocess.Popen(
        [*driver, str(theirs.fileno()), *options],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        yield LauncherPeer(ours), process
    finally:
        ours.close()
        if process.poll() is None:
            process.kill()
        process.wait(PATIENCE)


def test_the_launcher_serves_the_agent_with_per_sandbox_options(
    launcher: tuple[LauncherPeer, subprocess.Popen[bytes]], tmp_path: Path, free_port: int
) -> None:
    peer, process = launcher
    assert peer.receive() == {"serving": True}
    seen: list[dict[str, Any]] = []

    hello = peer.answer(peer.request("agent.hello", protocol=PROTOCOL_VERSION), seen)
    result = AgentHelloResult.model_validate(hello["result"])
    assert "net" in result.capabilities  # the listener the options added is served

    # The workspace option is the cwd, and the cpu limit reaches children only.
    started = peer.answer(
        peer.request("process.start", argv=["/bin/sh", "-c", "pwd; ulimit -t"]), seen
    )
    handle = started["result"]["proc"]
    output = b""
    while not any(m["method"] == "process.exit" for m in seen):
        seen.append(peer.receive())
    for message in seen:
        if message["method"] == "process.output" and message["params"]["proc"] == handle:
            output += base64.b64decode(message["params"]["data"])
    assert output.decode() == f"{tmp_path}\n100\n"

    with socket.create_connection(("127.0.0.1", free_port), timeout=PATIENCE):
        accept = peer.receive()
    assert accept["method"] == "net.accept" and accept["params"]["kind"] == "proxy", accept

    # The launcher's own methods are served next to the protocol's, with its validation.
    reseed = peer.answer(peer.request("sandbox.reseed"), [])
    assert reseed["error"]["code"] == -32602 and "time_ns" in reseed["error"]["message"]

    assert peer.answer(peer.request("agent.shutdown"), [])["result"] == {}
    assert process.wait(PATIENCE) == 0
