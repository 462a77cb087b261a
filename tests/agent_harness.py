"""A small synchronous client that runs the guest agent as a plain subprocess over pipes.

Every frame the agent sends is checked against the protocol models in
``stockade.protocol.messages`` (results against ``METHODS``, notifications against
``NOTIFICATIONS``), and the ordering rules are enforced as frames arrive: no output for a
process before its process.start answer or after its process.exit, and no process.wait answer
before the process.exit notification. For the egress tunnel the harness plays the host: it
records every stream, checks that no stream.* traffic precedes its net.accept or follows its
stream.close, and that the agent never exceeds the window the test has acknowledged.
``hello(binary=True)`` makes the harness speak protocol 1.2's binary stream frames.
"""

from __future__ import annotations

import base64
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.protocol.framing import FrameDecoder, StreamChunk, encode_frame, encode_stream_header
from stockade.protocol.messages import (
    ERROR_CODES,
    HOST_NOTIFICATIONS,
    METHODS,
    NOTIFICATIONS,
    PROTOCOL_VERSION,
    STREAM_WINDOW,
)

GUEST = Path(__file__).resolve().parents[1] / "src" / "stockade" / "agent" / "guest.py"
#: The interpreter that runs the agent; point it at another Python (3.9+) to check the agent
#: there, e.g. STOCKADE_GUEST_PYTHON=python3.9.
GUEST_PYTHON = os.environ.get("STOCKADE_GUEST_PYTHON", sys.executable)

#: How long any single wait on the agent may take before the test fails (not a timing check:
#: only a guard so a broken agent fails the test instead of hanging it).
PATIENCE = 20.0


class AgentCallError(Exception):
    """The agent answered a call with a JSON-RPC error."""

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        super().__init__(f"{method}: [{error['code']}] {error['message']}")
        self.code: int = error["code"]
        self.message: str = error["message"]
        self.data: Any = error.get("data")


