"""Real isolation tests of the namespace backend (bubblewrap + seccomp + Landlock + cgroups).

Every test runs the real backend and checks that the attack fails; without bwrap the tests
skip with the probe's reason (and fail in CI, which requires the namespace backend).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import FORK_BOMB, ReachableHandler, host_pids, run_as_nobody, serve_http
from stockade import ExecTimeoutError, PolicyError, Sandbox

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sb(namespace_backend: str, project: Path) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(project_dir=project, backend=namespace_backend, pids=256)
    try:
        yield sandbox
    finally:
        sandbox.close()


def test_exec_basics(sb: Sandbox) -> None:
    r = sb.commands.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert sb.commands.run(["cat", "/etc/hostname"]).stdout.strip() == "sandbox"
    assert sb.commands.run("id -u").exit_code == 0
    assert sb.commands.run(["sh", "-c", "cat"], stdin=b"piped").stdout == "piped"
    assert sb.agent_info is not None and sb.agent_info.pid > 1


def test_workspace_is_copy_on_write(sb: Sandbox, project: Path) -> None:
    r = sb.commands.run("echo hi > new.txt && echo changed > README.md && rm src/app.py")
    assert r.exit_code == 0, r.stderr
    assert not (project / "new.txt").exists()
    assert (project / "README.md").read_text() == "hello\n"
    assert (project / "src" / "app.py").exists()
    diff = sb.workspace.diff()
    kinds = {c.path: c.kind for c in diff}
    assert kinds == {"new.txt": "added", "README.md": "modified", "src/app.py": "deleted"}
    sb.workspace.apply(["new.txt"])
    assert (project / "new.txt").read_text() == "hi\n"
    sb.workspace.reset()
    assert not sb.workspace.diff()
    assert sb.commands.run("cat README.md").stdout == "hello\n"


def test_protected_paths_cannot_be_written(sb: Sandbox, project: Path) -> None:
    r = sb.commands.run("echo evil > .git/hooks/pre-commit")
    assert r.exit_code != 0
    r = sb.commands.run("echo '[core] hooksPath = /tmp' >> .git/config")
    assert r.exit_code != 0
    assert not (project / ".git" / "hooks" / "pre-commit").exists()
    assert (project / ".git" / "config").read_text() == "[core]\n"


def test_host_secrets_are_invisible(
    namespace_backend: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_home = Path(f"/home/stockade-test-{uuid.uuid4().hex[:8]}")
    other_home.mkdir(parents=True)
    (other_home / "secret").write_text("other user's secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-not-for-the-sandbox")
    try:
        with Sandbox.create(project_dir=project, backend=namespace_backend) as sandbox:
            home = Path.home()
            for path in (home / ".ssh", home / ".aws", "/root", other_home / "secret"):
                r = sandbox.commands.run(["cat", str(path)])
                assert r.exit_code != 0, path
                r = sandbox.commands.run(["ls", str(path)])
                assert r.exit_code != 0, path
            env = sandbox.commands.run("env; cat /proc/self/environ; cat /proc/1/environ").stdout
            assert "hunter2" not in env
            assert "AWS_SECRET" not in env
            shadow = sandbox.commands.run(["cat", "/etc/shadow"])
            assert shadow.exit_code != 0
    finally:
        (other_home / "secret").unlink()
        other_home.rmdir()


@pytest.mark.parametrize(
    "target", ["/usr/evil", "/etc/evil", "/evil", "/run/stockade/evil", "/opt/evil"]
)
def test_writes_outside_workspace_and_tmp_fail(sb: Sandbox, target: str) -> None:
    r = sb.commands.run(["sh", "-c", f"echo x > {target}"])
    assert r.exit_code != 0
    assert not Path(target).exists()


def test_tmp_and_workspace_are_writable(sb: Sandbox) -> None:
    assert sb.commands.run("echo x > /tmp/ok && echo y > ok.txt").exit_code == 0


def test_no_network_at_all(sb: Sandbox) -> None:
    with serve_http(ReachableHandler) as port:
        # The host service is reachable from the host...
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        # ...but not from the sandbox: loopback there is the sandbox's own.
        script = (
            "import socket,sys\n"
            "def try_(addr):\n"
            "    try:\n"
            "        s = socket.create_connection(addr, timeout=2)\n"
            "    except OSError as e: return type(e).__name__\n"
            # With egress on, a direct connection reaches only the agent's policy refusal.
            "    data = s.recv(100); s.close()\n"
            "    stockade = data.startswith(b'HTTP/1.1 403 Forbidden by stockade network policy')\n"
            "    return 'refused-by-stockade' if stockade else 'connected'\n"
            f"print(try_(('127.0.0.1', {port})))\n"
            "print(try_(('203.0.113.7', 80)))\n"
            "try:\n    socket.getaddrinfo('example.com', 80); print('resolved')\n"
            "except OSError as e: print(type(e).__name__)\n"
        )
        r = sb.commands.run(["python3", "-c", script])
        lines = r.stdout.split()
        assert r.exit_code == 0, r.stderr
        assert lines[0] != "connected" and lines[1] != "connected" and lines[2] != "resolved"
        ifaces = sb.commands.run("ls /sys/class/net 2>/dev/null || cat /proc/net/dev").stdout
        assert "eth0" not in ifaces


def test_seccomp_and_capabilities(sb: Sandbox) -> None:
    status = sb.commands.run("grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status").stdout
    assert "CapEff:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert "Seccomp:\t2" in status
    assert sb.commands.run("unshare -U true").exit_code != 0
    assert sb.agent_info is not None
    if sb.agent_info.landlock_abi == 0:
        pytest.skip("kernel has no Landlock; seccomp and namespaces checked only")
    assert "landlock" in sb.agent_info.capabilities


def test_fork_bomb_is_stopped_by_pids_limit(namespace_backend: str, project: Path) -> None:
    with Sandbox.create(project_dir=project, backend=namespace_backend, pids=64) as sandbox:
        r = sandbox.commands.run(["python3", "-c", FORK_BOMB], timeout=60)
        assert int(r.stdout.split()[0]) < 64
        subprocess.run(["true"], check=True)  # the host still starts processes
        # The bomb reaped its children: the sandbox is usable again under its limit.
        assert sandbox.commands.run("echo alive").stdout == "alive\n"


def test_memory_hog_is_killed(namespace_backend: str, project: Path) -> None:
    with Sandbox.create(project_dir=project, backend=namespace_backend, memory="128M") as sandbox:
        r = sandbox.commands.run(
            ["python3", "-c", "b = bytearray(512 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"]
        )
        assert r.exit_code != 0
        assert r.signal == 9 or r.exit_code in (137, 1), r
        assert sandbox.commands.run("echo ok").stdout == "ok\n"  # the sandbox itself survives


def test_command_timeout(sb: Sandbox) -> None:
    marker = f"98765{uuid.uuid4().int % 1000}"
    with pytest.raises(ExecTimeoutError) as info:
        sb.commands.run(f"sleep {marker} & sleep {marker}", timeout=0.5)
    assert info.value.result is not None and info.value.result.timed_out
    time.sleep(0.3)
    assert host_pids(f"sleep\x00{marker}") == []


def test_sandbox_close_leaves_no_process(namespace_backend: str, project: Path) -> None:
    marker = f"{uuid.uuid4().int % 10**6 + 10**6}"
    sandbox = Sandbox.create(project_dir=project, backend=namespace_backend)
    sandbox.commands.run(f"setsid sleep {marker} >/dev/null 2>&1 < /dev/null &")
    time.sleep(0.2)
    assert host_pids(f"sleep\x00{marker}")
    sandbox.close()
    assert host_pids(f"sleep\x00{marker}") == []


def test_host_backend_refuses_without_flag(project: Path) -> None:
    with pytest.raises(PolicyError, match="unsafe"):
        Sandbox.create(project_dir=project, backend="host", workspace_mode="rw")


def test_host_backend_runs_with_flag(project: Path) -> None:
    with Sandbox.create(
        project_dir=project, backend="host", unsafe_host=True, workspace_mode="rw"
    ) as sandbox:
        r = sandbox.commands.run("pwd")
        assert r.stdout.strip() == str(project)
        assert sandbox.backend == "host"


def test_two_sandboxes_with_different_policies_in_one_process(
    namespace_backend: str, project: Path
) -> None:
    a = Sandbox.create(project_dir=project, backend=namespace_backend, workspace_mode="ro")
    b = Sandbox.create(project_dir=project, backend=namespace_backend, workspace_mode="cow")
    try:
        assert a.commands.run("echo x > f").exit_code != 0
        assert b.commands.run("echo x > f").exit_code == 0
    finally:
        a.close()
        b.close()


def test_unprivileged_user(namespace_backend: str) -> None:
    """The namespace backend works for an unprivileged user too (rlimits instead of cgroups)."""
    r = run_as_nobody("backend='namespace', pids=128", "id -u; echo b > b.txt; cat a.txt")
    assert r.returncode == 0, r.stderr[-3000:]
    # The egress proxy answers for the unprivileged user's sandbox too (403: denied).
    assert r.stdout.strip() == "0 ['1000', 'a'] ['b.txt'] 403"


def test_workspace_modes(namespace_backend: str, project: Path) -> None:
    with Sandbox.create(project_dir=project, backend=namespace_backend, workspace_mode="none") as a:
        assert a.commands.run("ls /workspace").exit_code != 0
        assert a.commands.run("pwd").stdout.strip() == "/tmp/home"
    with Sandbox.create(project_dir=project, backend=namespace_backend, workspace_mode="rw") as b:
        assert b.commands.run("echo live > live.txt").exit_code == 0
        assert b.commands.run("echo x > .git/hooks/pre-commit").exit_code != 0
    assert (project / "live.txt").read_text() == "live\n"
    assert not (project / ".git" / "hooks" / "pre-commit").exists()


def test_files_api(sb: Sandbox) -> None:
    sb.files.write("dir/note.txt", "hello files")
    assert sb.files.read("dir/note.txt") == "hello files"
    big = os.urandom(3 * 1024 * 1024)
    sb.files.write("/tmp/big.bin", big)
    assert sb.files.read("/tmp/big.bin", format="bytes") == big
    names = [e.name for e in sb.files.list("dir")]
    assert names == ["note.txt"]
    assert sb.files.exists("dir/note.txt")
    sb.files.remove("dir", recursive=True)
    assert not sb.files.exists("dir/note.txt")
    from stockade import SandboxFileNotFoundError, SandboxPermissionError

    with pytest.raises(SandboxFileNotFoundError):
        sb.files.read("missing.txt")
    with pytest.raises(SandboxPermissionError):
        sb.files.write("/usr/evil.txt", "x")


def test_sandbox_wall_clock_timeout(namespace_backend: str, project: Path) -> None:
    from stockade import SandboxStateError

    with Sandbox.create(project_dir=project, backend=namespace_backend, timeout=1) as sandbox:
        with pytest.raises(SandboxStateError, match="timeout"):  # not sleep's exit 0
            sandbox.commands.run(["sleep", "30"])
        assert not sandbox.is_running()


def test_upload_and_download_directories(sb: Sandbox, tmp_path: Path) -> None:
    src = tmp_path / "bundle"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    assert sb.files.upload(src, "/tmp/bundle") >= 3  # a directory's contents go into dest
    assert sb.commands.run("cat /tmp/bundle/a.txt").stdout == "alpha\n"
    sb.commands.run("echo made-inside > /tmp/bundle/sub/c.txt")
    out = tmp_path / "back"
    sb.files.download("/tmp/bundle", out)
    assert (out / "a.txt").read_text() == "alpha\n"
    assert (out / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert (out / "sub" / "c.txt").read_text() == "made-inside\n"
    # A link the guest made pointing outside is skipped, never recreated on the host.
    sb.commands.run("ln -s /etc/passwd /tmp/bundle/escape")
    written = sb.files.download("/tmp/bundle", tmp_path / "again")
    assert not os.path.lexists(tmp_path / "again" / "escape")
    assert tmp_path / "again" / "a.txt" in written


def test_tls_private_keys_stay_hidden(sb: Sandbox) -> None:
    # Run by root, the sandbox's user is root on the host (no capabilities, but owner
    # permissions apply), so the directory of private keys must not be the host's.
    if not Path("/etc/ssl/private").is_dir():
        pytest.skip("this host has no /etc/ssl/private")
    r = sb.commands.run(
        "ls -A /etc/ssl/private | wc -l; stat -f -c %T /etc/ssl/private; ls /etc/ssl/certs | wc -l"
    )
    count, fstype, certs = r.stdout.split()
    assert (count, fstype) == ("0", "tmpfs"), r
    assert int(certs) > 0  # the rest of /etc/ssl (public certificates) is still there


def test_probe_refuses_a_host_without_iptables(
    namespace_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ip/iptables the backend would run without its documented answer to direct
    connections: it must refuse, naming the packages, instead of starting without it."""
    import shutil

    from stockade.backends import bubblewrap

    real_which = shutil.which

    def which(name: str, mode: int = os.F_OK | os.X_OK, path: str | None = None) -> str | None:
        return None if name in ("iptables", "ip6tables") else real_which(name, mode, path)

    monkeypatch.setattr(shutil, "which", which)
    availability = bubblewrap._probe_cached.__wrapped__()
    assert not availability.ok
    assert "iptables" in availability.reason
    assert "apt-get install iproute2 iptables" in availability.fix
    monkeypatch.setattr(shutil, "which", real_which)
    assert bubblewrap._probe_cached.__wrapped__().ok
