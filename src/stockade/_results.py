"""Result types returned by commands, shared by the async core and the sync facade."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CommandResult"]


@dataclass(frozen=True)
class CommandResult:
    """Outcome of a finished command. A non-zero exit is a result, not an exception."""

    stdout_bytes: bytes
    stderr_bytes: bytes
    exit_code: int
    signal: int | None = None
    timed_out: bool = False
    duration: float = 0.0

    @property
    def stdout(self) -> str:
        """Standard output decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """Standard error decoded as UTF-8 (undecodable bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0

    def __repr__(self) -> str:
        return (
            f"CommandResult(exit_code={self.exit_code}, signal={self.signal}, "
            f"timed_out={self.timed_out}, stdout={len(self.stdout_bytes)}B, "
            f"stderr={len(self.stderr_bytes)}B)"
        )
