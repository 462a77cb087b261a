"""What is particular to the gvisor and container backends, on the real runtimes.

The shared behaviour is in ``tests/contract/test_conformance.py``; here: gVisor's own kernel,
each engine's hardening as the engine itself reports it, runtime pass-through, the docker
policy refusal, that nothing of ours survives ``kill -9`` of a supervisor plus ``rm``, the
wall-clock timeout of an engine driven without its CLI, and the guest's own shell in an image.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import require_backend
from sandbox_helpers import run_as_nobody
from stockade import PolicyError, Sandbox

pytestmark = pytest.mark.timeout(180)


def stockade(*args: str, env: dict[str, str] | None = None, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stockade {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def test_dmesg_shows_gvisors_kernel(project: Path) -> None:
    require_backend("gvisor")
    r = stockade("run", "--rm", "--backend", "gvisor", "--", "dmesg", cwd=project)
    assert "Starting gVisor..." in r.stdout
    assert "Linux version" not in r.stdout  # the host kernel's banner
    r = stockade("run", "--rm", "--backend", "gvisor", "--", "uname", "-r", cwd=project)
    assert r.stdout.strip() != os.uname().release


def test_runc_bundle_hardening(project: Path) -> None:
    require_backend("container/runc")
    with Sandbox.create(
        project_dir=project, backend="container", config={"container.engine": "runc"}
    ) as sb:
        uid_map = sb.commands.run("cat /proc/self/uid_map").stdout.split()
        # user 1000 inside is the caller outside; every other id maps far from real accounts
        assert ["1000", str(os.getuid()), "1"] == uid_map[3:6] or uid_map[:3] == [
            "1000",
            str(os.getuid()),
            "1",
        ]
        status = sb.commands.run("grep -E 'NoNewPrivs|Seccomp:' /proc/self/status").stdout
        assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
        assert sb.commands.run("cat /proc/kcore").exit_code != 0  # masked
        assert sb.commands.run("echo 1 > /proc/sys/kernel/sysrq").exit_code != 0
        assert sb.agent_info is not None
        if sb.agent_info.landlock_abi:
            assert "landlock" in sb.agent_info.capabilities


def _docker_inspect(sandbox_id: str) -> dict[str, Any]:
    from stockade.backends.container.engine import LABEL, client_for

    client = client_for("docker")
    try:
        (container,) = client.api.containers(filters={"label": f"{LABEL}={sandbox_id}"})
        inspected: dict[str, Any] = client.api.inspect_container(container["Id"])
        return inspected
    finally:
        client.close()


def test_docker_container_hardening(project: Path) -> None:
    require_backend("container/docker")
    with Sandbox.create(
        project_dir=project, backend="container", config={"container.engine": "docker"}, pids=128
    ) as sb:
        host = _docker_inspect(sb.id)["HostConfig"]
        assert host["CapDrop"] == ["ALL"]
        assert host["ReadonlyRootfs"] is True
        assert host["NetworkMode"] == "none"
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert host["PidsLimit"] == 128
        assert host["Memory"] == sb.policy.limits.memory_bytes
        assert not host.get("Binds")  # no host socket, nothing but our mounts
        mounts = sb.commands.run("cat /proc/self/mountinfo").stdout
        assert "docker.sock" not in mounts
        assert sb.commands.run("ls /var/run/docker.sock /run/docker.sock").exit_code != 0


def test_docker_runtime_pass_through_runs_gvisor(project: Path) -> None:
    require_backend("container/docker")
    from stockade.backends.container.engine import client_for

    client = client_for("docker")
    try:
        runtimes = client.info().get("Runtimes", {})
    finally:
        client.close()
    if "runsc" not in runtimes:
        pytest.skip(f"dockerd has no 'runsc' runtime registered (has: {sorted(runtimes)})")
    config = {"container.engine": "docker", "container.runtime": "runsc"}
    with Sandbox.create(project_dir=project, backend="container", config=config) as sb:
        assert sb.agent_info is not None
        assert sb.agent_info.kernel != os.uname().release  # gVisor's, not the host's
        assert sb.commands.run("echo x > f.txt").exit_code == 0
        assert [c.path for c in sb.workspace.diff()] == ["f.txt"]


@pytest.mark.parametrize("backend", ["namespace", "gvisor", "container/runc"])
def test_docker_policy_refused_where_no_private_daemon(project: Path, backend: str) -> None:
    require_backend(backend)
    name, _, engine = backend.partition("/")
    config: dict[str, Any] = {"docker": True}
    if engine:
        config["container.engine"] = engine
    with pytest.raises(PolicyError, match="microvm"):
        Sandbox.create(project_dir=project, backend=name, config=config)


def test_docker_policy_refused_by_auto_without_a_capable_backend(project: Path) -> None:
    from stockade.backends.registry import probe

    if probe("microvm").ok:
        pytest.skip("a microvm backend runs here, so auto may satisfy docker = true")
    with pytest.raises(Exception, match="microvm"):
        Sandbox.create(project_dir=project, config={"docker": True})


def _engine_leftovers(target: str, sandbox_id: str) -> list[str]:
    from stockade.backends.oci_runtime import stockade_containers

    backend, _, engine = target.partition("/")
    left = []
    if backend == "gvisor" and sandbox_id in stockade_containers("runsc"):
        left.append("runsc container")
    if engine in ("runc", "crun") and sandbox_id in stockade_containers(engine):
        left.append(f"{engine} container")
    if engine in ("docker", "podman"):
        from stockade.backends.container.engine import LABEL, client_for

        client = client_for(engine)
        try:
            selector = {"label": f"{LABEL}={sandbox_id}"}
            left += [c["Id"][:12] for c in client.api.containers(all=True, filters=selector)]
            left += [v["Name"] for v in client.api.volumes(filters=selector).get("Volumes") or []]
        finally:
            client.close()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if sandbox_id.encode() in (entry / "cmdline").read_bytes():
                    pids.append(entry.name)
            except OSError:
                continue
    if pids:
        left.append(f"processes {pids}")
    return left


@pytest.mark.parametrize(
    "target", ["gvisor", "container/runc", "container/crun", "container/docker", "container/podman"]
)
def test_kill_9_of_supervisor_then_rm_leaves_nothing(target: str, project: Path) -> None:
    require_backend(target)
    backend, _, engine = target.partition("/")
    env = {"STOCKADE_CONTAINER_ENGINE": engine} if engine else {}
    name = f"k9-{uuid.uuid4().hex[:8]}"
    info = json.loads(
        stockade(
            "create", "--name", name, "--json", "--backend", backend, "-C", str(project), env=env
        ).stdout
    )
    assert info["ok"]
    from stockade.state import StateStore

    record = StateStore().get(name)
    try:
        stockade("exec", name, "--", "sh", "-c", "setsid sleep 600 >/dev/null 2>&1 </dev/null &")
        assert _engine_leftovers(target, record.id)  # it runs
        assert record.supervisor_pid
        os.kill(record.supervisor_pid, signal.SIGKILL)
        # The watchdog deletes the container on its own, without waiting for `rm`.
        deadline = time.monotonic() + 20
        while _engine_leftovers(target, record.id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _engine_leftovers(target, record.id) == []
        rows = json.loads(stockade("ls", "--json").stdout)
        assert next(r["status"] for r in rows if r["name"] == name) == "failed"
    finally:
        stockade("rm", "--force", name, check=False)
    assert _engine_leftovers(target, record.id) == []
    assert name not in stockade("ls").stdout


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_wall_clock_timeout_without_an_engine_cli(
    engine: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Driven through the API alone (no `docker`/`podman` binary, so no lifeline process),
    the sandbox's timeout still kills the container, and says so."""
    require_backend(f"container/{engine}")
    from stockade import SandboxStateError
    from stockade.backends.container import engine as engine_module

    real_which = engine_module.which
    monkeypatch.setattr(
        engine_module, "which", lambda name: None if name == engine else real_which(name)
    )
    sb = Sandbox.create(
        project_dir=project, backend="container", config={"container.engine": engine}, timeout=3
    )
    try:
        [container] = _engine_containers(engine, sb.id)
        # No watchdog (`ENGINE rm -f -v ID` on EOF), so no lifeline process to kill.
        assert _pids_naming(f"rm -f -v {container['Id']}") == []
        with pytest.raises(SandboxStateError, match="timeout of 3s expired"):
            sb.commands.run(["sleep", "60"])
        # Killed by the timer, not by the close below.
        assert not sb.is_running()
        assert [c for c in _engine_containers(engine, sb.id) if c["State"] == "running"] == []
    finally:
        sb.close()
    assert _engine_leftovers(f"container/{engine}", sb.id) == []


