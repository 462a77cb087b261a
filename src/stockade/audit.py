"""Append-only, hash-chained JSONL audit log: one file per sandbox, kept outside the sandbox.

Each line is one event in canonical JSON (sorted keys, no spaces). ``hash`` is the SHA-256
of the event's canonical JSON without ``hash``; ``prev`` is the previous event's ``hash``
(64 zeros for the first), so editing, removing, reordering or inserting a line breaks the
chain at that line. A chain cannot show that events were cut off the end; keep the last
``(seq, hash)`` elsewhere (the state store) to detect that.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stockade._errors import ConfigError, SandboxStateError

__all__ = ["GENESIS", "AuditEvent", "AuditLog", "AuditVerification", "redact"]

GENESIS = "0" * 64

# Key fragments whose values never enter the audit log (secrets, environment, payloads).
_REDACT_FRAGMENTS = (
    "env",
    "secret",
    "token",
    "passw",
    "data",
    "content",
    "credential",
    "cookie",
    "auth",
    "apikey",
    "api_key",
    "private",
    "stdin",
    "stdout",
    "stderr",
)
_ACTION_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_ACTOR_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_FIELDS = (
    "seq",
    "time",
    "sandbox",
    "actor",
    "action",
    "target",
    "decision",
    "rule",
    "details",
    "prev",
    "hash",
)
_READ_BLOCK = 8192


@dataclass(frozen=True)
class AuditEvent:
    """One audit event, as stored."""

    seq: int
    time: str
    sandbox: str
    actor: str
    action: str
    target: str | None
    decision: str | None
    rule: str | None
    details: dict[str, Any] = field(default_factory=dict)
    prev: str = GENESIS
    hash: str = ""

    def to_json(self) -> str:
        """The canonical line (without the newline)."""
        return _canonical(asdict(self))


@dataclass(frozen=True)
class AuditVerification:
    """Result of checking a log's chain."""

    ok: bool
    events: int  # events that verified, in order from the first
    first_bad_seq: int | None  # 0-based position of the first line that does not verify
    reason: str


