"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON.

Since protocol 1.2 a second kind of frame carries the egress tunnel's stream data without
JSON or base64: the top bit of the length word is set (``BINARY_FLAG``) and the body is a
4-byte big-endian stream id followed by at least one byte of data. Either side uses them only
after ``agent.hello`` agreed on them (the host offers ``stream_binary``, the agent answers
with the ``stream-binary`` capability); a peer that did not agree treats one as a protocol
error (an older decoder sees a length far above its limit and refuses it).

Both ends enforce ``max_frame`` (on the body, flag excluded). The decoder is incremental and
never buffers more than one frame's worth of bytes, so a hostile peer cannot make the host
allocate without bound.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from stockade._errors import AgentProtocolError

__all__ = [
    "BINARY_FLAG",
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "STREAM_HEADER",
    "FrameDecoder",
    "StreamChunk",
    "encode_frame",
    "encode_stream_header",
]

#: Largest frame either side accepts (bytes of JSON, header excluded).
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
HEADER = struct.Struct(">I")
#: Set in the length word of a binary stream frame.
BINARY_FLAG = 0x8000_0000
#: Length word and stream id of a binary stream frame.
STREAM_HEADER = struct.Struct(">II")
_LENGTH_MASK = BINARY_FLAG - 1
_ID_SIZE = 4


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """The body of one binary stream frame: bytes of one tunnel stream."""

    stream: int
    data: bytes


def encode_frame(message: dict[str, Any], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise one message; refuses to build a frame the peer would reject."""
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > max_frame:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


def encode_stream_header(stream: int, size: int, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """The 8 bytes that precede ``size`` bytes of data of ``stream`` in a binary frame."""
    if not 1 <= size <= max_frame - _ID_SIZE:
        raise ValueError(f"binary stream frame of {size} bytes is outside 1..{max_frame - 4}")
    if not 1 <= stream <= _LENGTH_MASK:
        raise ValueError(f"stream id {stream} is out of range")
    return STREAM_HEADER.pack(BINARY_FLAG | (size + _ID_SIZE), stream)


class FrameDecoder:
    """Turns a byte stream into decoded JSON objects (and, once allowed, stream chunks).

    Sizes and syntax are validated. ``binary`` says whether binary stream frames are
    accepted; it stays off unless this side offered them in ``agent.hello``.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, binary: bool = False) -> None:
        self.max_frame = max_frame
        self.binary = binary
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame (non-zero at EOF = truncation)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every complete JSON message they finish (no binary frames)."""
        if self.binary:
            raise RuntimeError("a decoder that accepts binary frames is read with feed_frames")
        return self.feed_frames(data)  # type: ignore[return-value]  # only dicts without binary

    def feed_frames(self, data: bytes) -> list[dict[str, Any] | StreamChunk]:
        """Add bytes; return every complete frame they finish, in order."""
        if self._buf:
            self._buf += data
            source: bytes | bytearray = self._buf
        else:
            source = data  # the common case: no copy until a frame is cut out
        out: list[dict[str, Any] | StreamChunk] = []
        offset = 0
        end = len(source)
        with memoryview(source) as view:
            while end - offset >= HEADER.size:
                (word,) = HEADER.unpack_from(source, offset)
                size = word & _LENGTH_MASK
                binary = word != size
                if size > self.max_frame:
                    raise AgentProtocolError(
                        f"peer announced a frame of {size} bytes; the limit is {self.max_frame}"
                    )
                if binary and not self.binary:
                    raise AgentProtocolError(
                        "peer sent a binary stream frame, which was not agreed in agent.hello"
                    )
                start = offset + HEADER.size
                if end - start < size:
                    break
                offset = start + size
                if binary:
                    out.append(self._chunk(source, view, start, offset))
                else:
                    out.append(self._decode(view[start:offset].tobytes()))
        if source is self._buf:
            del self._buf[:offset]
        elif offset < end:
            self._buf += data[offset:]
        return out

    @staticmethod
    def _chunk(source: bytes | bytearray, view: memoryview, start: int, end: int) -> StreamChunk:
        if end - start <= _ID_SIZE:
            raise AgentProtocolError("peer sent a binary stream frame without data")
        (stream,) = HEADER.unpack_from(source, start)
        if stream == 0:
            raise AgentProtocolError("peer sent a binary stream frame for stream 0")
        return StreamChunk(stream, view[start + _ID_SIZE : end].tobytes())

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
        if self._buf:
            raise AgentProtocolError(
                f"connection closed in the middle of a frame ({len(self._buf)} bytes pending)"
            )
