"""Probe results kept on disk between processes, keyed by what the probe depends on.

A probe that starts a real sandbox (gVisor runs ``runsc do true``; the microVM probe reads
QEMU's version and looks the guest image up) costs ~0.2 s, and ``auto`` runs them on every
``stockade run``. A backend that names its inputs (``Backend.probe_inputs()``: binaries,
device nodes, image directories) gets its result cached in
``$XDG_CACHE_HOME/stockade/probes-<uid>.json`` under a fingerprint of

- those inputs' identity (inode, size, mtime; a directory's mtime moves when an entry is
  added or replaced, which is how image builds and package upgrades land),
- this stockade (version and the backend module's file), the user, the kernel release and
  boot, ``PATH`` and every ``STOCKADE_*`` variable,
- the sysctls that decide whether unprivileged namespaces work.

A result is used only while the fingerprint matches and it is young (an hour when the
backend worked, ten minutes when it did not), so a change the fingerprint cannot see (a
daemon, a security module's policy) is noticed within that time; a sandbox that then fails
to start forgets its backend's entry at once (``forget``). ``stockade doctor`` always probes
afresh. ``STOCKADE_PROBE_CACHE=0`` turns the cache off (the test suite does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.backends.base import Availability

if TYPE_CHECKING:
    from stockade.backends.base import Backend

__all__ = ["cache_path", "cached_probe", "enabled", "fingerprint", "forget"]

logger = logging.getLogger(__name__)

#: Seconds a result stays usable: a working backend, and one that did not work.
TTL_OK = 3600.0
TTL_FAILED = 600.0
_FORMAT = 1
_SYSCTLS = (
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
)


def enabled() -> bool:
    return os.environ.get("STOCKADE_PROBE_CACHE", "1").strip().lower() not in ("0", "no", "off")


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stockade" / f"probes-{os.getuid()}.json"


def _identity(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_ino, st.st_size, st.st_mtime_ns]


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def fingerprint(cls: type[Backend], inputs: tuple[str, ...]) -> str:
    """A digest of everything a cached result of ``cls.probe()`` stands on."""
    from stockade import __version__

    module = sys.modules.get(cls.__module__)
    module_file = getattr(module, "__file__", None) or ""
    parts: dict[str, Any] = {
        "format": _FORMAT,
        "stockade": __version__,
        "code": [_identity(module_file), _identity(__file__)],
        "uid": [os.getuid(), os.geteuid()],
        "kernel": os.uname().release,
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "sysctl": [_read(p) for p in _SYSCTLS],
        "env": sorted(
            (k, v) for k, v in os.environ.items() if k == "PATH" or k.startswith("STOCKADE_")
        ),
        "inputs": [_identity(p) for p in inputs],
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _load() -> dict[str, Any]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(entries: dict[str, Any]) -> None:
    path = cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        # A cache that cannot be written only costs the next process a probe.
        logger.debug("cannot write the probe cache %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _decode(raw: Any) -> Availability | None:
    try:
        return Availability(
            ok=bool(raw["ok"]),
            reason=str(raw["reason"]),
            fix=str(raw["fix"]),
            details=tuple(str(d) for d in raw["details"]),
            auto=bool(raw["auto"]),
        )
    except (KeyError, TypeError):
        return None


def cached_probe(name: str, cls: type[Backend], *, fresh: bool = False) -> Availability:
    """``cls.probe()``, answered from the cache when its fingerprint still matches.

    ``fresh`` probes in any case (and records the result). Backends without
    ``probe_inputs()`` are always probed.
    """
    inputs = cls.probe_inputs()
    if inputs is None or not enabled():
        return cls.probe()
    key = fingerprint(cls, inputs)
    now = time.time()
    entries = _load()
    if not fresh:
        entry = entries.get(name)
        if isinstance(entry, dict) and entry.get("fingerprint") == key:
            cached = _decode(entry.get("result"))
            try:
                age = now - float(entry.get("time", 0))
            except (TypeError, ValueError):
                age = -1.0  # a damaged entry: probe again
            if cached is not None and 0 <= age < (TTL_OK if cached.ok else TTL_FAILED):
                return cached
    result = cls.probe()
    entries[name] = {"fingerprint": key, "time": now, "result": asdict(result)}
    _store(entries)
    return result


def forget(name: str) -> None:
    """Drop ``name``'s cached result (its sandbox failed to start: probe again next time)."""
    if not enabled():
        return
    entries = _load()
    if entries.pop(name, None) is not None:
        _store(entries)
