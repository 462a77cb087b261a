"""The hybrid vsock handshake (``CONNECT <port>\\n`` -> ``OK <n>\\n``) of Firecracker and Cloud
Hypervisor, against socket peers that follow the protocol, refuse, send garbage or never
answer."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from microvm_fakes import HybridVsockPeer, asyncio_only, socket_tmp  # noqa: F401 (fixtures)
from stockade._errors import SandboxStartError
from stockade.backends.microvm.hybrid_vsock import (
    HybridVsockProtocolError,
    HybridVsockRefusedError,
    HybridVsockTimeoutError,
    connect_hybrid_vsock,
    wait_hybrid_vsock,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def sock(tmp: Path) -> Path:
    return tmp / "v.sock"


async def test_handshake_then_the_stream_reaches_the_guest(sock: Path) -> None:
    with HybridVsockPeer(sock) as peer:
        stream = await connect_hybrid_vsock(sock, 1024)
        async with stream:
            await stream.send(b"hello guest")
            assert await stream.receive() == b"hello guest"
        assert peer.requests == [b"CONNECT 1024\n"]


async def test_guest_bytes_right_after_the_reply_are_not_swallowed(sock: Path) -> None:
    with HybridVsockPeer(sock, "ok+data"):
        stream = await connect_hybrid_vsock(sock, 1024)
        async with stream:
            received = b""
            while len(received) < len(b"guest-first"):
                received += await stream.receive()
            assert received == b"guest-first"


#: How a VMM's socket can fail the handshake: peer mode and ports, the error and its message.
FAILED_HANDSHAKES = [
    pytest.param("ok", {52}, HybridVsockRefusedError, "nothing listens on that port",
                 id="no-listener-in-the-guest"),
    pytest.param("refuse", None, HybridVsockRefusedError, "without a reply",
                 id="peer-hangs-up"),
    pytest.param(b"OK " + b"1" * 200, None, HybridVsockProtocolError, "no newline in 32 bytes",
                 id="endless-reply-line-is-cut-off"),
    pytest.param(b"OK 12", None, HybridVsockRefusedError, r"after b'OK 12'",
                 id="reply-cut-short-shows-what-came"),
    pytest.param("silent", None, HybridVsockTimeoutError, r"no answer within 0\.2 s",
                 id="peer-never-answers"),
]  # fmt: skip


@pytest.mark.parametrize(("mode", "ports", "error", "message"), FAILED_HANDSHAKES)
async def test_a_failed_handshake_says_what_went_wrong(
    sock: Path, mode: str | bytes, ports: set[int] | None, error: type[Exception], message: str
) -> None:
    timeout = 0.2 if mode == "silent" else 5.0  # only the silent peer is meant to time out
    with HybridVsockPeer(sock, mode, ports=ports), pytest.raises(error, match=message):
        await connect_hybrid_vsock(sock, 1024, timeout=timeout)


async def test_missing_socket_is_a_refusal(sock: Path) -> None:
    with pytest.raises(HybridVsockRefusedError, match="cannot connect"):
        await connect_hybrid_vsock(sock, 1024)


@pytest.mark.parametrize(
    "reply",
    [
        b"NOPE 1\n",
        b"OK\n",
        b"OK abc\n",
        b"OK -1\n",
        b"OK 1 2\n",
        b"ok 1\n",
        b"OK 99999999999\n",
        b"OK 4294967296\n",
        b"\xff\xfe\n",
    ],
)
async def test_garbage_replies_are_protocol_errors(sock: Path, reply: bytes) -> None:
    with (
        HybridVsockPeer(sock, reply),
        pytest.raises(HybridVsockProtocolError, match="not 'OK <port>'"),
    ):
        await connect_hybrid_vsock(sock, 1024)


@pytest.mark.parametrize("port", [0, -1, 2**32, True])
async def test_bad_ports_are_refused_before_connecting(sock: Path, port: int) -> None:
    with pytest.raises(ValueError, match="vsock port"):
        await connect_hybrid_vsock(sock, port)


async def test_errors_are_sandbox_start_errors() -> None:
    assert issubclass(HybridVsockRefusedError, SandboxStartError)
    assert issubclass(HybridVsockProtocolError, SandboxStartError)
    assert issubclass(HybridVsockTimeoutError, SandboxStartError)


async def test_wait_retries_until_the_guest_listens(sock: Path) -> None:
    with HybridVsockPeer(sock, ports=set()) as peer:  # the VMM is up, the agent not yet

        async def agent_comes_up() -> None:
            while len(peer.requests) < 3:
                await anyio.sleep(0.01)
            peer.ports = {1024}

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent_comes_up)
            stream = await wait_hybrid_vsock(sock, 1024, timeout=10, interval=0.01)
        async with stream:
            await stream.send(b"up")
            assert await stream.receive() == b"up"
        assert len(peer.requests) >= 4
        assert set(peer.requests) == {b"CONNECT 1024\n"}


async def test_wait_stops_when_the_vmm_dies(sock: Path) -> None:
    with pytest.raises(HybridVsockRefusedError, match="exited before the guest listened") as e:
        await wait_hybrid_vsock(
            sock, 1024, timeout=10, alive=lambda: False, describe=lambda: "Kernel panic"
        )
    assert "--- console ---\nKernel panic" in str(e.value)


async def test_wait_gives_up_after_its_timeout_with_the_last_error(sock: Path) -> None:
    with pytest.raises(HybridVsockTimeoutError, match="did not listen on vsock port 1024") as e:
        await wait_hybrid_vsock(sock, 1024, timeout=0.2, interval=0.02)
    assert "cannot connect" in str(e.value)


async def test_wait_does_not_retry_garbage(sock: Path) -> None:
    with HybridVsockPeer(sock, b"HELLO\n") as peer:
        with pytest.raises(HybridVsockProtocolError):
            await wait_hybrid_vsock(sock, 1024, timeout=10)
        assert len(peer.requests) == 1
