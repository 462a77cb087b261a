"""Tasks that outlive the call that started them (a sandbox's agent reader, egress handlers).

``await AsyncSandbox.create()`` returns a sandbox without a surrounding task group, yet an
egress-enabled sandbox must keep reading its agent and serve tunnelled connections between
calls. anyio has no detached tasks, so this spawns them on the running event loop directly
(asyncio's ``create_task``, trio's system nursery) and cancels them on ``aclose``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sniffio

__all__ = ["BackgroundTasks"]

logger = logging.getLogger(__name__)


class BackgroundTasks:
    """A set of detached tasks with an explicit, awaited shutdown."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._scopes: set[anyio.CancelScope] = set()
        self._running = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._closed = False

    def start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background; exceptions are logged, never lost silently."""
        if self._closed:
            raise RuntimeError(f"background tasks of {self._name} are closed")
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        self._running += 1
        if self._running == 1:
            self._idle = anyio.Event()

        async def runner() -> None:
            try:
                with scope:
                    await fn(*args)
            except Exception:
                logger.exception("background task of %s failed", self._name)
            finally:
                self._scopes.discard(scope)
                self._running -= 1
                if self._running == 0:
                    self._idle.set()

        library = sniffio.current_async_library()
        if library == "asyncio":
            import asyncio

            asyncio.get_running_loop().create_task(runner())
        elif library == "trio":
            import trio

            trio.lowlevel.spawn_system_task(runner)
        else:  # pragma: no cover - anyio supports only these two
            raise RuntimeError(f"unsupported async library {library!r}")

    async def aclose(self) -> None:
        """Cancel every task and wait until all have finished."""
        self._closed = True
        for scope in list(self._scopes):
            scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._idle.wait()
