"""The seccomp filter, loaded by a real bubblewrap, against the real kernel.

Each probe runs twice: under the filter, and in the same sandbox without it. A call that
fails with EPERM under the filter but not in the control run is refused by the filter,
not by missing capabilities or a sysctl.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from typing import Any

import pytest

from stockade.backends._seccomp import build_filter

PYTHON = "/usr/bin/python3"

# Runs inside the sandbox; prints {probe: 0 | errno | "ok"}.
PROBE = r"""
import ctypes, errno, fcntl, json, os, subprocess, sys, termios, threading

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def sys_call(nr, *args):
    ctypes.set_errno(0)
    res = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return ctypes.get_errno() if res == -1 else 0

results = {}
results["bpf"] = sys_call(321, 0, 0, 0)                       # BPF_MAP_CREATE, NULL attr
results["perf_event_open"] = sys_call(298, 0, 0, -1, -1, 0)    # NULL attr
results["keyctl"] = sys_call(250, 0, -3, 0)                    # KEYCTL_GET_KEYRING_ID session
results["add_key"] = sys_call(248, 0, 0, 0, 0, 0)
results["init_module"] = sys_call(175, 0, 0, 0)
results["io_uring_setup"] = sys_call(425, 1, 0)                # NULL params
results["userfaultfd"] = sys_call(323, os.O_CLOEXEC | 1)      # UFFD_USER_MODE_ONLY
results["setns"] = sys_call(308, -1, 0)
results["clone3"] = sys_call(435, 0, 0)
results["personality_no_aslr"] = sys_call(135, 0x0040000)      # ADDR_NO_RANDOMIZE
results["personality_query"] = sys_call(135, 0xFFFFFFFF)
results["personality_linux"] = sys_call(135, 0)
results["mount"] = sys_call(
    165, ctypes.cast(ctypes.c_char_p(b"none"), ctypes.c_void_p).value,
    ctypes.cast(ctypes.c_char_p(b"/tmp"), ctypes.c_void_p).value,
    ctypes.cast(ctypes.c_char_p(b"tmpfs"), ctypes.c_void_p).value, 0, 0)
if sys.argv[1] == "filtered":
    # Only under the filter: if these succeeded they would change this process.
    results["ptrace_traceme"] = sys_call(101, 0, 0, 0, 0)
    results["clone_newuser"] = sys_call(56, 0x10000000 | 17, 0, 0, 0, 0)
results["unshare_newuser"] = sys_call(272, 0x10000000)

def tiocsti():
    # In a new session whose controlling terminal is the pty, so that only the filter
    # (not the "not your terminal" check) can refuse the ioctl.
    master, slave = os.openpty()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        try:
            fcntl.ioctl(slave, termios.TIOCSTI, b"x")
            os._exit(0)
        except OSError as exc:
            os._exit(exc.errno)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

results["tiocsti"] = tiocsti()

# Ordinary work still works: fork/exec, file IO, threads (clone3 -> ENOSYS -> clone).
results["exec"] = subprocess.run(["/usr/bin/true"]).returncode
with open("/tmp/f", "w") as f:
    f.write("hello")
with open("/tmp/f") as f:
    results["file_io"] = 0 if f.read() == "hello" else 1
box = []
t = threading.Thread(target=box.append, args=(1,))
t.start(); t.join()
results["thread"] = 0 if box == [1] else 1
pid = os.fork()
if pid == 0:
    os._exit(7)
results["fork"] = 0 if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7 else 1
print(json.dumps(results))
"""

BWRAP_BASE = [
    "bwrap",
    "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/bin", "/bin",
    "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64",
    "--proc", "/proc",
    "--dev", "/dev",
    "--tmpfs", "/tmp",
    "--unshare-all",
    "--die-with-parent",
]  # fmt: skip


def _bwrap_unavailable() -> str | None:
    if platform.machine() != "x86_64":
        return "the probe uses x86_64 syscall numbers"
    if shutil.which("bwrap") is None:
        return "bwrap not found on PATH; install the 'bubblewrap' package"
    if not os.path.exists(PYTHON):
        return f"{PYTHON} not found"
    res = subprocess.run([*BWRAP_BASE, "/usr/bin/true"], capture_output=True, text=True)
    if res.returncode != 0:
        return f"bwrap cannot start a sandbox here: {res.stderr.strip()}"
    return None


_REASON = _bwrap_unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _run_probe(*, filtered: bool) -> dict[str, Any]:
    argv = list(BWRAP_BASE)
    pass_fds: tuple[int, ...] = ()
    fd = -1
    if filtered:
        fd = os.memfd_create("seccomp-test", 0)
        os.write(fd, build_filter())
        os.lseek(fd, 0, os.SEEK_SET)
        argv += ["--seccomp", str(fd)]
        pass_fds = (fd,)
    argv += [PYTHON, "-c", PROBE, "filtered" if filtered else "control"]
    try:
        res = subprocess.run(argv, pass_fds=pass_fds, capture_output=True, text=True, timeout=60)
    finally:
        if fd >= 0:
            os.close(fd)
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    return result


@pytest.fixture(scope="module")
def filtered() -> dict[str, Any]:
    return _run_probe(filtered=True)


@pytest.fixture(scope="module")
def control() -> dict[str, Any]:
    return _run_probe(filtered=False)


DENIED = [
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "init_module",
    "io_uring_setup",
    "userfaultfd",
    "setns",
    "mount",
    "ptrace_traceme",
    "clone_newuser",
    "unshare_newuser",
    "personality_no_aslr",
    "tiocsti",
]


@pytest.mark.parametrize("probe", DENIED)
def test_dangerous_call_fails_with_eperm(filtered: dict[str, Any], probe: str) -> None:
    assert filtered[probe] == 1, f"{probe}: errno {filtered[probe]}"


def test_clone3_is_enosys(filtered: dict[str, Any]) -> None:
    assert filtered["clone3"] == 38


# Calls that get past every permission check in the same sandbox without the filter
# (success, or an argument error), so their EPERM above comes from seccomp.
UNFILTERED_OK = [
    "keyctl",
    "add_key",
    "perf_event_open",
    "io_uring_setup",
    "userfaultfd",
    "setns",
    "unshare_newuser",
    "personality_no_aslr",
    "tiocsti",
]
if os.geteuid() == 0:
    UNFILTERED_OK += ["bpf", "mount"]  # bwrap run by root keeps capabilities


@pytest.mark.parametrize("probe", UNFILTERED_OK)
def test_the_filter_not_the_sandbox_refuses(control: dict[str, Any], probe: str) -> None:
    assert control[probe] != 1, f"{probe}: errno {control[probe]} without the filter"


@pytest.mark.parametrize(
    "probe", ["exec", "file_io", "thread", "fork", "personality_query", "personality_linux"]
)
def test_ordinary_work_still_works(filtered: dict[str, Any], probe: str) -> None:
    assert filtered[probe] == 0
