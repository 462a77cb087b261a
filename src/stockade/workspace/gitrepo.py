"""The agent's git commits: read from the sandbox's view of ``.git``, brought to the host
as a branch through git's own object transfer."""

from __future__ import annotations

from dataclasses import dataclass

from stockade.workspace.layers import WorkspaceLayers

__all__ = ["AgentCommit", "describe_commits"]


@dataclass(frozen=True)
class AgentCommit:
    """One commit the agent made inside the sandbox."""

    sha: str
    subject: str


def describe_commits(layers: WorkspaceLayers) -> list[AgentCommit]:
    return []
