"""Host side of the egress tunnel: each connection the agent accepts becomes a ByteStream.

The agent announces a connection with ``net.accept``; bytes flow as binary stream frames
(protocol 1.2, when ``agent.hello`` agreed on them) or ``stream.data`` notifications, and are
acknowledged with ``stream.ack`` once delivered, so neither side ever holds more than the
receiver's window of unacknowledged bytes of a stream. ``TunnelStream`` is an anyio
``ByteStream``, so the egress proxy handles a tunnelled connection exactly like a socket.
"""

from __future__ import annotations

import base64
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import ByteStream

from stockade._errors import AgentProtocolError
from stockade.protocol.framing import HEADER, encode_stream_header
from stockade.protocol.messages import STREAM_WINDOW, NetAcceptParams, NetDirectParams

__all__ = ["TunnelMux", "TunnelStream"]

logger = logging.getLogger(__name__)

#: Largest stream.data chunk the host sends as JSON (base64 keeps frames far under the limit).
CHUNK = 64 * 1024
#: Largest binary stream frame the host sends (data bytes).
BINARY_CHUNK = 256 * 1024
#: Up to this size a binary frame is copied into one write; above, header and data go apart.
SMALL_FRAME = 64 * 1024
#: Acknowledge delivered bytes once this many have accumulated. Less than the window, so
#: what is held back never stalls the agent; a short request costs no ack frame at all.
ACK_BATCH = 64 * 1024

#: Sends one message: a dict to encode, or whole frames already encoded (as one bytes, or
#: as pieces that must reach the channel back to back).
Send = Callable[[dict[str, Any] | bytes | list[bytes]], Awaitable[None]]


def _ack_frame(stream: int, count: int) -> bytes:
    body = b'{"jsonrpc":"2.0","method":"stream.ack","params":{"stream":%d,"bytes":%d}}' % (
        stream,
        count,
    )
    return HEADER.pack(len(body)) + body


def _frame(method: bytes, stream: int) -> bytes:
    """stream.eof / stream.close without an error, encoded by hand (once per connection)."""
    body = b'{"jsonrpc":"2.0","method":"%s","params":{"stream":%d}}' % (method, stream)
    return HEADER.pack(len(body)) + body


class TunnelStream(ByteStream):
    """One tunnelled connection, as seen by the host."""

    def __init__(self, mux: TunnelMux, stream_id: int, accept: NetAcceptParams) -> None:
        self._mux = mux
        self.id = stream_id
        self.accept = accept
        # Chunks as they arrived (handed on whole when they fit: no copy), and their size.
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._peer_eof = False  # the sandbox side will send no more data
        self._closed = False  # ended in both directions
        self._error: str | None = None
        self._readable = anyio.Event()
        self._unacked_out = 0  # bytes we sent that the agent has not acknowledged
        self._credit = anyio.Event()
        self._delivered = 0  # bytes we handed to our reader, not yet acknowledged
        self._sent_eof = False

    # --- fed by the mux (synchronously, while a frame is dispatched) ---------------------

    def _feed(self, data: bytes) -> None:
        if self._closed or self._peer_eof or not data:
            return
        window = self._mux.recv_window
        if self._buffered + self._delivered + len(data) > window:
            raise AgentProtocolError(
                f"agent sent more than the {window}-byte window on stream {self.id}"
            )
        self._buffer.append(data)
        self._buffered += len(data)
        self._wake_reader()

    def _ack(self, count: int) -> None:
        self._unacked_out = max(0, self._unacked_out - count)
        self._credit.set()
        self._credit = anyio.Event()

    def _eof(self) -> None:
        self._peer_eof = True
        self._wake_reader()

    def _close(self, error: str | None) -> None:
        self._closed = True
        self._error = error
        self._wake_reader()
        self._credit.set()

    def _wake_reader(self) -> None:
        self._readable.set()
        self._readable = anyio.Event()

    # --- ByteStream ------------------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._buffer:
            if self._closed and self._error:
                raise anyio.BrokenResourceError(self._error)
            if self._peer_eof or self._closed:
                raise anyio.EndOfStream
            await self._readable.wait()
        data = self._buffer[0]
        if len(data) <= max_bytes:
            self._buffer.popleft()
        else:
            data, self._buffer[0] = data[:max_bytes], data[max_bytes:]
        self._buffered -= len(data)
        self._delivered += len(data)
        if self._delivered >= self._mux.ack_batch:
            count, self._delivered = self._delivered, 0
            if not self._closed:
                await self._mux.send(_ack_frame(self.id, count))
        return data

    async def send(self, item: bytes) -> None:
        mux = self._mux
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.BrokenResourceError(self._error or "stream closed")
            if self._sent_eof:
                raise anyio.ClosedResourceError
            room = mux.send_window - self._unacked_out
            if room <= 0:
                await self._credit.wait()
                continue
            if mux.binary:
                chunk = view[: min(room, BINARY_CHUNK)]
                size = len(chunk)
                header = encode_stream_header(self.id, size)
                view = view[size:]
                self._unacked_out += size
                if size <= SMALL_FRAME:
                    # One write: each write to the channel may wake the agent, which costs
                    # more than copying a few KiB.
                    await mux.send(header + chunk)
                else:
                    # Header and data as two writes: no copy of a large chunk into a frame
                    # (the whole item, in the common case of a read that fits).
                    await mux.send([header, item if size == len(item) else chunk.tobytes()])
                continue
            else:
                chunk = view[: min(room, CHUNK)]
                # Encoded by hand: base64 needs no JSON escaping, and json.dumps of a large
                # string is the most expensive step of the JSON data path.
                body = (
                    b'{"jsonrpc":"2.0","method":"stream.data","params":{"stream":%d,"data":"%s"}}'
                    % (self.id, base64.b64encode(chunk))
                )
                frame = HEADER.pack(len(body)) + body
            view = view[len(chunk) :]
            self._unacked_out += len(chunk)
            await mux.send(frame)

    async def send_eof(self) -> None:
        if self._sent_eof or self._closed:
            return
        self._sent_eof = True
        await self._mux.send(_frame(b"stream.eof", self.id))

    async def aclose(self) -> None:
        if self._closed:
            return
        both_ended = self._sent_eof and self._peer_eof
        self._close(None)
        self._mux.forget(self.id)
        if both_ended:
            # Both sides half-closed: the agent forgets the stream once it has written
            # everything; a stream.close now would only cut that short.
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._mux.send(_frame(b"stream.close", self.id))
            except Exception:
                logger.debug("could not send stream.close for %s", self.id)


