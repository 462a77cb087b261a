"""Pieces the bench scripts share (they run as ``python bench/<name>.py``, so this imports
as ``_common``): medians, timed commands, the raw bwrap baseline, and the SDK lifecycle and
warm exec measurements for any backend."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from stockade import AsyncSandbox

PY_PASS = ["/usr/bin/python3", "-S", "-c", "pass"]
#: A raw bwrap sandbox of the host's /usr running `python3 -S -c pass` (the namespace baseline).
RAW_BWRAP = [
    "bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
    "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
    "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    "--", *PY_PASS,
]  # fmt: skip


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def time_cmd(argv: list[str], runs: int, **kw: Any) -> list[float]:
    """Wall time of ``runs`` runs of ``argv`` to its end (stdout discarded)."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
        out.append(time.perf_counter() - t)
    return out


async def sdk_lifecycle(project: Path, runs: int, **create: Any) -> list[float]:
    """SDK create + first exec of `true` + destroy, ``runs`` times."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        sb = await AsyncSandbox.create(project_dir=project, **create)
        await sb.commands.run(["true"])
        await sb.aclose()
        out.append(time.perf_counter() - t)
    return out


async def warm_exec(project: Path, runs: int, **create: Any) -> list[float]:
    """Round trip of `true` in a running sandbox (after five untimed ones)."""
    async with await AsyncSandbox.create(project_dir=project, **create) as sb:
        for _ in range(5):
            await sb.commands.run(["true"])
        out = []
        for _ in range(runs):
            t = time.perf_counter()
            await sb.commands.run(["true"])
            out.append(time.perf_counter() - t)
        return out
