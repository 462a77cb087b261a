"""Network rule strings of ``[network]``: parse, normalise, refuse the too broad, and match.

One grammar serves ``allow``, ``deny``, ``tcp``, presets and ``stockade net allow/deny``:

- ``pypi.org`` — exactly that name; ``*.example.com`` — any name *below* example.com (never
  example.com itself);
- ``1.2.3.4``, ``::1`` — one address; ``10.0.0.0/8``, ``fd00::/8`` — a network;
- any of them with ``:PORT`` (``github.com:22``, ``*.example.com:443``, ``[::1]:8080``,
  ``[fd00::/8]:443``); without a port a rule matches every port.

Names are normalised (lower case, no trailing dot, IDNA for unicode). Patterns that would
open far more than anyone means (``*``, ``*.com``, ``*.co.uk``, ``*.github.io``,
``0.0.0.0/0``, networks wider than /8 or /16) are refused with the reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from stockade._errors import ConfigError

__all__ = [
    "MIN_PREFIX_V4",
    "MIN_PREFIX_V6",
    "MIN_PREFIX_V6_ULA",
    "PUBLIC_SUFFIXES",
    "Address",
    "Network",
    "Rule",
    "RuleError",
    "RuleKind",
    "normalize_address",
    "normalize_host",
    "parse_ip_literal",
    "parse_rule",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RuleKind = Literal["host", "wildcard", "address", "network"]

#: Widest networks a rule may name: a /8 of IPv4 or a /16 of IPv6, except that the
#: unique-local range may be named as widely as IPv4's 10.0.0.0/8 (``fd00::/8``).
MIN_PREFIX_V4 = 8
MIN_PREFIX_V6 = 16
MIN_PREFIX_V6_ULA = 8
_ULA = ipaddress.IPv6Network("fc00::/7")

#: Suffixes under which names belong to unrelated owners, so ``*.SUFFIX`` would let the
#: sandbox reach sites anyone can publish. Single labels (``com``, ``uk``) are refused on
#: their own; this is the small built-in list of common multi-label ones (a subset of the
#: Public Suffix List, kept here to need neither the network nor a dependency).
PUBLIC_SUFFIXES: frozenset[str] = frozenset(
    {
        # country second-level domains
        "ac.jp", "ac.nz", "ac.uk", "co.id", "co.il", "co.in", "co.jp", "co.kr", "co.nz",
        "co.th", "co.uk", "co.za", "com.ar", "com.au", "com.br", "com.cn", "com.co",
        "com.hk", "com.mx", "com.my", "com.pl", "com.sg", "com.tr", "com.tw", "com.ua",
        "com.vn", "edu.au", "edu.cn", "gov.au", "gov.cn", "gov.uk", "go.jp", "ltd.uk",
        "me.uk", "ne.jp", "net.au", "net.br", "net.cn", "net.in", "net.nz", "net.uk",
        "or.jp", "or.kr", "org.au", "org.br", "org.cn", "org.in", "org.nz", "org.uk",
        "plc.uk", "sch.uk",
        # hosting platforms where anyone gets a subdomain
        "amazonaws.com", "appspot.com", "azurestaticapps.net", "azurewebsites.net",
        "blob.core.windows.net", "blogspot.com", "cloudapp.net", "cloudfront.net",
        "firebaseapp.com", "fly.dev", "github.io", "gitlab.io", "glitch.me", "herokuapp.com",
        "netlify.app", "ngrok-free.app", "ngrok.io", "now.sh", "onrender.com", "pages.dev",
        "readthedocs.io", "repl.co", "s3.amazonaws.com", "surge.sh", "trycloudflare.com",
        "vercel.app", "web.app", "workers.dev",
    }
)  # fmt: skip

_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_MAX_NAME = 253


class RuleError(ConfigError, ValueError):
    """A rule string is invalid (``too_broad`` False) or opens too much (``too_broad`` True).

    Also a ValueError, so a pydantic validator that calls ``parse_rule`` reports it as an
    invalid value of the field it checks.
    """

    def __init__(self, entry: str, reason: str, *, too_broad: bool = False) -> None:
        super().__init__(f"{entry!r} is refused: {reason}")
        self.entry = entry
        self.reason = reason
        self.too_broad = too_broad


@dataclass(frozen=True)
class Rule:
    """One parsed rule. Equal rules have equal canonical forms (``str(rule)``)."""

    kind: RuleKind
    #: Normalised name for "host"; the suffix below the ``*.`` for "wildcard"; "" otherwise.
    name: str = ""
    #: The network for "address" (a /32 or /128) and "network" rules; None for names.
    network: Network | None = None
    #: The one port the rule allows, or None for every port.
    port: int | None = None
    #: The rule as it was written, for reports; not part of equality.
    text: str = field(default="", compare=False)

    def __str__(self) -> str:
        if self.kind == "host":
            base = self.name
        elif self.kind == "wildcard":
            base = f"*.{self.name}"
        else:
            if self.network is None:  # pragma: no cover - set for address and network kinds
                raise AssertionError(f"{self.kind} rule without a network")
            base = (
                str(self.network.network_address) if self.kind == "address" else str(self.network)
            )
            if self.port is not None and self.network.version == 6:
                return f"[{base}]:{self.port}"
        return base if self.port is None else f"{base}:{self.port}"

    @property
    def written(self) -> str:
        """The rule as the user wrote it, or its canonical form when built in code."""
        return self.text or str(self)

    @property
    def is_address_rule(self) -> bool:
        """True for rules that name addresses (one address or a network), not names."""
        return self.kind in ("address", "network")

    def matches_port(self, port: int) -> bool:
        """True if the rule allows ``port`` (every port when it names none)."""
        return self.port is None or self.port == port

    def matches_name(self, host: str) -> bool:
        """True if ``host`` (already normalised, see ``normalize_host``) is named by the rule."""
        if self.kind == "host":
            return host == self.name
        if self.kind == "wildcard":
            return host.endswith("." + self.name) and len(host) > len(self.name) + 1
        return False

    def contains(self, address: Address) -> bool:
        """True if the rule names ``address`` (address and network rules only)."""
        if self.network is None:
            return False
        address = normalize_address(address)
        return address.version == self.network.version and address in self.network

    def matches(self, host: str, port: int, addresses: Iterable[Address] = ()) -> bool:
        """True if the rule covers a connection to ``host:port`` reaching ``addresses``.

        A name rule matches on the name; an address rule matches a literal address ``host``
        or any of ``addresses``. ``host`` is normalised here, so any spelling works.
        """
        if not self.matches_port(port):
            return False
        try:
            literal = parse_ip_literal(host)
        except ValueError:
            literal = None
        if literal is not None:
            return self.contains(literal) or any(self.contains(a) for a in addresses)
        try:
            name = normalize_host(host)
        except ValueError:
            return False
        return self.matches_name(name) or any(self.contains(a) for a in addresses)


def normalize_address(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address it stands for."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_host(host: str) -> str:
    """Lower-case, IDNA-encoded ``host`` without a trailing dot; ValueError if not a name."""
    name = host.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("it is empty")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"it is not a valid internationalised domain name ({exc})") from None
    name = name.lower()
    if len(name) > _MAX_NAME:
        raise ValueError(f"it is longer than {_MAX_NAME} characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            shown = f"label {label!r}" if label else "an empty label"
            raise ValueError(
                f"{shown} is not valid in a host name (up to 63 letters, digits, '-' and '_', "
                "not starting or ending with '-')"
            )
    if labels[-1].isdigit():
        raise ValueError("it is neither a valid IPv4 address nor a host name")
    return name


def parse_rule(text: str, *, port_required: bool = False) -> Rule:
    """Parse one rule string; raise RuleError with the reason if it is invalid or too broad.

    ``port_required`` is for ``tcp`` rules, which forward exactly one port.
    """
    if not isinstance(text, str):
        raise RuleError(repr(text), "a rule must be a string")
    if not text:
        raise RuleError(text, "it is empty")
    if any(c.isspace() for c in text):
        raise RuleError(text, "it contains whitespace; write one host per entry")
    if "://" in text or ("/" in text.split(":", 1)[0] and not _looks_like_cidr(text)):
        raise RuleError(
            text, "it looks like a URL or a path; write the host name alone, e.g. 'pypi.org'"
        )
    host, port = _split_port(text)
    if port_required and port is None:
        raise RuleError(text, "a tcp rule needs a port: write HOST:PORT, e.g. 'github.com:22'")
    if host.startswith("[") or _looks_like_ip(host):
        rule = _parse_ip(text, host.removeprefix("[").removesuffix("]"), port)
    elif "*" in host:
        rule = _parse_wildcard(text, host, port)
    else:
        try:
            name = normalize_host(host)
        except ValueError as exc:
            raise RuleError(text, f"{exc}") from None
        rule = Rule("host", name=name, port=port, text=text)
    return rule


def _looks_like_cidr(text: str) -> bool:
    head = text.removeprefix("[")
    return "/" in head and (head[:1].isdigit() or ":" in head.split("/", 1)[0])


def _looks_like_ip(host: str) -> bool:
    return ":" in host or "/" in host or bool(re.fullmatch(r"[0-9.]+", host))


def _split_port(text: str) -> tuple[str, int | None]:
    """Split ``HOST[:PORT]``; bare IPv6 (two or more colons, no brackets) has no port."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise RuleError(text, "'[' without a closing ']'; write IPv6 as '[::1]:8080'")
        host, rest = text[: close + 1], text[close + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise RuleError(text, f"unexpected {rest!r} after ']'; write '[ADDRESS]:PORT'")
        return host, _port(text, rest[1:])
    if text.count(":") >= 2:
        return text, None
    host, sep, port = text.partition(":")
    return host, (_port(text, port) if sep else None)


def _port(text: str, port: str) -> int:
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise RuleError(text, f"port {port!r} is not a number from 1 to 65535")
    return int(port)


def _parse_ip(text: str, host: str, port: int | None) -> Rule:
    if "/" in host:
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f"; did you mean '{ipaddress.ip_network(host, strict=False)}'?"
            raise RuleError(text, f"{host!r} is not a valid network ({exc}){hint}") from None
        # ::ffff:0.0.0.0/96 is all of IPv4: judge a mapped network as the IPv4 one it is.
        network = _mapped_network(network) or network
        minimum = MIN_PREFIX_V4 if network.version == 4 else MIN_PREFIX_V6
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_ULA):
            minimum = MIN_PREFIX_V6_ULA
        if network.prefixlen == 0:
            raise RuleError(text, "too broad: it matches every address", too_broad=True)
        if network.prefixlen < minimum:
            raise RuleError(
                text,
                f"too broad: a network may be at most a /{minimum} here"
                f" (/{MIN_PREFIX_V4} for IPv4, /{MIN_PREFIX_V6} for IPv6, /{MIN_PREFIX_V6_ULA}"
                " inside the unique-local fc00::/7)",
                too_broad=True,
            )
        return Rule("network", network=network, port=port, text=text)
    try:
        address = normalize_address(ipaddress.ip_address(host))
    except ValueError:
        raise RuleError(
            text,
            f"{host!r} is not a valid IP address (write IPv6 with a port as '[::1]:8080')",
        ) from None
    return Rule("address", network=ipaddress.ip_network(address), port=port, text=text)


