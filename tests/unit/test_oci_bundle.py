"""The OCI bundle builder, the container/gvisor config and policy, the registry's variants,
the Docker attach demultiplexer and the kill-9 watchdog: pure logic and small processes."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from stockade import ConfigError, PolicyError
from stockade.backends.base import LaunchSpec
from stockade.backends.oci_bundle import (
    GUEST_UID,
    RootfsView,
    build_config,
    host_rootfs,
    oci_seccomp,
)
from stockade.backends.oci_runtime import OciRuntime, start_watchdog
from stockade.config import load_config
from stockade.policy import EffectivePolicy, compile_policy
from stockade.workspace import WorkspaceLayers


def make_policy(project: Path, tmp_path: Path, **overrides: Any) -> EffectivePolicy:
    environ = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    loaded = load_config(project, environ=environ, overrides=overrides)
    return compile_policy(loaded, environ=environ)


def make_spec(project: Path, tmp_path: Path, **overrides: Any) -> LaunchSpec:
    policy = make_policy(project, tmp_path, **overrides)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    layers = WorkspaceLayers.create(state, project) if policy.workspace.mode == "cow" else None
    return LaunchSpec(
        sandbox_id="0123456789abcdef",
        name="unit",
        policy=policy,
        state_dir=state,
        workspace=layers,
    )


def bundle(spec: LaunchSpec, **kwargs: Any) -> dict[str, Any]:
    rootfs = host_rootfs(spec.state_dir)
    args: dict[str, Any] = {
        "rootfs": rootfs,
        "workspace_source": spec.state_dir / "merged",
        "agent": spec.agent_source,
        "cgroups_path": "/x/stockade-0123456789abcdef",
        "seccomp": True,
        "landlock": True,
    }
    args.update(kwargs)
    return build_config(spec, **args)


def test_bundle_is_hardened(project: Path, tmp_path: Path) -> None:
    config = bundle(make_spec(project, tmp_path, **{"limits.cpus": 1}))
    process = config["process"]
    assert all(v == [] for v in process["capabilities"].values())
    assert process["noNewPrivileges"] is True
    assert process["user"] == {"uid": GUEST_UID, "gid": GUEST_UID}
    assert config["root"]["readonly"] is True
    linux = config["linux"]
    kinds = {ns["type"] for ns in linux["namespaces"]}
    assert kinds >= {"pid", "ipc", "uts", "mount", "network", "user", "cgroup"}
    assert {"containerID": GUEST_UID, "hostID": os.getuid(), "size": 1} in linux["uidMappings"]
    if os.getuid() == 0:
        # Nobody else inside maps to a real account: only 1000 -> the caller.
        others = [m for m in linux["uidMappings"] if m["containerID"] != GUEST_UID]
        assert all(m["hostID"] >= 1_000_000 for m in others)
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    assert "/etc/ssl/private" in linux["maskedPaths"]  # the host's private keys
    assert linux["resources"]["memory"]["limit"] == 2 * 2**30
    assert linux["resources"]["pids"]["limit"] == 1024
    assert linux["resources"]["cpu"] == {"quota": 100_000, "period": 100_000}
    assert linux["cgroupsPath"].endswith("stockade-0123456789abcdef")
    assert linux["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "--landlock" in process["args"]


def test_bundle_mounts_only_what_the_sandbox_may_see(project: Path, tmp_path: Path) -> None:
    spec = make_spec(project, tmp_path)
    config = bundle(spec)
    binds = {m["destination"]: m for m in config["mounts"] if m["type"] == "bind"}
    allowed_sources = ("/usr", "/etc/", str(spec.state_dir), str(project))
    for dest, mount in binds.items():
        assert mount["source"].startswith(allowed_sources), (dest, mount["source"])
        if dest != "/workspace":
            assert "ro" in mount["options"], dest
    assert binds["/workspace"]["source"] == str(spec.state_dir / "merged")
    assert "rw" in binds["/workspace"]["options"]
    # Protected paths that exist are bound read-only over the workspace.
    assert "ro" in binds["/workspace/.git/hooks"]["options"]
    assert "ro" in binds["/workspace/.git/config"]["options"]
    # The agent's directory is read-only as a whole.
    assert "ro" in binds["/run/stockade"]["options"]
    for secret_place in ("/root", "/home", "/etc/shadow", "/var/run/docker.sock"):
        assert secret_place not in binds
    assert not any("docker.sock" in m["source"] for m in binds.values())


def test_read_only_workspace_and_none(project: Path, tmp_path: Path) -> None:
    ro = bundle(make_spec(project, tmp_path, **{"workspace.mode": "ro"}), workspace_source=None)
    ws = next(m for m in ro["mounts"] if m["destination"] == "/workspace")
    assert ws["source"] == str(project.resolve()) and "ro" in ws["options"]
    none = bundle(make_spec(project, tmp_path, **{"workspace.mode": "none"}))
    assert not any(m["destination"] == "/workspace" for m in none["mounts"])
    assert none["process"]["cwd"] == "/tmp/home"


def test_user_space_kernel_gets_headroom_and_rlimits(project: Path, tmp_path: Path) -> None:
    spec = make_spec(project, tmp_path, **{"limits.pids": 64, "limits.memory": "128M"})
    config = bundle(spec, seccomp=False, landlock=False, user_space_kernel=True)
    resources = config["linux"]["resources"]
    assert resources["pids"]["limit"] > 64 and resources["memory"]["limit"] > 128 * 2**20
    args = config["process"]["args"]
    assert "nproc=64" in args and f"as={128 * 2**20}" in args
    assert "seccomp" not in config["linux"] and "--landlock" not in args


def test_seccomp_profile_mirrors_the_namespace_deny_list() -> None:
    profile = oci_seccomp()
    denied = {n for rule in profile["syscalls"] if "args" not in rule for n in rule["names"]}
    assert {"bpf", "mount", "unshare", "setns", "ptrace", "keyctl", "io_uring_setup"} <= denied
    clone_rules = [r for r in profile["syscalls"] if r["names"] == ["clone"]]
    assert len(clone_rules) >= 7  # one per namespace flag
    clone3 = next(r for r in profile["syscalls"] if r["names"] == ["clone3"])
    assert clone3["errnoRet"] == 38  # ENOSYS: glibc falls back to clone


def test_host_rootfs_skeleton(tmp_path: Path) -> None:
    view = host_rootfs(tmp_path)
    assert isinstance(view, RootfsView) and view.host_usr
    assert view.path.is_absolute() and not view.path.is_symlink()
    assert (view.path / "tmp").stat().st_mode & 0o1777 == 0o1777
    for top in ("bin", "lib"):
        host = Path("/") / top
        if host.is_symlink():
            assert os.readlink(view.path / top) == os.readlink(host)
    assert host_rootfs(tmp_path) == view  # idempotent


def test_container_and_gvisor_config(project: Path, tmp_path: Path) -> None:
    policy = make_policy(
        project,
        tmp_path,
        **{"container.engine": "docker", "container.runtime": "runsc", "gvisor.platform": "ptrace"},
    )
    assert policy.container.engine == "docker" and policy.container.runtime == "runsc"
    assert policy.gvisor.platform == "ptrace" and policy.docker is False
    assert EffectivePolicy.from_json(policy.to_json()) == policy
    with pytest.raises(ConfigError, match=r"container\.engine"):
        make_policy(project, tmp_path, **{"container.engine": "lxc"})
    with pytest.raises(ConfigError, match=r"gvisor\.platform"):
        make_policy(project, tmp_path, **{"gvisor.platform": "kvm"})
    with pytest.raises(ConfigError, match=r"container\.runtime"):
        make_policy(project, tmp_path, **{"container.runtime": "runsc; rm -rf /"})
    (project / "stockade.toml").write_text(
        'docker = true\n[container]\nimage = "debian:bookworm"\n'
    )
    policy = make_policy(project, tmp_path)
    assert policy.docker is True and policy.container.image == "debian:bookworm"


def test_environment_selects_the_engine(project: Path, tmp_path: Path) -> None:
    environ = {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "STOCKADE_CONTAINER_ENGINE": "crun",
    }
    loaded = load_config(project, environ=environ)
    assert compile_policy(loaded, environ=environ).container.engine == "crun"


@pytest.mark.parametrize(
    "backend_path",
    [
        "stockade.backends.bubblewrap:BubblewrapBackend",
        "stockade.backends.gvisor:GvisorBackend",
        "stockade.backends.container:ContainerBackend",
    ],
)
def test_docker_inside_refused_naming_a_backend_that_can(
    project: Path, tmp_path: Path, backend_path: str
) -> None:
    import importlib

    from stockade.backends.registry import check_docker_inside

    module, _, name = backend_path.partition(":")
    backend = getattr(importlib.import_module(module), name)()
    policy = make_policy(project, tmp_path, docker=True)
    with pytest.raises(PolicyError, match="microvm") as info:
        check_docker_inside(policy, backend)
    assert "sysbox" in str(info.value)
    check_docker_inside(make_policy(project, tmp_path), backend)  # docker = false: fine


def test_sysbox_runtime_provides_docker_inside(project: Path, tmp_path: Path) -> None:
    from stockade.backends.container import ContainerBackend
    from stockade.backends.registry import check_docker_inside

    policy = make_policy(
        project,
        tmp_path,
        docker=True,
        **{"container.engine": "docker", "container.runtime": "sysbox-runc"},
    )
    check_docker_inside(policy, ContainerBackend())
    ContainerBackend().check_policy(policy)


def test_runtime_option_refused_for_daemonless_engines(project: Path, tmp_path: Path) -> None:
    from stockade.backends.container import ContainerBackend

    policy = make_policy(
        project, tmp_path, **{"container.engine": "runc", "container.runtime": "runsc"}
    )
    with pytest.raises(PolicyError, match="docker and podman"):
        ContainerBackend().check_policy(policy)


def test_registry_lists_the_container_engines_as_variants() -> None:
    from stockade.backends.registry import probe, variants

    assert variants("container") == ("runc", "crun", "docker", "podman")
    assert variants("namespace") == ()
    missing = probe("container/lxc")
    assert not missing.ok and "lxc" in missing.reason


def test_gvisor_platform_choice_never_kvm() -> None:
    from stockade.backends.gvisor import choose_platform

    assert choose_platform("auto", "runsc version 0.0~20240729.0") == "systrap"
    assert choose_platform("auto", "runsc version 0.0~20221219.0") == "ptrace"
    assert choose_platform("ptrace", "runsc version 0.0~20240729.0") == "ptrace"
    with pytest.raises(PolicyError, match="systrap"):
        choose_platform("systrap", "runsc version 0.0~20221219.0")


def test_attach_stream_demultiplexes_stdout_and_logs_stderr(tmp_path: Path) -> None:
    from anyio.abc import SocketStream

    from stockade.backends.container.engine import AttachStream

    def frame(kind: int, data: bytes) -> bytes:
        return struct.pack(">BxxxI", kind, len(data)) + data

    async def main() -> tuple[bytes, bytes]:
        ours, theirs = socket.socketpair()
        stream = AttachStream(await SocketStream.from_socket(ours), tmp_path / "log")
        payload = frame(1, b"hello ") + frame(2, b"on stderr\n") + frame(1, b"world")
        got = b""
        async with anyio.create_task_group() as tg:

            async def send_in_pieces() -> None:
                for piece in (payload[:5], payload[5:13], payload[13:]):  # frames split anywhere
                    theirs.sendall(piece)
                    await anyio.sleep(0.01)

            tg.start_soon(send_in_pieces)
            while len(got) < len(b"hello world"):
                got += await stream.receive()
        await stream.send(b"to stdin")
        echoed = theirs.recv(100)
        await stream.aclose()
        theirs.close()
        return got, echoed

    got, echoed = anyio.run(main)
    assert got == b"hello world" and echoed == b"to stdin"
    assert (tmp_path / "log").read_bytes() == b"on stderr\n"


def _fake_runtime(tmp_path: Path) -> OciRuntime:
    record = tmp_path / "calls"
    script = tmp_path / "fake-runtime"
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    script.chmod(0o755)
    return OciRuntime("fake", str(script), tmp_path / "root")


def _wait_for(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and "delete" in path.read_text():
            return path.read_text()
        time.sleep(0.02)
    return path.read_text() if path.exists() else ""


def test_watchdog_deletes_the_container_when_its_owner_goes(tmp_path: Path) -> None:
    runtime = _fake_runtime(tmp_path)
    watchdog = start_watchdog(runtime, "stockade-abc")
    assert watchdog.stdin is not None
    watchdog.stdin.close()  # what the kernel does when the owner dies, even by kill -9
    watchdog.wait(timeout=5)
    calls = _wait_for(tmp_path / "calls")
    assert "kill stockade-abc KILL" in calls and "delete --force stockade-abc" in calls


def test_watchdog_stands_down_after_a_clean_teardown(tmp_path: Path) -> None:
    runtime = _fake_runtime(tmp_path)
    watchdog = start_watchdog(runtime, "stockade-abc")
    assert watchdog.stdin is not None
    watchdog.stdin.write(b"done\n")
    watchdog.stdin.close()
    assert watchdog.wait(timeout=5) == 0
    assert not (tmp_path / "calls").exists()
    assert subprocess.run(["true"]).returncode == 0
