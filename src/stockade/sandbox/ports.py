"""What each namespace needs of its sandbox: a narrow port, a few members only.

A sandbox run in this process (``core.AsyncSandbox``) implements them with its backend and
agent; a connected one (``remote.RemoteSandbox``) with calls to its supervisor. The members
are private to the package: users reach them through the namespaces.
"""

from __future__ import annotations

import base64
import builtins
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from stockade.agent.client import AgentClient
from stockade.policy import EffectivePolicy
from stockade.workspace import WorkspaceLayers

__all__ = ["FILE_CHUNK", "AgentPort", "CommandsPort", "NetworkPort", "WorkspacePort", "b64"]

#: Bytes per call that carries data (fs.write, fs.read, stdin), well under the frame limit
#: once base64-encoded.
FILE_CHUNK = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Audited(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def policy(self) -> EffectivePolicy: ...

    def _audit(
        self, action: str, *, target: str | None = None, details: dict[str, Any] | None = None
    ) -> None: ...


class AgentPort(_Audited, Protocol):
    """``files``: calls to the sandbox's agent."""

    async def _call(self, method: str, params: BaseModel) -> Any: ...


class CommandsPort(AgentPort, Protocol):
    """``commands``, its handles and ``pty``: the agent client itself (processes stream
    their output as notifications) and the sandbox's account of a lost connection."""

    def _require_client(self) -> AgentClient: ...

    def _explained(self) -> AbstractContextManager[None]: ...


class WorkspacePort(_Audited, Protocol):
    """``workspace``: the host layers, brought up to date first where the sandbox keeps
    its writes inside it."""

    @property
    def _layers(self) -> WorkspaceLayers | None: ...

    async def _sync_workspace(self) -> None: ...

    async def _reset_workspace(self) -> None: ...


class NetworkPort(Protocol):
    """``network``: the sandbox's egress policy and its connection log."""

    async def _net_change(self, verb: Literal["allow", "deny"], entry: str) -> None: ...

    async def _net_log(self) -> builtins.list[dict[str, Any]]: ...
