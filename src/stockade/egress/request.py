"""What a client asks the proxy for, whatever its protocol: reading the request, the target it
names, and refusing it (an HTTP status and a SOCKS5 reply code for each refusal).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from anyio.abc import ByteStream

from stockade.egress.dial import STREAM_ERRORS

__all__ = [
    "ANSWER_TIMEOUT",
    "SOCKS_BAD_ADDRESS",
    "SOCKS_BAD_COMMAND",
    "SOCKS_FAILURE",
    "SOCKS_HOST_UNREACHABLE",
    "SOCKS_NOT_ALLOWED",
    "SOCKS_OK",
    "SOCKS_REFUSED",
    "ClientGone",
    "Refusal",
    "RequestReader",
    "Target",
    "normalize_host",
    "parse_authority",
    "parse_port",
]

ANSWER_TIMEOUT = 5.0  # for an error answer to be written

_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")

# SOCKS5 reply codes (RFC 1928 6).
SOCKS_OK = 0x00
SOCKS_FAILURE = 0x01
SOCKS_NOT_ALLOWED = 0x02
SOCKS_HOST_UNREACHABLE = 0x04
SOCKS_REFUSED = 0x05
SOCKS_BAD_COMMAND = 0x07
SOCKS_BAD_ADDRESS = 0x08


class Refusal(Exception):
    """The proxy answers the client itself (an error, not a policy decision) and closes."""

    def __init__(self, reason: str, *, status: int = 400, socks: int = SOCKS_FAILURE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.socks = socks


class ClientGone(Exception):
    """The client closed or broke the connection before finishing its request."""


class RequestReader:
    """Reads a request head from the client, keeping what came after it for the upstream."""

    def __init__(self, stream: ByteStream, chunk: int) -> None:
        self._stream = stream
        self._chunk = chunk
        self.buffer = bytearray()

    async def _fill(self) -> None:
        try:
            data = await self._stream.receive(self._chunk)
        except STREAM_ERRORS as exc:
            raise ClientGone(type(exc).__name__) from None
        self.buffer += data

    async def peek(self) -> int:
        if not self.buffer:
            await self._fill()
        return self.buffer[0]

    async def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            await self._fill()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    async def head(self, limit: int) -> bytes:
        scanned = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                if end + 4 > limit:
                    break
                data = bytes(self.buffer[: end + 4])
                del self.buffer[: end + 4]
                return data
            scanned = len(self.buffer)
            if scanned >= limit:
                break
            await self._fill()
        raise Refusal(f"request header block larger than {limit} bytes")

    def rest(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    authority: str  # as it goes into a Host header


def normalize_host(raw: str) -> str:
    """An IP address in canonical form, or a lower-case DNS name; anything else refused."""
    host = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if raw.startswith("["):
        raise Refusal(f"not an IPv6 address: {raw!r}", socks=SOCKS_BAD_ADDRESS)
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(p) for p in name.split(".")):
        raise Refusal(f"not a valid host name: {raw[:80]!r}", socks=SOCKS_BAD_ADDRESS)
    return name


def parse_port(raw: str) -> int:
    if not _PORT_RE.fullmatch(raw) or not 0 < int(raw) < 65536:
        raise Refusal(f"not a valid port: {raw[:16]!r}")
    return int(raw)


def parse_authority(authority: str, *, default_port: int | None) -> Target:
    if "@" in authority:
        raise Refusal("user information in the target is not supported")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise Refusal(f"unterminated IPv6 address: {authority[:80]!r}")
        raw_host, rest = authority[: close + 1], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            raise Refusal(f"not a valid target: {authority[:80]!r}")
        raw_port = rest[1:] if rest else None
    else:
        raw_host, sep, port_text = authority.rpartition(":")
        if not sep:
            raw_host, raw_port = authority, None
        else:
            raw_port = port_text
    if raw_port is None:
        if default_port is None:
            raise Refusal(f"target needs a port: {authority[:80]!r}")
        port = default_port
    else:
        port = parse_port(raw_port)
    return Target(normalize_host(raw_host), port, authority)
