"""apply_diff and reset over hand-built layers: atomic writes, escapes, protection, conflicts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from layer_helpers import snapshot, whiteout, write
from stockade._errors import WorkspaceError
from stockade.workspace import FileChange, WorkspaceDiff, WorkspaceLayers, apply_diff, compute_diff


def copy_dir(layers: WorkspaceLayers, rel: str) -> Path:
    """An upper directory that exists only because of copy-up (same mode as lower)."""
    path = layers.upper / rel
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, stat.S_IMODE(os.stat(layers.lower / rel).st_mode))
    return path


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".stockade-apply-*")]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    lower = tmp_path / "project"
    write(lower / "README.md", "# hi\n")
    write(lower / "src" / "a.py", "a = 1\n")
    write(lower / "src" / "b.py", "b = 1\n")
    write(lower / "old" / "x.txt", "x\n")
    write(lower / "old" / "deep" / "y.txt", "y\n")
    write(lower / "run.sh", "#!/bin/sh\n")
    write(lower / ".git" / "config", "[core]\n")
    os.symlink("src/a.py", lower / "link")
    return lower


@pytest.fixture
def layers(tmp_path: Path, project: Path) -> WorkspaceLayers:
    return WorkspaceLayers.create(tmp_path / "state", project)


def mutate(layers: WorkspaceLayers) -> None:
    """A mix of every kind of change, laid out the way overlayfs would write it."""
    up = layers.upper
    write(up / "README.md", "# hello\n")
    copy_dir(layers, "src")
    write(up / "src" / "a.py", "a = 2\n")
    write(up / "src" / "c.py", "c = 1\n", 0o600)
    write(up / "run.sh", "#!/bin/sh\n", 0o755)
    write(up / "new" / "pkg" / "m.py", "m\n")
    (up / "empty").mkdir()
    os.chmod(up / "empty", 0o750)
    os.symlink("src/c.py", up / "link")
    os.symlink("README.md", up / "newlink")
    write(up / "blob.bin", b"\0\1\2")
    if os.geteuid() == 0:
        whiteout(up / "old")
        whiteout(up / "src" / "b.py")


def expected_after(
    project_before: dict[str, tuple[str, int, bytes | str | None]],
) -> dict[str, tuple[str, int, bytes | str | None]]:
    exp = dict(project_before)
    exp["README.md"] = ("file", 0o644, b"# hello\n")
    exp["src/a.py"] = ("file", 0o644, b"a = 2\n")
    exp["src/c.py"] = ("file", 0o600, b"c = 1\n")
    exp["run.sh"] = ("file", 0o755, b"#!/bin/sh\n")
    exp["new"] = ("dir", 0o755, None)
    exp["new/pkg"] = ("dir", 0o755, None)
    exp["new/pkg/m.py"] = ("file", 0o644, b"m\n")
    exp["empty"] = ("dir", 0o750, None)
    exp["link"] = ("symlink", 0, "src/c.py")
    exp["newlink"] = ("symlink", 0, "README.md")
    exp["blob.bin"] = ("file", 0o644, b"\0\1\2")
    if os.geteuid() == 0:
        for gone in ("old", "old/x.txt", "old/deep", "old/deep/y.txt", "src/b.py"):
            del exp[gone]
    return exp


def test_create_layout_and_exists(tmp_path: Path, project: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    assert layers.exists()
    for path in (layers.upper, layers.work):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert list(path.iterdir()) == []
    assert layers.baseline_ns >= os.stat(project / "README.md").st_ctime_ns
    assert not WorkspaceLayers.at(tmp_path / "other", project).exists()
    with pytest.raises(WorkspaceError, match="already exists"):
        WorkspaceLayers.create(tmp_path / "state", project)
    with pytest.raises(WorkspaceError, match="not a directory"):
        WorkspaceLayers.create(tmp_path / "s2", project / "README.md")


def test_host_edit_right_after_create_is_newer_than_baseline(tmp_path: Path, project: Path) -> None:
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    write(project / "README.md", "edited\n")
    assert os.stat(project / "README.md").st_ctime_ns > layers.baseline_ns


def test_paths_naming_nothing_is_an_error(layers: WorkspaceLayers) -> None:
    mutate(layers)
    with pytest.raises(WorkspaceError, match="no change at 'nothing/here'"):
        apply_diff(layers, paths=["nothing/here"])


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "a/./b", "", "a//b"])
def test_escaping_paths_in_a_diff_are_refused_before_writing(
    layers: WorkspaceLayers, project: Path, bad: str
) -> None:
    mutate(layers)
    before = snapshot(project)
    forged = WorkspaceDiff(
        changes=[*compute_diff(layers).changes, FileChange(path=bad, kind="added", type="file")]
    )
    with pytest.raises(WorkspaceError, match="refusing to apply"):
        apply_diff(layers, forged)
    assert snapshot(project) == before


@pytest.mark.parametrize("bad", ["../x", "/etc", "src/../../x"])
def test_escaping_paths_argument_is_refused(layers: WorkspaceLayers, bad: str) -> None:
    mutate(layers)
    with pytest.raises(WorkspaceError, match="refusing to apply"):
        apply_diff(layers, paths=[bad])


def test_symlinked_parent_on_host_is_refused(
    layers: WorkspaceLayers, project: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy_dir(layers, "src")
    write(layers.upper / "src" / "a.py", "pwned\n")
    write(layers.upper / "src" / "evil.py", "pwned\n")
    write(layers.upper / "README.md", "fine\n")
    diff = compute_diff(layers)
    # The host's src/ is swapped for a symlink after the review.
    os.rename(project / "src", tmp_path / "src.orig")
    os.symlink(elsewhere, project / "src")
    with pytest.raises(WorkspaceError, match="symlink"):
        apply_diff(layers, diff, force=True)
    assert list(elsewhere.iterdir()) == []
    assert (project / "README.md").read_text() == "# hi\n"


def test_forged_diff_entries_are_never_applied(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "README.md", "real change\n")
    forged = WorkspaceDiff(
        changes=[
            *compute_diff(layers).changes,
            FileChange(path="run.sh", kind="deleted", type="file"),
        ]
    )
    result = apply_diff(layers, forged)
    assert result.applied == ["README.md"]
    assert result.skipped == [("run.sh", "changed in the sandbox since the diff was computed")]
    assert (project / "run.sh").exists()


def test_diff_reviewed_then_changed_in_sandbox_is_skipped(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "README.md", "reviewed\n")
    reviewed = compute_diff(layers)
    write(layers.upper / "README.md", "sneaky\n")
    result = apply_diff(layers, reviewed)
    assert result.applied == []
    assert result.skipped == [("README.md", "changed in the sandbox since the diff was computed")]
    assert (project / "README.md").read_text() == "# hi\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_apply_keeps_project_ownership(layers: WorkspaceLayers, project: Path) -> None:
    os.chown(project / "README.md", 1234, 1234)
    os.chown(project / "src", 4321, 4321)
    # Make the chowns part of the baseline, as if the project were always owned that way.
    layers.reset()
    write(layers.upper / "README.md", "x\n")
    copy_dir(layers, "src")
    write(layers.upper / "src" / "new.py", "n\n")
    apply_diff(layers)
    assert os.stat(project / "README.md").st_uid == 1234
    assert os.stat(project / "src" / "new.py").st_uid == 4321


def test_reset_discards_upper_without_following_symlinks(
    layers: WorkspaceLayers, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    write(outside / "precious.txt", "keep\n", 0o444)
    mutate(layers)
    os.symlink(outside, layers.upper / "escape")
    os.symlink(outside / "precious.txt", layers.upper / "escape-file")
    write(layers.upper / "ro" / "sub" / "f", "f\n", 0o400)
    os.chmod(layers.upper / "ro" / "sub", 0o500)
    os.chmod(layers.upper / "ro", 0o000)
    (layers.work / "work").mkdir()
    os.chmod(layers.work / "work", 0o000)
    outside_mode = stat.S_IMODE(os.stat(outside).st_mode)
    old_baseline = layers.baseline_ns
    layers.reset()
    assert layers.exists()
    assert list(layers.upper.iterdir()) == []
    assert list(layers.work.iterdir()) == []
    assert stat.S_IMODE(os.stat(layers.upper).st_mode) == 0o700
    assert (outside / "precious.txt").read_text() == "keep\n"
    assert stat.S_IMODE(os.stat(outside).st_mode) == outside_mode
    assert stat.S_IMODE(os.stat(outside / "precious.txt").st_mode) == 0o444
    assert not compute_diff(layers)
    assert layers.baseline_ns > old_baseline
    assert [p.name for p in layers.upper.parent.iterdir() if "discard" in p.name] == []