@dataclass
class ProcRecord:
    """Everything seen of one process."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit: dict[str, Any] | None = None


@dataclass
class StreamRecord:
    """Everything seen of one tunnel stream, and what the test (as the host) sent on it."""

    accept: dict[str, Any]
    data: bytearray = field(default_factory=bytearray)
    eof: bool = False
    close: dict[str, Any] | None = None  # the agent's stream.close params
    acked_by_host: int = 0  # bytes of ``data`` the test acknowledged
    sent_by_host: int = 0  # bytes the test sent as stream.data
    acked_by_agent: int = 0  # of those, how many the agent acknowledged

    @property
    def in_flight(self) -> int:
        """Bytes the test sent that the agent has not acknowledged yet."""
        return self.sent_by_host - self.acked_by_agent


class AgentHarness:
    """Runs ``guest.py`` with ``args`` and talks to it over its stdin/stdout."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()
    ) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.log_text = ""  # the agent's stderr, kept after close()
        self.process = subprocess.Popen(
            [GUEST_PYTHON, "-S", "-I", *python_flags, str(GUEST), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._in = self.process.stdin
        self._out = self.process.stdout.fileno()
        self._decoder = FrameDecoder()
        #: Set by hello(): binary stream frames, the window the test grants the agent, and
        #: the one the agent grants the test (from its answer).
        self._hello_done = False
        self.binary = False
        self.recv_window = STREAM_WINDOW
        self.send_window = STREAM_WINDOW
        self._ids = 0
        self._pending: dict[int, str] = {}
        self._answers: dict[int, dict[str, Any]] = {}
        self._wait_targets: dict[int, int] = {}  # process.wait request id -> proc
        self.procs: dict[int, ProcRecord] = {}
        self.eof = False
        self.streams: dict[int, StreamRecord] = {}
        self.direct: list[dict[str, Any]] = []  # net.direct reports
        #: Acknowledge every stream.data as soon as it arrives (tests of the window turn it off).
        self.auto_ack = True
        self.stream_bytes = 0  # stream.data bytes received so far, over all streams
        #: request id -> ``stream_bytes`` when its answer arrived (orders answers and data)
        self.stream_bytes_at_answer: dict[int, int] = {}

    # --- raw frames -------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(encode_frame(message))

    def send_bytes(self, data: bytes) -> None:
        self._in.write(data)
        self._in.flush()

    def send_data(self, stream: int, data: bytes) -> None:
        """Bytes of ``stream`` as the host sends them: a binary frame once agreed, else JSON."""
        if not self.binary:
            self.notify("stream.data", {"stream": stream, "data": base64.b64encode(data).decode()})
            return
        record = self.streams.get(stream)
        if record is not None:
            record.sent_by_host += len(data)
        self.send_bytes(encode_stream_header(stream, len(data)) + data)

    def notify(self, method: str, params: dict[str, Any], *, check_params: bool = True) -> None:
        """Send a host notification; by default its params must be valid."""
        if check_params:
            HOST_NOTIFICATIONS[method].model_validate(params)
            record = self.streams.get(params["stream"])
            if record is not None and method == "stream.data":
                record.sent_by_host += len(base64.b64decode(params["data"]))
            if record is not None and method == "stream.ack":
                record.acked_by_host += params["bytes"]
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def request(self, method: str, params: dict[str, Any], *, check_params: bool = True) -> int:
        """Send a request; by default its params must be valid (catches mistakes in tests)."""
        if check_params and method in METHODS:
            METHODS[method][0].model_validate(params)
        self._ids += 1
        self._pending[self._ids] = method
        self.send({"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params})
        return self._ids

    def pump(self, timeout: float = PATIENCE) -> bool:
        """Read and dispatch whatever arrives within ``timeout``; False at EOF."""
        if self.eof:
            return False
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            return True
        data = os.read(self._out, 1 << 20)
        if not data:
            self.eof = True
            self._decoder.check_eof()
            return False
        for message in self._decoder.feed_frames(data):
            if isinstance(message, StreamChunk):
                assert self.binary, "binary stream frame from the agent before it was agreed"
                self._stream_data(message.stream, message.data)
            else:
                self._dispatch(message)
        return True

    def until(self, condition: Any, what: str) -> None:
        deadline = time.monotonic() + PATIENCE
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}; agent log:\n{self.stderr()}")
            if not self.pump(0.5):
                if condition():
                    return
                raise AssertionError(f"agent closed the channel while waiting for {what}")

    def _dispatch(self, message: dict[str, Any]) -> None:
        assert message.get("jsonrpc") == "2.0", message
        if "id" in message:
            request_id = message["id"]
            method = self._pending.pop(request_id)
            assert ("result" in message) != ("error" in message), message
            if "result" in message:
                METHODS[method][1].model_validate(message["result"])
                if method == "process.start":
                    self.procs[message["result"]["proc"]] = ProcRecord()
                if method == "process.wait":
                    proc = self._wait_targets.pop(request_id)
                    assert self.procs[proc].exit is not None, "wait answered before process.exit"
                    assert self.procs[proc].exit == {"proc": proc, **message["result"]}
            else:
                error = message["error"]
                assert isinstance(error["code"], int) and isinstance(error["message"], str)
                assert error["code"] in ERROR_CODES, error
            self._answers[request_id] = message
            self.stream_bytes_at_answer[request_id] = self.stream_bytes
            return
        method = message["method"]
        params = NOTIFICATIONS[method].model_validate(message["params"]).model_dump()
        if method == "net.accept" or method.startswith("stream."):
            self._dispatch_stream(method, params)
            return
        record = self.procs.get(params["proc"])
        assert record is not None, f"{method} for a process never started: {params['proc']}"
        assert record.exit is None, f"{method} after process.exit for {params['proc']}"
        if method == "process.output":
            chunk = base64.b64decode(params["data"], validate=True)
            (record.stdout if params["stream"] == "stdout" else record.stderr).extend(chunk)
        else:
            record.exit = params

    def _dispatch_stream(self, method: str, params: dict[str, Any]) -> None:
        if method == "net.direct":
            self.direct.append(params)
            return
        if method == "net.accept":
            assert params["stream"] not in self.streams, f"stream id reused: {params}"
            assert (params["target"] is not None) == (params["kind"] == "forward"), params
            self.streams[params["stream"]] = StreamRecord(params)
            return
        record = self.streams.get(params["stream"])
        assert record is not None, f"{method} before net.accept: {params}"
        assert record.close is None, f"{method} after stream.close: {params}"
        if method == "stream.data":
            assert not self.binary, "JSON stream.data after binary frames were agreed"
            self._stream_data(params["stream"], base64.b64decode(params["data"], validate=True))
        elif method == "stream.ack":
            record.acked_by_agent += params["bytes"]
            assert record.acked_by_agent <= record.sent_by_host, "agent acked unsent bytes"
        elif method == "stream.eof":
            assert not record.eof, "stream.eof twice"
            record.eof = True
        else:
            record.close = params

    def _stream_data(self, stream: int, chunk: bytes) -> None:
        record = self.streams.get(stream)
        assert record is not None, f"stream data before net.accept: stream {stream}"
        assert record.close is None, f"stream data after stream.close: stream {stream}"
        assert not record.eof, f"stream data after stream.eof: stream {stream}"
        assert chunk, "empty stream data"
        record.data.extend(chunk)
        self.stream_bytes += len(chunk)
        unacked = len(record.data) - record.acked_by_host
        assert unacked <= self.recv_window, f"agent exceeded the window: {unacked} unacked"
        if self.auto_ack:
            self.notify("stream.ack", {"stream": stream, "bytes": len(chunk)})

    # --- calls ------------------------------------------------------------------------------

    def answer(self, request_id: int) -> dict[str, Any]:
        self.until(lambda: request_id in self._answers, f"the answer to request {request_id}")
        return self._answers.pop(request_id)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a method; return its validated result, or raise AgentCallError."""
        request_id = self.request(method, params)
        if method == "process.wait":
            self._wait_targets[request_id] = params["proc"]
        answer = self.answer(request_id)
        if "error" in answer:
            raise AgentCallError(method, answer["error"])
        result: dict[str, Any] = answer["result"]
        return result

    def error(
        self, method: str, params: dict[str, Any], *, check_params: bool = False
    ) -> AgentCallError:
        """Call a method that must fail; return the error."""
        answer = self.answer(self.request(method, params, check_params=check_params))
        assert "error" in answer, f"{method} succeeded unexpectedly: {answer}"
        return AgentCallError(method, answer["error"])

    def hello(self, *, binary: bool = False, window: int | None = None) -> dict[str, Any]:
        """Handshake; with ``binary``, offer binary stream frames (and ``window``)."""
        params: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "client": "tests"}
        if binary:
            params["stream_binary"] = True
            self._decoder.binary = True
        if window is not None:
            params["stream_window"] = window
        first = not self._hello_done
        result = self.call("agent.hello", **params)
        self._hello_done = True
        if first:  # like the agent: the first hello sets framing and windows
            self.binary = binary and "stream-binary" in result["capabilities"]
            self.recv_window = window or STREAM_WINDOW
            self.send_window = result.get("stream_window", STREAM_WINDOW)
        return result

    # --- processes --------------------------------------------------------------------------

    def start(self, **params: Any) -> int:
        proc: int = self.call("process.start", **params)["proc"]
        return proc

    def wait_exit(self, proc: int) -> dict[str, Any]:
        """Wait for process.exit, then check that process.wait agrees with it."""
        record = self.procs[proc]
        self.until(lambda: record.exit is not None, f"the exit of process {proc}")
        waited = self.call("process.wait", proc=proc)
        assert record.exit is not None
        assert {"proc": proc, **waited} == record.exit
        return record.exit

    def run(self, **params: Any) -> tuple[dict[str, Any], bytes, bytes]:
        """Start a process and wait for it: (exit params, stdout, stderr)."""
        proc = self.start(**params)
        exit_params = self.wait_exit(proc)
        record = self.procs[proc]
        return exit_params, bytes(record.stdout), bytes(record.stderr)

    def write_stdin(self, proc: int, data: bytes = b"", *, eof: bool = False) -> None:
        self.call("process.write_stdin", proc=proc, data=base64.b64encode(data).decode(), eof=eof)

    # --- lifetime ---------------------------------------------------------------------------

    def stderr(self) -> str:
        if not self.log.closed:
            self.log.seek(0)
            self.log_text = self.log.read().decode(errors="replace")
        return self.log_text

    def wait_gone(self, timeout: float = PATIENCE) -> int:
        """Wait for the agent process to exit; return its status."""
        return self.process.wait(timeout)

    def close(self) -> int:
        """Close the channel (EOF): the agent must kill its processes and exit."""
        try:
            if not self._in.closed:
                self._in.close()
        except BrokenPipeError:
            pass
        try:
            return self.process.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the agent did not exit after EOF on its channel") from None
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.stderr()
            self.log.close()

    def __enter__(self) -> AgentHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None or not self.log.closed:
            self.close()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_pid_gone(pid: int) -> None:
    deadline = time.monotonic() + PATIENCE
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} is still alive")
        time.sleep(0.01)
