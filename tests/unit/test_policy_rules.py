"""Egress rule strings: parsing, normalisation, refusals with reasons, matching."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade._errors import ConfigError
from stockade.policy.rules import PUBLIC_SUFFIXES, Rule, RuleError, parse_rule

# ---------------------------------------------------------------------------------------------
# Parsing and normal forms


@pytest.mark.parametrize(
    ("text", "kind", "canonical"),
    [
        ("pypi.org", "host", "pypi.org"),
        ("PyPI.Org.", "host", "pypi.org"),
        ("github.com:22", "host", "github.com:22"),
        ("localhost", "host", "localhost"),
        ("under_score.example.com", "host", "under_score.example.com"),
        ("*.example.com", "wildcard", "*.example.com"),
        ("*.Example.COM.:443", "wildcard", "*.example.com:443"),
        ("*.example.co.uk", "wildcard", "*.example.co.uk"),
        ("bücher.de", "host", "xn--bcher-kva.de"),
        ("*.bücher.de", "wildcard", "*.xn--bcher-kva.de"),
        ("1.2.3.4", "address", "1.2.3.4"),
        ("1.2.3.4:80", "address", "1.2.3.4:80"),
        ("::1", "address", "::1"),
        ("[::1]", "address", "::1"),
        ("[::1]:8080", "address", "[::1]:8080"),
        ("2001:DB8::1", "address", "2001:db8::1"),
        ("::ffff:127.0.0.1", "address", "127.0.0.1"),
        ("[::ffff:10.0.0.1]:22", "address", "10.0.0.1:22"),
        ("10.0.0.0/8", "network", "10.0.0.0/8"),
        ("10.0.0.0/8:5432", "network", "10.0.0.0/8:5432"),
        ("192.168.1.0/24", "network", "192.168.1.0/24"),
        ("fd00::/8", "network", "fd00::/8"),
        ("[fd00::/8]:443", "network", "[fd00::/8]:443"),
        ("2001:db8::/32", "network", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "network", "10.0.0.0/8"),
    ],
)
def test_parse_and_canonical_form(text: str, kind: str, canonical: str) -> None:
    rule = parse_rule(text)
    assert rule.kind == kind
    assert str(rule) == canonical
    assert rule.text == text
    assert rule.written == text
    assert parse_rule(str(rule)) == rule


def test_equality_ignores_how_the_rule_was_written() -> None:
    assert parse_rule("PyPI.org.") == parse_rule("pypi.org")
    assert parse_rule("[::1]") == parse_rule("::1")
    assert parse_rule("pypi.org") != parse_rule("pypi.org:443")
    assert Rule("host", name="pypi.org").written == "pypi.org"


def test_ports() -> None:
    assert parse_rule("a.org").port is None
    assert parse_rule("a.org:1").port == 1
    assert parse_rule("a.org:65535").port == 65535
    assert parse_rule("github.com:22", port_required=True).port == 22


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("*", "matches every host"),
        ("*.", "matches every host"),
        ("*:443", "matches every host"),
        ("*.com", "top-level domain '.com'"),
        ("*.uk:443", "top-level domain '.uk'"),
        ("*.co.uk", "'co.uk' is a public suffix"),
        ("*.CO.UK.", "'co.uk' is a public suffix"),
        ("*.github.io", "'github.io' is a public suffix"),
        ("*.s3.amazonaws.com", "public suffix"),
        ("0.0.0.0/0", "every address"),
        ("::/0", "every address"),
        ("[::/0]:443", "every address"),
        ("0.0.0.0/7", "at most a /8"),
        ("2000::/15", "/16 for IPv6"),
        ("fc00::/7", "at most a /8"),
        ("::ffff:0.0.0.0/96", "every address"),
        ("::ffff:0.0.0.0/100", "at most a /8"),
    ],
)
def test_too_broad_rules_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    assert info.value.too_broad
    assert info.value.entry == text
    assert info.value.reason.startswith("too broad: ")
    assert fragment in info.value.reason
    assert str(info.value).startswith(f"{text!r} is refused: too broad")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("a b", "whitespace"),
        (" pypi.org", "whitespace"),
        ("pypi.org\n", "whitespace"),
        ("foo.*.com", "whole first label"),
        ("*.*", "whole first label"),
        ("**.org", "whole first label"),
        ("*foo.com", "whole first label"),
        ("foo*.com", "whole first label"),
        ("*.example.*", "whole first label"),
        ("pypi.org:0", "1 to 65535"),
        ("pypi.org:65536", "1 to 65535"),
        ("pypi.org:", "1 to 65535"),
        ("pypi.org:http", "1 to 65535"),
        ("pypi.org:-1", "1 to 65535"),
        ("[::1]:0", "1 to 65535"),
        ("[::1]x", "after ']'"),
        ("[::1", "closing ']'"),
        ("https://pypi.org", "URL"),
        ("pypi.org/simple", "URL"),
        ("1.2.3", "not a valid IP address"),
        ("1.2.3.256", "not a valid IP address"),
        ("fe80::1::2", "not a valid IP address"),
        ("[pypi.org]:443", "not a valid IP address"),
        ("10.0.0.1/8", "did you mean '10.0.0.0/8'"),
        ("10.0.0.0/33", "not a valid network"),
        ("foo..com", "empty label"),
        (".foo.com", "empty label"),
        ("foo.com..", "empty label"),
        ("-foo.com", "label '-foo'"),
        ("foo-.com", "label 'foo-'"),
        ("a" * 64 + ".com", "not valid in a host name"),
        (".".join(["a" * 60] * 5), "longer than 253"),
        ("foo!.com", "not valid in a host name"),
        ("example.123", "neither a valid IPv4 address nor a host name"),
    ],
)
def test_invalid_rules_are_refused_with_the_reason(text: str, fragment: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    assert not info.value.too_broad
    assert fragment in info.value.reason
    assert str(info.value).startswith(f"{text!r} is refused: ")


def test_tcp_rules_need_a_port() -> None:
    with pytest.raises(RuleError, match="needs a port"):
        parse_rule("github.com", port_required=True)
    with pytest.raises(RuleError, match="needs a port"):
        parse_rule("10.0.0.0/8", port_required=True)


def test_rule_error_is_a_config_error_and_a_value_error() -> None:
    with pytest.raises(ConfigError):
        parse_rule("*")
    with pytest.raises(ValueError, match="too broad"):
        parse_rule("*")


def test_public_suffixes_are_normal_names() -> None:
    for suffix in PUBLIC_SUFFIXES:
        assert "." in suffix
        assert str(parse_rule(suffix)) == suffix  # exact names are fine, only *.SUFFIX is not


# ---------------------------------------------------------------------------------------------
# Matching


def test_exact_name_matches_any_spelling_and_port_when_none_given() -> None:
    rule = parse_rule("pypi.org")
    assert rule.matches("pypi.org", 443)
    assert rule.matches("PYPI.ORG.", 80)
    assert not rule.matches("www.pypi.org", 443)
    assert not rule.matches("pypi.org.evil.com", 443)
    assert not rule.matches("evilpypi.org", 443)


def test_port_must_match_when_given() -> None:
    rule = parse_rule("github.com:22")
    assert rule.matches("github.com", 22)
    assert not rule.matches("github.com", 443)


def test_wildcard_matches_subdomains_not_the_apex() -> None:
    rule = parse_rule("*.example.com")
    assert rule.matches("a.example.com", 443)
    assert rule.matches("a.b.example.com", 443)
    assert not rule.matches("example.com", 443)
    assert not rule.matches("badexample.com", 443)
    assert not rule.matches("example.com.evil.org", 443)


def test_unicode_host_matches_its_idna_rule() -> None:
    assert parse_rule("bücher.de").matches("BÜCHER.de", 443)
    assert parse_rule("xn--bcher-kva.de").matches("bücher.de", 443)


def test_address_and_network_rules_match_literals_and_addresses() -> None:
    one = parse_rule("10.1.2.3")
    net = parse_rule("10.0.0.0/8:5432")
    v6 = parse_rule("[::1]:8080")
    addr = ipaddress.ip_address("10.1.2.3")
    assert one.matches("10.1.2.3", 1)
    assert one.matches("::ffff:10.1.2.3", 1)
    assert one.matches("db.internal", 1, [addr])
    assert not one.matches("db.internal", 1)
    assert net.matches("10.9.9.9", 5432)
    assert not net.matches("10.9.9.9", 5433)
    assert not net.matches("11.0.0.1", 5432)
    assert v6.matches("[::1]", 8080)
    assert v6.matches("::1", 8080)
    assert not v6.matches("127.0.0.1", 8080)
    assert parse_rule("pypi.org").matches("pypi.org", 1, [])


def test_name_rules_never_match_addresses_and_bad_hosts_match_nothing() -> None:
    assert not parse_rule("pypi.org").matches("1.2.3.4", 443)
    assert not parse_rule("pypi.org").matches("", 443)
    assert not parse_rule("pypi.org").matches("bad host", 443)
    assert not parse_rule("1.2.3.4").matches("999.1.1.1", 443)
    assert not parse_rule("1.2.3.4").contains(ipaddress.ip_address("::1"))


# ---------------------------------------------------------------------------------------------
# Properties

LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
NAME = (
    st.lists(LABEL, min_size=2, max_size=5)
    .map(".".join)
    .filter(lambda n: not n.rsplit(".", 1)[1].isdigit())
)
PORT = st.none() | st.integers(min_value=1, max_value=65535)


def _with_port(base: str, port: int | None) -> str:
    return base if port is None else f"{base}:{port}"


@given(NAME, PORT)
def test_name_round_trip(name: str, port: int | None) -> None:
    rule = parse_rule(_with_port(name, port))
    assert str(rule) == _with_port(name, port)
    assert parse_rule(str(rule)) == rule
    assert parse_rule(_with_port(name.upper() + ".", port)) == rule


@given(
    st.lists(LABEL, min_size=2, max_size=4)
    .map(".".join)
    .filter(lambda n: n not in PUBLIC_SUFFIXES and not n.rsplit(".", 1)[1].isdigit()),
    st.lists(LABEL, min_size=1, max_size=3).map(".".join),
    PORT,
)
def test_wildcards_match_every_subdomain_but_never_the_apex(
    suffix: str, prefix: str, port: int | None
) -> None:
    rule = parse_rule(_with_port(f"*.{suffix}", port))
    assert parse_rule(str(rule)) == rule
    check = port or 443
    assert rule.matches(f"{prefix}.{suffix}", check)
    assert not rule.matches(suffix, check)
    assert not rule.matches(f"{prefix}{suffix}", check)


@given(st.ip_addresses(), PORT)
def test_address_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int | None
) -> None:
    base = str(address)
    text = (
        f"[{base}]:{port}" if port is not None and address.version == 6 else _with_port(base, port)
    )
    rule = parse_rule(text)
    assert parse_rule(str(rule)) == rule
    assert rule.matches(base, port or 1)


@given(st.ip_addresses(v=4), st.integers(min_value=8, max_value=32))
def test_v4_networks_from_slash_8_round_trip(address: ipaddress.IPv4Address, prefix: int) -> None:
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    rule = parse_rule(str(network))
    assert parse_rule(str(rule)) == rule
    assert rule.contains(network.network_address)
    assert rule.contains(network.broadcast_address)


@given(st.ip_addresses(v=4), st.integers(min_value=1, max_value=7))
def test_v4_networks_wider_than_slash_8_are_refused(
    address: ipaddress.IPv4Address, prefix: int
) -> None:
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    with pytest.raises(RuleError) as info:
        parse_rule(str(network))
    assert info.value.too_broad