def _canonical(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _event_hash(event: Mapping[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def _redacted_key(key: str) -> bool:
    lowered = key.lower()
    return any(fragment in lowered for fragment in _REDACT_FRAGMENTS)


def _clean(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items() if not _redacted_key(str(k))}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_clean(v) for v in items]
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"  # payloads never enter the log
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # Path, enums and the like


def redact(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """Drop keys that may hold secrets or payloads, at any depth; make the rest JSON-safe.

    A key is dropped when its name contains any of: env, secret, token, passw, data,
    content, credential, cookie, auth, apikey, api_key, private, stdin, stdout, stderr.
    Byte strings are replaced by their length.
    """
    if not details:
        return {}
    cleaned = _clean(details)
    assert isinstance(cleaned, dict)
    return cleaned


def _parse_event(line: bytes) -> AuditEvent:
    obj = json.loads(line)
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        raise ValueError("fields differ from an audit event's")
    if not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool):
        raise ValueError("seq is not an integer")
    if not isinstance(obj["details"], dict):
        raise ValueError("details is not an object")
    for name in ("time", "sandbox", "actor", "action", "prev", "hash"):
        if not isinstance(obj[name], str):
            raise ValueError(f"{name} is not a string")
    for name in ("target", "decision", "rule"):
        if obj[name] is not None and not isinstance(obj[name], str):
            raise ValueError(f"{name} is neither a string nor null")
    return AuditEvent(**obj)


def _line_ending_at(fd: int, end: int) -> tuple[bytes, int]:
    """The line whose last byte is just before offset ``end``, and its start offset."""
    buf = b""
    pos = end
    while pos > 0:
        start = max(0, pos - _READ_BLOCK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        newline = buf.rfind(b"\n")
        if newline >= 0:
            return buf[newline + 1 :], pos + newline + 1
    return buf, 0


class AuditLog:
    """The audit log of one sandbox. Safe to append from several processes at once.

    Each append takes an exclusive ``flock`` on the file, reads the last event to continue
    ``seq`` and ``prev``, and writes one line with a single ``O_APPEND`` write.
    """

    def __init__(self, path: Path, sandbox: str, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.sandbox = sandbox
        self.fsync = fsync
        # (file size, last event) after this object's own last append: when the size is
        # unchanged under the lock, no other writer came in between and the tail need not
        # be re-read. Any other size means re-read, so the chain stays correct.
        self._tail: tuple[int, AuditEvent] | None = None
        self._dir_ready = False

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, sandbox={self.sandbox!r})"

    def append(
        self,
        action: str,
        *,
        actor: str = "host",
        target: str | None = None,
        decision: str | None = None,
        rule: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Append one event (details pass through ``redact``) and return it."""
        if not _ACTION_RE.match(action):
            raise ConfigError(
                f"invalid audit action {action!r}: use dotted lowercase words, e.g. "
                "'process.started'"
            )
        if not _ACTOR_RE.match(actor):
            raise ConfigError(f"invalid audit actor {actor!r}: use a short lowercase word")
        clean_details = redact(details)
        if not self._dir_ready:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._dir_ready = True
        fd = os.open(
            self.path,
            os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if self._tail is not None and self._tail[0] == size:
                last: AuditEvent | None = self._tail[1]
            else:
                last = self._last_event(fd)
            body: dict[str, Any] = {
                "seq": 0 if last is None else last.seq + 1,
                "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "sandbox": self.sandbox,
                "actor": actor,
                "action": action,
                "target": target,
                "decision": decision,
                "rule": rule,
                "details": clean_details,
                "prev": GENESIS if last is None else last.hash,
            }
            event = AuditEvent(**body, hash=_event_hash(body))
            data = (event.to_json() + "\n").encode()
            self._tail = None
            while data:
                written = os.write(fd, data)
                data = data[written:]
            if self.fsync:
                os.fsync(fd)
            self._tail = (os.fstat(fd).st_size, event)
            return event
        finally:
            os.close(fd)  # also releases the lock

    def _last_event(self, fd: int) -> AuditEvent | None:
        """The last complete event of the file (the caller holds the lock)."""
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        end = size - 1
        if os.pread(fd, 1, end) != b"\n":
            # A write was cut short (crash, full disk). Close that line so the next event
            # starts on its own; verify() reports the torn line. Continue the chain from
            # the complete event before it.
            os.write(fd, b"\n")
            _torn, start = _line_ending_at(fd, size)
            if start == 0:
                return None
            end = start - 1
        line, _start = _line_ending_at(fd, end)
        try:
            return _parse_event(line)
        except ValueError as exc:
            raise SandboxStateError(
                f"audit log {self.path} ends with a damaged event ({exc}); run `stockade "
                "audit` to inspect it, and move the file aside to start a new chain"
            ) from exc

    def read(self) -> list[AuditEvent]:
        """Every event that parses, in file order (use ``verify`` to check the chain)."""
        events = []
        for raw in self._lines():
            with contextlib.suppress(ValueError):
                events.append(_parse_event(raw))
        return events

    def _lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                data = f.read()
        except FileNotFoundError:
            return []
        return [line for line in data.split(b"\n") if line]

    def verify(self) -> AuditVerification:
        """Check every line: parses, ``seq`` is its position, ``prev`` and ``hash`` match."""
        prev = GENESIS
        lines = self._lines()
        for position, raw in enumerate(lines):

            def bad(reason: str, position: int = position) -> AuditVerification:
                return AuditVerification(False, position, position, reason)

            try:
                event = _parse_event(raw)
            except ValueError as exc:
                return bad(f"line {position + 1} is not a valid audit event: {exc}")
            if event.seq != position:
                return bad(
                    f"line {position + 1} has seq {event.seq}, expected {position}: an event "
                    "was removed, inserted or moved"
                )
            if event.prev != prev:
                return bad(f"event {position} does not follow event {position - 1} (prev differs)")
            if _event_hash(asdict(event)) != event.hash:
                return bad(f"event {position} was modified (hash differs)")
            if event.sandbox != self.sandbox:
                return bad(f"event {position} belongs to sandbox {event.sandbox!r}")
            prev = event.hash
        return AuditVerification(True, len(lines), None, f"{len(lines)} events verified")
