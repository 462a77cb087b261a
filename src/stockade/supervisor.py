"""Per-sandbox supervisor: keeps a sandbox alive after the CLI call that created it.

It runs the sandbox in-process (``AsyncSandbox``) and serves a unix control socket in the
sandbox's state directory with the same framing and JSON-RPC as the guest agent. Agent
methods (``process.*``, ``fs.*``, ``transfer.*``) are forwarded to the agent, with the
process notifications routed back to the connection that started the process; ``sandbox.*``
and ``workspace.reset`` are served here. If the supervisor dies (even ``kill -9``), bwrap's
die-with-parent takes the sandbox with it, and ``stockade ls`` reports it as failed.
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
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketStream

from stockade._errors import AgentError, AgentProtocolError, StockadeError
from stockade.agent.client import AgentClient
from stockade.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from stockade.protocol.messages import ProcessExitParams, ProcessStartParams
from stockade.sandbox import AsyncSandbox
from stockade.state import SandboxStatus

__all__ = ["CONTROL_METHODS", "connect_control", "main", "serve"]

logger = logging.getLogger(__name__)

#: Methods the supervisor answers itself (the rest are forwarded to the agent).
CONTROL_METHODS = (
    "sandbox.info",
    "sandbox.stop",
    "workspace.reset",
    "agent.hello",
    "net.allow",
    "net.deny",
    "net.log",
)
_FORWARDED_PREFIXES = ("process.", "fs.", "transfer.")


async def connect_control(socket_path: str | Path) -> AgentClient:
    """Open a client to a supervisor's control socket (same protocol as the agent)."""
    stream: ByteStream = await anyio.connect_unix(str(socket_path))
    client = AgentClient(stream, peer="sandbox supervisor", validate_methods=False)
    return client


class _Connection:
    def __init__(self, sandbox: AsyncSandbox, stream: SocketStream, stop: anyio.Event) -> None:
        self.sandbox = sandbox
        self.stream = stream
        self.stop = stop
        self.out_send, self.out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._writing = False

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
        async with anyio.create_task_group() as tg:
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
                self.out_send.close()
                await self.stream.aclose()

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
            self.push(_error(request_id, exc.code or -32603, str(exc), exc.data))
        except StockadeError as exc:
            self.push(_error(request_id, -32603, str(exc)))
        except Exception as exc:  # process edge: never let one request kill the supervisor
            logger.exception("control request %s failed", method)
            self.push(_error(request_id, -32603, f"{type(exc).__name__}: {exc}"))
        else:
            if result is not None:
                self.push({"jsonrpc": "2.0", "id": request_id, "result": result})

    async def dispatch(
        self, request_id: Any, method: str, params: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Serve one request; None means the answer was already sent."""
        sandbox = self.sandbox
        client = sandbox._require_client()
        if method == "agent.hello":
            assert sandbox.agent_info is not None
            return sandbox.agent_info.model_dump(mode="json")
        if method == "sandbox.info":
            return {
                "name": sandbox.name,
                "id": sandbox.id,
                "backend": sandbox.backend,
                "pid": os.getpid(),
                "policy_hash": sandbox.policy.policy_hash,
                "agent": sandbox.agent_info.model_dump(mode="json") if sandbox.agent_info else {},
            }
        if method == "sandbox.stop":
            self.push({"jsonrpc": "2.0", "id": request_id, "result": {}})
            await self.flushed()
            self.stop.set()
            return None
        if method == "workspace.reset":
            await sandbox.workspace.reset()
            return {}
        if method == "workspace.sync":
            await sandbox._sync_workspace()
            return {}
        if method.startswith("snapshot."):
            from stockade.backends.microvm.snapshots import handle_control

            result: dict[str, Any] = await handle_control(sandbox, method, params)
            return result
        if method in ("net.allow", "net.deny"):
            entry = params.get("entry")
            if not isinstance(entry, str) or not entry:
                raise AgentError("params.entry must be a host, address or CIDR", code=-32602)
            if method == "net.allow":
                await sandbox.network.allow(entry)
            else:
                await sandbox.network.deny(entry)
            return {}
        if method == "net.log":
            return {"connections": await sandbox.network.log()}
        if method == "process.start":
            start = ProcessStartParams.model_validate(params)

            def register(result: dict[str, Any]) -> None:
                # Runs while the answer is dispatched, before any output of the process.
                proc = result.get("proc")
                if not isinstance(proc, int):
                    raise AgentProtocolError("agent returned an invalid process handle")

                def on_output(stream: str, chunk: bytes) -> None:
                    payload = {"proc": proc, "stream": stream, "data": _b64(chunk)}
                    self.push(_notification("process.output", payload))

                def on_exit(ev: ProcessExitParams) -> None:
                    client.forget_process(proc)
                    self.push(_notification("process.exit", ev.model_dump(mode="json")))

                client.watch_process(proc, on_output=on_output, on_exit=on_exit)
                # Answer now, so the client learns the handle before the process's output.
                self.push({"jsonrpc": "2.0", "id": request_id, "result": result})

            result = await client.call_raw(
                "process.start",
                start.model_dump(mode="json", exclude_none=True),
                on_result=register,
            )
            sandbox._audit(
                "process.started",
                target=(start.shell or " ".join(start.argv or []))[:1000],
                details={"pid": result.get("pid"), "via": "control socket"},
            )
            return None
        if method.startswith(_FORWARDED_PREFIXES):
            return await client.call_raw(method, params)
        raise AgentError(f"method not found: {method}", code=-32601)


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
    sandbox._store.update(sandbox.name, control_socket=str(socket_path))
    sandbox._require_client()

    async def handle(stream: SocketStream) -> None:
        await _Connection(sandbox, stream, stop).run()

    async def watch_agent() -> None:
        # The supervisor reads the agent continuously so notifications flow to connections
        # even when no call is pending; it ends when the sandbox dies or times out.
        while not stop.is_set():
            current = sandbox._client
            if current is None:
                await anyio.sleep(0.05)
                continue
            await current.serve_forever()
            if sandbox._client is current:  # not a reset's restart: the sandbox is gone
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
            tg.start_soon(watch_agent)
            tg.start_soon(watch_signals)
            if ready is not None:
                ready()
            await stop.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()
            died = not sandbox.is_running()
            if died:
                events = sandbox.resource_events()
                reason = "the sandbox stopped unexpectedly"
                if sandbox.policy.limits.timeout:
                    reason += f" (its timeout is {sandbox.policy.limits.timeout:g}s)"
                if events:
                    reason += f"; limits hit: {events}"
                await sandbox._teardown(status=SandboxStatus.FAILED, error=reason)
            else:
                await sandbox.aclose()
            socket_path.unlink(missing_ok=True)


async def _amain(spec: dict[str, Any]) -> int:
    from stockade.backends.registry import select_backend
    from stockade.policy import EffectivePolicy

    policy = EffectivePolicy.from_json(spec["policy"])
    backend = select_backend(policy)
    if spec.get("resume"):  # fork: start from a snapshot of another sandbox
        from stockade.backends.microvm.snapshots import resuming_backend

        backend = resuming_backend(Path(spec["resume"]))
    try:
        sandbox = await AsyncSandbox._start_new(
            policy,
            backend,
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
