"""The state store: which sandboxes exist, in SQLite, plus one private directory per sandbox.

Location: ``$STOCKADE_STATE_DIR``, else ``$XDG_STATE_HOME/stockade``, else
``~/.local/state/stockade``. Each store keeps one connection (WAL, busy timeout,
``synchronous = NORMAL``), opened on first use and reopened in a forked child; every write
is its own ``BEGIN IMMEDIATE`` transaction, so several CLI processes and supervisors can use
the store at once. NORMAL in WAL mode never corrupts the database; a power loss may drop the
last commits, which only describe sandboxes that did not survive it either (``reconcile``
marks what is left as lost).

A full disk must not lock the user out: when SQLite cannot open the database for writing
(WAL needs its ``-shm`` index to grow), reads fall back to a read-only connection, so
``ls``, ``diff`` and ``rm`` still work, and a write reopens a writable connection (``rm``
frees space first). A write that still cannot proceed raises ``DiskFullError``.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import difflib
import errno
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote

from stockade._errors import ConfigError, DiskFullError, SandboxNotFoundError

__all__ = [
    "SandboxRecord",
    "SandboxStatus",
    "StateStore",
    "default_state_dir",
    "disk_full_error",
    "free_bytes",
    "is_disk_full",
    "process_start_time",
    "validate_name",
]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_ID_RE = re.compile(r"^[a-z0-9]{8,64}$")
_BUSY_TIMEOUT_MS = 10_000
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
#: Below this many free bytes a SQLite I/O error is taken for a full disk, and no sandbox
#: starts (its directories, layers and logs need room).
MIN_FREE_BYTES = 1 << 20

logger = logging.getLogger(__name__)
#: Connections a forked child inherited: kept referenced so they are never closed there.
_INHERITED: list[sqlite3.Connection] = []

# _MIGRATIONS[n] takes the schema from version n to n + 1 (PRAGMA user_version).
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sandboxes (
        name TEXT PRIMARY KEY,
        id TEXT UNIQUE NOT NULL,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        policy_hash TEXT,
        policy_json TEXT,
        workspace TEXT,
        dir TEXT,
        supervisor_pid INTEGER,
        supervisor_start INTEGER,
        control_socket TEXT,
        error TEXT
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

_ADJECTIVES = (
    "brave", "calm", "clever", "eager", "fancy", "gentle", "happy", "jolly", "keen",
    "lively", "lucky", "merry", "nimble", "proud", "quick", "quiet", "sharp", "shy",
    "steady", "swift", "tidy", "vivid", "warm", "wise", "witty", "zesty",
)  # fmt: skip
_ANIMALS = (
    "badger", "beaver", "bison", "crane", "dingo", "eagle", "ferret", "gecko", "heron",
    "ibis", "jackal", "koala", "lemur", "lynx", "marten", "newt", "otter", "panda",
    "puffin", "quokka", "raven", "seal", "tapir", "urchin", "vole", "walrus", "yak", "zebra",
)  # fmt: skip


class SandboxStatus(StrEnum):
    """Lifecycle: created -> starting -> running -> stopping -> stopped | failed."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class SandboxRecord:
    """One row of the ``sandboxes`` table."""

    name: str
    id: str
    backend: str
    status: SandboxStatus
    created_at: float
    updated_at: float
    policy_hash: str | None = None
    policy_json: str | None = None
    workspace: str | None = None
    dir: str | None = None
    supervisor_pid: int | None = None
    supervisor_start: int | None = None  # /proc/<pid>/stat field 22, against pid reuse
    control_socket: str | None = None
    error: str | None = None


_COLUMNS = tuple(f.name for f in fields(SandboxRecord))
_UPDATABLE = frozenset(_COLUMNS) - {"name", "id", "created_at"}
_INSERT_SQL = (  # built from the dataclass's own field names, never from input
    f"INSERT INTO sandboxes ({', '.join(_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid sandbox name, else raise ConfigError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid sandbox name {name!r}: use 1-63 characters from a-z, 0-9, '_', '.' "
            "and '-', starting with a letter or digit"
        )
    return name


def _validate_id(sandbox_id: str) -> str:
    # The id names a directory: it must never be able to walk out of the state dir.
    if not isinstance(sandbox_id, str) or not _ID_RE.match(sandbox_id):
        raise ConfigError(f"invalid sandbox id {sandbox_id!r}: expected 8-64 of a-z and 0-9")
    return sandbox_id


