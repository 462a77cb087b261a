"""The one pure decision of the egress proxy: may the sandbox connect to ``host:port``?

Order: the deny list (a rule naming the host, or covering any address it resolves to);
then special destinations (loopback, private, link-local, metadata, ... addresses and names),
refused unless an allow rule names the *address*, so that an allowed name re-pointed at the
host or the cloud metadata service (DNS rebinding) stays refused; then the allow list (and
the ``tcp`` rules, which allow their one port too); otherwise deny. Every reason says what
to change.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stockade._errors import PolicyError
from stockade.policy.rules import (
    Address,
    Network,
    Rule,
    RuleError,
    normalize_address,
    normalize_host,
    parse_ip_literal,
    parse_rule,
)

__all__ = [
    "METADATA_ADDRESSES",
    "METADATA_NAMES",
    "Decision",
    "NetworkRules",
    "compile_rules",
    "decide",
    "special_category",
    "with_allowed",
    "with_denied",
]

#: Cloud instance metadata services (credentials live there): GCP/AWS/Azure/OpenStack, AWS
#: ECS task metadata, AWS IMDS over IPv6, Alibaba Cloud.
METADATA_ADDRESSES: frozenset[Address] = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
#: Names of metadata services, refused like the address they stand for.
METADATA_NAMES: frozenset[str] = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

_METADATA_V4 = ipaddress.IPv4Address("169.254.169.254")
_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
#: Ranges meant for documentation and benchmarks: not global, but not the host's either.
_UNROUTED_BUT_USED = (
    ipaddress.IPv4Network("192.0.2.0/24"),
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv4Network("203.0.113.0/24"),
    ipaddress.IPv4Network("198.18.0.0/15"),
    ipaddress.IPv6Network("2001:db8::/32"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_PRIVATE = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv6Network("fc00::/7"),
)


@dataclass(frozen=True)
class Decision:
    """The answer for one connection; ``reason`` is meant for the agent and its user."""

    allowed: bool
    #: The rule that decided (as written), or None for the built-in refusals and the default.
    rule: str | None
    reason: str


@dataclass(frozen=True)
class NetworkRules:
    """Parsed ``allow``, ``deny`` and ``tcp`` rules; build with ``compile_rules``."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    #: host:port rules forwarded as raw TCP; they allow their port like allow rules do.
    tcp: tuple[Rule, ...] = ()
    #: The host's own directly connected networks (its LAN): special like private ranges,
    #: whatever range they are in (on some hosts the LAN is a documentation range).
    local_networks: tuple[Network, ...] = ()


def compile_rules(
    allow: Iterable[str],
    deny: Iterable[str],
    tcp: Iterable[str] = (),
    *,
    local_networks: Iterable[Network] = (),
) -> NetworkRules:
    """Parse every entry; raise PolicyError naming the list, the entry and the reason."""
    return NetworkRules(
        allow=_parse_all("allow", allow),
        deny=_parse_all("deny", deny),
        tcp=_parse_all("tcp", tcp, port_required=True),
        local_networks=tuple(local_networks),
    )


def with_allowed(rules: NetworkRules, entry: str) -> NetworkRules:
    """``rules`` with ``entry`` allowed (``stockade net allow``).

    The same rule in the deny list is dropped, so ``net allow`` undoes a ``net deny`` of the
    same entry; a different deny rule that covers it still wins.
    """
    rule = _parse_one("allow", entry)
    allow = rules.allow if rule in rules.allow else (*rules.allow, rule)
    deny = tuple(r for r in rules.deny if r != rule)
    return dataclasses.replace(rules, allow=allow, deny=deny)


def with_denied(rules: NetworkRules, entry: str) -> NetworkRules:
    """``rules`` with ``entry`` denied (``stockade net deny``); the same allow rule is dropped."""
    rule = _parse_one("deny", entry)
    deny = rules.deny if rule in rules.deny else (*rules.deny, rule)
    allow = tuple(r for r in rules.allow if r != rule)
    return dataclasses.replace(rules, allow=allow, deny=deny)


