"""A sandbox's own disk (``limits.disk``): a loop-mounted ext4 image of exactly the limit
holding the workspace's upper and work layers and /tmp. Real loop mounts: needs root, skips
with the reason otherwise. (The conformance suite checks the bound through every backend.)"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade._errors import WorkspaceError
from stockade.workspace import WorkspaceLayers
from stockade.workspace.disk import (
    DISK_DIR,
    DISK_IMAGE,
    MIN_DISK_BYTES,
    create_disk,
    disk_support,
    fresh_tmp,
    has_disk,
    layer_root,
    release_disk,
    remove_state_dir,
)

LIMIT = 16 * 2**20


def _loops(image: Path) -> str:
    return subprocess.run(
        ["losetup", "--list", "--noheadings", "--associated", str(image)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    enforced, why = disk_support()
    if not enforced:
        pytest.skip(why)
    directory = tmp_path / "sandbox"
    directory.mkdir(mode=0o700)
    yield directory
    release_disk(directory)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "a.txt").write_text("a\n")
    return root


def test_layers_live_on_a_disk_of_exactly_the_limit(state: Path, project: Path) -> None:
    assert create_disk(state, LIMIT)
    image = state / DISK_IMAGE
    assert image.stat().st_size == LIMIT
    assert os.path.ismount(state / DISK_DIR)
    layers = WorkspaceLayers.create(state, project)
    assert layers.upper == state / DISK_DIR / "upper"
    assert layers.work == state / DISK_DIR / "work"
    assert layers.baseline_path.parent == state  # host bookkeeping stays off the disk
    with pytest.raises(OSError) as info, open(layers.upper / "big", "wb") as f:
        for _ in range(2 * LIMIT // 2**20):
            f.write(b"x" * 2**20)
            f.flush()
        os.fsync(f.fileno())
    assert info.value.errno == errno.ENOSPC
    assert image.stat().st_blocks * 512 <= LIMIT


def test_stopped_disk_is_mounted_again_on_demand_and_released(state: Path, project: Path) -> None:
    assert create_disk(state, LIMIT)
    layers = WorkspaceLayers.create(state, project)
    (layers.upper / "kept.txt").write_text("kept\n")
    release_disk(state)  # as after a reboot: the image is there, nothing mounted
    assert not os.path.ismount(state / DISK_DIR)
    assert _loops(state / DISK_IMAGE) == ""
    assert has_disk(state)
    again = WorkspaceLayers.at(state, project)
    assert os.path.ismount(state / DISK_DIR)
    assert (again.upper / "kept.txt").read_text() == "kept\n"
    again.reset()
    assert list(again.upper.iterdir()) == []
    release_disk(state)
    release_disk(state)  # repeatable
    assert not os.path.ismount(state / DISK_DIR)
    assert _loops(state / DISK_IMAGE) == ""


def test_fresh_tmp_is_emptied_at_every_start(state: Path) -> None:
    assert fresh_tmp(state) is None  # no disk: /tmp stays a tmpfs
    assert create_disk(state, LIMIT)
    tmp = fresh_tmp(state, owner=4321)
    assert tmp is not None
    assert tmp.parent == layer_root(state)
    assert (tmp.stat().st_mode & 0o7777) == 0o1777
    home = tmp / "home"
    assert (home.stat().st_uid, home.stat().st_mode & 0o777) == (4321, 0o700)
    (home / "left").write_text("x")
    interrupted = tmp.parent / ".tmp.discard-0123456789ab"  # a start killed mid-way
    interrupted.mkdir()
    (interrupted / "old").write_text("x")
    assert fresh_tmp(state, owner=4321) == tmp
    assert [p.name for p in tmp.parent.iterdir()] == ["tmp"]
    assert list(tmp.iterdir()) == [home]
    assert list(home.iterdir()) == []


def test_too_small_a_limit_is_refused(state: Path) -> None:
    with pytest.raises(WorkspaceError, match="at least 8MiB"):
        create_disk(state, MIN_DISK_BYTES - 1)
    assert not has_disk(state)


def test_without_root_only_tmp_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    enforced, why = disk_support()
    assert not enforced and "only /tmp" in why
    with caplog.at_level(logging.WARNING, logger="stockade.workspace.disk"):
        assert create_disk(tmp_path, LIMIT) is False
    assert "only /tmp" in caplog.text
    assert not has_disk(tmp_path)
    assert layer_root(tmp_path) == tmp_path


def test_remove_state_dir_leaves_no_mount_or_loop(state: Path, project: Path) -> None:
    assert create_disk(state, LIMIT)
    layers = WorkspaceLayers.create(state, project)
    (layers.upper / "x").write_text("x")
    image = state / DISK_IMAGE
    assert _loops(image)
    remove_state_dir(state)
    assert not state.exists()
    everything = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(image) not in everything
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(state) not in mounts
    state.mkdir()  # for the fixture's own release


def test_util_linux_mount_where_loop_configure_is_missing(
    state: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stockade.workspace import disk

    monkeypatch.setattr(disk, "_mount_direct", lambda image, mount_point: False)
    assert create_disk(state, LIMIT)
    assert os.path.ismount(state / DISK_DIR)
    layers = WorkspaceLayers.create(state, project)
    (layers.upper / "x").write_text("x")
    image = state / DISK_IMAGE
    remove_state_dir(state)
    assert (
        str(image) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    )
    state.mkdir()  # for the fixture's own release


def test_a_stopped_sandboxs_disk_is_no_leftover_and_an_orphans_is_removed(
    project: Path, tmp_path: Path
) -> None:
    from conftest import require_backend
    from stockade import Sandbox
    from stockade.cli.orphans import find_orphans, remove_orphan
    from stockade.state import StateStore

    require_backend("namespace")
    enforced, why = disk_support()
    if not enforced:
        pytest.skip(why)
    store = StateStore(tmp_path / "state")
    sb = Sandbox.create(project_dir=project, backend="namespace", keep=True,
                        config={"limits.disk": "16MiB"}, state_dir=store.root)  # fmt: skip
    state_dir = sb.state_dir
    try:
        sb.commands.run("echo kept > kept.txt")
        sb.close()
        assert os.path.ismount(state_dir / DISK_DIR)  # kept for review while it has a record
        assert find_orphans(store, containers=False) == []
        store.delete(sb.name)  # as if a crash came between the record and the directory
        [orphan] = find_orphans(store, containers=False)
        assert (orphan.kind, orphan.removable) == ("directory", True)
        remove_orphan(store, orphan)
        assert not state_dir.exists()
    finally:
        if state_dir.exists():  # failed half-way: no mount left for pytest to trip over
            sb.close()
            remove_state_dir(state_dir)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    assert str(state_dir) not in loops.stdout
    assert str(state_dir) not in Path("/proc/self/mountinfo").read_text()
