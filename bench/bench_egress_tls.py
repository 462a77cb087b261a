"""Cost of the sandbox CA that intercepts TLS, against the raw crypto it is made of.

    python bench/bench_egress_tls.py [--runs 30]

Rows (median of ``--runs``, each in a fresh temporary directory):

  1. CA create: key, self-signed certificate, both files written (once per sandbox that
     carries a secret)  vs  raw: an EC P-256 key and a self-signed certificate with
     ``cryptography`` alone, nothing written
  2. first leaf for a host: certificate signed by the CA and loaded into an
     ``ssl.SSLContext`` (once per intercepted host)  vs  raw: one ``load_cert_chain`` of a
     ready PEM file (the floor of getting any certificate into ``ssl``)
  3. cached leaf: the same host again (every later intercepted connection)

The ratio column is stockade's time over the raw baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stockade.egress.tls import SandboxCA


def _raw_self_signed() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _timed(runs: int, setup: Callable[[Path], object], step: Callable[[object], object]) -> float:
    """Median ms of ``step(setup(fresh_dir))``, the setup untimed."""
    samples = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
            state = setup(Path(tmp))
            t = time.perf_counter()
            step(state)
            samples.append(time.perf_counter() - t)
    return _median_ms(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    runs = parser.parse_args().runs

    def pem_file(tmp: Path) -> Path:
        key, cert = _raw_self_signed()
        path = tmp / "leaf.pem"
        path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def load_pem(path: object) -> None:
        assert isinstance(path, Path)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(path)

    def new_ca(tmp: Path) -> SandboxCA:
        return SandboxCA.create(tmp / "ca", name="bench")

    def create_in(tmp: object) -> None:
        assert isinstance(tmp, Path)
        new_ca(tmp)

    def warm_ca(tmp: Path) -> SandboxCA:
        ca = new_ca(tmp)
        ca.leaf_context("api.example.com")
        return ca

    def leaf(ca: object) -> None:
        assert isinstance(ca, SandboxCA)
        ca.leaf_context("api.example.com")

    rows = [
        (
            "CA create",
            _timed(runs, lambda tmp: tmp, create_in),
            _timed(runs, lambda tmp: None, lambda _: _raw_self_signed()),
        ),
        ("first leaf for a host", _timed(runs, new_ca, leaf), _timed(runs, pem_file, load_pem)),
        ("cached leaf (same host)", _timed(runs, warm_ca, leaf), None),
    ]
    print(f"{'sandbox CA (median of ' + str(runs) + ')':<28} {'stockade ms':>12} "
          f"{'raw ms':>8} {'ratio':>6}")  # fmt: skip
    for label, ours, raw in rows:
        raw_text = f"{raw:8.2f}" if raw is not None else f"{'-':>8}"
        ratio = f"{ours / raw:6.1f}" if raw else f"{'-':>6}"
        print(f"{label:<28} {ours:12.2f} {raw_text} {ratio}")


if __name__ == "__main__":
    main()
