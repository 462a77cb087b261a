"""The seccomp filter, judged by running the exported BPF through a small classic-BPF interpreter.

The kernel's own verdicts are checked in tests/integration/test_seccomp_bwrap.py; here
every rule (and the personality allow-list exhaustively over interesting values) is
checked without starting a process.
"""

from __future__ import annotations

import errno
import platform
import random
import struct
import sys

import pytest

from stockade._errors import BackendUnavailableError
from stockade.backends import _seccomp
from stockade.backends._seccomp import FILTER_DESCRIPTION, build_filter

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_BIT = 0x40000000

ALLOW = 0x7FFF0000
KILL_PROCESS = 0x80000000
EPERM = 0x00050000 | errno.EPERM
ENOSYS = 0x00050000 | errno.ENOSYS

# x86_64 and i386 syscall numbers used below.
NR64 = {
    "read": 0,
    "ioctl": 16,
    "clone": 56,
    "ptrace": 101,
    "personality": 135,
    "mount": 165,
    "keyctl": 250,
    "unshare": 272,
    "process_vm_readv": 310,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "clone3": 435,
}
NR32 = {"read": 3, "ptrace": 26, "ioctl": 54, "clone": 120, "personality": 136, "bpf": 357}

x86_64_only = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="syscall numbers below are x86_64's"
)


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Evaluate a seccomp classic-BPF program on one seccomp_data; return the action."""
    full_args = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0x401000, *full_args)
    insns = list(struct.iter_unpack("<HBBI", program))
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode = code & 0xE0
            if mode == 0x20:
                (a,) = struct.unpack_from("<I", data, k)
            elif mode == 0x00:
                a = k
            elif mode == 0x60:
                a = mem[k]
            else:
                raise AssertionError(f"unsupported LD mode {code:#x}")
        elif cls == 0x01:  # LDX
            x = k if code & 0xE0 == 0x00 else mem[k]
        elif cls == 0x02:  # ST
            mem[k] = a
        elif cls == 0x03:  # STX
            mem[k] = x
        elif cls == 0x04:  # ALU
            operand = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x00:
                a = a + operand
            elif op == 0x10:
                a = a - operand
            elif op == 0x40:
                a = a | operand
            elif op == 0x50:
                a = a & operand
            elif op == 0x60:
                a = a << (operand & 31)
            elif op == 0x70:
                a = a >> (operand & 31)
            elif op == 0xA0:
                a = a ^ operand
            else:
                raise AssertionError(f"unsupported ALU op {code:#x}")
            a &= 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            op = code & 0xF0
            operand = x if code & 0x08 else k
            if op == 0x00:
                pc += k
                continue
            taken = {
                0x10: a == operand,
                0x20: a > operand,
                0x30: a >= operand,
                0x40: bool(a & operand),
            }[op]
            pc += jt if taken else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        elif cls == 0x07:  # MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
        else:
            raise AssertionError(f"unsupported opcode {code:#x}")


def test_filter_is_a_nonempty_bpf_program() -> None:
    program = build_filter()
    assert isinstance(program, bytes)
    assert len(program) > 0
    assert len(program) % 8 == 0
    assert len(program) // 8 <= 4096  # BPF_MAXINSNS


def test_filter_is_deterministic_and_cached_per_arguments() -> None:
    assert build_filter() is build_filter()
    assert build_filter.__wrapped__() == build_filter()
    assert build_filter(allow_ptrace_children=True) != build_filter()


@x86_64_only
@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("bpf", ()),
        ("keyctl", ()),
        ("mount", ()),
        ("unshare", (0x10000000,)),
        ("userfaultfd", ()),
        ("io_uring_setup", ()),
        ("ptrace", (0,)),
        ("process_vm_readv", ()),
    ],
)
def test_dangerous_syscalls_get_eperm(name: str, args: tuple[int, ...]) -> None:
    assert run_bpf(build_filter(), NR64[name], AUDIT_ARCH_X86_64, args) == EPERM


@x86_64_only
def test_ordinary_syscalls_are_allowed() -> None:
    program = build_filter()
    assert run_bpf(program, NR64["read"], AUDIT_ARCH_X86_64) == ALLOW
    assert run_bpf(program, 1, AUDIT_ARCH_X86_64) == ALLOW  # write
    assert run_bpf(program, 59, AUDIT_ARCH_X86_64) == ALLOW  # execve
    tcgets = 0x5401
    assert run_bpf(program, NR64["ioctl"], AUDIT_ARCH_X86_64, (1, tcgets)) == ALLOW


@x86_64_only
def test_clone_refuses_namespace_flags_but_allows_threads_and_fork() -> None:
    program = build_filter()
    nr = NR64["clone"]
    pthread_flags = 0x003D0F00
    fork_flags = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
    assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (pthread_flags,)) == ALLOW
    assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (fork_flags,)) == ALLOW
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000):
        assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (flag | 17,)) == EPERM
        assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (flag | fork_flags,)) == EPERM
    assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (0x40000000 | (1 << 40),)) == EPERM


@x86_64_only
def test_clone3_is_enosys_so_libc_falls_back_to_clone() -> None:
    assert run_bpf(build_filter(), NR64["clone3"], AUDIT_ARCH_X86_64) == ENOSYS


@x86_64_only
def test_tiocsti_refused_even_with_junk_in_the_upper_bits() -> None:
    program = build_filter()
    nr = NR64["ioctl"]
    assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (0, 0x5412)) == EPERM
    assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (0, 0x541C)) == EPERM
    assert run_bpf(program, nr, AUDIT_ARCH_X86_64, (0, 0xDEAD_0000_5412)) == EPERM


def _persona_allowed(value: int) -> bool:
    return value & 0xFFFFFFFF in {0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF}


@x86_64_only
def test_personality_allows_only_default_personas_and_the_query() -> None:
    program = build_filter()
    rng = random.Random(1234)
    values = {0, 8, 0x20000, 0x20008, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x0040000, 0x0400000}
    values |= {1 << bit for bit in range(64)}
    values |= {0xFFFFFFFF ^ (1 << bit) for bit in range(32)}
    values |= {0x20008 | (1 << bit) for bit in range(32)}
    values |= {rng.getrandbits(32) for _ in range(3000)}
    values |= {rng.getrandbits(64) for _ in range(1000)}
    for arch, nr in (
        (AUDIT_ARCH_X86_64, NR64["personality"]),
        (AUDIT_ARCH_I386, NR32["personality"]),
    ):
        for value in values:
            if arch == AUDIT_ARCH_I386:
                value &= 0xFFFFFFFF
            verdict = run_bpf(program, nr, arch, (value,))
            assert verdict == (ALLOW if _persona_allowed(value) else EPERM), hex(value)


@x86_64_only
def test_i386_abi_gets_the_same_rules() -> None:
    program = build_filter()
    assert run_bpf(program, NR32["read"], AUDIT_ARCH_I386) == ALLOW
    assert run_bpf(program, NR32["bpf"], AUDIT_ARCH_I386) == EPERM
    assert run_bpf(program, NR32["ptrace"], AUDIT_ARCH_I386) == EPERM
    assert run_bpf(program, NR32["clone"], AUDIT_ARCH_I386, (0x10000011,)) == EPERM
    assert run_bpf(program, NR32["ioctl"], AUDIT_ARCH_I386, (0, 0x5412)) == EPERM


@x86_64_only
def test_x32_and_foreign_arches_are_killed() -> None:
    program = build_filter()
    assert run_bpf(program, X32_BIT | NR64["read"], AUDIT_ARCH_X86_64) == KILL_PROCESS
    assert run_bpf(program, 63, AUDIT_ARCH_AARCH64) == KILL_PROCESS


@x86_64_only
def test_allow_ptrace_children_lifts_only_the_ptrace_group() -> None:
    program = build_filter(allow_ptrace_children=True)
    assert run_bpf(program, NR64["ptrace"], AUDIT_ARCH_X86_64) == ALLOW
    assert run_bpf(program, NR64["process_vm_readv"], AUDIT_ARCH_X86_64) == ALLOW
    assert run_bpf(program, NR64["bpf"], AUDIT_ARCH_X86_64) == EPERM
    assert run_bpf(program, NR64["clone"], AUDIT_ARCH_X86_64, (0x10000011,)) == EPERM


def test_unknown_syscall_names_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    extended = (*_seccomp._DENIED, ("test", ("stockade_no_such_syscall",)))
    monkeypatch.setattr(_seccomp, "_DENIED", extended)
    assert build_filter.__wrapped__() == build_filter()


def test_missing_libseccomp_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyseccomp", None)
    with pytest.raises(BackendUnavailableError, match="libseccomp2") as info:
        build_filter.__wrapped__()
    assert "libseccomp2" in info.value.fix


def test_description_names_every_denied_syscall() -> None:
    text = "\n".join(FILTER_DESCRIPTION)
    for _why, names in (*_seccomp._DENIED, _seccomp._PTRACE):
        for name in names:
            assert name in text
    for word in ("clone3", "CLONE_NEWUSER", "TIOCSTI", "personality", "x32"):
        assert word in text
