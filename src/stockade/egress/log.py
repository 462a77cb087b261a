"""What the egress proxy did with each connection: one record per connection, kept in a ring.

Records carry the destination, the decision and byte counts, never request bodies, header
values or URL paths and query strings; the lead turns them into audit events and ``net log``.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEFAULT_LOG_SIZE",
    "ConnectionDecision",
    "ConnectionKind",
    "ConnectionLog",
    "ConnectionRecord",
    "RelayCounters",
]

#: How many records a proxy keeps by default; older ones fall off the front.
DEFAULT_LOG_SIZE = 10_000

ConnectionKind = Literal["http", "connect", "socks5", "forward", "direct"]
ConnectionDecision = Literal["allowed", "denied", "error"]


@dataclass
class RelayCounters:
    """Bytes relayed so far: ``bytes_up`` towards the destination, ``bytes_down`` back."""

    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """One connection through the egress proxy, written when it ends (denials at once)."""

    time: float
    """Wall-clock start of the connection, seconds since the epoch."""
    sandbox: str
    kind: ConnectionKind
    """'http' (absolute-URI request), 'connect' (HTTP CONNECT), 'socks5', 'forward' (raw TCP)
    or 'direct' (a connection that bypassed the proxy; refused inside the sandbox)."""
    host: str
    """Destination as the client named it ("" when the request could not be parsed)."""
    port: int
    addresses: tuple[str, ...]
    """Addresses the name resolved to and the decision was checked against."""
    decision: ConnectionDecision
    """'allowed' and 'denied' come from the policy; 'error' means a bad request, a full
    proxy or an unreachable destination."""
    rule: str | None
    """The policy rule that decided, when one did."""
    reason: str
    bytes_up: int
    """Bytes sent to the destination (for 'http', the rewritten request head included)."""
    bytes_down: int
    """Bytes received from the destination."""
    duration: float
    """Seconds from accepting the connection to closing it."""
    peer: str = ""
    """The client's address inside the sandbox, as the guest agent reported it."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (addresses as a list)."""
        data = dataclasses.asdict(self)
        data["addresses"] = list(self.addresses)
        return data


class ConnectionLog:
    """The last ``maxlen`` connection records of one proxy, oldest first."""

    def __init__(self, maxlen: int = DEFAULT_LOG_SIZE) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be at least 1, got {maxlen}")
        self._records: deque[ConnectionRecord] = deque(maxlen=maxlen)

    @property
    def maxlen(self) -> int:
        return self._records.maxlen or 0

    def append(self, record: ConnectionRecord) -> None:
        self._records.append(record)

    def records(self) -> list[ConnectionRecord]:
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[ConnectionRecord]:
        return iter(list(self._records))
