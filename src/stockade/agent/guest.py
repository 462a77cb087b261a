#!/usr/bin/env python3
"""The stockade guest agent: serves the agent protocol inside a sandbox and is the parent of
every process started in it.

This file is copied into sandboxes and run there by the sandbox's own interpreter as
``python3 -S -I guest.py [options]``, so it is standalone: stdlib only, Python 3.9+, and it
never imports stockade (it belongs to the guest zone: tests/unit/test_guest_zone.py). The
contract it implements lives on the host side in ``stockade.protocol.framing`` (4-byte
big-endian length + UTF-8 JSON frames) and ``stockade.protocol.messages`` (JSON-RPC 2.0
methods, results and notifications).

Startup time matters (a benchmark measures create + first exec), so the top level imports only
modules that are already loaded or cost almost nothing; ``json`` and ``signal`` are avoided
(they pull in ``re`` and ``enum``) in favour of their C halves, and everything else (ctypes,
fcntl, termios, tarfile, resource) is imported where it is needed.

The agent is single-threaded: one poll() loop (``Agent``) over the channel to the host
(``HostChannel``), children's pipes (``ProcessTable``), a signal wake-up pipe and, with
``--net-proxy`` / ``--net-forward``, the egress tunnel's listening and accepted sockets
(``TunnelStreams``); ``FileOps`` and ``Transfers`` serve fs.*. Options: ``--help``.
"""

# Lazy imports are the point (startup time), and contextlib.suppress would cost an import.
# ruff: noqa: SIM105

from __future__ import annotations

import binascii
import errno
import os
import select
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _sig
    from collections.abc import Callable, Iterator
    from typing import IO, Any
else:
    try:  # the C half of ``signal``: same functions, without importing enum
        import _signal as _sig
    except ImportError:  # pragma: no cover - not CPython
        import signal as _sig

AGENT_VERSION = "0.1.0"
PROTOCOL_VERSION = "1.3"

DEFAULT_MAX_FRAME = 8 * 1024 * 1024
CHUNK = 64 * 1024  # largest read from a child's pipe
OUT_HIGH = 4 * 1024 * 1024  # stop reading children's output above this many queued bytes
OUT_LOW = 1 * 1024 * 1024  # ... and resume below this
IN_PAUSE = 16 * 1024 * 1024  # stop reading requests while this much output is queued
STDIN_HIGH = 1024 * 1024  # process.write_stdin answers once the buffer is below this
EXIT_GRACE = 0.2  # seconds to keep reading pipes held open by a background grandchild
KEEP_FINISHED = 1024  # exit statuses remembered for late process.wait calls
MAX_PROCS = 4096
MAX_TRANSFERS = 64
TAR_CHUNK = 256 * 1024
STREAM_WINDOW = 256 * 1024  # unacknowledged bytes per stream and direction (the protocol's)
MAX_STREAM_WINDOW = 16 * 1024 * 1024  # the most agent.hello may set
RECV_WINDOW = 2 * 1024 * 1024  # what this agent buffers per stream from the host (1.2 hosts)
BINARY_FLAG = 0x80000000  # length word of a binary stream frame (protocol 1.2)
BINARY_CHUNK = 256 * 1024  # largest binary stream frame this agent sends (data bytes)
MAX_STREAMS = 256  # open tunnel streams; further connections are accepted and closed
ACCEPT_BATCH = 64  # connections accepted per poll event of a listener
ACCEPT_RETRY = 0.1  # seconds the listeners rest after accept() ran out of descriptors
ACK_BATCH = 64 * 1024  # written bytes acknowledged together (below every window)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a redirected connection was going
MAX_DENIED = 64  # refused direct connections kept open at once (to let the answer arrive)
DENIED_LINGER = 1.0  # seconds a refused connection is drained before it is closed

CAPABILITIES = ("pty", "tar", "signals")

# Landlock (include/uapi/linux/landlock.h). The syscall numbers are the same on every
# architecture that uses the generic table (x86_64 and aarch64 included).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LL_EXECUTE = 1 << 0
LL_WRITE_FILE = 1 << 1
LL_READ_FILE = 1 << 2
LL_READ_DIR = 1 << 3
LL_REFER = 1 << 13
LL_TRUNCATE = 1 << 14
LL_IOCTL_DEV = 1 << 15
LL_ABI1_ALL = (1 << 13) - 1
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
LL_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
LL_SCOPE_SIGNAL = 1 << 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
#: Devices every process expects; granted read-write whenever Landlock is on.
LANDLOCK_DEVICES = (
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
)

RLIMIT_NAMES = {
    "nproc": "RLIMIT_NPROC",
    "as": "RLIMIT_AS",
    "nofile": "RLIMIT_NOFILE",
    "core": "RLIMIT_CORE",
    "fsize": "RLIMIT_FSIZE",
    "cpu": "RLIMIT_CPU",
}

#: errno -> protocol error code (see ERROR_CODES in stockade.protocol.messages).
ERRNO_CODES = {
    errno.ENOENT: 1,
    errno.EACCES: 2,
    errno.EPERM: 2,
    errno.EROFS: 2,
    errno.EEXIST: 3,
    errno.ENOTDIR: 4,
    errno.EISDIR: 5,
    errno.ESRCH: 6,
    errno.EFBIG: 7,
    errno.E2BIG: 7,
    errno.ENAMETOOLONG: 7,
    errno.ENOTEMPTY: 9,
    errno.EAGAIN: 10,
    errno.EMFILE: 10,
    errno.ENFILE: 10,
    errno.EBUSY: 10,
}
INVALID_PARAMS = -32602

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLDONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def log(message: str) -> None:
    """Log one line to stderr (the host redirects it to a file). Never pass secrets here."""
    try:
        os.write(2, f"stockade-agent[{os.getpid()}]: {message}\n".encode(errors="replace"))
    except OSError:
        pass


# --- JSON without importing ``json`` (which imports ``re`` and costs ~10 ms) -------------


class _ScanContext:
    """What the C scanner reads from a ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    array_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def _slow_quote(text: str) -> str:  # pragma: no cover - not CPython
    import json

    return json.dumps(text)


_quote: Callable[[str], str] = _slow_quote
_scan: Callable[[str, int], tuple[Any, int]] | None = None
try:
    import _json

    _quote = _json.encode_basestring_ascii
    _scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
except Exception:  # pragma: no cover - not CPython: the pure ``json`` module it is
    _scan = None


def json_loads(text: str) -> Any:
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    text = text.strip(" \t\r\n")
    try:
        value, end = _scan(text, 0)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON at offset {exc.value}") from None
    except SystemError:
        # The C scanner reports errors through json.decoder, which is not imported.
        raise ValueError("invalid JSON") from None
    if end != len(text):
        raise ValueError(f"extra data after JSON at offset {end}")
    return value


def _encode(obj: Any, out: list[str]) -> None:
    if isinstance(obj, str):
        out.append(_quote(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        out.append(float.__repr__(obj) if obj - obj == 0.0 else "null")
    elif isinstance(obj, dict):
        out.append("{")
        first = True
        for key, value in obj.items():
            if not first:
                out.append(",")
            first = False
            out.append(_quote(str(key)))
            out.append(":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for index, value in enumerate(obj):
            if index:
                out.append(",")
            _encode(value, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def json_dumps(obj: Any) -> bytes:
    """Compact, ASCII-only JSON."""
    out: list[str] = []
    _encode(obj, out)
    return "".join(out).encode("ascii")


def b64encode(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


# --- errors --------------------------------------------------------------------------------


class RpcError(Exception):
    """An error answer: a protocol error code and a message for the host."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class AgentExit(Exception):
    """Leave the event loop: kill every process and exit with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def os_error(exc: OSError, what: str = "") -> RpcError:
    """Map an OSError to the protocol's fixed error table."""
    number = exc.errno or 0
    code = ERRNO_CODES.get(number, 8)
    reason = exc.strerror or str(exc)
    name = errno.errorcode.get(number, "EIO" if not number else str(number))
    return RpcError(code, f"{what}: {reason}" if what else reason, {"errno": name})


# --- request parameters --------------------------------------------------------------------

_MISSING: Any = object()


class Params:
    """Validates one request's params against the schema in stockade.protocol.messages.

    Every getter removes its field; ``done`` refuses fields nobody asked for (the models
    forbid extras, and silently ignoring e.g. a future 'user' field would be unsafe).
    Fields whose default is None accept null.
    """

    def __init__(self, method: str, raw: dict[str, Any]) -> None:
        self.method = method
        self.raw = dict(raw)

    def bad(self, name: str, why: str) -> RpcError:
        return RpcError(INVALID_PARAMS, f"invalid params for {self.method}: '{name}' {why}")

    def _take(self, name: str, default: Any) -> tuple[Any, bool]:
        if name not in self.raw:
            if default is _MISSING:
                raise self.bad(name, "is required")
            return default, False
        value = self.raw.pop(name)
        if value is None:
            if default is None:
                return None, False
            raise self.bad(name, "must not be null")
        return value, True

    def integer(
        self, name: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None
    ) -> Any:
        value, given = self._take(name, default)
        if not given:
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(name, "must be an integer")
        if lo is not None and value < lo:
            raise self.bad(name, f"must be at least {lo}")
        if hi is not None and value > hi:
            raise self.bad(name, f"must be at most {hi}")
        return value

    def number(self, name: str, default: Any = _MISSING) -> Any:
        """A finite number greater than zero (the only float field is a timeout)."""
        value, given = self._take(name, default)
        if not given:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.bad(name, "must be a number")
        if not 0 < value < 1e9:
            raise self.bad(name, "must be greater than 0")
        return float(value)

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        value, given = self._take(name, default)
        if given and not isinstance(value, bool):
            raise self.bad(name, "must be a boolean")
        return value

    def string(self, name: str, default: Any = _MISSING) -> Any:
        value, given = self._take(name, default)
        if given and not isinstance(value, str):
            raise self.bad(name, "must be a string")
        if given and "\0" in value:
            raise self.bad(name, "must not contain NUL characters")
        return value

    def path(self, name: str, default: Any = _MISSING) -> Any:
        value = self.string(name, default)
        if value is not None and not 1 <= len(value) <= 4096:
            raise self.bad(name, "must be a path of 1 to 4096 characters")
        return value

    def b64(self, name: str, default: Any = _MISSING) -> Any:
        value, given = self._take(name, default)
        if not given:
            return b"" if value == "" else value
        if not isinstance(value, str) or len(value) > 12 * 1024 * 1024:
            raise self.bad(name, "must be a base64 string of at most 12 MiB")
        try:
            return binascii.a2b_base64(value)
        except (binascii.Error, ValueError):
            raise self.bad(name, "is not valid base64") from None

    def str_list(self, name: str, default: Any = _MISSING) -> Any:
        value, given = self._take(name, default)
        if given and (
            not isinstance(value, list)
            or not all(isinstance(item, str) and "\0" not in item for item in value)
        ):
            raise self.bad(name, "must be a list of strings without NUL characters")
        return value

    def str_dict(self, name: str, default: Any = _MISSING) -> Any:
        value, given = self._take(name, default)
        if given and (
            not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values())
        ):
            raise self.bad(name, "must be an object of strings")
        return value

    def obj(self, name: str, default: Any = _MISSING) -> Any:
        value, given = self._take(name, default)
        if given and not isinstance(value, dict):
            raise self.bad(name, "must be an object")
        return Params(f"{self.method} '{name}'", value) if given else value

    def done(self) -> None:
        for name in self.raw:
            raise self.bad(name, "is not a known field")


# --- processes -----------------------------------------------------------------------------