def default_state_dir() -> Path:
    """``$STOCKADE_STATE_DIR``, else ``$XDG_STATE_HOME/stockade``, else ~/.local/state."""
    explicit = os.environ.get("STOCKADE_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are ignored
        return Path(xdg) / "stockade"
    return Path.home() / ".local" / "state" / "stockade"


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (/proc/<pid>/stat field 22).

    None if there is no such process or it is a zombie: a dead supervisor.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses; the fields after its last ')' are
    # 3 (state) onwards.
    rest = text.rsplit(")", 1)[-1].split()
    if len(rest) < 20 or rest[0] in ("Z", "X"):
        return None
    try:
        return int(rest[19])
    except ValueError:
        return None


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """True if ``exc`` (an OSError or sqlite3 error) means the disk of ``path`` is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == _SQLITE_FULL or "database or disk is full" in str(exc):
        return True
    # WAL's shared-memory index grows by writing to its -shm file: on a full disk that is
    # an I/O error (SQLITE_IOERR_SHMSIZE), not SQLITE_FULL.
    return primary == _SQLITE_IOERR and free_bytes(path) < MIN_FREE_BYTES


def disk_full_error(root: Path) -> DiskFullError:
    """The error for a state directory whose disk is full, saying how to free space."""
    free = free_bytes(root)
    return DiskFullError(
        f"the state directory {root}'s disk is full ({free} bytes free): free space, e.g. "
        "`stockade rm NAME` of sandboxes you no longer need (`stockade ls` lists them), "
        "or set STOCKADE_STATE_DIR to a directory on another disk",
        path=str(root),
        free_bytes=free,
    )


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"state directory {path} belongs to uid {st.st_uid}, not to you (uid "
            f"{os.geteuid()}); set STOCKADE_STATE_DIR to a directory of your own"
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch a new store to WAL. Two processes opening a new store at once both try; the
    switch needs the database to itself and SQLite answers SQLITE_BUSY at once (no busy
    handler for it), so wait and look again: the other one may have switched it already."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class StateStore:
    """The sandboxes known on this machine, for this user."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_state_dir()
        _ensure_private_dir(self.root)
        _ensure_private_dir(self.root / "sandboxes")
        self.db_path = self.root / "state.db"
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._conn_pid = 0
        self._read_only = False
        self._migrate()

    def __repr__(self) -> str:
        return f"StateStore({str(self.root)!r})"

    @property
    def read_only(self) -> bool:
        """True while the store reads through a read-only connection (its disk was full)."""
        return self._read_only

    def check_writable(self) -> None:
        """Raise DiskFullError unless a sandbox can be added now (the disk has room)."""
        with self._lock:
            try:
                self._connection(write=True)
            except sqlite3.Error as exc:
                if is_disk_full(exc, self.root):
                    raise disk_full_error(self.root) from exc
                raise
        if free_bytes(self.root) < MIN_FREE_BYTES:
            raise disk_full_error(self.root)

    @contextlib.contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        # Autocommit mode with explicit transactions; BEGIN IMMEDIATE takes the write lock
        # up front, so concurrent writers wait (busy_timeout) instead of failing mid-way.
        # One connection per store (opening one costs a few ms, closing the last one
        # checkpoints the WAL with an fsync); the lock serialises threads on it.
        with self._lock:
            try:
                conn = self._connection(write=write)
                if write:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield conn
                    except BaseException:
                        # SQLite may already have rolled back (SQLITE_FULL does).
                        if conn.in_transaction:
                            with contextlib.suppress(sqlite3.Error):
                                conn.execute("ROLLBACK")
                        raise
                    try:
                        conn.execute("COMMIT")
                    except BaseException:
                        # The connection outlives this call: never leave a transaction open.
                        if conn.in_transaction:
                            with contextlib.suppress(sqlite3.Error):
                                conn.execute("ROLLBACK")
                        raise
                else:
                    yield conn
            except sqlite3.OperationalError as exc:
                if is_disk_full(exc, self.root):
                    raise disk_full_error(self.root) from exc
                raise

    def _connection(self, *, write: bool = False) -> sqlite3.Connection:
        if self._conn is not None and self._conn_pid == os.getpid():
            if not (write and self._read_only):
                return self._conn
            # A read-only fallback cannot write; space may have been freed since it opened.
            self._conn.close()
            self._conn = None
        # A connection must not cross fork(): the child opens its own, and never closes the
        # parent's (closing may checkpoint or unlock what the parent still uses).
        if self._conn is not None:
            _INHERITED.append(self._conn)
            self._conn = None
        try:
            conn = self._open(f"file:{quote(str(self.db_path))}")
            self._read_only = False
        except sqlite3.OperationalError as exc:
            if write or not is_disk_full(exc, self.root):
                raise
            conn = self._open_read_only(exc)
            self._read_only = True
        self._conn, self._conn_pid = conn, os.getpid()
        return conn

    def _open(self, uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.row_factory = sqlite3.Row
            # Reading the header maps WAL's shared-memory index: this is where a full disk
            # shows (the -shm file cannot grow), so fail here rather than mid-command.
            conn.execute("PRAGMA user_version").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_read_only(self, cause: sqlite3.Error) -> sqlite3.Connection:
        """A connection that reads without writing a byte: for a store on a full disk."""
        path = quote(str(self.db_path))
        try:
            # Read-only still needs the -shm index when another process has it open ...
            conn = self._open(f"file:{path}?mode=ro")
        except sqlite3.OperationalError:
            # ... and with none open, immutable reads the database file alone: what the
            # last writer checkpointed, which closing its connection does.
            conn = self._open(f"file:{path}?immutable=1")
        logger.warning(
            "state directory %s: the disk is full (%s, %d bytes free); reading it read-only",
            self.root,
            cause,
            free_bytes(self.root),
        )
        return conn

    def close(self) -> None:
        """Close this store's connection (the next call opens a new one)."""
        with self._lock:
            if self._conn is not None:
                if self._conn_pid == os.getpid():
                    self._conn.close()
                else:
                    _INHERITED.append(self._conn)
            self._conn = None

    def _migrate(self) -> None:
        with self._connect() as conn:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if self._read_only:
                # A full disk: read what is there; a store that needs a migration must wait.
                if current != SCHEMA_VERSION:
                    raise disk_full_error(self.root)
                return
            # Both are persistent in the file: a store that is already WAL and current
            # costs two reads here, no write.
            _enable_wal(conn)
        with contextlib.suppress(OSError):
            if stat.S_IMODE(self.db_path.stat().st_mode) != 0o600:
                self.db_path.chmod(0o600)
        if current == SCHEMA_VERSION:
            return
        with self._connect(write=True) as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.db_path} has schema version {version}, newer than this stockade "
                    f"understands ({SCHEMA_VERSION}); upgrade stockade or set "
                    "STOCKADE_STATE_DIR to another directory"
                )
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """The private directory of one sandbox, ``<root>/sandboxes/<id>``, created 0700."""
        path = self.root / "sandboxes" / _validate_id(sandbox_id)
        _ensure_private_dir(path)
        return path

    @staticmethod
    def new_id() -> str:
        """A fresh random sandbox id (16 hex characters)."""
        return secrets.token_hex(8)

    def new_name(self) -> str:
        """A friendly name no sandbox uses yet, like ``brave-otter-1a2b``."""
        with self._connect() as conn:
            taken = {row[0] for row in conn.execute("SELECT name FROM sandboxes")}
        while True:
            name = (
                f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_ANIMALS)}-{secrets.token_hex(2)}"
            )
            if name not in taken:
                return name

    def insert(self, record: SandboxRecord) -> SandboxRecord:
        """Add a sandbox. ConfigError if the name (or id) is taken or invalid."""
        validate_name(record.name)
        _validate_id(record.id)
        values = [_to_db(getattr(record, column)) for column in _COLUMNS]
        try:
            with self._connect(write=True) as conn:
                conn.execute(_INSERT_SQL, values)
        except sqlite3.IntegrityError as exc:
            if "sandboxes.name" in str(exc):
                raise ConfigError(_taken_message(record.name)) from exc
            raise ConfigError(f"a sandbox with id {record.id!r} already exists") from exc
        return record

    def check_name_free(self, name: str) -> None:
        """ConfigError if ``name`` is invalid or a sandbox has it (``insert`` claims it)."""
        validate_name(name)
        with self._connect() as conn:
            row = conn.execute("SELECT 1 FROM sandboxes WHERE name = ?", (name,)).fetchone()
        if row is not None:
            raise ConfigError(_taken_message(name))

    def get(self, name: str) -> SandboxRecord:
        """The sandbox called ``name``; SandboxNotFoundError (with close names) if none."""
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return _from_row(row)
            names = [r[0] for r in conn.execute("SELECT name FROM sandboxes")]
        raise SandboxNotFoundError(_not_found_message(name, names))

    def update(self, name: str, /, **changes: object) -> SandboxRecord:
        """Change some fields of a sandbox (``updated_at`` is set to now); return the row."""
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ConfigError(
                f"cannot update {', '.join(sorted(unknown))}; updatable fields: "
                f"{', '.join(sorted(_UPDATABLE))}"
            )
        if "status" in changes:
            changes["status"] = _status(changes["status"])
        changes.setdefault("updated_at", time.time())
        assignments = ", ".join(f"{column} = ?" for column in changes)
        values = [_to_db(v) for v in changes.values()]
        with self._connect(write=True) as conn:
            cursor = conn.execute(
                f"UPDATE sandboxes SET {assignments} WHERE name = ?",  # noqa: S608 - columns are checked
                [*values, name],
            )
            if cursor.rowcount == 0:
                names = [r[0] for r in conn.execute("SELECT name FROM sandboxes")]
                raise SandboxNotFoundError(_not_found_message(name, names))
            row = conn.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
        return _from_row(row)

    def delete(self, name: str, *, sandbox_id: str | None = None) -> SandboxRecord:
        """Remove a sandbox's row and return it. Its directory is left to the caller, who
        must tear down mounts in it before removing it.

        ``sandbox_id``: delete only if the row is still that sandbox's (a name can be
        reused); SandboxNotFoundError otherwise."""
        with self._connect(write=True) as conn:
            row = conn.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
            if row is None or (sandbox_id is not None and row["id"] != sandbox_id):
                names = [r[0] for r in conn.execute("SELECT name FROM sandboxes")]
                raise SandboxNotFoundError(_not_found_message(name, names))
            conn.execute("DELETE FROM sandboxes WHERE name = ?", (name,))
        return _from_row(row)

    def reconcile(self, record: SandboxRecord) -> SandboxRecord:
        """Mark a starting/running sandbox failed if its supervisor is gone; return the row.

        A pid alone is not proof of life (pids are reused), so its start time must match
        the one recorded when the supervisor started.
        """
        if record.status not in (SandboxStatus.STARTING, SandboxStatus.RUNNING):
            return record
        pid = record.supervisor_pid
        if pid is None:
            return record
        started = process_start_time(pid)
        if started is not None and (
            record.supervisor_start is None or started == record.supervisor_start
        ):
            return record
        error = f"supervisor process {pid} died"
        try:
            row = self._mark_failed(record, error)
        except DiskFullError:
            # Reading must work on a full disk: report the death without recording it.
            return dataclasses.replace(record, status=SandboxStatus.FAILED, error=error)
        if row is None:
            raise SandboxNotFoundError(_not_found_message(record.name, []))
        return _from_row(row)

    def _mark_failed(self, record: SandboxRecord, error: str) -> sqlite3.Row | None:
        pid = record.supervisor_pid
        with self._connect(write=True) as conn:
            # Only if nobody changed the row meanwhile (e.g. a new supervisor took over).
            conn.execute(
                "UPDATE sandboxes SET status = ?, error = ?, updated_at = ? "
                "WHERE name = ? AND status = ? AND supervisor_pid IS ? "
                "AND supervisor_start IS ?",
                (
                    SandboxStatus.FAILED.value,
                    error,
                    time.time(),
                    record.name,
                    record.status.value,
                    pid,
                    record.supervisor_start,
                ),
            )
            row: sqlite3.Row | None = conn.execute(
                "SELECT * FROM sandboxes WHERE name = ?", (record.name,)
            ).fetchone()
        return row

    # Defined last: inside the class body, later annotations would see this method.
    def list(self) -> builtins.list[SandboxRecord]:
        """Every sandbox, oldest first."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM sandboxes ORDER BY created_at, name").fetchall()
        return [_from_row(row) for row in rows]


def _status(value: object) -> SandboxStatus:
    try:
        return SandboxStatus(value if isinstance(value, str) else repr(value))
    except ValueError:
        choices = ", ".join(s.value for s in SandboxStatus)
        raise ConfigError(f"invalid sandbox status {value!r}; one of: {choices}") from None


def _to_db(value: object) -> object:
    if isinstance(value, SandboxStatus):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def _from_row(row: sqlite3.Row) -> SandboxRecord:
    data = {column: row[column] for column in _COLUMNS}
    data["status"] = _status(data["status"])
    return SandboxRecord(**data)


def _taken_message(name: str) -> str:
    return f"a sandbox named {name!r} already exists; pick another name or `stockade rm {name}`"


def _not_found_message(name: str, names: builtins.list[str]) -> str:
    message = f"no sandbox named {name!r}"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        message += f"; did you mean {', '.join(repr(c) for c in close)}?"
    return message + " (`stockade ls` lists them)"