class TunnelMux:
    """Streams of one agent connection; routes stream traffic to them.

    ``recv_window`` is what the agent may send per stream unacknowledged (the host's buffer
    per stream, offered in agent.hello), ``send_window`` what the host may send (the agent's,
    from its answer); ``binary`` says whether the host sends binary stream frames. The
    AgentClient sets them during the handshake.
    """

    MAX_STREAMS = 512

    def __init__(
        self,
        send: Send,
        on_accept: Callable[[TunnelStream], None],
        on_direct: Callable[[NetDirectParams], None] | None = None,
    ) -> None:
        self.send = send
        self._on_accept = on_accept
        self._on_direct = on_direct
        self._streams: dict[int, TunnelStream] = {}
        self.recv_window = STREAM_WINDOW
        self.send_window = STREAM_WINDOW
        self.binary = False

    @property
    def ack_batch(self) -> int:
        return max(ACK_BATCH, self.recv_window // 4)

    def __len__(self) -> int:
        return len(self._streams)

    def forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def feed(self, stream_id: int, data: bytes) -> None:
        """Bytes of a binary stream frame (already checked for shape by the decoder)."""
        stream = self._streams.get(stream_id)
        if stream is not None:  # else late traffic for a stream the host already closed
            stream._feed(data)

    def dispatch(self, method: str, params: Any) -> None:
        """Handle one validated net.*/stream.* notification (called by the AgentClient)."""
        if method == "net.accept":
            assert isinstance(params, NetAcceptParams)
            if params.stream in self._streams:
                raise AgentProtocolError(f"agent reused stream id {params.stream}")
            if len(self._streams) >= self.MAX_STREAMS:
                raise AgentProtocolError("agent opened more streams than allowed")
            stream = TunnelStream(self, params.stream, params)
            self._streams[params.stream] = stream
            self._on_accept(stream)
            return
        if method == "net.direct":
            assert isinstance(params, NetDirectParams)
            if self._on_direct is not None:
                self._on_direct(params)
            return
        stream_id = params.stream
        existing = self._streams.get(stream_id)
        if existing is None:
            return  # late traffic for a stream the host already closed
        stream = existing
        if method == "stream.data":
            try:
                data = base64.b64decode(params.data, validate=True)
            except ValueError as exc:
                raise AgentProtocolError("agent sent stream data that is not base64") from exc
            stream._feed(data)
        elif method == "stream.ack":
            stream._ack(params.bytes)
        elif method == "stream.eof":
            stream._eof()
        elif method == "stream.close":
            stream._close(params.error)
            self.forget(stream_id)

    def close_all(self, error: str) -> None:
        for stream in list(self._streams.values()):
            stream._close(error)
        self._streams.clear()