def _mapped_network(network: Network) -> Network | None:
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        base = network.network_address.ipv4_mapped
        if base is not None:
            return ipaddress.IPv4Network(f"{base}/{network.prefixlen - 96}")
    return None


def _parse_wildcard(text: str, host: str, port: int | None) -> Rule:
    if host in ("*", "*."):
        raise RuleError(text, "too broad: it matches every host", too_broad=True)
    if not host.startswith("*.") or "*" in host[2:]:
        raise RuleError(
            text,
            "a wildcard may only be the whole first label, as in '*.example.com'",
        )
    try:
        suffix = normalize_host(host[2:])
    except ValueError as exc:
        raise RuleError(text, f"{exc}") from None
    if "." not in suffix:
        raise RuleError(
            text,
            f"too broad: it matches every domain under the top-level domain '.{suffix}'",
            too_broad=True,
        )
    if suffix in PUBLIC_SUFFIXES:
        raise RuleError(
            text,
            f"too broad: '{suffix}' is a public suffix, so names under it belong to unrelated "
            "owners; list the exact names instead",
            too_broad=True,
        )
    return Rule("wildcard", name=suffix, port=port, text=text)


def is_ip_literal(text: str) -> bool:
    """True when ``text`` (``[::1]`` included) is an IP address rather than a name."""
    try:
        ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def parse_ip_literal(host: str) -> Address | None:
    """The address ``host`` spells (``[::1]`` included), None for a name; ValueError if bad."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text or re.fullmatch(r"[0-9.]+", text):
        return normalize_address(ipaddress.ip_address(text))
    return None
