"""The workspace baseline: a git tree of the project as the sandbox first saw it.

Recorded when a sandbox's workspace is created or reset, into a private bare repository in
the sandbox's state directory (``STATE/baseline.git``). It holds every file git would track
in the project's working tree (tracked plus untracked-not-ignored files; ``.gitignore``,
``.git/info/exclude`` and the user's global excludes file honoured; ``.git`` never included).
When the project is a git repository the private repository borrows the host's object store
through ``objects/info/alternates`` (nothing is stored twice) and starts from a copy of the
host's index, so git's stat cache spares rehashing unchanged files.

Contents are recorded byte for byte: the private repository's ``info/attributes`` switches
off every content conversion (eol, filters, ident, working-tree-encoding), so a blob is
exactly what was on disk, and the sandbox's files can be compared by blob id.

git always runs here with an isolated environment (``git_env``): no system or global
config, no hooks, no fsmonitor, fixed author, so nothing in the project can make it run code.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stockade._errors import WorkspaceError

__all__ = [
    "BaselineEntry",
    "EntryKind",
    "WorkspaceBaseline",
    "find_git_dirs",
    "git_blob_id",
    "git_blob_id_fd",
    "git_env",
    "read_small_fd",
    "read_small_file",
    "run_git",
]

logger = logging.getLogger(__name__)

EntryKind = Literal["file", "symlink"]

BASELINE_DIR = "baseline.git"
_META_NAME = "stockade-baseline.json"
_BASELINE_REF = "refs/stockade/baseline"
_EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
_CHUNK = 1024 * 1024
#: Files read whole to be parsed (.git files, excludes, .gitignore) larger than this are not read.
_SMALL_FILE_LIMIT = 1024 * 1024
#: Every content conversion off, so a blob is the file's bytes as they are on disk.
_ATTRIBUTES = b"* -text -eol -ident -filter -working-tree-encoding\n"

#: Configuration given to every git run (through GIT_CONFIG_COUNT, highest precedence).
_SAFE_CONFIG: dict[str, str] = {
    "core.hooksPath": "/dev/null",
    "core.fsmonitor": "false",
    "core.untrackedCache": "false",
    "core.splitIndex": "false",
    "core.autocrlf": "false",
    "core.safecrlf": "false",
    "core.symlinks": "true",
    "core.fileMode": "true",
    "core.quotePath": "true",
    "core.precomposeUnicode": "false",
    "core.protectNTFS": "true",
    "core.sparseCheckout": "false",
    "core.attributesFile": "/dev/null",
    "core.excludesFile": "/dev/null",
    "diff.renames": "true",
    "diff.external": "",
    "diff.noprefix": "false",
    "diff.mnemonicPrefix": "false",
    "gc.auto": "0",
    "maintenance.auto": "false",
    "advice.detachedHead": "false",
    "advice.addEmbeddedRepo": "false",
    "advice.addIgnoredFile": "false",
    "index.skipHash": "false",
    "commit.gpgSign": "false",
    "protocol.allow": "never",
    "protocol.file.allow": "always",
    "uploadpack.packObjectsHook": "",
    "transfer.fsckObjects": "true",
    "safe.directory": "*",
}


@dataclass(frozen=True)
class BaselineEntry:
    """One path of the baseline: a regular file (mode 0o644 or 0o755) or a symlink."""

    kind: EntryKind
    mode: int  # 0o644 or 0o755 for files (git's two), 0 for symlinks
    oid: str  # git blob id (sha1 hex) of the content / symlink target


def git_blob_id(data: bytes) -> str:
    """The git blob id (sha1) of ``data``."""
    digest = hashlib.sha1(b"blob %d\0" % len(data), usedforsecurity=False)
    digest.update(data)
    return digest.hexdigest()


def git_blob_id_fd(fd: int) -> str:
    """The git blob id of a regular file read from ``fd`` (from its current offset 0)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    digest = hashlib.sha1(b"blob %d\0" % st.st_size, usedforsecurity=False)
    total = 0
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        digest.update(chunk)
        total += len(chunk)
        offset += len(chunk)
    if total != st.st_size:
        raise OSError(errno.EAGAIN, "file changed size while being read")
    return digest.hexdigest()


