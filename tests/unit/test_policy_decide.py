"""The pure egress decision: deny first, special addresses by address only, then allow."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from stockade._errors import PolicyError
from stockade.policy.decide import (
    Decision,
    NetworkRules,
    compile_rules,
    decide,
    special_category,
    with_allowed,
    with_denied,
)
from stockade.policy.rules import parse_rule

PUBLIC = ("93.184.216.34",)  # a global unicast address


def rules(
    allow: tuple[str, ...] = (), deny: tuple[str, ...] = (), tcp: tuple[str, ...] = ()
) -> NetworkRules:
    return compile_rules(allow, deny, tcp)


# ---------------------------------------------------------------------------------------------
# compile_rules


def test_compile_rules_parses_and_dedupes() -> None:
    compiled = compile_rules(["pypi.org", "PyPI.org.", "*.github.com"], ["evil.org"], ["a.org:22"])
    assert [str(r) for r in compiled.allow] == ["pypi.org", "*.github.com"]
    assert [str(r) for r in compiled.deny] == ["evil.org"]
    assert [str(r) for r in compiled.tcp] == ["a.org:22"]


@pytest.mark.parametrize(
    ("allow", "deny", "tcp", "fragment"),
    [
        (["*"], [], [], "network allow entry '*' is refused: too broad"),
        ([], ["*.com"], [], "network deny entry '*.com' is refused: too broad"),
        ([], [], ["github.com"], "network tcp entry 'github.com' is refused: a tcp rule needs"),
        (["a b"], [], [], "whitespace"),
    ],
)
def test_compile_rules_names_the_bad_entry(
    allow: list[str], deny: list[str], tcp: list[str], fragment: str
) -> None:
    with pytest.raises(PolicyError, match=re.escape(fragment)):
        compile_rules(allow, deny, tcp)


def test_default_is_deny_all() -> None:
    decision = decide("pypi.org", 443, NetworkRules(), resolved=PUBLIC)
    assert decision == Decision(
        False,
        None,
        "pypi.org is not in the allow list; add it with `stockade net allow NAME pypi.org` "
        "or [network] allow",
    )


# ---------------------------------------------------------------------------------------------
# Allow and deny


def test_allowed_name() -> None:
    policy = rules(allow=("pypi.org",))
    for resolved in ((), PUBLIC):
        decision = decide("PyPI.org.", 443, policy, resolved=resolved)
        assert decision.allowed
        assert decision.rule == "pypi.org"


def test_rule_is_reported_as_written() -> None:
    assert decide("pypi.org", 443, rules(allow=("PyPI.Org",))).rule == "PyPI.Org"


def test_example_reason_for_an_unlisted_name() -> None:
    decision = decide("example.com", 443, rules(allow=("pypi.org",)))
    assert decision.reason == (
        "example.com is not in the allow list; add it with "
        "`stockade net allow NAME example.com` or [network] allow"
    )


def test_wildcard_allows_subdomains_only() -> None:
    policy = rules(allow=("*.example.com",))
    assert decide("a.example.com", 443, policy).allowed
    assert not decide("example.com", 443, policy).allowed


def test_deny_wins_over_allow() -> None:
    policy = rules(allow=("*.example.com",), deny=("bad.example.com",))
    assert decide("good.example.com", 443, policy).allowed
    decision = decide("BAD.example.com", 443, policy)
    assert not decision.allowed
    assert decision.rule == "bad.example.com"
    assert "denied by the deny rule 'bad.example.com'" in decision.reason


def test_deny_by_resolved_address() -> None:
    policy = rules(allow=("pypi.org",), deny=("93.184.0.0/16",))
    decision = decide("pypi.org", 443, policy, resolved=PUBLIC)
    assert not decision.allowed
    assert decision.rule == "93.184.0.0/16"
    assert "pypi.org resolves to 93.184.216.34, which is denied" in decision.reason
    assert decide("pypi.org", 443, policy, resolved=("1.1.1.1",)).allowed


def test_deny_rule_with_a_port_denies_only_that_port() -> None:
    policy = rules(allow=("example.org",), deny=("example.org:80",))
    assert not decide("example.org", 80, policy).allowed
    assert decide("example.org", 443, policy).allowed


def test_port_mismatch_says_which_port_is_allowed() -> None:
    policy = rules(allow=("*.example.com:443",))
    decision = decide("a.example.com", 80, policy)
    assert not decision.allowed
    assert "allowed only on port 443 (rule '*.example.com:443'), not 80" in decision.reason
    assert "`stockade net allow NAME a.example.com:80`" in decision.reason
    decision = decide("2606:4700::1", 80, rules(allow=("[2606:4700::1]:8080",)))
    assert "`stockade net allow NAME [2606:4700::1]:80`" in decision.reason


def test_special_address_allowed_on_another_port_says_so() -> None:
    decision = decide("::1", 80, rules(allow=("[::1]:8080",)))
    assert decision.reason == (
        "::1 is a loopback address allowed only on port 8080 (rule '[::1]:8080'), not 80; "
        "allow '[::1]:80' to permit it"
    )


def test_tcp_rules_allow_their_port() -> None:
    policy = rules(tcp=("github.com:22",))
    assert decide("github.com", 22, policy).rule == "github.com:22"
    assert not decide("github.com", 443, policy).allowed


def test_public_literal_address_needs_an_address_rule() -> None:
    assert not decide("93.184.216.34", 443, rules(allow=("pypi.org",))).allowed
    assert decide("93.184.216.34", 443, rules(allow=("93.184.0.0/16",))).allowed


def test_address_rule_does_not_allow_names_resolving_to_it() -> None:
    # An address rule exempts the address; the name still has to be allowed by name.
    policy = rules(allow=("127.0.0.1",))
    decision = decide("localtest.me", 80, policy, resolved=("127.0.0.1",))
    assert not decision.allowed
    assert "localtest.me is not in the allow list" in decision.reason


# ---------------------------------------------------------------------------------------------
# Special addresses and DNS rebinding


def test_allowed_name_resolving_to_loopback_is_refused() -> None:
    policy = rules(allow=("pypi.org",))
    decision = decide("pypi.org", 443, policy, resolved=("127.0.0.1",))
    assert decision == Decision(
        False,
        None,
        "pypi.org resolves to 127.0.0.1, a loopback address; allow the address explicitly "
        "('127.0.0.1') to permit it",
    )
    # Allowing the address explicitly permits it.
    permitted = decide("pypi.org", 443, with_allowed(policy, "127.0.0.1"), resolved=("127.0.0.1",))
    assert permitted.allowed
    assert permitted.rule == "pypi.org"


def test_every_resolved_address_must_be_fine() -> None:
    policy = rules(allow=("pypi.org",))
    decision = decide("pypi.org", 443, policy, resolved=("93.184.216.34", "10.0.0.1"))
    assert not decision.allowed
    assert "resolves to 10.0.0.1, a private address" in decision.reason


def test_address_exemption_respects_the_port() -> None:
    policy = rules(allow=("localhost", "127.0.0.1:8080"))
    assert decide("localhost", 8080, policy, resolved=("127.0.0.1",)).allowed
    assert not decide("localhost", 22, policy, resolved=("127.0.0.1",)).allowed


def test_network_rule_exempts_the_addresses_it_contains() -> None:
    policy = rules(allow=("db.internal", "10.0.0.0/8"))
    assert decide("db.internal", 5432, policy, resolved=("10.1.2.3",)).allowed
    assert not decide("db.internal", 5432, policy, resolved=("192.168.1.1",)).allowed


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.0.0.1", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("fc00::1", "a private address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("100.127.255.255", "a shared (CGNAT) address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("255.255.255.255", "a reserved, non-public address"),
        ("240.0.0.1", "a reserved, non-public address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("::ffff:169.254.169.254", "a cloud metadata address"),
        ("64:ff9b::7f00:1", "a loopback address carried in IPv6"),
        ("2002:a00:1::1", "a private address carried in IPv6"),
    ],
)
def test_special_addresses(address: str, category: str) -> None:
    ip = ipaddress.ip_address(address)
    assert special_category(ip) == category
    policy = rules(allow=("pypi.org",))
    decision = decide("pypi.org", 443, policy, resolved=(address,))
    assert not decision.allowed
    assert category in decision.reason
    # The literal address is refused too, and allowing it by address permits it.
    literal = f"[{address}]" if ip.version == 6 else address
    assert not decide(literal, 443, policy).allowed
    assert decide(literal, 443, with_allowed(policy, address)).allowed
    assert decide("pypi.org", 443, with_allowed(policy, address), resolved=(address,)).allowed


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_not_special(address: str) -> None:
    assert special_category(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("metadata.google.internal", "169.254.169.254"),
        ("metadata", "169.254.169.254"),
        ("metadata.goog", "169.254.169.254"),
        ("instance-data.ec2.internal", "169.254.169.254"),
        ("localhost", "127.0.0.1"),
        ("foo.localhost", "127.0.0.1"),
    ],
)
def test_special_names_are_refused_before_resolving(name: str, address: str) -> None:
    policy = rules(allow=(name,))
    decision = decide(name, 80, policy)
    assert not decision.allowed
    assert f"allow the address explicitly ('{address}')" in decision.reason
    assert decide(name, 80, with_allowed(policy, address)).allowed


def test_localhost_may_be_allowed_by_either_loopback_address() -> None:
    assert decide("localhost", 80, rules(allow=("localhost", "::1"))).allowed


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("host", "port", "fragment"),
    [
        ("pypi.org", 0, "not a valid port"),
        ("pypi.org", 70000, "not a valid port"),
        ("", 443, "not a valid host name"),
        ("bad host", 443, "not a valid host name"),
        ("999.1.1.1", 443, "neither a valid IP address nor a host name"),
    ],
)
def test_bad_destinations_are_denied(host: str, port: int, fragment: str) -> None:
    decision = decide(host, port, rules(allow=("pypi.org",)))
    assert not decision.allowed
    assert fragment in decision.reason


def test_bad_resolved_address_is_denied() -> None:
    decision = decide("pypi.org", 443, rules(allow=("pypi.org",)), resolved=("nonsense",))
    assert not decision.allowed
    assert "not an IP address" in decision.reason


def test_resolved_accepts_ip_objects() -> None:
    policy = rules(allow=("pypi.org",))
    resolved = (ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("::1"))
    assert not decide("pypi.org", 443, policy, resolved=resolved).allowed


# ---------------------------------------------------------------------------------------------
# Live changes


def test_with_allowed_and_with_denied() -> None:
    base = rules(allow=("pypi.org",), tcp=("github.com:22",))
    more = with_allowed(base, "example.com")
    assert [str(r) for r in more.allow] == ["pypi.org", "example.com"]
    assert with_allowed(more, "EXAMPLE.com") == more
    assert base.allow == (parse_rule("pypi.org"),)  # unchanged: a new object is returned
    denied = with_denied(more, "example.com")
    assert [str(r) for r in denied.allow] == ["pypi.org"]
    assert [str(r) for r in denied.deny] == ["example.com"]
    assert not decide("example.com", 443, denied).allowed
    again = with_allowed(denied, "example.com")
    assert decide("example.com", 443, again).allowed
    assert again.tcp == base.tcp


def test_with_allowed_does_not_undo_a_broader_deny() -> None:
    policy = with_allowed(rules(deny=("*.example.com",)), "a.example.com")
    assert not decide("a.example.com", 443, policy).allowed


def test_live_changes_refuse_bad_entries() -> None:
    with pytest.raises(PolicyError, match="too broad"):
        with_allowed(NetworkRules(), "*.com")
    with pytest.raises(PolicyError, match="empty"):
        with_denied(NetworkRules(), "")


# ---------------------------------------------------------------------------------------------
# Properties

LABEL = st.from_regex(r"[a-z](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=2, max_size=4).map(".".join)
NAME_RULE = st.one_of(NAME, NAME.map(lambda n: f"*.{n}")).filter(
    lambda r: not r.startswith("*.") or r.count(".") >= 3
)
PORT = st.integers(min_value=1, max_value=65535)
SPECIAL = st.ip_addresses().filter(lambda a: special_category(a) is not None)


@given(st.lists(NAME_RULE, max_size=5), st.lists(NAME_RULE, min_size=1, max_size=5), NAME, PORT)
def test_deny_always_wins(allow: list[str], deny: list[str], host: str, port: int) -> None:
    policy = compile_rules([*allow, host, *deny], deny)
    if any(r.matches(host, port) for r in policy.deny):
        assert not decide(host, port, policy).allowed
    policy = compile_rules([*allow, host], [*deny, host])
    decision = decide(host, port, policy)
    assert not decision.allowed
    assert decision.rule is not None


@given(st.lists(NAME_RULE, min_size=1, max_size=5), NAME, PORT, SPECIAL)
def test_no_name_rule_ever_allows_a_special_address(
    allow: list[str], host: str, port: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    policy = compile_rules([*allow, host, f"*.{host}"], [])
    assert not decide(host, port, policy, resolved=[address]).allowed
    literal = f"[{address}]" if address.version == 6 else str(address)
    assert not decide(literal, port, policy).allowed


@given(NAME, PORT, SPECIAL, st.ip_addresses())
def test_only_a_rule_naming_the_address_exempts_it(
    host: str,
    port: int,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    other: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    mapped = getattr(address, "ipv4_mapped", None) or address
    other_mapped = getattr(other, "ipv4_mapped", None) or other
    assume(other_mapped != mapped)
    policy = compile_rules([host, str(other)], [])
    assert not decide(host, port, policy, resolved=[address]).allowed
    assert decide(host, port, with_allowed(policy, str(address)), resolved=[address]).allowed


@given(NAME, st.lists(LABEL, min_size=1, max_size=3).map(".".join), PORT)
def test_random_labels_under_an_allowed_wildcard_are_allowed(
    suffix: str, prefix: str, port: int
) -> None:
    assume(suffix.count(".") >= 1)
    policy = compile_rules([f"*.{suffix}"], [])
    assert decide(f"{prefix}.{suffix}", port, policy, resolved=PUBLIC).allowed
    assert not decide(suffix, port, policy, resolved=PUBLIC).allowed


def test_documentation_ranges_are_refused_only_on_the_hosts_own_network() -> None:
    """Some hosts use TEST-NET ranges for real: their own LAN there is special, the rest not."""
    lan = ipaddress.ip_network("192.0.2.0/24")
    policy = compile_rules(("pypi.org",), (), local_networks=(lan,))
    on_lan = decide("pypi.org", 443, policy, resolved=("192.0.2.1",))
    assert not on_lan.allowed and "this host's own network" in on_lan.reason
    elsewhere = decide("pypi.org", 443, policy, resolved=("203.0.113.80",))
    assert elsewhere.allowed
    assert special_category(ipaddress.ip_address("10.1.2.3"), (lan,)) == "a private address"
    allowed_lan = compile_rules(("pypi.org", "192.0.2.1"), (), local_networks=(lan,))
    assert decide("pypi.org", 443, allowed_lan, resolved=("192.0.2.1",)).allowed
