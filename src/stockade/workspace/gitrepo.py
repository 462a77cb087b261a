"""The agent's git commits: found in the sandbox's view of ``.git`` and brought to the host
as a branch (``stockade/NAME``) through git's own object transfer.

The sandbox's ``.git`` is its upper layer over the host's: HEAD, loose refs, packed-refs and
objects the agent wrote are in upper, the rest is the host's. All of it is hostile input:

- refs are resolved here, in Python, from files read through directory fds (whiteouts and
  opaque directories honoured); nothing but a 40-hex commit id comes out of it;
- the agent's object files (loose objects and pack data, nothing else: no ``info/alternates``,
  no index files, no config) are copied by fd into a private "view" repository in the
  sandbox's state directory, whose alternates point at the host's object store; pack
  indexes are rebuilt by ``git index-pack``, never taken from the sandbox;
- the host fetches exactly ``refs/heads/stockade/NAME`` from the view with
  ``fetch.fsckObjects``, an isolated configuration, no reflog and no FETCH_HEAD: its HEAD,
  index, other refs and reflogs are never written.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from stockade._errors import WorkspaceError
from stockade.workspace.baseline import find_git_dirs, git_env, read_small_fd, run_git
from stockade.workspace.layers import (
    ModeRestore,
    WorkspaceLayers,
    open_at,
    open_dir_beneath,
    restore_modes,
)

__all__ = ["AgentCommit", "agent_head", "describe_commits", "import_commits"]

logger = logging.getLogger(__name__)

_VIEW_PREFIX = ".agent-view-"
_VIEW_REF = "refs/heads/agent"
_HEX40 = re.compile(r"[0-9a-f]{40}")
_LOOSE_DIR = re.compile(r"[0-9a-f]{2}")
_LOOSE_NAME = re.compile(r"[0-9a-f]{38}")
_PACK_NAME = re.compile(r"pack-[0-9a-f]{40}\.pack")
_REF_NAME = re.compile(r"refs/[A-Za-z0-9._/+-]{1,200}")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class AgentCommit:
    """One commit the agent made inside the sandbox (subject: first line of the message)."""

    sha: str
    subject: str


def agent_head(layers: WorkspaceLayers) -> str | None:
    """The commit id the sandbox's HEAD points at, if the project is a git repository."""
    if find_git_dirs(layers.lower) is None or not os.path.isdir(layers.lower / ".git"):
        return None
    view = _View(layers)
    target = view.read((".git", "HEAD"))
    for _ in range(5):  # symbolic refs may chain
        if target is None:
            return None
        text = target.decode("ascii", "replace").strip()
        if _HEX40.fullmatch(text):
            return text
        if not text.startswith("ref: "):
            return None
        name = text[5:].strip()
        if not _REF_NAME.fullmatch(name) or ".." in name or "//" in name:
            return None
        target = view.read((".git", *name.split("/")))
        if target is None:
            return _packed_ref(view.read((".git", "packed-refs")), name)
    return None


def describe_commits(layers: WorkspaceLayers) -> list[AgentCommit]:
    """The commits on the sandbox's HEAD that the host lacks, oldest first.

    "Lacks": not reachable from the baseline's HEAD nor from any branch (but stockade/...),
    tag or remote ref of the host now (the sandbox sees the host's live ``.git`` under its
    own writes, so a commit the host made meanwhile can show up as the sandbox's HEAD).
    """
    found = _agent_commits(layers)
    if found is None:
        return []
    shutil.rmtree(found[0], ignore_errors=True)
    return found[1]


def import_commits(layers: WorkspaceLayers, host_project: Path, branch_name: str) -> list[str]:
    """Make ``refs/heads/<branch_name>`` of the host repository point at the sandbox's HEAD.

    Only when the sandbox's HEAD holds commits the host lacks (see ``describe_commits``);
    returns their ids, oldest first, or an empty list (and no branch). Objects travel by
    ``git fetch`` with fsck; nothing but that one ref is written on the host (no reflog, no
    FETCH_HEAD). The branch is moved (forced) if it exists: it belongs to the sandbox.
    """
    host = find_git_dirs(Path(host_project))
    if host is None:
        raise WorkspaceError(
            f"cannot import the sandbox's commits: {str(host_project)!r} is not a git "
            "repository (no .git); run `git init` there or copy the changes with apply"
        )
    host_git_dir = host[0]
    check = run_git(
        ["check-ref-format", f"refs/heads/{branch_name}"], git_env(host_git_dir), check=False
    )
    if check.returncode != 0:
        raise WorkspaceError(f"{branch_name!r} is not a valid git branch name")
    found = _agent_commits(layers)
    if found is None:
        return []
    view, commits = found
    try:
        if commits:
            _fetch(host_git_dir, view, branch_name, commits[-1].sha)
    finally:
        shutil.rmtree(view, ignore_errors=True)
    return [c.sha for c in commits]