def decide(
    host: str,
    port: int,
    policy: NetworkRules,
    *,
    resolved: Sequence[Address | str] = (),
) -> Decision:
    """Decide a connection to ``host:port`` whose name resolved to ``resolved``.

    ``host`` is a name or an IP literal (``[::1]`` too); ``resolved`` holds the addresses the
    caller will dial (IP objects or strings), empty when deciding on the name alone before
    resolving it. Pure: no I/O, no global state.
    """
    if not 1 <= port <= 65535:
        return _deny(f"{port} is not a valid port (1 to 65535)")
    try:
        literal = parse_ip_literal(host)
    except ValueError:
        return _deny(f"{host!r} is neither a valid IP address nor a host name")
    name = ""
    if literal is None:
        try:
            name = normalize_host(host)
        except ValueError as exc:
            return _deny(f"{host!r} is not a valid host name: {exc}")
    shown = name or str(literal)

    addresses: list[Address] = [literal] if literal is not None else []
    for item in resolved:
        try:
            address = normalize_address(
                ipaddress.ip_address(item) if isinstance(item, str) else item
            )
        except ValueError:
            return _deny(f"{shown} resolved to {item!r}, which is not an IP address")
        if address not in addresses:
            addresses.append(address)

    for rule in policy.deny:
        if not rule.matches_port(port):
            continue
        if rule.matches_name(name):
            return _deny(
                f"{shown} is denied by the deny rule '{rule.written}'; "
                "remove that rule to permit it",
                rule,
            )
        for address in addresses:
            if rule.contains(address):
                via = shown if address == literal else f"{shown} resolves to {address}, which"
                return _deny(
                    f"{via} is denied by the deny rule '{rule.written}'; "
                    "remove that rule to permit it",
                    rule,
                )

    allow = (*policy.allow, *policy.tcp)
    by_address = [r for r in allow if r.is_address_rule and r.matches_port(port)]

    def named(address: Address) -> bool:
        return any(r.contains(address) for r in by_address)

    if name:
        implied = _special_name(name)
        if implied is not None:
            kind, standing_for = implied
            if not any(named(a) for a in standing_for):
                first = standing_for[0]
                return _deny(
                    f"{shown} is {kind} ({first}); allow the address explicitly "
                    f"('{first}') to permit it"
                )
    for address in addresses:
        category = special_category(address, policy.local_networks)
        if category is not None and not named(address):
            subject = f"{shown} is" if address == literal else f"{shown} resolves to {address},"
            other_ports = [r for r in allow if r.is_address_rule and r.contains(address)]
            if other_ports:
                wanted = _with_port(str(address), address, port)
                return _deny(
                    f"{subject} {category} allowed only on port "
                    f"{_ports(other_ports)} (rule '{other_ports[0].written}'), not {port}; "
                    f"allow '{wanted}' to permit it"
                )
            return _deny(
                f"{subject} {category}; allow the address explicitly ('{address}') to permit it"
            )

    for rule in allow:
        if rule.matches_port(port) and _names(rule, name, literal):
            return Decision(
                True, rule.written, f"{shown}:{port} is allowed by rule '{rule.written}'"
            )

    target = _with_port(shown, literal, port)
    near = [r for r in allow if _names(r, name, literal)]
    if near:
        return _deny(
            f"{shown} is allowed only on port {_ports(near)} "
            f"(rule '{near[0].written}'), not {port}; "
            f"add it with `stockade net allow NAME {target}` or [network] allow"
        )
    return _deny(
        f"{shown} is not in the allow list; add it with `stockade net allow NAME {shown}` "
        "or [network] allow"
    )


def special_category(address: Address, local_networks: Iterable[Network] = ()) -> str | None:
    """What makes ``address`` unfit for egress by name ("a loopback address", ...), or None.

    Anything that is not a global unicast address is special, and so is any address on the
    host's own networks; IPv4 addresses carried in IPv6 (mapped, 6to4, NAT64) are judged as
    the IPv4 address they carry. Documentation and benchmarking ranges are not special by
    themselves: they route nowhere unless a network uses them, and then that network is one
    of ``local_networks`` (some sandboxed hosts, CI machines among them, do).
    """
    local_networks = tuple(local_networks)
    address = normalize_address(address)
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = special_category(embedded, local_networks)
            if inner is not None:
                return f"{inner.removesuffix(' address')} address carried in IPv6"
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a shared (CGNAT) address"
    if address.is_multicast:
        return "a multicast address"
    if any(address.version == net.version and address in net for net in _PRIVATE):
        return "a private address"
    if any(address.version == net.version and address in net for net in local_networks):
        return "an address on this host's own network"
    if any(address.version == net.version and address in net for net in _UNROUTED_BUT_USED):
        return None
    if not address.is_global:
        return "a reserved, non-public address"
    return None


def _special_name(name: str) -> tuple[str, tuple[Address, ...]] | None:
    if name == "localhost" or name.endswith(".localhost"):
        return "a loopback name", (_LOOPBACK_V4, _LOOPBACK_V6)
    if name in METADATA_NAMES:
        return "a cloud metadata service name", (_METADATA_V4,)
    return None


def _names(rule: Rule, name: str, literal: Address | None) -> bool:
    return rule.contains(literal) if literal is not None else rule.matches_name(name)


def _ports(rules: Iterable[Rule]) -> str:
    return ", ".join(str(p) for p in sorted({r.port for r in rules if r.port is not None}))


def _with_port(shown: str, literal: Address | None, port: int) -> str:
    if isinstance(literal, ipaddress.IPv6Address):
        return f"[{shown}]:{port}"
    return f"{shown}:{port}"


def _deny(reason: str, rule: Rule | None = None) -> Decision:
    return Decision(False, None if rule is None else rule.written, reason)


def _parse_one(which: str, entry: str, *, port_required: bool = False) -> Rule:
    try:
        return parse_rule(entry, port_required=port_required)
    except RuleError as exc:
        raise PolicyError(f"network {which} entry {exc.entry!r} is refused: {exc.reason}") from exc


def _parse_all(
    which: str, entries: Iterable[str], *, port_required: bool = False
) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for entry in entries:
        rule = _parse_one(which, entry, port_required=port_required)
        if rule not in rules:
            rules.append(rule)
    return tuple(rules)
