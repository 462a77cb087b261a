"""The diff against the git baseline: .git excluded, .gitignore honoured, a patch git applies."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from layer_helpers import needs_root, snapshot, whiteout, write
from sandbox_helpers import git
from stockade.workspace import WorkspaceLayers, compute_diff
from stockade.workspace.gitignore import is_ignored, parse_ignore

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q")
    write(root / ".gitignore", ".venv/\n__pycache__/\n*.log\n")
    write(root / "README.md", "hello\n")
    write(root / "src" / "a.py", "".join(f"line {i}\n" for i in range(40)))
    write(root / "src" / "old" / "x.txt", "x\n")
    write(root / "src" / "old" / "y.txt", "y\n")
    write(root / "run.sh", "#!/bin/sh\n")
    write(root / "image.bin", bytes(range(256)) * 4)
    os.symlink("README.md", root / "link")
    write(root / "logs" / "keep.log", "tracked although ignored\n")
    git(root, "add", "-A")
    git(root, "add", "-f", "logs/keep.log")
    git(root, "commit", "-qm", "init")
    return root


@pytest.fixture
def layers(tmp_path: Path, project: Path) -> WorkspaceLayers:
    return WorkspaceLayers.create(tmp_path / "state", project)


def sandbox_view(lower: Path, upper: Path, dest: Path) -> None:
    """What the sandbox sees (lower overlaid by upper), for comparing with an applied patch."""
    shutil.copytree(lower, dest, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(upper):
        rel = Path(dirpath).relative_to(upper)
        for name in dirnames + filenames:
            src = Path(dirpath) / name
            dst = dest / rel / name
            st = os.lstat(src)
            if os.path.isdir(dst) and not os.path.islink(dst) and not src.is_dir():
                shutil.rmtree(dst)
            elif os.path.lexists(dst) and not (src.is_dir() and not src.is_symlink()):
                os.unlink(dst)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                dst.mkdir(exist_ok=True)
            elif (st.st_mode & 0o170000) == 0o020000:
                pass  # whiteout: removed above
            else:
                shutil.copy2(src, dst)


def agent_changes(upper: Path) -> None:
    write(upper / "src" / "a.py", "".join(f"line {i}\n" for i in range(40) if i != 7) + "end\n")
    write(upper / "run.sh", "#!/bin/sh\n", 0o755)
    write(upper / "image.bin", bytes(range(255, -1, -1)) * 4)
    write(upper / "pkg" / "sub" / "m.py", "x = 1\n")
    write(upper / "pkg" / "sub" / "n.py", "y = 2\n")
    write(upper / "name with spaces.txt", "s\n")
    write(upper / "ünïcode-名前.txt", "u\n")
    write(upper / 'quote"back\\slash.txt', "q\n")
    write(upper / os.fsdecode(b"bad-\xff.txt"), "b\n")
    os.symlink("src/a.py", upper / "newlink")
    (upper / "empty-dir").mkdir()
    write(upper / ".venv" / "lib" / "site.py", "junk\n")
    write(upper / "src" / "__pycache__" / "a.cpython-311.pyc", b"\0junk")
    write(upper / "debug.log", "junk\n")
    write(upper / "logs" / "keep.log", "tracked and changed\n")
    write(upper / ".git" / "refs" / "heads" / "master", "0" * 40 + "\n")
    write(upper / ".git" / "index", b"DIRC junk")


@needs_root
def test_patch_applies_to_the_host_and_reproduces_the_sandbox(
    tmp_path: Path, layers: WorkspaceLayers, project: Path
) -> None:
    upper = layers.upper
    agent_changes(upper)
    whiteout(upper / "src" / "old")  # a deleted directory with files
    whiteout(upper / "README.md")
    write(upper / "README.renamed.md", "hello\n")  # a rename
    diff = compute_diff(layers)
    paths = {(c.path, c.kind) for c in diff}
    assert not any(p.startswith(".git") or "/.git" in p for p, _ in paths)
    assert not any(".venv" in p or "__pycache__" in p or p == "debug.log" for p, _ in paths)
    assert ("logs/keep.log", "modified") in paths  # in the baseline: never ignored
    assert ("src/old", "deleted") in paths and ("src/old/x.txt", "deleted") in paths
    assert diff.empty_dirs == ["empty-dir"]
    assert sorted(diff.ignored_paths) == [".venv", "debug.log", "src/__pycache__"]

    patch = diff.patch_bytes()
    per_file = {c.path: c.patch() for c in diff if c.type != "dir"}
    assert all(per_file.values()), [p for p, text in per_file.items() if not text]
    assert per_file['quote"back\\slash.txt'].startswith(
        'diff --git "a/quote\\"back\\\\slash.txt" "b/quote\\"back\\\\slash.txt"\n'
    )
    assert b"GIT binary patch" in patch
    assert b"rename from README.md\nrename to README.renamed.md\n" in patch
    assert b"old mode 100644\nnew mode 100755\n" in patch
    assert b'"b/bad-\\377.txt"' in patch
    assert b"new file mode 120000" in patch
    patch_file = tmp_path / "p.patch"
    patch_file.write_bytes(patch)
    git(project, "apply", "--check", str(patch_file))
    git(project, "apply", str(patch_file))

    expected = tmp_path / "expected"
    sandbox_view(project, upper, expected)
    for junk in (".venv", "src/__pycache__", "debug.log", "empty-dir", ".git"):
        path = expected / junk
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    got = {k: v for k, v in snapshot(project).items() if not k.startswith(".git/") and k != ".git"}
    want = snapshot(expected)
    for tree in (got, want):  # git tracks no directories and only the exec bit
        for key, (kind, mode, data) in list(tree.items()):
            if kind == "dir":
                del tree[key]
            elif kind == "file":
                tree[key] = (kind, 0o755 if mode & 0o100 else 0o644, data)
    assert got == want


def test_diff_is_against_the_baseline_not_the_live_host(
    layers: WorkspaceLayers, project: Path
) -> None:
    write(project / "README.md", "host edit after the sandbox started\n")
    write(project / "host-new.txt", "host\n")
    assert not compute_diff(layers)
    write(layers.upper / "README.md", "hello\n")  # copy-up of the baseline version
    assert not compute_diff(layers)
    write(layers.upper / "README.md", "sandbox\n")
    (change,) = compute_diff(layers).changes
    assert (
        change.old_sha256 is not None
        and change.old_oid == git(project, "rev-parse", "HEAD:README.md").strip()
    )


def test_include_ignored_and_paths(layers: WorkspaceLayers) -> None:
    agent_changes(layers.upper)
    full = compute_diff(layers, include_ignored=True)
    by_path = {c.path: c for c in full}
    assert by_path["debug.log"].ignored and by_path[".venv/lib/site.py"].ignored
    assert not by_path["src/a.py"].ignored
    assert full.ignored_paths == []
    assert not any(c.path.startswith(".git") for c in full)
    only = compute_diff(layers, paths=["pkg/", "src"])
    assert [c.path for c in only] == ["pkg", "pkg/sub", "pkg/sub/m.py", "pkg/sub/n.py", "src/a.py"]
    assert only.ignored_paths == ["src/__pycache__"]
    patch = only.patch()
    assert "b/src/a.py" in patch and "README" not in patch and "image.bin" not in patch


def test_the_sandbox_gitignore_overrides_the_hosts(layers: WorkspaceLayers) -> None:
    write(layers.upper / ".gitignore", ".venv/\n")  # *.log no longer ignored in the sandbox
    write(layers.upper / "debug.log", "now shown\n")
    write(layers.upper / "pkg" / ".gitignore", "*.tmp\n!keep.tmp\n")
    write(layers.upper / "pkg" / "a.tmp", "t\n")
    write(layers.upper / "pkg" / "keep.tmp", "k\n")
    diff = compute_diff(layers)
    assert [c.path for c in diff] == [
        ".gitignore",
        "debug.log",
        "pkg",
        "pkg/.gitignore",
        "pkg/keep.tmp",
    ]
    assert diff.ignored_paths == ["pkg/a.tmp"]


@needs_root
def test_opaque_dir_and_whiteouts_against_the_baseline(layers: WorkspaceLayers) -> None:
    upper = layers.upper
    (upper / "src").mkdir()
    os.setxattr(upper / "src", "user.overlay.opaque", b"y")  # rm -rf src; mkdir src
    write(upper / "src" / "a.py", "new\n")
    diff = compute_diff(layers)
    assert [(c.path, c.kind, c.type) for c in diff] == [
        ("src/a.py", "modified", "file"),
        ("src/old", "deleted", "dir"),
        ("src/old/x.txt", "deleted", "file"),
        ("src/old/y.txt", "deleted", "file"),
    ]


def test_plain_directory_project(tmp_path: Path) -> None:
    project = tmp_path / "plain"
    write(project / "a.txt", "a\n")
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    write(layers.upper / "a.txt", "b\n")
    write(layers.upper / "dir" / "n.txt", "n\n")
    diff = compute_diff(layers)
    patch = tmp_path / "p"
    patch.write_bytes(diff.patch_bytes())
    subprocess.run(
        ["git", "apply", "--check", "--directory", "", str(patch)], cwd=project, check=True
    )
    assert [(c.path, c.kind) for c in diff] == [
        ("a.txt", "modified"),
        ("dir", "added"),
        ("dir/n.txt", "added"),
    ]
    assert diff.commits == []


# -- the ignore-rule matcher against git's own ---------------------------------------------

_RULES = (
    """\
