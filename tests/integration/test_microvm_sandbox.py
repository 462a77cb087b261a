"""The microVM backend for real: QEMU microvm guests (TCG here), root inside the VM, guest
death, snapshots, large workspaces. Files, stdin, signals, PTY and timeouts are the shared
conformance suite's (tests/contract/test_conformance.py), which runs on microvm too.

Boots are slow under emulation, so most tests share one module-scoped sandbox; tests that
need a fresh VM get one restored from the image's snapshot.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_backend
from sandbox_helpers import ReachableHandler, serve_http
from stockade import Sandbox, SandboxStateError

pytestmark = pytest.mark.timeout(300)


def _make_project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "README.md").write_text("hello\n")
    (root / "src").mkdir()
    (root / "src" / "app.py").write_text("print('app')\n")
    (root / "src" / "old").mkdir()
    (root / "src" / "old" / "x.txt").write_text("x\n")
    (root / "gone.txt").write_text("bye\n")
    git = root / ".git"
    (git / "hooks").mkdir(parents=True)
    (git / "config").write_text("[core]\n")
    return root


@pytest.fixture(scope="module")
def vm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """State dir for the module's shared sandboxes (the per-test one is not set up yet)."""
    require_backend("microvm")
    base = tmp_path_factory.mktemp("microvm-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STOCKADE_STATE_DIR", str(base / "state"))
        yield base


@pytest.fixture(scope="module")
def shared_project(vm_env: Path) -> Path:
    return _make_project(vm_env / "project")


@pytest.fixture(scope="module")
def sb(vm_env: Path, shared_project: Path) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(project_dir=shared_project, backend="microvm")
    try:
        yield sandbox
    finally:
        sandbox.close()


@pytest.fixture
def microvm() -> str:
    require_backend("microvm")
    return "microvm"


def _qemu_pid(sandbox: Sandbox) -> int:
    launched = sandbox._inner._launched  # type: ignore[attr-defined]
    assert launched is not None
    return int(launched.vm.pid)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state == "Z"


# --- conformance ------------------------------------------------------------------------


