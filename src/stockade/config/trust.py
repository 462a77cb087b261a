"""Trust in project config files: which settings weaken the sandbox, and who may set them.

A project file (``stockade.toml``, ``[tool.stockade]`` in ``pyproject.toml``) comes with the
repository, so whoever can write to the repository (or an agent whose change was applied)
chooses its values. Settings that weaken isolation are honoured from it only once the user
has trusted the file as it is now, as direnv's ``allow`` and VS Code's workspace trust do:
``stockade trust`` records the file's sha256 under its absolute path, and any change to the
file makes it untrusted again. The user's own config file, the environment, CLI flags and
SDK arguments are the user's word and need no trust.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade._errors import ConfigError
from stockade.config.models import EnvConfig, StockadeConfig
from stockade.policy.rules import RuleError, parse_rule
from stockade.policy.secret_config import SecretConfig

__all__ = [
    "SAFE_RUNTIMES",
    "TRUST_FILE",
    "TrustRecord",
    "TrustStore",
    "UntrustedConfigError",
    "Weakening",
    "file_digest",
    "secret_weakening",
    "trust_key",
    "weakening_reason",
]

TRUST_FILE = "trusted.json"
_VERSION = 1
#: OCI runtimes a project file may choose for docker/podman: each isolates at least as well
#: as the engine's default. Any other name is whatever the engine's configuration maps it
#: to (a GPU hook, a wrapper script), so only the user may choose it.
SAFE_RUNTIMES = frozenset(
    {
        "runc",
        "crun",
        "runsc",
        "sysbox-runc",
        "youki",
        "kata",
        "kata-runtime",
        "io.containerd.runc.v2",
        "io.containerd.runsc.v1",
        "io.containerd.kata.v2",
    }
)
#: Addresses of the host itself, the local network and cloud metadata: a rule naming any
#: of them by address lets the sandbox reach services that trust the machine it runs on.
_LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::/128",
        "::1/128",
        "::ffff:0:0/96",
        "fc00::/7",
        "fe80::/10",
    )
)
_DEFAULT_PASS: tuple[str, ...] = EnvConfig.model_fields["pass_"].default


# ---------------------------------------------------------------------------------------------
# What weakens the sandbox


@dataclass(frozen=True)
class Weakening:
    """One setting of an untrusted project file that would weaken the sandbox."""

    key: str  #: dotted key, e.g. ``backend`` or ``secrets.GITHUB_TOKEN``
    value: str  #: the value as shown to a human, e.g. ``'host'``
    reason: str  #: what it would do
    where: str  #: where it was written: "/p/stockade.toml [workspace]"
    fix_cli: str = ""  #: a command-line option that overrides it safely, if there is one
    fix_sdk: str = ""  #: a Sandbox.create argument that overrides it safely, if there is one


def weakening_reason(
    key: str,
    value: Any,
    *,
    config: StockadeConfig,
    project_root: Path,
    user_pass: Sequence[str] = (),
) -> str | None:
    """Why the value of dotted ``key`` weakens the sandbox, or None if a project may set it.

    ``config`` is the merged configuration (``unsafe_host`` matters only with the host
    backend, ``workspace.path`` only with a workspace); ``project_root`` is the resolved
    project directory; ``user_pass`` the ``env.pass`` names the user's own file lists.
    Network rules naming public hosts, limits, ``env.set`` and the like are ordinary project
    configuration: they never reach past what the sandbox is given.
    """
    if key == "backend" and value == "host":
        return "the host backend runs commands without any isolation"
    if key == "unsafe_host" and value is True and config.backend == "host":
        return "it lets the host backend run commands without any isolation"
    if key == "workspace.mode" and value == "rw":
        return "the sandbox would write straight into the host's files, with no review"
    outside = key == "workspace.path" and config.workspace.mode != "none"
    if outside and not _inside(Path(value), project_root):
        return f"it shares a host directory outside the project {project_root}"
    if key == "env.pass":
        extra = [n for n in value if n not in _DEFAULT_PASS and n not in user_pass]
        if extra:
            return f"it copies the values of host environment variables {extra} into the sandbox"
    if key in ("network.allow", "network.tcp"):
        local = [entry for entry in value if _names_local_addresses(entry, key)]
        if local:
            return (
                f"it opens {', '.join(local)} to the sandbox: addresses of the host itself, "
                "the local network or cloud metadata"
            )
    rootfs = key in ("container.image", "gvisor.image") and str(value).startswith("/")
    if rootfs and not _inside(Path(value), project_root):
        return "the sandbox's root filesystem would be this host directory"
    if key == "container.runtime" and value is not None and value not in SAFE_RUNTIMES:
        return (
            f"the engine runs the container with whatever it calls {value!r}; a project may "
            f"choose only {', '.join(sorted(SAFE_RUNTIMES))}"
        )
    if key == "allow_dangerous_mounts" and value:
        return "it lets the sandbox see credentials, programs or sockets of the host"
    return None


def secret_weakening(name: str, secret: SecretConfig, where: str) -> Weakening:
    """A project's ``[secrets.NAME]`` always weakens: it sends a host credential to hosts
    the project chose."""
    source = (
        f"environment variable {secret.env}"
        if secret.env
        else f"file {secret.file}"
        if secret.file
        else f"keyring entry {secret.keyring}"
    )
    return Weakening(
        key=f"secrets.{name}.hosts",
        value=repr(list(secret.hosts)),
        reason=f"it sends your credential from {source} to these hosts",
        where=where,
    )


def _inside(path: Path, root: Path) -> bool:
    resolved = path.resolve()
    return resolved == root or root in resolved.parents


def _names_local_addresses(entry: str, key: str) -> bool:
    try:
        rule = parse_rule(entry, port_required=key == "network.tcp")
    except RuleError:
        return False  # refused elsewhere with its own reason
    network = rule.network
    if network is None:
        return False  # a name: decide() refuses local answers unless allowed by address
    return any(network.version == n.version and network.overlaps(n) for n in _LOCAL_NETWORKS)


# ---------------------------------------------------------------------------------------------
# The error


class UntrustedConfigError(ConfigError):
    """A project file that is not trusted sets values that would weaken the sandbox.

    ``str()`` is worded for the SDK; the CLI shows ``cli_message()``.
    """

    def __init__(
        self,
        file: Path,
        weakenings: Sequence[Weakening],
        *,
        previous: TrustRecord | None,
        user_file: Path,
    ) -> None:
        self.file = file
        self.weakenings = tuple(weakenings)
        self.previous = previous
        self.user_file = user_file
        super().__init__(self._message(cli=False))

    def cli_message(self) -> str:
        """The message with command-line wording of the fixes."""
        return self._message(cli=True)

    def _message(self, *, cli: bool) -> str:
        if self.previous is not None:
            when = dt.datetime.fromtimestamp(self.previous.trusted_at, dt.UTC)
            head = (
                f"{self.file} was trusted on {when:%Y-%m-%d %H:%M} UTC but has changed since, "
                "so it is not trusted any more"
            )
        else:
            head = f"{self.file} is not trusted"
        lines = [f"{head}, and it sets values that would weaken the sandbox:"]
        for w in self.weakenings:
            where = w.where.removeprefix(f"{self.file} ")  # "[workspace]": the file is named
            lines.append(f"  {w.key} = {w.value} (in {where}): {w.reason}")
        fixes = list(dict.fromkeys(w.fix_cli if cli else w.fix_sdk for w in self.weakenings))
        own = f"set these keys in your own config file {self.user_file}"
        if all(fixes):
            override = (
                f"pass {' '.join(fixes)} on the command line"
                if cli
                else f"pass {', '.join(fixes)} to Sandbox.create"
            )
            decide = f"{override} (or {own})"
        else:
            decide = own
        lines.append(
            "A project file comes with the repository: whoever can write to it chose these "
            f"values. Review the file, then run `stockade trust {self.file}` to trust it as it "
            f"is now, or {decide}."
        )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The user's trust records


def file_digest(data: bytes) -> str:
    """The sha256 (hex) a trust record holds for file content ``data``."""
    return hashlib.sha256(data).hexdigest()


def trust_key(file: Path) -> str:
    """The absolute path a file's trust is recorded under (its directory's symlinks resolved,
    so the same file reached through a symlinked checkout path is the same record)."""
    absolute = Path(os.path.abspath(file))
    return str(absolute.parent.resolve() / absolute.name)


@dataclass(frozen=True)
class TrustRecord:
    """One trusted file: its absolute path, the sha256 it had, and when it was trusted."""

    path: str
    sha256: str
    trusted_at: float


class TrustStore:
    """The user's trust records: one JSON file, private to the user (0600 in a 0700 dir)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> dict[str, TrustRecord]:
        """Every record, by absolute path."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read the trust records {self.path}: {exc}") from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise ConfigError(
                    f"the trust records {self.path} may be written by others (owner uid "
                    f"{st.st_uid}, mode {st.st_mode & 0o777:o}), so no trust in them is "
                    f"honoured; check the file, then `chmod 600 {self.path}` (as its owner)"
                )
            raw = f.read()
        try:
            data = json.loads(raw)
            return {
                path: TrustRecord(path, str(item["sha256"]), float(item["trusted_at"]))
                for path, item in data["files"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"the trust records {self.path} are damaged ({exc}); delete the file (every "
                "project file is then untrusted) and trust the ones you want again"
            ) from None

    def get(self, file: Path) -> TrustRecord | None:
        """The record of ``file``, whatever its content is now."""
        return self.records().get(trust_key(file))

    def is_trusted(self, file: Path, sha256: str) -> bool:
        """True if ``file`` was trusted with exactly this content."""
        record = self.get(file)
        return record is not None and record.sha256 == sha256

    def trust(self, file: Path, sha256: str) -> TrustRecord:
        """Record ``file`` as trusted with content hash ``sha256``."""
        record = TrustRecord(trust_key(file), sha256, dt.datetime.now(dt.UTC).timestamp())
        with self._locked():
            records = self.records()
            records[record.path] = record
            self._write(records)
        return record

    def revoke(self, file: Path) -> TrustRecord | None:
        """Forget ``file``; returns the record removed, or None if there was none."""
        with self._locked():
            records = self.records()
            removed = records.pop(trust_key(file), None)
            if removed is not None:
                self._write(records)
        return removed

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(
            self.path.with_name(self.path.name + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, records: dict[str, TrustRecord]) -> None:
        data = {
            "version": _VERSION,
            "files": {
                r.path: {"sha256": r.sha256, "trusted_at": r.trusted_at}
                for r in sorted(records.values(), key=lambda r: r.path)
            },
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
