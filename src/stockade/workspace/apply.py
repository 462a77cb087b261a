"""Plan and apply a sandbox's workspace changes to the host project, judged by content.

Every selected path is seen in three states: the baseline (what the sandbox started from: the
git tree recorded at create/reset), the sandbox (its upper layer, through a fresh diff) and the
host (the live project entry, hashed as a git blob). A path conflicts only when the host's
content or type moved away from the baseline, so a ``touch`` is no conflict; text changed on
both sides is merged three-way with ``git merge-file``. What is written goes to the host as one
all-or-nothing transaction (``txn.apply_ops``) whose operations carry the host state they were
planned against: a host edit between planning and commit aborts the whole apply.

Held back unless named in ``paths``: files that configure tools on the host (CI workflows,
editor tasks, ``stockade.toml``...) and symlinks that point outside the project. The policy's
``protected`` paths (``.git/hooks``...) are never applied. Only changes a fresh diff still
shows are applied: a diff passed in (the one a user reviewed) selects, it never supplies content.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from stockade._errors import WorkspaceConflictError, WorkspaceError
from stockade.workspace.baseline import (
    BaselineEntry,
    git_blob_id,
    git_blob_id_fd,
    git_env,
    run_git,
)
from stockade.workspace.diff import (
    FileChange,
    WorkspaceDiff,
    compute_diff,
    is_protected,
    normalize_protected,
)
from stockade.workspace.display import display_path
from stockade.workspace.layers import WorkspaceLayers, open_dir_beneath, open_file_beneath
from stockade.workspace.txn import (
    ABSENT,
    JOURNAL_DIR_NAME,
    HostState,
    Op,
    apply_ops,
    split_path,
)

__all__ = [
    "ApplyConflict",
    "ApplyResult",
    "ConflictMode",
    "apply_diff",
    "host_config_reason",
    "leaves_project",
]

logger = logging.getLogger(__name__)

ConflictMode = Literal["skip", "markers"]
ConflictKind = Literal["text", "binary", "symlink", "type", "delete"]

_SNIFF_BYTES = 8000  # like git: a NUL byte in the first 8000 bytes means binary
_MERGE_LIMIT = 64 * 1024 * 1024  # larger files are not read into memory to merge
_CHUNK = 1024 * 1024

# Files and directories that a tool on the host loads or runs by itself (on `cd`, on opening
# the folder in an editor, on `git commit`, on a push to CI, on the next `stockade run`), as
# opposed to project code that runs only when the user runs it. A sandbox rewriting one of
# them acts on the host later without anyone asking, so apply holds them back until named.
# Left out on purpose: Makefile, setup.py, conftest.py, package.json scripts (project code the
# user runs deliberately and reviews like any other change) and .gitignore / .gitattributes
# (git's attributes can only select drivers defined in git config, which is protected).
_HOST_CONFIG_FILES: dict[str, str] = {
    "stockade.toml": "stockade's own configuration, read by the next run",
    ".stockade.toml": "stockade's own configuration, read by the next run",
    "pyproject.toml": "tool settings read by pytest, ruff, build backends and stockade",
    ".envrc": "run by direnv on cd",
    ".pre-commit-config.yaml": "hooks run by git commit",
    ".gitlab-ci.yml": "CI pipeline run with the repository's secrets",
    ".travis.yml": "CI pipeline run with the repository's secrets",
    "azure-pipelines.yml": "CI pipeline run with the repository's secrets",
    "bitbucket-pipelines.yml": "CI pipeline run with the repository's secrets",
    "jenkinsfile": "CI pipeline run with the repository's secrets",
    ".drone.yml": "CI pipeline run with the repository's secrets",
    ".npmrc": "npm settings (registry, script shell) read by every npm command",
    ".yarnrc": "yarn settings read by every yarn command",
    ".yarnrc.yml": "yarn settings (yarnPath runs a script) read by every yarn command",
    ".mise.toml": "tool versions and tasks loaded by mise on cd",
    "mise.toml": "tool versions and tasks loaded by mise on cd",
}
_HOST_CONFIG_DIRS: dict[str, str] = {
    ".github": "GitHub workflows run with the repository's secrets",
    ".circleci": "CI pipeline run with the repository's secrets",
    ".buildkite": "CI pipeline run with the repository's secrets",
    ".woodpecker": "CI pipeline run with the repository's secrets",
    ".husky": "git hooks run by git commit",
    ".vscode": "editor settings and tasks loaded when the folder is opened",
    ".idea": "IDE run configurations loaded when the project is opened",
    ".devcontainer": "container definition and commands run by editors",
}


@dataclass(frozen=True)
class ApplyConflict:
    """A path changed both on the host and in the sandbox in a way that could not be merged."""

    path: str
    reason: str
    kind: ConflictKind
    #: True when the file was written with conflict markers (``conflicts="markers"``).
    written: bool = False


@dataclass(frozen=True)
class ApplyResult:
    """What an apply wrote to the host, and what it left alone with the reason why.

    ``applied``: written as the sandbox has them (parents included); ``merged``: text changed
    on both sides, merged cleanly and written; ``conflicts``: changed on both sides and not
    merged (left unapplied, or written with conflict markers when ``written``); ``held``:
    host-configuring files and symlinks leaving the project, applied only when named;
    ``skipped``: nothing to do or not applicable, with the reason; ``overwritten``: host-side
    changes replaced by the sandbox's version because of ``force=True``.
    """

    applied: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    conflicts: list[ApplyConflict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    held: list[tuple[str, str]] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The branch the agent's commits were imported to (``stockade/NAME``), if any.
    branch: str | None = None
    commits: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.applied or self.merged or any(c.written for c in self.conflicts))

    @property
    def written(self) -> list[str]:
        """Every path this apply changed on the host."""
        return sorted({*self.applied, *self.merged, *(c.path for c in self.conflicts if c.written)})

    def summary(self, limit: int = 3) -> str:
        """``"3 applied, 1 merged, 2 conflicts: a.txt (...), b.bin (...)"``: counts, then the
        first ``limit`` conflicts and held paths (names escaped for a terminal)."""
        parts = [f"{len(self.applied)} applied", f"{len(self.merged)} merged"]
        text = ", ".join(parts)
        if self.conflicts:
            shown = [f"{display_path(c.path)} ({c.reason})" for c in self.conflicts[:limit]]
            more = len(self.conflicts) - limit
            text += f", {_count(len(self.conflicts), 'conflict')}: " + ", ".join(shown)
            if more > 0:
                text += f" and {more} more"
        else:
            text += ", 0 conflicts"
        if self.held:
            shown = [display_path(p) for p, _ in self.held[:limit]]
            more = len(self.held) - limit
            text += f"; {len(self.held)} held back until named in paths: " + ", ".join(shown)
            if more > 0:
                text += f" and {more} more"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; names that are not valid UTF-8 keep their bytes as ``\\xNN`` escapes."""
        return {
            "summary": {
                "applied": len(self.applied),
                "merged": len(self.merged),
                "conflicts": len(self.conflicts),
                "held": len(self.held),
                "skipped": len(self.skipped),
            },
            "applied": [_text(p) for p in self.applied],
            "merged": [_text(p) for p in self.merged],
            "conflicts": [
                {
                    "path": _text(c.path),
                    "reason": _text(c.reason),
                    "kind": c.kind,
                    "written": c.written,
                }
                for c in self.conflicts
            ],
            "held": [{"path": _text(p), "reason": _text(r)} for p, r in self.held],
            "skipped": [{"path": _text(p), "reason": _text(r)} for p, r in self.skipped],
            "overwritten": [_text(p) for p in self.overwritten],
            "warnings": [_text(w) for w in self.warnings],
            "branch": self.branch,
            "commits": self.commits,
        }

    def audit_details(self, limit: int = 200) -> dict[str, Any]:
        """Details for the ``workspace.applied`` audit event (names safe to encode)."""
        return {
            "applied": [_text(p) for p in self.applied[:limit]],
            "merged": [_text(p) for p in self.merged[:limit]],
            "conflicts": [
                {"path": _text(c.path), "reason": _text(c.reason), "written": c.written}
                for c in self.conflicts[:limit]
            ],
            "held": [_text(p) for p, _ in self.held[:limit]],
            "skipped": [_text(p) for p, _ in self.skipped[:limit]],
            "overwritten": [_text(p) for p in self.overwritten[:limit]],
            "branch": self.branch,
            "commits": len(self.commits),
        }


