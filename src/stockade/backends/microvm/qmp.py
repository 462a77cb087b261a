"""A minimal blocking QMP (QEMU Machine Protocol) client over a unix socket.

Blocking on purpose: each command is a quick request/response, run from a worker thread by
the async driver; events (``SHUTDOWN`` with its reason) are kept for ``exit_reason``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from stockade._errors import SandboxStartError

__all__ = ["QmpClient", "QmpError"]


class QmpError(SandboxStartError):
    """QEMU refused a QMP command or the QMP socket failed."""


class QmpClient:
    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self, deadline: float) -> None:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QEMU's QMP socket {self.path} did not appear") from None
                time.sleep(0.005)
        self._sock = sock
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting!r:.200}")
        self.command("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            data = self._sock.recv(65536)
            if not data:
                raise QmpError("QEMU closed the QMP socket")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"malformed QMP message: {line[:200]!r}")
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        if self._sock is None:
            raise QmpError("not connected to QMP")
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                error = message["error"]
                raise QmpError(f"QMP {name} failed: {error.get('desc', error)}")
            return message.get("return")

    def drain(self, wait: float = 0.2) -> None:
        """Collect the events still queued on the socket (e.g. after QEMU exited)."""
        if self._sock is None:
            return
        self._sock.settimeout(wait)
        try:
            while True:
                message = self._read_message()
                if "event" in message:
                    self.events.append(message)
        except (OSError, QmpError, ValueError):
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
