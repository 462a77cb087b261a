"""Firecracker driver: every request it builds is checked against Firecracker's OpenAPI spec
(tests/specs/firecracker-api.yaml), and its request sequence against a fake of the API that
validates each call and refuses out-of-order ones. No firecracker binary runs here."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from microvm_fakes import (
    FakeFirecracker,
    FirecrackerSpec,
    SpecViolation,
    asyncio_only,  # noqa: F401 (fixture)
    hide_vmm_binaries,
    socket_tmp,  # noqa: F401 (fixture)
    vm_spec,
)
from stockade._errors import SandboxStartError
from stockade.backends.microvm import firecracker as fc
from stockade.backends.microvm._vmm_common import kvm_status, remove_stale_socket
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, VmSpec
from stockade.backends.microvm.hybrid_vsock import wait_hybrid_vsock

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture(scope="module")
def spec_doc() -> FirecrackerSpec:
    return FirecrackerSpec()


def make_spec(base: Path, *, kind: str = "vsock") -> VmSpec:
    workdir = base / "vm"
    agent = AgentTransport(kind=kind, socket_path=workdir / "agent.vsock", cid=3)  # type: ignore[arg-type]
    return vm_spec(
        base / "images", workdir, initrd="initrd.cpio.gz", agent=agent, create_files=True
    )


def send(spec_doc: FirecrackerSpec, request: fc.ApiRequest) -> str:
    return spec_doc.validate(request.method, request.path, request.body)


# --------------------------------------------------------------------------- the spec


def test_spec_is_a_valid_swagger_document(spec_doc: FirecrackerSpec) -> None:
    assert spec_doc.document["swagger"] == "2.0"
    assert spec_doc.version == "1.17.0-dev"
    assert {op.template for op in spec_doc.operations} >= {
        "/boot-source",
        "/drives/{drive_id}",
        "/machine-config",
        "/vsock",
        "/actions",
        "/vm",
        "/snapshot/create",
        "/snapshot/load",
    }


def every_request(base: Path) -> list[tuple[fc.ApiRequest, str]]:
    spec = make_spec(base)
    root, work = spec.disks
    return [
        (fc.boot_source_request("/k", "/i", "console=ttyS0"), "putGuestBootSource"),
        (fc.drive_request(root, str(root.path)), "putGuestDriveByID"),
        (fc.drive_request(work, str(work.path)), "putGuestDriveByID"),
        (fc.machine_config_request(2, 512), "putMachineConfiguration"),
        (fc.machine_config_request(1, 128), "putMachineConfiguration"),
        (fc.vsock_request(3, "/run/v.sock"), "putGuestVsock"),
        (fc.instance_start_request(), "createSyncAction"),
        (fc.pause_request(), "patchVm"),
        (fc.resume_request(), "patchVm"),
        (fc.snapshot_create_request("/s/vm.snap", "/s/vm.snap.mem"), "createSnapshot"),
        (fc.snapshot_load_request("/s/vm.snap", "/s/vm.snap.mem", "/v.sock"), "loadSnapshot"),
    ]


def test_every_request_the_driver_builds_is_allowed_by_the_spec(
    spec_doc: FirecrackerSpec, tmp: Path
) -> None:
    for request, operation in every_request(tmp):
        assert send(spec_doc, request) == operation, request


def test_the_boot_sequence_is_allowed_by_the_spec(spec_doc: FirecrackerSpec, tmp: Path) -> None:
    spec = make_spec(tmp)
    layout = fc.plan_layout(spec, Path("/usr/bin/firecracker"), vm_id="vm-1")
    requests = fc.boot_requests(spec, layout)
    assert [send(spec_doc, r) for r in requests] == [
        "putGuestBootSource",
        "putGuestDriveByID",
        "putGuestDriveByID",
        "putMachineConfiguration",
        "putGuestVsock",
    ]
    boot, root, work, machine, vsock = (r.body for r in requests)
    assert boot == {
        "kernel_image_path": str(spec.kernel),
        "initrd_path": str(spec.initrd),
        "boot_args": "quiet stockade.root=vda " + fc.FIRECRACKER_BOOT_ARGS,
    }
    # Disks in spec order (vda, vdb), none a "root device": the initramfs mounts the root.
    assert root is not None and work is not None
    assert [requests[1].path, requests[2].path] == ["/drives/root", "/drives/work"]
    assert (root["is_read_only"], work["is_read_only"]) == (True, False)
    assert root["is_root_device"] is work["is_root_device"] is False
    assert machine == {"vcpu_count": 2, "mem_size_mib": 512, "smt": False}
    assert vsock == {"guest_cid": 3, "uds_path": str(spec.agent.socket_path)}


INVALID: list[tuple[str, str, Any, str]] = [
    ("PUT", "/boot", {"kernel_image_path": "/k"}, "no path"),
    ("PATCH", "/boot-source", {"kernel_image_path": "/k"}, "not allowed"),
    ("PUT", "/boot-source", {"initrd_path": "/i"}, "kernel_image_path"),
    ("PUT", "/boot-source", {"kernel_path": "/k", "kernel_image_path": "/k"}, "kernel_path"),
    ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 512}, "not of type"),
    ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 512}, "minimum"),
    ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 512}, "maximum"),
    ("PUT", "/drives/root", {"drive_id": "root"}, "is_root_device"),
    ("PUT", "/drives/root", {"drive_id": "root", "is_root_device": False, "cache": "x"}, "cache"),
    ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"}, "minimum"),
    ("PUT", "/vsock", {"guest_cid": 3}, "uds_path"),
    ("PUT", "/actions", {"action_type": "Start"}, "is not one of"),
    ("PUT", "/actions", None, "requires a body"),
    ("PATCH", "/vm", {"state": "Stopped"}, "is not one of"),
    ("PUT", "/snapshot/create", {"snapshot_path": "/s"}, "mem_file_path"),
    (
        "PUT",
        "/snapshot/create",
        {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Partial"},
        "is not one of",
    ),
    (
        "PUT",
        "/snapshot/load",
        {"snapshot_path": "/s", "mem_backend": {"backend_type": "File"}},
        "backend_path",
    ),
    ("PUT", "/snapshot/load", {"snapshot_path": "/s", "vsock_override": {}}, "uds_path"),
    ("GET", "/", {"x": 1}, "takes no body"),
]


@pytest.mark.parametrize(("method", "path", "body", "why"), INVALID)
def test_the_validation_rejects_what_the_spec_forbids(
    spec_doc: FirecrackerSpec, method: str, path: str, body: Any, why: str
) -> None:
    with pytest.raises(SpecViolation, match=why):
        spec_doc.validate(method, path, body)


def test_builders_refuse_values_firecracker_would_reject(tmp: Path) -> None:
    with pytest.raises(ValueError, match="drive ids"):
        fc.drive_request(DiskSpec(tmp / "d", read_only=True, drive_id="root-1"), "/d")
    with pytest.raises(ValueError, match="1 to 32 vCPUs"):
        fc.machine_config_request(33, 512)
    with pytest.raises(ValueError, match="CID"):
        fc.vsock_request(2, "/v")
    spec = make_spec(tmp, kind="virtio-serial")
    layout = fc.plan_layout(spec, Path("/usr/bin/firecracker"))
    with pytest.raises(ValueError, match="no virtio-serial"):
        fc.boot_requests(spec, layout)
    with pytest.raises(ValueError, match="VM ids"):
        fc.plan_layout(spec, Path("/usr/bin/firecracker"), vm_id="a b")


def test_plain_layout_puts_sockets_and_console_in_the_workdir(tmp: Path) -> None:
    spec = make_spec(tmp)
    layout = fc.plan_layout(spec, Path("/opt/fc/firecracker"), vm_id="vm-1")
    assert layout.argv == (
        "/opt/fc/firecracker",
        "--api-sock",
        str(spec.workdir / "firecracker.sock"),
        "--id",
        "vm-1",
    )
    assert layout.vsock_socket == spec.agent.socket_path
    assert layout.console == spec.workdir / "console.log"
    assert layout.name(spec.kernel) == str(spec.kernel)


def test_jailer_layout_names_files_inside_the_chroot(spec_doc: FirecrackerSpec, tmp: Path) -> None:
    spec = make_spec(tmp)
    jailer = fc.JailerConfig(binary=Path("/usr/bin/jailer"), uid=123, gid=456)
    layout = fc.plan_layout(spec, Path("/opt/fc/firecracker"), jailer, vm_id="vm-1")
    root = spec.workdir / "jail" / "firecracker" / "vm-1" / "root"
    assert layout.chroot == root
    assert layout.argv == (
        "/usr/bin/jailer", "--id", "vm-1", "--exec-file", "/opt/fc/firecracker",
        "--uid", "123", "--gid", "456", "--chroot-base-dir", str(spec.workdir / "jail"),
        "--cgroup-version", "2", "--", "--api-sock", "/api.sock", "--id", "vm-1",
    )  # fmt: skip
    assert layout.api_socket == root / "api.sock"
    assert layout.vsock_socket == root / "v.sock"
    requests = fc.boot_requests(spec, layout)
    for request in requests:
        send(spec_doc, request)
    boot = requests[0].body
    assert boot is not None
    assert boot["kernel_image_path"] == "/f0-vmlinux"
    assert boot["initrd_path"] == "/f1-initrd.cpio.gz"
    assert [r.body["path_on_host"] for r in requests[1:3] if r.body] == [
        "/f2-root.erofs",
        "/f3-work.ext4",
    ]
    assert requests[-1].body == {"guest_cid": 3, "uds_path": "/v.sock"}
    assert {inside for _, inside in layout.links} == {
        "/f0-vmlinux", "/f1-initrd.cpio.gz", "/f2-root.erofs", "/f3-work.ext4"
    }  # fmt: skip


def test_jailer_chroot_gets_hard_links_and_the_writable_disk(tmp: Path) -> None:
    spec = make_spec(tmp)
    jailer = fc.JailerConfig(
        binary=Path("/usr/bin/jailer"), uid=os.getuid(), gid=os.getgid(), chroot_base=tmp / "j"
    )
    layout = fc.plan_layout(spec, Path("/opt/fc/firecracker"), jailer, vm_id="vm-1")
    fc._populate_chroot(layout, spec, jailer)
    assert layout.chroot is not None
    for host, inside in layout.links:
        assert (layout.chroot / inside.lstrip("/")).stat().st_ino == host.stat().st_ino


# --------------------------------------------------------------------------- against a fake API


async def test_boot_sequence_against_the_fake_api_then_the_agent_stream(
    spec_doc: FirecrackerSpec, tmp: Path
) -> None:
    spec = make_spec(tmp)
    spec.workdir.mkdir()
    layout = fc.plan_layout(spec, Path("/usr/bin/firecracker"), vm_id="vm-1")
    with FakeFirecracker(layout.api_socket, spec_doc) as fake:
        async with fc.FirecrackerApi(layout.api_socket, timeout=5) as api:
            await api.wait_ready(timeout=5)
            await fc.configure_and_start(api, spec, layout)
            assert [(m, p) for m, p, _ in fake.calls] == [
                ("PUT", "/boot-source"),
                ("PUT", "/drives/root"),
                ("PUT", "/drives/work"),
                ("PUT", "/machine-config"),
                ("PUT", "/vsock"),
                ("PUT", "/actions"),
            ]
            assert fake.calls[-1][2] == {"action_type": "InstanceStart"}
            assert fake.state.refused == []
            channel = await wait_hybrid_vsock(layout.vsock_socket, spec.agent.port, timeout=5)
            async with channel:
                await channel.send(b"ping")
                assert await channel.receive() == b"ping"
            assert fake.vsock is not None and fake.vsock.requests == [b"CONNECT 1024\n"]


async def test_snapshot_then_load_in_a_fresh_process(spec_doc: FirecrackerSpec, tmp: Path) -> None:
    spec = make_spec(tmp)
    spec.workdir.mkdir()
    layout = fc.plan_layout(spec, Path("/usr/bin/firecracker"), vm_id="vm-1")
    snap = tmp / "snap" / "vm.snap"
    snap.parent.mkdir()
    with FakeFirecracker(layout.api_socket, spec_doc) as fake:
        async with fc.FirecrackerApi(layout.api_socket, timeout=5) as api:
            await fc.configure_and_start(api, spec, layout)
            await fc.take_snapshot(api, layout, snap)
            assert [(m, p, b) for m, p, b in fake.calls[-2:]] == [
                ("PATCH", "/vm", {"state": "Paused"}),
                (
                    "PUT",
                    "/snapshot/create",
                    {
                        "snapshot_type": "Full",
                        "snapshot_path": str(snap),
                        "mem_file_path": str(snap) + ".mem",
                    },
                ),
            ]
            assert snap.is_file() and fc.memory_file_for(snap).is_file()
            assert fake.state.state == "Paused"

    # The restored VM lives in another directory; its vsock socket moves there.
    other = dataclasses.replace(
        spec, workdir=tmp / "vm2", agent=AgentTransport("vsock", tmp / "vm2" / "agent.vsock")
    )
    other.workdir.mkdir()
    layout2 = fc.plan_layout(other, Path("/usr/bin/firecracker"), vm_id="vm-2")
    with FakeFirecracker(layout2.api_socket, spec_doc) as fresh:
        async with fc.FirecrackerApi(layout2.api_socket, timeout=5) as api2:
            await fc.load_snapshot(api2, other, layout2, snap)
            assert fresh.calls == [
                (
                    "PUT",
                    "/snapshot/load",
                    {
                        "snapshot_path": str(snap),
                        "mem_backend": {"backend_type": "File", "backend_path": str(snap) + ".mem"},
                        "resume_vm": True,
                        "vsock_override": {"uds_path": str(other.agent.socket_path)},
                    },
                )
            ]
            assert fresh.state.state == "Running"
            channel = await wait_hybrid_vsock(layout2.vsock_socket, 1024, timeout=5)
            async with channel:
                await channel.send(b"after restore")
                assert await channel.receive() == b"after restore"


async def test_api_refusals_become_errors_with_firecrackers_fault_message(
    spec_doc: FirecrackerSpec, tmp: Path
) -> None:
    sock = tmp / "api.sock"
    with FakeFirecracker(sock, spec_doc):
        async with fc.FirecrackerApi(sock, timeout=5) as api:
            with pytest.raises(
                fc.FirecrackerApiError, match="InstanceStart needs a boot source"
            ) as e:
                await api.send(fc.instance_start_request())
            assert e.value.status == 400
            await api.send(fc.boot_source_request("/k", "/i", ""))
            await api.send(fc.instance_start_request())
            with pytest.raises(fc.FirecrackerApiError, match="pre-boot only"):
                await api.send(fc.machine_config_request(1, 128))
            with pytest.raises(fc.FirecrackerApiError, match="paused VM"):
                await api.send(fc.snapshot_create_request(str(tmp / "s"), str(tmp / "m")))
            # A request the spec forbids is refused by the fake before any state change.
            with pytest.raises(fc.FirecrackerApiError, match="is not one of"):
                await api.send(fc.ApiRequest("PATCH", "/vm", {"state": "Stopped"}))


async def test_wait_ready_gives_up_when_the_process_is_gone(tmp: Path) -> None:
    async with fc.FirecrackerApi(tmp / "missing.sock", timeout=1) as api:
        with pytest.raises(fc.FirecrackerApiError, match="exited before its API socket"):
            await api.wait_ready(timeout=5, alive=lambda: False)
        with pytest.raises(fc.FirecrackerApiError, match="did not answer within"):
            await api.wait_ready(timeout=0.1)


async def test_api_socket_that_is_not_firecracker(tmp: Path) -> None:
    sock = tmp / "api.sock"
    listener = await anyio.create_unix_listener(sock)

    async def hang_up(stream: anyio.abc.SocketStream) -> None:
        await stream.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hang_up)
        api = fc.FirecrackerApi(sock, timeout=2)
        with pytest.raises(fc.FirecrackerApiError, match="failed on PUT /actions"):
            await api.send(fc.instance_start_request())
        await api.aclose()
        tg.cancel_scope.cancel()


# --------------------------------------------------------------------------- probe


def test_probe_says_why_and_how_to_install(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hide_vmm_binaries(monkeypatch, tmp)
    availability = fc.FirecrackerDriver.probe()
    assert not availability.ok
    assert "firecracker not found on PATH" in availability.reason
    assert "github.com/firecracker-microvm/firecracker/releases" in availability.fix
    assert "/dev/kvm" in availability.fix
    monkeypatch.setenv("STOCKADE_FIRECRACKER", str(tmp / "nope"))
    availability = fc.FirecrackerDriver.probe()
    assert f"firecracker not found at {tmp / 'nope'} (STOCKADE_FIRECRACKER)" in availability.reason


def test_probe_finds_a_configured_binary_and_still_checks_kvm(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp / "firecracker"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("STOCKADE_FIRECRACKER", str(binary))
    availability = fc.FirecrackerDriver.probe()
    assert "not found" not in availability.reason
    assert availability.ok == kvm_status().ok
    if not availability.ok:
        assert availability.reason == kvm_status().reason


def test_kvm_status_tells_pvm_from_hardware_kvm(tmp: Path) -> None:
    dev = tmp / "kvm"
    modules = tmp / "module"
    (modules / "kvm").mkdir(parents=True)
    assert "does not exist" in kvm_status(dev, modules).reason
    dev.write_bytes(b"")
    (modules / "kvm_pvm").mkdir()
    pvm = kvm_status(dev, modules)
    assert not pvm.ok and "kvm_pvm" in pvm.reason and "kvm_intel or kvm_amd" in pvm.reason
    (modules / "kvm_intel").mkdir()
    assert kvm_status(dev, modules).ok


def test_socket_paths_that_cannot_be_bound_are_refused(tmp: Path) -> None:
    with pytest.raises(SandboxStartError, match=r"longer than the 10[37] a unix socket"):
        remove_stale_socket(tmp / ("d" * 120) / "agent.vsock")
    (tmp / "file").write_text("")
    with pytest.raises(SandboxStartError, match="exists and is not a socket"):
        remove_stale_socket(tmp / "file")
    remove_stale_socket(tmp / "missing.sock")  # nothing to do
    assert not (tmp / "missing.sock").exists()