def apply_diff(
    layers: WorkspaceLayers,
    diff: WorkspaceDiff | None = None,
    *,
    paths: Iterable[str] | None = None,
    protected: Iterable[str] = (),
    force: bool = False,
    conflicts: ConflictMode = "skip",
    branch: str | None = None,
    include_ignored: bool = False,
) -> ApplyResult:
    """Apply the sandbox's changes (all, or those at/under ``paths``) to ``layers.lower``.

    Conflicts (the host changed a path since the sandbox started, and so did the sandbox) are
    merged when both sides are text; a merge with conflicting regions is left unapplied
    (``conflicts="skip"``) or written with conflict markers (``conflicts="markers"``);
    ``force=True`` writes the sandbox's version over any other host change (and over text
    conflicts too unless markers are asked for); clean merges are merged whatever ``force``
    says. Files configuring host tools and symlinks leaving the project are held back
    unless named in ``paths``; protected paths are never applied. ``branch`` names the
    branch the agent's commits are imported to (``stockade/NAME``); None leaves them.
    Paths ``.gitignore`` leaves out are not applied unless ``include_ignored``.

    Raises WorkspaceError, before writing anything, for a path that could leave the project
    (absolute, ``..``, a symlinked parent on the host) or a protected path named in ``paths``;
    WorkspaceConflictError when the host changes between planning and writing (nothing is
    written then).
    """
    if conflicts not in ("skip", "markers"):
        raise ValueError(f"conflicts must be 'skip' or 'markers', not {conflicts!r}")
    protected_set = normalize_protected(protected)
    fresh = compute_diff(layers, protected=protected_set, include_ignored=include_ignored)
    reviewed = fresh if diff is None else diff
    for change in reviewed.changes:
        split_path(change.path)
    names = _normalize_names(paths)
    flagged = frozenset(c.path for c in reviewed.changes if c.protected)
    selected = _select(reviewed, names, protected_set | flagged)

    planner = _Planner(
        layers, fresh, reviewed, names=names, protected=protected_set, force=force, mode=conflicts
    )
    planner.plan(selected)
    ops = planner.ordered_ops()
    if ops:
        try:
            apply_ops(layers.lower, layers.state_dir / JOURNAL_DIR_NAME, ops)
        except WorkspaceConflictError as exc:
            raise WorkspaceConflictError(
                f"the host changed while the apply was being prepared: {exc}; apply again "
                "to judge the changes against the host as it is now",
                paths=exc.paths,
            ) from exc
    planner.advance_baseline()
    if branch is not None:
        planner.import_commits(fresh, branch)
    result = planner.result()
    for warning in result.warnings:
        logger.warning("%s", warning)
    return result


