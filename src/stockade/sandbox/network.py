"""``sandbox.network``: the sandbox's egress policy, changed live, and its connection log."""

from __future__ import annotations

from typing import Any

from stockade.sandbox.ports import NetworkPort

__all__ = ["AsyncNetwork"]


class AsyncNetwork:
    """``sandbox.network``: change the egress policy live and see every connection."""

    def __init__(self, sandbox: NetworkPort) -> None:
        self._sandbox = sandbox

    async def allow(self, entry: str) -> None:
        """Allow a host, wildcard, address or CIDR (optionally :port) from now on."""
        await self._sandbox._net_change("allow", entry)

    async def deny(self, entry: str) -> None:
        """Deny a host, wildcard, address or CIDR from now on (deny wins over allow)."""
        await self._sandbox._net_change("deny", entry)

    async def log(self) -> list[dict[str, Any]]:
        """Every connection so far: time, host, port, decision, rule, reason, bytes."""
        return await self._sandbox._net_log()
