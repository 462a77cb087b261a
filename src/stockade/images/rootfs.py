"""Root filesystems for the image-based backends, built locally from the Debian archive.

No registry is needed: ``mmdebstrap`` builds a minbase Debian with Python 3 (the guest
agent's interpreter) plus a profile's packages. The result is cached under
``~/.cache/stockade/images/rootfs-<key>/`` where ``key`` hashes the recipe, so a changed
recipe builds anew and an unchanged one is reused. A build happens in a temporary
directory that is renamed into place only when complete: a failed or interrupted build
leaves no half-written cache entry. Concurrent builders of the same recipe wait on a lock
and the second one reuses the first one's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stockade._errors import BackendUnavailableError
from stockade._tarfile import tarfile

__all__ = [
    "DEFAULT_MIRROR",
    "DEFAULT_SUITE",
    "PROFILES",
    "ImageBuildError",
    "ImageProfile",
    "RootfsImage",
    "ensure_rootfs",
    "find_rootfs",
    "image_cache_dir",
    "rootfs_recipe",
]

#: Bump when the build procedure changes in a way the recipe does not show.
RECIPE_VERSION = 1
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Packages every image has: the agent's interpreter, the trust store the egress CA
#: bundle is added to, and git (agents commit their work; the commits come back as a branch).
BASE_PACKAGES = ("python3", "ca-certificates", "git")
#: Documentation and translations are never needed inside a sandbox.
_PATH_EXCLUDES = (
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
)

Progress = Callable[[str], None]


class ImageBuildError(BackendUnavailableError):
    """An image could not be built; the message says which step failed and how to fix it."""


def require_tool(name: str, purpose: str, package: str) -> str:
    """The path of build tool ``name`` on PATH, or an error saying what it is for and how to
    install it (``purpose`` completes "it ...")."""
    found = shutil.which(name)
    if found is None:
        raise ImageBuildError(
            f"{name} not found on PATH; it {purpose}", fix=f"apt-get install {package}"
        )
    return found


@dataclass(frozen=True)
class ImageProfile:
    """A named set of extra packages on top of the base image."""

    name: str
    packages: tuple[str, ...]
    description: str


PROFILES: dict[str, ImageProfile] = {
    p.name: p
    for p in (
        ImageProfile("base", (), "minbase Debian + python3 + ca-certificates + git"),
        ImageProfile(
            "dev",
            ("git", "build-essential", "curl", "openssh-client"),
            "base + git, compilers, curl and an SSH client",
        ),
        ImageProfile("node", ("nodejs", "npm", "git", "curl"), "base + Node.js, npm and git"),
        ImageProfile(
            "docker",
            ("docker.io", "iptables", "git", "curl"),
            "base + a Docker engine for Docker inside the sandbox",
        ),
    )
}


@dataclass(frozen=True)
class RootfsImage:
    """A built root filesystem in the cache."""

    profile: str
    key: str
    #: The cache entry's directory.
    path: Path
    #: The extracted tree (read it, never write it: other sandboxes share it).
    tree: Path
    #: The tarball as mmdebstrap wrote it (e.g. for ``docker import``).
    tar: Path
    packages: tuple[str, ...]


def image_cache_dir() -> Path:
    """``$STOCKADE_IMAGE_DIR``, else ``$XDG_CACHE_HOME/stockade/images``, else ~/.cache/..."""
    explicit = os.environ.get("STOCKADE_IMAGE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stockade" / "images"


def _packages(profile: str, extra: Sequence[str]) -> tuple[str, ...]:
    try:
        chosen = PROFILES[profile]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ImageBuildError(
            f"unknown image profile {profile!r}; choose one of: {known}",
            fix=f"use one of the profiles: {known}",
        ) from None
    for name in extra:
        if not name or name.startswith("-") or any(c.isspace() or c == "," for c in name):
            raise ImageBuildError(
                f"invalid package name {name!r} in the image's extra packages",
                fix="give plain Debian package names, e.g. 'git'",
            )
    return tuple(sorted({*BASE_PACKAGES, *chosen.packages, *extra}))


def rootfs_recipe(
    profile: str = "base", *, extra_packages: Sequence[str] = (), suite: str = DEFAULT_SUITE
) -> dict[str, object]:
    """What determines the image's content (its hash is the cache key)."""
    return {
        "version": RECIPE_VERSION,
        "suite": suite,
        "variant": "minbase",
        "packages": list(_packages(profile, extra_packages)),
        "excludes": list(_PATH_EXCLUDES),
        "arch": os.uname().machine,
    }


