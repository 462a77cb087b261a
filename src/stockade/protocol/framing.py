"""Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.

Both ends enforce ``max_frame``. The decoder is incremental and never buffers more than one
frame's worth of bytes, so a hostile peer cannot make the host allocate without bound.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from stockade._errors import AgentProtocolError

__all__ = ["DEFAULT_MAX_FRAME", "HEADER", "FrameDecoder", "encode_frame"]

#: Largest frame either side accepts (bytes of JSON, header excluded).
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
HEADER = struct.Struct(">I")


def encode_frame(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise one message; refuses to build a frame the peer would reject."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > max_frame:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into decoded JSON objects, validating sizes and syntax."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame (non-zero at EOF = truncation)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every complete message they finish."""
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    return out
                (size,) = HEADER.unpack_from(self._buf)
                if size > self.max_frame:
                    raise AgentProtocolError(
                        f"peer announced a frame of {size} bytes; the limit is {self.max_frame}"
                    )
                del self._buf[: HEADER.size]
                self._need = size
            if len(self._buf) < self._need:
                return out
            body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            self._need = None
            out.append(self._decode(body))

    @staticmethod
    def _decode(body: bytes) -> dict[str, Any]:
        try:
            message = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AgentProtocolError(f"peer sent a frame that is not JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise AgentProtocolError(
                f"peer sent a JSON {type(message).__name__} where an object was expected"
            )
        return message

    def check_eof(self) -> None:
        """Call at end of stream: a partial frame left over means the peer was cut off."""
        if self._buf or self._need is not None:
            raise AgentProtocolError(
                f"connection closed in the middle of a frame ({len(self._buf)} bytes pending)"
            )
