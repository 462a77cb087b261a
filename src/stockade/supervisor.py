"""Per-sandbox supervisor: keeps a sandbox alive after the CLI call that created it.

It runs the sandbox in-process (``AsyncSandbox``) and serves a unix control socket in the
sandbox's state directory with the same framing and JSON-RPC as the guest agent: a thin,
typed method table over the sandbox's public API. Agent methods (``process.*``, ``fs.*``,
``transfer.*``, typed by ``protocol.messages.METHODS``) are relayed to the agent, with a
process's output and exit sent to the connection that started it; the supervisor's own
methods are ``protocol.messages.CONTROL_METHODS``. ``AsyncSandbox.connect()`` is its
client. If the supervisor dies (even ``kill -9``), bwrap's die-with-parent takes the
sandbox with it, and ``stockade ls`` reports it as failed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskGroup
from pydantic import BaseModel, ValidationError

from stockade import (
    AgentError,
    AgentProtocolError,
    CommandResult,
    ExecTimeoutError,
    StockadeError,
)
from stockade.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from stockade.protocol.messages import (
    CONTROL_METHODS,
    METHODS,
    Empty,
    NetChangeParams,
    NetLogResult,
    ProcessExitParams,
    ProcessStartParams,
    ProcessStartResult,
    SandboxInfoResult,
    SnapshotListResult,
    SnapshotPathResult,
    SnapshotTagParams,
)
from stockade.sandbox import AsyncCommandHandle, AsyncSandbox
from stockade.sandbox.remote import connect_control
from stockade.state import StateStore

__all__ = ["connect_control", "main", "serve"]

logger = logging.getLogger(__name__)

#: Agent methods relayed to the agent as they are (``process.start`` is served below).
_RELAYED_PREFIXES = ("process.", "fs.", "transfer.")

_Handler = Callable[[AsyncSandbox, Any], Awaitable[BaseModel]]


async def _sandbox_info(sandbox: AsyncSandbox, _: Empty) -> SandboxInfoResult:
    return SandboxInfoResult(
        name=sandbox.name,
        id=sandbox.id,
        backend=sandbox.backend,
        pid=os.getpid(),
        policy_hash=sandbox.policy.policy_hash,
        agent=sandbox.agent_info,
    )


async def _workspace_reset(sandbox: AsyncSandbox, _: Empty) -> Empty:
    await sandbox.workspace.reset()
    return Empty()


async def _workspace_sync(sandbox: AsyncSandbox, _: Empty) -> Empty:
    await sandbox.workspace.sync()
    return Empty()


async def _net_allow(sandbox: AsyncSandbox, params: NetChangeParams) -> Empty:
    await sandbox.network.allow(params.entry)
    return Empty()


async def _net_deny(sandbox: AsyncSandbox, params: NetChangeParams) -> Empty:
    await sandbox.network.deny(params.entry)
    return Empty()


async def _net_log(sandbox: AsyncSandbox, _: Empty) -> NetLogResult:
    return NetLogResult(connections=await sandbox.network.log())


async def _snapshot_take(sandbox: AsyncSandbox, params: SnapshotTagParams) -> SnapshotPathResult:
    return SnapshotPathResult(path=str(await sandbox.snapshot(params.tag)))


async def _snapshot_restore(sandbox: AsyncSandbox, params: SnapshotTagParams) -> Empty:
    await sandbox.restore(params.tag)
    return Empty()


async def _snapshot_list(sandbox: AsyncSandbox, _: Empty) -> SnapshotListResult:
    return SnapshotListResult(snapshots=await sandbox.snapshots())


#: control method -> handler (``sandbox.stop`` is the connection's own: it answers first)
HANDLERS: dict[str, _Handler] = {
    "sandbox.info": _sandbox_info,
    "workspace.reset": _workspace_reset,
    "workspace.sync": _workspace_sync,
    "net.allow": _net_allow,
    "net.deny": _net_deny,
    "net.log": _net_log,
    "snapshot.take": _snapshot_take,
    "snapshot.restore": _snapshot_restore,
    "snapshot.list": _snapshot_list,
}
assert set(HANDLERS) | {"sandbox.stop"} == set(CONTROL_METHODS)


def _params(method: str, model: type[BaseModel], params: dict[str, Any]) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise AgentError(f"invalid params for {method}: {exc}", code=-32602) from exc


def _exit_params(proc: int, result: CommandResult) -> ProcessExitParams:
    killed = result.signal is not None and result.exit_code == 128 + result.signal
    return ProcessExitParams(
        proc=proc,
        exit_code=None if killed else result.exit_code,
        signal=result.signal,
        timed_out=result.timed_out,
    )


class _Connection:
    def __init__(self, sandbox: AsyncSandbox, stream: SocketStream, stop: anyio.Event) -> None:
        self.sandbox = sandbox
        self.stream = stream
        self.stop = stop
        self.out_send, self.out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._writing = False
        self._watchers: TaskGroup | None = None

    def push(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.out_send.send_nowait(encode_frame(message))

    async def flushed(self, timeout: float = 2.0) -> None:
        """Wait until queued frames reached the socket (before the supervisor exits)."""
        with anyio.move_on_after(timeout):
            while self.out_send.statistics().current_buffer_used or self._writing:
                await anyio.sleep(0.005)

    async def writer(self) -> None:
        async with self.out_recv:
            async for frame in self.out_recv:
                self._writing = True
                try:
                    await self.stream.send(frame)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return
                finally:
                    self._writing = False

    async def run(self) -> None:
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        # Requests in flight finish even when their client goes (a reset must not stop
        # half-way); watching this client's processes stops with it (they run on).
        async with anyio.create_task_group() as tg, anyio.create_task_group() as watchers:
            self._watchers = watchers
            tg.start_soon(self.writer)
            try:
                while True:
                    try:
                        data = await self.stream.receive(65536)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        break
                    try:
                        messages = decoder.feed(data)
                    except AgentProtocolError as exc:
                        logger.warning("control client sent a bad frame: %s", exc)
                        break
                    for message in messages:
                        tg.start_soon(self.handle, message)
            finally:
                self._watchers = None
                self.out_send.close()
                await self.stream.aclose()
                watchers.cancel_scope.cancel()

    async def handle(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        method = message.get("method")
        params = message.get("params") or {}
        if not isinstance(method, str) or not isinstance(params, dict):
            self.push(_error(request_id, -32600, "invalid request"))
            return
        try:
            result = await self.dispatch(request_id, method, params)
        except AgentError as exc:
            # The client names the method itself: do not name it twice.
            text = str(exc).removeprefix(f"{method}: ")
            self.push(_error(request_id, exc.code or -32603, text, exc.data))
        except StockadeError as exc:  # its kind, for the client's fixed table (remote.py)
            self.push(_error(request_id, -32603, str(exc), {"error": type(exc).__name__}))
        except Exception as exc:  # process edge: never let one request kill the supervisor
            logger.exception("control request %s failed", method)
            self.push(_error(request_id, -32603, f"{type(exc).__name__}: {exc}"))
        else:
            if result is not None:
                self.push(_answer(request_id, result))

    async def dispatch(
        self, request_id: Any, method: str, params: dict[str, Any]
    ) -> BaseModel | None:
        """Serve one request; None means the answer was already sent."""
        sandbox = self.sandbox
        if method == "agent.hello":  # the agent's own handshake, made when it started
            if sandbox.agent_info is None or not sandbox.is_running():
                raise AgentError(f"sandbox {sandbox.name!r} is not running", code=-32603)
            return sandbox.agent_info
        if method == "sandbox.stop":
            self.push(_answer(request_id, Empty()))
            await self.flushed()
            self.stop.set()
            return None
        control = CONTROL_METHODS.get(method)
        if control is not None:
            return await HANDLERS[method](sandbox, _params(method, control[0], params))
        if method == "process.start":
            await self.start_process(request_id, _params(method, ProcessStartParams, params))
            return None
        if method in METHODS and method.startswith(_RELAYED_PREFIXES):
            return await sandbox.call_agent(method, _params(method, METHODS[method][0], params))
        raise AgentError(f"method not found: {method}", code=-32601)

    async def start_process(self, request_id: Any, start: ProcessStartParams) -> None:
        """Start a process; its output and exit go to this connection, after the answer."""
        early: list[tuple[str, bytes]] | None = []  # output read before the answer is sent
        proc = -1

        def forward(stream: str) -> Callable[[bytes], None]:
            def on_output(chunk: bytes) -> None:
                if early is not None:
                    early.append((stream, chunk))
                else:
                    payload = {"proc": proc, "stream": stream, "data": _b64(chunk)}
                    self.push(_notification("process.output", payload))

            return on_output

        cmd: str | list[str] = start.shell if start.shell is not None else list(start.argv or [])
        handle = await self.sandbox.commands.start(
            cmd,
            env=start.env,
            cwd=start.cwd,
            timeout=start.timeout,
            keep_stdin=start.stdin,
            on_stdout=forward("stdout"),
            on_stderr=forward("stderr"),
            pty=start.pty,
        )
        proc = handle.proc
        self.push(_answer(request_id, ProcessStartResult(proc=proc, pid=handle.pid)))
        pending = early or []
        early = None
        for stream, chunk in pending:
            payload = {"proc": proc, "stream": stream, "data": _b64(chunk)}
            self.push(_notification("process.output", payload))
        if self._watchers is not None:  # else the client is gone: nobody to tell
            self._watchers.start_soon(self.report_exit, handle)

    async def report_exit(self, handle: AsyncCommandHandle) -> None:
        try:
            result = await handle.wait()
        except ExecTimeoutError as exc:
            if exc.result is None:
                return
            result = exc.result
        except StockadeError as exc:  # the sandbox is gone: the client's call says so
            logger.info("process %d of the control socket: %s", handle.proc, exc)
            return
        exit_params = _exit_params(handle.proc, result)
        self.push(_notification("process.exit", exit_params.model_dump(mode="json")))


def _answer(request_id: Any, result: BaseModel) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result.model_dump(mode="json")}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


async def serve(sandbox: AsyncSandbox, socket_path: Path, ready: Any = None) -> None:
    """Serve the control socket until ``sandbox.stop`` or the sandbox ends; then tear down."""
    stop = anyio.Event()
    if socket_path.exists():
        socket_path.unlink()
    listener = await anyio.create_unix_listener(str(socket_path), mode=0o600)
    store = StateStore(socket_path.parents[2])  # <state>/sandboxes/<id>/control.sock
    try:
        store.update(sandbox.name, control_socket=str(socket_path))
    finally:
        store.close()

    async def handle(stream: SocketStream) -> None:
        await _Connection(sandbox, stream, stop).run()

    async def watch_sandbox() -> None:
        # Reads the agent continuously, so notifications flow to connections even when no
        # call is pending; returns when the sandbox dies or its timeout expires.
        await sandbox.wait_until_ended()
        stop.set()

    async def watch_signals() -> None:
        # SIGTERM / SIGINT / SIGHUP: stop the sandbox in order, as `stockade stop` would.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                logger.info("received signal %d; stopping the sandbox", signum)
                stop.set()
                return

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            tg.start_soon(watch_sandbox)
            tg.start_soon(watch_signals)
            if ready is not None:
                ready()
            await stop.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()
            await sandbox.aclose()  # failed, with the reason, if it ended by itself
            socket_path.unlink(missing_ok=True)


async def _amain(spec: dict[str, Any]) -> int:
    from stockade.policy import EffectivePolicy

    policy = EffectivePolicy.from_json(spec["policy"])
    backend = None
    if spec.get("resume"):  # fork: start from a snapshot of another sandbox
        from stockade.backends.microvm.snapshots import resuming_backend

        backend = resuming_backend(Path(spec["resume"]))
    try:
        sandbox = await AsyncSandbox.start(
            policy,
            backend=backend,
            name=spec["name"],
            keep=True,
            state_dir=spec.get("state_dir"),
            actor="supervisor",
        )
    except StockadeError as exc:
        print(json.dumps({"ok": False, "error": str(exc), "type": type(exc).__name__}), flush=True)
        return 1

    def ready() -> None:
        print(json.dumps({"ok": True, "name": sandbox.name, "id": sandbox.id}), flush=True)
        sys.stdout.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

    await serve(sandbox, sandbox.state_dir / "control.sock", ready)
    return 0


def main() -> None:
    """Entry point: ``python -m stockade.supervisor`` with a JSON spec on stdin."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = json.loads(sys.stdin.read())
    sys.stdin.close()
    raise SystemExit(anyio.run(_amain, spec))


if __name__ == "__main__":
    main()
