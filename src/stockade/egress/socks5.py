"""The SOCKS5 side of the proxy (RFC 1928, CONNECT without authentication only): the handshake
that names a target, and the replies.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Protocol

import anyio
from anyio.abc import ByteStream

from stockade.egress.dial import STREAM_ERRORS
from stockade.egress.request import (
    ANSWER_TIMEOUT,
    SOCKS_BAD_ADDRESS,
    SOCKS_BAD_COMMAND,
    SOCKS_FAILURE,
    Refusal,
    RequestReader,
    Target,
    normalize_host,
)

__all__ = [
    "SOCKS_VERSION",
    "HandshakeRecord",
    "socks_handshake",
    "socks_reply",
    "socks_send",
]

SOCKS_VERSION = 0x05
SOCKS_NO_AUTH = 0x00
SOCKS_NO_ACCEPTABLE = 0xFF
SOCKS_CONNECT = 0x01


class HandshakeRecord(Protocol):
    """What the handshake notes on the connection's record."""

    reason: str
    host: str
    port: int


async def socks_handshake(
    stream: ByteStream, reader: RequestReader, conn: HandshakeRecord
) -> Target | None:
    """Read a SOCKS5 greeting and CONNECT request; None if refused here (``conn.reason`` says
    why and the client has its answer)."""
    version, count = await reader.exactly(2)
    methods = await reader.exactly(count)
    if SOCKS_NO_AUTH not in methods:
        conn.reason = "SOCKS5 client offers no supported method (only 'no authentication')"
        await socks_send(stream, bytes([SOCKS_VERSION, SOCKS_NO_ACCEPTABLE]))
        return None
    await socks_send(stream, bytes([SOCKS_VERSION, SOCKS_NO_AUTH]), strict=True)
    version, command, _reserved, atyp = await reader.exactly(4)
    if version != SOCKS_VERSION:
        conn.reason = f"SOCKS5 request with version {version}"
        await socks_reply(stream, SOCKS_FAILURE)
        return None
    if command != SOCKS_CONNECT:
        conn.reason = f"SOCKS5 command {command} not supported (only CONNECT)"
        await socks_reply(stream, SOCKS_BAD_COMMAND)
        return None
    if atyp == 0x01:
        raw = str(ipaddress.IPv4Address(await reader.exactly(4)))
    elif atyp == 0x04:
        raw = str(ipaddress.IPv6Address(await reader.exactly(16)))
    elif atyp == 0x03:
        (length,) = await reader.exactly(1)
        name = await reader.exactly(length)
        try:
            raw = name.decode("ascii")
        except UnicodeDecodeError:
            raise Refusal("SOCKS5 host name is not ASCII", socks=SOCKS_BAD_ADDRESS) from None
    else:
        conn.reason = f"SOCKS5 address type {atyp} not supported"
        await socks_reply(stream, SOCKS_BAD_ADDRESS)
        return None
    port = int.from_bytes(await reader.exactly(2), "big")
    if port == 0:
        raise Refusal("SOCKS5 request for port 0", socks=SOCKS_FAILURE)
    host = normalize_host(raw)
    conn.host, conn.port = host, port
    return Target(host, port, raw)


# --- SOCKS5 replies -------------------------------------------------------------------------


async def socks_send(stream: ByteStream, data: bytes, *, strict: bool = False) -> None:
    if strict:
        await stream.send(data)
        return
    with anyio.move_on_after(ANSWER_TIMEOUT), contextlib.suppress(*STREAM_ERRORS):
        await stream.send(data)


async def socks_reply(stream: ByteStream, code: int, *, strict: bool = False) -> None:
    reply = bytes([SOCKS_VERSION, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0])
    await socks_send(stream, reply, strict=strict)
