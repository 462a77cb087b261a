"""A microVM's end saves the guest's workspace; when the host cannot take it, the loss is said.

The conformance suite covers the ways a sandbox ends on every backend (and a VM killed before
its save); this covers a save that fails for want of room on the host: the state directory
is a small tmpfs, the guest writes more than fits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_backend
from stockade import Sandbox

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """STOCKADE_STATE_DIR on a 24 MiB tmpfs (root only; a short path, for the sockets)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "stockade-test", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    monkeypatch.setenv("STOCKADE_STATE_DIR", str(mount / "state"))
    try:
        yield mount / "state"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def test_host_disk_full_while_saving_is_reported(project: Path, small_state_dir: Path) -> None:
    from stockade.workspace.save import read_save

    require_backend("microvm")
    sb = Sandbox.create(project_dir=project, backend="microvm", keep=True)
    r = sb.commands.run("echo kept > made.txt && head -c 40M /dev/urandom > big.bin")
    assert r.exit_code == 0, r.stderr
    sb.close()  # the save cannot fit in the 24 MiB the state directory has

    save = read_save(sb.state_dir)
    assert save is not None and save.state == "lost"
    assert save.reason is not None and "No space left on device" in save.reason
    diff = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", "diff", sb.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"the workspace changes of {sb.name} could not be saved" in diff.stderr
    assert "No space left on device" in diff.stderr
    assert "no changes" not in diff.stderr
    assert (sb.state_dir / "upper").is_dir()
    assert not any((sb.state_dir / "upper").iterdir())  # nothing half-imported
    assert not [p for p in sb.state_dir.iterdir() if p.name.startswith(".upper.")]
