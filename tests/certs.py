"""Real X.509 certificates for the TLS tests, made by the `openssl` command (P-256 keys).

    ca = make_ca(tmp / "ca")                          # ca.pem, ca.key
    server = issue(ca, tmp / "server", "localhost")   # server.pem, server.key (SAN localhost, 127.0.0.1)
    client = issue(ca, tmp / "client", "client-a")

`openssl` rather than the `cryptography` package: it is on every machine that runs
the suite and keeps the locked set free of a test-only native wheel.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path

    @property
    def pair(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


def _openssl(*args: str | Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=30)


def _ec(path: Path) -> tuple[str, ...]:
    return (
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(path),
    )


def make_ca(stem: Path, name: str = "headrace test CA") -> Pem:
    stem.parent.mkdir(parents=True, exist_ok=True)
    cert, key = stem.with_suffix(".pem"), stem.with_suffix(".key")
    _openssl(
        "req", "-x509", *_ec(key), "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return Pem(cert, key)


def issue(ca: Pem, stem: Path, name: str) -> Pem:
    """A leaf certificate for `name` signed by `ca`, valid for localhost and 127.0.0.1."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    cert, key, csr, ext = (stem.with_suffix(s) for s in (".pem", ".key", ".csr", ".ext"))
    _openssl("req", *_ec(key), "-out", csr, "-subj", f"/CN={name}")
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-out", cert,
        "-days", "2", "-set_serial", str(secrets.randbits(63)), "-extfile", ext,
    )  # fmt: skip
    return Pem(cert, key)
