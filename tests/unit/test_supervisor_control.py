"""The supervisor's control methods are typed messages: every one has a model pair in
``protocol.messages.CONTROL_METHODS`` and a handler, bad params are refused with
``invalid params`` before any handler runs, and ``ControlClient`` (the client side of
``Sandbox.connect``) sends and validates exactly those models. The supervisor's connection
code is the real one, over a real socket pair; the sandbox behind it is a recording fake
(these tests are about the method table, not about a sandbox)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from pydantic import ValidationError

from stockade._errors import AgentError, CommandFailedError, SandboxStateError
from stockade.agent.client import AgentClient
from stockade.protocol import schema
from stockade.protocol.messages import (
    CONTROL_METHODS,
    METHODS,
    Empty,
    NetChangeParams,
    NetLogResult,
    SandboxInfoResult,
    SnapshotPathResult,
    SnapshotTagParams,
)
from stockade.sandbox.remote import ControlClient
from stockade.supervisor import HANDLERS, _Connection

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeNamespace:
    def __init__(self, calls: list[tuple[str, Any]], prefix: str) -> None:
        self._calls = calls
        self._prefix = prefix

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def record(*args: Any) -> Any:
            self._calls.append((f"{self._prefix}.{name}", args))
            return [{"host": "example.com", "decision": "denied"}] if name == "log" else None

        return record


class FakeSandbox:
    """Records what the supervisor asks of its sandbox."""

    name = "fake"
    id = "0123456789abcdef"
    backend = "namespace"
    agent_info = None

    class policy:  # stands for the policy object
        policy_hash = "abc"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.network = FakeNamespace(self.calls, "network")
        self.workspace = FakeNamespace(self.calls, "workspace")

    def is_running(self) -> bool:
        return True

    async def snapshot(self, tag: str) -> Path:
        self.calls.append(("snapshot", (tag,)))
        return Path("/snapshots") / tag

    async def restore(self, tag: str) -> None:
        self.calls.append(("restore", (tag,)))
        if tag == "refused":
            raise SandboxStateError("snapshots of full VM state need backend='microvm'")
        if tag == "odd":
            raise CommandFailedError("not a kind the client re-raises", result=None)  # type: ignore[arg-type]

    async def snapshots(self) -> list[dict[str, Any]]:
        return [{"tag": "one"}]


async def with_supervisor(body: Callable[[ControlClient, FakeSandbox], Awaitable[None]]) -> None:
    a, b = socket.socketpair()
    sandbox = FakeSandbox()
    stop = anyio.Event()
    connection = _Connection(sandbox, await SocketStream.from_socket(b), stop)  # type: ignore[arg-type]
    client = ControlClient(
        AgentClient(await SocketStream.from_socket(a), peer="supervisor", validate_methods=False)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(connection.run)
        with anyio.fail_after(5):
            await body(client, sandbox)
        tg.cancel_scope.cancel()
    await client.aclose()


def test_every_control_method_has_models_a_handler_and_a_schema() -> None:
    assert set(HANDLERS) | {"sandbox.stop"} == set(CONTROL_METHODS)
    assert not set(CONTROL_METHODS) & set(METHODS)  # no name means two things
    documented = schema.protocol_schema()["control_methods"]
    assert set(documented) == set(CONTROL_METHODS)
    assert documented["net.allow"]["params"]["required"] == ["entry"]


def test_models_refuse_what_the_supervisor_must_not_get() -> None:
    with pytest.raises(ValidationError):
        NetChangeParams(entry="")
    with pytest.raises(ValidationError):
        SnapshotTagParams.model_validate({"tag": "t", "path": "/etc"})  # extra="forbid"
    with pytest.raises(ValidationError):
        Empty.model_validate({"anything": 1})


async def test_control_calls_reach_the_sandbox_typed() -> None:
    async def body(client: ControlClient, sandbox: FakeSandbox) -> None:
        assert await client.control("net.allow", NetChangeParams(entry="pypi.org")) == Empty()
        await client.control("net.deny", NetChangeParams(entry="10.0.0.0/8"))
        log = await client.control("net.log", Empty())
        assert isinstance(log, NetLogResult)
        assert log.connections == [{"host": "example.com", "decision": "denied"}]
        await client.control("workspace.sync", Empty())
        await client.control("workspace.reset", Empty())
        taken = await client.control("snapshot.take", SnapshotTagParams(tag="t1"))
        assert taken == SnapshotPathResult(path="/snapshots/t1")
        await client.control("snapshot.restore", SnapshotTagParams(tag="t1"))
        info = await client.control("sandbox.info", Empty())
        assert isinstance(info, SandboxInfoResult) and info.name == "fake"
        assert [name for name, _ in sandbox.calls] == [
            "network.allow",
            "network.deny",
            "network.log",
            "workspace.sync",
            "workspace.reset",
            "snapshot",
            "restore",
        ]
        assert sandbox.calls[0][1] == ("pypi.org",)

    await with_supervisor(body)


async def test_bad_params_and_unknown_methods_are_refused_before_any_handler() -> None:
    async def body(client: ControlClient, sandbox: FakeSandbox) -> None:
        with pytest.raises(AgentError) as bad:
            await client.agent.call_raw("net.allow", {"entry": 42})
        assert bad.value.code == -32602 and "invalid params for net.allow" in str(bad.value)
        with pytest.raises(AgentError) as extra:
            await client.agent.call_raw("snapshot.take", {"tag": "t", "force": True})
        assert extra.value.code == -32602
        with pytest.raises(AgentError) as unknown:
            await client.agent.call_raw("sandbox.configure", {})
        assert unknown.value.code == -32601
        with pytest.raises(AgentError) as shutdown:  # the agent's own: never relayed
            await client.agent.call_raw("agent.shutdown", {})
        assert shutdown.value.code == -32601
        assert sandbox.calls == []

    await with_supervisor(body)


async def test_the_client_sends_only_the_method_s_own_params_model() -> None:
    async def body(client: ControlClient, sandbox: FakeSandbox) -> None:
        with pytest.raises(TypeError, match=r"net\.allow takes NetChangeParams"):
            await client.control("net.allow", SnapshotTagParams(tag="x"))
        assert sandbox.calls == []

    await with_supervisor(body)


async def test_the_sandbox_s_errors_keep_their_kind_by_a_fixed_table() -> None:
    async def body(client: ControlClient, sandbox: FakeSandbox) -> None:
        with pytest.raises(SandboxStateError, match="need backend='microvm'") as refused:
            await client.control("snapshot.restore", SnapshotTagParams(tag="refused"))
        assert not str(refused.value).startswith("snapshot.restore:")
        with pytest.raises(AgentError, match="not a kind the client re-raises"):
            await client.control("snapshot.restore", SnapshotTagParams(tag="odd"))

    await with_supervisor(body)