class Proc:
    """One process started by process.start, from fork until its exit is delivered."""

    def __init__(self, handle: int, pid: int, pty: bool) -> None:
        self.handle = handle
        self.pid = pid
        self.pty = pty
        self.out_fd = -1  # stdout pipe, or the pty master
        self.err_fd = -1
        self.in_fd = -1  # stdin pipe, or the pty master; -1 once closed
        self.master = -1
        self.has_stdin = False
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_waiters: list[Any] = []
        self.waiters: list[Any] = []
        self.status: tuple[int | None, int | None] | None = None  # (exit_code, signal)
        self.exited_at = 0.0
        self.grace_until = 0.0
        self.deadline: float | None = None
        self.timed_out = False
        self.done = False  # process.exit sent

    def result(self) -> dict[str, Any]:
        assert self.status is not None
        return {"exit_code": self.status[0], "signal": self.status[1], "timed_out": self.timed_out}


def _grow_pipe(fd: int) -> None:
    """Give a pipe channel room for whole frames (the 64 KiB default splits every tunnel
    frame into several wake-ups); best effort, pipes only."""
    import stat as _stat

    try:
        if _stat.S_ISFIFO(os.fstat(fd).st_mode):
            import fcntl

            fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ; the unprivileged maximum is 1 MiB
    except OSError:
        pass


def _unix_socket(fd: int) -> Any:
    """A socket object for ``fd`` when it is an AF_UNIX stream socket, else None."""
    import stat as _stat

    try:
        if not _stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        import _socket

        sock = _socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    if sock.family != _socket.AF_UNIX or sock.type != _socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


def child_exec(
    *,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    stdio: tuple[int, int, int],
    program: str,
    tty_modules: tuple[Any, Any] | None,
    rlimits: list[tuple[Any, int, int, int]],
    report_fd: int,
) -> None:
    """Runs in the forked child: new session, stdio, cwd, exec. Never returns."""
    stage = "start"
    try:
        _sig.set_wakeup_fd(-1)
        # Python ignores SIGPIPE and SIGXFSZ; exec keeps ignored signals ignored.
        for signum in (
            _sig.SIGPIPE,
            _sig.SIGXFSZ,
            _sig.SIGCHLD,
            _sig.SIGTERM,
            _sig.SIGINT,
            _sig.SIGHUP,
        ):
            _sig.signal(signum, _sig.SIG_DFL)
        os.setsid()
        for target, source in enumerate(stdio):
            os.dup2(source, target)
        if tty_modules is not None:
            fcntl, termios = tty_modules
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        for setrlimit, which, soft, hard in rlimits:
            setrlimit(which, (soft, hard))
        stage = "cwd"
        os.chdir(cwd)
        stage = "exec"
        # No imports and no PATH search here: the parent resolved the program, and after
        # Landlock the interpreter's own files may be out of reach.
        os.execve(program, argv, env)  # noqa: S606 - argv is the caller's, by design
    except BaseException as exc:
        number = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
        try:
            os.write(report_fd, f"{number}:{stage}".encode())
        except OSError:
            pass
    finally:
        os._exit(127)


