"""Seccomp deny-list filter for the namespace backend, as the raw BPF that `bwrap --seccomp` reads.

The filter allows by default and refuses the kernel interfaces a sandbox never needs and
that have a long record of privilege escalations (see ``FILTER_DESCRIPTION``).

Design choices:

* Architectures: on x86_64 the i386 ABI is added with the same rules, so a 32-bit binary
  (or ``int 0x80`` from a 64-bit one) meets the deny list under the i386 syscall numbers
  instead of slipping past it. Every other ABI, x32 included, hits the bad-arch action,
  which kills the process: x32 is off in most distribution kernels and nobody needs it.
* ``clone`` is inspected for namespace flags; ``clone3`` passes its flags in memory that
  seccomp cannot read, so it fails with ENOSYS and glibc falls back to ``clone``.
* Argument checks mask to 32 bits where the kernel truncates the argument (ioctl request,
  personality), so junk in the upper half cannot dodge a rule.
* Syscall names the installed libseccomp does not know are skipped: an old libseccomp on a
  new kernel still yields a working filter.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import os
from types import ModuleType

from stockade._errors import BackendUnavailableError

__all__ = ["FILTER_DESCRIPTION", "build_filter"]

_FIX = "install the libseccomp2 package (Debian/Ubuntu: apt-get install libseccomp2)"

# (why it is denied, syscalls); each returns EPERM.
_DENIED: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "load or remove kernel modules",
        ("init_module", "finit_module", "delete_module", "create_module", "query_module"),
    ),
    ("replace the running kernel", ("kexec_load", "kexec_file_load", "reboot")),
    ("load eBPF programs", ("bpf",)),
    ("use performance counters", ("perf_event_open",)),
    ("use the kernel keyrings, which are not namespaced", ("keyctl", "add_key", "request_key")),
    (
        "mount or change the mount tree",
        (
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "move_mount",
            "open_tree",
            "open_tree_attr",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
        ),
    ),
    ("enter or create namespaces", ("setns", "unshare")),
    ("use userfaultfd, a common exploit primitive", ("userfaultfd",)),
    (
        "use io_uring, whose operations bypass syscall filtering",
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    ),
    ("open files by handle, bypassing the mount tree", ("open_by_handle_at",)),
    (
        "administer the host",
        ("swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "lookup_dcookie", "syslog"),
    ),
    (
        "set the host clock",
        (
            "settimeofday",
            "stime",
            "clock_settime",
            "clock_settime64",
            "clock_adjtime",
            "clock_adjtime64",
        ),
    ),
    ("touch I/O ports or legacy x86 modes", ("iopl", "ioperm", "vm86", "vm86old")),
    ("use obsolete interfaces", ("nfsservctl", "uselib", "_sysctl")),
    ("watch the whole filesystem", ("fanotify_init",)),
)

# Lifted by allow_ptrace_children=True, for debuggers: the pid namespace already hides
# every process outside the sandbox.
_PTRACE = (
    "trace or read the memory of other processes",
    ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"),
)

_CLONE_NAMESPACE_FLAGS: tuple[tuple[str, int], ...] = (
    ("CLONE_NEWNS", 0x00020000),
    ("CLONE_NEWCGROUP", 0x02000000),
    ("CLONE_NEWUTS", 0x04000000),
    ("CLONE_NEWIPC", 0x08000000),
    ("CLONE_NEWUSER", 0x10000000),
    ("CLONE_NEWPID", 0x20000000),
    ("CLONE_NEWNET", 0x40000000),
    # CLONE_NEWTIME (0x80) shares bits with the exit signal in clone(); it is reachable
    # only through clone3 and unshare, both refused.
)

_TIOCSTI = 0x5412  # push characters into the terminal's input queue
_TIOCLINUX = 0x541C  # console selection and paste, same effect
_LOW32 = 0xFFFFFFFF

# personality() values allowed, as Docker does: PER_LINUX (0), PER_LINUX32 (8), UNAME26
# (0x20000), both, and the 0xffffffff query. Bits 3 and 17 are the only ones they use.
_PERSONA_BITS = (3, 17)
_PERSONA_QUERY = 0xFFFFFFFF

FILTER_DESCRIPTION: list[str] = [
    *(f"{why}: {', '.join(names)} -> EPERM" for why, names in _DENIED),
    f"{_PTRACE[0]}: {', '.join(_PTRACE[1])} -> EPERM (unless allow_ptrace_children)",
    "create namespaces through clone ("
    + ", ".join(name for name, _ in _CLONE_NAMESPACE_FLAGS)
    + ") -> EPERM",
    "clone3 -> ENOSYS (its flags are not visible to seccomp; glibc falls back to clone)",
    "inject terminal input: ioctl TIOCSTI, TIOCLINUX -> EPERM",
    "personality other than PER_LINUX, PER_LINUX32, UNAME26 or the query -> EPERM",
    "foreign syscall ABIs other than i386 on x86_64 (x32 included) -> process killed",
]


def _load_libseccomp() -> ModuleType:
    try:
        # Imported on first use: the C library is loaded only when a filter is built.
        return importlib.import_module("pyseccomp")
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailableError(
            f"cannot load libseccomp through pyseccomp ({exc}); {_FIX}",
            backend="namespace",
            fix=_FIX,
        ) from exc


def _persona_rules() -> list[tuple[int, int]]:
    """(mask, value) pairs; personality(x) is denied when ``x & mask == value`` for any pair.

    Deny "bit i set and bit next(i) clear" along a cycle through every bit no allowed
    persona uses, plus one edge into each of bits 3 and 17. A value escapes every rule
    only if its set bits are closed under those edges: no free bits (so 0, 8, 0x20000 or
    0x20008) or all 32 bits (the query). 32 single-comparison rules express what
    libseccomp cannot say directly ("not in this set").
    """
    free = [bit for bit in range(32) if bit not in _PERSONA_BITS]
    edges = [(free[i], free[(i + 1) % len(free)]) for i in range(len(free))]
    edges += [(free[0], bit) for bit in _PERSONA_BITS]
    return [((1 << a) | (1 << b), 1 << a) for a, b in edges]


@functools.lru_cache(maxsize=4)
def build_filter(*, allow_ptrace_children: bool = False) -> bytes:
    """Return the filter as a raw BPF program (an array of 8-byte ``sock_filter``).

    Raises BackendUnavailableError when libseccomp cannot be loaded.
    """
    sc = _load_libseccomp()
    eperm = sc.ERRNO(errno.EPERM)
    filt = sc.SyscallFilter(sc.ALLOW)
    if sc.system_arch() == sc.Arch.X86_64:
        filt.add_arch(sc.Arch.X86)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    # Binary-tree dispatch, so an ordinary syscall does not walk past every rule. Older
    # libseccomp (< 2.5) refuses the attribute; a linear filter is just as correct.
    with contextlib.suppress(OSError):
        filt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)

    def add(action: int, name: str, *args: object) -> None:
        number = sc.resolve_syscall(sc.Arch.NATIVE, name)
        if number == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp
            return
        filt.add_rule(action, number, *args)

    groups = _DENIED if allow_ptrace_children else (*_DENIED, _PTRACE)
    for _why, names in groups:
        for name in names:
            add(eperm, name)
    add(sc.ERRNO(errno.ENOSYS), "clone3")
    for _flag_name, flag in _CLONE_NAMESPACE_FLAGS:
        add(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for request in (_TIOCSTI, _TIOCLINUX):
        add(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW32, request))
    for mask, value in _persona_rules():
        add(eperm, "personality", sc.Arg(0, sc.MASKED_EQ, mask, value))

    with open(os.memfd_create("stockade-seccomp", os.MFD_CLOEXEC), "w+b") as out:
        filt.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise BackendUnavailableError(
            f"libseccomp exported a malformed BPF program ({len(program)} bytes); {_FIX}",
            backend="namespace",
            fix=_FIX,
        )
    return program
