"""The VMM drivers by name, imported lazily, and one call that probes them all (for
``doctor`` and for the backend's driver choice).

Order is preference: Firecracker, then Cloud Hypervisor (both need hardware KVM), then
QEMU (KVM or TCG), then vfkit (macOS).
"""

from __future__ import annotations

import importlib

from stockade.backends.base import Availability
from stockade.backends.microvm.driver import Driver

__all__ = ["DRIVERS", "load_driver", "probe_drivers"]

#: name -> "module:Class"; the modules are imported only when that driver is asked for.
DRIVERS: dict[str, str] = {
    "firecracker": "stockade.backends.microvm.firecracker:FirecrackerDriver",
    "cloud-hypervisor": "stockade.backends.microvm.cloud_hypervisor:CloudHypervisorDriver",
    "qemu": "stockade.backends.microvm.qemu:QemuDriver",
    "vfkit": "stockade.backends.microvm.vfkit:VfkitDriver",
}


def load_driver(name: str) -> type[Driver]:
    """The driver class registered as ``name``; ImportError/KeyError say what is missing."""
    try:
        target = DRIVERS[name]
    except KeyError:
        raise KeyError(
            f"no microVM driver named {name!r}; known drivers: {', '.join(DRIVERS)}"
        ) from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    driver = getattr(module, class_name)
    if not (isinstance(driver, type) and issubclass(driver, Driver)):
        raise TypeError(f"{target} is not a microVM Driver")
    return driver


def probe_drivers(names: list[str] | None = None) -> list[tuple[str, Availability]]:
    """``(name, Availability)`` for every driver (or those named), in preference order.

    Never raises: a driver whose module cannot be imported is reported unavailable.
    """
    results: list[tuple[str, Availability]] = []
    for name in names if names is not None else list(DRIVERS):
        try:
            driver = load_driver(name)
        except (ImportError, KeyError, TypeError, AttributeError) as exc:
            results.append(
                (name, Availability(False, f"the {name} driver cannot be loaded: {exc}"))
            )
            continue
        try:
            availability = driver.probe()
        except Exception as exc:  # probe() must not raise; report one that does
            availability = Availability(False, f"the {name} driver's probe failed: {exc!r}")
        results.append((name, availability))
    return results