def find_program(name: str, search_path: str | None, cwd: str) -> str:
    """Resolve ``name`` the way execvp does, but in the parent: no Python runs between fork
    and exec that could need the interpreter's files, and a missing program is an error
    before anything is forked."""
    if "/" in name:
        return name
    denied = False
    for directory in (os.defpath if search_path is None else search_path).split(":"):
        candidate = os.path.join(cwd, directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = True
    if denied:
        raise RpcError(2, f"cannot run {name!r}: not executable", {"errno": "EACCES"})
    raise RpcError(1, f"cannot run {name!r}: not found on PATH", {"errno": "ENOENT"})


# --- tar -----------------------------------------------------------------------------------


class TarRefused(Exception):
    """A tar member that would land outside the target or is of a forbidden type."""


def _member_parts(name: str) -> list[str]:
    if name.startswith("/"):
        raise TarRefused(f"refusing tar member {name!r}: absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise TarRefused(f"refusing tar member {name!r}: path contains '..'")
    return parts


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _safe_dir(root: str, parts: list[str]) -> str:
    """Create the directories ``parts`` under ``root``; refuse symlinks leading outside."""
    path = root
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path) and not _inside(root, os.path.realpath(path)):
            raise TarRefused(f"refusing to extract through symlink {path!r}: leads outside")
        if not os.path.isdir(path):
            os.mkdir(path, 0o755)
    return path


def extract_tar(fileobj: IO[bytes], dest: str) -> int:
    """Extract a tar archive into ``dest`` refusing anything that could escape it."""
    import tarfile

    root = os.path.realpath(dest)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:*") as archive:
            return _extract_members(archive, archive.getmembers(), root)
    except (tarfile.TarError, EOFError) as exc:
        raise RpcError(8, f"not a valid tar archive: {exc}") from None


def _extract_members(archive: Any, members: list[Any], root: str) -> int:
    """Check every member first (nothing is written if one is refused), then extract."""
    plan: list[tuple[list[str], Any]] = []
    for member in members:
        parts = _member_parts(member.name)
        if not parts:
            continue  # the archive's root directory
        if member.issym():
            if member.linkname.startswith("/"):
                raise TarRefused(f"refusing symlink {member.name!r}: absolute target")
            target = os.path.normpath(os.path.join("/".join(parts[:-1]), member.linkname))
            if target == ".." or target.startswith("../"):
                raise TarRefused(f"refusing symlink {member.name!r}: target is outside")
        elif member.islnk():
            _member_parts(member.linkname)
        elif not (member.isfile() or member.isdir()):
            raise TarRefused(
                f"refusing tar member {member.name!r}: devices, fifos and other special "
                "files are not extracted"
            )
        plan.append((parts, member))

    count = 0
    dirs: list[tuple[str, int, float]] = []
    for parts, member in plan:
        parent = _safe_dir(root, parts[:-1])
        path = os.path.join(parent, parts[-1])
        if member.isdir():
            _safe_dir(root, parts)
            dirs.append((path, member.mode & 0o7777, member.mtime))
        elif member.issym():
            _remove_non_dir(path)
            os.symlink(member.linkname, path)
        elif member.islnk():
            source = os.path.join(root, *_member_parts(member.linkname))
            if not _inside(root, os.path.realpath(os.path.dirname(source))):
                raise TarRefused(f"refusing hard link {member.name!r}: target is outside")
            _remove_non_dir(path)
            os.link(source, path, follow_symlinks=False)
        else:
            _extract_file(archive, member, path)
        count += 1
    for path, mode, mtime in reversed(dirs):
        os.chmod(path, mode & 0o1777)
        os.utime(path, (mtime, mtime))
    return count


def _remove_non_dir(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise FileExistsError(errno.EEXIST, "a directory is in the way", path) from None


def _extract_file(archive: Any, member: Any, path: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        os.unlink(path)  # an existing symlink: replace it, never write through it
        fd = os.open(path, flags, 0o600)
    try:
        source = archive.extractfile(member)
        if source is not None:
            while True:
                block = source.read(TAR_CHUNK)
                if not block:
                    break
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view) :]
        os.fchmod(fd, member.mode & 0o777)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def tar_stream(top: str) -> Iterator[bytes]:
    """Pack ``top`` (a file, or a directory's contents) as a tar stream, chunk by chunk."""
    import stat
    import tarfile

    st = os.lstat(top)
    if stat.S_ISDIR(st.st_mode):
        entries = _walk(top)
    else:
        entries = iter([(top, os.path.basename(top) or "file", st)])
    written = 0
    for path, name, info in entries:
        member = tarfile.TarInfo(name)
        member.mtime = int(info.st_mtime)
        member.mode = stat.S_IMODE(info.st_mode)
        member.uid, member.gid = info.st_uid, info.st_gid
        member.uname = member.gname = ""
        size = 0
        if stat.S_ISDIR(info.st_mode):
            member.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(info.st_mode):
            member.type = tarfile.SYMTYPE
            member.linkname = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            member.type = tarfile.REGTYPE
            member.size = size = info.st_size
        else:
            continue  # sockets, fifos and devices are not packed
        header = member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        written += len(header)
        yield header
        if size:
            for block in _file_blocks(path, size):
                written += len(block)
                yield block
    end = b"\0" * (2 * tarfile.BLOCKSIZE)
    written += len(end)
    yield end + b"\0" * (-written % tarfile.RECORDSIZE)


def _walk(top: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """Depth first, sorted by name, without following symlinks; no recursion limit."""

    def listing(directory: str) -> Iterator[Any]:
        with os.scandir(directory) as it:
            return iter(sorted(it, key=lambda entry: entry.name))

    stack: list[tuple[Iterator[Any], str]] = [(listing(top), "")]
    while stack:
        items, prefix = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        name = prefix + entry.name
        yield entry.path, name, entry.stat(follow_symlinks=False)
        if entry.is_dir(follow_symlinks=False):
            stack.append((listing(entry.path), name + "/"))


def _file_blocks(path: str, size: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes (zero-padded if the file shrank), then padding to 512."""
    remaining = size
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        while remaining:
            block = os.read(fd, min(TAR_CHUNK, remaining))
            if not block:
                block = b"\0" * min(TAR_CHUNK, remaining)
            remaining -= len(block)
            yield block
    finally:
        os.close(fd)
    if size % 512:
        yield b"\0" * (512 - size % 512)


class Upload:
    """fs.upload_tar: chunks go to an unlinked temporary file, extracted at eof."""

    def __init__(self, dest: str, fd: int) -> None:
        self.dest = dest
        self.fd = fd


class Download:
    """fs.download_tar: a tar stream generated on demand, so memory stays bounded."""

    def __init__(self, stream: Iterator[bytes]) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.done = False


def _temp_file(directory: str) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(directory, flags | os.O_TMPFILE, 0o600)
    except (OSError, AttributeError):
        pass
    for attempt in range(100):
        path = os.path.join(directory, f".stockade-upload-{os.getpid()}-{attempt}")
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        os.unlink(path)
        return fd
    raise FileExistsError(errno.EEXIST, "no free temporary file name", directory)


# --- Landlock, rlimits, prctl --------------------------------------------------------------


def _libc() -> Any:
    """libc through ctypes, or None when this Python has no ctypes (minimal images)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError) as exc:
        log(f"ctypes is unavailable ({exc}): no Landlock, no child subreaper")
        return None
    libc.syscall.restype = ctypes.c_long
    return libc


def set_subreaper(libc: Any) -> None:
    import ctypes

    args = (ctypes.c_long(PR_SET_CHILD_SUBREAPER), ctypes.c_long(1)) + (ctypes.c_long(0),) * 3
    if libc.prctl(*args) != 0:
        log(f"could not become a child subreaper: {os.strerror(ctypes.get_errno())}")


def apply_landlock(libc: Any, ro: list[str], rw: list[str], scope: bool) -> int:
    """Restrict this process (and so every child) with Landlock; return the ABI enforced.

    Raises OSError when the kernel has no Landlock or a step fails.
    """
    import ctypes

    def syscall(number: int, *args: Any) -> int:
        result = int(libc.syscall(ctypes.c_long(number), *args))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    long = ctypes.c_long
    abi = syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        ctypes.c_void_p(None),
        long(0),
        long(LANDLOCK_CREATE_RULESET_VERSION),
    )
    handled = LL_ABI1_ALL
    if abi >= 2:
        handled |= LL_REFER
    if abi >= 3:
        handled |= LL_TRUNCATE
    if abi >= 5:
        handled |= LL_IOCTL_DEV
    scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL if scope and abi >= 6 else 0
    if scope and abi < 6:
        log(f"--landlock-scope needs Landlock ABI 6; this kernel has ABI {abi}")
    order = sys.byteorder
    attr = handled.to_bytes(8, order) + bytes(8) + scoped.to_bytes(8, order)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = syscall(
        SYS_LANDLOCK_CREATE_RULESET,
        ctypes.create_string_buffer(attr, len(attr)),
        long(size),
        long(0),
    )
    try:
        read = (LL_EXECUTE | LL_READ_FILE | LL_READ_DIR) & handled
        rules = [(path, read) for path in ro] + [(path, handled) for path in rw]
        rules += [(path, handled) for path in LANDLOCK_DEVICES]
        for path, wanted in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                access = wanted if _fd_is_dir(fd) else wanted & LL_FILE_RIGHTS
                rule = access.to_bytes(8, order) + fd.to_bytes(4, order, signed=True)
                syscall(
                    SYS_LANDLOCK_ADD_RULE,
                    long(ruleset),
                    long(LANDLOCK_RULE_PATH_BENEATH),
                    ctypes.create_string_buffer(rule, len(rule)),
                    long(0),
                )
            finally:
                os.close(fd)
        if libc.prctl(long(PR_SET_NO_NEW_PRIVS), long(1), long(0), long(0), long(0)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(code)}")
        syscall(SYS_LANDLOCK_RESTRICT_SELF, long(ruleset), long(0))
    finally:
        os.close(ruleset)
    return abi


def _fd_is_dir(fd: int) -> bool:
    import stat

    return stat.S_ISDIR(os.fstat(fd).st_mode)


def parse_rlimit(spec: str) -> tuple[str, int, int]:
    name, sep, value = spec.partition("=")
    if not sep or name not in RLIMIT_NAMES:
        raise ValueError(
            f"--rlimit {spec!r}: expected NAME=SOFT[:HARD], NAME one of "
            + ", ".join(sorted(RLIMIT_NAMES))
        )
    soft_text, _, hard_text = value.partition(":")

    def number(text: str) -> int:
        if text in ("unlimited", "infinity", "inf"):
            return -1  # RLIM_INFINITY
        result = int(text)
        if result < 0:
            raise ValueError(f"--rlimit {spec!r}: negative limit")
        return result

    soft = number(soft_text)
    return name, soft, number(hard_text) if hard_text else soft


# --- options -------------------------------------------------------------------------------

USAGE = """\
usage: python3 -S -I guest.py [options]

  --fd-in N / --fd-out N   channel file descriptors (default 0 and 1: stdio)
  --device PATH            character device used both ways (e.g. virtio-serial)
  --max-frame BYTES        largest frame accepted or sent (default 8 MiB)
  --workspace PATH         default cwd and base of relative paths
                           (default /workspace if it exists, else /)
  --landlock MODE          off | best-effort | required (default off)
  --landlock-ro PATH       read/execute access beneath PATH (repeatable)
  --landlock-rw PATH       full access beneath PATH (repeatable)
  --landlock-scope         with ABI >= 6, scope signals and abstract unix sockets
  --rlimit NAME=SOFT[:HARD]  nproc, as, nofile, core, fsize, cpu (repeatable; 'unlimited')
  --net-proxy PORT         listen on 127.0.0.1:PORT (and [::1]:PORT) and tunnel each
                           connection to the host's egress proxy
  --net-forward LPORT=HOST:PORT  listen on 127.0.0.1:LPORT (and [::1]:LPORT) and tunnel
                           each connection to HOST:PORT through the host (repeatable)
"""


class Options:
    def __init__(self) -> None:
        self.fd_in = 0
        self.fd_out = 1
        self.device: str | None = None
        self.max_frame = DEFAULT_MAX_FRAME
        self.workspace: str | None = None
        self.landlock = "off"
        self.landlock_ro: list[str] = []
        self.landlock_rw: list[str] = []
        self.landlock_scope = False
        self.rlimits: list[tuple[str, int, int]] = []
        self.net_proxy: int | None = None
        self.net_forwards: list[tuple[int, str]] = []  # (local port, "host:port")


def parse_options(args: list[str]) -> Options:
    """A tiny option parser (argparse costs several milliseconds to import)."""
    opts = Options()
    flags = {"--landlock-scope", "--help", "-h"}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        name, sep, value = arg.partition("=")
        if name in flags:
            if sep:
                raise ValueError(f"{name} takes no value")
            if name == "--landlock-scope":
                opts.landlock_scope = True
                continue
            sys.stderr.write(USAGE)
            raise SystemExit(0)
        if not sep:
            if index >= len(args):
                raise ValueError(f"{name} needs a value")
            value = args[index]
            index += 1
        if name in ("--fd-in", "--fd-out", "--max-frame"):
            number = int(value)
            if number < 0 or (name == "--max-frame" and number < 1024):
                raise ValueError(f"{name}: {value!r} is out of range")
            setattr(opts, name[2:].replace("-", "_"), number)
        elif name == "--device":
            opts.device = value
        elif name == "--workspace":
            opts.workspace = value
        elif name == "--landlock":
            if value not in ("off", "best-effort", "required"):
                raise ValueError("--landlock must be off, best-effort or required")
            opts.landlock = value
        elif name == "--landlock-ro":
            opts.landlock_ro.append(value)
        elif name == "--landlock-rw":
            opts.landlock_rw.append(value)
        elif name == "--rlimit":
            opts.rlimits.append(parse_rlimit(value))
        elif name == "--net-proxy":
            opts.net_proxy = _parse_port(value, name)
        elif name == "--net-forward":
            opts.net_forwards.append(parse_forward(value))
        else:
            raise ValueError(f"unknown option {name!r}")
    ports = [port for port, _ in opts.net_forwards]
    if opts.net_proxy is not None:
        ports.append(opts.net_proxy)
    if len(set(ports)) != len(ports):
        raise ValueError("--net-proxy and --net-forward need distinct local ports")
    return opts


def _parse_port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{what}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_forward(spec: str) -> tuple[int, str]:
    """``LPORT=HOST:PORT`` -> (LPORT, "HOST:PORT"); HOST may be a bracketed IPv6 address."""
    local, sep, target = spec.partition("=")
    host, colon, port = target.rpartition(":")
    if not sep or not colon or not host or host.strip("[]") == "":
        raise ValueError(f"--net-forward {spec!r}: expected LPORT=HOST:PORT")
    if any(char.isspace() or char in "\0/@" for char in host):
        raise ValueError(f"--net-forward {spec!r}: {host!r} is not a host name or address")
    _parse_port(port, f"--net-forward {spec!r}")
    return _parse_port(local, f"--net-forward {spec!r}"), target


# --- egress tunnel: listeners and streams ------------------------------------------------
#
# Sockets come from ``_socket``, the C half of ``socket`` (which imports enum and selectors),
# and are only created when a --net option is given: without one, startup is unchanged.


class Listener:
    """A listening socket inside the sandbox; its connections become streams of ``kind``."""

    def __init__(self, sock: Any, kind: str, target: str | None, port: int) -> None:
        self.sock = sock
        self.fd: int = sock.fileno()
        self.kind = kind  # "proxy" or "forward"
        self.target = target  # "host:port" of a forward
        self.port = port


class Stream:
    """One accepted connection, relayed to the host as stream.* notifications.

    Sandbox -> host: read from the socket only while fewer than the host's window of bytes
    are unacknowledged. Host -> sandbox: ``outbuf`` holds what is not yet written (the host
    may never have more than the agent's window of it outstanding) and every write is
    acknowledged.
    The stream is forgotten once both directions are done, or at once on an error or a
    stream.close.
    """

    def __init__(self, ident: int, sock: Any) -> None:
        self.id = ident
        self.sock = sock
        self.fd: int = sock.fileno()
        self.unacked = 0  # bytes sent to the host and not acknowledged yet
        self.to_ack = 0  # bytes from the host written to the socket, not acknowledged yet
        self.read_done = False  # the socket reached EOF and stream.eof was sent
        self.outbuf = bytearray()  # bytes from the host not yet written to the socket
        self.host_eof = False  # the host sent stream.eof
        self.write_done = False  # ... and everything before it was written: SHUT_WR done


def open_listeners(opts: Options) -> list[Listener]:
    """Listen on 127.0.0.1 (required) and [::1] (when there is one) for every --net port."""
    import _socket

    specs: list[tuple[int, str, str | None]] = [
        (port, "forward", target) for port, target in opts.net_forwards
    ]
    if opts.net_proxy is not None:
        specs.insert(0, (opts.net_proxy, "proxy", None))
    listeners: list[Listener] = []
    try:
        for port, kind, target in specs:
            listeners.append(
                Listener(_listen(_socket.AF_INET, "127.0.0.1", port), kind, target, port)
            )
            try:
                sock = _listen(_socket.AF_INET6, "::1", port)
            except OSError:
                continue  # no IPv6 loopback here (or no IPv6 at all): best effort
            listeners.append(Listener(sock, kind, target, port))
    except BaseException:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def _listen(family: int, address: str, port: int) -> Any:
    import _socket

    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if family == _socket.AF_INET6:
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(MAX_STREAMS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _minor(version: str) -> int:
    """The minor number of a MAJOR.MINOR protocol version (-1 when it is not one)."""
    major, _, minor = version.partition(".")
    ours = PROTOCOL_VERSION.partition(".")[0]
    return int(minor) if major == ours and minor.isdigit() else -1


def _peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


# --- the agent: one poll() loop and the parts that own the state --------------------------
#
# ``Agent`` runs the loop and dispatches each request to the part that owns its state:
# ``ProcessTable`` (process.*), ``TunnelStreams`` (the egress tunnel: net.accept, stream.*),
# ``FileOps`` (fs.*) and ``Transfers`` (fs.upload_tar, fs.download_tar, transfer.*). The
# handler of a method ``x.y`` is ``x_y`` on its part. The parts share the ``Poller``, the
# ``HostChannel`` and the ``Workspace``, and know nothing of each other. The microVM launcher
# (images/guest/launcher.py) drives an Agent through these parts too.


def _noop_handler(signum: int, frame: Any) -> None:
    """SIGCHLD needs a Python handler for set_wakeup_fd to fire; the loop does the work."""


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, _sig.SIGKILL)
    except OSError:
        pass


class Workspace:
    """The default cwd of processes and the base of relative paths in requests; one object
    shared by the parts (the microVM launcher sets ``path`` per sandbox)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def resolve(self, path: str) -> str:
        return path if path.startswith("/") else os.path.join(self.path, path)


class Poller:
    """poll(), and the events each descriptor is watched for."""

    def __init__(self) -> None:
        self.poller = select.poll()
        self.masks: dict[int, int] = {}

    def watch(self, fd: int, mask: int) -> None:
        """Watch ``fd`` for ``mask`` from now on (0: not at all)."""
        current = self.masks.get(fd, 0)
        if mask == current:
            return
        if not mask:
            del self.masks[fd]
            self.poller.unregister(fd)
        elif current:
            self.masks[fd] = mask
            self.poller.modify(fd, mask)
        else:
            self.masks[fd] = mask
            self.poller.register(fd, mask)

    def poll(self, timeout: int | None) -> list[tuple[int, int]]:
        return self.poller.poll(timeout)


class HostChannel:
    """The connection to the host: frames in, frames out, and how far the host lags behind.

    Frames are queued and written as the channel takes them. While more than OUT_HIGH bytes
    wait, ``paused`` stops the producers (children's output, tunnel reads) until less than
    OUT_LOW do; above IN_PAUSE no request is read either. A channel that is one AF_UNIX
    stream socket (the namespace backend's socketpair) can also carry descriptors: ``sock``
    is set then, for net.accept with fd.
    """

    def __init__(self, opts: Options, poller: Poller, devnull: int) -> None:
        self.poller = poller
        self.max_frame = opts.max_frame
        self.in_fd, self.out_fd = self._take(opts, devnull)
        self.sock: Any = _unix_socket(self.out_fd)
        self.inbuf = bytearray()
        self.out: list[bytes] = []
        self.out_offset = 0
        self.out_size = 0
        #: Frames queued in ``out`` that carry a socket, in order: (frame, socket).
        self.out_fds: list[tuple[bytes, Any]] = []
        self.paused = False  # producers wait while the host lags behind
        self.input_paused = False
        self.binary = False  # binary stream frames both ways (agent.hello, protocol 1.2)
        self.closing = False  # agent.shutdown was answered: nothing after it is read

    @staticmethod
    def _take(opts: Options, devnull: int) -> tuple[int, int]:
        """Move the channel away from 0/1 so children never inherit it."""
        if opts.device is not None:
            fd = os.open(opts.device, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            if os.isatty(fd):
                _make_raw(fd)
            in_fd = out_fd = fd
        else:
            in_fd = os.dup(opts.fd_in)
            out_fd = os.dup(opts.fd_out)
            for fd in {opts.fd_in, opts.fd_out}:
                if fd > 2:
                    os.close(fd)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        for fd in {in_fd, out_fd}:
            os.set_blocking(fd, False)
            _grow_pipe(fd)
        return in_fd, out_fd

    def update_watch(self) -> None:
        read = 0 if self.input_paused else _POLLIN
        write = _POLLOUT if self.out else 0
        if self.in_fd == self.out_fd:
            self.poller.watch(self.in_fd, read | write)
        else:
            self.poller.watch(self.in_fd, read)
            self.poller.watch(self.out_fd, write)

    def update_backpressure(self) -> bool:
        """Pause or resume by what is queued; True when ``paused`` changed."""
        pause = self.out_size > OUT_HIGH if not self.paused else self.out_size > OUT_LOW
        changed = pause != self.paused
        self.paused = pause
        self.input_paused = self.out_size > IN_PAUSE
        return changed

    # --- frames in -------------------------------------------------------------------------

    def read(
        self, on_frame: Callable[[bytes], None], on_binary: Callable[[memoryview], None]
    ) -> None:
        """Read what the host sent: each whole JSON frame goes to ``on_frame``, the body of
        each binary stream frame to ``on_binary``."""
        try:
            data = os.read(self.in_fd, 1024 * 1024)
        except BlockingIOError:
            return
        except OSError as exc:
            raise AgentExit(0, f"channel read failed: {exc}") from None
        if not data:
            if self.inbuf:
                raise AgentExit(3, "host closed the channel in the middle of a frame")
            raise AgentExit(0, "host closed the channel")
        if self.inbuf:
            self.inbuf += data
            buf: bytes | bytearray = self.inbuf
        else:
            buf = data  # the common case: frames are cut out of what was read, one copy less
        offset = 0
        end = len(buf)
        with memoryview(buf) as view:
            while end - offset >= 4:
                size = int.from_bytes(view[offset : offset + 4], "big")
                binary = size & BINARY_FLAG
                if binary:
                    size ^= BINARY_FLAG
                    if not self.binary:
                        raise AgentExit(3, "host sent a binary frame, which it did not offer")
                if size > self.max_frame:
                    raise AgentExit(
                        3, f"host announced a {size}-byte frame; the limit is {self.max_frame}"
                    )
                start = offset + 4
                if end - start < size:
                    break
                offset = start + size
                if binary:
                    on_binary(view[start:offset])
                else:
                    on_frame(view[start:offset].tobytes())
                if self.closing:
                    break  # nothing after agent.shutdown is served
        if buf is self.inbuf:
            del self.inbuf[:offset]
        elif offset < end:
            self.inbuf += data[offset:]

    # --- frames out ------------------------------------------------------------------------

    def reply(self, request_id: Any, result: dict[str, Any]) -> None:
        body = json_dumps({"jsonrpc": "2.0", "id": request_id, "result": result})
        if len(body) > self.max_frame:
            self.reply_error(
                request_id,
                RpcError(
                    7,
                    f"the answer ({len(body)} bytes) exceeds the {self.max_frame}-byte frame limit",
                ),
            )
            return
        self.queue(body)

    def reply_error(self, request_id: Any, error: RpcError) -> None:
        payload: dict[str, Any] = {"code": error.code, "message": error.message[:4000]}
        if error.data is not None:
            payload["data"] = error.data
        self.queue(json_dumps({"jsonrpc": "2.0", "id": request_id, "error": payload}))

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.queue(json_dumps({"jsonrpc": "2.0", "method": method, "params": params}))

    def queue(self, body: bytes) -> None:
        self.out.append(len(body).to_bytes(4, "big"))
        self.out.append(body)
        self.out_size += 4 + len(body)

    def queue_binary(self, stream: int, data: bytes) -> None:
        """A binary stream frame: header and data go to writev() as they are, no copy."""
        self.out.append(((BINARY_FLAG | (len(data) + 4)) << 32 | stream).to_bytes(8, "big"))
        self.out.append(data)
        self.out_size += 8 + len(data)

    def queue_socket(self, body: bytes, sock: Any) -> None:
        """A frame that carries ``sock``; this copy of it is closed once the frame is sent."""
        frame = len(body).to_bytes(4, "big") + body
        self.out.append(frame)
        self.out_size += len(frame)
        self.out_fds.append((frame, sock))

    def flush(self) -> None:
        while self.out:
            count = 512
            if self.out_fds:
                # A frame that carries a socket goes alone through sendmsg: the descriptor is
                # attached to its first byte, and what precedes it is written first.
                marked = self.out_fds[0][0]
                if self.out[0] is marked and not self.out_offset:
                    if not self._send_fd_frame():
                        return
                    continue
                count = next((i for i, item in enumerate(self.out[:512]) if item is marked), 512)
            batch: list[bytes | memoryview] = list(self.out[:count])
            if self.out_offset:
                batch[0] = memoryview(self.out[0])[self.out_offset :]
            try:
                written = os.writev(self.out_fd, batch)
            except BlockingIOError:
                return
            except OSError as exc:
                raise AgentExit(0, f"channel write failed (host gone?): {exc}") from None
            self.out_size -= written
            written += self.out_offset
            index = 0
            while index < len(self.out) and written >= len(self.out[index]):
                written -= len(self.out[index])
                index += 1
            del self.out[:index]
            self.out_offset = written

    def _send_fd_frame(self) -> bool:
        """Send the frame at the head of ``out`` with its socket; False if it must wait."""
        import _socket

        frame, sock = self.out_fds[0]
        fds = sock.fileno().to_bytes(4, sys.byteorder)
        try:
            written = self.sock.sendmsg(
                [frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)], _socket.MSG_NOSIGNAL
            )
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS:
                raise AgentExit(0, f"channel write failed (host gone?): {exc}") from None
            # More descriptors in flight than this process's RLIMIT_NOFILE allows (the host
            # lags behind): drop this connection, as when the stream table is full.
            log("refusing a connection: too many sockets on their way to the host")
            del self.out_fds[0]
            del self.out[0]
            self.out_size -= len(frame)
            sock.close()
            return True
        # The host has its own reference now (or never will: the channel is gone); this
        # copy must go, or the connection would outlive the host's end of it.
        del self.out_fds[0]
        sock.close()
        self.out_size -= written
        if written < len(frame):
            self.out_offset = written  # the rest is plain bytes
        else:
            del self.out[0]
        return True

    def flush_blocking(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        poller = select.poll()
        poller.register(self.out_fd, _POLLOUT)
        while self.out:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            poller.poll(int(remaining * 1000) + 1)
            try:
                self.flush()
            except AgentExit:
                return

    def drop_sockets(self) -> None:
        """Close the sockets still waiting to be handed over (the host is gone)."""
        for _, sock in self.out_fds:
            sock.close()
        self.out_fds = []


class ProcessTable:
    """process.*: every process started here, its pipes or pty, its exit and who waits for it.

    A process stays in ``procs`` until process.exit is sent, once its output reached EOF or
    EXIT_GRACE after it exited; the last KEEP_FINISHED results answer late process.wait calls.
    """

    def __init__(
        self,
        channel: HostChannel,
        poller: Poller,
        devnull: int,
        workspace: Workspace,
        libc: Any,
        child_rlimits: list[tuple[Any, int, int, int]],
    ) -> None:
        self.channel = channel
        self.poller = poller
        self.devnull = devnull
        self.workspace = workspace
        self.base_env = dict(os.environ)
        self.libc = libc
        #: (resource.setrlimit, which, soft, hard) applied in each child before exec
        self.child_rlimits = child_rlimits
        self.subreaper = False
        self.idle_setup = False  # set after agent.hello: become the subreaper while idle
        self.next_handle = 1
        self.procs: dict[int, Proc] = {}  # running (or exited with output pending)
        self.by_pid: dict[int, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.finished: dict[int, dict[str, Any]] = {}
        self.tty: tuple[Any, Any] | None = None

    # --- the loop's side -------------------------------------------------------------------

    def event(self, fd: int, event: int) -> bool:
        """Handle a poll event if ``fd`` belongs to a process; False when it does not."""
        proc = self.by_fd.get(fd)
        if proc is None:
            return False
        if (
            fd in (proc.out_fd, proc.err_fd)
            and not self.channel.paused
            and event & (_POLLIN | _POLLDONE)
        ):
            self._read_output(proc, fd)
        if fd == proc.in_fd and proc.stdin_buf and event & (_POLLOUT | _POLLDONE):
            self._write_stdin(proc)
        return True

    def update(self, proc: Proc) -> None:
        reading = 0 if self.channel.paused else _POLLIN
        writing = _POLLOUT if proc.in_fd >= 0 and proc.stdin_buf else 0
        if proc.master >= 0:
            self.poller.watch(proc.master, (reading if proc.out_fd >= 0 else 0) | writing)
            return
        for fd in (proc.out_fd, proc.err_fd):
            if fd >= 0:
                self.poller.watch(fd, reading)
        if proc.in_fd >= 0:
            self.poller.watch(proc.in_fd, writing)

    def refresh(self) -> None:
        """The channel paused or resumed: watch every process's output accordingly."""
        for proc in self.procs.values():
            self.update(proc)

    def next_deadline(self) -> float | None:
        """The soonest timeout or end of an exit's grace period."""
        soonest: float | None = None
        for proc in self.procs.values():
            if proc.status is None:
                when = None if proc.timed_out else proc.deadline
            else:
                when = proc.grace_until
            if when is not None and (soonest is None or when < soonest):
                soonest = when
        return soonest

    def run_timers(self, now: float) -> None:
        for proc in list(self.procs.values()):
            if proc.status is None:
                if proc.deadline is not None and not proc.timed_out and now >= proc.deadline:
                    proc.timed_out = True
                    _killpg(proc.pid)
            elif now >= proc.grace_until:
                if self.channel.paused:
                    proc.grace_until = now + EXIT_GRACE  # the grace period is reading time
                else:
                    self._drain_output(proc)  # may finish it already, at EOF
                    self._finish(proc)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.by_pid.pop(pid, None)
            if proc is None:
                continue  # an orphaned descendant; reaping it is all we owe it
            if os.WIFSIGNALED(status):
                proc.status = (None, os.WTERMSIG(status))
            else:
                proc.status = (os.WEXITSTATUS(status), None)
            proc.exited_at = time.monotonic()
            proc.grace_until = proc.exited_at + EXIT_GRACE
            self._maybe_finish(proc)

    def setup_when_idle(self) -> None:
        """Become the subreaper once the loop is idle (agent.hello's answer goes first)."""
        self.idle_setup = not self.subreaper

    def ensure_subreaper(self) -> None:
        """Become the reaper of orphaned descendants (needs ctypes: done off the hot path)."""
        self.idle_setup = False
        if not self.subreaper:
            self.subreaper = True
            if self.libc is None:
                self.libc = _libc()
            if self.libc is not None:
                set_subreaper(self.libc)

    def kill_everything(self) -> None:
        """SIGKILL every process group we started and every descendant we can see; reap."""
        for proc in self.procs.values():
            _killpg(proc.pid)
        deadline = time.monotonic() + 3.0
        children_file = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
        while True:
            try:
                with open(children_file, "rb") as handle:
                    children = [int(pid) for pid in handle.read().split()]
            except (OSError, ValueError):
                children = []
            for pid in children:
                try:
                    os.kill(pid, _sig.SIGKILL)
                except OSError:
                    pass
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                if time.monotonic() > deadline:
                    log("some processes did not die; leaving them to the sandbox teardown")
                    return
                time.sleep(0.002)

    # --- output, stdin, exit ---------------------------------------------------------------

    def _read_output(self, proc: Proc, fd: int) -> bool:
        """Read one chunk; False when nothing more is to be had right now."""
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return False
        except OSError:  # EIO: the pty's other side is closed
            data = b""
        if not data:
            self._close_output(proc, fd)
            self._maybe_finish(proc)
            return False
        stream = "stderr" if fd == proc.err_fd else "stdout"
        encoded = binascii.b2a_base64(data, newline=False)
        body = (
            b'{"jsonrpc":"2.0","method":"process.output","params":{"proc":%d,"stream":"%s","data":"%s"}}'
            % (
                proc.handle,
                stream.encode(),
                encoded,
            )
        )
        self.channel.queue(body)
        return True

    def _drain_output(self, proc: Proc) -> None:
        """Last reads once the grace period is over: what the process itself left behind."""
        for fd in (proc.out_fd, proc.err_fd):
            for _ in range(16):
                if (
                    fd < 0
                    or fd not in (proc.out_fd, proc.err_fd)
                    or not self._read_output(proc, fd)
                ):
                    break

    def _close_output(self, proc: Proc, fd: int) -> None:
        if fd == proc.out_fd:
            proc.out_fd = -1
        if fd == proc.err_fd:
            proc.err_fd = -1
        if fd == proc.master:
            # The slave side is gone: nothing will read stdin any more. The master itself
            # stays open until the process is finished.
            self._close_stdin(proc, broken=True)
            self.update(proc)
            return
        self.poller.watch(fd, 0)
        del self.by_fd[fd]
        os.close(fd)

    def _maybe_finish(self, proc: Proc) -> None:
        if proc.status is not None and proc.out_fd < 0 and proc.err_fd < 0:
            self._finish(proc)

    def _finish(self, proc: Proc) -> None:
        if proc.done:
            return
        proc.done = True
        for fd in (proc.out_fd, proc.err_fd):
            if fd >= 0 and fd != proc.master:
                self._close_output(proc, fd)
        proc.out_fd = proc.err_fd = -1
        self._close_stdin(proc, broken=True)
        if proc.master >= 0:
            self.poller.watch(proc.master, 0)
            self.by_fd.pop(proc.master, None)
            os.close(proc.master)
            proc.master = -1
        self.procs.pop(proc.handle, None)
        self.by_pid.pop(proc.pid, None)
        result = proc.result()
        self.channel.notify("process.exit", {"proc": proc.handle, **result})
        for request_id in proc.waiters:
            self.channel.reply(request_id, result)
        proc.waiters = []
        self.finished[proc.handle] = result
        while len(self.finished) > KEEP_FINISHED:
            del self.finished[next(iter(self.finished))]

    def _write_stdin(self, proc: Proc) -> None:
        while proc.stdin_buf and proc.in_fd >= 0:
            try:
                written = os.write(proc.in_fd, proc.stdin_buf[:CHUNK])
            except BlockingIOError:
                break
            except OSError:  # EPIPE / EIO: the reader is gone
                self._close_stdin(proc, broken=True)
                return
            del proc.stdin_buf[:written]
        if not proc.stdin_buf and proc.stdin_eof and not proc.pty:
            self._close_stdin(proc, broken=False)
            return
        if len(proc.stdin_buf) <= STDIN_HIGH:
            waiters, proc.stdin_waiters = proc.stdin_waiters, []
            for request_id in waiters:
                self.channel.reply(request_id, {})
        self.update(proc)

    def _close_stdin(self, proc: Proc, broken: bool) -> None:
        if proc.in_fd < 0:
            return
        fd, proc.in_fd = proc.in_fd, -1
        proc.stdin_buf = bytearray()
        if fd != proc.master:
            self.poller.watch(fd, 0)
            self.by_fd.pop(fd, None)
            os.close(fd)
        else:
            self.update(proc)
        waiters, proc.stdin_waiters = proc.stdin_waiters, []
        for request_id in waiters:
            if broken:
                self.channel.reply_error(request_id, RpcError(8, "the process closed its stdin"))
            else:
                self.channel.reply(request_id, {})

    # --- process.* -------------------------------------------------------------------------

    def process_start(self, request_id: Any, p: Params) -> dict[str, Any]:
        argv: list[str] | None = p.str_list("argv", None)
        shell: str | None = p.string("shell", None)
        env: dict[str, str] = p.str_dict("env", {})
        cwd: str | None = p.path("cwd", None)
        want_stdin: bool = p.boolean("stdin", False)
        pty_params: Params | None = p.obj("pty", None)
        timeout: float | None = p.number("timeout", None)
        p.done()
        rows = cols = 0
        if pty_params is not None:
            rows = pty_params.integer("rows", 24, 1, 10000)
            cols = pty_params.integer("cols", 80, 1, 10000)
            pty_params.done()
        if (argv is None) == (shell is None):
            raise p.bad("argv", "and 'shell': give exactly one of them")
        if argv is not None and not argv:
            raise p.bad("argv", "must not be empty")
        for key, value in env.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise p.bad("env", f"has an invalid variable name or value for {key[:100]!r}")
        if len(self.procs) >= MAX_PROCS:
            raise RpcError(10, f"too many running processes (limit {MAX_PROCS})")
        command = argv if argv is not None else ["/bin/sh", "-c", str(shell)]
        full_env = dict(self.base_env)
        full_env.update(env)
        directory = self.workspace.resolve(cwd) if cwd is not None else self.workspace.path
        program = find_program(command[0], full_env.get("PATH"), directory)
        self.ensure_subreaper()

        created: list[int] = []  # every fd opened here, closed on failure

        def pipe() -> tuple[int, int]:
            r, w = os.pipe()
            created.extend((r, w))
            return r, w

        try:
            tty_modules = None
            master = -1
            stdin_w = -1
            out_r = err_r = -1
            if pty_params is not None:
                tty_modules = self._tty_modules()
                master, slave = os.openpty()
                created.extend((master, slave))
                self._set_winsize(master, rows, cols)
                stdio = (slave, slave, slave)
                child_side = [slave]
            else:
                if want_stdin:
                    stdin_r, stdin_w = pipe()
                else:
                    stdin_r = self.devnull
                out_r, out_w = pipe()
                err_r, err_w = pipe()
                stdio = (stdin_r, out_w, err_w)
                child_side = [fd for fd in stdio if fd != self.devnull]
            if tty_modules is None and not self.child_rlimits:
                pid = self._spawn(command, program, full_env, directory, stdio)
            else:
                pid = self._fork_exec(command, program, full_env, directory, stdio, tty_modules)
            for fd in child_side:
                os.close(fd)
                created.remove(fd)
        except BaseException:
            for fd in created:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise
        return self._register(pid, pty_params, master, out_r, err_r, stdin_w, want_stdin, timeout)

    def _spawn(
        self,
        command: list[str],
        program: str,
        env: dict[str, str],
        directory: str,
        stdio: tuple[int, int, int],
    ) -> int:
        """posix_spawn (vfork + exec in libc): a few times cheaper than forking Python.

        posix_spawn has no chdir, so the single-threaded agent changes its own directory
        around the call. Signals Python ignores are reset to default for the child.
        """
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
        reset = {_sig.SIGPIPE, _sig.SIGXFSZ, _sig.SIGCHLD, _sig.SIGTERM, _sig.SIGINT, _sig.SIGHUP}
        here = os.getcwd()
        try:
            os.chdir(directory)
        except OSError as exc:
            raise os_error(exc, f"cwd {directory!r}") from None
        try:
            return os.posix_spawn(
                program, command, env, file_actions=actions, setsid=True, setsigdef=reset
            )
        except OSError as exc:
            raise os_error(exc, f"cannot run {command[0]!r}") from None
        finally:
            os.chdir(here)

    def _fork_exec(
        self,
        command: list[str],
        program: str,
        env: dict[str, str],
        directory: str,
        stdio: tuple[int, int, int],
        tty_modules: Any,
    ) -> int:
        """fork + exec from Python: needed for a controlling terminal or per-child rlimits."""
        report_r, report_w = os.pipe()  # close-on-exec: EOF tells that exec succeeded
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                child_exec(
                    argv=command,
                    program=program,
                    env=env,
                    cwd=directory,
                    stdio=stdio,
                    tty_modules=tty_modules,
                    rlimits=self.child_rlimits,
                    report_fd=report_w,
                )
            os.close(report_w)
            report_w = -1
            report = b""
            while True:  # EOF once exec succeeded (close-on-exec) or the child gave up
                chunk = os.read(report_r, 256)
                if not chunk:
                    break
                report += chunk
        finally:
            os.close(report_r)
            if report_w >= 0:
                os.close(report_w)
        if report:
            os.waitpid(pid, 0)
            number_text, _, stage = report.decode("ascii", "replace").partition(":")
            number = int(number_text) if number_text.isdigit() else errno.EINVAL
            what = f"cwd {directory!r}" if stage == "cwd" else f"cannot run {command[0]!r}"
            raise os_error(OSError(number, os.strerror(number)), what)
        return pid

    def _register(
        self,
        pid: int,
        pty_params: Any,
        master: int,
        out_r: int,
        err_r: int,
        stdin_w: int,
        want_stdin: bool,
        timeout: float | None,
    ) -> dict[str, Any]:
        handle = self.next_handle
        self.next_handle += 1
        proc = Proc(handle, pid, pty_params is not None)
        if pty_params is not None:
            proc.master = proc.out_fd = proc.in_fd = master
            proc.has_stdin = True
        else:
            proc.out_fd, proc.err_fd = out_r, err_r
            proc.in_fd = stdin_w
            proc.has_stdin = want_stdin
        for fd in (proc.out_fd, proc.err_fd, proc.in_fd):
            if fd >= 0:
                os.set_blocking(fd, False)
                self.by_fd[fd] = proc
        if timeout is not None:
            proc.deadline = time.monotonic() + timeout
        self.procs[handle] = proc
        self.by_pid[pid] = proc
        self.update(proc)
        return {"proc": handle, "pid": pid}

    def process_write_stdin(self, request_id: Any, p: Params) -> dict[str, Any] | None:
        handle: int = p.integer("proc")
        data: bytes = p.b64("data", "")
        eof: bool = p.boolean("eof", False)
        p.done()
        proc = self._get(handle)
        if not proc.has_stdin:
            raise p.bad("proc", f"process {handle} was started with stdin=false")
        if proc.in_fd < 0 or proc.stdin_eof:
            raise RpcError(8, f"stdin of process {handle} is closed")
        proc.stdin_buf += data
        if eof:
            proc.stdin_eof = True
            if proc.pty:
                proc.stdin_buf += b"\x04"  # the terminal's end-of-file character
        proc.stdin_waiters.append(request_id)
        self._write_stdin(proc)
        return None  # answered by _write_stdin / _close_stdin

    def process_signal(self, request_id: Any, p: Params) -> dict[str, Any]:
        handle: int = p.integer("proc")
        signum: int = p.integer("signal", _MISSING, 1, 64)
        group: bool = p.boolean("group", True)
        p.done()
        proc = self._get(handle)
        try:
            if group:
                os.killpg(proc.pid, signum)
            elif proc.status is None:
                os.kill(proc.pid, signum)
            else:
                raise RpcError(6, f"process {handle} has exited")
        except ProcessLookupError:
            raise RpcError(6, f"process {handle} has exited") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise p.bad("signal", f"{signum} is not a valid signal") from None
            raise
        return {}

    def process_resize(self, request_id: Any, p: Params) -> dict[str, Any]:
        handle: int = p.integer("proc")
        rows: int = p.integer("rows", _MISSING, 1, 10000)
        cols: int = p.integer("cols", _MISSING, 1, 10000)
        p.done()
        proc = self._get(handle)
        if proc.master < 0:
            raise p.bad("proc", f"process {handle} has no pty")
        self._set_winsize(proc.master, rows, cols)
        return {}

    def process_wait(self, request_id: Any, p: Params) -> dict[str, Any] | None:
        handle: int = p.integer("proc")
        p.done()
        if handle in self.finished:
            return self.finished[handle]
        self._get(handle).waiters.append(request_id)
        return None

    def _get(self, handle: int) -> Proc:
        proc = self.procs.get(handle)
        if proc is None:
            if handle in self.finished:
                raise RpcError(6, f"process {handle} has exited")
            raise RpcError(6, f"no process with handle {handle}")
        return proc

    def _tty_modules(self) -> tuple[Any, Any]:
        if self.tty is None:
            import fcntl
            import termios

            self.tty = (fcntl, termios)
        return self.tty

    def _set_winsize(self, fd: int, rows: int, cols: int) -> None:
        fcntl, termios = self._tty_modules()
        order = sys.byteorder
        size = rows.to_bytes(2, order) + cols.to_bytes(2, order) + bytes(4)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, size)


class TunnelStreams:
    """The egress tunnel's guest end: the listeners inside the sandbox, and each accepted
    connection relayed to the host as a stream (net.accept, stream.*) or, from protocol 1.3
    on, handed to the host as the socket itself. Direct connections that the sandbox's netns
    redirected to the proxy port are answered with the policy's refusal here."""

    def __init__(self, channel: HostChannel, poller: Poller, listeners: list[Listener]) -> None:
        self.channel = channel
        self.poller = poller
        self.listeners = list(listeners)
        self.listener_fds = {listener.fd: listener for listener in self.listeners}
        self.accept_paused_until: float | None = None  # out of descriptors: rest a moment
        self.next_stream = 1
        self.streams: dict[int, Stream] = {}
        self.stream_fds: dict[int, Stream] = {}
        #: Direct connections the sandbox's netns redirected to us: answered with the
        #: refusal, then drained until EOF or a deadline (fd -> (socket, deadline)).
        self.denied: dict[int, tuple[Any, float]] = {}
        # A stream.data frame (base64 plus ~100 bytes of JSON) must fit in a frame.
        self.stream_chunk = min(CHUNK, (channel.max_frame - 256) // 4 * 3)
        # Set by agent.hello (``agree``); binary frames are the channel's ``binary``.
        self.host_reports = False  # the host speaks 1.2: it takes net.direct reports
        #: Accepted sockets go to the host with net.accept (fd) (1.3, a socket channel).
        self.fd_streams = False
        self.send_window = STREAM_WINDOW  # the host's buffer per stream
        self.recv_window = RECV_WINDOW  # ours (a 1.1 host sends at most STREAM_WINDOW)

    def start(self) -> None:
        for listener in self.listeners:
            self.poller.watch(listener.fd, _POLLIN)

    def add_listener(self, listener: Listener) -> None:
        """One more listener on a tunnel already serving (the microVM launcher's options)."""
        self.listeners.append(listener)
        self.listener_fds[listener.fd] = listener
        self.poller.watch(listener.fd, _POLLIN)

    def agree(self, host_reports: bool, window: int, fd_streams: bool) -> None:
        """What the host's first agent.hello asked for."""
        self.host_reports = host_reports
        self.send_window = window
        self.fd_streams = fd_streams and self.channel.sock is not None

    # --- the loop's side -------------------------------------------------------------------

    def event(self, fd: int, event: int) -> None:
        stream = self.stream_fds.get(fd)
        if stream is not None:
            self._stream_event(stream, event)
            return
        listener = self.listener_fds.get(fd)
        if listener is not None:
            self._accept(listener)
            return
        if fd in self.denied:
            self._drain_denied(fd)

    def refresh(self) -> None:
        """The channel paused or resumed: watch every stream accordingly."""
        for stream in self.streams.values():
            self._update(stream)

    def next_deadline(self) -> float | None:
        """When the listeners resume, or the soonest refused connection must be closed."""
        soonest = self.accept_paused_until
        for _, when in self.denied.values():
            if soonest is None or when < soonest:
                soonest = when
        return soonest

    def run_timers(self, now: float) -> None:
        for fd, (_, when) in list(self.denied.items()):
            if now >= when:
                self._close_denied(fd)
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            for listener in self.listeners:
                self.poller.watch(listener.fd, _POLLIN)

    def close(self) -> None:
        """Close every stream and listener (the channel is gone: nobody to tell)."""
        for fd in list(self.denied):
            self._close_denied(fd)
        for stream in list(self.streams.values()):
            self._drop(stream, None, tell_host=False)
        for listener in self.listeners:
            self.poller.watch(listener.fd, 0)
            listener.sock.close()
        self.listeners = []
        self.listener_fds = {}

    # --- connections -----------------------------------------------------------------------

    def _accept(self, listener: Listener) -> None:
        import _socket

        for _ in range(ACCEPT_BATCH):
            try:
                fd, address = listener.sock._accept()  # not in the stubs, hence sock: Any
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays queued and the listener readable: rest, or spin.
                    log(f"cannot accept on port {listener.port}: {exc.strerror}; retrying soon")
                    self.accept_paused_until = time.monotonic() + ACCEPT_RETRY
                    for each in self.listeners:
                        self.poller.watch(each.fd, 0)
                    return
                continue  # e.g. ECONNABORTED: that client is gone already
            sock = _socket.socket(fileno=fd)
            # Sockets waiting to be handed over count too: a host that does not read must
            # not make this agent hold descriptors without bound.
            if len(self.streams) + len(self.channel.out_fds) >= MAX_STREAMS:
                log(f"refusing a connection on port {listener.port}: {MAX_STREAMS} streams open")
                sock.close()
                continue
            sock.setblocking(False)
            if listener.kind == "proxy" and self._refuse_direct(sock, listener, address):
                continue
            try:
                # Relayed bytes go out at once: the tunnel must not add Nagle's delay.
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if self.fd_streams:
                self._hand_over(sock, listener, address)
                continue
            stream = Stream(self.next_stream, sock)
            self.next_stream += 1
            self.streams[stream.id] = stream
            self.stream_fds[stream.fd] = stream
            params: dict[str, Any] = {
                "stream": stream.id,
                "kind": listener.kind,
                "peer": _peer_name(address),
            }
            if listener.target is not None:
                params["target"] = listener.target
            self.channel.notify("net.accept", params)
            self._update(stream)

    def _hand_over(self, sock: Any, listener: Listener, address: Any) -> None:
        """Give the host the socket itself (protocol 1.3, a channel on the same kernel).

        The host then relays between two real sockets; this agent keeps no stream for it
        and closes its copy once the frame carrying it is sent.
        """
        params: dict[str, Any] = {
            "stream": self.next_stream,
            "kind": listener.kind,
            "peer": _peer_name(address),
            "fd": True,
        }
        self.next_stream += 1
        if listener.target is not None:
            params["target"] = listener.target
        body = json_dumps({"jsonrpc": "2.0", "method": "net.accept", "params": params})
        self.channel.queue_socket(body, sock)

    def _refuse_direct(self, sock: Any, listener: Listener, peer: Any) -> bool:
        """Answer a direct connection that the netns redirected here; False for proxy clients.

        The launch chain redirects every TCP connection to a non-loopback address to the
        proxy port (the sandbox has no route out), so that the program that tried it learns
        why it cannot connect: an HTTP 403 in the proxy's words, which a raw socket reads as
        text and HTTP clients show as the answer.
        """
        import _socket

        v6 = sock.family == _socket.AF_INET6
        try:
            if v6:  # a sockaddr_in6: family, port, flow info, address
                raw = sock.getsockopt(_socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
                address = _socket.inet_ntop(_socket.AF_INET6, raw[8:24])
            else:
                raw = sock.getsockopt(_socket.SOL_IP, SO_ORIGINAL_DST, 16)
                address = _socket.inet_ntop(_socket.AF_INET, raw[4:8])
        except (OSError, ValueError):
            return False  # not redirected (no connection tracking here): a proxy client
        port = int.from_bytes(raw[2:4], "big")
        if port == listener.port and (address == "::1" or address.startswith("127.")):
            return False
        target = f"[{address}]:{port}" if v6 else f"{address}:{port}"
        log(f"refused a direct connection to {target}")
        if self.host_reports:  # for the connection log and the audit, on the host
            self.channel.notify("net.direct", {"target": target, "peer": _peer_name(peer)})
        text = (
            f"stockade: the network policy denied a direct connection to {target}: the "
            "sandbox has no route out. Connect through the proxy at "
            f"http://127.0.0.1:{listener.port} (HTTP_PROXY, HTTPS_PROXY and ALL_PROXY are "
            "set), and allow the host on the host side: stockade net allow NAME HOST\n"
        ).encode()
        head = (
            "HTTP/1.1 403 Forbidden by stockade network policy\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(text)}\r\n"
            "Connection: close\r\n"
            "X-Stockade-Denied: direct connections are denied by the network policy; "
            "use the proxy\r\n\r\n"
        ).encode()
        try:
            sock.send(head + text, _socket.MSG_NOSIGNAL)  # small: fits the socket buffer
            sock.shutdown(_socket.SHUT_WR)
        except OSError:
            sock.close()
            return True
        if len(self.denied) >= MAX_DENIED:
            sock.close()
            return True
        # Closing with unread request bytes would reset the connection and could lose the
        # answer: read and drop what the client sends for a moment.
        self.denied[sock.fileno()] = (sock, time.monotonic() + DENIED_LINGER)
        self.poller.watch(sock.fileno(), _POLLIN)
        return True

    def _drain_denied(self, fd: int) -> None:
        sock = self.denied[fd][0]
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close_denied(fd)

    def _close_denied(self, fd: int) -> None:
        sock, _ = self.denied.pop(fd)
        self.poller.watch(fd, 0)
        sock.close()

    # --- streams ---------------------------------------------------------------------------

    def _update(self, stream: Stream) -> None:
        reading = not (
            self.channel.paused or stream.read_done or stream.unacked >= self.send_window
        )
        writing = _POLLOUT if stream.outbuf else 0
        self.poller.watch(stream.fd, (_POLLIN if reading else 0) | writing)

    def _stream_event(self, stream: Stream, event: int) -> None:
        if stream.outbuf and event & (_POLLOUT | _POLLDONE):
            self._write(stream)
        if (
            self.streams.get(stream.id) is stream
            and not (self.channel.paused or stream.read_done or stream.unacked >= self.send_window)
            and event & (_POLLIN | _POLLDONE)
        ):
            self._read(stream)

    def _read(self, stream: Stream) -> None:
        room = self.send_window - stream.unacked
        binary = self.channel.binary
        if binary:
            # A quarter of the window per frame keeps several in flight before an ack.
            size = min(room, BINARY_CHUNK, self.send_window // 4, self.channel.max_frame - 4)
        else:
            size = min(room, self.stream_chunk)
        try:
            data = stream.sock.recv(size)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(stream, f"read failed: {exc.strerror or exc}", tell_host=True)
            return
        if not data:
            stream.read_done = True
            self.channel.notify("stream.eof", {"stream": stream.id})
            if stream.write_done:
                self._drop(stream, None, tell_host=False)
                return
        elif binary:
            stream.unacked += len(data)
            self.channel.queue_binary(stream.id, data)
        else:
            stream.unacked += len(data)
            encoded = binascii.b2a_base64(data, newline=False)
            self.channel.queue(
                b'{"jsonrpc":"2.0","method":"stream.data","params":{"stream":%d,"data":"%s"}}'
                % (stream.id, encoded)
            )
        self._update(stream)

    def _write(self, stream: Stream) -> None:
        """Write what the host sent, acknowledge it, and half-close after its stream.eof."""
        import _socket

        written = 0
        while stream.outbuf:
            try:
                count = stream.sock.send(stream.outbuf, _socket.MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                self._drop(stream, f"write failed: {exc.strerror or exc}", tell_host=True)
                return
            del stream.outbuf[:count]
            written += count
        if written:
            self._ack(stream, written)
        if stream.host_eof and not stream.outbuf and not stream.write_done:
            stream.write_done = True
            try:
                stream.sock.shutdown(_socket.SHUT_WR)
            except OSError as exc:
                self._drop(stream, f"shutdown failed: {exc.strerror or exc}", tell_host=True)
                return
            if stream.read_done:
                self._drop(stream, None, tell_host=False)
                return
        self._update(stream)

    def _ack(self, stream: Stream, count: int) -> None:
        """Acknowledge written bytes in batches: a short answer costs no ack frame at all.

        Holding back less than ACK_BATCH never stalls the host: its window is larger.
        """
        stream.to_ack += count
        if stream.to_ack < ACK_BATCH:
            return
        self.channel.queue(
            b'{"jsonrpc":"2.0","method":"stream.ack","params":{"stream":%d,"bytes":%d}}'
            % (stream.id, stream.to_ack)
        )
        stream.to_ack = 0

    def _host_data(self, stream: Stream, data: memoryview | bytes) -> None:
        """Bytes from the host: written at once if the socket takes them, else buffered."""
        if stream.host_eof:
            self._violation(stream, "data after stream.eof")
            return
        if len(stream.outbuf) + len(data) > self.recv_window:
            self._violation(stream, f"more than the {self.recv_window}-byte window unacknowledged")
            return
        if stream.outbuf:
            stream.outbuf += data
            self._write(stream)
            return
        import _socket

        try:
            count = stream.sock.send(data, _socket.MSG_NOSIGNAL)
        except BlockingIOError:
            count = 0
        except OSError as exc:
            self._drop(stream, f"write failed: {exc.strerror or exc}", tell_host=True)
            return
        if count:
            self._ack(stream, count)
        if count < len(data):
            stream.outbuf += data[count:]
        self._update(stream)

    def _drop(self, stream: Stream, error: str | None, *, tell_host: bool) -> None:
        """Close the socket and forget the stream; with ``tell_host``, send stream.close."""
        if self.streams.get(stream.id) is not stream:
            return
        del self.streams[stream.id]
        del self.stream_fds[stream.fd]
        self.poller.watch(stream.fd, 0)
        stream.sock.close()
        if tell_host:
            params: dict[str, Any] = {"stream": stream.id}
            if error is not None:
                params["error"] = error[:1000]
            self.channel.notify("stream.close", params)

    def _violation(self, stream: Stream, why: str) -> None:
        """The host broke the stream protocol: end that stream, keep serving the others."""
        log(f"stream {stream.id}: {why}; closing it")
        self._drop(stream, f"protocol violation: {why}", tell_host=True)

    # --- from the host ---------------------------------------------------------------------
    #
    # A stream id the agent does not know is one it already closed (the host's late traffic
    # crossed our stream.close, or it acknowledges bytes of a finished stream): ignored.

    def binary_frame(self, body: memoryview) -> None:
        """Stream data from the host: 4-byte stream id, then the bytes (protocol 1.2)."""
        if len(body) < 5:
            raise AgentExit(3, "host sent a binary stream frame without data")
        ident = int.from_bytes(body[:4], "big")
        if not ident:
            raise AgentExit(3, "host sent a binary stream frame for stream 0")
        stream = self.streams.get(ident)
        if stream is not None:
            self._host_data(stream, body[4:])

    def stream_data(self, p: Params) -> None:
        ident: int = p.integer("stream", _MISSING, 1)
        data: bytes = p.b64("data")
        p.done()
        stream = self.streams.get(ident)
        if stream is None or not data:
            return
        self._host_data(stream, data)

    def stream_ack(self, p: Params) -> None:
        ident: int = p.integer("stream", _MISSING, 1)
        count: int = p.integer("bytes", _MISSING, 1, MAX_STREAM_WINDOW)
        p.done()
        stream = self.streams.get(ident)
        if stream is None:
            return
        if count > stream.unacked:
            self._violation(stream, f"acknowledged {count} bytes, only {stream.unacked} sent")
            return
        stream.unacked -= count
        self._update(stream)

    def stream_eof(self, p: Params) -> None:
        ident: int = p.integer("stream", _MISSING, 1)
        p.done()
        stream = self.streams.get(ident)
        if stream is None or stream.host_eof:
            return
        stream.host_eof = True
        self._write(stream)

    def stream_close(self, p: Params) -> None:
        ident: int = p.integer("stream", _MISSING, 1)
        p.string("error", None)
        p.done()
        stream = self.streams.get(ident)
        if stream is not None:
            self._drop(stream, None, tell_host=False)


class FileOps:
    """fs.* on single files and directories; relative paths are beneath the workspace."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def fs_read(self, request_id: Any, p: Params) -> dict[str, Any]:
        path = self.workspace.resolve(p.path("path"))
        offset: int = p.integer("offset", 0, 0)
        length: int = p.integer("length", 1024 * 1024, 0, 4 * 1024 * 1024)
        p.done()
        import stat

        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            chunks: list[bytes] = []
            got = 0
            regular = stat.S_ISREG(info.st_mode)
            while got < length:
                try:
                    if regular:
                        block = os.pread(fd, length - got, offset + got)
                    else:
                        if offset:
                            raise p.bad("offset", "must be 0 for a file that is not seekable")
                        block = os.read(fd, length - got)
                except BlockingIOError:
                    break
                if not block:
                    break
                chunks.append(block)
                got += len(block)
                if not regular:
                    break
        finally:
            os.close(fd)
        data = b"".join(chunks)
        size = info.st_size if regular else got
        eof = offset + got >= size if regular else got < length or not data
        return {"data": b64encode(data), "size": size, "eof": eof}

    def fs_write(self, request_id: Any, p: Params) -> dict[str, Any]:
        path = self.workspace.resolve(p.path("path"))
        data: bytes = p.b64("data")
        append: bool = p.boolean("append", False)
        mode: int | None = p.integer("mode", None, 0, 0o7777)
        parents: bool = p.boolean("parents", True)
        p.done()
        if parents:
            parent = os.path.dirname(path)
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, exist_ok=True)
        # O_NONBLOCK: a fifo without a reader fails instead of blocking the agent.
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        flags |= os.O_APPEND if append else os.O_TRUNC
        created = True
        try:
            fd = os.open(path, flags | os.O_EXCL, 0o644 if mode is None else mode)
        except FileExistsError:
            created = False
            fd = os.open(path, flags)
        try:
            if created and mode is not None:
                os.fchmod(fd, mode)  # exact bits, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        return {"size": size}

    def fs_stat(self, request_id: Any, p: Params) -> dict[str, Any]:
        path = self.workspace.resolve(p.path("path"))
        follow: bool = p.boolean("follow_symlinks", False)
        p.done()
        info = os.stat(path, follow_symlinks=follow)
        return _entry(os.path.normpath(path), info)

    def fs_list(self, request_id: Any, p: Params) -> dict[str, Any]:
        top = os.path.normpath(self.workspace.resolve(p.path("path")))
        depth: int = p.integer("depth", 1, 1, 64)
        p.done()
        entries: list[dict[str, Any]] = []
        pending = [(top, 1)]
        first = True
        while pending:
            directory, level = pending.pop()
            try:
                with os.scandir(directory) as it:
                    items = list(it)
            except OSError:
                if first:
                    raise
                continue  # an unreadable subdirectory: list what we can
            first = False
            for item in items:
                try:
                    info = item.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished meanwhile
                entries.append(_entry(item.path, info))
                if level < depth and item.is_dir(follow_symlinks=False):
                    pending.append((item.path, level + 1))
        entries.sort(key=lambda entry: entry["path"])
        return {"entries": entries}

    def fs_remove(self, request_id: Any, p: Params) -> dict[str, Any]:
        path = self.workspace.resolve(p.path("path"))
        recursive: bool = p.boolean("recursive", False)
        p.done()
        import stat

        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(path)
        elif recursive:
            import shutil

            shutil.rmtree(path)
        else:
            os.rmdir(path)
        return {}

    def fs_mkdir(self, request_id: Any, p: Params) -> dict[str, Any]:
        path = self.workspace.resolve(p.path("path"))
        parents: bool = p.boolean("parents", True)
        mode: int = p.integer("mode", 0o755, 0, 0o7777)
        p.done()
        if parents:
            if os.path.isdir(path):
                return {}
            os.makedirs(path, exist_ok=True)
        else:
            os.mkdir(path, mode)
        os.chmod(path, mode)  # exact bits, whatever the umask
        return {}


class Transfers:
    """Tar transfers in chunks: fs.upload_tar / fs.download_tar open one, transfer.write /
    transfer.read move its bytes; at most MAX_TRANSFERS are open at once."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.next_transfer = 1
        self.transfers: dict[int, Upload | Download] = {}

    def fs_upload_tar(self, request_id: Any, p: Params) -> dict[str, Any]:
        path = os.path.normpath(self.workspace.resolve(p.path("path")))
        p.done()
        self._check_room()
        os.makedirs(path, exist_ok=True)
        return self._open(Upload(path, _temp_file(path)))

    def fs_download_tar(self, request_id: Any, p: Params) -> dict[str, Any]:
        path = os.path.normpath(self.workspace.resolve(p.path("path")))
        p.done()
        self._check_room()
        os.lstat(path)  # fail now, not at the first read, when it does not exist
        return self._open(Download(tar_stream(path)))

    def transfer_write(self, request_id: Any, p: Params) -> dict[str, Any]:
        handle: int = p.integer("transfer")
        data: bytes = p.b64("data", "")
        eof: bool = p.boolean("eof", False)
        p.done()
        upload: Upload = self._get(p, handle, Upload)
        finished = eof
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(upload.fd, view) :]
            if not eof:
                return {"files": 0}
            os.lseek(upload.fd, 0, os.SEEK_SET)
            with open(upload.fd, "rb", closefd=False) as fileobj:
                return {"files": extract_tar(fileobj, upload.dest)}
        except BaseException:
            finished = True  # a failed transfer is over; the host starts a new one
            raise
        finally:
            if finished:
                del self.transfers[handle]
                os.close(upload.fd)

    def transfer_read(self, request_id: Any, p: Params) -> dict[str, Any]:
        handle: int = p.integer("transfer")
        length: int = p.integer("length", 1024 * 1024, 1, 4 * 1024 * 1024)
        p.done()
        download: Download = self._get(p, handle, Download)
        buffer = download.buffer
        try:
            while len(buffer) < length and not download.done:
                try:
                    buffer += next(download.stream)
                except StopIteration:
                    download.done = True
        except BaseException:
            del self.transfers[handle]
            raise
        data = bytes(buffer[:length])
        del buffer[:length]
        eof = download.done and not buffer
        if eof:
            del self.transfers[handle]
        return {"data": b64encode(data), "eof": eof}

    def _open(self, transfer: Upload | Download) -> dict[str, Any]:
        handle = self.next_transfer
        self.next_transfer += 1
        self.transfers[handle] = transfer
        return {"transfer": handle}

    def _check_room(self) -> None:
        if len(self.transfers) >= MAX_TRANSFERS:
            raise RpcError(10, f"too many open transfers (limit {MAX_TRANSFERS})")

    def _get(self, p: Params, handle: int, kind: type) -> Any:
        transfer = self.transfers.get(handle)
        if not isinstance(transfer, kind):
            raise p.bad("transfer", f"{handle} is not an open {kind.__name__.lower()}")
        return transfer


class Agent:
    """The loop and the dispatcher: serves the protocol on one channel, hands each request
    to the part that owns its state, and answers agent.* itself."""

    def __init__(
        self,
        opts: Options,
        landlock_abi: int,
        libc: Any,
        listeners: list[Listener] | None = None,
        child_rlimits: list[tuple[Any, int, int, int]] | None = None,
    ) -> None:
        self.landlock_abi = landlock_abi
        if opts.workspace is not None:
            self.workspace = workspace = Workspace(opts.workspace)
        else:
            self.workspace = workspace = Workspace(
                "/workspace" if os.path.isdir("/workspace") else "/"
            )
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.poller = Poller()
        self.channel = channel = HostChannel(opts, self.poller, devnull)
        self.procs = procs = ProcessTable(
            channel, self.poller, devnull, workspace, libc, child_rlimits or []
        )
        self.tunnel = tunnel = TunnelStreams(channel, self.poller, listeners or [])
        files = FileOps(workspace)
        transfers = Transfers(workspace)
        self.greeted = False  # the first agent.hello set the connection's framing and window

        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        _sig.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.signals_seen: set[int] = set()
        for signum in (_sig.SIGCHLD, _sig.SIGTERM, _sig.SIGINT, _sig.SIGHUP):
            _sig.signal(signum, _noop_handler)
        self.poller.watch(self.wake_r, _POLLIN)
        tunnel.start()
        channel.update_watch()

        self.methods: dict[str, Callable[[Any, Params], dict[str, Any] | None]] = {
            "agent.hello": self.agent_hello,
            "agent.shutdown": self.agent_shutdown,
            "process.start": procs.process_start,
            "process.write_stdin": procs.process_write_stdin,
            "process.signal": procs.process_signal,
            "process.resize": procs.process_resize,
            "process.wait": procs.process_wait,
            "fs.read": files.fs_read,
            "fs.write": files.fs_write,
            "fs.stat": files.fs_stat,
            "fs.list": files.fs_list,
            "fs.remove": files.fs_remove,
            "fs.mkdir": files.fs_mkdir,
            "fs.upload_tar": transfers.fs_upload_tar,
            "fs.download_tar": transfers.fs_download_tar,
            "transfer.write": transfers.transfer_write,
            "transfer.read": transfers.transfer_read,
        }
        #: Notifications the host may send. One that does not match its schema is a protocol
        #: error (the agent exits, as for a malformed frame): byte accounting of a stream
        #: cannot be trusted after that. Unknown ones are logged and ignored, as JSON-RPC
        #: wants for notifications.
        self.notifications: dict[str, Callable[[Params], None]] = {
            "stream.data": tunnel.stream_data,
            "stream.ack": tunnel.stream_ack,
            "stream.eof": tunnel.stream_eof,
            "stream.close": tunnel.stream_close,
        }

    # --- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        try:
            while True:
                self._iterate()
        except AgentExit as stop:
            if stop.status:
                log(stop.reason)
            self._teardown()
            return stop.status
        except BaseException as exc:  # a bug: still take every process down with us
            log(f"agent failed: {type(exc).__name__}: {exc}")
            self._teardown()
            return 1

    def _teardown(self) -> None:
        """Close the tunnel and kill every process (the channel is gone: nobody to tell)."""
        self.channel.drop_sockets()
        self.tunnel.close()
        self.procs.kill_everything()

    def _iterate(self) -> None:
        channel = self.channel
        events = self.poller.poll(self._poll_timeout())
        if not events and self.procs.idle_setup:
            self.procs.ensure_subreaper()
        for fd, event in events:
            if fd == self.wake_r:
                self._drain_wakeup()
                continue
            if fd == channel.in_fd and event & (_POLLIN | _POLLDONE):
                channel.read(self._handle_frame, self.tunnel.binary_frame)
            if fd == channel.out_fd and event & (_POLLOUT | _POLLDONE):
                channel.flush()
            if not self.procs.event(fd, event):
                self.tunnel.event(fd, event)
        if self.signals_seen:
            self._handle_signals()
        now = time.monotonic()
        self.tunnel.run_timers(now)
        self.procs.run_timers(now)
        channel.flush()
        if channel.closing:
            channel.flush_blocking(5.0)
            raise AgentExit(0, "shutdown requested")
        if channel.update_backpressure():
            self.procs.refresh()
            self.tunnel.refresh()
        channel.update_watch()

    def _poll_timeout(self) -> int | None:
        if self.procs.idle_setup:
            return 0
        now = time.monotonic()
        soonest = self.procs.next_deadline()
        when = self.tunnel.next_deadline()
        if when is not None and (soonest is None or when < soonest):
            soonest = when
        if soonest is None:
            return None
        return max(0, int((soonest - now) * 1000) + 1)

    def _drain_wakeup(self) -> None:
        try:
            while True:
                data = os.read(self.wake_r, 256)
                if not data:
                    break
                self.signals_seen.update(data)
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        seen = self.signals_seen
        self.signals_seen = set()
        for signum in (_sig.SIGTERM, _sig.SIGINT, _sig.SIGHUP):
            if signum in seen:
                raise AgentExit(0, f"signal {signum}")
        # SIGCHLD, or anything else: reap whatever has exited.
        self.procs.reap()

    # --- dispatch --------------------------------------------------------------------------

    def _handle_frame(self, body: bytes) -> None:
        try:
            message = json_loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise AgentExit(3, f"host sent a frame that is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise AgentExit(3, "host sent a JSON value that is not an object")
        request_id = message.get("id")
        method = message.get("method")
        if "id" not in message:
            self._handle_notification(message)
            return
        channel = self.channel
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str):
            channel.reply_error(
                request_id, RpcError(-32600, "invalid request: needs jsonrpc '2.0' and a method")
            )
            return
        params = message.get("params", {})
        if not isinstance(params, dict):
            channel.reply_error(
                request_id, RpcError(INVALID_PARAMS, f"params of {method} must be an object")
            )
            return
        handler = self.methods.get(method)
        if handler is None:
            channel.reply_error(request_id, RpcError(-32601, f"method not found: {method[:200]!r}"))
            return
        try:
            result = handler(request_id, Params(method, params))
        except RpcError as exc:
            channel.reply_error(request_id, exc)
        except TarRefused as exc:
            channel.reply_error(request_id, RpcError(2, str(exc)))
        except OSError as exc:
            channel.reply_error(request_id, os_error(exc, _describe(exc)))
        except Exception as exc:  # the edge of the dispatch loop: never die on a request
            log(f"{method} failed: {type(exc).__name__}: {exc}")
            channel.reply_error(
                request_id, RpcError(-32603, f"internal error: {type(exc).__name__}: {exc}")
            )
        else:
            if result is not None:
                channel.reply(request_id, result)

    def _handle_notification(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        params = message.get("params", {})
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str):
            raise AgentExit(3, "host sent a notification without jsonrpc '2.0' and a method")
        handler = self.notifications.get(method)
        if handler is None:
            log(f"ignoring an unknown notification from the host: {method[:100]!r}")
            return
        if not isinstance(params, dict):
            raise AgentExit(3, f"host sent {method} with params that are not an object")
        try:
            handler(Params(method, params))
        except RpcError as exc:
            raise AgentExit(3, f"host sent an invalid notification: {exc.message}") from None

    # --- agent.* ---------------------------------------------------------------------------

    def agent_hello(self, request_id: Any, p: Params) -> dict[str, Any]:
        protocol: str = p.string("protocol")
        p.string("client", "stockade")
        binary: bool = p.boolean("stream_binary", False)
        window: int = p.integer("stream_window", STREAM_WINDOW, STREAM_WINDOW, MAX_STREAM_WINDOW)
        fd_streams: bool = p.boolean("stream_fd", False)
        p.done()
        if not self.greeted:
            # The first hello sets the connection's framing and window; a later one (a
            # liveness check) changes nothing under streams already flowing.
            self.greeted = True
            self.channel.binary = binary
            self.tunnel.agree(_minor(protocol) >= 2, window, fd_streams)
        uname = os.uname()
        self.procs.setup_when_idle()
        capabilities = list(CAPABILITIES)
        if self.landlock_abi:
            capabilities.append("landlock")
        if self.tunnel.listeners:
            capabilities.append("net")
        if self.channel.binary:
            capabilities.append("stream-binary")
        if self.tunnel.fd_streams:
            capabilities.append("stream-fd")
        return {
            "protocol": PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "capabilities": capabilities,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "kernel": uname.release,
            "hostname": uname.nodename,
            "python": ".".join(str(part) for part in sys.version_info[:3]),
            "landlock_abi": self.landlock_abi,
            "stream_window": self.tunnel.recv_window,
        }

    def agent_shutdown(self, request_id: Any, p: Params) -> dict[str, Any]:
        p.done()
        self.channel.closing = True
        return {}


def _describe(exc: OSError) -> str:
    if exc.filename is not None:
        return str(exc.filename)
    return ""


def _entry(path: str, info: os.stat_result) -> dict[str, Any]:
    import stat

    mode = info.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    entry: dict[str, Any] = {
        "path": path,
        "name": os.path.basename(path) or path,
        "type": kind,
        "size": info.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": float(info.st_mtime),
    }
    if kind == "symlink":
        try:
            entry["target"] = os.readlink(path)
        except OSError:
            pass
    return entry


def _make_raw(fd: int) -> None:
    """Put a terminal-like device (e.g. a virtio console) in raw mode: bytes pass unchanged."""
    import termios

    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    attrs[1] &= ~termios.OPOST
    attrs[2] &= ~(termios.CSIZE | termios.PARENB)
    attrs[2] |= termios.CS8
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _readable_beneath(paths: list[str], allowed: list[str]) -> bool:
    """True when every existing directory in ``paths`` lies beneath one of ``allowed``."""
    roots = [os.path.realpath(path) for path in allowed]
    for path in paths:
        if not os.path.isdir(path):
            continue  # e.g. the stdlib zip that does not exist
        real = os.path.realpath(path)
        if not any(_inside(root, real) for root in roots):
            return False
    return True


def _protect_fds() -> None:
    """Make inherited descriptors close-on-exec, so children only get 0, 1 and 2."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the listdir descriptor itself, now closed


def main(argv: list[str]) -> int:
    try:
        opts = parse_options(argv)
    except ValueError as exc:
        sys.stderr.write(f"stockade-agent: {exc}\n{USAGE}")
        return 2
    try:
        os.fstat(2)
    except OSError:
        fd = os.open("/dev/null", os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)
    _protect_fds()

    child_rlimits: list[tuple[Any, int, int, int]] = []
    if opts.rlimits:
        import resource

        for name, soft_value, hard_value in opts.rlimits:
            which = getattr(resource, RLIMIT_NAMES[name])
            soft = resource.RLIM_INFINITY if soft_value < 0 else soft_value
            hard = resource.RLIM_INFINITY if hard_value < 0 else hard_value
            if name == "cpu":
                # CPU time is counted per process: on the agent it would add up over the
                # sandbox's whole life, so only children get it.
                child_rlimits.append((resource.setrlimit, which, soft, hard))
                continue
            try:
                resource.setrlimit(which, (soft, hard))
            except (OSError, ValueError) as exc:
                log(f"--rlimit {name}: {exc}")
                return 2

    listeners: list[Listener] = []
    if opts.net_proxy is not None or opts.net_forwards:
        # Before Landlock: from ABI 4 on it can restrict binding TCP ports.
        try:
            listeners = open_listeners(opts)
        except OSError as exc:
            log(f"cannot listen for the network tunnel: {exc.strerror or exc}")
            return 2

    libc = None
    landlock_abi = 0
    if opts.landlock != "off":
        if not _readable_beneath(sys.path, opts.landlock_ro + opts.landlock_rw):
            # Everything imported lazily later must be loaded before the agent loses access
            # to the interpreter's files (costs ~20 ms, so only when needed).
            import fcntl  # noqa: F401
            import gzip  # noqa: F401
            import shutil  # noqa: F401
            import stat  # noqa: F401
            import tarfile  # noqa: F401
            import termios  # noqa: F401

        libc = _libc()
        try:
            landlock_abi = apply_landlock(
                libc, opts.landlock_ro, opts.landlock_rw, opts.landlock_scope
            )
        except OSError as exc:
            reason = f"Landlock could not be enforced: {exc.strerror or exc}"
            if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                reason = (
                    "this kernel has no Landlock support (needs Linux >= 5.13 with lsm=landlock)"
                )
            if opts.landlock == "required":
                log(f"{reason}; refusing to start because --landlock required was given")
                return 2
            log(f"{reason}; continuing without it (--landlock best-effort)")

    try:
        agent = Agent(opts, landlock_abi, libc, listeners, child_rlimits)
    except OSError as exc:
        log(f"could not set up the channel: {exc}")
        return 2
    if libc is not None:
        agent.procs.ensure_subreaper()
    return agent.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
