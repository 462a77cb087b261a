"""vfkit driver: its command line built from a VmSpec, its probe on a host that is not macOS,
and the driver table that ``doctor`` reads (with what every driver says when its binary is
missing). No vfkit binary runs here."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

from microvm_fakes import (
    ROOT_DISK,
    asyncio_only,  # noqa: F401 (fixture)
    hide_vmm_binaries,
    vm_spec,
)
from stockade._errors import SandboxStartError
from stockade.backends.base import Availability
from stockade.backends.microvm import vfkit
from stockade.backends.microvm.driver import AgentTransport, DiskSpec, Driver, VmSpec
from stockade.backends.microvm.driver_registry import DRIVERS, load_driver, probe_drivers


def make_spec(base: Path, cmdline: str = "quiet stockade.root=vda") -> VmSpec:
    wd = base / "vm"
    return vm_spec(
        base,
        wd,
        kernel="Image",
        disks=(ROOT_DISK, ("work.img", False, "work")),
        memory_mib=1024,
        cmdline=cmdline,
        agent=AgentTransport("vsock", wd / "agent.sock", port=1024),
    )


def test_boot_command_line(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    wd = spec.workdir
    assert vfkit.boot_argv(Path("/opt/homebrew/bin/vfkit"), spec) == [
        "/opt/homebrew/bin/vfkit",
        "--cpus", "2",
        "--memory", "1024",
        "--bootloader",
        f'linux,kernel={tmp_path}/Image,initrd={tmp_path}/initrd.gz,'
        f'cmdline="quiet stockade.root=vda console=hvc0"',
        "--device", f"virtio-blk,path={tmp_path}/root.erofs,readonly",
        "--device", f"virtio-blk,path={tmp_path}/work.img",
        "--device", f"virtio-vsock,port=1024,socketURL={wd}/agent.sock,listen",
        "--device", f"virtio-serial,logFilePath={wd}/console.log",
        "--restful-uri", f"unix://{wd}/vfkit.sock",
    ]  # fmt: skip


@pytest.mark.parametrize("cmdline", ['init="/bin/sh"', "stockade.mounts=a,b"])
def test_a_command_line_vfkit_cannot_carry_is_refused(tmp_path: Path, cmdline: str) -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        vfkit.boot_argv(Path("vfkit"), make_spec(tmp_path, cmdline))


def test_paths_vfkit_would_split_are_refused(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    bad = dataclasses.replace(spec, disks=(DiskSpec(tmp_path / "a,b", True, "root"),))
    with pytest.raises(ValueError, match="would split"):
        vfkit.boot_argv(Path("vfkit"), bad)
    serial = dataclasses.replace(spec, agent=AgentTransport("virtio-serial", tmp_path / "s"))
    with pytest.raises(ValueError, match="over vsock"):
        vfkit.boot_argv(Path("vfkit"), serial)


def test_rest_state_bodies() -> None:
    assert vfkit.vm_state_body("Stop") == {"state": "Stop"}
    with pytest.raises(ValueError, match="no VM state"):
        vfkit.vm_state_body("Halt")


@pytest.mark.skipif(
    sys.platform == "darwin", reason="checks the answer on a host that is not macOS"
)
def test_probe_is_unavailable_off_macos_with_the_reason() -> None:
    availability = vfkit.VfkitDriver.probe()
    assert not availability.ok
    assert "vfkit runs only on macOS 13 or later" in availability.reason
    assert "brew install vfkit" in availability.fix


def test_driver_table_loads_every_driver_of_this_package() -> None:
    for name in ("firecracker", "cloud-hypervisor", "vfkit"):
        driver = load_driver(name)
        assert issubclass(driver, Driver) and driver.name == name
    with pytest.raises(KeyError, match="known drivers"):
        load_driver("bochs")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("firecracker", "on a Linux host with hardware KVM"),
        ("cloud-hypervisor", "on a Linux host with hardware KVM"),
        ("vfkit", "on macOS 13 or later"),
    ],
)
async def test_boot_without_a_binary_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, fix: str
) -> None:
    hide_vmm_binaries(monkeypatch, tmp_path)
    driver = load_driver(name)()
    with pytest.raises(SandboxStartError, match=f"{name} not found on PATH; {fix}"):
        await driver.boot(make_spec(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="describes a Linux host")
def test_probe_drivers_reports_every_driver_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hide_vmm_binaries(monkeypatch, tmp_path)
    results = dict(probe_drivers())
    assert list(results) == list(DRIVERS)
    assert all(isinstance(a, Availability) for a in results.values())
    assert "firecracker not found on PATH" in results["firecracker"].reason
    assert "cloud-hypervisor not found on PATH" in results["cloud-hypervisor"].reason
    assert "macOS" in results["vfkit"].reason
    for name in ("firecracker", "cloud-hypervisor", "vfkit"):
        assert not results[name].ok and results[name].fix
    assert probe_drivers(["nope"])[0][1].reason.startswith("the nope driver cannot be loaded")


@pytest.mark.parametrize(
    "module",
    [
        "stockade.backends.microvm._vmm_common",
        "stockade.backends.microvm.cloud_hypervisor",
        "stockade.backends.microvm.driver_registry",
        "stockade.backends.microvm.firecracker",
        "stockade.backends.microvm.hybrid_vsock",
        "stockade.backends.microvm.vfkit",
    ],
)
def test_every_name_in_all_exists(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []
