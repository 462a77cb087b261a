"""Secrets that never enter the sandbox: the sandbox sees a placeholder, the proxy swaps it in.

A secret is read on the host (environment variable, file or keyring) and tied to the hosts
it may be sent to. Only request header blocks bound for one of those hosts get the real value;
everywhere else the placeholder travels as the useless string it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets as _random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NoReturn

from stockade._errors import ConfigError
from stockade.policy.secret_config import (
    RESERVED_NAMES,
    SECRET_NAME_RE,
    SecretConfig,
    host_matches,
)

__all__ = [
    "PLACEHOLDER_RE",
    "SecretSet",
    "SecretValue",
    "placeholder",
]

logger = logging.getLogger(__name__)

#: What ``placeholder`` returns: ``stockade-secret-<NAME>-<16 hex digits>``.
PLACEHOLDER_RE = re.compile(r"^stockade-secret-([A-Z][A-Z0-9_]{0,62})-([0-9a-f]{16})$")
_BASIC_RE = re.compile(rb"^((?:proxy-)?authorization[ \t]*:[ \t]*basic[ \t]+)(\S+)([ \t]*)$", re.I)


class SecretValue:
    """A real secret value. It shows up nowhere: not in repr, str, format or pickles."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretValue(<hidden>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecretValue cannot be pickled")


def placeholder(name: str, sandbox_id: str, *, key: bytes | None = None) -> str:
    """The value the sandbox sees instead of secret ``name``: ``stockade-secret-NAME-<16 hex>``.

    Without ``key`` the suffix is fresh randomness. With a per-sandbox ``key`` (kept on the
    host) it is ``HMAC(key, sandbox_id, name)``, so a restarted proxy recomputes the
    placeholders a running sandbox already holds. Either way, one sandbox cannot guess
    another's placeholder.
    """
    if not SECRET_NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a secret name (expected {SECRET_NAME_RE.pattern})")
    if key is None:
        suffix = _random.token_hex(8)
    else:
        message = sandbox_id.encode() + b"\0" + name.encode()
        suffix = hmac.new(key, message, hashlib.sha256).hexdigest()[:16]
    return f"stockade-secret-{name}-{suffix}"


class _Secret:
    __slots__ = ("hosts", "name", "placeholder", "value")

    def __init__(self, name: str, hosts: tuple[str, ...], token: str, value: SecretValue) -> None:
        self.name = name
        self.hosts = hosts
        self.placeholder = token.encode("ascii")
        self.value = value

    def __repr__(self) -> str:
        return f"_Secret(name={self.name!r}, hosts={self.hosts!r}, value=<hidden>)"


class SecretSet:
    """A sandbox's secrets: real values held on the host, placeholders handed to the sandbox."""

    def __init__(self, secrets: Iterable[_Secret] = ()) -> None:
        self._secrets = tuple(secrets)

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self._secrets)
        return f"SecretSet([{names}])"

    def __len__(self) -> int:
        return len(self._secrets)

    @classmethod
    def load(
        cls,
        configs: Mapping[str, SecretConfig],
        environ: Mapping[str, str],
        home: Path,
        *,
        sandbox_id: str = "",
        placeholder_key: bytes | None = None,
    ) -> SecretSet:
        """Read every secret's real value on the host and give each a placeholder.

        ``environ`` and ``home`` are the host's (passed in, never read from the process, so
        tests and other sandboxes stay independent). A secret that cannot be read raises
        ``ConfigError`` naming the secret and its source, never the value.
        """
        loaded: list[_Secret] = []
        for name, config in sorted(configs.items()):
            if not SECRET_NAME_RE.match(name):
                raise ConfigError(
                    f"secrets.{name}: a secret name must match {SECRET_NAME_RE.pattern} "
                    "(it becomes an environment variable in the sandbox), e.g. 'OPENAI_API_KEY'"
                )
            if name in RESERVED_NAMES:
                raise ConfigError(
                    f"secrets.{name}: {name} is an environment variable the sandbox needs "
                    "for itself; choose another name"
                )
            value = _read_value(name, config, environ, home)
            token = placeholder(name, sandbox_id, key=placeholder_key)
            loaded.append(_Secret(name, config.hosts, token, value))
        return cls(loaded)

    # --- what the sandbox and the proxy see ---------------------------------------------

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._secrets]

    def sandbox_env(self) -> dict[str, str]:
        """``NAME -> placeholder`` for every secret: all the sandbox ever sees of them."""
        return {s.name: s.placeholder.decode("ascii") for s in self._secrets}

    def hosts_needing_interception(self) -> set[str]:
        """Every host pattern some secret may be sent to (exact names and ``*.domain``)."""
        return {host for s in self._secrets for host in s.hosts}

    def needs_interception(self, host: str) -> bool:
        """True if some secret may be sent to ``host``: its TLS must be intercepted."""
        return any(host_matches(host, s.hosts) for s in self._secrets)

    def substitute_headers(self, host: str, header_block: bytes) -> tuple[bytes, list[str]]:
        """Put the real values in place of the placeholders in one request header block.

        Only secrets allowed for ``host`` are substituted, anywhere in the request line and
        headers, and inside ``Basic`` credentials (decoded, replaced, re-encoded). Returns
        the new block and the names substituted (names only: audit them, never values).
        """
        allowed = [s for s in self._secrets if host_matches(host, s.hosts)]
        if not allowed:
            return header_block, []
        used: set[str] = set()
        lines = header_block.split(b"\n")
        for index, original in enumerate(lines):
            line = _substitute_basic(original, allowed, used) if index > 0 else original
            for secret in allowed:
                if secret.placeholder in line:
                    line = line.replace(secret.placeholder, secret.value.reveal().encode())
                    used.add(secret.name)
            lines[index] = line
        return b"\n".join(lines), sorted(used)

    def redact(self, data: str) -> str:
        """``data`` with every real value replaced by ``<secret NAME>`` (for error text)."""
        for secret in self._secrets:
            data = data.replace(secret.value.reveal(), f"<secret {secret.name}>")
        return data


