"""The rootfs cache: recipe keys, profile validation, atomic builds (mmdebstrap faked on PATH).

The fake stands in for the Debian archive only (it writes a tarball); nothing here tests an
isolation boundary.
"""

from __future__ import annotations

import os
import stat
import sys
import tarfile
import time
from pathlib import Path

import pytest

from stockade.images import (
    PROFILES,
    ImageBuildError,
    ensure_rootfs,
    find_rootfs,
    image_cache_dir,
    rootfs_recipe,
)
from stockade.images.rootfs import _key


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "images"
    monkeypatch.setenv("STOCKADE_IMAGE_DIR", str(cache))
    return cache


MAKE_TAR = """
import io, sys, tarfile
files = [("usr/bin/python3", b"#!fake"), ("etc/os-release", b"ID=debian")]
with tarfile.open(sys.argv[1], "w") as t:
    for name, data in files:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o755
        t.addfile(info, io.BytesIO(data))
    dev = tarfile.TarInfo("dev/null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    t.addfile(dev)
    link = tarfile.TarInfo("bin")
    link.type, link.linkname = tarfile.SYMTYPE, "usr/bin"
    t.addfile(link)
"""


def _fake_mmdebstrap(bindir: Path, *, fail: bool = False) -> Path:
    """A stand-in that writes a tiny rootfs tarball to its output argument (or fails)."""
    bindir.mkdir(exist_ok=True)
    maker = bindir / "make_tar.py"
    maker.write_text(MAKE_TAR)
    if fail:
        body = "#!/bin/sh\necho 'I: pretending to build'\necho 'E: archive unreachable'\nexit 7\n"
    else:
        body = (
            '#!/bin/sh\necho "I: $*"\nout=""\n'
            'for a; do case "$a" in *.tar) out="$a";; esac; done\n'
            f'exec "{sys.executable}" "{maker}" "$out"\n'
        )
    script = bindir / "mmdebstrap"
    script.write_text(body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bindir


def test_recipe_key_changes_with_packages_and_is_stable() -> None:
    base = rootfs_recipe("base")
    assert base == rootfs_recipe("base")
    assert "python3" in base["packages"]  # type: ignore[operator]
    assert "git" in base["packages"]  # type: ignore[operator]
    assert _key(base) != _key(rootfs_recipe("base", extra_packages=["curl"]))
    assert _key(base) != _key(rootfs_recipe("dev"))
    assert set(PROFILES) >= {"base", "dev", "node", "docker"}


def test_unknown_profile_and_bad_package_names_are_refused() -> None:
    with pytest.raises(ImageBuildError, match=r"unknown image profile 'nope'.*base"):
        ensure_rootfs("nope")
    for bad in ("-oops", "two words", "a,b", ""):
        with pytest.raises(ImageBuildError, match="invalid package name"):
            rootfs_recipe("base", extra_packages=[bad])


def test_missing_mmdebstrap_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ImageBuildError) as info:
        ensure_rootfs("base")
    assert "apt-get install mmdebstrap" in info.value.fix


def test_failed_build_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache: Path
) -> None:
    bindir = _fake_mmdebstrap(tmp_path / "bin", fail=True)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    lines: list[str] = []
    with pytest.raises(ImageBuildError, match=r"(?s)exit 7.*archive unreachable"):
        ensure_rootfs("base", progress=lines.append)
    assert "pretending to build" in lines
    assert find_rootfs("base") is None
    leftovers = [p.name for p in _cache.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_build_is_cached_and_device_nodes_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = _fake_mmdebstrap(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    image = ensure_rootfs("base")
    assert image.path.parent == image_cache_dir()
    assert (image.tree / "usr/bin/python3").read_bytes() == b"#!fake"
    assert (image.tree / "bin").is_symlink()
    assert not (image.tree / "dev/null").exists()
    assert tarfile.is_tarfile(image.tar)
    assert find_rootfs("base") == image
    # A second call reuses the entry: the fake is gone, so a rebuild would fail.
    monkeypatch.setenv("PATH", "/nonexistent")
    assert ensure_rootfs("base") == image
    with pytest.raises(ImageBuildError, match="mmdebstrap not found"):
        ensure_rootfs("base", rebuild=True)
    assert find_rootfs("base") == image  # the failed rebuild kept the good entry


def test_image_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STOCKADE_IMAGE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image_cache_dir() == tmp_path / "xdg" / "stockade" / "images"


def test_vm_cache_prunes_only_what_nobody_used_for_a_week(tmp_path: Path) -> None:
    from stockade.images.vm import PRUNE_AFTER, _prune

    cache = tmp_path / "vm"
    (cache / "snapshots" / "current").mkdir(parents=True)
    (cache / "snapshots" / "other-recent").mkdir()
    (cache / "snapshots" / "other-old").mkdir()
    for name in ("vmlinux-a", "initramfs-a", "initramfs-recent", "initramfs-old"):
        (cache / name).write_bytes(b"x")
    old = time.time() - PRUNE_AFTER - 60
    for stale in ("initramfs-old", "initramfs-a", "snapshots/other-old", "snapshots/current"):
        os.utime(cache / stale, (old, old))
    _prune(cache, keep={"vmlinux-a", "initramfs-a"}, image_key="current")
    left = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    assert left == [
        "initramfs-a",  # in use by this build, however old
        "initramfs-recent",  # another version used it lately
        "snapshots",
        "snapshots/current",
        "snapshots/other-recent",
        "vmlinux-a",
    ]