def host_config_reason(path: str) -> str | None:
    """Why ``path`` configures a tool on the host (held back by apply), or None."""
    parts = path.split("/")
    for part in parts[:-1]:
        why = _HOST_CONFIG_DIRS.get(part.lower())
        if why is not None:
            return why
    name = parts[-1].lower()
    if name in _HOST_CONFIG_DIRS:
        return _HOST_CONFIG_DIRS[name]
    if name == ".env" or name.startswith(".env."):
        return "environment loaded by direnv, docker compose and dotenv libraries"
    return _HOST_CONFIG_FILES.get(name)


def leaves_project(path: str, target: str) -> bool:
    """True when a symlink at ``path`` with ``target`` resolves outside the project root
    (absolute, or ``..`` climbing above the root from where the link is)."""
    if target.startswith("/"):
        return True
    depth = len(path.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


# --- selection --------------------------------------------------------------------------


def _normalize_names(paths: Iterable[str] | None) -> list[str] | None:
    if paths is None:
        return None
    names: list[str] = []
    for raw in paths:
        if raw.startswith("/") or "\0" in raw:
            raise WorkspaceError(f"refusing to apply {raw!r}: paths are relative to the project")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise WorkspaceError(f"refusing to apply {raw!r}: '..' could escape the project")
        names.append("/".join(parts))
    return names


def _select(
    reviewed: WorkspaceDiff, names: list[str] | None, protected: frozenset[str]
) -> list[FileChange]:
    if names is None:
        return list(reviewed.changes)
    for name in names:
        if name and is_protected(name, protected):
            raise WorkspaceError(
                f"{name!r} is a protected path and is never applied to the host; remove it "
                "from the protected list in the policy if that is really intended"
            )
        if not any(_under(c.path, name) for c in reviewed.changes):
            raise WorkspaceError(f"no change at {name!r} in the workspace diff")
    return [c for c in reviewed.changes if any(_under(c.path, n) for n in names)]


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


# --- planning ---------------------------------------------------------------------------

_Kind = Literal["absent", "file", "symlink", "dir", "other"]


@dataclass(frozen=True)
class _State:
    kind: _Kind
    oid: str | None = None
    mode: int | None = None  # permission bits (file, dir)
    target: str | None = None  # symlink
    change: FileChange | None = None  # the sandbox side: the fresh diff's entry

    def same_content(self, other: _State) -> bool:
        return self.kind == other.kind and self.oid == other.oid

    def expect(self) -> HostState:
        """What the host must still hold when the apply commits (kind and content)."""
        if self.kind in ("absent", "other"):
            return ABSENT
        return HostState(cast(Literal["file", "symlink", "dir"], self.kind), self.oid)


_ABSENT = _State("absent")
_SAME = "the host already has the sandbox's version"
_SAME_MERGED = "the host already has the sandbox's changes"


class _Planner:
    def __init__(
        self,
        layers: WorkspaceLayers,
        fresh: WorkspaceDiff,
        reviewed: WorkspaceDiff,
        *,
        names: list[str] | None,
        protected: frozenset[str],
        force: bool,
        mode: ConflictMode,
    ) -> None:
        self.layers = layers
        self.project = layers.lower
        self.baseline = layers.baseline
        self.names = names
        self.protected = protected
        self.force = force
        self.mode = mode
        self.reviewed = reviewed
        self.current: dict[str, list[FileChange]] = {}
        for change in fresh.changes:
            self.current.setdefault(change.path, []).append(change)
        self.ops: dict[str, Op] = {}
        self.replaced: dict[str, Op] = {}  # deletes that come with a new entry of another type
        self.host: dict[str, _State] = {}
        self.applied: list[str] = []
        self.merged: list[str] = []
        self.conflicts: list[ApplyConflict] = []
        self.skipped: list[tuple[str, str]] = []
        self.held: list[tuple[str, str]] = []
        self.overwritten: list[str] = []
        self.warnings: list[str] = []
        self.branch: str | None = None
        self.commits: list[str] = []
        self.sandbox: dict[str, _State] = {}

    def plan(self, selected: list[FileChange]) -> None:
        groups: dict[str, list[FileChange]] = {}
        for change in selected:
            groups.setdefault(change.path, []).append(change)
        for path, group in groups.items():
            if any(c.protected for c in group) or is_protected(path, self.protected):
                self.skipped.append((path, "protected path: never applied to the host"))
                continue
            now = self.current.get(path, [])
            if not _same_changes(group, now):
                if self._host_state(path).kind == "absent" and all(
                    c.kind == "deleted" for c in group
                ):
                    self.skipped.append((path, "already absent on the host"))
                else:
                    self.skipped.append(
                        (path, "changed in the sandbox since the diff was computed")
                    )
                continue
            self._decide(path, now)
        self._add_new_parents()
        self._check_deleted_dirs()
        self._check_parents()

    # -- one path ------------------------------------------------------------------------
    def _decide(self, path: str, now: list[FileChange]) -> None:
        new = self._sandbox_state(now)
        self.sandbox[path] = new
        if (why := self._held_reason(path, new)) is not None:
            self.held.append((path, why))
            return
        host = self._host_state(path)
        if _same(host, new):
            self.skipped.append((path, _SAME))
            return
        base = self._base_state(path)
        if not _host_moved(base, host):
            self._write(path, new, base, host)
            return
        if base.kind in ("file", "absent") and host.kind == "file" and new.kind == "file":
            self._merge(path, base, host, new)
            return
        kind, reason = _conflict(base, host, new)
        if self.force and host.kind != "other":
            self._write(path, new, base, host)
            self.overwritten.append(path)
            return
        self.conflicts.append(ApplyConflict(path, reason, kind))

    def _write(self, path: str, new: _State, base: _State, host: _State) -> None:
        change = new.change
        expect = host.expect()
        if new.kind not in ("absent", host.kind) and "dir" in (host.kind, new.kind):
            # A directory replaced by a file or the reverse: the transaction takes a delete
            # and the new entry at the same path.
            self.replaced[path] = Op(path=path, kind="delete", expect=expect)
        if new.kind == "absent":
            self.ops[path] = Op(path=path, kind="delete", expect=expect)
        elif new.kind == "dir":
            self.ops[path] = Op(path=path, kind="dir", mode=new.mode, expect=expect)
        elif new.kind == "symlink":
            self.ops[path] = Op(path=path, kind="symlink", target=new.target, expect=expect)
        else:
            assert change is not None
            self.ops[path] = Op(
                path=path,
                kind="file",
                mode=_file_mode(new, base, host),
                source=self._opener(path),
                sha256=change.new_sha256,
                expect=expect,
            )
        self.applied.append(path)
        self._note_named_config(path)

    def _merge(self, path: str, base: _State, host: _State, new: _State) -> None:
        """Three-way merge of a file changed on both sides (text only; binary conflicts)."""
        change = new.change
        assert change is not None
        host_bytes = self._read_host(path, host)
        new_bytes = self._read_upper(path, change)
        if host_bytes is None or new_bytes is None:
            return
        base_bytes = self.baseline.read(path) if base.kind == "file" else b""
        both_added = base.kind == "absent"
        reason = (
            "added on the host and in the sandbox"
            if both_added
            else "changed on the host and in the sandbox"
        )
        if any(_is_binary(b) for b in (base_bytes, host_bytes, new_bytes)):
            self._conflict_or_force(path, new, base, host, f"binary file {reason}", "binary")
            return
        merged, clean = self._merge_file(host_bytes, base_bytes, new_bytes)
        mode = _file_mode(new, base, host)
        if clean and merged == host_bytes:
            self.skipped.append((path, _SAME_MERGED))
            return
        if clean:
            self.ops[path] = Op(
                path=path, kind="file", mode=mode, data=merged, expect=host.expect()
            )
            self.merged.append(path)
            self._note_named_config(path)
            return
        if self.mode == "markers":
            self.ops[path] = Op(
                path=path, kind="file", mode=mode, data=merged, expect=host.expect()
            )
            self.conflicts.append(
                ApplyConflict(path, f"{reason}; written with conflict markers", "text", True)
            )
            self._note_named_config(path)
            return
        self._conflict_or_force(path, new, base, host, reason, "text")

    def _conflict_or_force(
        self, path: str, new: _State, base: _State, host: _State, reason: str, kind: ConflictKind
    ) -> None:
        if self.force:
            self._write(path, new, base, host)
            self.overwritten.append(path)
        else:
            self.conflicts.append(ApplyConflict(path, reason, kind))

    def _merge_file(self, ours: bytes, base: bytes, theirs: bytes) -> tuple[bytes, bool]:
        scratch = self.layers.state_dir / f"merge-{secrets.token_hex(6)}"
        os.mkdir(scratch, 0o700)
        try:
            names = []
            for label, data in (("host", ours), ("baseline", base), ("sandbox", theirs)):
                target = scratch / label
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                names.append(str(target))
            argv = ["merge-file", "-p", "-L", "host", "-L", "baseline", "-L", "sandbox", *names]
            proc = run_git(argv, git_env(self.baseline.git_dir), cwd=scratch, check=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if proc.returncode < 0 or proc.returncode > 127:
            err = proc.stderr.decode("utf-8", "replace").strip()
            raise WorkspaceError(f"git merge-file failed (exit {proc.returncode}): {err}")
        return proc.stdout, proc.returncode == 0

    # -- the three states ----------------------------------------------------------------
    def _sandbox_state(self, now: list[FileChange]) -> _State:
        last = now[-1]
        if last.kind == "deleted":
            return _ABSENT
        if last.type == "dir":
            return _State("dir", mode=last.new_mode, change=last)
        if last.type == "symlink":
            target = last.new_target or ""
            return _State("symlink", git_blob_id(os.fsencode(target)), target=target, change=last)
        # The diff carries git's modes (0o644/0o755); a new file gets the sandbox's own
        # permission bits (a 0o600 file stays private).
        fd = self._opener(last.path)()
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode) & 0o777
            oid = last.new_oid if last.new_oid is not None else git_blob_id_fd(fd)
        finally:
            os.close(fd)
        return _State("file", oid, mode=mode, change=last)

    def _base_state(self, path: str) -> _State:
        entry = self.baseline.entry(path)
        if entry is None:
            return _ABSENT
        return _State(entry.kind, entry.oid, mode=entry.mode or None)

    def _host_state(self, path: str) -> _State:
        if path in self.host:
            return self.host[path]
        state = _host_state(self.project, path)
        self.host[path] = state
        return state

    def _opener(self, path: str) -> Callable[[], int]:
        upper, parts = self.layers.upper, split_path(path)
        return lambda: open_file_beneath(upper, parts, owned=True)

    def _read_upper(self, path: str, change: FileChange) -> bytes | None:
        try:
            fd = self._opener(path)()
        except OSError:
            self.skipped.append((path, "changed in the sandbox while applying"))
            return None
        try:
            data = _read_limited(fd)
        finally:
            os.close(fd)
        if data is None:
            self.conflicts.append(
                ApplyConflict(path, "changed on both sides; too large to merge", "binary")
            )
            return None
        if hashlib.sha256(data).hexdigest() != change.new_sha256:
            self.skipped.append((path, "changed in the sandbox while applying"))
            return None
        return data

    def _read_host(self, path: str, host: _State) -> bytes | None:
        parts = split_path(path)
        try:
            fd = open_file_beneath(self.project, parts)
        except OSError:
            data = None
        else:
            try:
                data = _read_limited(fd)
            finally:
                os.close(fd)
        if data is None:
            self.conflicts.append(
                ApplyConflict(path, "changed on both sides; too large to merge", "binary")
            )
            return None
        if git_blob_id(data) != host.oid:
            self.conflicts.append(
                ApplyConflict(path, "changing on the host during the apply", "text")
            )
            return None
        return data

    # -- held back: host configuration, symlinks leaving the project ----------------------
    def _held_reason(self, path: str, new: _State) -> str | None:
        why = host_config_reason(path)
        if why is not None and not self._named_config(path):
            return f"configures a tool on the host: {why}"
        if (
            new.kind == "symlink"
            and new.target is not None
            and leaves_project(path, new.target)
            and path not in (self.names or ())
        ):
            return f"symlink pointing outside the project (to {display_path(new.target)})"
        return None

    def _named_config(self, path: str) -> bool:
        """Named exactly, through a directory that is itself host configuration, or a new
        directory that a named path needs (``.github`` for ``.github/workflows/ci.yml``)."""
        for name in self.names or ():
            if name == path or _under(name, path):
                return True
            if name and _under(path, name) and host_config_reason(name) is not None:
                return True
        return False

    def _note_named_config(self, path: str) -> None:
        why = host_config_reason(path)
        if why is not None and self.sandbox[path].kind != "dir":
            self.warnings.append(
                f"applied {display_path(path)}, which configures a tool on the host ({why}): "
                "it was named explicitly; review it before that tool next runs"
            )

    # -- consistency of the whole plan ---------------------------------------------------
    def _add_new_parents(self) -> None:
        """A selected change in a new directory (``paths=["new/dir/f.py"]``) brings the
        directories the sandbox added above it, if the reviewed diff shows them too."""
        for path in list(self.ops):
            if self.ops[path].kind == "delete":
                continue
            parts = path.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in self.ops:
                    continue
                group = self.current.get(parent, [])
                if not any(c.kind == "added" and c.type == "dir" for c in group):
                    continue
                if any(c.protected for c in group) or is_protected(parent, self.protected):
                    continue
                if not all(any(c.same_change(r) for r in self.reviewed.changes) for c in group):
                    continue
                self._decide(parent, group)

    def _check_deleted_dirs(self) -> None:
        """Delete a directory only when nothing the host holds in it is kept."""
        deleting = {p for p, op in self.ops.items() if op.kind == "delete"}
        going = deleting | {p for p in self.replaced if p in self.ops}
        for path in sorted(going, key=lambda p: p.split("/")):
            if path not in self.ops or self._host_state(path).kind != "dir":
                continue
            kept = _first_kept(self.project, path, deleting)
            if kept is None:
                continue
            why = f"the host keeps {display_path(kept)} in it, which the sandbox did not delete"
            deleting.discard(path)
            if path in self.replaced:
                # Replacing the directory is one change: its deletions go with it.
                self._drop(path, why)
                for child in [p for p in self.ops if p.startswith(path + "/")]:
                    del self.ops[child]
                    self.applied.remove(child)
                    deleting.discard(child)
                    self.skipped.append(
                        (child, f"part of replacing {display_path(path)}, which conflicts")
                    )
            else:
                del self.ops[path]
                self.applied.remove(path)
                self.skipped.append((path, why))

    def _check_parents(self) -> None:
        """Refuse symlinked parents; a change whose parent the host removed or replaced with
        a file (and that this apply does not create) is a conflict."""
        made = {p for p, op in self.ops.items() if op.kind == "dir"}
        for path in sorted(self.ops, key=lambda p: p.split("/")):
            if self.ops[path].kind == "delete":
                continue
            parts = path.split("/")
            for i in range(1, len(parts)):
                prefix = "/".join(parts[:i])
                if prefix in made:
                    break  # created or replaced by this apply, through O_NOFOLLOW fds
                problem = _parent_problem(self.project, path, prefix)
                if problem is not None:
                    self._drop(path, problem)
                    break

    def _drop(self, path: str, reason: str) -> None:
        self.ops.pop(path, None)
        for listing in (self.applied, self.merged):
            if path in listing:
                listing.remove(path)
        self.conflicts = [c for c in self.conflicts if c.path != path]
        self.conflicts.append(ApplyConflict(path, reason, "delete"))

    def ordered_ops(self) -> list[Op]:
        deletes = [op for op in self.ops.values() if op.kind == "delete"]
        deletes += [op for path, op in self.replaced.items() if path in self.ops]
        writes = [op for op in self.ops.values() if op.kind != "delete"]
        deletes.sort(key=lambda op: op.path.split("/"), reverse=True)
        writes.sort(key=lambda op: op.path.split("/"))
        return deletes + writes

    def advance_baseline(self) -> None:
        """What the host now has from the sandbox becomes the baseline of those paths, so
        the diff stops showing them and a later host edit there is seen as one."""
        done = {*self.applied, *self.merged, *(c.path for c in self.conflicts if c.written)}
        done.update(p for p, why in self.skipped if why in (_SAME, _SAME_MERGED))
        updates = {
            p: self.sandbox[p]
            for p in done
            if p in self.sandbox and self.sandbox[p].kind in ("file", "symlink", "absent")
        }
        if not updates:
            return
        try:
            _advance_baseline(self.layers, updates)
        except (OSError, WorkspaceError) as exc:
            self.warnings.append(
                f"the workspace baseline was not advanced past this apply ({exc}); the diff "
                "keeps showing the applied paths, and applying them again changes nothing"
            )

    def _held_shown(self) -> list[tuple[str, str]]:
        """Held paths, leaving out a new directory whose held contents say it already."""
        paths = [p for p, _ in self.held]
        return [
            (path, why)
            for path, why in self.held
            if self.sandbox[path].kind != "dir" or not any(p.startswith(path + "/") for p in paths)
        ]

    def import_commits(self, fresh: WorkspaceDiff, branch: str) -> None:
        """The agent's commits become ``branch`` on the host, through git's object transfer
        (never the host's HEAD, index or existing refs)."""
        if not fresh.commits:
            return
        from stockade.workspace.gitrepo import import_commits

        try:
            self.commits = import_commits(self.layers, self.project, branch)
        except WorkspaceError as exc:
            self.warnings.append(f"the sandbox's commits were not imported to {branch}: {exc}")
            return
        self.branch = branch

    def result(self) -> ApplyResult:
        return ApplyResult(
            applied=sorted(self.applied, key=lambda p: p.split("/")),
            merged=sorted(self.merged, key=lambda p: p.split("/")),
            conflicts=sorted(self.conflicts, key=lambda c: c.path.split("/")),
            skipped=sorted(self.skipped, key=lambda s: s[0].split("/")),
            held=sorted(self._held_shown(), key=lambda s: s[0].split("/")),
            overwritten=sorted(self.overwritten, key=lambda p: p.split("/")),
            warnings=list(self.warnings),
            branch=self.branch,
            commits=list(self.commits),
        )


def _advance_baseline(layers: WorkspaceLayers, updates: dict[str, _State]) -> None:
    """Make the sandbox's version of each path (or its absence) the baseline's, storing the
    sandbox's blobs in the baseline repository."""
    baseline = layers.baseline
    env = git_env(baseline.git_dir)
    entries: dict[str, BaselineEntry | None] = {}
    for path, state in updates.items():
        if state.kind == "absent":
            entries[path] = None
            continue
        if state.kind == "symlink":
            oid = _store_blob(env, data=os.fsencode(state.target or ""))
            entry = BaselineEntry("symlink", 0, oid)
        else:
            fd = open_file_beneath(layers.upper, split_path(path), owned=True)
            try:
                oid = _store_blob(env, fd=fd)
            finally:
                os.close(fd)
            entry = BaselineEntry("file", 0o755 if _exec(state.mode) else 0o644, oid)
        if oid == state.oid:  # else changed in the sandbox since: its diff entry stays
            entries[path] = entry
    baseline.advance(entries)


def _store_blob(env: dict[str, str], *, data: bytes | None = None, fd: int | None = None) -> str:
    """Write a blob into the repository of ``env`` (content given, or read from ``fd``)."""
    argv = ["git", "hash-object", "-w", "--no-filters", "--stdin"]
    proc = subprocess.run(
        argv,
        env=env,
        input=data,
        stdin=fd if data is None else None,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip()
        raise WorkspaceError(f"git hash-object failed: {message}")
    return proc.stdout.decode("ascii").strip()


# --- helpers ----------------------------------------------------------------------------


def _same_changes(group: list[FileChange], now: list[FileChange]) -> bool:
    return len(group) == len(now) and all(any(c.same_change(n) for n in now) for c in group)


def _same(host: _State, new: _State) -> bool:
    """The host already holds what the sandbox would write."""
    if host.kind != new.kind or host.oid != new.oid:
        return False
    if new.kind == "dir":
        return host.mode == new.mode
    if new.kind == "file":
        return _exec(host.mode) == _exec(new.mode)
    return True


def _host_moved(base: _State, host: _State) -> bool:
    """Did the host's content or type change since the baseline? (Not its times or mode.)"""
    if host.kind == "dir" and base.kind in ("dir", "absent"):
        return False  # git records no directories, so an existing one is no change
    return not base.same_content(host)


def _conflict(base: _State, host: _State, new: _State) -> tuple[ConflictKind, str]:
    if new.kind == "absent":
        return "delete", f"changed on the host, deleted in the sandbox ({_noun(host)} on the host)"
    if host.kind == "absent":
        return "delete", "deleted on the host, changed in the sandbox"
    if host.kind != new.kind:
        return "type", f"{_noun(host)} on the host, {_noun(new)} in the sandbox"
    if new.kind == "symlink":
        return "symlink", "symlink changed on the host and in the sandbox"
    if base.kind == "absent":
        return "binary", "added on the host and in the sandbox"
    return "binary", "changed on the host and in the sandbox"


def _noun(state: _State) -> str:
    return {
        "file": "a file",
        "symlink": "a symlink",
        "dir": "a directory",
        "absent": "nothing",
        "other": "a special file",
    }[state.kind]


def _exec(mode: int | None) -> bool:
    return bool((mode or 0) & 0o100)  # git's executable bit: the owner's


def _file_mode(new: _State, base: _State, host: _State) -> int | None:
    """The host's mode for a file it has (git, and so the baseline, knows only the execute
    bit: a change of it in the sandbox is carried over), the sandbox's for a new one."""
    if host.kind != "file" or host.mode is None:
        return new.mode
    if base.kind != "file" or _exec(new.mode) == _exec(base.mode):
        return host.mode
    if _exec(new.mode):
        return host.mode | (host.mode & 0o444) >> 2
    return host.mode & ~0o111


def _is_binary(data: bytes) -> bool:
    return b"\0" in data[:_SNIFF_BYTES]


def _read_limited(fd: int) -> bytes | None:
    if os.fstat(fd).st_size > _MERGE_LIMIT:
        return None
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, _CHUNK):
        total += len(chunk)
        if total > _MERGE_LIMIT:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parent_problem(project: Path, path: str, prefix: str) -> str | None:
    """Why host directory ``prefix`` cannot hold ``path`` (None: it is a real directory).
    A symlink raises: writing through it could leave the project."""
    st = _lstat_or_none(project / prefix)
    if st is None:
        return f"its directory {display_path(prefix)} was removed on the host"
    if stat.S_ISLNK(st.st_mode):
        raise WorkspaceError(
            f"refusing to apply {display_path(path)}: its parent {display_path(prefix)} is a "
            "symlink on the host, writing through it could leave the project"
        )
    if not stat.S_ISDIR(st.st_mode):
        return f"its directory {display_path(prefix)} is not a directory on the host"
    return None


def _host_state(project: Path, path: str) -> _State:
    parts = path.split("/")
    try:
        dir_fd = open_dir_beneath(project, tuple(parts[:-1]))
    except OSError:
        for i in range(1, len(parts)):
            if _parent_problem(project, path, "/".join(parts[:i])) is not None:
                break  # raised for a symlink; missing or not a directory: absent
        return _ABSENT
    try:
        try:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return _ABSENT
        if stat.S_ISDIR(st.st_mode):
            return _State("dir", mode=stat.S_IMODE(st.st_mode) & 0o777)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(parts[-1], dir_fd=dir_fd)
            return _State("symlink", git_blob_id(os.fsencode(target)), target=target)
        if not stat.S_ISREG(st.st_mode):
            return _State("other")
        fd = os.open(
            parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
        try:
            return _State("file", git_blob_id_fd(fd), mode=stat.S_IMODE(st.st_mode) & 0o777)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def _first_kept(project: Path, path: str, deleting: set[str]) -> str | None:
    """An entry under host directory ``path`` that this apply does not delete, if any."""
    try:
        fd = open_dir_beneath(project, tuple(path.split("/")))
    except OSError:
        return None
    try:
        names = sorted(os.listdir(fd))
        for name in names:
            child = f"{path}/{os.fsdecode(name)}"
            if child not in deleting:
                return child
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and (kept := _first_kept(project, child, deleting)):
                    return kept
    finally:
        os.close(fd)
    return None


def _lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _text(name: str) -> str:
    """A name safe to encode as UTF-8 (JSON, audit): undecodable bytes as ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
