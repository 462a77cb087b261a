"""The agent's commits come back as a branch by git fetch; the host's refs stay as they were.

The sandbox's ``.git`` is simulated as overlayfs would leave it: the agent works in a copy
of the project (its view), and every file of that copy's ``.git`` that is new or changed
lands in the upper layer (copy-up), deletions as whiteouts.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import pytest

from layer_helpers import write
from sandbox_helpers import git
from stockade._errors import WorkspaceError
from stockade.workspace import WorkspaceLayers, compute_diff
from stockade.workspace.gitrepo import agent_head, describe_commits, import_commits

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def copy_up(lower: Path, merged: Path, upper: Path) -> None:
    """Put into upper every file of merged/.git that is new or differs from lower/.git."""
    for dirpath, _dirs, files in os.walk(merged / ".git"):
        rel = Path(dirpath).relative_to(merged)
        for name in files:
            src = Path(dirpath) / name
            old = lower / rel / name
            if old.is_file() and filecmp.cmp(src, old, shallow=False):
                continue
            dest = upper / rel / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    write(root / "a.txt", "a\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


def refs_and_logs(repo: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    git_dir = repo / ".git"
    for name in ("HEAD", "packed-refs", "index", "FETCH_HEAD"):
        if (git_dir / name).exists():
            out[name] = (git_dir / name).read_bytes()
    for sub in ("refs", "logs"):
        for dirpath, _dirs, files in os.walk(git_dir / sub):
            for name in files:
                path = Path(dirpath) / name
                out[str(path.relative_to(git_dir))] = path.read_bytes()
    return out


def test_agent_commit_becomes_a_branch_and_host_refs_stay(tmp_path: Path, project: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    merged = tmp_path / "merged"
    shutil.copytree(project, merged, symlinks=True)
    write(merged / "agent.txt", "from the agent\n")
    git(merged, "add", "agent.txt")
    git(merged, "commit", "-qm", "agent: add agent.txt")
    git(merged, "commit", "-q", "--allow-empty", "-m", "agent: second")
    copy_up(project, merged, layers.upper)
    write(layers.upper / "agent.txt", "from the agent\n")
    agent_sha = git(merged, "rev-parse", "HEAD").strip()

    # The host commits meanwhile.
    write(project / "host.txt", "host\n")
    git(project, "add", "host.txt")
    git(project, "commit", "-qm", "host: add host.txt")
    host_sha = git(project, "rev-parse", "HEAD").strip()

    assert agent_head(layers) == agent_sha
    diff = compute_diff(layers)
    assert [c.path for c in diff] == ["agent.txt"]
    assert [c.subject for c in diff.commits] == ["agent: add agent.txt", "agent: second"]
    assert describe_commits(layers)[-1].sha == agent_sha

    before = refs_and_logs(project)
    imported = import_commits(layers, project, "stockade/demo")
    after = refs_and_logs(project)
    assert imported == [c.sha for c in diff.commits]
    assert after.pop("refs/heads/stockade/demo").decode().strip() == agent_sha
    assert after == before  # HEAD, index, other refs, reflogs, no FETCH_HEAD
    assert git(project, "rev-parse", "main").strip() == host_sha
    assert git(project, "show", "stockade/demo:agent.txt") == "from the agent\n"
    git(project, "fsck", "--strict", "--no-dangling")
    # Importing again is a no-op move of the same branch.
    assert import_commits(layers, project, "stockade/demo") == imported
    assert not list(layers.state_dir.glob(".agent-view-*"))  # private views removed


def test_no_commit_no_branch(tmp_path: Path, project: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    write(layers.upper / "a.txt", "changed\n")
    assert compute_diff(layers).commits == []
    assert import_commits(layers, project, "stockade/x") == []
    assert "stockade/x" not in git(project, "branch", "--list")


def test_hostile_sandbox_git_files_are_not_trusted(tmp_path: Path, project: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    secret_repo = tmp_path / "secret"
    secret_repo.mkdir()
    git(secret_repo, "init", "-q")
    write(secret_repo / "s.txt", "secret\n")
    git(secret_repo, "add", "-A")
    git(secret_repo, "commit", "-qm", "secret")
    secret_sha = git(secret_repo, "rev-parse", "HEAD").strip()
    # The agent points HEAD at a commit it does not have, via alternates to another repo.
    write(
        layers.upper / ".git" / "objects" / "info" / "alternates",
        str(secret_repo / ".git" / "objects") + "\n",
    )
    write(layers.upper / ".git" / "refs" / "heads" / "main", secret_sha + "\n")
    with pytest.raises(WorkspaceError, match="cannot be read"):
        import_commits(layers, project, "stockade/evil")
    assert "stockade/evil" not in git(project, "branch", "--list")
    # A ref name that tries to leave refs/ resolves to nothing.
    write(layers.upper / ".git" / "HEAD", "ref: refs/../../../etc/passwd\n")
    assert agent_head(layers) is None
    diff = compute_diff(layers)
    assert diff.commits == [] and not diff


def test_a_host_commit_seen_through_lower_is_not_the_agents(tmp_path: Path, project: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    write(project / "host.txt", "host\n")
    git(project, "add", "host.txt")
    git(project, "commit", "-qm", "host: meanwhile")
    # The sandbox sees the host's live .git: its HEAD is now the host's new commit.
    assert agent_head(layers) == git(project, "rev-parse", "HEAD").strip()
    assert compute_diff(layers).commits == []
    assert import_commits(layers, project, "stockade/none") == []
    assert "stockade/none" not in git(project, "branch", "--list")
