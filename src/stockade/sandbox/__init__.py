"""One sandbox, whatever the backend: run in this process (``core``) or reached in the
process that runs it (``remote``), driven through the same namespaces."""

from stockade.sandbox.core import (
    AsyncCommandHandle,
    AsyncCommands,
    AsyncFiles,
    AsyncNetwork,
    AsyncPty,
    AsyncSandbox,
    AsyncWorkspace,
    OutputHandler,
    SandboxInfo,
    audit_path,
    find_record,
)

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncNetwork",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncWorkspace",
    "OutputHandler",
    "SandboxInfo",
    "audit_path",
    "find_record",
]