def _substitute_basic(line: bytes, allowed: list[_Secret], used: set[str]) -> bytes:
    cr = line.endswith(b"\r")
    match = _BASIC_RE.match(line[:-1] if cr else line)
    if match is None:
        return line
    try:
        credentials = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        return line
    changed = False
    for secret in allowed:
        if secret.placeholder in credentials:
            credentials = credentials.replace(secret.placeholder, secret.value.reveal().encode())
            used.add(secret.name)
            changed = True
    if not changed:
        return line
    encoded = base64.b64encode(credentials)
    return match.group(1) + encoded + match.group(3) + (b"\r" if cr else b"")


def _fail(name: str, config: SecretConfig, why: str, fix: str) -> NoReturn:
    # "from None": a chained cause (a decode error, a keyring failure) may quote the value.
    raise ConfigError(f"secrets.{name} ({config.source}): {why}; {fix}") from None


def _read_value(
    name: str, config: SecretConfig, environ: Mapping[str, str], home: Path
) -> SecretValue:
    if config.env is not None:
        raw = environ.get(config.env)
        if raw is None:
            _fail(
                name,
                config,
                f"the host environment variable {config.env} is not set",
                f"export {config.env} before starting the sandbox, or change secrets.{name}.env",
            )
        value = raw
    elif config.file is not None:
        path = home / config.file[2:] if config.file.startswith("~/") else Path(config.file)
        try:
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            _fail(
                name,
                config,
                f"the file {path} does not exist",
                f"create it or fix secrets.{name}.file",
            )
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            _fail(name, config, f"cannot read {path}: {why}", f"fix secrets.{name}.file")
    else:
        value = _read_keyring(name, config)
    if not value:
        _fail(name, config, "the value is empty", "store the secret there first")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        # A CR or LF would let the value inject headers once substituted.
        _fail(
            name,
            config,
            "the value contains control characters (line breaks?)",
            "store the value on a single line without control characters",
        )
    return SecretValue(value)


def _read_keyring(name: str, config: SecretConfig) -> str:
    assert config.keyring is not None
    service, _, username = config.keyring.rpartition(":")
    try:
        import keyring  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        _fail(
            name,
            config,
            "the optional 'keyring' package is not installed",
            "run 'pip install keyring', or use env = ... or file = ... instead",
        )
    try:
        value = keyring.get_password(service, username)
    except Exception as exc:
        # Name the failing backend's error type only: its message might quote stored data.
        _fail(
            name,
            config,
            f"the keyring backend failed ({type(exc).__name__})",
            "unlock the keyring or check 'keyring --list-backends'",
        )
    if value is None:
        _fail(
            name,
            config,
            f"no keyring entry for service {service!r} and user {username!r}",
            f"add it with 'keyring set {service} {username}'",
        )
    return str(value)
