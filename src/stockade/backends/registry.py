"""Registry of every backend the design names, with lazy imports, and `auto` selection.

``auto`` tries them strongest first and never picks ``host``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stockade._errors import BackendUnavailableError, PolicyError
from stockade.backends.base import Availability, Backend

if TYPE_CHECKING:
    from stockade.backends._cgroups import CgroupSupport
    from stockade.policy import EffectivePolicy

__all__ = [
    "BACKENDS",
    "BackendEntry",
    "cgroup_support",
    "check_docker_inside",
    "get_backend_class",
    "kill_leftover_processes",
    "probe",
    "probe_all",
    "select_backend",
    "start_warning",
    "variants",
]


@dataclass(frozen=True)
class BackendEntry:
    """One row of the design's tier table."""

    name: str
    tier: float
    mechanism: str
    target: str  # "module:Class"
    auto: bool = True


BACKENDS: tuple[BackendEntry, ...] = (
    BackendEntry(
        "microvm",
        1,
        "own guest kernel (Firecracker, Cloud Hypervisor, QEMU microvm, vfkit)",
        "stockade.backends.microvm.backend:MicrovmBackend",
    ),
    BackendEntry(
        "gvisor", 1.5, "user-space kernel (runsc)", "stockade.backends.gvisor:GvisorBackend"
    ),
    BackendEntry(
        "container",
        2,
        "hardened OCI container (runc/crun, Docker, Podman)",
        "stockade.backends.container:ContainerBackend",
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
    module_name, _, class_name = _entry(name).target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    assert isinstance(cls, type) and issubclass(cls, Backend)
    return cls


def variants(name: str) -> tuple[str, ...]:
    """Sub-backends probed and tested one by one (the container backend's engines)."""
    return get_backend_class(name).variants


def start_warning(name: str) -> str:
    """What a front end shows before it starts a sandbox on backend ``name`` ("" for none;
    for ``auto`` too: it never picks a backend that warns)."""
    if name == "auto":
        return ""
    return get_backend_class(name).start_warning


def probe(name: str, *, fresh: bool = False) -> Availability:
    """Availability of a backend, or of one variant of it: ``container/docker``.

    Results of backends that name their inputs come from the on-disk probe cache while
    those inputs are unchanged (``probe_cache``); ``fresh`` probes in any case.
    """
    name, _, variant = name.partition("/")
    if variant:
        if variant not in variants(name):
            return Availability(False, f"{name} has no variant {variant!r}")
        return get_backend_class(name).probe_variant(variant)
    _entry(name)  # an unknown name raises BackendUnavailableError
    from stockade.backends.probe_cache import cached_probe

    try:
        return cached_probe(name, get_backend_class(name), fresh=fresh)
    except BackendUnavailableError as exc:
        return Availability(False, str(exc), exc.fix)


def probe_all(*, fresh: bool = False) -> list[tuple[BackendEntry, Availability]]:
    """Every backend of the design with its availability on this machine, strongest first."""
    return [(entry, probe(entry.name, fresh=fresh)) for entry in BACKENDS]


def check_docker_inside(policy: EffectivePolicy, backend: Backend) -> None:
    """Refuse ``docker = true`` on a backend without a private Docker daemon inside."""
    if not policy.docker:
        return
    if backend.provides_docker(policy):
        return
    raise PolicyError(
        f"docker = true needs a private Docker daemon inside the sandbox, which the "
        f"{backend.name} backend cannot provide (and the host's Docker socket is never "
        "shared); use backend = 'microvm' (dockerd in the guest), or backend = 'container' "
        "with container.engine = 'docker' and container.runtime = 'sysbox-runc' where "
        "sysbox is installed"
    )


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
        check_docker_inside(policy, backend)
        return backend
    reasons: list[str] = []
    for entry in BACKENDS:
        if not entry.auto:
            continue
        availability = probe(entry.name)
        if availability.ok and not availability.auto:
            reasons.append(f"{entry.name}: works, but only when asked for: {availability.reason}")
            continue
        if availability.ok:
            backend = get_backend_class(entry.name)()
            try:
                backend.check_policy(policy)
                check_docker_inside(policy, backend)
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


def cgroup_support() -> CgroupSupport:
    """What this machine offers for per-sandbox cgroups (``stockade doctor`` shows it)."""
    from stockade.backends._cgroups import probe_cgroups

    return probe_cgroups()


def kill_leftover_processes(sandbox_id: str) -> set[int]:
    """Kill whatever still runs in a removed sandbox's cgroups (every backend that shares the
    host kernel puts its processes there) and remove the groups; returns the pids that
    survived (empty when everything is gone)."""
    from stockade.backends._cgroups import remove_stale_cgroups

    return remove_stale_cgroups(sandbox_id)
