"""The workspace baseline: a git tree of the project, recorded with the git binary."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox_helpers import git
from stockade._errors import WorkspaceError
from stockade.workspace.baseline import (
    BaselineEntry,
    WorkspaceBaseline,
    git_blob_id,
    git_blob_id_fd,
    git_env,
)
from stockade.workspace.layers import WorkspaceLayers

pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
    reason="git is not installed",
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q")
    (project / ".gitignore").write_text(".venv/\n__pycache__/\n*.log\n")
    (project / "README.md").write_text("hello\n")
    (project / "src").mkdir()
    (project / "src" / "a.py").write_text("print('a')\n")
    (project / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(project / "run.sh", 0o755)
    os.symlink("README.md", project / "link")
    (project / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    (project / ".gitattributes").write_text("* text=auto\n")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "init")
    (project / "untracked.txt").write_text("new\n")
    (project / "debug.log").write_text("ignored\n")
    (project / ".venv").mkdir()
    (project / ".venv" / "x").write_text("junk\n")
    (project / "tracked.log").write_text("tracked although ignored\n")
    git(project, "add", "-f", "tracked.log")
    return project


def test_blob_ids_match_git(tmp_path: Path) -> None:
    data = b"some\0bytes\n" * 1000
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = (
        subprocess.run(
            ["git", "hash-object", "--no-filters", str(path)], capture_output=True, check=True
        )
        .stdout.decode()
        .strip()
    )
    assert git_blob_id(data) == expected
    fd = os.open(path, os.O_RDONLY)
    try:
        assert git_blob_id_fd(fd) == expected
    finally:
        os.close(fd)
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_record_git_project(tmp_path: Path, repo: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    baseline = WorkspaceBaseline.record(state, repo)
    assert baseline.head == git(repo, "rev-parse", "HEAD").strip()
    entries = baseline.entries_under("")
    assert set(entries) == {
        ".gitattributes",
        ".gitignore",
        "README.md",
        "crlf.txt",
        "link",
        "run.sh",
        "src/a.py",
        "tracked.log",
        "untracked.txt",
    }
    assert entries["run.sh"].mode == 0o755
    assert entries["README.md"] == BaselineEntry("file", 0o644, git_blob_id(b"hello\n"))
    assert entries["link"] == BaselineEntry("symlink", 0, git_blob_id(b"README.md"))
    # Bytes as on disk, whatever .gitattributes says about line endings.
    assert baseline.read("crlf.txt") == b"one\r\ntwo\r\n"
    assert baseline.read("link") == b"README.md"
    assert baseline.entries_under("src") == {"src/a.py": entries["src/a.py"]}
    assert baseline.entry("debug.log") is None
    assert baseline.entry(".venv/x") is None
    assert baseline.is_dir("src") and not baseline.is_dir(".venv")
    # The host's objects are borrowed, not copied; .git itself is never in the tree.
    alternates = (baseline.git_dir / "objects" / "info" / "alternates").read_text()
    assert alternates.strip() == str(repo / ".git" / "objects")
    assert not any(p.startswith(".git/") for p in entries)


def test_record_leaves_the_host_repository_alone(tmp_path: Path, repo: Path) -> None:
    def snapshot() -> dict[str, bytes]:
        out = {}
        for root, _dirs, files in os.walk(repo / ".git"):
            for name in files:
                path = Path(root, name)
                out[str(path)] = path.read_bytes()
        return out

    before = snapshot()
    index_mtime = os.stat(repo / ".git" / "index").st_mtime_ns
    WorkspaceBaseline.record(tmp_path, repo)
    assert snapshot() == before
    assert os.stat(repo / ".git" / "index").st_mtime_ns == index_mtime


def test_record_plain_directory_and_reopen(tmp_path: Path) -> None:
    project = tmp_path / "plain"
    (project / "d").mkdir(parents=True)
    (project / "d" / "f").write_bytes(b"\xff\xfe")
    (project / "x.pyc").write_bytes(b"compiled")
    name = os.fsdecode(b"bad-\xff name")
    (project / name).write_bytes(b"odd")
    state = tmp_path / "state"
    state.mkdir()
    baseline = WorkspaceBaseline.record(state, project)
    assert baseline.head is None
    assert not (baseline.git_dir / "objects" / "info" / "alternates").exists()
    reopened = WorkspaceBaseline.open(state, project)
    assert set(reopened.entries_under("")) == {"d/f", "x.pyc", name}
    assert reopened.read(name) == b"odd"
    assert reopened.tree == baseline.tree


def test_global_excludes_file_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".config" / "git").mkdir(parents=True)
    (home / ".config" / "git" / "ignore").write_text("*.swp\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("GIT_CONFIG_GLOBAL", raising=False)
    project = tmp_path / "p"
    project.mkdir()
    (project / "keep.txt").write_text("k")
    (project / "edit.swp").write_text("s")
    baseline = WorkspaceBaseline.record(tmp_path, project)
    assert set(baseline.entries_under("")) == {"keep.txt"}
    # The repository's info/exclude outranks the global file.
    git(project, "init", "-q")
    (project / ".git" / "info").mkdir(exist_ok=True)
    (project / ".git" / "info" / "exclude").write_text("!important.swp\n")
    (project / "important.swp").write_text("i")
    baseline = WorkspaceBaseline.record(tmp_path, project)
    assert set(baseline.entries_under("")) == {"keep.txt", "important.swp"}


def test_empty_project(tmp_path: Path) -> None:
    project = tmp_path / "empty"
    project.mkdir()
    baseline = WorkspaceBaseline.record(tmp_path, project)
    assert baseline.entries_under("") == {}
    assert baseline.tree == "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


def test_open_missing_baseline_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="reset the workspace"):
        WorkspaceBaseline.open(tmp_path, tmp_path)


def test_project_config_cannot_run_code(tmp_path: Path, repo: Path) -> None:
    marker = tmp_path / "ran"
    hook = repo / ".git" / "hooks" / "fsmonitor"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    git(repo, "config", "core.fsmonitor", str(hook))
    git(repo, "config", "filter.evil.clean", f"touch {marker}")
    (repo / ".gitattributes").write_text("* filter=evil\n")
    baseline = WorkspaceBaseline.record(tmp_path, repo)
    assert not marker.exists()
    assert baseline.read("README.md") == b"hello\n"


def test_git_env_is_isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_DIR", "/elsewhere")
    monkeypatch.setenv("GIT_SSH_COMMAND", "evil")
    env = git_env(tmp_path, work_tree=tmp_path / "w", index_file=tmp_path / "i")
    assert env["GIT_DIR"] == str(tmp_path)
    assert env["GIT_CONFIG_GLOBAL"] == "/dev/null" and env["GIT_CONFIG_NOSYSTEM"] == "1"
    assert "GIT_SSH_COMMAND" not in env
    keys = {env[f"GIT_CONFIG_KEY_{i}"]: i for i in range(int(env["GIT_CONFIG_COUNT"]))}
    assert env[f"GIT_CONFIG_VALUE_{keys['core.hooksPath']}"] == "/dev/null"
    assert env[f"GIT_CONFIG_VALUE_{keys['core.fsmonitor']}"] == "false"


def test_layers_record_and_reset_baseline(tmp_path: Path, repo: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", repo)
    assert layers.exists()
    assert layers.baseline.entry("untracked.txt") is not None
    (repo / "later.txt").write_text("after the baseline\n")
    assert layers.baseline.entry("later.txt") is None
    layers.reset()
    assert layers.baseline.entry("later.txt") is not None
    leftovers = [p.name for p in (tmp_path / "state").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_advance_records_applied_entries(tmp_path: Path, repo: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", repo)
    (layers.upper / "README.md").write_text("applied\n")
    (layers.upper / "new.txt").write_text("n\n")
    from stockade.workspace import compute_diff

    assert {c.path for c in compute_diff(layers)} == {"README.md", "new.txt"}
    baseline = layers.baseline
    oid = baseline.write_blob(b"applied\n")
    new = baseline.advance(
        {
            "README.md": BaselineEntry("file", 0o644, oid),
            "src/a.py": None,
        }
    )
    assert new.read("README.md") == b"applied\n" and new.entry("src/a.py") is None
    assert baseline.read("README.md") == b"hello\n"  # the old object is unchanged
    reopened = layers.baseline
    assert reopened.tree == new.tree and reopened.head == baseline.head
    diff = compute_diff(layers)
    assert {c.path for c in diff} == {"new.txt"}


def test_assume_unchanged_entries_are_rehashed(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    git(project, "init", "-q")
    (project / "conf.txt").write_text("committed\n")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "init")
    git(project, "update-index", "--assume-unchanged", "conf.txt")
    (project / "conf.txt").write_text("edited locally, same size?\n")
    baseline = WorkspaceBaseline.record(tmp_path, project)
    assert baseline.read("conf.txt") == b"edited locally, same size?\n"


def test_legacy_sandbox_gets_a_baseline_recorded(tmp_path: Path, repo: Path) -> None:
    state = tmp_path / "state"
    layers = WorkspaceLayers.create(state, repo)
    import shutil

    shutil.rmtree(layers.baseline_path)
    with pytest.raises(WorkspaceError):
        _ = layers.baseline
    (state / "workspace-baseline").write_text("123\n")  # what older stockade wrote
    assert layers.baseline.entry("README.md") is not None


def test_refresh_rerecords_paths_from_the_project(tmp_path: Path, repo: Path) -> None:
    baseline = WorkspaceBaseline.record(tmp_path, repo)
    (repo / "README.md").write_text("applied\n")
    (repo / "src" / "a.py").unlink()
    (repo / "debug2.log").write_text("named although ignored\n")
    (repo / "other.txt").write_text("not named\n")
    new = baseline.refresh(["README.md", "src", "debug2.log"])
    assert new.read("README.md") == b"applied\n"
    assert new.entry("src/a.py") is None
    assert new.entry("debug2.log") is not None
    assert new.entry("other.txt") is None
    assert new.entry("untracked.txt") == baseline.entry("untracked.txt")
    (repo / "emptydir").mkdir()
    os.symlink("README.md", repo / "newlink")
    newer = new.refresh(["emptydir", "newlink", "gone-anyway"])
    assert newer.entry("newlink") == BaselineEntry("symlink", 0, git_blob_id(b"README.md"))
    assert newer.entry("emptydir") is None
