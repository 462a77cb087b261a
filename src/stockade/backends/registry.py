"""Registry of every backend the design names, with lazy imports, and `auto` selection.

Backends not built yet are listed too, so ``stockade doctor`` can say so instead of
pretending they do not exist. ``auto`` tries the built ones strongest first and never
picks ``host``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stockade._errors import BackendUnavailableError, PolicyError
from stockade.backends.base import Availability, Backend

if TYPE_CHECKING:
    from stockade.policy import EffectivePolicy

__all__ = ["BACKENDS", "BackendEntry", "get_backend_class", "probe_all", "select_backend"]


@dataclass(frozen=True)
class BackendEntry:
    """One row of the design's tier table."""

    name: str
    tier: float
    mechanism: str
    target: str | None  # "module:Class", or None when not built yet
    planned_issue: str = ""
    auto: bool = True

    @property
    def built(self) -> bool:
        return self.target is not None


BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry(
        "microvm",
        1,
        "own guest kernel (Firecracker, Cloud Hypervisor, QEMU microvm, vfkit)",
        "stockade.backends.microvm.backend:MicrovmBackend",
    ),
    BackendEntry("gvisor", 1.5, "user-space kernel (runsc)", None, "the gVisor/containers issue"),
    BackendEntry(
        "container",
        2,
        "hardened OCI container (runc/crun, Docker, Podman)",
        None,
        "the gVisor/containers issue",
    ),
    BackendEntry(
        "namespace",
        2.5,
        "Linux namespaces + seccomp + Landlock (bubblewrap)",
        "stockade.backends.bubblewrap:BubblewrapBackend",
    ),
    BackendEntry(
        "host",
        3,
        "none: plain subprocesses (unsafe, explicit only)",
        "stockade.backends.host:HostBackend",
        auto=False,
    ),
)


def _entry(name: str) -> BackendEntry:
    for entry in BACKENDS:
        if entry.name == name:
            return entry
    known = ", ".join(e.name for e in BACKENDS)
    raise BackendUnavailableError(
        f"unknown backend {name!r}; choose one of: auto, {known}", backend=name
    )


def get_backend_class(name: str) -> type[Backend]:
    """Import a backend class by name (lazily: importing stockade loads no backend)."""
    entry = _entry(name)
    if entry.target is None:
        raise BackendUnavailableError(
            f"the {name} backend is not built in this version of stockade "
            f"(planned in {entry.planned_issue}); choose backend='namespace'",
            backend=name,
            fix="use --backend namespace",
        )
    module_name, _, class_name = entry.target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    assert isinstance(cls, type) and issubclass(cls, Backend)
    return cls


def probe(name: str) -> Availability:
    entry = _entry(name)
    if entry.target is None:
        return Availability(
            False,
            f"not built yet in this version of stockade (planned in {entry.planned_issue})",
            "use the namespace backend for now",
        )
    try:
        return get_backend_class(name).probe()
    except BackendUnavailableError as exc:
        return Availability(False, str(exc), exc.fix)


def probe_all() -> list[tuple[BackendEntry, Availability]]:
    """Every backend of the design with its availability on this machine, strongest first."""
    return [(entry, probe(entry.name)) for entry in BACKENDS]


def select_backend(policy: EffectivePolicy) -> Backend:
    """Pick the backend for a policy: the named one, or for 'auto' the strongest that works."""
    if policy.backend != "auto":
        if policy.backend == "host" and not policy.unsafe_host:
            raise PolicyError(
                "the host backend runs commands without any isolation; pass --unsafe-host "
                "(SDK: unsafe_host=True) if you really mean it"
            )
        availability = probe(policy.backend)
        if not availability.ok:
            raise BackendUnavailableError(
                f"backend {policy.backend!r} is not available here: {availability.reason}"
                + (f"; {availability.fix}" if availability.fix else ""),
                backend=policy.backend,
                fix=availability.fix,
            )
        backend = get_backend_class(policy.backend)()
        backend.check_policy(policy)
        return backend
    reasons: list[str] = []
    for entry in BACKENDS:
        if not entry.auto or not entry.built:
            continue
        availability = probe(entry.name)
        if availability.ok and not availability.auto:
            reasons.append(f"{entry.name}: works, but only when asked for: {availability.reason}")
            continue
        if availability.ok:
            backend = get_backend_class(entry.name)()
            try:
                backend.check_policy(policy)
            except PolicyError as exc:
                reasons.append(f"{entry.name}: {exc}")
                continue
            return backend
        reasons.append(f"{entry.name}: {availability.reason}")
    raise BackendUnavailableError(
        "no isolation backend works on this machine:\n  "
        + "\n  ".join(reasons)
        + "\nRun `stockade doctor` for how to enable one.",
        backend="auto",
    )
