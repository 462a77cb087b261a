"""The public API is exactly ``stockade.__all__``, and the sync facade mirrors the async core."""

from __future__ import annotations

import inspect

import stockade

EXPECTED_ALL = {
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
}


def test_all_is_guarded() -> None:
    assert set(stockade.__all__) == EXPECTED_ALL
    for name in stockade.__all__:
        assert getattr(stockade, name) is not None


def test_errors_branch_from_one_root() -> None:
    for name in stockade.__all__:
        obj = getattr(stockade, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, stockade.StockadeError), name
    assert issubclass(stockade.ExecTimeoutError, TimeoutError)
    assert issubclass(stockade.SandboxFileNotFoundError, FileNotFoundError)


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    out = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        if inspect.isfunction(member) or inspect.ismethod(member):
            out[name] = inspect.signature(member)
    return out


def _params(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


PAIRS = [
    ("stockade.sandbox:AsyncSandbox", "stockade.sync:Sandbox"),
    ("stockade.sandbox:AsyncCommands", "stockade.sync:Commands"),
    ("stockade.sandbox:AsyncFiles", "stockade.sync:Files"),
    ("stockade.sandbox:AsyncPty", "stockade.sync:Pty"),
    ("stockade.sandbox:AsyncWorkspace", "stockade.sync:Workspace"),
    ("stockade.sandbox:AsyncCommandHandle", "stockade.sync:CommandHandle"),
    ("stockade.sandbox:AsyncNetwork", "stockade.sync:Network"),
]


def _load(path: str) -> type:
    import importlib

    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type)
    return cls


def test_sync_and_async_signatures_match() -> None:
    for async_path, sync_path in PAIRS:
        async_methods = _public_methods(_load(async_path))
        sync_methods = _public_methods(_load(sync_path))
        # Only the close pair differs by name (DESIGN/STYLE: aclose vs close).
        if "aclose" in async_methods:
            assert "close" in sync_methods
            async_methods.pop("aclose")
            sync_methods.pop("close")
        assert set(async_methods) == set(sync_methods), (async_path, sync_path)
        for name, sig in async_methods.items():
            assert _params(sig) == _params(sync_methods[name]), (sync_path, name)


def test_async_methods_are_coroutines() -> None:
    for async_path, _ in PAIRS:
        for name, member in inspect.getmembers(_load(async_path)):
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            if name in ("is_running", "resource_events"):
                continue
            assert inspect.iscoroutinefunction(member), (async_path, name)
