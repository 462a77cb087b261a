"""``docker = true`` on the microVM backend for real: a private dockerd in the guest runs
a container of an image imported inside the guest; the host's daemon sees nothing of it.

No registry is reachable (the VM has no network device), so the image is ``docker import``
of a tarball made inside the guest from its own busybox.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require_backend, required_backends
from stockade import PolicyError, Sandbox

pytestmark = pytest.mark.timeout(600)

#: dockerd under TCG emulation takes many seconds to come up: a generous bound, not a goal.
DOCKERD_WAIT = 240
IMAGE = "stockade-test/busybox-in-vm:1"


def _host_docker() -> Any | None:
    """A client of the host's Docker daemon if one answers here (CI starts one), else None."""
    try:
        import docker
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception:  # no host daemon: nothing to compare against
        return None
    return client


@pytest.fixture(scope="module")
def docker_sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    require_backend("microvm")
    from stockade.images.vm import find_vm_image

    if find_vm_image("docker") is None:
        message = "the microVM image 'docker' is not built (stockade image build --profile docker)"
        if "microvm" in required_backends():
            pytest.fail(message + " -- required by STOCKADE_TEST_REQUIRE_BACKENDS")
        pytest.skip(message)
    base = tmp_path_factory.mktemp("microvm-docker")
    project = base / "project"
    project.mkdir()
    (project / "README.md").write_text("hi\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STOCKADE_STATE_DIR", str(base / "state"))
        sandbox = Sandbox.create(project_dir=project, backend="microvm", config={"docker": True})
        try:
            yield sandbox
        finally:
            sandbox.close()


def _wait_for_dockerd(sb: Sandbox) -> None:
    script = (
        f"i=0; while [ $i -lt {DOCKERD_WAIT} ]; do docker version >/dev/null 2>&1 && exit 0; "
        "sleep 1; i=$((i+1)); done; docker version; exit 1"
    )
    result = sb.commands.run(script, timeout=DOCKERD_WAIT + 30)
    if result.exit_code != 0:
        log = sb.commands.run("cat /run/stockade/dockerd.log", timeout=30).stdout
        pytest.fail(f"dockerd in the guest did not answer: {result.stderr}\n--- log ---\n{log}")


def _import_image(sb: Sandbox) -> None:
    """dockerd up, and IMAGE imported from the guest's own busybox (once per sandbox)."""
    _wait_for_dockerd(sb)
    if sb.commands.run(f"docker image inspect {IMAGE} >/dev/null 2>&1").exit_code == 0:
        return
    build = sb.commands.run(
        "set -e; d=$(mktemp -d); mkdir -p $d/bin; cp /run/stockade/busybox $d/bin/busybox; "
        "for a in sh echo cat uname; do ln -s busybox $d/bin/$a; done; "
        f"tar -C $d -c . | docker import - {IMAGE}",
        timeout=180,
    )
    assert build.exit_code == 0, build.stderr


def test_docker_run_of_a_locally_imported_image(docker_sb: Sandbox) -> None:
    host = _host_docker()
    before: tuple[set[str], set[str]] | None = None
    if host is not None:
        before = (
            {c.id for c in host.containers.list(all=True)},
            {i.id for i in host.images.list(all=True)},
        )
    sb = docker_sb
    assert sb.commands.run("id -u").stdout.strip() == "1000"  # the unprivileged sandbox user
    _import_image(sb)
    run = sb.commands.run(f"docker run --rm --network none {IMAGE} echo hi", timeout=180)
    assert run.exit_code == 0, run.stderr
    assert run.stdout == "hi\n"
    info = sb.commands.run("docker info --format '{{.KernelVersion}}'; uname -r", timeout=60)
    assert info.exit_code == 0, info.stderr
    daemon_kernel, guest_kernel = info.stdout.split()
    assert daemon_kernel == guest_kernel  # the daemon runs on the guest's kernel
    assert daemon_kernel != os.uname().release  # not the host's
    # The VM has no network device and no host socket: the host's daemon is out of reach.
    assert sb.commands.run("ls /sys/class/net").stdout.split() == ["lo"]
    if host is not None and before is not None:
        after_containers = {c.id for c in host.containers.list(all=True)}
        after_images = {i.id for i in host.images.list(all=True)}
        assert after_containers - before[0] == set()
        assert after_images - before[1] == set()
        assert not host.images.list(name=IMAGE.split(":")[0])
        host.close()


def test_docker_build_inside_the_vm(docker_sb: Sandbox) -> None:
    """`docker build` against the guest's daemon: a RUN step executes in a container there and
    its result is in the built image."""
    sb = docker_sb
    _import_image(sb)
    built = "stockade-test/built-in-vm:1"
    context = "/tmp/build-context"
    assert sb.commands.run(f"mkdir -p {context}").exit_code == 0
    sb.files.write(f"{context}/Dockerfile", f"FROM {IMAGE}\nRUN echo built-inside > /built.txt\n")
    # The classic builder: BuildKit's is a separate plugin, and no registry is reachable.
    build = sb.commands.run(
        f"DOCKER_BUILDKIT=0 docker build --network none -t {built} {context}", timeout=300
    )
    assert build.exit_code == 0, build.stdout + build.stderr
    run = sb.commands.run(f"docker run --rm --network none {built} cat /built.txt", timeout=180)
    assert run.exit_code == 0, run.stderr
    assert run.stdout == "built-inside\n"
    host = _host_docker()
    if host is not None:
        assert not host.images.list(name=built.split(":")[0])  # built in the guest only
        host.close()


@pytest.mark.parametrize("backend", ["namespace", "gvisor"])
def test_host_docker_socket_not_visible_in_a_sandbox(project: Path, backend: str) -> None:
    """Without docker = true, no sandbox sees the host's Docker socket either."""
    require_backend(backend)
    paths = ["/var/run/docker.sock", "/run/docker.sock"]
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        paths.append(host[len("unix://") :])
    with Sandbox.create(project_dir=project, backend=backend) as sb:
        result = sb.commands.run(" || ".join(f"test -S {p}" for p in paths) + " && echo seen")
        assert "seen" not in result.stdout


def test_docker_policy_with_another_image_is_refused(project: Path) -> None:
    require_backend("microvm")
    with pytest.raises(PolicyError, match="'docker'"):
        Sandbox.create(
            project_dir=project,
            backend="microvm",
            config={"docker": True, "microvm.image": "node"},
        )
