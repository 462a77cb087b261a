"""One sandbox, whatever the backend: run in this process (``core``) or reached in the
process that runs it (``remote``), driven through the same namespaces."""

from stockade.sandbox.commands import AsyncCommandHandle, AsyncCommands, AsyncPty, OutputHandler
from stockade.sandbox.core import AsyncSandbox
from stockade.sandbox.files import AsyncFiles
from stockade.sandbox.network import AsyncNetwork
from stockade.sandbox.records import SandboxInfo, audit_path, find_record
from stockade.sandbox.workspace import AsyncWorkspace

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
