"""Per-sandbox resource limits and whole-tree kill through cgroups (v1, v2 or hybrid).

Each sandbox gets a group ``stockade-<name>`` nested under the calling process's own cgroup
in every hierarchy it uses, so the host's accounting of the caller still covers it. Limits
come from whichever hierarchy holds the controller (v1 on a hybrid host, v2 on a unified
one); a writable cgroup2 hierarchy is always joined too, for a race-free ``cgroup.kill``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from stockade._errors import (
    BackendUnavailableError,
    ConfigError,
    PolicyError,
    SandboxStartError,
    SandboxStateError,
)

__all__ = ["CgroupSupport", "SandboxCgroup", "probe_cgroups", "remove_stale_cgroups"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_PREFIX = "stockade-"
_WANTED = ("memory", "pids", "cpu", "freezer")
_LIMITS = ("memory", "pids", "cpu")
_V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)
_FIND_MAX_DEPTH = 8
_CFS_PERIOD_US = 100_000
_CFS_MIN_QUOTA_US = 1_000
_FIX_ROOT = (
    "run stockade as root; on a cgroup v2 host you can instead run it inside a delegated "
    "cgroup, e.g. `systemd-run --user --scope -p Delegate=yes stockade ...`"
)


@dataclass(frozen=True)
class CgroupSupport:
    """What this machine offers for per-sandbox cgroups, as seen by the calling process."""

    available: bool
    version: str  # "v1", "v2", "hybrid" or "none"
    controllers: frozenset[str]  # usable ones among memory, pids, cpu, freezer
    reason: str
    fix: str


@dataclass(frozen=True)
class _Hierarchy:
    version: str  # "v1" or "v2"
    controllers: frozenset[str]
    own: Path  # the calling process's cgroup directory in this hierarchy
    mount: Path  # where the hierarchy is mounted


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _parse_hierarchies(mountinfo: str, proc_cgroup: str) -> list[_Hierarchy]:
    """Pair each mounted cgroup hierarchy with this process's path in it.

    Pure: takes the text of /proc/self/mountinfo and /proc/self/cgroup. v2 controllers are
    left empty here; they are read from the filesystem by the caller.
    """
    v1_paths: dict[frozenset[str], str] = {}
    v2_path: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, ctrls, path = parts
        if hier_id == "0" and ctrls == "":
            v2_path = path
        else:
            v1_paths[frozenset(ctrls.split(","))] = path

    found: list[_Hierarchy] = []
    seen: set[frozenset[str] | str] = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lfields = left.split()
        rfields = right.split()
        if len(lfields) < 5 or len(rfields) < 3:
            continue
        root, mountpoint = _unescape(lfields[3]), _unescape(lfields[4])
        fstype, superopts = rfields[0], rfields[2].split(",")
        if fstype == "cgroup":
            key = frozenset(o for o in superopts if o in _V1_CONTROLLERS or o.startswith("name="))
            v1_path = v1_paths.get(key)
            if v1_path is None or key in seen:
                continue
            seen.add(key)
            controllers = frozenset(key & _V1_CONTROLLERS)
            own = _join(mountpoint, root, v1_path)
            found.append(_Hierarchy("v1", controllers, own, Path(mountpoint)))
        elif fstype == "cgroup2" and v2_path is not None and "v2" not in seen:
            seen.add("v2")
            own = _join(mountpoint, root, v2_path)
            found.append(_Hierarchy("v2", frozenset(), own, Path(mountpoint)))
    return found


def _join(mountpoint: str, root: str, path: str) -> Path:
    # A mount may expose a subtree (root != "/"); the process path is from the real root.
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root) :]
    return Path(mountpoint) / path.lstrip("/")


def _discover() -> list[_Hierarchy]:
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        proc_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        return []
    hierarchies = []
    for parsed in _parse_hierarchies(mountinfo, proc_cgroup):
        if parsed.version == "v2":
            try:
                names = (parsed.own / "cgroup.controllers").read_text().split()
            except OSError:
                names = []
            parsed = _Hierarchy("v2", frozenset(names), parsed.own, parsed.mount)  # noqa: PLW2901
        hierarchies.append(parsed)
    return hierarchies


def _has_cgroup_kill(group: Path) -> bool:
    if (group / "cgroup.kill").exists():
        return True
    # The root group has no cgroup.kill; children do from Linux 5.14.
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return match is not None and (int(match[1]), int(match[2])) >= (5, 14)


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _providers(hierarchies: Iterable[_Hierarchy]) -> dict[str, _Hierarchy]:
    """Controller -> the hierarchy that holds it and whose group we may create children in."""
    providers: dict[str, _Hierarchy] = {}
    for h in hierarchies:
        if not _writable(h.own):
            continue
        for controller in h.controllers:
            if controller in _WANTED:
                providers.setdefault(controller, h)
    return providers


def probe_cgroups() -> CgroupSupport:
    """Report whether per-sandbox cgroups can be created by this process, and with what."""
    return _support(_discover())


def _support(hierarchies: list[_Hierarchy]) -> CgroupSupport:
    versions = {h.version for h in hierarchies}
    version = {
        frozenset(): "none",
        frozenset({"v1"}): "v1",
        frozenset({"v2"}): "v2",
    }.get(frozenset(versions), "hybrid")
    if not hierarchies:
        return CgroupSupport(
            False,
            "none",
            frozenset(),
            "no cgroup hierarchy is mounted (see /proc/self/mountinfo)",
            "mount cgroup2 on /sys/fs/cgroup, or run on a host that has it",
        )
    providers = _providers(hierarchies)
    controllers = frozenset(providers)
    if not controllers & set(_LIMITS):
        candidates = [h.own for h in hierarchies if h.controllers & set(_LIMITS)]
        where = ", ".join(str(p) for p in candidates) or "any hierarchy"
        if candidates and os.geteuid() != 0:
            reason = f"cannot create cgroups under {where}: not writable by uid {os.geteuid()}" + (
                " (cgroup v1 has no delegation)" if "v1" in versions else ""
            )
            fix = _FIX_ROOT
        elif candidates:
            reason = f"cannot create cgroups under {where}: not writable (read-only mount?)"
            fix = "mount the cgroup filesystem read-write, or run on the host itself"
        else:
            reason = "no memory, pids or cpu controller is available to this process"
            fix = "enable the memory and pids controllers (cgroup v2: cgroup.subtree_control)"
        return CgroupSupport(False, version, frozenset(), reason, fix)
    parts = []
    for controller in sorted(controllers):
        h = providers[controller]
        parts.append(f"{controller} ({h.version}, {h.own})")
    kill = [h for h in hierarchies if h.version == "v2" and _writable(h.own)]
    if kill and _has_cgroup_kill(kill[0].own):
        parts.append(f"cgroup.kill ({kill[0].own})")
    return CgroupSupport(True, version, controllers, "usable: " + ", ".join(parts), "")


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise SandboxStartError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def _keyed_ints(path: Path) -> dict[str, int]:
    """Parse a flat-keyed cgroup file ("key value" lines); {} if it cannot be read."""
    result: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return result
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            result[key] = int(value)
    return result


class SandboxCgroup:
    """The cgroups of one sandbox, one directory per hierarchy used.

    Made by ``create``; ``destroy`` kills what is inside and removes the directories.
    """

    def __init__(
        self, name: str, dirs: Iterable[Path], controller_dirs: Mapping[str, Path],
        unified: Path | None,
    ) -> None:  # fmt: skip
        self.name = name
        self._dirs = list(dict.fromkeys(dirs))
        self._controller_dirs = dict(controller_dirs)
        self._unified = unified

    def __repr__(self) -> str:
        return f"SandboxCgroup(name={self.name!r}, dirs={[str(d) for d in self._dirs]})"

    @property
    def dirs(self) -> list[Path]:
        """Every cgroup directory of this sandbox (to record, or for diagnostics)."""
        return list(self._dirs)

    @classmethod
    def create(
        cls,
        name: str,
        *,
        memory_bytes: int | None,
        pids: int | None,
        cpus: float | None,
    ) -> SandboxCgroup:
        """Create ``stockade-<name>`` in each hierarchy and apply the limits.

        Raises BackendUnavailableError when cgroups cannot be used at all, PolicyError when
        a requested limit has no controller here, SandboxStartError when a directory or
        file cannot be created or written (the message names the path).
        """
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"invalid cgroup name {name!r}: use 1-63 characters from a-z, 0-9, '_', '.', "
                "'-', starting with a letter or digit"
            )
        if memory_bytes is not None and memory_bytes < 1 << 20:
            raise ConfigError(f"memory limit {memory_bytes} bytes is below 1 MiB")
        if pids is not None and pids < 1:
            raise ConfigError(f"pids limit {pids} must be at least 1")
        if cpus is not None and not cpus > 0:
            raise ConfigError(f"cpus limit {cpus} must be positive")

        hierarchies = _discover()
        support = _support(hierarchies)
        if not support.available:
            raise BackendUnavailableError(
                f"per-sandbox cgroups are unavailable: {support.reason}; {support.fix}",
                fix=support.fix,
            )
        providers = _providers(hierarchies)
        requested = {"memory": memory_bytes, "pids": pids, "cpu": cpus}
        for controller, value in requested.items():
            if value is not None and controller not in providers:
                raise PolicyError(
                    f"a {controller} limit was requested but no writable {controller} cgroup "
                    f"controller is available ({support.reason}); drop the limit or "
                    f"{_FIX_ROOT}"
                )

        unified_h = next((h for h in hierarchies if h.version == "v2" and _writable(h.own)), None)
        used: list[_Hierarchy] = []
        for h in (*providers.values(), *([unified_h] if unified_h else [])):
            if h not in used:
                used.append(h)

        group = cls(name, [], {}, None)
        dirname = _PREFIX + name
        try:
            if unified_h is not None:
                v2_needed = sorted(
                    c for c, v in requested.items() if v is not None and providers[c] is unified_h
                )
                _enable_v2_controllers(unified_h.own, v2_needed)
            for h in used:
                path = h.own / dirname
                _make_group_dir(path)
                group._dirs.append(path)
                if h is unified_h:
                    group._unified = path
                for controller, provider in providers.items():
                    if provider is h:
                        group._controller_dirs[controller] = path
            group._apply_limits(memory_bytes, pids, cpus)
        except BaseException:
            with contextlib.suppress(Exception):
                group.destroy()
            raise
        return group

    @classmethod
    def find(cls, name: str) -> SandboxCgroup | None:
        """The existing groups ``stockade-<name>``, from any process (e.g. ``stockade rm``).

        Looks under the caller's own cgroup first, then searches each hierarchy, since the
        process that created the groups may have lived in another cgroup.
        """
        if not _NAME_RE.match(name):
            raise ConfigError(f"invalid cgroup name {name!r}")
        dirname = _PREFIX + name
        group = cls(name, [], {}, None)
        for h in _discover():
            found = [h.own / dirname] if (h.own / dirname).is_dir() else _search(h.mount, dirname)
            if not found:
                continue
            group._dirs.extend(found)
            if h.version == "v2" and group._unified is None:
                group._unified = found[0]
            for controller in h.controllers:
                if controller in _WANTED:
                    group._controller_dirs.setdefault(controller, found[0])
        return group if group._dirs else None

    def _apply_limits(self, memory_bytes: int | None, pids: int | None, cpus: float | None) -> None:
        mem = self._controller_dirs.get("memory")
        if memory_bytes is not None and mem is not None:
            if (mem / "memory.limit_in_bytes").exists():  # v1
                _write(mem / "memory.limit_in_bytes", str(memory_bytes))
                # memsw covers memory + swap; it must not be below the memory limit, so
                # it is written second. Absent when the kernel has no swap accounting.
                if (mem / "memory.memsw.limit_in_bytes").exists():
                    _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
            else:  # v2
                _write(mem / "memory.max", str(memory_bytes))
                if (mem / "memory.swap.max").exists():
                    _write(mem / "memory.swap.max", "0")  # swap must not dodge the limit
        pid_dir = self._controller_dirs.get("pids")
        if pids is not None and pid_dir is not None:
            _write(pid_dir / "pids.max", str(pids))
        cpu = self._controller_dirs.get("cpu")
        if cpus is not None and cpu is not None:
            quota = max(_CFS_MIN_QUOTA_US, round(cpus * _CFS_PERIOD_US))
            if (cpu / "cpu.cfs_quota_us").exists():  # v1
                _write(cpu / "cpu.cfs_period_us", str(_CFS_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(quota))
            else:
                _write(cpu / "cpu.max", f"{quota} {_CFS_PERIOD_US}")

    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a launcher writes the sandbox's pid into, before exec."""
        return [d / "cgroup.procs" for d in self._dirs]

    def pids(self) -> set[int]:
        """Every pid in any of this sandbox's cgroups (including nested groups)."""
        found: set[int] = set()
        for top in self._dirs:
            for dirpath, _dirnames, _files in os.walk(top):
                with contextlib.suppress(OSError):
                    found.update(int(p) for p in _read(Path(dirpath) / "cgroup.procs").split())
        return found

    def kill_all(self, timeout: float = 2.0) -> None:
        """SIGKILL every process of the sandbox; raise SandboxStateError if any survives.

        cgroup.kill where the kernel has it; otherwise freeze, kill each pid through a
        pidfd (so a recycled pid is never hit), thaw, and repeat until empty.
        """
        deadline = time.monotonic() + timeout
        kill_file = self._unified / "cgroup.kill" if self._unified else None
        if kill_file is not None and not kill_file.exists():
            kill_file = None
        freezer = self._freezer_file()
        pause = 0.0005  # killed tasks leave within a ms or two: poll fast, then back off
        while True:
            if kill_file is not None:
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            pids = self.pids()
            if not pids:
                return
            if time.monotonic() > deadline:
                raise SandboxStateError(
                    f"processes {sorted(pids)} of sandbox {self.name!r} survived SIGKILL for "
                    f"{timeout} s (cgroups {', '.join(str(d) for d in self._dirs)})"
                )
            if freezer is not None:
                self._set_frozen(freezer, True, deadline)
            try:
                self._kill_pids(pids)
            finally:
                if freezer is not None:
                    self._set_frozen(freezer, False, deadline)
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def _freezer_file(self) -> Path | None:
        freezer = self._controller_dirs.get("freezer")
        if freezer is not None and (freezer / "freezer.state").exists():
            return freezer / "freezer.state"
        if self._unified is not None and (self._unified / "cgroup.freeze").exists():
            return self._unified / "cgroup.freeze"
        return None

    @staticmethod
    def _set_frozen(path: Path, frozen: bool, deadline: float) -> None:
        v1 = path.name == "freezer.state"
        value = ("FROZEN" if frozen else "THAWED") if v1 else ("1" if frozen else "0")
        try:
            path.write_text(value)
        except OSError:
            return
        if not (v1 and frozen):
            return
        # v1 passes through FREEZING; wait briefly so no task forks while we kill.
        stop = min(deadline, time.monotonic() + 0.2)
        while time.monotonic() < stop:
            with contextlib.suppress(OSError):
                if path.read_text().strip() == "FROZEN":
                    return
            time.sleep(0.001)

    def _kill_pids(self, pids: set[int]) -> None:
        pidfds: dict[int, int] = {}
        try:
            for pid in pids:
                with contextlib.suppress(OSError):
                    pidfds[pid] = os.pidfd_open(pid)
            still_inside = self.pids()  # a pid reused outside the group is not in here
            for pid, fd in pidfds.items():
                if pid in still_inside:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            for fd in pidfds.values():
                os.close(fd)

    def destroy(self, timeout: float = 2.0) -> None:
        """Kill everything inside, then remove every directory. Safe to call again."""
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        for top in self._dirs:
            if not top.exists():
                continue
            # Nested groups first; a just-killed group can be busy for a moment.
            for dirpath, _dirnames, _files in sorted(
                os.walk(top), key=lambda entry: -len(entry[0])
            ):
                pause = 0.0005
                while True:
                    try:
                        os.rmdir(dirpath)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        if time.monotonic() > deadline:
                            raise SandboxStateError(
                                f"cannot remove cgroup {dirpath}: {exc.strerror or exc}"
                            ) from exc
                        time.sleep(pause)
                        pause = min(pause * 2, 0.01)

    def oom_kill_count(self) -> int:
        """How many processes the memory limit killed."""
        mem = self._controller_dirs.get("memory")
        if mem is None:
            return 0
        if (mem / "memory.oom_control").exists():  # v1
            return _keyed_ints(mem / "memory.oom_control").get("oom_kill", 0)
        return _keyed_ints(mem / "memory.events").get("oom_kill", 0)

    def oom_killed(self) -> bool:
        """Whether the memory limit killed something in this sandbox."""
        return self.oom_kill_count() > 0

    def pids_limit_hit(self) -> bool:
        """Whether a fork or clone failed because of the pids limit."""
        pid_dir = self._controller_dirs.get("pids")
        if pid_dir is None:
            return False
        return _keyed_ints(pid_dir / "pids.events").get("max", 0) > 0

    def memory_peak(self) -> int | None:
        """Peak memory use in bytes, or None where the kernel does not report it."""
        mem = self._controller_dirs.get("memory")
        if mem is None:
            return None
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            with contextlib.suppress(OSError, ValueError):
                return int(_read(mem / name))
        return None


