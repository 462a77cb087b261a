"""The Backend interface: start and stop one isolation unit and hand back a byte Channel.

A backend knows nothing about exec or files; the one ``AgentClient`` does that over the
channel. Each backend declares what it enforces (``Capabilities``) and whether it can run
here (``probe() -> Availability``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from anyio.abc import ByteStream

if TYPE_CHECKING:
    from stockade.agent.client import AgentClient
    from stockade.egress.runtime import EgressLaunch
    from stockade.policy import EffectivePolicy
    from stockade.workspace import WorkspaceLayers

__all__ = [
    "AGENT_GUEST_PATH",
    "Availability",
    "Backend",
    "Capabilities",
    "LaunchSpec",
    "LaunchedSandbox",
    "Leftover",
    "guest_agent_source",
]

#: Where the guest agent file appears inside a sandbox.
AGENT_GUEST_PATH = "/run/stockade/agent.py"


def guest_agent_source() -> Path:
    """Path of the stdlib-only guest agent program shipped with stockade."""
    return Path(__file__).resolve().parent.parent / "agent" / "guest.py"


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run on this machine; when not, why and how to fix it."""

    ok: bool
    reason: str = ""
    fix: str = ""
    details: tuple[str, ...] = ()
    #: False when the backend works but ``auto`` must not pick it (an emulated microVM:
    #: real isolation, but only when asked for by name).
    auto: bool = True


@dataclass(frozen=True)
class Capabilities:
    """What a backend enforces or offers. ``tier`` follows DESIGN.md §1 (lower = stronger)."""

    tier: float
    isolation: str
    network_policy: bool = True
    cow_workspace: bool = True
    snapshot: bool = False
    fork: bool = False
    docker_inside: bool = False
    systemd: bool = False
    pty: bool = True
    gpu: bool = False
    #: The sandbox's workspace writes stay inside it (a guest's own upper layer) until
    #: ``LaunchedSandbox.sync_workspace`` brings them home: a diff of a running sandbox
    #: syncs first, and its end must save them.
    workspace_in_guest: bool = False
    enforces: tuple[str, ...] = ()
    does_not_enforce: tuple[str, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one sandbox."""

    sandbox_id: str
    name: str
    policy: EffectivePolicy
    state_dir: Path
    workspace: WorkspaceLayers | None
    agent_source: Path = field(default_factory=guest_agent_source)
    #: Host directory for reusable artefacts (e.g. the agent compiled for the guest Python).
    cache_dir: Path | None = None
    #: The agent's egress listeners and the sandbox's proxy environment; None: no egress.
    egress: EgressLaunch | None = None


@dataclass(frozen=True)
class Leftover:
    """Something of a sandbox that a backend's engine keeps outside any state directory (a
    runsc/runc container, a Docker container), found by ``Backend.orphans``."""

    sandbox_id: str
    #: For a human: "runsc container stockade-<id>", "docker container 1a2b…".
    what: str
    #: The command that removes it by hand.
    by_hand: str


class LaunchedSandbox(abc.ABC):
    """A running isolation unit: its agent channel, and how to end it for sure."""

    channel: ByteStream

    @abc.abstractmethod
    async def terminate(self, grace: float = 1.0) -> None:
        """Stop everything in the sandbox; return only when no process of it survives."""

    @abc.abstractmethod
    def kill_now(self) -> None:
        """End the isolation unit at once, synchronously, from any thread (the sandbox's
        wall-clock timer calls it from its own): e.g. SIGKILL the process the unit lives in.

        Touches no event loop and never raises (a unit already gone is fine); ``terminate``
        still runs afterwards and verifies that nothing survives. No default: a backend
        whose unit cannot be killed from a thread would leave the timeout unenforced.
        """

    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the isolation unit runs."""

    @abc.abstractmethod
    def failure_details(self) -> str:
        """Diagnostics (log tail) to attach to an error when the sandbox failed to start."""

    def resource_events(self) -> dict[str, bool]:
        """Limit hits observed so far, e.g. {'oom_killed': True, 'pids_limit_hit': False}."""
        return {}

    def exit_reason(self) -> str | None:
        """Why the unit ended by itself, when known (e.g. 'guest poweroff', 'kernel panic')."""
        return None

    async def after_connect(self, client: AgentClient) -> None:  # noqa: B027 - optional hook
        """Called once the agent answered the handshake (e.g. a resumed VM sets its clock)."""

    async def sync_workspace(self, client: AgentClient) -> None:  # noqa: B027 - optional hook
        """Bring the sandbox's writes into ``LaunchSpec.workspace.upper`` before a diff or an
        apply. A no-op where the upper layer already is that host directory (overlayfs)."""


class Backend(abc.ABC):
    """An isolation mechanism. Subclasses are registered in ``stockade.backends.registry``."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    #: True when ``limits.disk`` is enforced inside the isolation unit itself (a microVM's
    #: sized tmpfs): the host then keeps the upper layer in a plain directory instead of a
    #: disk image of its own (``stockade.workspace.disk``).
    disk_limit_inside: ClassVar[bool] = False
    #: Sub-backends probed and tested one by one (the container backend's engines:
    #: ``container/docker``); each is checked with ``probe_variant``.
    variants: ClassVar[tuple[str, ...]] = ()
    #: Shown loudly by a front end before it starts a sandbox on this backend (the host
    #: backend's: no isolation at all); "" for none.
    start_warning: ClassVar[str] = ""

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> Availability:
        """Cheap check whether this backend can run here; never raises."""

    @classmethod
    def probe_inputs(cls) -> tuple[str, ...] | None:
        """Paths whose identity decides ``probe()`` (binaries, devices, image directories).

        A backend that names them gets its probe result kept on disk between processes
        (``stockade.backends.probe_cache``); None (the default) probes every time.
        """
        return None

    @classmethod
    def probe_variant(cls, variant: str) -> Availability:
        """Whether one of ``variants`` can run here; never raises."""
        return Availability(False, f"the {cls.name} backend has no variant {variant!r}")

    def check_policy(self, policy: EffectivePolicy) -> None:  # noqa: B027 - optional hook
        """Raise PolicyError if the policy asks for something this backend cannot enforce."""

    def provides_docker(self, policy: EffectivePolicy) -> bool:
        """Whether a sandbox of ``policy`` gets a private Docker daemon inside (``docker =
        true``); by default what ``capabilities.docker_inside`` says for every policy."""
        return self.capabilities.docker_inside

    @classmethod  # noqa: B027 - optional hook
    def reap(cls, sandbox_id: str) -> None:
        """Delete what a sandbox may have left outside its state directory when its owner
        died without a teardown (an engine's container and volume); quiet when nothing is
        left. Raises SandboxStateError when something is left that cannot be removed.

        The caller removes the state directory, its mounts and cgroups itself; a backend
        whose every part lives there (or dies with its owner) keeps this default no-op."""

    @classmethod
    def orphans(cls) -> tuple[Leftover, ...]:
        """Every sandbox's part this backend's engines keep on this machine, whatever state
        directory made it (engines are shared machine-wide); ``reap`` removes them. The
        caller decides which are leftovers (no record of theirs) and which it may remove."""
        return ()

    @abc.abstractmethod
    async def launch(self, spec: LaunchSpec) -> LaunchedSandbox:
        """Start the sandbox with the guest agent as the parent of every process in it."""