def _pids_naming(text: str) -> list[str]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(entry.name)
            except OSError:
                continue
    return pids


def _engine_containers(engine: str, sandbox_id: str) -> list[dict[str, Any]]:
    from stockade.backends.container.engine import LABEL, client_for

    client = client_for(engine)
    try:
        found: list[dict[str, Any]] = client.api.containers(
            all=True, filters={"label": f"{LABEL}={sandbox_id}"}
        )
        return found
    finally:
        client.close()


@pytest.mark.parametrize("target", ["gvisor", "container/runc", "container/crun"])
def test_unprivileged_user(target: str, tmp_path: Path) -> None:
    """Rootless: the runtime runs in a user namespace of the caller, limits by rlimits."""
    require_backend(target)
    backend, _, engine = target.partition("/")
    config = {"container.engine": engine} if engine else {}
    r = run_as_nobody(
        f"backend={backend!r}, config={config!r}, pids=128",
        "echo b > b.txt; cat a.txt",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "0 ['a'] ['b.txt'] 403"


@pytest.fixture(scope="module")
def base_image() -> Any:
    """The image builder's 'base' rootfs (built once if missing; needs mmdebstrap)."""
    import shutil

    from stockade.images import ensure_rootfs, find_rootfs

    found = find_rootfs("base")
    if found is None and shutil.which("mmdebstrap") is None:
        pytest.skip(
            "image 'base' is not built and mmdebstrap is missing (apt-get install mmdebstrap)"
        )
    return found or ensure_rootfs("base")


@pytest.mark.parametrize(
    "target", ["gvisor", "container/runc", "container/crun", "container/docker", "container/podman"]
)
def test_image_rootfs(target: str, project: Path, base_image: Any) -> None:
    """An image-builder rootfs instead of the host's /usr; the shared tree is never written."""
    require_backend(target)
    backend, _, engine = target.partition("/")
    config: dict[str, Any] = {f"{backend}.image": "base"}
    if engine:
        config["container.engine"] = engine
    before = sorted(p.name for p in base_image.tree.iterdir())
    with Sandbox.create(project_dir=project, backend=backend, config=config) as sb:
        version = sb.commands.run("cat /etc/debian_version").stdout.strip()
        assert version == (base_image.tree / "etc" / "debian_version").read_text().strip()
        if "curl" not in base_image.packages and Path("/usr/bin/curl").exists():
            # The host has curl, the image does not: the root really is the image's.
            assert sb.commands.run("command -v curl").exit_code != 0
        assert sb.commands.run("touch /usr/x").exit_code != 0
        assert sb.commands.run("echo x > new.txt").exit_code == 0
        assert [c.path for c in sb.workspace.diff()] == ["new.txt"]
    assert sorted(p.name for p in base_image.tree.iterdir()) == before
    assert not (base_image.tree / "workspace").exists()


@pytest.fixture(scope="module")
def no_bash_rootfs(base_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'base' rootfs without bash (as in busybox or alpine images): a hard-linked copy,
    so the shared tree is not touched."""
    root = tmp_path_factory.mktemp("no-bash") / "tree"
    subprocess.run(["cp", "-al", str(base_image.tree), str(root)], check=True)
    for name in ("bash", "rbash"):
        (root / "usr" / "bin" / name).unlink(missing_ok=True)
    assert (root / "usr" / "bin" / "sh").exists()
    return root


def _shell_says(output: bytes) -> str:
    """Which shell answered: the `shell=...` line SHELL_PROBE prints."""
    import re

    text = output.decode(errors="replace")
    found = re.findall(r"shell=(\w+)\r?\n", text)  # not the echoed input: `shell=sh; fi`
    assert found, text
    return str(found[-1])


SHELL_PROBE = b'if [ -n "$BASH_VERSION" ]; then echo shell=bash; else echo shell=sh; fi; exit 3\n'


@pytest.mark.parametrize("target", ["gvisor", "container/runc"])
@pytest.mark.parametrize("has_bash", [True, False])
def test_default_shell_is_the_guests(
    target: str, has_bash: bool, project: Path, base_image: Any, no_bash_rootfs: Path
) -> None:
    """pty.create() with no command starts the guest's bash, or its sh where the image has no
    bash, whatever the host has."""
    require_backend(target)
    backend, _, engine = target.partition("/")
    image = str(base_image.tree if has_bash else no_bash_rootfs)
    config: dict[str, Any] = {f"{backend}.image": image}
    if engine:
        config["container.engine"] = engine
    chunks: list[bytes] = []
    with Sandbox.create(project_dir=project, backend=backend, config=config) as sb:
        handle = sb.pty.create(on_data=chunks.append)
        handle.send_stdin(SHELL_PROBE)
        assert handle.wait().exit_code == 3
    assert _shell_says(b"".join(chunks)) == ("bash" if has_bash else "sh")


def test_cli_shell_without_bash(project: Path, no_bash_rootfs: Path) -> None:
    """`stockade shell` opens the guest's sh where the image has no bash."""
    import pty
    import select

    require_backend("gvisor")
    env = {"STOCKADE_BACKEND": "gvisor", "STOCKADE_GVISOR_IMAGE": str(no_bash_rootfs)}
    name = f"sh-{uuid.uuid4().hex[:8]}"
    stockade("create", "--name", name, "-C", str(project), env=env)
    try:
        pid, fd = pty.fork()
        if pid == 0:  # child: the CLI on a real terminal
            os.execvp(sys.executable, [sys.executable, "-m", "stockade.cli.main", "shell", name])
        os.write(fd, SHELL_PROBE)
        output = b""
        while select.select([fd], [], [], 60)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        assert _shell_says(output) == "sh"
        assert os.WEXITSTATUS(status) == 3
    finally:
        stockade("rm", "--force", name, check=False)