def git_env(
    git_dir: Path,
    *,
    work_tree: Path | None = None,
    index_file: Path | None = None,
    config: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """An isolated environment for running git on ``git_dir``.

    Nothing is inherited but PATH: no system or global config, no ``GIT_*`` variable from
    the caller, hooks and fsmonitor off, a fixed identity and dates. ``config`` adds or
    overrides settings (they outrank every config file, the repository's too).
    """
    env: dict[str, str] = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C",
        "HOME": str(git_dir),
        "GIT_DIR": str(git_dir),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_PAGER": "cat",
        "GIT_AUTHOR_NAME": "stockade",
        "GIT_AUTHOR_EMAIL": "stockade@localhost",
        "GIT_AUTHOR_DATE": "@0 +0000",
        "GIT_COMMITTER_NAME": "stockade",
        "GIT_COMMITTER_EMAIL": "stockade@localhost",
        "GIT_COMMITTER_DATE": "@0 +0000",
    }
    if work_tree is not None:
        env["GIT_WORK_TREE"] = str(work_tree)
    if index_file is not None:
        env["GIT_INDEX_FILE"] = str(index_file)
    settings = dict(_SAFE_CONFIG)
    settings.update(config or {})
    env["GIT_CONFIG_COUNT"] = str(len(settings))
    for i, (key, value) in enumerate(settings.items()):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


