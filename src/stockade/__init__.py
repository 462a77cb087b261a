"""stockade: a local-first sandbox runtime for AI agents.

``Sandbox`` / ``AsyncSandbox`` run commands in the strongest isolation this machine runs
fast, with a copy-on-write workspace, no network, and an audit log. See README.md.
"""

from stockade._errors import (
    AgentError,
    AgentProtocolError,
    BackendUnavailableError,
    CommandFailedError,
    ConfigError,
    ExecTimeoutError,
    PolicyError,
    SandboxFileExistsError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
    SandboxPermissionError,
    SandboxStartError,
    SandboxStateError,
    StockadeError,
    WorkspaceConflictError,
    WorkspaceError,
)
from stockade._results import CommandResult
from stockade.sandbox import AsyncCommandHandle, AsyncSandbox
from stockade.sync import CommandHandle, Sandbox

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "AgentProtocolError",
    "AsyncCommandHandle",
    "AsyncSandbox",
    "BackendUnavailableError",
    "CommandFailedError",
    "CommandHandle",
    "CommandResult",
    "ConfigError",
    "ExecTimeoutError",
    "PolicyError",
    "Sandbox",
    "SandboxFileExistsError",
    "SandboxFileNotFoundError",
    "SandboxNotFoundError",
    "SandboxPermissionError",
    "SandboxStartError",
    "SandboxStateError",
    "StockadeError",
    "WorkspaceConflictError",
    "WorkspaceError",
    "__version__",
]
