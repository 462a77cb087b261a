"""Host side of the guest agent protocol: one client for every backend and channel.

The guest is hostile. Every frame is size-limited and validated against the message models;
anything malformed, oversized or unexpected raises ``AgentProtocolError`` and closes the
connection, failing every pending call. There is no mandatory background task: whoever waits
for an answer reads the channel and dispatches what arrives (others wait for progress), so a
client works with or without a task group; ``serve_forever`` runs a dedicated reader.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from anyio.abc import ByteStream, UNIXSocketStream
from pydantic import BaseModel, ValidationError

from stockade._errors import (
    AgentError,
    AgentProtocolError,
    SandboxFileExistsError,
    SandboxFileNotFoundError,
    SandboxPermissionError,
    SandboxStateError,
)
from stockade.agent.tunnel import TunnelMux
from stockade.protocol.framing import (
    DEFAULT_MAX_FRAME,
    HEADER,
    FrameDecoder,
    StreamChunk,
    encode_frame,
)
from stockade.protocol.messages import (
    METHODS,
    NOTIFICATIONS,
    PROTOCOL_VERSION,
    AgentHelloParams,
    AgentHelloResult,
    FsEntry,
    FsStatParams,
    NetAcceptParams,
    ProcessExitParams,
    ProcessOutputParams,
    ProcessStartParams,
    ProcessStartResult,
)

__all__ = ["AgentClient", "ProcessEvents", "error_from_payload", "guest_shell"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

#: Bytes asked of the channel per read (frames of tunnel data are up to 256 KiB each).
READ_SIZE = 1024 * 1024

#: Fixed table from protocol error codes to exception types; anything else is AgentError.
_ERROR_TYPES: dict[int, type[AgentError]] = {
    1: SandboxFileNotFoundError,
    2: SandboxPermissionError,
    3: SandboxFileExistsError,
}

OutputCallback = Callable[[str, bytes], None]
ExitCallback = Callable[[ProcessExitParams], None]


def error_from_payload(method: str, error: Any) -> AgentError:
    """Map a JSON-RPC error object from an untrusted peer to a typed exception."""
    if not isinstance(error, dict):
        raise AgentProtocolError(f"error for {method} is not an object")
    code = error.get("code")
    message = error.get("message")
    data = error.get("data")
    if not isinstance(code, int) or not isinstance(message, str):
        raise AgentProtocolError(f"error for {method} lacks an integer code and a message")
    if data is not None and not isinstance(data, dict):
        data = None
    cls = _ERROR_TYPES.get(code, AgentError)
    return cls(f"{method}: {message[:2000]}", code=code, data=data)


async def guest_shell(client: AgentClient) -> list[str]:
    """The interactive shell to start in the guest behind ``client`` (the agent, or a
    supervisor forwarding ``fs.*``): bash where the guest has it, else the POSIX sh every
    image has (busybox, alpine). The guest is asked: the host's files say nothing of it."""
    try:
        entry = await client.call("fs.stat", FsStatParams(path="/bin/bash", follow_symlinks=True))
    except (SandboxFileNotFoundError, SandboxPermissionError):
        entry = None
    if isinstance(entry, FsEntry) and entry.type == "file":
        return ["/bin/bash", "-i"]
    return ["/bin/sh", "-i"]


@dataclass
class ProcessEvents:
    """What the client has seen of one process: buffered output (unless streamed) and exit."""

    proc: int
    on_output: OutputCallback | None = None
    on_exit: ExitCallback | None = None
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit: ProcessExitParams | None = None


@dataclass
class _Pending:
    method: str
    on_result: Callable[[dict[str, Any]], None] | None = None
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    done: bool = False