def run_git(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    cwd: Path | None = None,
    input: bytes | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``git ARGS`` (argv list, no shell); WorkspaceError with git's message on failure."""
    argv = ["git", *args]
    try:
        proc = subprocess.run(
            argv,
            env=dict(env),
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise WorkspaceError(
            "the git program was not found; stockade uses it to record and diff workspaces. "
            "Install git (e.g. apt-get install git) and retry"
        ) from exc
    if check and proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip() or f"exit {proc.returncode}"
        raise WorkspaceError(f"git {args[0]} failed: {message}")
    return proc


def find_git_dirs(project: Path) -> tuple[Path, Path] | None:
    """(git dir, common dir) of the repository whose work tree is ``project``, if any.

    Only ``project/.git`` counts (a directory, or a ``gitdir:`` file as in worktrees and
    submodules); a project nested somewhere below a repository is treated as a plain directory.
    """
    dot_git = project / ".git"
    try:
        st = os.lstat(dot_git)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        git_dir = dot_git
    elif stat.S_ISREG(st.st_mode):
        text = read_small_file(dot_git)
        if text is None or not text.startswith(b"gitdir:"):
            return None
        target = os.fsdecode(text[len(b"gitdir:") :].strip())
        git_dir = (project / target).resolve()
    else:
        return None
    common = git_dir
    commondir = read_small_file(git_dir / "commondir")
    if commondir is not None and commondir.strip():
        common = (git_dir / os.fsdecode(commondir.strip())).resolve()
    if not (common / "objects").is_dir() or not os.path.isfile(git_dir / "HEAD"):
        return None
    return git_dir, common


class WorkspaceBaseline:
    """The recorded baseline of one sandbox's workspace (see the module docstring)."""

    def __init__(self, git_dir: Path, project: Path, meta: Mapping[str, object]) -> None:
        self._git_dir = git_dir
        self._project = project
        self._tree = str(meta["tree"])
        self._commit = str(meta["commit"])
        head = meta.get("head")
        self._head = None if head is None else str(head)
        host = meta.get("host_git_dir")
        self._host_git_dir = None if host is None else Path(str(host))
        self._gitlinks: frozenset[str] = frozenset()
        self._entries: dict[str, BaselineEntry] | None = None

    # -- recording ---------------------------------------------------------------------

    @classmethod
    def record(cls, state_dir: Path, project: Path) -> WorkspaceBaseline:
        """Record the project's working tree now (replacing any earlier baseline)."""
        state_dir = Path(state_dir)
        project = Path(project).resolve()
        final = state_dir / BASELINE_DIR
        tmp = state_dir / f".{BASELINE_DIR}.new-{secrets.token_hex(6)}"
        try:
            meta = _record_into(tmp, project)
            if os.path.lexists(final):
                aside = state_dir / f".{BASELINE_DIR}.old-{secrets.token_hex(6)}"
                os.rename(final, aside)
                os.rename(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(final, project, meta)

    @classmethod
    def open(cls, state_dir: Path, project: Path) -> WorkspaceBaseline:
        """The baseline recorded in ``state_dir``; WorkspaceError when missing or corrupt."""
        git_dir = Path(state_dir) / BASELINE_DIR
        try:
            meta = json.loads((git_dir / _META_NAME).read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or not isinstance(meta.get("tree"), str):
                raise ValueError("not a baseline record")
        except (OSError, ValueError) as exc:
            raise WorkspaceError(
                f"the workspace baseline in {str(git_dir)!r} is missing or corrupt, so the "
                "sandbox's changes cannot be told from the project's; reset the workspace "
                "to record a new one (this discards the sandbox's changes)"
            ) from exc
        return cls(git_dir, Path(project).resolve(), meta)

    # -- queries -----------------------------------------------------------------------

    @property
    def head(self) -> str | None:
        """The host repository's HEAD commit at baseline time; None if not a git repo."""
        return self._head

    @property
    def git_dir(self) -> Path:
        """The private bare repository holding the baseline."""
        return self._git_dir

    @property
    def tree(self) -> str:
        """The baseline's git tree id."""
        return self._tree

    @property
    def commit(self) -> str:
        """A commit of the baseline tree (no parent), for diff-tree and fast-import."""
        return self._commit

    @property
    def host_git_dir(self) -> Path | None:
        """The host repository's git dir at baseline time (None for a plain directory)."""
        return self._host_git_dir

    @property
    def gitlinks(self) -> frozenset[str]:
        """Paths of nested repositories (submodules) in the baseline, kept as-is."""
        self._load()
        return self._gitlinks

    def entry(self, path: str) -> BaselineEntry | None:
        """The baseline entry at ``path`` (posix, project-relative), None if absent."""
        return self._load().get(path)

    def entries_under(self, prefix: str) -> dict[str, BaselineEntry]:
        """Entries at or below directory ``prefix`` ("" = all), keyed by full path."""
        entries = self._load()
        if not prefix:
            return dict(entries)
        start = prefix.rstrip("/") + "/"
        # "/" + 1 == "0": every path below the directory sorts in [start, end).
        end = start[:-1] + "0"
        lo = bisect.bisect_left(self._sorted, start)
        hi = bisect.bisect_left(self._sorted, end)
        return {p: entries[p] for p in self._sorted[lo:hi]}

    def is_dir(self, path: str) -> bool:
        """True when ``path`` is a directory of the baseline (it has entries below)."""
        if not path:
            return True
        self._load()
        return path in self._dirs

    def read(self, path: str) -> bytes:
        """Blob content of ``path`` (a symlink's target bytes); WorkspaceError if absent."""
        entry = self.entry(path)
        if entry is None:
            raise WorkspaceError(f"{path!r} is not in the workspace baseline")
        return self.read_oid(entry.oid)

    def read_oid(self, oid: str) -> bytes:
        """The content of blob ``oid`` from the baseline's object store."""
        proc = run_git(["cat-file", "blob", oid], git_env(self._git_dir))
        return proc.stdout

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` as a blob of the baseline's repository; returns its id."""
        proc = run_git(["hash-object", "-w", "--stdin"], git_env(self._git_dir), input=data)
        return proc.stdout.decode("ascii").strip()

    def advance(self, updates: Mapping[str, BaselineEntry | None]) -> WorkspaceBaseline:
        """Record that the host now holds these entries (None: the path is gone), so they
        stop being differences. Blobs must already be in the repository (``write_blob``, or
        written by a diff's patch). Returns the new baseline (this object keeps describing
        the old one)."""
        if not updates:
            return self
        lines = bytearray()
        for path, entry in updates.items():
            raw = os.fsencode(path)
            if entry is None:
                lines += b"0 " + b"0" * 40 + b"\t" + raw + b"\0"
            else:
                mode = 0o120000 if entry.kind == "symlink" else 0o100000 | entry.mode
                lines += b"%o %s\t%s\0" % (mode, entry.oid.encode("ascii"), raw)

        def change(env: dict[str, str]) -> None:
            run_git(["update-index", "-z", "--index-info"], env, input=bytes(lines))

        return self._rewrite(change)

    def refresh(self, paths: Iterable[str]) -> WorkspaceBaseline:
        """Re-record ``paths`` (files, or directories and all below) from the project as
        it is now, e.g. after apply wrote them, so they stop being differences. A path gone
        from the project leaves the baseline; ignore rules do not apply (named paths are
        taken as they are). Returns the new baseline."""
        files: set[str] = set()
        for path in paths:
            if not path:
                continue
            if self.entry(path) is not None:
                files.add(path)
            files.update(self.entries_under(path))
            files.update(_host_files(self._project, path))
        if not files:
            return self
        data = b"".join(os.fsencode(p) + b"\0" for p in sorted(files))

        def change(env: dict[str, str]) -> None:
            args = ["update-index", "--add", "--remove", "-z", "--stdin"]
            run_git(args, env, cwd=self._project, input=data)

        return self._rewrite(change, work_tree=self._project)

    def _rewrite(
        self, change: Callable[[dict[str, str]], None], *, work_tree: Path | None = None
    ) -> WorkspaceBaseline:
        """A new baseline: this tree, changed through a temporary index, committed, and the
        record replaced atomically."""
        index = self._git_dir / f"rewrite-{secrets.token_hex(6)}.index"
        env = git_env(self._git_dir, index_file=index, work_tree=work_tree)
        try:
            run_git(["read-tree", self._tree], env)
            change(env)
            tree = run_git(["write-tree"], env).stdout.decode("ascii").strip()
        finally:
            with contextlib.suppress(FileNotFoundError):
                index.unlink()
        env = git_env(self._git_dir)
        commit = (
            run_git(["commit-tree", tree, "-m", "stockade workspace baseline"], env)
            .stdout.decode("ascii")
            .strip()
        )
        run_git(["update-ref", _BASELINE_REF, commit], env)
        host = None if self._host_git_dir is None else os.fsdecode(self._host_git_dir)
        meta: dict[str, object] = {
            "version": 1,
            "project": os.fsdecode(self._project),
            "tree": tree,
            "commit": commit,
            "head": self._head,
            "host_git_dir": host,
        }
        _write_meta(self._git_dir, meta)
        return WorkspaceBaseline(self._git_dir, self._project, meta)

    def _load(self) -> dict[str, BaselineEntry]:
        if self._entries is not None:
            return self._entries
        proc = run_git(["ls-tree", "-r", "-z", "--full-tree", self._tree], git_env(self._git_dir))
        entries: dict[str, BaselineEntry] = {}
        gitlinks: set[str] = set()
        dirs: set[str] = set()
        for record in proc.stdout.split(b"\0"):
            if not record:
                continue
            info, _, raw_path = record.partition(b"\t")
            mode_s, _type, oid = info.split(b" ")
            path = os.fsdecode(raw_path)
            mode = int(mode_s, 8)
            if mode == 0o160000:
                gitlinks.add(path)
            elif mode == 0o120000:
                entries[path] = BaselineEntry("symlink", 0, oid.decode("ascii"))
            else:
                entries[path] = BaselineEntry("file", mode & 0o777, oid.decode("ascii"))
            parts = path.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        self._sorted = sorted(entries)
        self._entries = entries
        self._gitlinks = frozenset(gitlinks)
        self._dirs = frozenset(dirs)
        return entries

    _dirs: frozenset[str] = frozenset()
    _sorted: list[str] = []


def _record_into(git_dir: Path, project: Path) -> dict[str, object]:
    env = git_env(git_dir)
    run_git(["init", "--bare", "--quiet", "--template=", str(git_dir)], env)
    os.chmod(git_dir, 0o700)
    info = git_dir / "info"
    info.mkdir(mode=0o700, exist_ok=True)
    (info / "attributes").write_bytes(_ATTRIBUTES)

    host = find_git_dirs(project)
    head: str | None = None
    excludes: list[bytes] = []
    index = git_dir / "index"
    copied = False
    trusted = True
    if host is not None:
        host_git_dir, host_common = host
        objects = (host_common / "objects").resolve()
        alternates = git_dir / "objects" / "info" / "alternates"
        alternates.parent.mkdir(parents=True, exist_ok=True)
        alternates.write_bytes(os.fsencode(objects) + b"\n")
        host_env = git_env(host_git_dir)
        proc = run_git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], host_env, check=False)
        if proc.returncode == 0:
            head = proc.stdout.decode("ascii").strip()
        exclude = read_small_file(host_common / "info" / "exclude")
        if exclude:
            excludes.append(exclude)
        trusted = _index_ids_trusted(host_common)
        if os.path.isfile(host_git_dir / "index"):
            with contextlib.suppress(OSError):
                shutil.copy2(host_git_dir / "index", index)  # keeps the mtime (racy-git)
                copied = True
    global_excludes = _global_excludes()
    if global_excludes:
        # info/exclude outranks the global file: later patterns win, so it goes last.
        excludes.insert(0, global_excludes)
    if excludes:
        (info / "exclude").write_bytes(b"\n".join(e.rstrip(b"\n") for e in excludes) + b"\n")

    work_env = git_env(git_dir, work_tree=project, index_file=index)
    if copied and _has_flagged_entries(work_env, project):
        # assume-unchanged or skip-worktree entries would keep stale or absent files.
        index.unlink()
        copied = False
    proc = _add_all(work_env, project)
    if copied and proc.returncode != 0:
        # A host index this git cannot use (split index, newer format): start fresh (files
        # tracked although ignored are then left out).
        logger.info("not reusing the host index for the workspace baseline of %s", project)
        with contextlib.suppress(FileNotFoundError):
            index.unlink()
        copied = False
        proc = _add_all(work_env, project)
    if copied and proc.returncode == 0 and (not trusted or _has_attributes(work_env, project)):
        # The host's ids may be of converted content (eol, LFS, filters): rehash the
        # tracked files with every conversion off, keeping them tracked.
        renormalize = ["add", "--renormalize", "--ignore-errors", "--", "."]
        proc = run_git(renormalize, work_env, cwd=project, check=False)
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip()
        if b"fatal:" in proc.stderr or not os.path.exists(index):
            raise WorkspaceError(
                f"could not record the workspace baseline of {str(project)!r}: {message}"
            )
        logger.warning("some project files could not be read for the baseline: %s", message)
    if not index.exists():  # an empty project: git add writes no index
        tree = _EMPTY_TREE
        run_git(["hash-object", "-t", "tree", "-w", "--stdin"], env, input=b"")
    else:
        tree = run_git(["write-tree"], work_env).stdout.decode("ascii").strip()
    commit = (
        run_git(["commit-tree", tree, "-m", "stockade workspace baseline"], env)
        .stdout.decode("ascii")
        .strip()
    )
    run_git(["update-ref", _BASELINE_REF, commit], env)
    meta: dict[str, object] = {
        "version": 1,
        "project": os.fsdecode(project),
        "tree": tree,
        "commit": commit,
        "head": head,
        "host_git_dir": None if host is None else os.fsdecode(host[0]),
    }
    _write_meta(git_dir, meta)
    return meta


def _host_files(project: Path, path: str) -> list[str]:
    """Regular files and symlinks at or below ``path`` in the project (no symlink followed,
    ``.git`` skipped)."""
    full = project.joinpath(*path.split("/"))
    try:
        st = os.lstat(full)
    except OSError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        return [path] if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else []
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(full):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        rel = Path(dirpath).relative_to(project).as_posix()
        for name in filenames:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                out.append(f"{rel}/{name}")
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                out.append(f"{rel}/{name}")
    return out


def _write_meta(git_dir: Path, meta: Mapping[str, object]) -> None:
    """Replace the baseline record atomically (write, fsync, rename)."""
    tmp = git_dir / f".{_META_NAME}.{secrets.token_hex(6)}"
    data = (json.dumps(meta, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, git_dir / _META_NAME)


def _add_all(env: Mapping[str, str], project: Path) -> subprocess.CompletedProcess[bytes]:
    return run_git(["add", "--all", "--ignore-errors", "--", "."], env, cwd=project, check=False)


def _has_flagged_entries(env: Mapping[str, str], project: Path) -> bool:
    """Whether the (copied) index marks entries assume-unchanged or skip-worktree."""
    proc = run_git(["ls-files", "-v", "-z"], env, cwd=project, check=False)
    if proc.returncode != 0:
        return True
    return any(rec[:1].islower() or rec[:2] == b"S " for rec in proc.stdout.split(b"\0") if rec)


def _has_attributes(env: Mapping[str, str], project: Path) -> bool:
    """Whether the project has any .gitattributes file (in the index just built)."""
    proc = run_git(["ls-files", "-z", "--", ":(glob)**/.gitattributes"], env, cwd=project)
    return bool(proc.stdout)


def _index_ids_trusted(host_common: Path) -> bool:
    """Whether the host index's blob ids can be taken as the files' raw bytes.

    Not when git may have converted content on the way in (``.gitattributes`` eol or
    filters such as LFS, ``core.autocrlf``): the baseline records raw bytes.
    """
    if read_small_file(host_common / "info" / "attributes"):
        return False
    config = (read_small_file(host_common / "config") or b"").lower()
    if b"autocrlf" in config or b"[filter" in config:
        return False
    if _user_config("core.autocrlf") not in (None, "false"):
        return False
    return _user_config("core.attributesFile") is None


def _user_config(key: str, *, path: bool = False) -> str | None:
    """A setting from the user's own git config (global, system), not the project's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_DIR"] = "/nonexistent"  # never the project's repository config
    argv = ["git", "config", *(["--path"] if path else []), "--get", key]
    try:
        proc = subprocess.run(
            argv, env=env, capture_output=True, stdin=subprocess.DEVNULL, check=False
        )
    except OSError:
        return None
    value = proc.stdout.strip()
    return os.fsdecode(value) if proc.returncode == 0 and value else None


def _global_excludes() -> bytes | None:
    """The user's global excludes file (core.excludesFile, else git's XDG default)."""
    path = _user_config("core.excludesFile", path=True)
    if path is None:
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        path = os.path.join(xdg, "git", "ignore")
    return read_small_file(Path(path), follow=True)


def read_small_file(path: Path, *, follow: bool = False) -> bytes | None:
    """A small regular file's bytes (a final symlink followed only with ``follow``; the
    user's own files may be symlinks into a dotfiles repository); None if unusable."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    return read_small_fd(fd)


def read_small_fd(fd: int) -> bytes | None:
    """The bytes of the regular file open at ``fd`` (which this closes); None if it is not a
    regular file, larger than the small-file limit or unreadable."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _SMALL_FILE_LIMIT:
            return None
        return os.read(fd, _SMALL_FILE_LIMIT)
    except OSError:
        return None
    finally:
        os.close(fd)
