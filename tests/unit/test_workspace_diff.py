"""compute_diff over hand-built overlayfs upper layers (whiteouts, opaque dirs, copy-ups),
against a recorded baseline, with git's patch."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from layer_helpers import needs_root, whiteout, write
from stockade._errors import WorkspaceError
from stockade.workspace import TEXT_PATCH_LIMIT, WorkspaceLayers, compute_diff
from stockade.workspace.baseline import git_blob_id

ZERO = "0" * 40


def opaque(path: Path, namespace: str = "user") -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, f"{namespace}.overlay.opaque", b"y")


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    return lower, upper


def kinds(lower: Path, upper: Path, **kw: object) -> list[tuple[str, str, str]]:
    return [(c.path, c.kind, c.type) for c in compute_diff(lower, upper, **kw)]  # type: ignore[arg-type]


def test_empty_upper_is_no_change(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "a.txt", "a\n")
    diff = compute_diff(lower, upper)
    assert not diff
    assert len(diff) == 0
    assert diff.summary() == "no changes"
    assert diff.patch() == ""


def test_added_file_and_dirs(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(upper / "new.txt", "hello\n")
    (upper / "empty").mkdir()
    write(upper / "pkg" / "deep" / "m.py", "x = 1\n", 0o755)
    assert kinds(lower, upper) == [
        ("empty", "added", "dir"),
        ("new.txt", "added", "file"),
        ("pkg", "added", "dir"),
        ("pkg/deep", "added", "dir"),
        ("pkg/deep/m.py", "added", "file"),
    ]
    diff = compute_diff(lower, upper)
    m = next(c for c in diff if c.path == "pkg/deep/m.py")
    assert m.new_mode == 0o755 and m.old_mode is None
    assert m.new_sha256 is not None and m.old_sha256 is None
    assert m.size == 6 and not m.binary
    assert m.new_oid == git_blob_id(b"x = 1\n")
    assert m.patch() == (
        "diff --git a/pkg/deep/m.py b/pkg/deep/m.py\n"
        "new file mode 100755\n"
        f"index {ZERO}..{m.new_oid}\n"
        "--- /dev/null\n"
        "+++ b/pkg/deep/m.py\n"
        "@@ -0,0 +1 @@\n"
        "+x = 1\n"
    )
    assert diff.summary() == "5 added, 0 modified, 0 deleted"


def test_modified_content_patch(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "src" / "a.py", "one\ntwo\nthree\n")
    write(upper / "src" / "a.py", "one\n2\nthree")
    diff = compute_diff(lower, upper)
    assert [(c.path, c.kind) for c in diff] == [("src/a.py", "modified")]
    change = diff.changes[0]
    assert change.content_changed and not change.mode_changed
    assert change.old_sha256 != change.new_sha256
    assert change.patch() == (
        "diff --git a/src/a.py b/src/a.py\n"
        f"index {change.old_oid}..{change.new_oid} 100644\n"
        "--- a/src/a.py\n"
        "+++ b/src/a.py\n"
        "@@ -1,3 +1,3 @@\n"
        " one\n"
        "-two\n"
        "-three\n"
        "+2\n"
        "+three\n"
        "\\ No newline at end of file\n"
    )


def test_copy_up_touch_only_and_container_dirs_are_not_changes(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "d" / "same.txt", "same\n")
    write(lower / "d" / "touched.txt", "t\n")
    write(upper / "d" / "same.txt", "same\n")
    write(upper / "d" / "touched.txt", "t\n")
    os.utime(upper / "d" / "touched.txt", (1, 1))
    os.chmod(upper / "d", stat.S_IMODE(os.stat(lower / "d").st_mode))
    assert kinds(lower, upper) == []


def test_chmod_only_is_a_mode_change(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "run.sh", "#!/bin/sh\n", 0o644)
    write(upper / "run.sh", "#!/bin/sh\n", 0o755)
    write(lower / "private.txt", "p\n", 0o644)
    write(upper / "private.txt", "p\n", 0o600)  # git does not see this
    (lower / "d").mkdir(mode=0o755)
    (upper / "d").mkdir()
    os.chmod(upper / "d", 0o700)  # nor directory modes
    diff = compute_diff(lower, upper)
    assert [(c.path, c.kind, c.type) for c in diff] == [("run.sh", "modified", "file")]
    run = diff.changes[0]
    assert run.mode_changed and not run.content_changed
    assert (run.old_mode, run.new_mode) == (0o644, 0o755)
    assert run.patch() == ("diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n")


def test_setuid_bits_are_not_carried(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "tool", "bin", 0o755)
    write(upper / "tool", "bin", 0o4755)
    assert kinds(lower, upper) == []


@needs_root
def test_whiteout_of_file_and_of_directory(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "gone.txt", "bye\n")
    write(lower / "olddir" / "a.txt", "a\n")
    write(lower / "olddir" / "sub" / "b.bin", b"\0\1")
    os.symlink("a.txt", lower / "olddir" / "link")
    whiteout(upper / "gone.txt")
    whiteout(upper / "olddir")
    whiteout(upper / "never-existed")  # stale whiteout: nothing to delete
    assert kinds(lower, upper) == [
        ("gone.txt", "deleted", "file"),
        ("olddir", "deleted", "dir"),
        ("olddir/a.txt", "deleted", "file"),
        ("olddir/link", "deleted", "symlink"),
        ("olddir/sub", "deleted", "dir"),
        ("olddir/sub/b.bin", "deleted", "file"),
    ]
    diff = compute_diff(lower, upper)
    gone = diff.changes[0]
    assert gone.old_sha256 is not None and gone.new_sha256 is None
    assert gone.patch().endswith("--- a/gone.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n")
    assert diff.summary() == "0 added, 0 modified, 6 deleted"


@pytest.mark.parametrize("namespace", ["user", "trusted"])
def test_opaque_dir_hides_lower_unless_readded(trees: tuple[Path, Path], namespace: str) -> None:
    if namespace == "trusted" and os.geteuid() != 0:
        pytest.skip("trusted.* xattrs need CAP_SYS_ADMIN")
    lower, upper = trees
    write(lower / "build" / "keep.txt", "k\n")
    write(lower / "build" / "changed.txt", "old\n")
    write(lower / "build" / "stale.txt", "s\n")
    write(lower / "build" / "obj" / "x.o", b"\0obj")
    opaque(upper / "build", namespace)
    write(upper / "build" / "keep.txt", "k\n")
    write(upper / "build" / "changed.txt", "new\n")
    write(upper / "build" / "fresh.txt", "f\n")
    assert kinds(lower, upper) == [
        ("build/changed.txt", "modified", "file"),
        ("build/fresh.txt", "added", "file"),
        ("build/obj", "deleted", "dir"),
        ("build/obj/x.o", "deleted", "file"),
        ("build/stale.txt", "deleted", "file"),
    ]


def test_opaque_propagates_to_subdirectories(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "d" / "sub" / "old.txt", "o\n")
    opaque(upper / "d")
    (upper / "d" / "sub").mkdir()  # recreated after rm -r: not marked opaque itself
    assert kinds(lower, upper) == [("d/sub/old.txt", "deleted", "file")]


def test_symlinks_added_modified_deleted(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    os.symlink("target-a", lower / "changed")
    os.symlink("same", lower / "same")
    os.symlink("x", lower / "removed")
    os.symlink("target-b", upper / "changed")
    os.symlink("same", upper / "same")
    os.symlink("/etc", upper / "new")  # never followed
    if os.geteuid() == 0:
        whiteout(upper / "removed")
    diff = compute_diff(lower, upper)
    by_path = {c.path: c for c in diff}
    assert by_path["changed"].kind == "modified"
    assert (by_path["changed"].old_target, by_path["changed"].new_target) == (
        "target-a",
        "target-b",
    )
    assert by_path["new"].kind == "added" and by_path["new"].type == "symlink"
    assert by_path["new"].new_mode is None
    assert "same" not in by_path
    changed = by_path["changed"]
    assert changed.patch() == (
        "diff --git a/changed b/changed\n"
        f"index {changed.old_oid}..{changed.new_oid} 120000\n"
        "--- a/changed\n+++ b/changed\n"
        "@@ -1 +1 @@\n"
        "-target-a\n\\ No newline at end of file\n"
        "+target-b\n\\ No newline at end of file\n"
    )
    assert "new file mode 120000\n" in by_path["new"].patch()
    if os.geteuid() == 0:
        assert by_path["removed"].kind == "deleted"
        assert by_path["removed"].old_target == "x"


def test_symlinked_dir_in_upper_is_not_walked(trees: tuple[Path, Path], tmp_path: Path) -> None:
    lower, upper = trees
    outside = tmp_path / "outside"
    write(outside / "secret", "s\n")
    os.symlink(outside, upper / "escape")
    assert kinds(lower, upper) == [("escape", "added", "symlink")]


def test_binary_and_large_files_patch_with_hashes(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "img.png", b"\x89PNG\0\0old")
    write(upper / "img.png", b"\x89PNG\0\0new")
    write(upper / "latin1.txt", "caf\xe9\n".encode("latin-1"))
    write(upper / "big.txt", b"line\n" * (TEXT_PATCH_LIMIT // 5 + 10))
    diff = compute_diff(lower, upper)
    by_path = {c.path: c for c in diff}
    img = by_path["img.png"]
    assert img.binary and img.kind == "modified"
    assert img.old_sha256 != img.new_sha256
    assert f"index {img.old_oid}..{img.new_oid} 100644\nGIT binary patch\n" in img.patch()
    assert by_path["latin1.txt"].binary
    big = by_path["big.txt"]
    assert not big.binary and big.size > TEXT_PATCH_LIMIT
    assert big.patch().count("\n+line") == TEXT_PATCH_LIMIT // 5 + 10


@needs_root
def test_rename_is_delete_plus_add(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "src" / "a.py", "code\n")
    (upper / "src").mkdir()
    os.chmod(upper / "src", stat.S_IMODE(os.stat(lower / "src").st_mode))
    whiteout(upper / "src" / "a.py")
    write(upper / "src" / "b.py", "code\n")
    assert kinds(lower, upper) == [
        ("src/a.py", "deleted", "file"),
        ("src/b.py", "added", "file"),
    ]


def test_type_changes_are_delete_plus_add(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "was_file", "f\n")
    write(lower / "was_dir" / "inner.txt", "i\n")
    os.symlink("t", lower / "was_link")
    opaque(upper / "was_file")  # overlay marks a dir created over a whiteout opaque
    write(upper / "was_file" / "child.txt", "c\n")
    write(upper / "was_dir", "now a file\n")
    write(upper / "was_link", "now a file\n")
    assert kinds(lower, upper) == [
        ("was_dir", "deleted", "dir"),
        ("was_dir", "added", "file"),
        ("was_dir/inner.txt", "deleted", "file"),
        ("was_file", "deleted", "file"),
        ("was_file", "added", "dir"),
        ("was_file/child.txt", "added", "file"),
        ("was_link", "deleted", "symlink"),
        ("was_link", "added", "file"),
    ]


def test_protected_flag(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "ci" / "config.yml", "a\n")
    write(upper / "ci" / "config.yml", "b\n")
    write(upper / "ci" / "hooks" / "pre", "#!/bin/sh\n", 0o755)
    write(upper / "stockade.toml", "x\n")
    write(upper / ".gitignore", "x\n")
    diff = compute_diff(lower, upper, protected=["./ci/hooks/", "stockade.toml"])
    flags = {c.path: c.protected for c in diff}
    assert flags == {
        ".gitignore": False,
        "ci/config.yml": False,
        "ci/hooks": True,
        "ci/hooks/pre": True,
        "stockade.toml": True,
    }


def test_special_files_are_ignored_not_applied(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(lower / "pipe", "was a file\n")
    os.mkfifo(upper / "pipe")
    os.mkfifo(upper / "newpipe")
    diff = compute_diff(lower, upper)
    assert [(c.path, c.kind) for c in diff] == [("pipe", "deleted")]
    assert diff.ignored == [
        ("newpipe", "unsupported file type fifo"),
        ("pipe", "unsupported file type fifo"),
    ]


def test_redirect_xattr_is_refused(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    (upper / "moved").mkdir()
    os.setxattr(upper / "moved", "user.overlay.redirect", b"/orig")
    with pytest.raises(WorkspaceError, match="redirect"):
        compute_diff(lower, upper)


def test_missing_upper_is_a_workspace_error(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="upper layer"):
        compute_diff(tmp_path, tmp_path / "nope")


def test_to_dict_is_json_and_layers_overload(tmp_path: Path) -> None:
    lower = tmp_path / "project"
    write(lower / "a.txt", "a\n")
    layers = WorkspaceLayers.create(tmp_path / "state", lower)
    write(layers.upper / "a.txt", "b\n", 0o600)
    write(layers.upper / "n.bin", b"\0")
    diff = compute_diff(layers)
    data = json.loads(json.dumps(diff.to_dict(include_patch=True)))
    assert data["summary"] == {
        "added": 1,
        "modified": 1,
        "deleted": 0,
        "ignored_paths": 0,
        "commits": 0,
    }
    a = data["changes"][0]
    assert a["path"] == "a.txt" and a["old_mode"] == "0644" and a["new_mode"] == "0644"
    assert a["old_oid"] == git_blob_id(b"a\n") and a["new_oid"] == git_blob_id(b"b\n")
    assert a["patch"].startswith("diff --git a/a.txt b/a.txt\nindex ")
    assert data["patch"] == diff.patch()
    assert [c.path for c in diff.added] == ["n.bin"]
    assert [c.path for c in diff.modified] == ["a.txt"]
    assert diff.deleted == []


def test_patch_notices_content_changed_after_diff(trees: tuple[Path, Path]) -> None:
    lower, upper = trees
    write(upper / "f.txt", "one\n")
    diff = compute_diff(lower, upper)
    write(upper / "f.txt", "two\n")
    with pytest.raises(WorkspaceError, match="changed in the sandbox since the diff was taken"):
        diff.patch()
