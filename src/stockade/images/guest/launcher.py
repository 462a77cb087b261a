"""stockade microVM launcher: PID 1 of the guest after switch_root (stdlib only).

It loads the guest agent, opens the agent channel (the virtio-serial port named ``agent``,
or a vsock port), says it is ready and, once the host answers, serves the agent protocol
on the channel in this process, still unconfigured. Every sandbox then gets its own
configuration (wall clock, entropy, hostname, files, environment, workspace, the agent's
options) in one ``sandbox.configure`` request to that running agent. The image's VM
snapshot is taken after the agent has served a first command, so a restored sandbox runs
nothing but that request before its first command. When the agent returns the VM powers
off.

Channel handshake, in the agent protocol's framing (4-byte big-endian length + JSON):
guest -> ``{"launcher": 1, ...}``; host -> ``{}`` or ``{"warmup": true}`` (a VM about to be
snapshotted); guest -> ``{"serving": true, ...}`` or ``{"error": "..."}``; then the agent
protocol, plus ``sandbox.configure`` (once) and ``sandbox.reseed`` (a resumed named snapshot).
"""

# Stdlib only and start-up time matters: contextlib.suppress would cost an import.
# ruff: noqa: SIM105

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

AGENT = "/run/stockade/agent.py"
WS_STATE = "/run/stockade/ws"
#: The root overlay's writable tmpfs (the init moves it here), sized to the disk limit.
ROOT_RW = "/run/stockade/rootrw"
MAX_CONFIG = 16 * 1024 * 1024
#: The agent's frame limit: ``sandbox.configure`` carries a streamed workspace (base64).
MAX_FRAME = 32 * 1024 * 1024
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
BLKFLSBUF = 0x1261
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
_LIBC: list[Any] = []


def say(message: str) -> None:
    try:
        os.write(2, f"stockade-launcher: {message}\n".encode())
    except OSError:
        pass


def load_agent() -> Any:
    """The guest agent as a module (compiled now, before any snapshot is taken)."""
    import types

    module = types.ModuleType("stockade_guest_agent")
    module.__file__ = AGENT
    sys.modules[module.__name__] = module
    code = None
    try:
        # Byte-compiled on the host by the same Python version: saves ~0.5 s under TCG.
        with open(AGENT + "c", "rb") as f:
            data = f.read()
        magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER
        if data[:4] == magic:
            import marshal

            code = marshal.loads(data[16:])  # noqa: S302 - our own file from the initramfs
    except (OSError, KeyError, AttributeError, ValueError, EOFError):
        code = None
    if code is None:
        with open(AGENT, "rb") as f:
            code = compile(f.read(), AGENT, "exec")
    exec(code, module.__dict__)  # noqa: S102 - our own agent file from the initramfs
    return module


def cmdline() -> dict[str, str]:
    with open("/proc/cmdline") as f:
        words = f.read().split()
    return {
        k[len("stockade.") :]: v
        for k, _, v in (w.partition("=") for w in words)
        if k.startswith("stockade.")
    }


def open_channel(spec: str) -> int:
    if spec.startswith("vsock:"):
        import _socket

        sock = _socket.socket(_socket.AF_VSOCK, _socket.SOCK_STREAM)
        sock.bind((0xFFFFFFFF, int(spec[6:])))  # VMADDR_CID_ANY
        sock.listen(1)
        conn, _ = sock._accept()  # type: ignore[attr-defined]
        sock.close()
        return int(conn)
    ports = "/sys/class/virtio-ports"
    deadline = time.monotonic() + 10
    while True:
        for port in sorted(os.listdir(ports)) if os.path.isdir(ports) else []:
            try:
                with open(f"{ports}/{port}/name") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name == "agent":
                # Opened once, both ways: a second open of a port is EBUSY.
                return os.open(f"/dev/{port}", os.O_RDWR | os.O_NOCTTY)
        if time.monotonic() > deadline:
            raise OSError("no virtio-serial port named 'agent'")
        time.sleep(0.01)


