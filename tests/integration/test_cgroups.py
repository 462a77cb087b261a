"""Per-sandbox cgroups on the real kernel: limits enforced, whole tree killed, no leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade._errors import ConfigError
from stockade.backends._cgroups import (
    SandboxCgroup,
    _parse_hierarchies,
    _search,
    probe_cgroups,
    remove_stale_cgroups,
)

SUPPORT = probe_cgroups()
MakeGroup = Callable[..., SandboxCgroup]

needs_root_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or not SUPPORT.available,
    reason=f"needs root and usable cgroups: {SUPPORT.reason} {SUPPORT.fix}".strip(),
)


# --- detection (pure, runs everywhere) ---------------------------------------------------

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids,release_agent=/x
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
1:cpu,cpuacct:/
0::/
"""


def test_parse_hybrid_host_nests_under_own_paths() -> None:
    found = {
        (h.version, h.controllers): h.own
        for h in _parse_hierarchies(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    }
    assert found[("v1", frozenset({"memory"}))] == Path("/sys/fs/cgroup/memory/process_api/abc")
    assert found[("v1", frozenset({"cpu", "cpuacct"}))] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert found[("v1", frozenset({"pids"}))] == Path("/sys/fs/cgroup/pids")
    assert found[("v1", frozenset())] == Path("/sys/fs/cgroup/systemd")  # name=systemd
    assert found[("v2", frozenset())] == Path("/sys/fs/cgroup/unified")


def test_parse_unified_host() -> None:
    mountinfo = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    cgroup = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope\n"
    (h,) = _parse_hierarchies(mountinfo, cgroup)
    assert h.version == "v2"
    assert h.own == Path(
        "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope"
    )


def test_parse_mount_of_a_subtree_and_escaped_mountpoint() -> None:
    mountinfo = "50 40 0:30 /docker/abc /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory\n"
    cgroup = "4:memory:/docker/abc/inner\n"
    (h,) = _parse_hierarchies(mountinfo, cgroup)
    assert h.own == Path("/sys/fs/cgroup/my mem/inner")


def test_search_finds_a_group_created_from_another_cgroup(tmp_path: Path) -> None:
    (tmp_path / "process_api" / "a" / "stockade-x").mkdir(parents=True)
    (tmp_path / "process_api" / "b" / "stockade-y" / "stockade-x").mkdir(parents=True)
    (tmp_path / "stockade-x").mkdir()
    found = _search(tmp_path, "stockade-x")
    assert sorted(found) == [tmp_path / "process_api" / "a" / "stockade-x", tmp_path / "stockade-x"]


def test_probe_reports_this_machine() -> None:
    assert SUPPORT.version in {"v1", "v2", "hybrid", "none"}
    if SUPPORT.available:
        assert SUPPORT.controllers & {"memory", "pids", "cpu"}
        assert SUPPORT.fix == ""
    else:
        assert SUPPORT.reason and SUPPORT.fix


@pytest.mark.skipif(
    os.geteuid() != 0 or SUPPORT.version not in {"v1", "hybrid"},
    reason="needs root to drop to another uid on a cgroup v1 host",
)
def test_probe_as_unprivileged_user_on_v1_is_unavailable_with_a_fix() -> None:
    # Fork and drop to uid 65534 in the child: the probe must see that v1 groups need root.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            s = probe_cgroups()
            os.write(write_end, json.dumps([s.available, s.reason, s.fix]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    available, reason, fix = json.loads(data)
    assert available is False
    assert "not writable by uid 65534" in reason
    assert "root" in fix


def test_invalid_names_and_limits_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="invalid cgroup name"):
        SandboxCgroup.create("../evil", memory_bytes=None, pids=None, cpus=None)
    with pytest.raises(ConfigError, match="below 1 MiB"):
        SandboxCgroup.create("ok", memory_bytes=10, pids=None, cpus=None)
    with pytest.raises(ConfigError, match="cpus"):
        SandboxCgroup.create("ok", memory_bytes=None, pids=None, cpus=0)


# --- real groups (root) ------------------------------------------------------------------


@pytest.fixture
def make_group() -> Iterator[MakeGroup]:
    made: list[SandboxCgroup] = []

    def make(
        *, memory_bytes: int | None = None, pids: int | None = None, cpus: float | None = None
    ) -> SandboxCgroup:
        group = SandboxCgroup.create(
            f"test-{uuid.uuid4().hex[:8]}", memory_bytes=memory_bytes, pids=pids, cpus=cpus
        )
        made.append(group)
        return group

    yield make
    for group in made:
        group.destroy()
        assert not any(d.exists() for d in group.dirs), group


def launch(group: SandboxCgroup, script: str) -> subprocess.Popen[bytes]:
    """Join every cgroup of the group from a sh wrapper, then exec the script, like a launcher."""
    join = 'for f in "$@"; do echo $$ > "$f" || exit 99; done; exec sh -c "$0"'
    files = [str(f) for f in group.procs_files()]
    return subprocess.Popen(["sh", "-c", join, script, *files])


def wait_for_pids(group: SandboxCgroup, count: int, timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = group.pids()
        if len(pids) >= count:
            return pids
        time.sleep(0.01)
    raise AssertionError(f"only {group.pids()} in the group")


@needs_root_cgroups
def test_memory_limit_kills_a_200mb_allocation(make_group: MakeGroup) -> None:
    group = make_group(memory_bytes=64 << 20)
    proc = launch(group, f"exec {sys.executable} -c 'b = b\"x\" * (200 << 20)'")
    assert proc.wait(timeout=60) in (-9, 137)
    assert group.oom_killed()
    peak = group.memory_peak()
    assert peak is None or peak <= 64 << 20


@needs_root_cgroups
def test_pids_limit_stops_a_fork_loop_and_the_host_is_fine(make_group: MakeGroup) -> None:
    group = make_group(pids=20)
    proc = launch(group, "for i in $(seq 60); do sleep 30 & done; wait")
    deadline = time.monotonic() + 20
    while not group.pids_limit_hit() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group.pids_limit_hit()
    assert len(group.pids()) <= 20
    group.kill_all()
    assert proc.wait(timeout=10) != 0
    assert group.pids() == set()
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork


@needs_root_cgroups
def test_kill_all_kills_a_background_tree(make_group: MakeGroup) -> None:
    group = make_group(memory_bytes=256 << 20, pids=100)
    proc = launch(group, "sleep 1000 & sleep 1000 & (sleep 1000 &) ; wait")
    pids = wait_for_pids(group, 4)
    group.kill_all()
    assert proc.wait(timeout=5) == -9
    assert group.pids() == set()
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
        )


@needs_root_cgroups
def test_kill_all_without_cgroup_kill_uses_the_freezer(make_group: MakeGroup) -> None:
    group = make_group(pids=100)
    group._unified = None  # force the v1 freeze / kill / thaw path
    proc = launch(group, "sleep 1000 & sleep 1000 & wait")
    wait_for_pids(group, 3)
    group.kill_all()
    assert proc.wait(timeout=5) == -9
    assert group.pids() == set()


@needs_root_cgroups
def test_cpu_limit_is_written(make_group: MakeGroup) -> None:
    group = make_group(cpus=0.5)
    files = {p.name: p for d in group.dirs for p in d.iterdir()}
    if "cpu.cfs_quota_us" in files:
        assert files["cpu.cfs_quota_us"].read_text().strip() == "50000"
        assert files["cpu.cfs_period_us"].read_text().strip() == "100000"
    else:
        assert files["cpu.max"].read_text().split() == ["50000", "100000"]


@needs_root_cgroups
def test_destroy_removes_every_directory_and_is_idempotent() -> None:
    group = SandboxCgroup.create(
        f"test-{uuid.uuid4().hex[:8]}", memory_bytes=64 << 20, pids=50, cpus=1.0
    )
    assert group.dirs and all(d.is_dir() for d in group.dirs)
    assert all(d.name.startswith("stockade-test-") for d in group.dirs)
    proc = launch(group, "sleep 1000")
    wait_for_pids(group, 1)
    group.destroy()
    assert proc.wait(timeout=5) == -9
    assert not any(d.exists() for d in group.dirs)
    group.destroy()


@needs_root_cgroups
def test_two_sandboxes_get_separate_groups(make_group: MakeGroup) -> None:
    a = make_group(pids=50)
    b = make_group(pids=50)
    assert set(a.dirs).isdisjoint(b.dirs)
    proc_a = launch(a, "sleep 1000")
    proc_b = launch(b, "sleep 1000")
    pids_a = wait_for_pids(a, 1)
    pids_b = wait_for_pids(b, 1)
    assert pids_a.isdisjoint(pids_b)
    a.kill_all()
    assert proc_a.wait(timeout=5) == -9
    assert proc_b.poll() is None
    assert b.pids() and b.pids().isdisjoint(pids_a)
    b.kill_all()
    assert proc_b.wait(timeout=5) == -9


@needs_root_cgroups
def test_group_nests_under_the_callers_memory_cgroup(make_group: MakeGroup) -> None:
    group = make_group(memory_bytes=64 << 20)
    own = (
        next(
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if "memory" in line.split(":", 2)[1].split(",")
        )
        if "memory" in Path("/proc/self/cgroup").read_text()
        else None
    )
    if own is None:
        pytest.skip("no v1 memory hierarchy on this host")
    mem_dir = next(d for d in group.dirs if (d / "memory.limit_in_bytes").exists())
    assert str(mem_dir).endswith(own.rstrip("/") + "/" + mem_dir.name)


@needs_root_cgroups
def test_remove_stale_cgroups_from_another_handle() -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    group = SandboxCgroup.create(name, memory_bytes=64 << 20, pids=50, cpus=None)
    proc = launch(group, "sleep 1000 & wait")
    wait_for_pids(group, 2)
    found = SandboxCgroup.find(name)
    assert found is not None and set(found.dirs) == set(group.dirs)
    assert remove_stale_cgroups(name) == set()
    assert proc.wait(timeout=5) == -9
    assert not any(d.exists() for d in group.dirs)
    assert SandboxCgroup.find(name) is None
    assert remove_stale_cgroups(name) == set()
