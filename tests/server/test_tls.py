"""TLS files: a clear error naming the flag for each way they can be wrong, reloads kept safe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from headrace.server.config import ConfigError
from headrace.server.tls import ServerTls, TlsError, TlsFiles

from tests.certs import OPENSSL, Pem, issue, make_ca, needs_openssl

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    root = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(root / "ca"), make_ca(root / "other")
    return {"ca": ca, "server": issue(ca, root / "server", "localhost"),
            "other": issue(other, root / "other-server", "localhost")}  # fmt: skip


def test_good_files_load(pki) -> None:
    s = pki["server"]
    assert not ServerTls(TlsFiles(s.cert, s.key)).mutual
    tls = ServerTls(TlsFiles(s.cert, s.key, pki["ca"].cert))
    assert tls.mutual and tls.grpc_credentials() is not None
    assert tls.ssl_context().verify_mode.name == "CERT_REQUIRED"


def files(tmp_path: Path, pki, *, cert=None, key=None, ca=None) -> TlsFiles:
    def place(name: str, content: bytes | Path | None, default: Path | None) -> Path | None:
        if content is None:
            return default
        path = tmp_path / name
        path.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
        return path

    s = pki["server"]
    return TlsFiles(
        place("c.pem", cert, s.cert), place("k.pem", key, s.key), place("ca.pem", ca, None)
    )


def encrypted_key(tmp_path: Path, pki) -> bytes:
    out = tmp_path / "enc.key"
    subprocess.run(
        [OPENSSL, "pkey", "-in", pki["server"].key, "-aes256", "-passout", "pass:x", "-out", out],
        check=True, capture_output=True,
    )  # fmt: skip
    return out.read_bytes()


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("mismatch", "--tls-key .* does not match the certificate of --tls-cert"),
        ("cert not PEM", "--tls-cert .*: not a PEM certificate"),
        ("cert garbled", "--tls-cert .*: not a valid PEM certificate"),
        ("key not PEM", "--tls-key .*: not a PEM private key"),
        ("key is a cert", "--tls-key .*: not a PEM private key"),
        ("key encrypted", "--tls-key .*: the private key is encrypted"),
        ("ca not PEM", "--tls-client-ca .*: not a PEM certificate"),
        ("cert missing", "--tls-cert .*: cannot read it: No such file"),
    ],
)
def test_bad_files_name_the_flag(tmp_path: Path, pki, case: str, needle: str) -> None:
    garbled = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    given = {
        "mismatch": {"key": pki["other"].key},
        "cert not PEM": {"cert": b"\x30\x82 DER bytes"},
        "cert garbled": {"cert": garbled},
        "key not PEM": {"key": b"hello"},
        "key is a cert": {"key": pki["server"].cert},
        "key encrypted": {"key": encrypted_key(tmp_path, pki)},
        "ca not PEM": {"ca": b"not a bundle"},
    }
    if case == "cert missing":
        tls_files = TlsFiles(tmp_path / "nope.pem", pki["server"].key)
    else:
        tls_files = files(tmp_path, pki, **given[case])
    with pytest.raises(TlsError, match=needle):
        ServerTls(tls_files)
    assert issubclass(TlsError, ConfigError)  # `headrace serve` prints it and exits 2


def test_a_bad_rotation_keeps_the_pair_in_use(tmp_path: Path, pki) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki["server"].cert, cert)
    shutil.copy(pki["server"].key, key)
    tls = ServerTls(TlsFiles(cert, key), check_every_s=0.0)
    first = tls.refresh()
    assert tls.refresh() is first  # unchanged files: nothing re-read
    shutil.copy(pki["other"].cert, cert)  # the key is not there yet
    assert tls.refresh() is first
    shutil.copy(pki["other"].key, key)
    second = tls.refresh()
    assert second is not first and second.cert == pki["other"].cert.read_bytes()
    # gRPC's fetcher hands over a new configuration once, then "unchanged" (None)
    tls.grpc_credentials()
    assert tls._fetch() is None
    shutil.copy(pki["server"].cert, cert)
    shutil.copy(pki["server"].key, key)
    assert tls._fetch() is not None and tls._fetch() is None
