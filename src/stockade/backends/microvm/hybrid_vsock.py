"""Host side of the hybrid vsock of Firecracker and Cloud Hypervisor.

The VMM listens on a unix socket (Firecracker's ``uds_path``, Cloud Hypervisor's
``--vsock socket=``). To reach guest port P, the host connects, writes ``CONNECT P\\n`` and
reads ``OK <host port>\\n``; from then on the socket is a byte stream to the guest's
listener. When nothing listens on P in the guest (the agent is not up yet), the VMM closes
the connection without a reply. The reply line is read byte by byte so that no guest data
that follows it is consumed here.

Errors (all ``SandboxStartError``)::

    HybridVsockError
    ├── HybridVsockRefusedError    nothing accepts on that port (yet): retry while booting
    ├── HybridVsockProtocolError   the reply is not ``OK <n>\\n``: give up
    └── HybridVsockTimeoutError    no reply in time: give up
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import SocketStream

from stockade._errors import SandboxStartError

__all__ = [
    "MAX_REPLY",
    "HybridVsockError",
    "HybridVsockProtocolError",
    "HybridVsockRefusedError",
    "HybridVsockTimeoutError",
    "connect_hybrid_vsock",
    "wait_hybrid_vsock",
]

#: Longest valid reply: "OK " + a 32-bit port + "\n" is 14 bytes; allow a little slack.
MAX_REPLY = 32


class HybridVsockError(SandboxStartError):
    """The hybrid vsock handshake with the VMM failed."""


class HybridVsockRefusedError(HybridVsockError):
    """The VMM's socket is not there yet, or it closed the connection: no guest listener."""


class HybridVsockProtocolError(HybridVsockError):
    """The VMM answered with something other than ``OK <port>\\n``."""


class HybridVsockTimeoutError(HybridVsockError):
    """The VMM accepted the connection but gave no reply in time."""


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 2**32:
        raise ValueError(f"vsock port must be an integer in 1..{2**32 - 1}, not {port!r}")


def _parse_reply(line: bytes, uds_path: Path, port: int) -> int:
    text = line.decode("ascii", "replace")
    parts = line[:-1].split(b" ")
    if (
        len(parts) == 2
        and parts[0] == b"OK"
        and parts[1].isdigit()
        and len(parts[1]) <= 10
        and int(parts[1]) < 2**32
    ):
        return int(parts[1])
    raise HybridVsockProtocolError(
        f"the VMM behind {uds_path} answered CONNECT {port} with {text!r}, not 'OK <port>'; "
        "is that socket a Firecracker / Cloud Hypervisor vsock socket?"
    )


async def connect_hybrid_vsock(uds_path: Path, port: int, *, timeout: float = 5.0) -> SocketStream:
    """Open a stream to guest vsock ``port`` through the VMM's unix socket ``uds_path``."""
    _check_port(port)
    try:
        stream = await anyio.connect_unix(uds_path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise HybridVsockRefusedError(
            f"cannot connect to the VMM's vsock socket {uds_path}: {exc.strerror}"
        ) from exc
    except OSError as exc:
        raise HybridVsockError(
            f"cannot connect to the VMM's vsock socket {uds_path}: {exc}"
        ) from exc
    try:
        with anyio.fail_after(timeout):
            await stream.send(b"CONNECT %d\n" % port)
            line = bytearray()
            while not line.endswith(b"\n"):
                if len(line) >= MAX_REPLY:
                    raise HybridVsockProtocolError(
                        f"the VMM behind {uds_path} sent {bytes(line)!r}... with no newline in "
                        f"{MAX_REPLY} bytes in answer to CONNECT {port}; expected 'OK <port>'"
                    )
                try:
                    line += await stream.receive(1)
                except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                    raise HybridVsockRefusedError(
                        f"the VMM behind {uds_path} closed the connection to guest vsock port "
                        f"{port} without a reply"
                        + (f" (after {bytes(line)!r})" if line else "")
                        + ": nothing listens on that port in the guest"
                    ) from exc
        _parse_reply(bytes(line), uds_path, port)
    except TimeoutError as exc:
        await stream.aclose()
        raise HybridVsockTimeoutError(
            f"no answer within {timeout:g} s from the VMM behind {uds_path} to CONNECT {port}"
        ) from exc
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return stream


async def wait_hybrid_vsock(
    uds_path: Path,
    port: int,
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    interval: float = 0.05,
    reply_timeout: float = 5.0,
    describe: Callable[[], str] = lambda: "",
) -> SocketStream:
    """Retry ``connect_hybrid_vsock`` until the guest listens, ``timeout`` passes or the VM dies.

    ``alive`` says whether the VMM still runs; ``describe`` adds context (a console tail) to
    the error raised when the guest never answers.
    """
    deadline = anyio.current_time() + timeout
    last: HybridVsockRefusedError | None = None
    while True:
        if not alive():
            raise HybridVsockRefusedError(
                f"the VMM exited before the guest listened on vsock port {port}"
                + _context(describe)
            ) from last
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            raise HybridVsockTimeoutError(
                f"the guest did not listen on vsock port {port} within {timeout:g} s "
                f"(last attempt: {last})" + _context(describe)
            ) from last
        try:
            return await connect_hybrid_vsock(
                uds_path, port, timeout=min(reply_timeout, max(remaining, 0.01))
            )
        except HybridVsockRefusedError as exc:
            last = exc
        await anyio.sleep(min(interval, max(0.0, deadline - anyio.current_time())))


def _context(describe: Callable[[], str]) -> str:
    text = ""
    with contextlib.suppress(Exception):
        text = describe()
    return f"\n--- console ---\n{text}" if text else ""
