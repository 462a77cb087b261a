"""apply_diff and reset over hand-built layers: atomic writes, escapes, protection, conflicts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from layer_helpers import needs_root, snapshot, whiteout, write
from stockade._errors import WorkspaceConflictError, WorkspaceError
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


def test_apply_everything_then_diff_is_empty(layers: WorkspaceLayers, project: Path) -> None:
    before = snapshot(project)
    mutate(layers)
    diff = compute_diff(layers)
    assert snapshot(project) == before  # diffing never touches the host
    result = apply_diff(layers, diff)
    assert result.skipped == []
    assert set(result.applied) == {c.path for c in diff}
    assert snapshot(project) == expected_after(before)
    assert not compute_diff(layers)
    assert temp_files(project) == []


def test_apply_selected_paths_creates_new_parents(layers: WorkspaceLayers, project: Path) -> None:
    mutate(layers)
    result = apply_diff(layers, paths=["new/pkg/m.py", "./src/a.py"])
    assert result.applied == ["new", "new/pkg", "new/pkg/m.py", "src/a.py"]
    assert (project / "new" / "pkg" / "m.py").read_text() == "m\n"
    assert (project / "README.md").read_text() == "# hi\n"
    remaining = {c.path for c in compute_diff(layers)}
    assert not remaining & {"new", "new/pkg", "new/pkg/m.py", "src/a.py"}
    assert "README.md" in remaining
    # A later apply does not take the first apply's own writes for host edits.
    apply_diff(layers)
    assert not compute_diff(layers)


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


def test_protected_paths_are_skipped_and_refused_by_name(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / ".git" / "config", "[core]\nhooksPath=/tmp/x\n")
    os.chmod(layers.upper / ".git", stat.S_IMODE(os.stat(project / ".git").st_mode))
    write(layers.upper / ".git" / "hooks" / "pre-commit", "#!/bin/sh\nevil\n", 0o755)
    write(layers.upper / "README.md", "ok\n")
    protected = [".git/hooks", ".git/config"]
    result = apply_diff(layers, protected=protected)
    assert result.applied == ["README.md"]
    assert [p for p, _ in result.skipped] == [".git/config", ".git/hooks", ".git/hooks/pre-commit"]
    assert all("protected" in why for _, why in result.skipped)
    assert (project / ".git" / "config").read_text() == "[core]\n"
    assert not (project / ".git" / "hooks").exists()
    with pytest.raises(WorkspaceError, match="protected"):
        apply_diff(layers, paths=[".git/hooks/pre-commit"], protected=protected)
    # A diff computed with a protected list carries the flag to apply.
    flagged = compute_diff(layers, protected=[".git"])
    with pytest.raises(WorkspaceError, match="protected"):
        apply_diff(layers, flagged, paths=[".git/config"])


def test_host_edit_after_baseline_is_a_conflict(layers: WorkspaceLayers, project: Path) -> None:
    mutate(layers)
    write(project / "README.md", "edited on the host\n")
    os.chmod(project / "run.sh", 0o700)
    before = snapshot(project)
    with pytest.raises(WorkspaceConflictError) as info:
        apply_diff(layers)
    assert info.value.paths == ["README.md", "run.sh"]
    assert snapshot(project) == before  # nothing written
    result = apply_diff(layers, force=True)
    assert "README.md" in result.applied
    assert (project / "README.md").read_text() == "# hello\n"
    assert not compute_diff(layers)


def test_host_file_created_or_removed_after_baseline_conflicts(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "brand-new.txt", "sandbox\n")
    copy_dir(layers, "src")
    write(layers.upper / "src" / "a.py", "a = 3\n")
    reviewed = compute_diff(layers)
    write(project / "brand-new.txt", "host\n")
    os.unlink(project / "src" / "a.py")
    with pytest.raises(WorkspaceConflictError) as info:
        apply_diff(layers, reviewed)
    assert info.value.paths == ["brand-new.txt", "src/a.py"]
    assert (project / "brand-new.txt").read_text() == "host\n"
    # Forcing applies what the sandbox holds now: its files win.
    result = apply_diff(layers, reviewed, force=True)
    assert result.applied == ["brand-new.txt", "src/a.py"]
    assert (project / "brand-new.txt").read_text() == "sandbox\n"
    assert (project / "src" / "a.py").read_text() == "a = 3\n"
    assert not compute_diff(layers)


@needs_root
def test_deleted_dir_with_new_host_file(layers: WorkspaceLayers, project: Path) -> None:
    whiteout(layers.upper / "old")
    reviewed = compute_diff(layers)
    write(project / "old" / "added-on-host.txt", "keep me\n")
    # A fresh diff would list the host's new file among the deleted ones: a conflict too.
    with pytest.raises(WorkspaceConflictError) as info:
        apply_diff(layers)
    assert info.value.paths == ["old", "old/added-on-host.txt"]
    with pytest.raises(WorkspaceConflictError) as info:
        apply_diff(layers, reviewed)
    assert info.value.paths == ["old"]
    result = apply_diff(layers, reviewed, force=True)
    assert ("old", "directory holds host entries that are not in the diff") in result.skipped
    assert (project / "old" / "added-on-host.txt").read_text() == "keep me\n"
    assert not (project / "old" / "x.txt").exists()
    assert not (project / "old" / "deep").exists()


def test_failed_replace_leaves_no_temp_and_host_intact(
    layers: WorkspaceLayers, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_dir(layers, "src")
    write(layers.upper / "src" / "a.py", "a = 2\n")
    write(layers.upper / "src" / "b.py", "b = 2\n")
    real_replace = os.replace
    calls: list[str] = []

    def flaky_replace(src: str, dst: str, **kw: int) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(
        WorkspaceError, match=r"apply failed at 'src/b.py'.*already applied: src/a.py"
    ):
        apply_diff(layers)
    monkeypatch.undo()
    assert (project / "src" / "a.py").read_text() == "a = 2\n"
    assert (project / "src" / "b.py").read_text() == "b = 1\n"
    assert temp_files(project) == []
    # The remaining change still applies, and the first write is not taken for a conflict.
    assert apply_diff(layers).applied == ["src/b.py"]


def test_read_only_new_dir_gets_children_then_mode(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "ro" / "f.txt", "f\n", 0o444)
    os.chmod(layers.upper / "ro", 0o555)
    apply_diff(layers)
    assert stat.S_IMODE(os.stat(project / "ro").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(project / "ro" / "f.txt").st_mode) == 0o444
    assert not compute_diff(layers)
    os.chmod(layers.upper / "ro", 0o755)  # let tmp_path cleanup proceed as non-root
    os.chmod(project / "ro", 0o755)


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