def _fetch(host_git_dir: Path, view: Path, branch_name: str, head: str) -> None:
    """Fetch the view's agent ref into the host as ``refs/heads/<branch_name>``."""
    ref = f"refs/heads/{branch_name}"
    fetch_env = git_env(
        host_git_dir,
        config={
            "fetch.fsckObjects": "true",
            "transfer.fsckObjects": "true",
            "core.logAllRefUpdates": "false",
            "fetch.writeCommitGraph": "false",
            "fetch.recurseSubmodules": "false",
            "submodule.recurse": "false",
        },
    )
    run_git(
        [
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-recurse-submodules",
            "--no-auto-gc",
            str(view),
            f"+{_VIEW_REF}:{ref}",
        ],
        fetch_env,
        cwd=host_git_dir,
    )
    landed = run_git(["rev-parse", "--verify", ref], git_env(host_git_dir))
    if landed.stdout.decode("ascii").strip() != head:
        raise WorkspaceError(f"the host branch {branch_name!r} does not point at {head}")


def _agent_commits(layers: WorkspaceLayers) -> tuple[Path, list[AgentCommit]] | None:
    """(view repository, new commits oldest first), None when HEAD is the baseline's."""
    baseline = layers.baseline
    if baseline.head is None:
        return None
    head = agent_head(layers)
    if head is None or head == baseline.head:
        return None
    host = find_git_dirs(layers.lower)
    if host is None:
        return None
    refs = run_git(
        [
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            "refs/heads",
            "refs/tags",
            "refs/remotes",
        ],
        git_env(host[0]),
    ).stdout.decode("utf-8", "replace")
    # Branches made from sandboxes (stockade/...) do not count as the host having them.
    tips = [
        line.split(" ", 1)[0]
        for line in refs.splitlines()
        if not line.split(" ", 1)[-1].startswith("refs/heads/stockade/")
    ]
    view = _build_view(layers, head)
    negative = "".join(f"^{sha}\n" for sha in {baseline.head, *tips}).encode("ascii")
    proc = run_git(
        ["log", "--format=%H %s", "--reverse", "--stdin", head],
        git_env(view),
        input=negative,
    )
    commits: list[AgentCommit] = []
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        sha, _, subject = line.partition(" ")
        commits.append(AgentCommit(sha, subject))
    if commits and commits[-1].sha != head:
        raise WorkspaceError(f"could not list the sandbox's commits up to {head}")
    return view, commits


def _packed_ref(data: bytes | None, name: str) -> str | None:
    if not data:
        return None
    for line in data.decode("ascii", "replace").splitlines():
        if line.startswith(("#", "^")):
            continue
        sha, _, ref = line.partition(" ")
        if ref.strip() == name and _HEX40.fullmatch(sha):
            return sha
    return None