def test_guest_kernel_via_cli(microvm: str, project: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", "run", "--rm", "--backend", "microvm",
         "-C", str(project), "--", "uname", "-r"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    guest = r.stdout.strip()
    assert guest and guest != os.uname().release
    assert (Path("/lib/modules") / guest).is_dir()  # the Debian kernel the image was built from


def test_exec_basics(sb: Sandbox) -> None:
    r = sb.commands.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert sb.commands.run(["cat", "/etc/hostname"]).stdout.strip() == "sandbox"
    assert sb.commands.run("hostname").stdout.strip() == "sandbox"
    assert sb.commands.run(["sh", "-c", "cat"], stdin=b"piped").stdout == "piped"
    assert sb.commands.run("pwd").stdout.strip() == "/workspace"
    assert sb.commands.run("uname -r").stdout.strip() != os.uname().release


def test_protected_paths_cannot_be_written(sb: Sandbox, shared_project: Path) -> None:
    assert sb.commands.run("echo evil > .git/hooks/pre-commit").exit_code != 0
    assert sb.commands.run("echo '[core] hooksPath = /tmp' >> .git/config").exit_code != 0
    assert not (shared_project / ".git" / "hooks" / "pre-commit").exists()
    assert (shared_project / ".git" / "config").read_text() == "[core]\n"


def test_host_secrets_are_invisible(
    microvm: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = uuid.uuid4().hex
    secret_dir = Path.home() / f".stockade-test-secret-{marker[:8]}"
    secret_dir.mkdir()
    (secret_dir / "key").write_text(marker)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-not-for-the-sandbox")
    try:
        with Sandbox.create(project_dir=project, backend=microvm) as sandbox:
            assert sandbox.commands.run(["cat", str(secret_dir / "key")]).exit_code != 0
            env = sandbox.commands.run("env; cat /proc/1/environ").stdout
            assert "hunter2" not in env and "AWS_SECRET" not in env
            found = sandbox.commands.run(f"grep -rl {marker} /root /home /etc /tmp; true")
            assert marker not in found.stdout and found.stdout.strip() == ""
    finally:
        (secret_dir / "key").unlink()
        secret_dir.rmdir()


def test_no_network_but_the_proxy(sb: Sandbox) -> None:
    with serve_http(ReachableHandler) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        script = (
            "import socket,sys\n"
            "def try_(addr):\n"
            "    try:\n"
            "        socket.create_connection(addr, timeout=2).close(); return 'connected'\n"
            "    except OSError as e: return type(e).__name__\n"
            f"print(try_(('127.0.0.1', {port})))\n"
            f"print(try_(('10.0.2.2', {port})))\n"
            "print(try_(('203.0.113.7', 80)))\n"
            "try:\n    socket.getaddrinfo('example.com', 80); print('resolved')\n"
            "except OSError as e: print(type(e).__name__)\n"
        )
        r = sb.commands.run(["python3", "-c", script])
        assert r.exit_code == 0, r.stderr
        lines = r.stdout.split()
        assert "connected" not in lines[:3] and lines[3] != "resolved", lines
        assert sb.commands.run("ls /sys/class/net").stdout.split() == ["lo"]
        # The one way out is the agent tunnel to the policy proxy: deny-all by default.
        proxy = sb.commands.run("echo $HTTP_PROXY").stdout.strip()
        assert proxy.startswith("http://127.0.0.1:")
        probe = (
            "import urllib.request,urllib.error\n"
            "try:\n    urllib.request.urlopen('http://example.com/', timeout=20); print('open')\n"
            "except urllib.error.HTTPError as e: print(e.code)\n"
        )
        r = sb.commands.run(["python3", "-c", probe])
        assert r.stdout.startswith("403"), (r.stdout, r.stderr)


# --- root inside the VM ---------------------------------------------------------------


@pytest.fixture(scope="module")
def root_sb(vm_env: Path, shared_project: Path) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(
        project_dir=shared_project, backend="microvm", config={"microvm.user": "root"}
    )
    try:
        yield sandbox
    finally:
        sandbox.close()


def test_commands_run_unprivileged_by_default(sb: Sandbox) -> None:
    assert sb.commands.run("id -u").stdout.strip() == "1000"
    assert sb.commands.run("cat /etc/shadow").exit_code != 0
    assert sb.commands.run("echo x > /usr/evil").exit_code != 0
    assert sb.commands.run("echo x > owned.txt && rm owned.txt").exit_code == 0


def test_root_in_the_vm_touches_nothing_on_the_host(root_sb: Sandbox) -> None:
    sb = root_sb
    host_had_dummy = Path("/sys/module/dummy").exists()
    marker = uuid.uuid4().hex[:12]
    script = (
        "set -e; id -u; "
        "/run/stockade/busybox insmod $(find /lib/modules -name dummy.ko); "
        "grep -c '^dummy ' /proc/modules; "
        "mkdir -p /mnt/t && mount -t tmpfs t /mnt/t && echo m > /mnt/t/f && cat /mnt/t/f; "
        f"echo x > /dev/stockade-{marker} && cat /dev/stockade-{marker}; "
        f"echo y > /usr/stockade-{marker}; "
        "echo 1 > /proc/sys/kernel/sysrq"
    )
    r = sb.commands.run(script)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.split() == ["0", "1", "m", "x"]
    assert Path("/sys/module/dummy").exists() == host_had_dummy
    assert not Path(f"/dev/stockade-{marker}").exists()
    assert not Path(f"/usr/stockade-{marker}").exists()
    assert not Path("/mnt/t/f").exists()


@pytest.mark.parametrize(
    ("command", "reason"),
    [("/run/stockade/busybox poweroff -f", "guest poweroff"),
     ("echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger", "kernel panic")],
)  # fmt: skip
def test_guest_death_ends_the_sandbox(
    microvm: str, project: Path, command: str, reason: str
) -> None:
    sandbox = Sandbox.create(project_dir=project, backend=microvm, config={"microvm.user": "root"})
    try:
        pid = _qemu_pid(sandbox)
        with pytest.raises(SandboxStateError, match=reason):
            sandbox.commands.run(command)
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(pid), "QEMU is still running"
        assert not sandbox.is_running()
    finally:
        sandbox.close()
    assert _gone(pid)


def test_close_leaves_no_qemu(microvm: str, project: Path) -> None:
    sandbox = Sandbox.create(project_dir=project, backend=microvm)
    pid = _qemu_pid(sandbox)
    assert not _gone(pid)
    sandbox.close()
    assert _gone(pid)


def test_sandbox_wall_clock_timeout(microvm: str, project: Path) -> None:
    with Sandbox.create(project_dir=project, backend=microvm, timeout=5) as sandbox:
        pid = _qemu_pid(sandbox)
        with pytest.raises(SandboxStateError, match="timeout"):
            sandbox.commands.run(["sleep", "60"])
        assert not sandbox.is_running()
    assert _gone(pid)


# --- workspace ----------------------------------------------------------------------------

_CHANGES = (
    "set -e; echo hi > new.txt; echo changed > README.md; rm src/app.py; rm gone.txt; "
    "rm -rf src/old; mkdir src/old; echo fresh > src/old/y.txt; mkdir -p d/e; "
    "echo deep > d/e/f; ln -s README.md link; chmod 600 README.md"
)


def _diff_of(sandbox: Sandbox) -> dict[str, object]:
    return {c.path: (c.kind, c.to_dict()) for c in sandbox.workspace.diff()}


def test_diff_apply_reset_identical_to_namespace(
    microvm: str, tmp_path: Path, namespace_backend: str
) -> None:
    results = {}
    for backend in (namespace_backend, microvm):
        project = _make_project(tmp_path / backend)
        with Sandbox.create(project_dir=project, backend=backend) as sandbox:
            r = sandbox.commands.run(_CHANGES)
            assert r.exit_code == 0, r.stderr
            assert (project / "README.md").read_text() == "hello\n"  # host untouched
            diff = _diff_of(sandbox)
            applied = sandbox.workspace.apply(["new.txt", "src/old"])
            after_apply = _diff_of(sandbox)
            sandbox.workspace.reset()
            after_reset = _diff_of(sandbox)
            view = sandbox.commands.run("cat README.md; ls src").stdout
        results[backend] = (diff, applied.applied, after_apply, after_reset, view)
        assert (project / "new.txt").read_text() == "hi\n"
        assert (project / "src" / "old" / "y.txt").read_text() == "fresh\n"
        assert not (project / "src" / "old" / "x.txt").exists()
    ns, vm = results[namespace_backend], results[microvm]
    assert set(vm[0]) == {
        "new.txt", "README.md", "src/app.py", "gone.txt", "src/old/x.txt", "src/old/y.txt",
        "d", "d/e", "d/e/f", "link",
    }  # fmt: skip
    assert vm == ns


def test_large_workspace_goes_on_a_disk(microvm: str, tmp_path: Path) -> None:
    project = _make_project(tmp_path / "big")
    blob = os.urandom(12 * 1024 * 1024)
    (project / "blob.bin").write_bytes(blob)
    with Sandbox.create(project_dir=project, backend=microvm) as sandbox:
        launched = sandbox._inner._launched  # type: ignore[attr-defined]
        assert any(d.drive_id == "workspace" for d in launched.vm.spec.disks)
        r = sandbox.commands.run("sha256sum blob.bin && echo more >> README.md && rm blob.bin")
        assert r.exit_code == 0, r.stderr
        import hashlib

        assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
        kinds = {c.path: c.kind for c in sandbox.workspace.diff()}
        assert kinds == {"README.md": "modified", "blob.bin": "deleted"}
    assert (project / "blob.bin").read_bytes() == blob


# --- snapshots ----------------------------------------------------------------------------


def test_restored_vms_get_fresh_clock_and_entropy(microvm: str, project: Path) -> None:
    # The module's first sandbox booted cold and saved the snapshot; these two restore it.
    outputs = []
    for _ in range(2):
        with Sandbox.create(project_dir=project, backend=microvm) as sandbox:
            launched = sandbox._inner._launched  # type: ignore[attr-defined]
            assert launched.restored
            r = sandbox.commands.run("date +%s; head -c 16 /dev/urandom | od -An -tx1")
            lines = r.stdout.split("\n", 1)
            assert abs(int(lines[0]) - time.time()) < 30
            outputs.append(lines[1])
    assert outputs[0] != outputs[1]


def test_restored_vms_share_nothing_of_each_other(
    microvm: str, project: Path, tmp_path: Path
) -> None:
    # Two sandboxes restored from the same image snapshot: what the first one was given
    # (root, hostname, env, workspace) or did (files, processes) is not in the second.
    # Their RAM maps the snapshot's memory file copy-on-write: nothing goes back into it.
    marker = uuid.uuid4().hex
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text(marker)
    first = Sandbox.create(
        project_dir=other,
        backend=microvm,
        env={"LEAK_MARK": marker},
        config={"microvm.user": "root", "hostname": "alpha"},
    )
    with first:
        assert first._inner._launched.restored  # type: ignore[attr-defined]
        vm = first._inner._launched.vm  # type: ignore[attr-defined]
        memory = Path(vm.spec.options["memory_file"])
        r = first.commands.run(
            f"id -u; hostname; cat mine.txt; echo; echo {marker} > /tmp/left;"
            f" echo {marker} > /etc/left; echo {marker} > ws.txt; echo $LEAK_MARK"
        )
        assert r.stdout.split() == ["0", "alpha", marker, marker]
        first.commands.run(["sleep", "4242"], background=True)
    with Sandbox.create(project_dir=project, backend=microvm) as second:
        assert second._inner._launched.restored  # type: ignore[attr-defined]
        r = second.commands.run(
            "id -u; hostname; ls; env; cat /proc/[0-9]*/cmdline | tr '\\0' ' ';"
            " tr '\\0' '\\n' < /proc/1/environ"
        )
        lines = r.stdout.splitlines()
        assert lines[:2] == ["1000", "sandbox"]
        assert "mine.txt" not in r.stdout and "ws.txt" not in r.stdout
        assert marker not in r.stdout and "LEAK_MARK" not in r.stdout
        assert "4242" not in r.stdout and "alpha" not in r.stdout
        found = second.commands.run(
            f"grep -rl {marker} /tmp /etc /root /home /run /var /workspace 2>/dev/null; true"
        )
        assert found.stdout.strip() == ""
        assert second.commands.run("cat /etc/hosts /etc/hostname").stdout.count("alpha") == 0
    with memory.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
        assert ram.find(marker.encode()) == -1


def test_snapshot_restore_fork_sdk(microvm: str, project: Path) -> None:
    with Sandbox.create(project_dir=project, backend=microvm) as sb:
        assert sb.commands.run("echo one > state.txt; echo ram > /tmp/mem").exit_code == 0
        sb.snapshot("t1")
        sb.commands.run("echo two > state.txt; rm /tmp/mem")
        sb.restore("t1")
        r = sb.commands.run("cat state.txt /tmp/mem")
        assert r.stdout == "one\nram\n", r.stderr
        forked = sb.fork()
        try:
            run = forked.commands.run
            assert run("cat state.txt").stdout == "one\n"
            assert abs(int(run("date +%s").stdout) - time.time()) < 30
            run("echo fork-only > f.txt")
            assert sb.commands.run("test -e f.txt").exit_code != 0  # they diverge
            kinds = {c.path: c.kind for c in forked.workspace.diff()}
            assert kinds == {"state.txt": "added", "f.txt": "added"}
        finally:
            forked.close()
        assert {c.path for c in sb.workspace.diff()} == {"state.txt"}
    assert not (project / "state.txt").exists()


def cli(*args: str) -> str:
    """Run the real CLI; its stdout (a failure fails the test with both streams)."""
    r = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", *args],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def test_snapshot_restore_fork_cli(microvm: str, project: Path) -> None:
    name = cli("create", "--backend", "microvm", "-C", str(project)).strip()
    forked = ""
    try:
        cli("exec", name, "--", "sh", "-c", "echo a > f")
        cli("snapshot", name, "t")
        cli("exec", name, "--", "sh", "-c", "echo b > f")
        cli("restore", name, "t")
        assert cli("exec", name, "--", "cat", "f") == "a\n"
        forked = cli("fork", name).strip()
        assert cli("exec", forked, "--", "cat", "f") == "a\n"
        assert "A f" in cli("diff", forked, "--stat")
        cli("apply", forked, "f")
        assert (project / "f").read_text() == "a\n"
    finally:
        cli("rm", "--force", *(n for n in (name, forked) if n))


def test_snapshot_restore_fork_over_connect(microvm: str, project: Path) -> None:
    """A second process (this one) snapshots, restores and forks a CLI-created microVM."""
    name = cli("create", "--backend", "microvm", "-C", str(project)).strip()
    forked_name = ""
    try:
        with Sandbox.connect(name) as sb:
            sb.commands.run("echo a > f", check=True)
            sb.snapshot("t")
            assert [s["tag"] for s in sb.snapshots()] == ["t"]
            sb.commands.run("echo b > f", check=True)
            sb.restore("t")
            assert sb.commands.run("cat f").stdout == "a\n"
            forked = sb.fork()
            forked_name = forked.name
            assert forked.backend == "microvm" and forked_name != name
            assert forked.commands.run("cat f").stdout == "a\n"
            forked.commands.run("echo fork-only > g", check=True)
            assert sb.commands.run("test -e g").exit_code != 0  # they diverge
        # Closing detached both: each still runs under its own supervisor.
        assert cli("exec", forked_name, "--", "cat", "g") == "fork-only\n"
        assert "A g" in cli("diff", forked_name, "--stat")
    finally:
        cli("rm", "--force", *(n for n in (name, forked_name) if n))


def test_warm_pool(microvm: str, project: Path) -> None:
    import anyio

    from stockade.backends.microvm.pool import WarmPool

    async def scenario() -> list[int]:
        pids = []
        async with WarmPool(size=1) as pool:
            for _ in range(2):
                with anyio.fail_after(120):
                    while pool.ready_count() < 1:
                        await anyio.sleep(0.05)
                sandbox = await pool.create(project_dir=project)
                try:
                    vm = sandbox._launched.vm  # type: ignore[union-attr]
                    assert "stockade-pool-" in str(vm.spec.workdir)  # taken from the pool
                    pids.append(vm.pid)
                    r = await sandbox.commands.run("cat README.md; echo x > y.txt")
                    assert r.stdout == "hello\n"
                    assert {c.path for c in await sandbox.workspace.diff()} == {"y.txt"}
                finally:
                    await sandbox.aclose()
                assert _gone(pids[-1])
            pids.append(pool._ready[0].pid if pool._ready else 0)  # type: ignore[attr-defined]
        return pids

    pids = anyio.run(scenario)
    assert len(set(pids[:2])) == 2
    assert all(_gone(pid) for pid in pids if pid)  # the pool's spare VM too


def test_disk_limit_inside_the_vm(microvm: str, project: Path) -> None:
    with Sandbox.create(project_dir=project, backend=microvm, config={"limits.disk": "64M"}) as sb:
        r = sb.commands.run("dd if=/dev/zero of=/tmp/big bs=1M count=100 2>&1; echo rc=$?")
        assert "rc=0" not in r.stdout and "No space left" in r.stdout, r.stdout
        r = sb.commands.run("dd if=/dev/zero of=big bs=1M count=100 2>&1; echo rc=$?")
        assert "rc=0" not in r.stdout and "No space left" in r.stdout, r.stdout


def test_killed_owner_leaves_no_qemu(microvm: str, project: Path) -> None:
    script = (
        "import sys, time\n"
        "from stockade import Sandbox\n"
        f"sb = Sandbox.create(project_dir={str(project)!r}, backend='microvm')\n"
        "print(sb._inner._launched.vm.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        assert not _gone(pid)
    finally:
        owner.kill()  # SIGKILL: no cleanup code runs in the owner
        owner.wait()
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