class AgentClient:
    """Speaks the agent protocol over one byte stream (the ``Channel``)."""

    def __init__(
        self,
        channel: ByteStream,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        peer: str = "guest agent",
        validate_methods: bool = True,
    ) -> None:
        self._channel = channel
        self._max_frame = max_frame
        self._peer = peer
        self._validate_methods = validate_methods
        self._decoder = FrameDecoder(max_frame)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        # Ids of calls the caller gave up on (cancelled, timed out): their late answers are
        # expected and dropped. Bounded, oldest forgotten first.
        self._abandoned: dict[int, None] = {}
        self._procs: dict[int, ProcessEvents] = {}
        self._read_lock = anyio.Lock()
        # Taken for every frame: uncontended, it must not cost a trip through the event loop.
        self._write_lock = anyio.Lock(fast_acquire=True)
        self._progress = anyio.Event()
        self._failure: BaseException | None = None
        self._closed = False
        self._closing = False  # we asked the peer to go away: its EOF is no news
        self.hello_result: AgentHelloResult | None = None
        #: Called for notifications whose method this client does not know (supervisor use).
        self.on_unknown_notification: Callable[[str, dict[str, Any]], None] | None = None
        #: Set to route the egress tunnel's net.*/stream.* notifications (egress enabled).
        self.tunnel: TunnelMux | None = None
        # Descriptors are read from the channel once the host offered 'stream-fd'; before,
        # a plain read makes the kernel discard any the agent sends. Received ones wait here
        # for the net.accept they came with.
        self._fd_reads = False
        self._fds: list[int] = []

    # --- public API -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed or self._failure is not None

    async def hello(self, client: str = "stockade") -> AgentHelloResult:
        """Handshake; refuses an agent speaking another major protocol version.

        With a tunnel attached, the host offers binary stream frames and its receive window;
        both take effect while the answer is dispatched, before any frame that follows it.
        """
        tunnel = self.tunnel
        params = AgentHelloParams(protocol=PROTOCOL_VERSION, client=client)
        if tunnel is not None:
            offer_fd = tunnel.offer_fd and isinstance(self._channel, UNIXSocketStream)
            params = AgentHelloParams(
                protocol=PROTOCOL_VERSION,
                client=client,
                stream_binary=True,
                stream_window=tunnel.recv_window,
                stream_fd=offer_fd,
            )
            # From now on the agent may use them: accept them before it can answer.
            self._decoder.binary = True
            self._fd_reads = self._fd_reads or offer_fd
        holder: list[AgentHelloResult] = []

        def agreed(raw: dict[str, Any]) -> None:
            try:
                result = AgentHelloResult.model_validate(raw)
            except ValidationError as exc:
                raise AgentProtocolError(
                    f"{self._peer} sent an invalid result for agent.hello: {exc}"
                ) from exc
            if tunnel is not None:
                tunnel.send_window = result.stream_window
                tunnel.binary = "stream-binary" in result.capabilities
                tunnel.fd_streams = self._fd_reads and "stream-fd" in result.capabilities
            holder.append(result)

        # Defaults left out: without a tunnel the request is exactly what 1.1 agents accept.
        await self.call_raw(
            "agent.hello", params.model_dump(mode="json", exclude_defaults=True), on_result=agreed
        )
        result = holder[0]
        if result.protocol.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise AgentProtocolError(
                f"{self._peer} speaks protocol {result.protocol}; this client speaks "
                f"{PROTOCOL_VERSION}. Rebuild the sandbox image or upgrade stockade."
            )
        self.hello_result = result
        return result

    async def call(self, method: str, params: BaseModel) -> BaseModel:
        """Call a protocol method and return its validated result model."""
        raw = await self.call_raw(method, params.model_dump(mode="json", exclude_none=True))
        _, result_model = METHODS[method]
        try:
            return result_model.model_validate(raw)
        except ValidationError as exc:
            await self._fail(
                AgentProtocolError(f"{self._peer} sent an invalid result for {method}: {exc}")
            )
            raise self._failure from exc  # type: ignore[misc]

    async def start_process(
        self,
        params: ProcessStartParams,
        *,
        on_output: OutputCallback | None = None,
        on_exit: ExitCallback | None = None,
    ) -> tuple[ProcessStartResult, ProcessEvents]:
        """Start a process; its events are tracked from the instant the answer is read."""
        holder: list[ProcessEvents] = []

        def register(result: dict[str, Any]) -> None:
            proc = result.get("proc")
            if not isinstance(proc, int) or proc in self._procs:
                raise AgentProtocolError(f"{self._peer} returned an invalid process handle")
            holder.append(self.watch_process(proc, on_output=on_output, on_exit=on_exit))

        raw = await self.call_raw(
            "process.start", params.model_dump(mode="json", exclude_none=True), on_result=register
        )
        try:
            started = ProcessStartResult.model_validate(raw)
        except ValidationError as exc:
            await self._fail(AgentProtocolError(f"{self._peer} sent an invalid process.start"))
            raise self._failure from exc  # type: ignore[misc]
        return started, holder[0]

    async def call_raw(
        self,
        method: str,
        params: dict[str, Any],
        *,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Call any method with JSON params; returns the raw result object.

        ``on_result`` runs synchronously while the answer is dispatched, before any later
        frame, so it can register interest in notifications that follow the answer.
        """
        self._check_usable()
        request_id = next(self._ids)
        pending = _Pending(method, on_result)
        self._pending[request_id] = pending
        try:
            await self._send(
                {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            )
            await self._wait_for(lambda: pending.done)
        finally:
            self._pending.pop(request_id, None)
            if not pending.done:
                self._abandoned[request_id] = None
                if len(self._abandoned) > 1024:
                    del self._abandoned[next(iter(self._abandoned))]
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def watch_process(
        self,
        proc: int,
        *,
        on_output: OutputCallback | None = None,
        on_exit: ExitCallback | None = None,
    ) -> ProcessEvents:
        """Start tracking a process returned by process.start (before anything is read)."""
        events = ProcessEvents(proc, on_output=on_output, on_exit=on_exit)
        self._procs[proc] = events
        return events

    def forget_process(self, proc: int) -> None:
        self._procs.pop(proc, None)

    async def wait_process(self, events: ProcessEvents) -> ProcessExitParams:
        """Wait until the agent reports the process's exit (all output delivered first)."""
        await self._wait_for(lambda: events.exit is not None)
        assert events.exit is not None
        return events.exit

    async def serve_forever(self) -> None:
        """Read and dispatch until the connection ends (for long-lived supervisors)."""
        try:
            await self._wait_for(lambda: False)
        except (AgentProtocolError, SandboxStateError):
            return

    def expect_close(self) -> None:
        """The peer is about to end the connection on purpose (agent.shutdown)."""
        self._closing = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._channel.aclose()
        self._fail_pending(SandboxStateError(f"connection to the {self._peer} was closed"))

    # --- internals --------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise SandboxStateError(f"connection to the {self._peer} is closed")

    async def _send(self, message: dict[str, Any] | bytes | list[bytes]) -> None:
        # bytes: whole frames, encoded already (the tunnel's hot path); a list: the pieces of
        # frames, written back to back under the lock (a frame header, then its data).
        if isinstance(message, dict):
            parts = [encode_frame(message, self._max_frame)]
        else:
            parts = [message] if isinstance(message, bytes) else message
            if sum(map(len, parts)) > self._max_frame + HEADER.size:
                raise ValueError(f"frame of {sum(map(len, parts))} bytes exceeds the limit")
        async with self._write_lock:
            try:
                if len(parts) == 1:
                    await self._channel.send(parts[0])
                else:
                    # Cancelled between the pieces, the channel would carry half a frame.
                    with anyio.CancelScope(shield=True):
                        for part in parts:
                            await self._channel.send(part)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                error = SandboxStateError(
                    f"the {self._peer} is gone (sandbox stopped or crashed): {exc}"
                )
                await self._fail(error)
                raise error from exc

    async def _wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._check_usable()
            if self._read_lock.locked():
                progress = self._progress
                await progress.wait()
                continue
            async with self._read_lock:
                if condition():
                    return
                try:
                    await self._read_once()
                finally:
                    self._progress.set()
                    self._progress = anyio.Event()

    async def _receive(self) -> bytes:
        if not self._fd_reads:
            return await self._channel.receive(READ_SIZE)
        assert isinstance(self._channel, UNIXSocketStream)
        try:
            # Two, to see a message that carries more than the one a net.accept may have
            # (the kernel closes any beyond the second).
            data, fds = await self._channel.receive_fds(READ_SIZE, 2)
        except RuntimeError as exc:  # ancillary data other than descriptors
            raise AgentProtocolError(f"{self._peer} sent unexpected ancillary data") from exc
        for fd in fds:
            os.set_inheritable(fd, False)  # received without close-on-exec
        self._fds += fds
        if len(fds) > 1:
            self._close_fds()
            raise AgentProtocolError(
                f"{self._peer} sent {len(fds)} descriptors in one message; a net.accept "
                "carries exactly one"
            )
        agreed = self.tunnel is not None and self.tunnel.fd_streams
        # Before the answer to agent.hello the agreement is not known yet: _check_fds and
        # accept_fd judge those descriptors once it is.
        if fds and not agreed and self.hello_result is not None:
            self._close_fds()
            raise AgentProtocolError(
                f"{self._peer} sent a descriptor, which agent.hello did not agree on"
            )
        if not data:
            self._close_fds()
            raise AgentProtocolError(f"{self._peer} sent a descriptor without data")
        return data

    def _take_fd(self) -> int:
        if not self._fds:
            raise AgentProtocolError(
                f"{self._peer} sent net.accept with fd, but no descriptor came with it"
            )
        return self._fds.pop(0)

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                logger.debug("could not close descriptor %d", fd)

    def _check_fds(self) -> None:
        """After a read's frames are dispatched: a descriptor not taken by its net.accept
        may only wait for the rest of a frame that is still coming (at most one)."""
        if self._fds and (self._decoder.pending == 0 or len(self._fds) > 1):
            count = len(self._fds)
            self._close_fds()
            raise AgentProtocolError(
                f"{self._peer} sent {count} descriptor(s) with frames other than net.accept "
                "with fd; they were closed"
            )

    async def _read_once(self) -> None:
        try:
            data = await self._receive()
        except AgentProtocolError as exc:
            await self._fail(exc)
            raise
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            try:
                self._decoder.check_eof()
            except AgentProtocolError as truncated:
                await self._fail(truncated)
                raise truncated from exc
            error = SandboxStateError(
                f"the {self._peer} closed the connection (sandbox stopped or crashed)"
            )
            await self._fail(error)
            raise error from exc
        try:
            for message in self._decoder.feed_frames(data):
                if isinstance(message, StreamChunk):
                    # Only accepted once hello offered them, which needs a tunnel.
                    assert self.tunnel is not None
                    self.tunnel.feed(message.stream, message.data)
                else:
                    self._dispatch(message)
            if self._fd_reads:
                self._check_fds()
        except AgentProtocolError as exc:
            await self._fail(exc)
            raise

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("jsonrpc") != "2.0":
            raise AgentProtocolError(f"{self._peer} sent a message without jsonrpc '2.0'")
        if "id" in message:
            self._dispatch_response(message)
        else:
            self._dispatch_notification(message)

    def _dispatch_response(self, message: dict[str, Any]) -> None:
        request_id = message["id"]
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None:
            if isinstance(request_id, int) and self._abandoned.pop(request_id, 0) is None:
                return  # the late answer to a call its caller abandoned
            raise AgentProtocolError(f"{self._peer} answered a call that was never made")
        if "method" in message:
            raise AgentProtocolError(f"{self._peer} sent a request; the host does not serve any")
        has_result, has_error = "result" in message, "error" in message
        if has_result == has_error:
            raise AgentProtocolError(
                f"{self._peer} sent a response with neither or both of result and error"
            )
        if has_error:
            pending.error = error_from_payload(pending.method, message["error"])
        else:
            result = message["result"]
            if not isinstance(result, dict):
                raise AgentProtocolError(f"{self._peer} sent a non-object result")
            if pending.on_result is not None:
                pending.on_result(result)
            pending.result = result
        pending.done = True

    def _dispatch_notification(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        params = message.get("params")
        if not isinstance(method, str) or not isinstance(params, dict):
            raise AgentProtocolError(f"{self._peer} sent a notification without method/params")
        model = NOTIFICATIONS.get(method)
        if model is None:
            if self.on_unknown_notification is not None and not self._validate_methods:
                self.on_unknown_notification(method, params)
                return
            raise AgentProtocolError(f"{self._peer} sent an unknown notification {method!r}")
        try:
            parsed = model.model_validate(params)
        except ValidationError as exc:
            raise AgentProtocolError(f"{self._peer} sent an invalid {method}: {exc}") from exc
        if method.startswith(("net.", "stream.")):
            if self.tunnel is None:
                raise AgentProtocolError(
                    f"{self._peer} sent {method}, but this sandbox has no network tunnel"
                )
            if isinstance(parsed, NetAcceptParams) and parsed.fd and self._fd_reads:
                self.tunnel.accept_fd(parsed, self._take_fd())
            else:
                self.tunnel.dispatch(method, parsed)
            return
        if isinstance(parsed, ProcessOutputParams):
            events = self._procs.get(parsed.proc)
            if events is None or events.exit is not None:
                raise AgentProtocolError(
                    f"{self._peer} sent output for process {parsed.proc}, which it is not running"
                )
            try:
                chunk = base64.b64decode(parsed.data, validate=True)
            except ValueError as exc:
                raise AgentProtocolError(f"{self._peer} sent output that is not base64") from exc
            if events.on_output is not None:
                events.on_output(parsed.stream, chunk)
            else:
                (events.stdout if parsed.stream == "stdout" else events.stderr).extend(chunk)
        elif isinstance(parsed, ProcessExitParams):
            events = self._procs.get(parsed.proc)
            if events is None or events.exit is not None:
                raise AgentProtocolError(
                    f"{self._peer} reported the exit of process {parsed.proc}, "
                    "which it is not running"
                )
            events.exit = parsed
            if events.on_exit is not None:
                events.on_exit(parsed)

    async def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
            level = logging.DEBUG if self._closing else logging.WARNING
            logger.log(level, "closing connection to the %s: %s", self._peer, error)
            self._fail_pending(error)
            with anyio.CancelScope(shield=True):
                try:
                    await self._channel.aclose()
                except Exception:
                    logger.debug("error closing a failed channel", exc_info=True)

    async def notify(self, message: dict[str, Any] | bytes | list[bytes]) -> None:
        """Send a notification (no answer expected), e.g. the tunnel's stream.* traffic.

        ``message`` may be whole frames already encoded (header included), for bulk data, or
        a list of pieces that together are whole frames.
        """
        self._check_usable()
        await self._send(message)

    def _fail_pending(self, error: BaseException) -> None:
        self._close_fds()
        if self.tunnel is not None:
            self.tunnel.close_all(str(error))
        for pending in self._pending.values():
            if not pending.done:
                pending.error = error
                pending.done = True
        self._progress.set()
