"""``sandbox.workspace``: review, apply and reset what the sandbox changed in its
copy-on-write workspace (on the host layers)."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from stockade._errors import SandboxStateError
from stockade.sandbox.ports import WorkspacePort
from stockade.workspace import ApplyResult, ConflictMode, WorkspaceDiff, WorkspaceLayers

__all__ = ["AsyncWorkspace"]


class AsyncWorkspace:
    """``sandbox.workspace``: review and apply what the sandbox changed."""

    def __init__(self, sandbox: WorkspacePort) -> None:
        self._sandbox = sandbox

    def _layers(self) -> WorkspaceLayers:
        layers = self._sandbox._layers
        if layers is None:
            raise SandboxStateError(
                f"sandbox {self._sandbox.name!r} has no copy-on-write workspace "
                f"(workspace.mode = {self._sandbox.policy.workspace.mode!r})"
            )
        return layers

    async def diff(
        self, paths: Sequence[str] | None = None, *, include_ignored: bool = False
    ) -> WorkspaceDiff:
        """What the sandbox changed since it started (against the recorded baseline): files
        added, modified or deleted, as a git patch, and the commits the agent made.

        ``paths`` keeps changes at or below those project-relative paths; paths ignored by
        ``.gitignore`` are left out (counted in ``ignored_paths``) unless ``include_ignored``.
        """
        from stockade.workspace import compute_diff

        layers = self._layers()
        await self._sandbox._sync_workspace()
        result = await anyio.to_thread.run_sync(
            lambda: compute_diff(
                layers,
                protected=self._sandbox.policy.workspace.protected,
                paths=paths,
                include_ignored=include_ignored,
            )
        )
        self._sandbox._audit("workspace.diffed", details={"summary": result.summary()})
        return result

    async def apply(
        self,
        paths: Sequence[str] | None = None,
        *,
        force: bool = False,
        conflicts: ConflictMode = "skip",
        include_ignored: bool = False,
    ) -> ApplyResult:
        """Write the sandbox's changes to the host, judged by content against what the
        sandbox started from: text changed on both sides is merged; a real conflict is left
        unapplied (``conflicts="skip"``) or written with conflict markers
        (``conflicts="markers"``); ``force=True`` overwrites the host's version. Files that
        configure host tools and symlinks leaving the project apply only when named in
        ``paths``. The agent's commits become branch ``stockade/NAME``. Paths .gitignore
        leaves out are applied only with ``include_ignored=True``."""
        from stockade.workspace import apply_diff

        layers = self._layers()
        await self._sandbox._sync_workspace()
        result = await anyio.to_thread.run_sync(
            lambda: apply_diff(
                layers,
                paths=paths,
                protected=self._sandbox.policy.workspace.protected,
                force=force,
                conflicts=conflicts,
                branch=f"stockade/{self._sandbox.name}",
                include_ignored=include_ignored,
            )
        )
        self._sandbox._audit("workspace.applied", details=result.audit_details())
        return result

    async def reset(self) -> None:
        """Discard every change; a running sandbox is restarted on a clean workspace."""
        await self._sandbox._reset_workspace()

    async def sync(self) -> None:
        """Bring the writes of a sandbox that keeps them inside it (a microVM) to the host
        layers now (``diff`` and ``apply`` do it themselves)."""
        await self._sandbox._sync_workspace()
