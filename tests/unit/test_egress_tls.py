"""The per-sandbox CA: files and modes, leaves that verify with ``ssl``, name constraints."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stockade._errors import ConfigError
from stockade.egress.tls import CA_CERT_FILE, CA_KEY_FILE, SandboxCA, normalize_host, trust_env


@pytest.fixture
def ca(tmp_path: Path) -> SandboxCA:
    return SandboxCA.create(tmp_path / "ca", name="demo")


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> str | None:
    """Run one TLS handshake over a socket pair; return the negotiated ALPN protocol."""
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(right, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        left.settimeout(5)
        with client_ctx.wrap_socket(left, server_hostname=host) as tls:
            protocol = tls.selected_alpn_protocol()
            tls.sendall(b"x")
    finally:
        thread.join(5)
    return protocol


def client_trusting(ca: SandboxCA) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def test_create_writes_cert_and_private_key(ca: SandboxCA) -> None:
    key_mode = stat.S_IMODE((ca.directory / CA_KEY_FILE).stat().st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE(ca.directory.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" not in (ca.directory / CA_CERT_FILE).read_bytes()
    assert ca.cert_path.read_bytes() == ca.cert_pem
    basic = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    assert isinstance(ca.certificate.public_key(), ec.EllipticCurvePublicKey)
    lifetime = ca.certificate.not_valid_after_utc - ca.certificate.not_valid_before_utc
    assert datetime.timedelta(days=1) < lifetime < datetime.timedelta(days=60)
    assert "demo" in ca.subject


def test_create_refuses_to_overwrite(ca: SandboxCA) -> None:
    with pytest.raises(FileExistsError, match=r"SandboxCA\.load"):
        SandboxCA.create(ca.directory, name="again")


def test_load_round_trip_and_checks(ca: SandboxCA) -> None:
    loaded = SandboxCA.load(ca.directory)
    assert loaded.cert_pem == ca.cert_pem
    (ca.directory / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        SandboxCA.load(ca.directory)
    (ca.directory / CA_KEY_FILE).unlink()
    with pytest.raises(ConfigError, match="missing"):
        SandboxCA.load(ca.directory)


def test_load_refuses_expired(tmp_path: Path) -> None:
    ca = SandboxCA.create(tmp_path / "ca", name="old", valid_for=datetime.timedelta(seconds=-1))
    with pytest.raises(ConfigError, match="expired"):
        SandboxCA.load(ca.directory)


@pytest.mark.parametrize("host", ["api.example.com", "127.0.0.1", "::1"])
def test_leaf_verifies_for_its_host(ca: SandboxCA, host: str) -> None:
    protocol = handshake(ca.leaf_context(host), client_trusting(ca), host)
    assert protocol == "http/1.1"  # offered h2 too; only http/1.1 may be chosen


def test_leaf_does_not_verify_for_another_host(ca: SandboxCA) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.leaf_context("api.example.com"), client_trusting(ca), "evil.example.com")


def test_leaf_not_trusted_by_a_client_without_the_ca(ca: SandboxCA, tmp_path: Path) -> None:
    other = SandboxCA.create(tmp_path / "other", name="other")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.leaf_context("api.example.com"), client_trusting(other), "api.example.com")


def test_leaf_cache_is_bounded_lru(tmp_path: Path) -> None:
    ca = SandboxCA.create(tmp_path / "ca", name="lru")
    ca._cache_size = 2
    first = ca.leaf_context("a.example.com")
    assert ca.leaf_context("A.example.com.") is first
    ca.leaf_context("b.example.com")
    ca.leaf_context("a.example.com")  # refresh a
    ca.leaf_context("c.example.com")  # evicts b
    assert ca.leaf_context("a.example.com") is first
    assert list(ca._leaves) == ["c.example.com", "a.example.com"]
    assert not list(ca.directory.glob(".leaf-*")), "temporary leaf files must be removed"


def test_leaf_rejects_non_hosts(ca: SandboxCA) -> None:
    for bad in ["", "exa mple.com", "a..b", "évil.com", "-a.com"]:
        with pytest.raises(ValueError):
            ca.leaf_context(bad)


def test_normalize_host() -> None:
    assert normalize_host("API.Example.COM.") == "api.example.com"
    assert normalize_host("[::1]") == "::1"
    assert normalize_host("127.0.0.1") == "127.0.0.1"


def test_name_constraints_limit_what_the_ca_can_sign(tmp_path: Path) -> None:
    ca = SandboxCA.create(
        tmp_path / "ca", name="nc", permitted_hosts=["api.example.com", "*.corp.test"]
    )
    constraints = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    client = client_trusting(ca)
    handshake(ca.leaf_context("api.example.com"), client, "api.example.com")
    handshake(ca.leaf_context("x.corp.test"), client, "x.corp.test")
    # The CA signs whatever is asked, but verifiers refuse names outside the constraints.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.leaf_context("evil.test"), client, "evil.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.leaf_context("127.0.0.1"), client, "127.0.0.1")


def test_name_constraints_with_ip_only(tmp_path: Path) -> None:
    ca = SandboxCA.create(tmp_path / "ca", name="nc", permitted_hosts=["127.0.0.1"])
    client = client_trusting(ca)
    handshake(ca.leaf_context("127.0.0.1"), client, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.leaf_context("example.com"), client, "example.com")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.leaf_context("127.0.0.2"), client, "127.0.0.2")


def test_key_never_in_repr(ca: SandboxCA) -> None:
    key_pem = (ca.directory / CA_KEY_FILE).read_text()
    body = "".join(key_pem.splitlines()[1:-1])
    assert body[:20] not in repr(ca)


def test_trust_bundle(ca: SandboxCA, tmp_path: Path) -> None:
    system = tmp_path / "system.pem"
    other = _self_signed_pem()
    system.write_bytes(other.rstrip(b"\n"))
    bundle = ca.trust_bundle(system)
    assert bundle.startswith(other.rstrip(b"\n") + b"\n")
    assert bundle.endswith(ca.cert_pem)
    # Both are usable as a trust store.
    context = ssl.create_default_context(cadata=bundle.decode())
    assert len(context.get_ca_certs()) == 2
    with pytest.raises(ConfigError, match="ca-certificates"):
        ca.trust_bundle(tmp_path / "missing.pem")
    default = ca.trust_bundle()
    assert default.endswith(ca.cert_pem)


def test_trust_env() -> None:
    env = trust_env("/etc/stockade/bundle.pem", "/etc/stockade/ca.pem")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE"):
        assert env[name] == "/etc/stockade/bundle.pem"
    assert env["NODE_EXTRA_CA_CERTS"] == "/etc/stockade/ca.pem"


def _self_signed_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)
