"""Cloud Hypervisor driver: its command line and REST calls built from a VmSpec, the snapshot
rebase for restores in another directory, and the control calls against a fake API that
refuses out-of-order ones. No cloud-hypervisor binary runs here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from microvm_fakes import (
    ROOT_DISK,
    WORK_DISK,
    FakeCloudHypervisor,
    HybridVsockPeer,
    asyncio_only,  # noqa: F401 (fixture)
    hide_vmm_binaries,
    socket_tmp,  # noqa: F401 (fixture)
    vm_spec,
)
from stockade._errors import SandboxStartError
from stockade.backends.microvm import cloud_hypervisor as ch
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, VmSpec
from stockade.backends.microvm.hybrid_vsock import wait_hybrid_vsock

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def make_spec(base: Path, *, workdir: str = "vm", workspace: bool = True) -> VmSpec:
    wd = base / workdir
    disks = (ROOT_DISK, WORK_DISK) if workspace else (ROOT_DISK,)
    agent = AgentTransport("vsock", wd / "agent.vsock", cid=5, port=1024)
    return vm_spec(base, wd, disks=disks, agent=agent)


def test_boot_command_line(tmp: Path) -> None:
    spec = make_spec(tmp)
    wd = spec.workdir
    assert ch.boot_argv(Path("/usr/bin/cloud-hypervisor"), spec) == [
        "/usr/bin/cloud-hypervisor",
        "--api-socket", f"path={wd}/ch.sock",
        "--kernel", f"{tmp}/vmlinux",
        "--initramfs", f"{tmp}/initrd.gz",
        "--cmdline", "quiet stockade.root=vda console=ttyS0 panic=-1",
        "--cpus", "boot=2",
        "--memory", "size=512M",
        "--disk", f"path={tmp}/root.erofs,readonly=on,id=root", f"path={tmp}/work.ext4,id=work",
        "--vsock", f"cid=5,socket={wd}/agent.vsock",
        "--serial", f"file={wd}/console.log",
        "--console", "off",
    ]  # fmt: skip


def test_boot_command_line_without_a_workspace_disk(tmp: Path) -> None:
    argv = ch.boot_argv(Path("ch"), make_spec(tmp, workspace=False))
    disk = argv.index("--disk")
    assert argv[disk + 1 : disk + 3] == [f"path={tmp}/root.erofs,readonly=on,id=root", "--vsock"]


def test_command_line_refuses_what_the_option_parser_would_split(tmp: Path) -> None:
    spec = make_spec(tmp)
    bad = dataclasses.replace(spec, disks=(DiskSpec(tmp / "a,b.img", True, "root"),))
    with pytest.raises(ValueError, match="option parser would split"):
        ch.boot_argv(Path("ch"), bad)
    serial = dataclasses.replace(spec, agent=AgentTransport("virtio-serial", tmp / "s"))
    with pytest.raises(ValueError, match="must be vsock"):
        ch.boot_argv(Path("ch"), serial)
    low_cid = dataclasses.replace(spec, agent=AgentTransport("vsock", tmp / "s", cid=2))
    with pytest.raises(ValueError, match="CID"):
        ch.boot_argv(Path("ch"), low_cid)


def test_rest_bodies(tmp: Path) -> None:
    assert ch.snapshot_body(tmp / "snap") == {"destination_url": f"file://{tmp}/snap"}
    assert ch.restore_body(tmp / "snap") == {"source_url": f"file://{tmp}/snap", "prefault": False}
    assert ch.restore_argv(Path("/ch"), tmp) == ["/ch", "--api-socket", f"path={tmp}/ch.sock"]


async def test_snapshot_then_restore_in_another_directory(tmp: Path) -> None:
    spec = make_spec(tmp)
    spec.workdir.mkdir()
    fake = FakeCloudHypervisor(spec.workdir / "ch.sock", vm="Running")
    api = ch.CloudHypervisorApi(spec.workdir / "ch.sock", timeout=5)
    snap = tmp / "snap"
    try:
        await api.wait_ready(timeout=5)
        await ch.take_snapshot(api, snap)
        assert fake.calls == [
            ("PUT", "vm.pause", None),
            ("PUT", "vm.snapshot", {"destination_url": f"file://{snap}"}),
        ]
        assert fake.vm == "Paused"
    finally:
        await api.aclose()
        fake.close()

    other = make_spec(tmp, workdir="vm2")
    other.workdir.mkdir()
    rebased = ch.rebase_snapshot(snap, other.workdir / "restore", other)
    config = json.loads((rebased / "config.json").read_text())
    assert config["vsock"] == {"cid": 3, "socket": str(other.agent.socket_path)}
    assert config["serial"]["file"] == str(other.workdir / "console.log")
    assert config["memory"] == {"size": 536870912}
    assert (rebased / "memory-ranges").stat().st_ino == (snap / "memory-ranges").stat().st_ino
    assert json.loads((snap / "config.json").read_text())["vsock"]["socket"] == "/old/agent.vsock"

    with FakeCloudHypervisor(other.workdir / "ch.sock", vm="None") as fresh:
        async with ch.CloudHypervisorApi(other.workdir / "ch.sock", timeout=5) as api2:
            with HybridVsockPeer(other.agent.socket_path):
                await ch.restore_and_resume(api2, rebased)
                assert fresh.calls == [
                    ("PUT", "vm.restore", {"source_url": f"file://{rebased}", "prefault": False}),
                    ("PUT", "vm.resume", None),
                ]
                assert fresh.restored_config["vsock"]["socket"] == str(other.agent.socket_path)
                channel = await wait_hybrid_vsock(other.agent.socket_path, 1024, timeout=5)
                async with channel:
                    await channel.send(b"restored")
                    assert await channel.receive() == b"restored"


async def test_refusals_carry_the_http_status(tmp: Path) -> None:
    with FakeCloudHypervisor(tmp / "ch.sock", vm="None"):
        async with ch.CloudHypervisorApi(tmp / "ch.sock", timeout=5) as api:
            with pytest.raises(
                ch.CloudHypervisorApiError, match=r"refused PUT vm\.pause with HTTP 400"
            ):
                await ch.take_snapshot(api, tmp / "snap")


async def test_wait_ready_without_a_vmm(tmp: Path) -> None:
    async with ch.CloudHypervisorApi(tmp / "none.sock", timeout=1) as api:
        with pytest.raises(ch.CloudHypervisorApiError, match="exited before its API socket"):
            await api.wait_ready(timeout=5, alive=lambda: False)


def test_rebase_refuses_a_foreign_snapshot(tmp: Path) -> None:
    (tmp / "snap").mkdir()
    with pytest.raises(SandboxStartError, match="not a readable Cloud Hypervisor snapshot"):
        ch.rebase_snapshot(tmp / "snap", tmp / "out", make_spec(tmp))
    (tmp / "snap" / "config.json").write_text("{}")
    with pytest.raises(SandboxStartError, match="no vsock device"):
        ch.rebase_snapshot(tmp / "snap", tmp / "out", make_spec(tmp))


def test_probe_says_why_and_how_to_install(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hide_vmm_binaries(monkeypatch, tmp)
    availability = ch.CloudHypervisorDriver.probe()
    assert not availability.ok
    assert "cloud-hypervisor not found on PATH" in availability.reason
    assert "github.com/cloud-hypervisor/cloud-hypervisor/releases" in availability.fix