def read_exact(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        block = os.read(fd, min(size, 1 << 20))
        if not block:
            raise EOFError("the host closed the channel")
        chunks.append(block)
        size -= len(block)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def send(agent: Any, fd: int, obj: Any) -> None:
    body = agent.json_dumps(obj)
    write_all(fd, len(body).to_bytes(4, "big") + body)


def receive(agent: Any, fd: int) -> Any:
    size = int.from_bytes(read_exact(fd, 4), "big")
    if size > MAX_CONFIG:
        raise ValueError(f"configuration frame of {size} bytes is too large")
    return agent.json_loads(read_exact(fd, size).decode())


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    """mount(2) through libc (no fork and exec: cheaper, above all right after a restore)."""
    if not _LIBC:
        import ctypes

        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    libc = _LIBC[0]
    if libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
        data.encode() if data else None,
    ) != 0:  # fmt: skip
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}, {data!r}): {os.strerror(err)}")


def seed_entropy(seed: bytes) -> None:
    import fcntl
    import struct

    fd = os.open("/dev/urandom", os.O_WRONLY)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes, mode: int) -> None:
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        write_all(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


class Entry:
    """One workspace entry (guest_config.py ``tree_entries``) as the agent's tar extraction
    sees a tar member: the same checks and the same writes, without ``tarfile``."""

    def __init__(self, kind: str, name: str, mode: int, mtime: float, payload: str) -> None:
        self.kind = kind
        self.name = name
        self.mode = int(mode)
        self.mtime = mtime
        self.payload = payload
        self.linkname = payload if kind in ("l", "h") else ""

    def isdir(self) -> bool:
        return self.kind == "d"

    def isfile(self) -> bool:
        return self.kind == "f"

    def issym(self) -> bool:
        return self.kind == "l"

    def islnk(self) -> bool:
        return self.kind == "h"


class Entries:
    """What ``_extract_members`` reads file contents from (a tar archive's one method)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def extractfile(self, member: Entry) -> Any:
        import io

        return io.BytesIO(self.agent.binascii.a2b_base64(member.payload))


def extract_entries(agent: Any, entries: list[Any], dest: str) -> int:
    members = [Entry(*entry) for entry in entries]
    return int(agent._extract_members(Entries(agent), members, os.path.realpath(dest)))


def chown_tree(top: str, uid: int, gid: int) -> None:
    os.chown(top, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def setup_workspace(agent: Any, ws: dict[str, Any], user: list[int] | None = None) -> None:
    """Lower (streamed tar or the second disk) + tmpfs upper, overlaid at ws['path'].

    The upper and work layers live on the root's writable tmpfs, which the configuration
    sizes to the disk limit: the workspace, /tmp and home share that one bound. The lower
    (the project as streamed in) is the host's data and does not count against it.
    """
    mode = ws["mode"]
    target = ws["path"]
    os.makedirs(WS_STATE, exist_ok=True)
    mount("stockade-ws", WS_STATE, "tmpfs", 0, "mode=0755")
    mark("ws tmpfs")
    lower = f"{WS_STATE}/lower"
    os.mkdir(lower, 0o755)
    if ws["source"] == "stream":
        extract_entries(agent, ws["entries"], lower)
        os.chmod(lower, int(ws.get("root_mode", 0o755)))
        if user:
            chown_tree(lower, int(user[0]), int(user[1]))
        mark("ws extracted")
    else:
        device = f"/dev/{ws['device']}"
        with open(device, "rb") as dev:
            # A restored VM may have cached blocks of the snapshot's disk: forget them.
            import fcntl

            fcntl.ioctl(dev.fileno(), BLKFLSBUF)
        mount(device, lower, "ext4", MS_RDONLY, "noload")
    os.makedirs(target, exist_ok=True)
    if mode == "ro":
        mount(lower, target, None, MS_BIND)
        mount("", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        return
    upper, work = f"{ROOT_RW}/workspace/upper", f"{ROOT_RW}/workspace/work"
    os.makedirs(upper, 0o755)
    os.mkdir(work, 0o700)
    if user:
        os.chown(upper, int(user[0]), int(user[1]))
    # The workspace sync reads the upper layer at WS_STATE/upper.
    os.mkdir(f"{WS_STATE}/upper", 0o755)
    mount(upper, f"{WS_STATE}/upper", None, MS_BIND)
    # No redirect or metacopy xattrs: the host reads this upper layer back for diff/apply.
    options = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off"
    mount("stockade-workspace", target, "overlay", 0, options)
    mark("ws overlay")
    # Files that would run code on the host later stay read-only inside, as on every
    # backend (the host never applies them either).
    for rel in ws.get("protected", ()):
        path = f"{target}/{rel}"
        if os.path.lexists(path) and not os.path.islink(path):
            mount(path, path, None, MS_BIND)
            mount("", path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def warm_up(agent: Any) -> None:
    """Configure-like work with no lasting effect: tar, mounts, a fork and exec, JSON."""
    import io
    import tarfile

    scratch = "/run/stockade/warm"
    os.makedirs(scratch, exist_ok=True)
    mount("stockade-warm", scratch, "tmpfs", 0, "mode=0700,size=1m")
    os.mkdir(f"{scratch}/tar", 0o700)
    try:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in ("a", "d/b"):
                info = tarfile.TarInfo(name)
                info.size = 4
                tar.addfile(info, io.BytesIO(b"warm"))
        buf.seek(0)
        # configure()'s own steps, on scratch targets or with values that change nothing.
        time.clock_settime_ns(time.CLOCK_REALTIME, time.time_ns())
        import _socket

        _socket.sethostname(os.uname().nodename)
        os.mkdir(f"{scratch}/lower", 0o755)
        agent.extract_tar(buf, f"{scratch}/tar")
        extract_entries(
            agent,
            [["d", "d", 0o755, 0, ""], ["f", "d/b", 0o644, 0, agent.b64encode(b"warm")],
             ["l", "c", 0o777, 0, "d/b"], ["h", "a", 0o644, 0, "d/b"]],
            f"{scratch}/lower",
        )  # fmt: skip
        os.chmod(f"{scratch}/lower", 0o700)
        chown_tree(f"{scratch}/lower", 0, 0)
        for name in ("upper", "work", "ws"):
            os.mkdir(f"{scratch}/{name}", 0o755)
        mount(
            "stockade-warm-ws", f"{scratch}/ws", "overlay", 0,
            f"lowerdir={scratch}/lower,upperdir={scratch}/upper,workdir={scratch}/work,"
            "redirect_dir=off,metacopy=off",
        )  # fmt: skip
        mount(f"{scratch}/ws/a", f"{scratch}/ws/a", None, MS_BIND)
        mount("", f"{scratch}/ws/a", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        _LIBC[0].umount2(f"{scratch}/ws/a".encode(), 2)
        _LIBC[0].umount2(f"{scratch}/ws".encode(), 2)
        write_file(f"{scratch}/f", agent.binascii.a2b_base64(agent.b64encode(b"x")), 0o644)
        agent.json_loads(agent.json_dumps({"env": dict(os.environ), "n": [1, 2.5, None]}).decode())
        os.makedirs(f"{scratch}/x/y", exist_ok=True)
        seed_entropy(os.urandom(32))
        # The agent starts commands with posix_spawn: the same path, and /bin/true's pages.
        pid = os.posix_spawn("/bin/true", ["true"], {}, setsid=True)
        os.waitpid(pid, 0)
        for path in ETC_FILES:
            # Opened for writing, the root overlay copies the file up to its tmpfs layer
            # now (in a snapshot), not when configuring rewrites it.
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            except OSError:
                pass
    finally:
        _LIBC[0].umount2(scratch.encode(), 2)  # MNT_DETACH


CLOCK_SOCKET = "/run/stockade/clock.sock"
#: Files every sandbox's configuration rewrites (backend.py ``_etc_files``).
ETC_FILES = ("/etc/hosts", "/etc/hostname", "/etc/passwd", "/etc/group")


def start_clock_helper() -> None:
    """Keep one root process that only sets the clock and reseeds entropy on request.

    Commands run unprivileged, yet a VM restored from a named snapshot must get the host's
    time and fresh entropy (two forks must not share random state): the host asks through
    the agent, which connects here. Both effects stay inside this VM.
    """
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.bind(CLOCK_SOCKET)
    os.chmod(CLOCK_SOCKET, 0o666)  # noqa: S103 - the sandbox user connects; nothing else here
    sock.listen(4)
    if os.fork() != 0:
        sock.close()
        return
    # pragma: no cover - the helper child from here on (forked before the channel opens)
    while True:
        try:
            conn, _ = sock._accept()  # type: ignore[attr-defined]
        except OSError:
            continue
        try:
            words = os.read(conn, 4096).decode().split()
            if len(words) == 3 and words[0] == "time":
                time.clock_settime_ns(time.CLOCK_REALTIME, int(words[1]))
                import binascii

                seed_entropy(binascii.a2b_base64(words[2])[:256])
                os.write(conn, b"ok\n")
            else:
                os.write(conn, b"error: expected 'time NS SEED'\n")
        except (OSError, ValueError) as exc:
            try:
                os.write(conn, f"error: {exc}\n".encode())
            except OSError:
                pass
        finally:
            os.close(conn)


DOCKER_LOG = "/run/stockade/dockerd.log"


def start_docker(fd: int, docker: dict[str, Any], env: dict[str, str]) -> None:
    """Start this VM's own dockerd (``docker = true``) in the background, as root.

    Its data root is a tmpfs of its own (overlay2 cannot stack on the root's overlay); there
    is no network device, so no bridge and no iptables: containers run ``--network none``
    or ``host`` (the VM's loopback). The socket's group is the sandbox user's.
    """
    if not os.path.ismount("/sys/fs/cgroup"):
        mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, "nsdelegate")
    os.makedirs("/var/lib/docker", exist_ok=True)
    size = f",size={int(docker['size'])}" if docker.get("size") else ""
    mount("stockade-docker", "/var/lib/docker", "tmpfs", 0, f"mode=0710{size}")
    argv = [
        "/usr/sbin/dockerd", "-H", f"unix://{docker['socket']}", "--group", str(docker["group"]),
        "--data-root", "/var/lib/docker", "--exec-root", "/run/docker",
        "--storage-driver", "overlay2", "--bridge", "none", "--iptables=false",
        "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--log-level", "warn",
    ]  # fmt: skip
    if os.fork() != 0:
        return
    try:  # pragma: no cover - the dockerd child from here on
        os.setsid()
        os.close(fd)
        log = os.open(DOCKER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.execve(argv[0], argv, env)  # noqa: S606
    finally:
        os._exit(127)


MARKS: list[Any] = []


def mark(label: str) -> None:
    """Guest uptime at a step of configuring: the host logs them (where restores spend)."""
    MARKS.append([label, uptime()])


def configure(agent: Any, server: Any, config: dict[str, Any]) -> None:
    """Apply one sandbox's configuration in the running agent (``sandbox.configure``).

    The clock and fresh entropy come first, before anything else can run. Everything is
    done in this process, with no fork or exec: after a restore under emulation every new
    code path is translated again, so the fewer the cheaper.
    """
    time.clock_settime_ns(time.CLOCK_REALTIME, int(config["time_ns"]))
    seed_entropy(agent.binascii.a2b_base64(config["seed"]))
    mark("clock+seed")
    hostname = config.get("hostname")
    if hostname:
        import _socket

        _socket.sethostname(hostname)
    for path, data, mode in config.get("files", ()):
        write_file(path, agent.binascii.a2b_base64(data), int(mode))
    mark("files")
    if config.get("disk_bytes"):
        # The root's writes (outside the workspace) count against the disk limit too.
        mount("", ROOT_RW, None, MS_REMOUNT, f"size={int(config['disk_bytes'])}")
    for directory in config.get("dirs", ()):
        os.makedirs(directory, exist_ok=True)
    env = {str(k): str(v) for k, v in config.get("env", {}).items()}
    # Commands get it from the agent (``os.environ`` is left alone: changing it costs more
    # under emulation than the agent ever needs from it).
    server.procs.base_env = env
    mark("files+env")
    ws = config.get("workspace")
    if ws:
        setup_workspace(agent, ws, config.get("user"))
        mark("workspace")
    if config.get("docker"):
        start_docker(server.channel.in_fd, config["docker"], env)
    apply_agent_options(agent, server, [str(a) for a in config.get("args", ())])
    user = config.get("user")
    if user:
        uid, gid = int(user[0]), int(user[1])
        for directory in config.get("dirs", ()):
            os.chown(directory, uid, gid)
        # Everything from here on (the agent and every command) runs unprivileged.
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)


def apply_agent_options(agent: Any, server: Any, args: list[str]) -> None:
    """The agent's per-sandbox options, given to the already running agent: working
    directory, resource limits and the egress listeners (as ``agent.main`` would)."""
    opts = agent.parse_options(args)
    if opts.workspace is not None:
        server.workspace.path = opts.workspace
    if opts.rlimits:
        import resource

        for name, soft_value, hard_value in opts.rlimits:
            which = getattr(resource, agent.RLIMIT_NAMES[name])
            soft = resource.RLIM_INFINITY if soft_value < 0 else soft_value
            hard = resource.RLIM_INFINITY if hard_value < 0 else hard_value
            if name == "cpu":
                server.procs.child_rlimits.append((resource.setrlimit, which, soft, hard))
            else:
                resource.setrlimit(which, (soft, hard))
    if opts.net_proxy is not None or opts.net_forwards:
        for listener in agent.open_listeners(opts):
            server.tunnel.add_listener(listener)


def reseed(agent: Any, now_ns: int, seed: str) -> None:
    """Set the clock and reseed entropy: directly as root, else through the clock helper."""
    if os.getuid() == 0:
        time.clock_settime_ns(time.CLOCK_REALTIME, now_ns)
        seed_entropy(agent.binascii.a2b_base64(seed)[:256])
        return
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(CLOCK_SOCKET)
        sock.sendall(f"time {now_ns} {seed}".encode())
        answer = sock.recv(200).decode()
    finally:
        sock.close()
    if not answer.startswith("ok"):
        raise OSError(f"the clock helper refused: {answer.strip()}")


def add_methods(agent: Any, server: Any) -> None:
    """The launcher's own requests, served by the agent loop next to the protocol's."""

    def sandbox_configure(request_id: Any, p: Any) -> dict[str, Any]:
        if server.configured:
            raise agent.RpcError(agent.INVALID_PARAMS, "this VM is already configured")
        MARKS.clear()
        received = uptime()
        configure(agent, server, dict(p.raw))
        p.raw.clear()
        server.configured = True
        # What a warm-up before the snapshot left behind is no sandbox's business.
        server.procs.finished.clear()
        return {"ok": True, "uptime_config": received, "uptime_done": uptime(), "marks": MARKS}

    def sandbox_reseed(request_id: Any, p: Any) -> dict[str, Any]:
        now_ns = p.integer("time_ns")
        seed = p.string("seed")
        p.done()
        reseed(agent, now_ns, seed)
        return {}

    def sandbox_warm(request_id: Any, p: Any) -> dict[str, Any]:
        # A warm pool's restored VM: the emulator translates configure's paths now, before
        # a sandbox takes the VM (nothing of it lasts; the sandbox's configure still runs).
        p.done()
        if server.configured:
            raise agent.RpcError(agent.INVALID_PARAMS, "this VM is already configured")
        begun = uptime()
        warm_up(agent)
        return {"seconds": round(uptime() - begun, 3)}

    server.configured = False
    server.methods["sandbox.configure"] = sandbox_configure
    server.methods["sandbox.warm"] = sandbox_warm
    server.methods["sandbox.reseed"] = sandbox_reseed


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def main() -> None:
    started = uptime()
    agent = load_agent()
    # What configuring and serving will need, loaded now: a snapshot taken while we wait
    # for the host then holds it, and restored sandboxes do not pay for it.
    # The agent's own lazy imports on its start and exec paths too (`resource` is a shared
    # object: a dlopen from the root image after a restore costs ~0.1 s under TCG).
    # What every start needs is loaded here; what only some sandboxes use (tar transfers,
    # PTYs) is loaded for a snapshot below: importing ``tarfile`` (with ``shutil``, ``re``,
    # ``enum``...) costs about a second of a cold boot under emulation.
    import _socket  # noqa: F401
    import ctypes
    import fcntl  # noqa: F401
    import resource  # noqa: F401
    import struct  # noqa: F401

    _LIBC.append(ctypes.CDLL(None, use_errno=True))
    os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    opts = cmdline()
    # Forked now, so that a snapshot holds it: a fork after a restore is slow under TCG.
    start_clock_helper()
    try:
        fd = open_channel(opts.get("agent", "serial"))
    except OSError as exc:
        say(f"cannot open the agent channel: {exc}")
        return
    send(
        agent,
        fd,
        {
            "launcher": 1,
            "kernel": os.uname().release,
            "uptime_start": started,
            "uptime_ready": uptime(),
        },
    )
    try:
        request = receive(agent, fd)
        warm = None
        if request.get("warmup"):
            # A VM about to be snapshotted: run configuring's paths once now (lazy imports,
            # caches, the page cache they fill), so restored sandboxes do not pay for them.
            import shutil  # noqa: F401
            import stat  # noqa: F401
            import tarfile  # noqa: F401
            import termios  # noqa: F401

            begun = uptime()
            warm_up(agent)
            warm = round(uptime() - begun, 3)
        server = make_server(agent, fd)
    except Exception as exc:
        say(f"start-up failed: {type(exc).__name__}: {exc}")
        try:
            send(agent, fd, {"error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        return
    sys.argv = [AGENT]
    ready: dict[str, Any] = {"serving": True, "warm_seconds": warm, "uptime_serving": uptime()}
    status = serve(agent, server, ready)
    say(f"agent exited with status {status}")


def serve(agent: Any, server: Any, ready: dict[str, Any]) -> int:
    """Run the agent until it exits; the agent owns the channel now (on a descriptor of its
    own) and sends ``ready`` first."""
    server.channel.queue(agent.json_dumps(ready))
    server.channel.flush()
    server.channel.update_watch()
    return int(server.run())


def make_server(agent: Any, fd: int) -> Any:
    """The guest agent on the channel, not yet configured (as ``agent.main`` sets it up)."""
    opts = agent.parse_options(
        ["--fd-in", str(fd), "--fd-out", str(fd), "--max-frame", str(MAX_FRAME)]
    )
    agent._protect_fds()
    server = agent.Agent(opts, 0, None, [])
    add_methods(agent, server)
    return server


if __name__ == "__main__":
    try:
        main()
    finally:
        # PID 1 must not return (that panics the kernel): power the VM off instead.
        os.sync()
        os.execv("/run/stockade/busybox", ["poweroff", "-f"])  # noqa: S606
