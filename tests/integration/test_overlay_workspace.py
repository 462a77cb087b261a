"""A real overlayfs mount (unshare -rm, userxattr) diffed and applied by the host-side code.

The same mutation script also runs on a plain copy of the project; after apply, the project
must equal that copy exactly, and until apply it must equal the original.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layer_helpers import snapshot
from stockade.workspace import WorkspaceLayers, apply_diff, compute_diff

NOBODY = 65534

MUTATIONS = """
set -e
echo new > new.txt
rm delete_me.txt
echo more >> README.md
chmod 755 run.sh
touch untouched.txt
cat keep.txt > /dev/null
ln -s README.md link
mv src/a.py src/b.py
mv olddir newdir
rm -r build
mkdir build
echo x > build/x.o
mkdir emptydir
rm -r gone_dir
printf '\\000\\001' > data.bin
"""

EXPECTED = {
    ("README.md", "modified", "file"),
    ("build/obj.o", "deleted", "file"),
    ("build/x.o", "added", "file"),
    ("data.bin", "added", "file"),
    ("delete_me.txt", "deleted", "file"),
    ("emptydir", "added", "dir"),
    ("gone_dir", "deleted", "dir"),
    ("gone_dir/f.txt", "deleted", "file"),
    ("gone_dir/sub", "deleted", "dir"),
    ("gone_dir/sub/g.txt", "deleted", "file"),
    ("link", "added", "symlink"),
    ("new.txt", "added", "file"),
    ("newdir", "added", "dir"),
    ("newdir/o.txt", "added", "file"),
    ("olddir", "deleted", "dir"),
    ("olddir/o.txt", "deleted", "file"),
    ("run.sh", "modified", "file"),
    ("src/a.py", "deleted", "file"),
    ("src/b.py", "added", "file"),
}


def make_project(root: Path) -> None:
    files = {
        "README.md": "# project\n",
        "delete_me.txt": "bye\n",
        "run.sh": "#!/bin/sh\necho hi\n",
        "untouched.txt": "same\n",
        "keep.txt": "keep\n",
        "src/a.py": "print('a')\n",
        "olddir/o.txt": "o\n",
        "build/obj.o": "obj\n",
        "gone_dir/f.txt": "f\n",
        "gone_dir/sub/g.txt": "g\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, 0o644)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, 0o755)


def overlay_argv(layers: WorkspaceLayers, merged: Path, script: str) -> list[str]:
    options = f"lowerdir={layers.lower},upperdir={layers.upper},workdir={layers.work},userxattr"
    return [
        "unshare",
        "-rm",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t overlay overlay -o "$1" "$2" && cd "$2" && {script}',
        "sh",
        options,
        str(merged),
    ]


def as_user(argv: list[str], user: str) -> list[str]:
    if user == "root":
        return argv
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return [*setpriv, *argv]


@pytest.fixture(params=["root", "unprivileged"])
def user(request: pytest.FixtureRequest) -> str:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed; the overlay workspace needs it")
    if request.param == "unprivileged" and (os.geteuid() != 0 or shutil.which("setpriv") is None):
        pytest.skip("running as an unprivileged user needs root and setpriv")
    return str(request.param)


@pytest.fixture
def base(user: str) -> Iterator[Path]:
    # Not tmp_path: its parents are 0700 root, which an unprivileged user cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="stockade-ovl-"))
    if user != "root":
        os.chown(root, NOBODY, NOBODY)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def chown_tree(root: Path) -> None:
    os.chown(root, NOBODY, NOBODY)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.lchown(Path(dirpath) / name, NOBODY, NOBODY)


def prepare(base: Path, user: str) -> tuple[WorkspaceLayers, Path]:
    project = base / "project"
    project.mkdir()
    make_project(project)
    if user != "root":
        chown_tree(project)  # before the baseline: a chown changes ctime
    layers = WorkspaceLayers.create(base / "state", project)
    merged = base / "merged"
    merged.mkdir()
    if user != "root":
        chown_tree(layers.upper.parent)
        os.chown(merged, NOBODY, NOBODY)
    probe = subprocess.run(
        as_user(overlay_argv(layers, merged, "true"), user),
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"overlayfs mount in a user namespace failed: {probe.stderr.strip()}")
    return layers, merged


def test_real_overlay_diff_and_apply(base: Path, user: str) -> None:
    layers, merged = prepare(base, user)
    project = layers.lower
    original = snapshot(project)
    reference = base / "reference"
    shutil.copytree(project, reference, symlinks=True)
    subprocess.run(["sh", "-c", MUTATIONS], cwd=reference, check=True)

    subprocess.run(as_user(overlay_argv(layers, merged, MUTATIONS), user), check=True)
    assert snapshot(project) == original, "the sandbox wrote through to the project"
    assert snapshot(merged) == {}, "the overlay must not outlive its mount namespace"

    diff = compute_diff(layers)
    assert {(c.path, c.kind, c.type) for c in diff} == EXPECTED
    run_sh = next(c for c in diff if c.path == "run.sh")
    assert run_sh.mode_changed and not run_sh.content_changed
    assert not any(c.path.startswith("untouched") or c.path == "keep.txt" for c in diff)
    assert "+more\n" in diff.patch()
    assert snapshot(project) == original

    result = apply_diff(layers, diff)
    assert result.skipped == []
    assert snapshot(project) == snapshot(reference)
    assert not compute_diff(layers)


def test_real_overlay_reset(base: Path, user: str) -> None:
    layers, merged = prepare(base, user)
    original = snapshot(layers.lower)
    subprocess.run(as_user(overlay_argv(layers, merged, MUTATIONS), user), check=True)
    assert compute_diff(layers)
    layers.reset()
    assert not compute_diff(layers)
    assert list(layers.work.iterdir()) == []
    assert snapshot(layers.lower) == original
    if user != "root":
        chown_tree(layers.upper.parent)
    # The reset layers mount again and start from the project as it is.
    subprocess.run(
        as_user(overlay_argv(layers, merged, "echo again > again.txt"), user), check=True
    )
    assert [(c.path, c.kind) for c in compute_diff(layers)] == [("again.txt", "added")]
