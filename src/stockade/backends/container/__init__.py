"""Container backend: a hardened OCI container from one of several engines.

``[container] engine`` picks it: ``runc`` / ``crun`` run stockade's own bundle without a
daemon (``oci.py``); ``docker`` / ``podman`` go through the engine's API (``engine.py``);
``auto`` takes the first that works in that order. Every engine gets the same hardening:
no capabilities, no_new_privs, read-only root, no network but loopback, seccomp, limits.
"""

from __future__ import annotations

from typing import ClassVar

from stockade._errors import BackendUnavailableError, PolicyError
from stockade.backends.base import (
    Availability,
    Backend,
    Capabilities,
    LaunchedSandbox,
    LaunchSpec,
    Leftover,
)
from stockade.backends.oci_runtime import OciContainerSandbox
from stockade.policy import EffectivePolicy

__all__ = ["ENGINES", "ContainerBackend", "probe_engine"]

ENGINES = ("runc", "crun", "docker", "podman")


def probe_engine(engine: str) -> Availability:
    """Whether one engine of the container backend runs here."""
    if engine in ("runc", "crun"):
        from stockade.backends.container.daemonless import probe_oci

        return probe_oci(engine)
    if engine in ("docker", "podman"):
        from stockade.backends.container.engine import probe_api_engine

        return probe_api_engine(engine)
    return Availability(
        False, f"unknown container engine {engine!r}", "one of: " + ", ".join(ENGINES)
    )


def _chosen_engine(policy: EffectivePolicy) -> str:
    engine = policy.container.engine
    if engine != "auto":
        availability = probe_engine(engine)
        if not availability.ok:
            raise BackendUnavailableError(
                f"container engine {engine!r} is not available here: {availability.reason}"
                + (f"; {availability.fix}" if availability.fix else ""),
                backend="container",
                fix=availability.fix,
            )
        return engine
    reasons = []
    for candidate in ENGINES:
        image = policy.container.image
        if candidate in ("runc", "crun") and not (
            image == "host" or image.startswith("/") or image.isidentifier()
        ):
            continue  # an image reference such as 'debian:bookworm' needs an image store
        availability = probe_engine(candidate)
        if availability.ok:
            return candidate
        reasons.append(f"{candidate}: {availability.reason}")
    raise BackendUnavailableError(
        "no container engine works here:\n  " + "\n  ".join(reasons),
        backend="container",
        fix="install runc (apt-get install runc) or Docker",
    )


class ContainerBackend(Backend):
    """Tier 2: a hardened OCI container (runc/crun daemonless, or Docker/Podman)."""

    name = "container"
    #: Engines the conformance suite runs separately (``container/runc`` and so on).
    variants: ClassVar[tuple[str, ...]] = ENGINES
    capabilities = Capabilities(
        tier=2,
        isolation="OCI container: namespaces (user with runc/crun) + seccomp + no capabilities",
        enforces=(
            "no network device but loopback (fresh network namespace / --network none)",
            "host files invisible except read-only /usr and a curated /etc (or an image)",
            "read-only root filesystem; workspace copy-on-write through overlayfs",
            "no capabilities, no_new_privs, seccomp (stockade's deny list for runc/crun, the "
            "engine's default profile for docker/podman), masked /proc paths",
            "memory, pids and cpu limits through the container's cgroup",
            "Landlock restricts writes to the workspace, /tmp and /dev (runc/crun)",
        ),
        does_not_enforce=(
            "a separate kernel: a kernel exploit escapes (use microvm or gvisor for that)",
            "a user namespace under Docker unless dockerd runs with userns-remap",
        ),
    )

    @classmethod
    def probe(cls) -> Availability:
        details = []
        first: tuple[str, Availability] | None = None
        for engine in ENGINES:
            availability = probe_engine(engine)
            details.append(f"{engine}: {'ok' if availability.ok else availability.reason}")
            if availability.ok and first is None:
                first = (engine, availability)
        if first is None:
            return Availability(
                False,
                "no container engine works here (" + "; ".join(details) + ")",
                "install runc (apt-get install runc), or Docker / Podman",
                tuple(details),
            )
        return Availability(True, f"engine {first[0]}: {first[1].reason}", "", tuple(details))

    @classmethod
    def probe_variant(cls, variant: str) -> Availability:
        return probe_engine(variant)

    def provides_docker(self, policy: EffectivePolicy) -> bool:
        """Docker inside works only with sysbox's runtime on an API engine."""
        return policy.container.runtime == "sysbox-runc" and policy.container.engine in (
            "auto",
            "docker",
            "podman",
        )

    def check_policy(self, policy: EffectivePolicy) -> None:
        if policy.container.runtime and policy.container.engine in ("runc", "crun"):
            raise PolicyError(
                f"container.runtime = {policy.container.runtime!r} applies to the docker and "
                f"podman engines; with engine {policy.container.engine!r} leave it unset (or "
                "use backend = 'gvisor' for runsc)"
            )

    @classmethod
    def reap(cls, sandbox_id: str) -> None:
        """Delete containers (and volumes) left by a sandbox whose owner died."""
        from stockade.backends.container.daemonless import reap_oci

        reap_oci(sandbox_id)
        from stockade.backends.container.engine import reap_api_engines

        reap_api_engines(sandbox_id)

    @classmethod
    def orphans(cls) -> tuple[Leftover, ...]:
        """runc's and crun's containers under stockade's roots, then Docker's and Podman's
        labelled by stockade (where the engine runs)."""
        from stockade.backends.container.engine import orphans
        from stockade.backends.oci_runtime import runtime_leftovers

        found = [*runtime_leftovers("runc"), *runtime_leftovers("crun")]
        for engine in ("docker", "podman"):
            found += [
                Leftover(
                    row["sandbox"],
                    f"{engine} container {row['container']}",
                    f"{engine} rm -f {row['container']}",
                )
                for row in orphans(engine)
                if row["sandbox"]
            ]
        return tuple(found)

    async def launch(self, spec: LaunchSpec) -> LaunchedSandbox:
        self.check_policy(spec.policy)
        engine = _chosen_engine(spec.policy)
        if engine in ("runc", "crun"):
            from stockade.backends.container.daemonless import launch_oci

            sandbox: OciContainerSandbox = await launch_oci(spec, engine)
            return sandbox
        from stockade.backends.container.engine import launch_api_engine

        return await launch_api_engine(spec, engine)
