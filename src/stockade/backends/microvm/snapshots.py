"""Named snapshots of running microVM sandboxes: ``snapshot``, ``restore`` and ``fork``.

A snapshot is the whole VM: memory and devices (QEMU migration to a file; the guest's
workspace upper layer lives in guest RAM, so it is included) plus a copy of the writable
workspace disk when the sandbox has one. It is stored with the sandbox's state under
``<state>/snapshots/<sandbox>/<tag>/``. ``restore`` puts a running sandbox back into one of
its snapshots; ``fork`` starts a new sandbox from one (same policy). A resumed VM's agent
is already configured, so after the handshake the host has that running agent set the
guest clock and reseed its entropy pool (``sandbox.reseed``: two forks must not share
random state).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade._errors import SandboxNotFoundError, SandboxStateError

if TYPE_CHECKING:
    from stockade.backends.microvm.backend import MicrovmBackend
    from stockade.policy import EffectivePolicy
    from stockade.sandbox import AsyncSandbox

__all__ = [
    "fork_sandbox",
    "handle_control",
    "list_snapshots",
    "restore_sandbox",
    "resuming_backend",
    "snapshot_dir_for",
    "snapshot_sandbox",
]

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_tag(tag: str) -> None:
    if not _TAG.match(tag):
        raise SandboxStateError(
            f"snapshot tag {tag!r} is not valid; use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)"
        )


def snapshot_dir_for(state_root: Path, sandbox: str, tag: str) -> Path:
    _check_tag(tag)
    return state_root / "snapshots" / sandbox / tag


def list_snapshots(state_root: Path, sandbox: str) -> list[dict[str, Any]]:
    base = state_root / "snapshots" / sandbox
    found = []
    for meta in sorted(base.glob("*/meta.json")):
        try:
            found.append(json.loads(meta.read_text()))
        except (OSError, ValueError):
            continue
    return found


def _launched(sandbox: AsyncSandbox) -> Any:
    from stockade.backends.microvm.backend import MicrovmSandbox

    launched = sandbox._launched
    if not isinstance(launched, MicrovmSandbox) or not sandbox.is_running():
        raise SandboxStateError(
            f"sandbox {sandbox.name!r} is not a running microVM sandbox (backend "
            f"{sandbox.backend}); snapshots of full VM state need backend='microvm'"
        )
    return launched


async def snapshot_sandbox(sandbox: AsyncSandbox, tag: str) -> Path:
    """Save the running sandbox's whole VM as ``tag``; the sandbox keeps running."""
    launched = _launched(sandbox)
    dest = snapshot_dir_for(sandbox._store.root, sandbox.name, tag)
    tmp = dest.with_name(f".{tag}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    started = time.monotonic()
    try:
        await launched.save_state(tmp)
        meta = {
            "sandbox": sandbox.name,
            "tag": tag,
            "created": time.time(),
            "policy": sandbox.policy.to_json(),
            **launched.resume_info(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sandbox._audit(
        "snapshot.taken",
        target=tag,
        details={"seconds": round(time.monotonic() - started, 3), "path": str(dest)},
    )
    return dest


def _load(path: Path) -> dict[str, Any]:
    try:
        meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise SandboxNotFoundError(f"no snapshot at {path}: {exc}") from exc
    return meta


def resuming_backend(path: Path) -> MicrovmBackend:
    from stockade.backends.microvm.backend import MicrovmBackend

    return MicrovmBackend(resume=path, resume_meta=_load(path))


async def restore_sandbox(sandbox: AsyncSandbox, tag: str) -> None:
    """Put a running sandbox back into its snapshot ``tag`` (its VM is replaced)."""
    _launched(sandbox)
    path = snapshot_dir_for(sandbox._store.root, sandbox.name, tag)
    backend = resuming_backend(path)
    await sandbox._stop_backend()
    sandbox._backend = backend
    await sandbox._launch()
    sandbox._audit("snapshot.restored", target=tag)


async def fork_sandbox(
    source: AsyncSandbox, *, name: str | None = None, tag: str | None = None
) -> AsyncSandbox:
    """A new sandbox started from a snapshot of ``source`` (taken now unless ``tag``)."""
    from stockade.sandbox import AsyncSandbox

    if tag is None:
        tag = f"fork-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        path = await snapshot_sandbox(source, tag)
    else:
        path = snapshot_dir_for(source._store.root, source.name, tag)
    return await AsyncSandbox._start_new(
        source.policy,
        resuming_backend(path),
        name=name,
        keep=source._keep,
        state_dir=source._store.root,
        actor=source._actor,
    )


def policy_of(path: Path) -> EffectivePolicy:
    from stockade.policy import EffectivePolicy

    return EffectivePolicy.from_json(_load(path)["policy"])


async def handle_control(sandbox: AsyncSandbox, method: str, params: dict[str, Any]) -> Any:
    """Supervisor control methods ``snapshot.take`` / ``snapshot.restore`` / ``snapshot.list``."""
    tag = params.get("tag")
    if method == "snapshot.list":
        return {"snapshots": list_snapshots(sandbox._store.root, sandbox.name)}
    if not isinstance(tag, str):
        raise SandboxStateError("params.tag must be a snapshot tag")
    if method == "snapshot.take":
        return {"path": str(await snapshot_sandbox(sandbox, tag))}
    if method == "snapshot.restore":
        await restore_sandbox(sandbox, tag)
        return {}
    raise SandboxStateError(f"unknown snapshot method {method!r}")
