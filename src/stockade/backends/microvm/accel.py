"""Which acceleration the QEMU microVM gets here, and the backend's probe.

``/dev/kvm`` existing is not enough: on a PVM host KVM only runs PVM-enabled guests, and a
standard guest never comes up. So KVM is used only when a probe boot under KVM reaches
the guest launcher within ``KVM_PROBE_TIMEOUT``; otherwise TCG emulation. The verdict is
cached on disk keyed by the kernel image and the QEMU version, so it is paid once.
An emulated microVM is real isolation but slow: ``auto`` never picks it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from stockade.backends.base import Availability

if TYPE_CHECKING:
    from stockade.images.vm import VmImage

__all__ = ["chosen_accel", "kvm_probe", "probe_microvm", "qemu_version"]

logger = logging.getLogger(__name__)

KVM_PROBE_TIMEOUT = 8.0


@functools.lru_cache(maxsize=4)
def _qemu_version(binary: str, mtime_ns: int) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def qemu_version() -> str:
    from stockade.backends.microvm.qemu import qemu_binary

    binary = qemu_binary()
    if binary is None:
        return "none"
    try:
        mtime = os.stat(binary).st_mtime_ns
    except OSError:
        return "none"
    return _qemu_version(binary, mtime)


def _cache_file() -> Path:
    from stockade.images.rootfs import image_cache_dir

    return image_cache_dir() / "vm" / "accel.json"


def _cache_key(image: VmImage) -> str:
    # Whether KVM runs this guest depends on the host, the kernel and QEMU, not on the
    # initramfs (which changes with every agent change).
    return f"{image.kernel.name}|{qemu_version()}|{os.uname().release}"


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _read_cache() -> dict[str, dict[str, str]]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def kvm_probe(image: VmImage, timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot ``image`` under KVM; (True, ...) if the guest launcher said ready in time."""
    from stockade.backends.microvm.driver import AgentTransport, DiskSpec, VmSpec
    from stockade.backends.microvm.qemu import QemuDriver

    async def attempt(workdir: Path) -> tuple[bool, str]:
        spec = VmSpec(
            kernel=image.kernel,
            initrd=image.initrd,
            disks=(DiskSpec(image.rootfs, True, "root"),),
            vcpus=1,
            memory_mib=256,
            cmdline="stockade.root=vda stockade.agent=serial",
            workdir=workdir,
            agent=AgentTransport("virtio-serial", workdir / "agent.sock"),
        )
        started = time.monotonic()
        try:
            vm = await QemuDriver("kvm").boot(spec)
        except Exception as exc:
            return False, f"QEMU could not start a KVM guest: {str(exc).splitlines()[0]}"
        try:
            with anyio.move_on_after(timeout):
                data = await vm.channel.receive()
                if b'"launcher"' in data:
                    return (
                        True,
                        f"a KVM probe boot reached the guest in {time.monotonic() - started:.1f} s",
                    )
            return False, (
                f"a probe boot under KVM did not reach the guest within {timeout:g} s (this "
                "KVM runs only PVM guests, or is otherwise unusable)"
            )
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return False, "the probe guest under KVM died during boot"
        finally:
            await vm.stop(0)

    from concurrent.futures import ThreadPoolExecutor

    # Its own event loop in its own thread: probe() may be called from async code.
    with (
        tempfile.TemporaryDirectory(prefix="stockade-kvm-probe-") as tmp,
        ThreadPoolExecutor(1) as pool,
    ):
        return pool.submit(anyio.run, attempt, Path(tmp)).result()


def _decide(image: VmImage) -> tuple[str, str]:
    """(accel, why), from the cache or a probe boot."""
    if not _kvm_usable():
        return "tcg", "no usable /dev/kvm"
    key = _cache_key(image)
    cached = _read_cache().get(key)
    if cached and cached.get("accel") in ("kvm", "tcg"):
        return cached["accel"], cached.get("why", "")
    ok, why = kvm_probe(image)
    accel = "kvm" if ok else "tcg"
    data = _read_cache()
    data[key] = {"accel": accel, "why": why, "at": f"{time.time():.0f}"}
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".accel.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return accel, why


def chosen_accel(image: VmImage) -> str:
    forced = os.environ.get("STOCKADE_MICROVM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    return _decide(image)[0]


def _other_drivers() -> list[str]:
    """One line per other VMM driver: available or not, and how to get it."""
    try:
        from stockade.backends.microvm.driver_registry import probe_drivers
    except ImportError:
        return []
    lines = []
    for name, availability in probe_drivers():
        if name == "qemu":
            continue
        state = "available" if availability.ok else "not available"
        line = f"driver {name}: {state}: {availability.reason}"
        if not availability.ok and availability.fix:
            line += f" (fix: {availability.fix})"
        lines.append(line)
    return lines


def probe_microvm(profile: str) -> Availability:
    from stockade.backends.microvm.qemu import qemu_binary
    from stockade.images.vm import find_vm_image

    qemu = qemu_binary()
    if qemu is None:
        return Availability(
            False,
            "qemu-system-x86_64 not found on PATH (the only microVM driver this host can run: "
            "Firecracker and Cloud Hypervisor need a KVM that runs standard guests)",
            "apt-get install qemu-system-x86",
        )
    try:
        image = find_vm_image(profile)
    except Exception as exc:
        return Availability(False, f"cannot check the microVM image: {exc}", "stockade image build")
    if image is None:
        return Availability(
            False,
            f"the microVM guest image {profile!r} is not built",
            f"run `stockade image build --profile {profile}` (kernel, initramfs and root "
            "image, built locally in about a minute)",
        )
    forced = os.environ.get("STOCKADE_MICROVM_ACCEL")
    if forced in ("kvm", "tcg"):
        accel, why = forced, "forced by STOCKADE_MICROVM_ACCEL"
    else:
        accel, why = _decide(image)
    details = (
        f"driver qemu: {qemu_version()}, accel {accel} ({why}), guest kernel "
        f"{image.kernel_version}",
        *_other_drivers(),
    )
    if accel == "kvm":
        return Availability(True, f"QEMU microvm with KVM ({why})", details=details)
    return Availability(
        True,
        "QEMU microvm under TCG emulation (no KVM that runs standard guests): real VMs "
        "but slow, so `auto` never picks it",
        "for hardware speed, run on a host whose KVM runs standard guests",
        details=details,
        auto=False,
    )