class _View:
    """Reads of files in the sandbox's view of the project (upper over lower)."""

    def __init__(self, layers: WorkspaceLayers) -> None:
        self.upper = layers.upper
        self.lower = layers.lower

    def read(self, parts: tuple[str, ...]) -> bytes | None:
        """A small regular file's bytes as the sandbox sees it; None when absent."""
        restore: ModeRestore = []
        try:
            fd = os.open(self.upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        hidden = False
        try:
            for i, part in enumerate(parts):
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    break
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    return None  # whiteout
                if i == len(parts) - 1:
                    if not stat.S_ISREG(st.st_mode):
                        return None
                    file_fd = open_at(fd, part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, restore)
                    return read_small_fd(file_fd)
                if not stat.S_ISDIR(st.st_mode):
                    return None
                child = open_at(fd, part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, restore)
                os.close(fd)
                fd = child
                hidden = hidden or _is_opaque(fd)
        finally:
            os.close(fd)
            restore_modes(restore)
        if hidden:
            return None
        try:
            dir_fd = open_dir_beneath(self.lower, parts[:-1])
        except OSError:
            return None
        try:
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return None
        finally:
            os.close(dir_fd)
        return read_small_fd(file_fd)


def _is_opaque(fd: int) -> bool:
    for prefix in ("user.", "trusted."):
        try:
            if os.getxattr(fd, prefix + "overlay.opaque") == b"y":
                return True
        except OSError:
            continue
    return False


def _build_view(layers: WorkspaceLayers, head: str) -> Path:
    """A new private view repository: the agent's objects + the host's by alternates (the
    caller removes it).

    The view's ``refs/heads/agent`` is set to the sandbox's HEAD; a HEAD whose objects are
    missing or corrupt is a WorkspaceError.
    """
    host = find_git_dirs(layers.lower)
    if host is None:
        raise WorkspaceError(f"{str(layers.lower)!r} is not a git repository")
    # One private directory per use: two diffs of one sandbox may run at once.
    view = layers.state_dir / f"{_VIEW_PREFIX}{secrets.token_hex(6)}.git"
    try:
        _fill_view(layers, host[1], view, head)
    except BaseException:
        shutil.rmtree(view, ignore_errors=True)
        raise
    return view


def _fill_view(layers: WorkspaceLayers, host_common: Path, view: Path, head: str) -> None:
    env = git_env(view)
    run_git(["init", "--bare", "--quiet", "--template=", str(view)], env)
    objects = view / "objects"
    (objects / "info").mkdir(parents=True, exist_ok=True)
    (objects / "info" / "alternates").write_bytes(
        os.fsencode((host_common / "objects").resolve()) + b"\n"
    )
    packs = _copy_agent_objects(layers.upper, objects)
    for pack in packs:
        proc = run_git(["index-pack", str(pack)], env, check=False)
        if proc.returncode != 0:
            logger.warning("skipping a corrupt pack of the sandbox's repository: %s", pack.name)
            pack.unlink()
    proc = run_git(["update-ref", _VIEW_REF, head], env, check=False)
    if proc.returncode != 0:
        raise WorkspaceError(
            f"the sandbox's HEAD {head} cannot be read (objects missing or corrupt): "
            f"{proc.stderr.decode('utf-8', 'replace').strip()}"
        )


def _copy_agent_objects(upper: Path, objects: Path) -> list[Path]:
    """Copy loose objects and pack data from upper/.git/objects; returns the packs copied."""
    restore: ModeRestore = []
    try:
        root = open_dir_beneath(upper, (".git", "objects"), restore=restore)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            restore_modes(restore)
            return []
        restore_modes(restore)
        raise
    packs: list[Path] = []
    try:
        for name in os.listdir(root):
            if _LOOSE_DIR.fullmatch(name):
                sub = _open_subdir(root, name, restore)
                if sub is None:
                    continue
                try:
                    for entry in os.listdir(sub):
                        if _LOOSE_NAME.fullmatch(entry):
                            dest = objects / name
                            dest.mkdir(exist_ok=True)
                            _copy_file(sub, entry, dest / entry, restore)
                finally:
                    os.close(sub)
            elif name == "pack":
                sub = _open_subdir(root, name, restore)
                if sub is None:
                    continue
                try:
                    dest = objects / "pack"
                    dest.mkdir(exist_ok=True)
                    for entry in os.listdir(sub):
                        if _PACK_NAME.fullmatch(entry) and _copy_file(
                            sub, entry, dest / entry, restore
                        ):
                            packs.append(dest / entry)
                finally:
                    os.close(sub)
    finally:
        os.close(root)
        restore_modes(restore)
    return packs


def _open_subdir(dir_fd: int, name: str, restore: ModeRestore) -> int | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            return None
        return open_at(dir_fd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, restore)
    except OSError:
        return None


def _copy_file(dir_fd: int, name: str, dest: Path, restore: ModeRestore) -> bool:
    """Copy a regular file of upper (never a symlink or special file) to ``dest``."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return False
        src = open_at(dir_fd, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, restore)
    except OSError:
        return False
    try:
        out = os.open(
            dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444
        )
        try:
            while chunk := os.read(src, _CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
        finally:
            os.close(out)
    finally:
        os.close(src)
    return True
