"""Host mode: the guest agent as a plain subprocess. No isolation at all; explicit only.

It exists for machines where nothing else runs and for debugging. It is never chosen by
``auto``, refuses to start without ``unsafe_host``, and warns loudly every time.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import anyio

from stockade._errors import PolicyError, SandboxStartError
from stockade.backends._process import ProcessSandbox
from stockade.backends.base import Availability, Backend, Capabilities, LaunchSpec
from stockade.policy import EffectivePolicy

__all__ = ["UNSAFE_HOST_WARNING", "HostBackend"]

logger = logging.getLogger(__name__)

UNSAFE_HOST_WARNING = (
    "WARNING: backend 'host' runs commands directly on this machine with NO isolation: "
    "they can read your files, keys and credentials and reach the network."
)


class HostBackend(Backend):
    """Tier 3: plain subprocesses. Cooperative only."""

    name = "host"
    start_warning = UNSAFE_HOST_WARNING
    capabilities = Capabilities(
        tier=3,
        isolation="none (plain subprocesses)",
        network_policy=False,
        cow_workspace=False,
        enforces=("per-command timeouts (the agent kills the process group)",),
        does_not_enforce=(
            "file isolation",
            "network isolation",
            "resource limits",
            "credential protection",
        ),
    )

    @classmethod
    def probe(cls) -> Availability:
        return Availability(
            True,
            "always available; no isolation at all: needs --unsafe-host (SDK: unsafe_host=True)",
            auto=False,
        )

    def check_policy(self, policy: EffectivePolicy) -> None:
        if not policy.unsafe_host:
            raise PolicyError(
                "the host backend runs commands without any isolation; pass --unsafe-host "
                "(SDK: unsafe_host=True) if you really mean it"
            )
        if policy.workspace.mode in ("cow", "ro"):
            raise PolicyError(
                f"the host backend cannot provide a {policy.workspace.mode!r} workspace: "
                "commands run directly on your files. Set workspace.mode = 'rw' "
                "(--workspace-mode rw) or 'none', or use the namespace backend"
            )

    async def launch(self, spec: LaunchSpec) -> ProcessSandbox:
        self.check_policy(spec.policy)
        logger.warning(UNSAFE_HOST_WARNING)
        ws = spec.policy.workspace
        cwd = str(ws.host_path) if ws.host_path is not None and ws.mode == "rw" else "/"
        log_path = spec.state_dir / "sandbox.log"
        argv = [sys.executable, "-S", "-I", str(spec.agent_source), "--workspace", cwd]
        try:
            with log_path.open("ab") as log:
                process = await anyio.open_process(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=dict(spec.policy.env),
                    cwd=cwd,
                    start_new_session=True,
                )
        except OSError as exc:
            raise SandboxStartError(f"could not start the agent: {exc}") from exc
        return ProcessSandbox(process, log_path)