def _key(recipe: dict[str, object]) -> str:
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _entry(path: Path, profile: str, key: str, packages: tuple[str, ...]) -> RootfsImage:
    return RootfsImage(
        profile=profile,
        key=key,
        path=path,
        tree=path / "tree",
        tar=path / "rootfs.tar",
        packages=packages,
    )


def find_rootfs(
    profile: str = "base", *, extra_packages: Sequence[str] = (), suite: str = DEFAULT_SUITE
) -> RootfsImage | None:
    """The cached image for this recipe, or None when it has not been built (no build)."""
    recipe = rootfs_recipe(profile, extra_packages=extra_packages, suite=suite)
    key = _key(recipe)
    path = image_cache_dir() / f"rootfs-{key}"
    if (path / "complete").is_file():
        return _entry(path, profile, key, _packages(profile, extra_packages))
    return None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mirror() -> str:
    return os.environ.get("STOCKADE_DEBIAN_MIRROR") or DEFAULT_MIRROR


def ensure_rootfs(
    profile: str = "base",
    *,
    extra_packages: Sequence[str] = (),
    suite: str = DEFAULT_SUITE,
    progress: Progress | None = None,
    rebuild: bool = False,
) -> RootfsImage:
    """Return the cached image for this recipe, building it first when needed (blocking)."""
    say = progress or (lambda _line: None)
    packages = _packages(profile, extra_packages)
    recipe = rootfs_recipe(profile, extra_packages=extra_packages, suite=suite)
    key = _key(recipe)
    cache = image_cache_dir()
    final = cache / f"rootfs-{key}"
    with _locked(cache / f".rootfs-{key}.lock"):
        if (final / "complete").is_file() and not rebuild:
            return _entry(final, profile, key, packages)
        mmdebstrap = require_tool(
            "mmdebstrap",
            "builds the sandbox root filesystem from the Debian archive",
            "mmdebstrap",
        )
        tmp = cache / f".rootfs-{key}.tmp-{os.getpid()}"
        _remove(tmp)
        tmp.mkdir(parents=True, mode=0o755)
        try:
            _build(mmdebstrap, tmp, recipe, packages, suite, say)
            (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
            (tmp / "complete").write_text(f"{time.time():.0f}\n")
            if final.exists():
                _remove(final)
            os.rename(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        say(f"image {profile} ({key}) ready in {final}")
        return _entry(final, profile, key, packages)


def _build(
    mmdebstrap: str,
    out: Path,
    recipe: dict[str, object],
    packages: tuple[str, ...],
    suite: str,
    say: Progress,
) -> None:
    tar_path = out / "rootfs.tar"
    argv = [
        mmdebstrap,
        "--variant=minbase",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in _PATH_EXCLUDES),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        suite,
        str(tar_path),
        _mirror(),
    ]
    say(f"building root filesystem: mmdebstrap {suite} with {', '.join(packages)}")
    started = time.monotonic()
    log_path = out / "build.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            log.write(raw)
            line = raw.decode(errors="replace").strip()
            if line.startswith("I:"):
                say(line[2:].strip())
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise ImageBuildError(
            f"mmdebstrap failed (exit {rc}) building the {recipe['suite']} root filesystem:\n"
            f"{tail}",
            fix="check that the Debian archive is reachable (STOCKADE_DEBIAN_MIRROR sets the "
            "mirror) and the package names exist",
        )
    say(f"root filesystem downloaded and installed in {time.monotonic() - started:.1f} s")
    tree = out / "tree"
    tree.mkdir()
    _extract(tar_path, tree)
    log_path.unlink(missing_ok=True)


def _extract(tar_path: Path, tree: Path) -> None:
    """Unpack the tarball; device nodes are skipped (backends provide their own /dev)."""
    privileged = os.geteuid() == 0
    with tarfile.open(tar_path) as archive:
        members = [m for m in archive if not (m.ischr() or m.isblk() or m.isfifo())]

        def keep(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
            # Our own tarball from mmdebstrap: absolute symlinks inside the image are normal
            # (they resolve inside the guest), so the 'tar' filter, not 'data'.
            filtered = tarfile.tar_filter(member, dest)
            if privileged:
                # tar_filter clears setuid bits and ownership must stay as in the image.
                return filtered.replace(mode=member.mode, uid=member.uid, gid=member.gid)
            return filtered

        # Our own mmdebstrap output, filtered member by member above.
        archive.extractall(tree, members=members, filter=keep, numeric_owner=privileged)


def _remove(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return

    def writable(func: Callable[..., object], p: str, _exc: object) -> None:
        # Read-only directories in the image tree (unprivileged builds) block removal.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=writable)