def remove_stale_cgroups(name: str, timeout: float = 2.0) -> set[int]:
    """Kill what is left in the groups ``stockade-<name>`` and remove them.

    Returns the pids that survived (empty when everything is gone). No groups, no work.
    """
    group = SandboxCgroup.find(name)
    if group is None:
        return set()
    try:
        group.kill_all(timeout)
    except SandboxStateError:
        return group.pids()
    group.destroy(timeout)
    return set()


def _search(top: Path, dirname: str) -> list[Path]:
    found: list[Path] = []
    base_depth = len(top.parts)
    for dirpath, dirnames, _files in os.walk(top):
        here = Path(dirpath)
        if dirname in dirnames:
            found.append(here / dirname)
        # Do not descend into sandboxes' groups, or too deep.
        if len(here.parts) - base_depth >= _FIND_MAX_DEPTH:
            dirnames.clear()
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(_PREFIX)]
    return found


def _enable_v2_controllers(parent: Path, controllers: list[str]) -> None:
    if not controllers:
        return
    control = parent / "cgroup.subtree_control"
    try:
        enabled = set(_read(control).split())
    except OSError as exc:
        raise SandboxStartError(f"cannot read {control}: {exc.strerror or exc}") from exc
    missing = [c for c in controllers if c not in enabled]
    if not missing:
        return
    try:
        _write(control, " ".join("+" + c for c in missing))
    except SandboxStartError as exc:
        raise SandboxStartError(
            f"{exc}; cgroup v2 enables controllers for children only in a group without "
            f"processes of its own; run stockade inside a delegated cgroup, e.g. "
            f"`systemd-run --user --scope -p Delegate=yes stockade ...`"
        ) from exc


def _make_group_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o755)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise SandboxStartError(f"cannot create cgroup {path}: {exc.strerror or exc}") from exc
    # Left over from a sandbox that died without cleanup: reuse it only if it is empty.
    try:
        leftover = _read(path / "cgroup.procs").split()
    except OSError as exc:
        raise SandboxStartError(f"cannot read {path / 'cgroup.procs'}: {exc}") from exc
    if leftover:
        raise SandboxStateError(
            f"cgroup {path} already exists and holds processes {leftover}; another sandbox "
            "with this name is running (stop it, or pick another name)"
        )
    # Recreate rather than reuse, so old limits and event counters do not carry over.
    try:
        path.rmdir()
        path.mkdir(mode=0o755)
    except OSError as exc:
        raise SandboxStartError(
            f"cannot recreate leftover cgroup {path}: {exc.strerror or exc}"
        ) from exc
