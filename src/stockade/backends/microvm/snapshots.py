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
    from stockade.backends.microvm.backend import MicrovmBackend, MicrovmSandbox
    from stockade.policy import EffectivePolicy

__all__ = [
    "list_snapshots",
    "policy_of",
    "resuming_backend",
    "save_snapshot",
    "snapshot_dir_for",
    "snapshottable",
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


def snapshottable(launched: object, name: str, backend: str) -> MicrovmSandbox:
    """``launched`` as a sandbox whose whole state can be saved, else the error naming the
    backend that can."""
    from stockade.backends.microvm.backend import MicrovmSandbox

    if not isinstance(launched, MicrovmSandbox) or not launched.alive():
        raise SandboxStateError(
            f"sandbox {name!r} is not a running microVM sandbox (backend {backend}); "
            "snapshots of full VM state need backend='microvm'"
        )
    return launched


async def save_snapshot(
    launched: MicrovmSandbox, dest: Path, *, sandbox: str, tag: str, policy: EffectivePolicy
) -> None:
    """Save the running VM's whole state in ``dest`` (replaced whole, or left as it was)."""
    tmp = dest.with_name(f".{tag}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    try:
        await launched.save_state(tmp)
        meta = {
            "sandbox": sandbox,
            "tag": tag,
            "created": time.time(),
            "policy": policy.to_json(),
            **launched.resume_info(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(path: Path) -> dict[str, Any]:
    try:
        meta: dict[str, Any] = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise SandboxNotFoundError(f"no snapshot at {path}: {exc}") from exc
    return meta


def resuming_backend(path: Path) -> MicrovmBackend:
    from stockade.backends.microvm.backend import MicrovmBackend

    return MicrovmBackend(resume=path, resume_meta=_load(path))


def policy_of(path: Path) -> EffectivePolicy:
    from stockade.policy import EffectivePolicy

    return EffectivePolicy.from_json(_load(path)["policy"])
