"""Namespace backend: bubblewrap + seccomp + Landlock (+ cgroups where the host allows).

Launch chain (each step ``exec``s the next, so one host pid is the sandbox's root):
``sh`` joins the sandbox cgroups -> ``unshare -rm`` + ``mount`` the overlay workspace in a
private mount namespace (bwrap 0.8 has no overlay option) -> ``bwrap`` with fresh user, pid,
net, ipc, uts and cgroup namespaces, a curated read-only view of the system, a seccomp filter
-> the guest agent, which applies Landlock before serving and is the parent of everything.

With egress on (and ``ip`` + ``iptables`` present), the network namespace is made one step
earlier, by ``unshare -rn`` (whose user namespace owns it, so nothing inside bwrap's nested
user namespace can change it), and set up so that a direct TCP connection to any address
reaches the guest agent's proxy port, which answers it with the network policy's refusal
instead of a bare "Network is unreachable" (``DIRECT_DENIAL_SETUP``). The namespace still
has no device but loopback: nothing can leave it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import anyio
from anyio.abc import UNIXSocketStream

from stockade._errors import BackendUnavailableError, SandboxStartError
from stockade.backends._process import ProcessSandbox, socket_channel
from stockade.backends.base import (
    AGENT_GUEST_PATH,
    Availability,
    Backend,
    Capabilities,
    LaunchSpec,
)

__all__ = ["BubblewrapBackend", "build_bwrap_argv"]

logger = logging.getLogger(__name__)

GUEST_PYTHON = "/usr/bin/python3"
#: Unprivileged uid/gid that processes run as inside (mapped to the caller's own uid).
SANDBOX_UID = 1000

#: Host /etc entries a program needs and that hold no secrets; all else in /etc is hidden.
ETC_ALLOWLIST = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "mime.types",
    "os-release",
    "protocols",
    "python3",
    "python3.11",
    "services",
    "ssl",
    "terminfo",
    "timezone",
)

#: Directories inside allow-listed /etc entries that hold secrets; hidden under empty tmpfs.
_HIDDEN_ETC = ("/etc/ssl/private",)

_SYNTHETIC_ETC = ("passwd", "group", "hosts", "hostname", "nsswitch.conf")


#: PATH of the launch chain (unprivileged users often lack the sbin directories in theirs).
LAUNCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: What the launch chain sets up the sandbox's network namespace with.
_NETNS_TOOLS = ("ip", "iptables", "ip6tables")


@functools.lru_cache(maxsize=1)
def _probe_cached() -> Availability:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Availability(
            False,
            "bwrap (bubblewrap) not found on PATH",
            "install the 'bubblewrap' package (apt-get install bubblewrap)",
        )
    if not Path(GUEST_PYTHON).exists():
        return Availability(
            False,
            f"{GUEST_PYTHON} not found; the guest agent needs the system Python",
            "install the 'python3' package",
        )
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return Availability(
            False, "unshare/mount (util-linux) not found", "install util-linux and mount"
        )
    missing = [name for name in _NETNS_TOOLS if shutil.which(name, path=LAUNCH_PATH) is None]
    if missing:
        # Without them a sandbox would run without the documented answer to direct
        # connections (they are redirected to the agent, which refuses them with the reason).
        return Availability(
            False,
            f"{' and '.join(missing)} not found in {LAUNCH_PATH}: the namespace backend sets up "
            "the sandbox's network namespace with them",
            "install the 'iproute2' and 'iptables' packages (apt-get install iproute2 iptables)",
        )
    try:
        proc = subprocess.run(
            [bwrap, "--ro-bind", "/", "/", "--unshare-user", "--unshare-net", "--", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Availability(False, f"bwrap failed to run: {exc}", "check the bwrap install")
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        return Availability(
            False,
            f"bwrap cannot create user namespaces here: {err}",
            "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            "or user.max_user_namespaces > 0)",
        )
    try:
        from stockade.backends._seccomp import build_filter

        build_filter()
    except BackendUnavailableError as exc:
        return Availability(False, str(exc), exc.fix)
    return Availability(True, f"bubblewrap at {bwrap}")


def compiled_agent(source: Path, cache_dir: Path | None) -> Path:
    """The guest agent compiled to bytecode by the guest's own Python, cached on the host.

    A script run as ``python3 file.py`` is compiled on every start (scripts get no .pyc);
    for the 2000-line agent that is most of its start-up time. The cache key covers the
    agent's content and the interpreter binary, so an upgrade of either recompiles.
    """
    if cache_dir is None:
        return source
    data = source.read_bytes()
    st = os.stat(os.path.realpath(GUEST_PYTHON))
    key = hashlib.sha256(data + f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:20]
    target = cache_dir / f"agent-{key}.pyc"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = cache_dir / f".agent-{key}.{os.getpid()}.pyc"
    proc = subprocess.run(
        [GUEST_PYTHON, "-S", "-I", "-c",
         "import py_compile,sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
         str(source), str(tmp)],
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        logger.warning("could not precompile the guest agent: %s", proc.stderr[-500:])
        tmp.unlink(missing_ok=True)
        return source
    tmp.chmod(0o644)
    os.replace(tmp, target)
    return target


def _etc_dir(spec: LaunchSpec) -> Path:
    """Write the synthetic /etc files (no host accounts, no host names) for this sandbox."""
    etc = spec.state_dir / "etc"
    etc.mkdir(exist_ok=True)
    uid = SANDBOX_UID
    hostname = spec.policy.hostname
    local_names = spec.egress.local_names if spec.egress is not None else ()
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n"
        f"user:x:{uid}:{uid}:sandbox user:/tmp/home:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nuser:x:{uid}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n"
        + "".join(f"127.0.0.1\t{name}\n" for name in local_names),
        "hostname": hostname + "\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    }
    for name, content in files.items():
        (etc / name).write_text(content)
    return etc


#: Run as root of the user namespace that owns the sandbox's fresh network namespace, with
#: the proxy port as $1: best effort, every TCP connection to a non-loopback address is
#: redirected to the agent's proxy port; then loopback comes up (bwrap does it when it makes
#: the namespace itself) and, only for a family whose redirect is in place, every address
#: becomes local (a route, so that a connect() gets that far instead of failing with
#: "Network is unreachable"); IPv6 only where the host has it. Packets never leave the
#: namespace either way: it has no other device. The link and routes go to one
#: ``ip -batch`` (one exec instead of three); if that fails, each step is retried alone so
#: the failure is told apart (``route replace`` repeats harmlessly).
DIRECT_DENIAL_SETUP = (
    "v4=; v6=; "
    "iptables -w -t nat -A OUTPUT -p tcp ! -d 127.0.0.0/8 -j REDIRECT --to-ports $1 "
    ">/dev/null 2>&1 && v4=1; "
    "ip6tables -w -t nat -A OUTPUT -p tcp ! -d ::1/128 -j REDIRECT --to-ports $1 "
    ">/dev/null 2>&1 && v6=1; "
    "r4='route replace local 0.0.0.0/0 dev lo table local'; "
    "r6='route replace local ::/0 dev lo table local'; "
    "if ! printf '%s\\n' 'link set lo up' ${v4:+\"$r4\"} ${v6:+\"$r6\"} "
    "| ip -batch - >/dev/null 2>&1; then "
    "ip link set lo up || exit 1; "
    '[ -n "$v4" ] && { ip $r4 >/dev/null 2>&1 || v4=; }; '
    '[ -n "$v6" ] && { ip $r6 >/dev/null 2>&1 || v6=; }; '
    "fi; "
    '[ -n "$v4" ] || echo "stockade: direct connections will fail without the policy notice" >&2; '
    "shift; "
)


def _own_netns(spec: LaunchSpec) -> bool:
    """Whether the launch chain makes (and sets up) the network namespace before bwrap
    (always with a network policy: the probe refuses a host without ``ip``/``iptables``)."""
    return spec.egress is not None


def build_bwrap_argv(
    spec: LaunchSpec,
    *,
    merged: Path | None,
    seccomp_fd: int,
    info_fd: int,
    with_cgroup_rlimits: bool,
    own_netns: bool = False,
) -> list[str]:
    """The bwrap command line (without the cgroup / overlay / network namespace prefix).

    With ``own_netns`` the launch chain has made the network namespace already.
    """
    policy = spec.policy
    ws = policy.workspace
    guest_ws = ws.guest_path
    argv = [
        "bwrap",
        "--unshare-user",
        "--unshare-pid",
        *(() if own_netns else ("--unshare-net",)),
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        policy.hostname,
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--cap-drop",
        "ALL",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / top
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), f"/{top}"]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), f"/{top}"]
    etc = _etc_dir(spec)
    for name in ETC_ALLOWLIST:
        if os.path.lexists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for private in _HIDDEN_ETC:
        # Run by root, the sandbox user is root on the host: owner-only files inside the
        # bound entries (TLS private keys) would be readable. An empty tmpfs covers them.
        if os.path.isdir(private):
            argv += ["--tmpfs", private]
    for name in _SYNTHETIC_ETC:
        argv += ["--ro-bind", str(etc / name), f"/etc/{name}"]
    if spec.egress is not None:
        for host_file, guest_file in spec.egress.files:
            argv += ["--ro-bind", host_file, guest_file]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    from stockade.workspace.disk import fresh_tmp

    tmp_dir = fresh_tmp(spec.state_dir, os.getuid())
    if tmp_dir is not None:
        # On the sandbox's own disk: /tmp and home share limits.disk with the workspace.
        argv += ["--bind", str(tmp_dir), "/tmp"]
    else:
        tmp_size = policy.limits.disk_bytes or policy.limits.memory_bytes
        if tmp_size:
            argv += ["--size", str(tmp_size)]
        argv += ["--tmpfs", "/tmp"]
    argv += ["--dir", "/tmp/home", "--dir", "/run/stockade"]
    agent = compiled_agent(spec.agent_source, spec.cache_dir)
    guest_agent = AGENT_GUEST_PATH + ("c" if agent.suffix == ".pyc" else "")
    argv += ["--ro-bind", str(agent), guest_agent]

    # Workspace.
    if ws.mode == "none" or ws.host_path is None:
        cwd = "/tmp/home"
    else:
        source = merged if ws.mode == "cow" and merged is not None else ws.host_path
        bind = "--ro-bind" if ws.mode == "ro" else "--bind"
        argv += [bind, str(source), guest_ws]
        for rel in ws.protected:
            if os.path.lexists(ws.host_path / rel) and not (ws.host_path / rel).is_symlink():
                argv += ["--ro-bind", str(source / rel), f"{guest_ws}/{rel}"]
        cwd = guest_ws
    argv += ["--chdir", cwd]

    argv += ["--clearenv"]
    env = dict(policy.env)
    if spec.egress is not None:
        env.update(spec.egress.env)
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    argv += ["--remount-ro", "/", "--seccomp", str(seccomp_fd), "--info-fd", str(info_fd)]

    # The agent: applies Landlock, then serves the protocol on its stdio.
    argv += ["--", GUEST_PYTHON, "-S", "-I", guest_agent, "--workspace", cwd]
    argv += ["--landlock", "best-effort", "--landlock-scope"]
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", "/run/stockade"):
        argv += ["--landlock-ro", path]
    rw = ["/tmp", "/dev"]
    if ws.mode in ("cow", "rw") and ws.host_path is not None:
        rw.append(guest_ws)
    elif ws.mode == "ro" and ws.host_path is not None:
        argv += ["--landlock-ro", guest_ws]
    for path in rw:
        argv += ["--landlock-rw", path]
    if spec.egress is not None:
        argv += spec.egress.agent_args()
    argv += ["--rlimit", "core=0"]
    if with_cgroup_rlimits:
        # No cgroups (unprivileged, or none on the host): per-process rlimits instead.
        if policy.limits.pids:
            argv += ["--rlimit", f"nproc={policy.limits.pids}"]
        if policy.limits.memory_bytes:
            argv += ["--rlimit", f"as={policy.limits.memory_bytes}"]
    return argv


class BubblewrapBackend(Backend):
    """Tier 2.5: Linux namespaces + seccomp + Landlock via bubblewrap."""

    name = "namespace"
    capabilities = Capabilities(
        tier=2.5,
        isolation="Linux namespaces (user, pid, net, ipc, uts, cgroup, mount) + seccomp + Landlock",
        enforces=(
            "no network device but loopback (fresh network namespace)",
            "host files invisible except read-only /usr and a curated /etc",
            "workspace copy-on-write through overlayfs",
            "seccomp denies module loading, kexec, bpf, perf, keyctl, ptrace, mount, "
            "new user namespaces, io_uring, userfaultfd, TIOCSTI",
            "Landlock restricts writes to the workspace, /tmp and /dev (kernel >= 5.13)",
            "memory, pids and cpu limits through cgroups when run as root; rlimits otherwise",
        ),
        does_not_enforce=(
            "a separate kernel: a kernel exploit escapes (use microvm or gvisor for that)",
            "cgroup limits when unprivileged on a cgroup v1 host (rlimits are weaker)",
        ),
    )

    @classmethod
    def probe(cls) -> Availability:
        return _probe_cached()

    @classmethod
    def probe_inputs(cls) -> tuple[str, ...]:
        tools = [
            shutil.which(name) or f"(no {name} on PATH)" for name in ("bwrap", "unshare", "mount")
        ]
        tools += [
            shutil.which(name, path=LAUNCH_PATH) or f"(no {name} in {LAUNCH_PATH})"
            for name in _NETNS_TOOLS
        ]
        return (*tools, GUEST_PYTHON)

    async def launch(self, spec: LaunchSpec) -> ProcessSandbox:
        from stockade.backends._cgroups import SandboxCgroup, probe_cgroups
        from stockade.backends._seccomp import build_filter

        policy = spec.policy
        limits = policy.limits
        cgroup: SandboxCgroup | None = None
        if (limits.memory_bytes or limits.pids or limits.cpus) and probe_cgroups().available:
            cgroup = SandboxCgroup.create(
                spec.sandbox_id,
                memory_bytes=limits.memory_bytes,
                pids=limits.pids,
                cpus=limits.cpus,
            )

        merged: Path | None = None
        prefix: list[str] = []
        if cgroup is not None:
            joins = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(cgroup.procs_files())))
            files = [str(p) for p in cgroup.procs_files()]
            script = f'{joins} && shift {len(files)} && exec "$@"'
            prefix += ["/bin/sh", "-c", script, "sh", *files]
        own_netns = _own_netns(spec)
        netns_args: list[str] = []
        setup = ""
        if own_netns:
            assert spec.egress is not None
            netns_args = ["--net"]
            setup = DIRECT_DENIAL_SETUP
        if policy.workspace.mode == "cow" and spec.workspace is not None:
            merged = spec.state_dir / "merged"
            merged.mkdir(exist_ok=True)
            lower_link = spec.state_dir / "lower"
            if not lower_link.is_symlink():
                lower_link.symlink_to(spec.workspace.lower)
            prefix += [
                "unshare",
                "--user",
                "--map-root-user",
                *netns_args,
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                setup
                + 'mount -t overlay stockade -o "lowerdir=$1,upperdir=$2,workdir=$3,userxattr" '
                '"$4" && shift 4 && exec "$@"',
                "sh",
                *([str(spec.egress.proxy_port)] if own_netns and spec.egress else []),
                str(lower_link),
                str(spec.workspace.upper),
                str(spec.workspace.work),
                str(merged),
            ]
        elif own_netns:
            assert spec.egress is not None
            prefix += [
                "unshare",
                "--user",
                "--map-root-user",
                *netns_args,
                "/bin/sh",
                "-c",
                setup + 'exec "$@"',
                "sh",
                str(spec.egress.proxy_port),
            ]

        seccomp_fd = os.memfd_create("stockade-seccomp", 0)
        # One socket for the agent's stdin and stdout: the host kernel is shared, so the
        # agent can hand tunnelled connections' sockets over it (egress fast path).
        host_end, agent_end = socket_channel()
        info_r, info_w = os.pipe()
        os.set_blocking(info_r, False)
        log_path = spec.state_dir / "sandbox.log"
        try:
            os.write(seccomp_fd, build_filter())
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            argv = prefix + build_bwrap_argv(
                spec,
                merged=merged,
                seccomp_fd=seccomp_fd,
                info_fd=info_w,
                with_cgroup_rlimits=cgroup is None,
                own_netns=own_netns,
            )
            with log_path.open("ab") as log:
                process = await anyio.open_process(
                    argv,
                    stdin=agent_end.fileno(),
                    stdout=agent_end.fileno(),
                    stderr=log,
                    pass_fds=(seccomp_fd, info_w),
                    env={"PATH": LAUNCH_PATH, "LANG": "C.UTF-8"},
                    cwd="/",
                )
        except OSError as exc:
            os.close(info_r)
            host_end.close()
            if cgroup is not None:
                cgroup.destroy()
            raise SandboxStartError(f"could not start bwrap: {exc}") from exc
        finally:
            os.close(seccomp_fd)
            os.close(info_w)
            agent_end.close()
        channel = await UNIXSocketStream.from_socket(host_end)
        return ProcessSandbox(process, log_path, cgroup=cgroup, info_fd=info_r, channel=channel)
