"""The per-sandbox certificate authority used to intercept TLS to hosts that carry a secret.

``ca.pem`` goes into the sandbox's trust store; ``ca-key.pem`` stays on the host (mode 0600)
and signs, on demand, one short leaf certificate per intercepted host.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stockade._errors import ConfigError
from stockade.policy.rules import is_ip_literal

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEFAULT_SYSTEM_BUNDLES",
    "SandboxCA",
    "normalize_host",
    "trust_env",
]

#: File names inside the CA directory. Only ``CA_CERT_FILE`` may ever enter the sandbox.
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"

#: Where distributions keep the system CA bundle, in the order they are tried.
DEFAULT_SYSTEM_BUNDLES: tuple[Path, ...] = (
    Path("/etc/ssl/certs/ca-certificates.crt"),  # Debian, Ubuntu, Alpine, Arch
    Path("/etc/pki/tls/certs/ca-bundle.crt"),  # Fedora, RHEL
    Path("/etc/ssl/ca-bundle.pem"),  # openSUSE
    Path("/etc/ssl/cert.pem"),  # macOS, some BSDs
)

_DEFAULT_VALIDITY = datetime.timedelta(days=30)
# Clocks inside a sandbox (or a suspended VM) may lag the host's a little.
_BACKDATE = datetime.timedelta(hours=1)
_LEAF_CACHE_SIZE = 256
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# A DNS name constraint that matches no real name: RFC 6761 reserves ``.invalid``.
_NO_DNS = "invalid"


def normalize_host(host: str) -> str:
    """Lower-case ``host``, drop a trailing dot and IPv6 brackets; refuse what is no host name.

    Raises ``ValueError`` for anything that is neither an IP address nor an ASCII DNS name.
    """
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.removesuffix(".")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not text or len(text) > 253 or not all(_LABEL_RE.match(label) for label in text.split(".")):
        raise ValueError(f"{host!r} is not a host name or IP address")
    return text


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name_constraints(permitted: Iterable[str]) -> x509.NameConstraints:
    dns: list[x509.GeneralName] = []
    ips: list[x509.GeneralName] = []
    for pattern in permitted:
        wildcard = pattern.startswith("*.")
        host = normalize_host(pattern[2:] if wildcard else pattern)
        if is_ip_literal(host):
            ips.append(x509.IPAddress(ipaddress.ip_network(host)))
        else:
            # A DNS constraint "example.com" covers example.com and every name under it.
            dns.append(x509.DNSName(host))
    excluded: list[x509.GeneralName] | None = None
    if not ips:
        # Without a permitted IP subtree, IP SANs would be unconstrained: exclude them all.
        excluded = [
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ]
    if not dns:
        dns.append(x509.DNSName(_NO_DNS))
    return x509.NameConstraints(permitted_subtrees=dns + ips, excluded_subtrees=excluded)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class SandboxCA:
    """A sandbox's own CA: creates it on disk, loads it, and issues cached leaf contexts."""

    def __init__(
        self,
        directory: Path,
        certificate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        *,
        cache_size: int = _LEAF_CACHE_SIZE,
    ) -> None:
        self.directory = directory
        self.certificate = certificate
        self._key = key
        self._cache_size = cache_size
        self._leaves: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()
        # One leaf key per CA instance: it never leaves host memory, and reusing it makes a
        # new host cost one signature instead of a key generation.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())

    def __repr__(self) -> str:
        return f"SandboxCA(directory={str(self.directory)!r}, subject={self.subject!r})"

    # --- creation and loading -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        name: str,
        valid_for: datetime.timedelta = _DEFAULT_VALIDITY,
        permitted_hosts: Iterable[str] | None = None,
    ) -> SandboxCA:
        """Generate a new CA for sandbox ``name`` and write it to ``directory``.

        ``permitted_hosts`` (exact names, ``*.example.com`` patterns, IP addresses) become
        X.509 name constraints, so even a stolen key could not sign for any other host.
        ``directory`` is created with mode 0700 if missing; an existing CA is never
        overwritten (use ``load``).
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        for path in (cert_path, key_path):
            if path.exists():
                raise FileExistsError(
                    f"{path} already exists; load the existing CA with SandboxCA.load "
                    "or remove the directory first"
                )
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stockade"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"stockade sandbox CA {name}"[:64]),
            ]
        )
        now = _now()
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        if permitted_hosts is not None:
            builder = builder.add_extension(_name_constraints(permitted_hosts), critical=True)
        certificate = builder.sign(key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # The key first: a directory holding a certificate but no key is easier to notice
        # than a key without its certificate.
        _write_private(key_path, key_pem)
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_path, 0o644)
        return cls(directory, certificate, key)

    @classmethod
    def load(cls, directory: Path) -> SandboxCA:
        """Load the CA written by ``create``; refuse a key others can read, or an expired CA."""
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        try:
            mode = key_path.stat().st_mode
            cert_pem = cert_path.read_bytes()
            key_pem = key_path.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"sandbox CA incomplete: {exc.filename} is missing; "
                "recreate the sandbox to generate a new CA"
            ) from exc
        if mode & 0o077:
            raise ConfigError(
                f"{key_path} is readable by other users (mode {mode & 0o777:o}); "
                f"run 'chmod 600 {key_path}'"
            )
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except ValueError as exc:
            raise ConfigError(
                f"sandbox CA in {directory} is not readable PEM; recreate the sandbox"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} does not hold an EC private key; recreate the sandbox")
        if key.public_key() != certificate.public_key():
            raise ConfigError(f"{key_path} does not match {cert_path}; recreate the sandbox")
        if certificate.not_valid_after_utc <= _now():
            raise ConfigError(
                f"sandbox CA in {directory} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; "
                "recreate the sandbox"
            )
        return cls(directory, certificate, key)

    # --- accessors ----------------------------------------------------------------------

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def cert_path(self) -> Path:
        """The certificate file: the only file of the CA the sandbox may see."""
        return self.directory / CA_CERT_FILE

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def trust_bundle(self, system_bundle: Path | None = None) -> bytes:
        """The system CA bundle followed by this CA, for the sandbox's ``SSL_CERT_FILE``.

        ``system_bundle`` defaults to the first of ``DEFAULT_SYSTEM_BUNDLES`` that exists (or
        to none at all, giving a bundle that trusts only this CA).
        """
        if system_bundle is None:
            system_bundle = next((p for p in DEFAULT_SYSTEM_BUNDLES if p.is_file()), None)
            if system_bundle is None:
                return self.cert_pem
        try:
            system = system_bundle.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the system CA bundle {system_bundle}: {exc.strerror}; "
                "install the 'ca-certificates' package or pass another bundle"
            ) from exc
        if system and not system.endswith(b"\n"):
            system += b"\n"
        return system + self.cert_pem

    # --- leaves -------------------------------------------------------------------------

    def leaf_context(self, host: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a certificate for ``host``, signed by this CA.

        ``host`` is a DNS name or an IP address. Contexts are cached per host (bounded LRU).
        ALPN offers only ``http/1.1``: the interceptor speaks nothing else.
        """
        key = normalize_host(host)
        with self._lock:
            context = self._leaves.get(key)
            if context is not None:
                self._leaves.move_to_end(key)
                return context
        context = self._new_leaf_context(key)
        with self._lock:
            self._leaves[key] = context
            self._leaves.move_to_end(key)
            while len(self._leaves) > self._cache_size:
                self._leaves.popitem(last=False)
        return context

    def leaf_certificate(self, host: str) -> x509.Certificate:
        """A fresh leaf certificate for ``host`` (uncached; ``leaf_context`` uses it)."""
        host = normalize_host(host)
        san: x509.GeneralName = (
            x509.IPAddress(ipaddress.ip_address(host))
            if is_ip_literal(host)
            else x509.DNSName(host)
        )
        now = _now()
        public = self._leaf_key.public_key()
        ca_public = self.certificate.public_key()
        if not isinstance(ca_public, ec.EllipticCurvePublicKey):  # pragma: no cover
            raise TypeError("the sandbox CA must hold an EC key")
        # The subject carries no common name: with the name in the SAN only, a verifier never
        # falls back to matching the CN against the CA's name constraints.
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stockade")]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(self.certificate.not_valid_after_utc)
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
        )
        return builder.sign(self._key, hashes.SHA256())

    def _new_leaf_context(self, host: str) -> ssl.SSLContext:
        leaf = self.leaf_certificate(host)
        pem = leaf.public_bytes(serialization.Encoding.PEM) + self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        # The ssl module loads certificates only from files: a 0600 file in the host-only
        # CA directory, removed as soon as it is loaded.
        fd, name = tempfile.mkstemp(prefix=".leaf-", suffix=".pem", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            context.load_cert_chain(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        return context


def trust_env(bundle_path_in_sandbox: str, ca_path_in_sandbox: str) -> dict[str, str]:
    """Environment variables that make common tools inside the sandbox trust the sandbox CA.

    ``bundle_path_in_sandbox`` holds ``SandboxCA.trust_bundle()`` (system CAs + ours);
    ``ca_path_in_sandbox`` holds ``ca.pem`` alone, for Node, which *adds* extra CAs.
    """
    return {
        "SSL_CERT_FILE": bundle_path_in_sandbox,
        "REQUESTS_CA_BUNDLE": bundle_path_in_sandbox,
        "CURL_CA_BUNDLE": bundle_path_in_sandbox,
        "PIP_CERT": bundle_path_in_sandbox,
        "GIT_SSL_CAINFO": bundle_path_in_sandbox,
        "NODE_EXTRA_CA_CERTS": ca_path_in_sandbox,
    }
