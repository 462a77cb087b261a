"""apply_diff over hand-built layers: conflicts judged by content against the baseline,
three-way merges, held-back host configuration and escaping symlinks, odd names, reset."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from layer_helpers import needs_root, snapshot, whiteout, write
from stockade._errors import WorkspaceConflictError, WorkspaceError
from stockade.workspace import FileChange, WorkspaceDiff, WorkspaceLayers, apply_diff, compute_diff
from stockade.workspace import apply as apply_mod
from stockade.workspace.apply import host_config_reason, leaves_project
from stockade.workspace.baseline import git_blob_id

pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
    reason="git is not installed (the baseline and merges use it)",
)

TEXT = "".join(f"line {i}\n" for i in range(1, 21))


def copy_dir(layers: WorkspaceLayers, rel: str) -> Path:
    """An upper directory that exists only because of copy-up (same mode as lower)."""
    path = layers.upper / rel
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, stat.S_IMODE(os.stat(layers.lower / rel).st_mode))
    return path


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".stockade-*")]


def edit(text: str, line: int, new: str) -> str:
    lines = text.splitlines(keepends=True)
    lines[line - 1] = new + "\n"
    return "".join(lines)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    lower = tmp_path / "project"
    write(lower / "README.md", "# hi\n")
    write(lower / "src" / "a.py", "a = 1\n")
    write(lower / "src" / "b.py", "b = 1\n")
    write(lower / "notes.txt", TEXT)
    write(lower / "old" / "x.txt", "x\n")
    write(lower / "old" / "deep" / "y.txt", "y\n")
    write(lower / "run.sh", "#!/bin/sh\n")
    write(lower / "blob.bin", b"\0\1\2")
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
    write(up / "new.bin", b"\0\1\2\3")
    if os.geteuid() == 0:
        whiteout(up / "old")
        whiteout(up / "src" / "b.py")


def expected_after(before: dict[str, tuple[str, int, bytes | str | None]]) -> dict[str, object]:
    exp: dict[str, object] = dict(before)
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
    exp["new.bin"] = ("file", 0o644, b"\0\1\2\3")
    if os.geteuid() == 0:
        for gone in ("old", "old/x.txt", "old/deep", "old/deep/y.txt", "src/b.py"):
            del exp[gone]
    return exp


# --- applying -----------------------------------------------------------------------------


def test_apply_everything_then_diff_is_empty(layers: WorkspaceLayers, project: Path) -> None:
    before = snapshot(project)
    mutate(layers)
    diff = compute_diff(layers)
    assert snapshot(project) == before  # diffing never touches the host
    result = apply_diff(layers, diff)
    assert (result.skipped, result.conflicts, result.held, result.merged) == ([], [], [], [])
    assert set(result.applied) == {c.path for c in diff}
    assert snapshot(project) == expected_after(before)
    assert temp_files(project) == []
    # What the host now holds is what the sandbox has: nothing left to do.
    again = apply_diff(layers)
    assert again.applied == [] and again.conflicts == []
    assert not again
    assert {why for _, why in again.skipped} <= {"the host already has the sandbox's version"}


def test_apply_selected_paths_creates_new_parents(layers: WorkspaceLayers, project: Path) -> None:
    mutate(layers)
    result = apply_diff(layers, paths=["new/pkg/m.py", "./src/a.py"])
    assert result.applied == ["new", "new/pkg", "new/pkg/m.py", "src/a.py"]
    assert (project / "new" / "pkg" / "m.py").read_text() == "m\n"
    assert (project / "README.md").read_text() == "# hi\n"
    # The rest still applies, with the first apply's own writes taken for what they are.
    second = apply_diff(layers)
    assert "README.md" in second.applied and second.conflicts == []
    assert (project / "README.md").read_text() == "# hello\n"


def test_apply_advances_the_baseline(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "README.md", "# sandbox\n")
    os.symlink("/etc/passwd", layers.upper / "passwd")
    assert apply_diff(layers, paths=["README.md"]).applied == ["README.md"]
    entry = layers.baseline.entry("README.md")
    assert entry is not None and entry.oid == git_blob_id(b"# sandbox\n")
    assert layers.baseline.entry("passwd") is None  # held back: not applied, not advanced
    # The host's README is what apply wrote, not a host edit: a new change applies cleanly.
    write(layers.upper / "README.md", "# sandbox, again\n")
    again = apply_diff(layers, paths=["README.md"])
    assert (again.applied, again.conflicts) == (["README.md"], [])
    assert (project / "README.md").read_text() == "# sandbox, again\n"


def test_ignored_paths_apply_only_when_included(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / ".gitignore", "*.log\n")
    write(layers.upper / "debug.log", "junk\n")
    assert apply_diff(layers).applied == [".gitignore"]
    assert not (project / "debug.log").exists()
    assert apply_diff(layers, include_ignored=True).applied == ["debug.log"]
    assert (project / "debug.log").read_text() == "junk\n"


def test_paths_naming_nothing_is_an_error(layers: WorkspaceLayers) -> None:
    mutate(layers)
    with pytest.raises(WorkspaceError, match="no change at 'nothing/here'"):
        apply_diff(layers, paths=["nothing/here"])


def test_conflicts_mode_is_checked(layers: WorkspaceLayers) -> None:
    with pytest.raises(ValueError, match="'skip' or 'markers'"):
        apply_diff(layers, conflicts="theirs")  # type: ignore[arg-type]


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
    assert (project / ".git" / "config").read_text() == "[core]\n"
    assert not (project / ".git" / "hooks").exists()
    with pytest.raises(WorkspaceError, match="protected"):
        apply_diff(layers, paths=[".git/hooks/pre-commit"], protected=protected)


# --- conflicts by content -----------------------------------------------------------------


def test_touch_and_chmod_on_the_host_are_no_conflict(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "README.md", "# sandbox\n")
    os.utime(project / "README.md", (1, 1))
    (project / "README.md").write_text("# hi\n")  # rewritten with the same bytes
    write(layers.upper / "notes.txt", edit(TEXT, 3, "sandbox 3"))
    os.chmod(project / "notes.txt", 0o600)
    result = apply_diff(layers)
    assert result.conflicts == []
    assert result.applied == ["README.md", "notes.txt"]
    assert (project / "README.md").read_text() == "# sandbox\n"
    # The host's chmod survives: the sandbox did not touch the executable bit.
    assert stat.S_IMODE(os.stat(project / "notes.txt").st_mode) == 0o600


def test_text_changed_on_both_sides_in_other_regions_merges(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "notes.txt", edit(TEXT, 2, "sandbox 2"))
    (project / "notes.txt").write_text(edit(TEXT, 18, "host 18"))
    result = apply_diff(layers)
    assert result.merged == ["notes.txt"]
    assert result.applied == [] and result.conflicts == []
    assert (project / "notes.txt").read_text() == edit(edit(TEXT, 2, "sandbox 2"), 18, "host 18")
    assert temp_files(layers.upper.parent) == []
    assert [p.name for p in layers.upper.parent.iterdir() if p.name.startswith("merge-")] == []
    # The baseline moved past the sandbox's change: nothing left to apply or merge.
    assert not compute_diff(layers)
    again = apply_diff(layers)
    assert (again.merged, again.conflicts, again.skipped) == ([], [], [])


def test_after_a_merge_later_sandbox_changes_keep_the_host_edit(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "notes.txt", edit(TEXT, 2, "sandbox 2"))
    (project / "notes.txt").write_text(edit(TEXT, 18, "host 18"))
    assert apply_diff(layers).merged == ["notes.txt"]
    write(layers.upper / "notes.txt", edit(edit(TEXT, 2, "sandbox 2"), 10, "sandbox 10"))
    second = apply_diff(layers)
    assert (second.merged, second.conflicts) == (["notes.txt"], [])
    expected = edit(edit(edit(TEXT, 2, "sandbox 2"), 10, "sandbox 10"), 18, "host 18")
    assert (project / "notes.txt").read_text() == expected


def test_same_region_conflict_is_left_unapplied_by_default(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "notes.txt", edit(TEXT, 5, "sandbox 5"))
    write(layers.upper / "README.md", "# sandbox\n")
    host_text = edit(TEXT, 5, "host 5")
    (project / "notes.txt").write_text(host_text)
    result = apply_diff(layers)
    assert [(c.path, c.reason, c.kind, c.written) for c in result.conflicts] == [
        ("notes.txt", "changed on the host and in the sandbox", "text", False)
    ]
    assert result.applied == ["README.md"]  # the rest still lands
    assert (project / "notes.txt").read_text() == host_text
    assert result.summary() == (
        "1 applied, 0 merged, 1 conflict: notes.txt (changed on the host and in the sandbox)"
    )


def test_same_region_conflict_with_markers(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "notes.txt", edit(TEXT, 5, "sandbox 5"))
    (project / "notes.txt").write_text(edit(TEXT, 5, "host 5"))
    result = apply_diff(layers, conflicts="markers")
    assert [(c.path, c.written) for c in result.conflicts] == [("notes.txt", True)]
    assert "conflict markers" in result.conflicts[0].reason
    text = (project / "notes.txt").read_text()
    assert "<<<<<<< host\nhost 5\n=======\nsandbox 5\n>>>>>>> sandbox\n" in text
    assert text.startswith("line 1\n") and text.endswith("line 20\n")
    assert result.written == ["notes.txt"]


def test_force_overwrites_a_text_conflict_with_the_sandbox_version(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "notes.txt", edit(TEXT, 5, "sandbox 5"))
    (project / "notes.txt").write_text(edit(TEXT, 5, "host 5"))
    result = apply_diff(layers, force=True)
    assert result.conflicts == []
    assert result.overwritten == ["notes.txt"]
    assert (project / "notes.txt").read_text() == edit(TEXT, 5, "sandbox 5")


def test_binary_changed_on_both_sides_is_a_conflict(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "blob.bin", b"\0sandbox")
    write(project / "blob.bin", b"\0host")
    result = apply_diff(layers)
    assert [(c.path, c.kind) for c in result.conflicts] == [("blob.bin", "binary")]
    assert "binary" in result.conflicts[0].reason
    assert (project / "blob.bin").read_bytes() == b"\0host"
    # markers cannot apply to a binary file: still left unapplied.
    assert apply_diff(layers, conflicts="markers").conflicts[0].written is False
    assert (project / "blob.bin").read_bytes() == b"\0host"
    assert apply_diff(layers, force=True).overwritten == ["blob.bin"]
    assert (project / "blob.bin").read_bytes() == b"\0sandbox"


@needs_root
def test_delete_against_modify_is_a_conflict(layers: WorkspaceLayers, project: Path) -> None:
    copy_dir(layers, "src")
    whiteout(layers.upper / "src" / "b.py")
    write(layers.upper / "README.md", "# sandbox\n")
    (project / "src" / "b.py").write_text("b = 'host'\n")
    os.unlink(project / "README.md")
    result = apply_diff(layers)
    reasons = {c.path: (c.kind, c.reason) for c in result.conflicts}
    assert reasons["src/b.py"][0] == "delete"
    assert reasons["src/b.py"][1].startswith("changed on the host, deleted in the sandbox")
    assert reasons["README.md"] == ("delete", "deleted on the host, changed in the sandbox")
    assert (project / "src" / "b.py").read_text() == "b = 'host'\n"
    assert not (project / "README.md").exists()


def test_type_change_on_the_host_is_a_conflict(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "README.md", "# sandbox\n")
    os.unlink(project / "README.md")
    os.symlink("notes.txt", project / "README.md")
    result = apply_diff(layers)
    assert [(c.path, c.kind, c.reason) for c in result.conflicts] == [
        ("README.md", "type", "a symlink on the host, a file in the sandbox")
    ]
    assert os.readlink(project / "README.md") == "notes.txt"


def test_type_changes_in_the_sandbox_apply(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "README.md" / "x", "now a directory\n")  # file -> directory
    write(layers.upper / "old", "now a file\n")  # directory (with a subtree) -> file
    result = apply_diff(layers)
    assert result.conflicts == [] and result.skipped == []
    assert (project / "README.md" / "x").read_text() == "now a directory\n"
    assert (project / "old").read_text() == "now a file\n"
    assert temp_files(project) == []


def test_directory_replaced_by_a_file_keeps_host_additions(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(layers.upper / "old", "now a file\n")
    write(project / "old" / "added-on-host.txt", "keep me\n")
    result = apply_diff(layers)
    assert (
        "old",
        "the host keeps old/added-on-host.txt in it, which the sandbox did not delete",
    ) in [(c.path, c.reason) for c in result.conflicts]
    assert (project / "old" / "added-on-host.txt").read_text() == "keep me\n"
    assert (project / "old" / "x.txt").read_text() == "x\n"  # the directory stays whole


def test_added_on_both_sides(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "same.txt", "same\n")
    write(project / "same.txt", "same\n")
    write(layers.upper / "both.txt", "sandbox\n")
    write(project / "both.txt", "host\n")
    result = apply_diff(layers)
    assert result.skipped == [("same.txt", "the host already has the sandbox's version")]
    assert [(c.path, c.reason) for c in result.conflicts] == [
        ("both.txt", "added on the host and in the sandbox")
    ]
    assert (project / "both.txt").read_text() == "host\n"


def test_host_change_between_planning_and_writing_aborts_everything(
    layers: WorkspaceLayers, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(layers.upper / "README.md", "# sandbox\n")
    write(layers.upper / "notes.txt", edit(TEXT, 1, "sandbox 1"))
    real = apply_mod._Planner.ordered_ops

    def racing(self: apply_mod._Planner) -> list[apply_mod.Op]:
        ops = real(self)
        (project / "notes.txt").write_text("edited by the host meanwhile\n")
        return ops

    monkeypatch.setattr(apply_mod._Planner, "ordered_ops", racing)
    with pytest.raises(WorkspaceConflictError, match="apply again") as info:
        apply_diff(layers)
    assert info.value.paths == ["notes.txt"]
    assert (project / "README.md").read_text() == "# hi\n"
    assert (project / "notes.txt").read_text() == "edited by the host meanwhile\n"


@needs_root
def test_deleted_dir_keeps_what_the_host_added(layers: WorkspaceLayers, project: Path) -> None:
    whiteout(layers.upper / "old")
    write(project / "old" / "added-on-host.txt", "keep me\n")
    result = apply_diff(layers)
    assert (
        "old",
        "the host keeps old/added-on-host.txt in it, which the sandbox did not delete",
    ) in (result.skipped)
    assert (project / "old" / "added-on-host.txt").read_text() == "keep me\n"
    assert not (project / "old" / "x.txt").exists()
    assert not (project / "old" / "deep").exists()


# --- held back: symlinks leaving the project, host configuration ----------------------------


@pytest.mark.parametrize(
    ("path", "target", "leaves"),
    [
        ("l", "/etc/passwd", True),
        ("l", "../x", True),
        ("a/b/l", "../../x", False),
        ("a/b/l", "../../../etc/shadow", True),
        ("a/l", "b/../../x", False),
        ("a/l", "../../x/../a", True),
        ("l", "src/a.py", False),
        ("l", "./.", False),
    ],
)
def test_leaves_project(path: str, target: str, leaves: bool) -> None:
    assert leaves_project(path, target) is leaves


@pytest.mark.parametrize(
    ("path", "held"),
    [
        ("stockade.toml", True),
        ("sub/pyproject.toml", True),
        (".envrc", True),
        (".env", True),
        (".env.local", True),
        (".github/workflows/ci.yml", True),
        (".gitlab-ci.yml", True),
        (".circleci/config.yml", True),
        (".pre-commit-config.yaml", True),
        (".vscode/tasks.json", True),
        (".idea/workspace.xml", True),
        (".devcontainer/devcontainer.json", True),
        (".GitHub/workflows/x.yml", True),
        ("Makefile", False),
        (".gitignore", False),
        (".gitattributes", False),
        ("src/env.py", False),
        ("docs/github.md", False),
    ],
)
def test_host_config_reason(path: str, held: bool) -> None:
    assert (host_config_reason(path) is not None) is held


def test_symlinks_leaving_the_project_are_held_until_named(
    layers: WorkspaceLayers, project: Path
) -> None:
    os.symlink("/etc/passwd", layers.upper / "passwd")
    os.symlink("../../etc/shadow", layers.upper / "shadow")
    os.symlink("notes.txt", layers.upper / "inside")
    result = apply_diff(layers)
    assert result.applied == ["inside"]
    assert [p for p, _ in result.held] == ["passwd", "shadow"]
    assert all("outside the project" in why for _, why in result.held)
    assert not os.path.lexists(project / "passwd")
    assert not os.path.lexists(project / "shadow")
    assert "2 held back until named in paths: passwd, shadow" in result.summary()
    named = apply_diff(layers, paths=["passwd"])
    assert named.applied == ["passwd"]
    assert os.readlink(project / "passwd") == "/etc/passwd"
    assert not os.path.lexists(project / "shadow")


def test_host_config_files_are_held_until_named(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "stockade.toml", 'backend = "host"\n')
    write(layers.upper / ".github" / "workflows" / "ci.yml", "on: push\n")
    write(layers.upper / ".env.local", "TOKEN=x\n")
    write(layers.upper / ".vscode" / "tasks.json", "{}\n")
    write(layers.upper / ".gitignore", "*.log\n")
    write(layers.upper / "Makefile", "all:\n")
    result = apply_diff(layers)
    assert result.applied == [".gitignore", "Makefile"]
    assert [p for p, _ in result.held] == [  # their new directories are held, not listed
        ".env.local",
        ".github/workflows/ci.yml",
        ".vscode/tasks.json",
        "stockade.toml",
    ]
    assert all("configures a tool on the host" in why for _, why in result.held)
    assert not (project / "stockade.toml").exists()
    assert not (project / ".github").exists()
    one = apply_diff(layers, paths=[".vscode/tasks.json"])  # brings its new directory
    assert one.applied == [".vscode", ".vscode/tasks.json"]
    assert (project / ".vscode" / "tasks.json").read_text() == "{}\n"
    named = apply_diff(layers, paths=["stockade.toml", ".github"])
    assert named.applied == [
        ".github",
        ".github/workflows",
        ".github/workflows/ci.yml",
        "stockade.toml",
    ]
    assert (project / "stockade.toml").read_text() == 'backend = "host"\n'
    assert any("stockade.toml" in w and "named explicitly" in w for w in named.warnings)
    assert len(named.warnings) == 2  # one per file, none for the directories
    assert not (project / ".env.local").exists()


# --- names that are not valid UTF-8 ---------------------------------------------------------


def test_invalid_utf8_names_apply_and_encode_safely(layers: WorkspaceLayers, project: Path) -> None:
    raw = os.fsencode(layers.upper) + b"/bad\xff\x1b[31m.txt"
    with open(raw, "wb") as fh:
        fh.write(b"odd\n")
    name = os.fsdecode(b"bad\xff\x1b[31m.txt")
    write(layers.upper / "notes.txt", edit(TEXT, 5, "sandbox 5"))
    (project / "notes.txt").write_text(edit(TEXT, 5, "host 5"))
    result = apply_diff(layers)
    assert result.applied == [name]
    with open(os.fsencode(project) + b"/bad\xff\x1b[31m.txt", "rb") as fh:
        assert fh.read() == b"odd\n"
    details = result.audit_details()
    json.dumps(details, ensure_ascii=False).encode("utf-8")  # what the audit log does
    assert details["applied"] == ["bad\\xff\x1b[31m.txt"]
    assert details["conflicts"][0]["path"] == "notes.txt"
    json.dumps(result.to_dict(), ensure_ascii=False).encode("utf-8")
    assert "\x1b" not in result.summary() and "\udcff" not in result.summary()
    # Through the baseline too: the applied name is no change any more.
    assert [c.path for c in compute_diff(layers)] == ["notes.txt"]


# --- reset ----------------------------------------------------------------------------------


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
    layers.reset()
    assert layers.exists()
    assert list(layers.upper.iterdir()) == []
    assert list(layers.work.iterdir()) == []
    assert stat.S_IMODE(os.stat(layers.upper).st_mode) == 0o700
    assert (outside / "precious.txt").read_text() == "keep\n"
    assert stat.S_IMODE(os.stat(outside).st_mode) == outside_mode
    assert stat.S_IMODE(os.stat(outside / "precious.txt").st_mode) == 0o444
    assert not compute_diff(layers)
    assert [p.name for p in layers.upper.parent.iterdir() if "discard" in p.name] == []


def test_read_only_new_dir_gets_children_then_mode(layers: WorkspaceLayers, project: Path) -> None:
    write(layers.upper / "ro" / "f.txt", "f\n", 0o444)
    os.chmod(layers.upper / "ro", 0o555)
    apply_diff(layers)
    assert stat.S_IMODE(os.stat(project / "ro").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(project / "ro" / "f.txt").st_mode) == 0o444
    os.chmod(layers.upper / "ro", 0o755)  # let tmp_path cleanup proceed as non-root
    os.chmod(project / "ro", 0o755)
