"""TLS for every port: the certificate, its key and (for mTLS) the client CA, reloaded on change.

    tls = ServerTls(TlsFiles(cert, key, client_ca))   # TlsError naming the flag when a file is bad
    server.add_secure_port(target, tls.grpc_credentials())
    uvicorn_config.ssl = tls.ssl_context()             # the HTTP front, the metrics port

Rotation without a restart: each new connection first checks (at most once per
`check_every_s`) whether a file changed, by mtime, size and inode (a
Kubernetes secret volume swaps a symlink). A changed set is validated as at
start and then used for the connections that follow; connections already open
keep the certificate they shook hands with. A set that does not validate
(a key not yet written beside its new certificate) keeps the old one in use,
logs why once, and is tried again when the files change again.

gRPC asks `grpc.dynamic_ssl_server_credentials`' fetcher before each handshake
(from one of its own threads); Python's `ssl` servers swap the connection's
SSLContext in the SNI callback, which OpenSSL calls for every ClientHello, with
or without a server name.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from headrace.server.config import ConfigError
from headrace.server.logs import get_logger

log = get_logger("headrace.tls")

Signature = tuple[tuple[int, int, int, int] | None, ...]


class TlsError(ConfigError):
    """A TLS file is missing, unreadable, not PEM, or the key does not match the certificate."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path  # PEM certificate chain, the server's first
    key: Path  # PEM private key of that certificate (unencrypted)
    client_ca: Path | None = None  # PEM CA bundle: client certificates are required and verified


@dataclass(frozen=True, slots=True)
class _Loaded:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext  # for the Python ssl servers (HTTP front, metrics)


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it: {exc.strerror}") from None


class _Encrypted(Exception):
    pass


def _no_password() -> bytes:
    raise _Encrypted  # OpenSSL asks for a password: never prompt on the terminal


def _check_pem_certs(flag: str, path: Path | None, pem: bytes) -> None:
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise TlsError(f"{flag} {path}: not a PEM certificate")
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only to parse the certificates
    try:
        scratch.load_verify_locations(cadata=pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"{flag} {path}: not a valid PEM certificate ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    text = str(getattr(exc, "reason", None) or exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)


def _server_context(
    files: TlsFiles, cert: bytes, key: bytes, client_ca: bytes | None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: the bytes already read go through private
    # temporary files, so what was checked is what gRPC serves too.
    with tempfile.TemporaryDirectory(prefix="headrace-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        try:
            context.load_cert_chain(cert_path, key_path, password=_no_password)
        except _Encrypted:
            raise TlsError(
                f"--tls-key {files.key}: the private key is encrypted; give an unencrypted PEM key"
            ) from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise TlsError(
                    f"--tls-key {files.key} does not match the certificate of "
                    f"--tls-cert {files.cert}"
                ) from None
            raise TlsError(
                f"--tls-key {files.key}: not a usable private key ({_reason(exc)})"
            ) from None
    if client_ca is not None:
        context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(files: TlsFiles) -> _Loaded:
    """Read and check the files as OpenSSL will use them; TlsError names the flag."""
    cert = _read("--tls-cert", files.cert)
    key = _read("--tls-key", files.key)
    client_ca = _read("--tls-client-ca", files.client_ca) if files.client_ca else None
    _check_pem_certs("--tls-cert", files.cert, cert)
    if b"-----BEGIN" not in key or b"PRIVATE KEY-----" not in key:
        raise TlsError(f"--tls-key {files.key}: not a PEM private key")
    if client_ca is not None:
        _check_pem_certs("--tls-client-ca", files.client_ca, client_ca)
    return _Loaded(cert, key, client_ca, _server_context(files, cert, key, client_ca))


def _signature(files: TlsFiles) -> Signature:
    out = []
    for path in (files.cert, files.key, files.client_ca):
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        out.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) if st else None)
    return tuple(out)


class ServerTls:
    """The TLS material of every port, checked at start and reloaded when its files change."""

    def __init__(self, files: TlsFiles, check_every_s: float = 1.0) -> None:
        self.files = files
        self.check_every_s = check_every_s
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self._signature = _signature(files)
        self._loaded = _load(files)  # TlsError at start: the server does not start
        self._failed: Signature | None = None
        self._checked = time.monotonic()
        self._handed_to_grpc: _Loaded | None = None
        self._base: ssl.SSLContext | None = None

    @property
    def mutual(self) -> bool:
        return self.files.client_ca is not None

    def refresh(self) -> _Loaded:
        """The material in use, re-read first when the files changed."""
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return self._loaded
        with self._lock:
            self._checked = now
            signature = _signature(self.files)
            if signature in (self._signature, self._failed):
                return self._loaded
            try:
                loaded = _load(self.files)
            except TlsError as exc:
                self._failed = signature
                log.warning("tls_reload_failed", reason=str(exc))
                return self._loaded
            self._loaded, self._signature, self._failed = loaded, signature, None
        log.info("tls_reloaded", cert=str(self.files.cert))
        return loaded

    # -- gRPC --------------------------------------------------------------------------------

    def _grpc_config(self, loaded: _Loaded) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(loaded.key, loaded.cert)], root_certificates=loaded.client_ca
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called before each handshake; None keeps the configuration gRPC holds.
        try:
            loaded = self.refresh()
            if loaded is self._handed_to_grpc:
                return None
            self._handed_to_grpc = loaded
            return self._grpc_config(loaded)
        except Exception:  # an exception here would fail the handshake; keep serving
            log.exception("tls_fetch_failed")
            return None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        loaded = self._loaded
        self._handed_to_grpc = loaded
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(loaded),
            self._fetch,  # type: ignore[arg-type]  # None means unchanged (grpc's docs)
            require_client_authentication=self.mutual,
        )

    # -- Python ssl servers ------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """An SSLContext for asyncio / socket servers that follows reloads."""
        loaded = self._loaded
        base = _server_context(self.files, loaded.cert, loaded.key, loaded.client_ca)

        def on_client_hello(
            conn: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
        ) -> None:
            conn.context = self.refresh().context

        base.sni_callback = on_client_hello
        return base
