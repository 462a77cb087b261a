"""Secret configuration, ``[secrets.NAME]``: where a value lives on the host, where it may go.

Pure vocabulary shared by the configuration and the egress proxy; reading and substituting
the real values is ``stockade.egress.secrets``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from stockade.policy.rules import is_ip_literal

__all__ = [
    "RESERVED_NAMES",
    "SECRET_NAME_RE",
    "SecretConfig",
    "SecretName",
    "host_matches",
    "secret_host_problem",
]

SECRET_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,62}$")

RESERVED_NAMES: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "SHELL",
        "TERM",
        "PWD",
        "TMPDIR",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "PIP_CERT",
        "GIT_SSL_CAINFO",
        "NODE_EXTRA_CA_CERTS",
    }
)

SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME_RE.pattern)]

_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def secret_host_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a host a secret is sent to, or None if it can.

    Accepted: an exact DNS name, an IP address, or ``*.domain`` with at least two labels
    after the star (``*.example.com``; not ``*``, ``*.com``, ``a*.example.com``).
    """
    if pattern != pattern.strip() or not pattern:
        return f"{pattern!r} is empty or has surrounding spaces"
    if ":" in pattern and not is_ip_literal(pattern):
        return f"{pattern!r} has a port; list the host name only"
    if "*" in pattern:
        if pattern.count("*") > 1 or not pattern.startswith("*."):
            return f"{pattern!r}: a wildcard is allowed only as a leading '*.'"
        rest = pattern[2:]
        if rest.count(".") < 1:
            return f"{pattern!r} matches every domain under '.{rest}'; use '*.example.{rest}'"
        pattern = rest
    if is_ip_literal(pattern):
        return None
    labels = pattern.lower().split(".")
    if len(pattern) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        return f"{pattern!r} is not a host name, '*.domain' pattern or IP address"
    return None


def _canonical_host(host: str) -> str:
    text = host.strip().lower().removesuffix(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """True if ``host`` equals one of ``patterns`` or lies under a ``*.domain`` one.

    ``*.example.com`` matches ``api.example.com`` and ``a.b.example.com``, not
    ``example.com`` itself (list it too if it should match).
    """
    name = _canonical_host(host)
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith("." + pattern[2:].lower()):
                return True
        elif name == _canonical_host(pattern):
            return True
    return False


class SecretConfig(BaseModel):
    """``[secrets.NAME]``: where the real value lives on the host, and where it may be sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(
        default=None,
        description="Host environment variable holding the value, e.g. 'OPENAI_API_KEY'.",
    )
    file: str | None = Field(
        default=None,
        description="Host file holding the value (absolute or '~/...'); trailing newlines "
        "are dropped.",
    )
    keyring: str | None = Field(
        default=None,
        description="System keyring entry as 'service:username' (needs 'pip install keyring').",
    )
    hosts: tuple[str, ...] = Field(
        min_length=1,
        description="Hosts the real value may be sent to: exact names, IP addresses or "
        "'*.example.com' wildcards. Everywhere else the sandbox's placeholder is sent as is.",
    )

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @field_validator("file")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("/") or value.startswith("~/")):
            raise ValueError(f"{value!r} must be an absolute path or start with '~/'")
        return value

    @field_validator("keyring")
    @classmethod
    def _check_keyring(cls, value: str | None) -> str | None:
        if value is not None:
            service, _, username = value.rpartition(":")
            if not service or not username:
                raise ValueError(f"{value!r} must be 'service:username'")
        return value

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            problem = secret_host_problem(pattern)
            if problem:
                raise ValueError(problem)
        return tuple(p.lower() for p in value)

    @model_validator(mode="after")
    def _one_source(self) -> SecretConfig:
        sources = [s for s in ("env", "file", "keyring") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(
                "set exactly one of 'env', 'file' or 'keyring'"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        return self

    @property
    def source(self) -> str:
        """Where the value comes from, for messages: ``env:VAR``, ``file:~/x``, ``keyring:s:u``."""
        if self.env is not None:
            return f"env:{self.env}"
        if self.file is not None:
            return f"file:{self.file}"
        return f"keyring:{self.keyring}"
