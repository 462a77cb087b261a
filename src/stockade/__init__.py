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
    DiskFullError,
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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from stockade.sandbox import AsyncCommandHandle, AsyncSandbox, SandboxInfo
    from stockade.sync import CommandHandle, Sandbox

# The sandbox classes pull in anyio and pydantic; load them on first use so that
# `import stockade` (and the CLI's fast paths) stay cheap.
_LAZY = {
    "AsyncSandbox": "stockade.sandbox",
    "AsyncCommandHandle": "stockade.sandbox",
    "SandboxInfo": "stockade.sandbox",
    "Sandbox": "stockade.sync",
    "CommandHandle": "stockade.sync",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stockade' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
    "DiskFullError",
    "ExecTimeoutError",
    "PolicyError",
    "Sandbox",
    "SandboxFileExistsError",
    "SandboxFileNotFoundError",
    "SandboxInfo",
    "SandboxNotFoundError",
    "SandboxPermissionError",
    "SandboxStartError",
    "SandboxStateError",
    "StockadeError",
    "WorkspaceConflictError",
    "WorkspaceError",
    "__version__",
]