# comment
*.log
!important.log
/rooted.txt
build/
doc/*.html
**/cache
logs/**
a/**/z
\\#hash
"""
    "trailing\\ \n"  # an escaped trailing space stays
    """\
[abc]x
[!d-f]y
q?.txt
deep/**/
"""
)

_PATHS = [
    ("x.log", False),
    ("sub/x.log", False),
    ("important.log", False),
    ("rooted.txt", False),
    ("sub/rooted.txt", False),
    ("build", True),
    ("build", False),
    ("sub/build", True),
    ("doc/a.html", False),
    ("doc/sub/a.html", False),
    ("sub/doc/a.html", False),
    ("cache", True),
    ("x/y/cache", False),
    ("logs/a", False),
    ("logs", True),
    ("a/z", False),
    ("a/b/c/z", False),
    ("#hash", False),
    ("trailing ", False),
    ("ax", False),
    ("dx", False),
    ("gy", False),
    ("ey", False),
    ("q1.txt", False),
    ("q/.txt", False),
    ("deep/x", True),
    ("deep/x", False),
    ("plain.txt", False),
]


def test_ignore_matcher_agrees_with_git_check_ignore(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    write(repo / ".gitignore", _RULES)
    write(repo / "sub" / ".gitignore", "!keep.log\n*.tmp\n")
    cases = [*_PATHS, ("sub/keep.log", False), ("sub/a.tmp", False), ("a.tmp", False)]
    for path, is_dir in cases:
        target = repo / path
        if is_dir:
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            write(target, "x")
    stack = (parse_ignore(_RULES.encode()), parse_ignore(b"!keep.log\n*.tmp\n", "sub"))
    for path, is_dir in cases:
        if not is_dir and (repo / path).is_dir():
            continue
        proc = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", path],
            cwd=repo,
            env={"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo)},
        )
        assert is_ignored(path, is_dir, stack) == (proc.returncode == 0), path


def test_untracked_files_in_an_ignored_dir_with_tracked_ones(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    git(project, "init", "-q")
    write(project / ".gitignore", "out/\n")
    write(project / "out" / "keep.txt", "tracked\n")
    git(project, "add", "-A")
    git(project, "add", "-f", "out/keep.txt")
    git(project, "commit", "-qm", "init")
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    write(layers.upper / "out" / "keep.txt", "changed\n")
    write(layers.upper / "out" / "new.txt", "untracked in an ignored dir\n")
    diff = compute_diff(layers)
    assert [c.path for c in diff] == ["out/keep.txt"]
    assert diff.ignored_paths == ["out/new.txt"]
    assert [c.path for c in compute_diff(layers, paths=["."])] == ["out/keep.txt"]


@needs_root
def test_included_ignored_changes_apply_to_the_host(tmp_path: Path, project: Path) -> None:
    write(project / "debug.log", "host log\n")
    write(project / ".venv" / "old.py", "old\n")
    write(project / ".venv" / "keep.py", "keep\n")
    layers = WorkspaceLayers.create(tmp_path / "state", project)
    write(layers.upper / "debug.log", "sandbox log\n")
    whiteout(layers.upper / ".venv" / "old.py")
    write(layers.upper / ".venv" / "new.py", "new\n")
    diff = compute_diff(layers, include_ignored=True)
    assert {(c.path, c.kind) for c in diff if c.type != "dir"} == {
        ("debug.log", "modified"),
        (".venv/old.py", "deleted"),
        (".venv/new.py", "added"),
    }
    patch = tmp_path / "p"
    patch.write_bytes(diff.patch_bytes())
    git(project, "apply", "--check", str(patch))
    git(project, "apply", str(patch))
    assert (project / "debug.log").read_text() == "sandbox log\n"
    assert not (project / ".venv" / "old.py").exists()
    assert (project / ".venv" / "keep.py").read_text() == "keep\n"
    assert not compute_diff(layers).changes  # without the flag: all left out


def test_names_git_would_refuse_are_not_carried(layers: WorkspaceLayers, tmp_path: Path) -> None:
    for name in (".GIT", ".Git", "git~1", ".git.", ".git::$INDEX_ALLOCATION"):
        write(layers.upper / name / "config", "[core]\n\thooksPath = /tmp/evil\n")
    write(layers.upper / "sub" / ".git" / "HEAD", "ref: refs/heads/x\n")
    os.symlink("/etc/passwd", layers.upper / ".gitmodules")
    write(layers.upper / "ok.txt", "ok\n")
    diff = compute_diff(layers)
    assert [c.path for c in diff] == ["ok.txt", "sub"]
    assert {p for p, _ in diff.ignored} == {
        ".GIT",
        ".Git",
        "git~1",
        ".git.",
        ".git::$INDEX_ALLOCATION",
        ".gitmodules",
    }
    patch = tmp_path / "p"
    patch.write_bytes(diff.patch_bytes())
    git(layers.lower, "apply", "--check", str(patch))
