"""Exception tree of stockade, branched by what the caller can do about it.

StockadeError
├── ConfigError                  fix the configuration file, flag or environment
│   └── PolicyError              the policy asks for something unsafe or unenforceable
├── BackendUnavailableError      install / enable a backend, or choose another
├── SandboxStartError            the backend failed to start the sandbox
├── SandboxNotFoundError         no sandbox by that name
├── SandboxStateError            the sandbox is not in a state that allows this
├── DiskFullError                free space on that disk (e.g. remove sandboxes)
├── ExecTimeoutError (also TimeoutError)
├── CommandFailedError           non-zero exit with check=True; carries the result
├── AgentProtocolError           the guest agent broke the protocol; the connection is gone
├── AgentError                   the guest agent refused or failed a call
│   ├── SandboxFileNotFoundError (also FileNotFoundError)
│   ├── SandboxPermissionError   (also PermissionError)
│   └── SandboxFileExistsError   (also FileExistsError)
└── WorkspaceError
    └── WorkspaceConflictError   the host file changed since the sandbox started
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stockade._results import CommandResult

__all__ = [
    "AgentError",
    "AgentProtocolError",
    "BackendUnavailableError",
    "CommandFailedError",
    "ConfigError",
    "DiskFullError",
    "ExecTimeoutError",
    "PolicyError",
    "SandboxFileExistsError",
    "SandboxFileNotFoundError",
    "SandboxNotFoundError",
    "SandboxPermissionError",
    "SandboxStartError",
    "SandboxStateError",
    "StockadeError",
    "WorkspaceConflictError",
    "WorkspaceError",
]


class StockadeError(Exception):
    """Root of every error stockade raises on purpose."""


class ConfigError(StockadeError):
    """The configuration (file, flag, environment or argument) is invalid."""


class PolicyError(ConfigError):
    """The policy asks for something unsafe, or something the chosen backend cannot enforce."""


class BackendUnavailableError(StockadeError):
    """The requested isolation backend cannot run on this machine."""

    def __init__(self, message: str, *, backend: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.backend = backend
        self.fix = fix


class SandboxStartError(StockadeError):
    """The backend was available but the sandbox did not come up."""


class SandboxNotFoundError(StockadeError):
    """No sandbox with that name exists in the state directory."""


class SandboxStateError(StockadeError):
    """The sandbox is in a state that does not allow this operation."""


class DiskFullError(StockadeError):
    """A disk stockade writes to (its state directory) has no space left."""

    def __init__(self, message: str, *, path: str = "", free_bytes: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.free_bytes = free_bytes


class ExecTimeoutError(StockadeError, TimeoutError):
    """A command ran longer than its timeout and was killed."""

    def __init__(self, message: str, *, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class CommandFailedError(StockadeError):
    """A command exited non-zero and the caller asked for check=True."""

    def __init__(self, message: str, *, result: CommandResult) -> None:
        super().__init__(message)
        self.result = result


class AgentProtocolError(StockadeError):
    """The guest agent sent a malformed, oversized or unexpected frame.

    The guest is untrusted; after this error the connection is closed.
    """


class AgentError(StockadeError):
    """The guest agent answered a call with an error."""

    def __init__(self, message: str, *, code: int = 0, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data or {}


class SandboxFileNotFoundError(AgentError, FileNotFoundError):
    """A path inside the sandbox does not exist."""


class SandboxPermissionError(AgentError, PermissionError):
    """The sandbox refused access to a path."""


class SandboxFileExistsError(AgentError, FileExistsError):
    """A path inside the sandbox already exists."""


class WorkspaceError(StockadeError):
    """A workspace operation (diff, apply, reset) failed."""


class WorkspaceConflictError(WorkspaceError):
    """Applying would overwrite a host file that changed since the sandbox started."""

    def __init__(self, message: str, *, paths: list[str] | None = None) -> None:
        super().__init__(message)
        self.paths = paths or []
