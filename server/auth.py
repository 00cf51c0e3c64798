"""API keys: one check for every front (native gRPC, KServe, HTTP, metrics).

    keys = Authenticator(Path("keys.txt"), exempt=("health",))
    caller = keys.authenticate("Bearer s3cr3t")    # raises Unauthenticated
    with acting_as(caller):                          # the fronts do this per call
        authorize_model("sentiment")                 # raises ModelForbidden for a scoped key

The key file holds one key per line, optionally followed by the models it may
use (comma separated); `#` starts a comment line, blank lines are skipped:

    # ops: every model
    3f9c2a...e1
    # the web shop: sentiment only
    77b0d4...9a  sentiment,sentiment-teacher

Only the SHA-256 digest of each key is kept, and every presented key is
compared (hmac.compare_digest) against every digest, so the time a check
takes does not depend on which key matched or how much of it was right. Keys
are never logged: a log line names one by `key_id` (the first 8 hex digits of
its SHA-256). The file is re-read when it changes (checked at most once per
`check_every_s`), so keys rotate without a restart; a file that no longer parses
keeps the keys already loaded and logs why.

This module knows no transport: the gRPC interceptor (server/rpc.py), the HTTP
middleware and the metrics endpoint each read their `authorization` header and
call `authenticate`; the fronts call `authorize_model` once they know the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from headrace.server.config import AUTH_EXEMPT_GROUPS, ConfigError
from headrace.server.errors import ModelForbidden
from headrace.server.logs import get_logger

log = get_logger("headrace.auth")

# What `auth_exempt` may name; "health" is exempt unless configured otherwise.
EXEMPT_GROUPS = AUTH_EXEMPT_GROUPS
DEFAULT_EXEMPT = ("health",)
UNAUTHENTICATED_MESSAGE = "a valid API key is required (authorization: Bearer <key>)"


class KeyFileError(ConfigError):
    """The key file cannot be read or parsed; the message names the file and line, never a key."""


class Unauthenticated(Exception):
    """No key, or a key that is not in the file. `reason` is for the log, never the caller."""

    def __init__(self, reason: str, key_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id


def key_id(key: str | bytes) -> str:
    """How logs name a key: the first 8 hex digits of its SHA-256."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a call: a key's id and the models it may use (None: any model)."""

    key_id: str
    models: frozenset[str] | None = None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


# Nobody authenticated: authentication is off (no key file) or the call is exempt.
ANYONE = Caller(key_id="")

# The caller of the call being handled. Set per call by the interceptor or middleware,
# in the task that then runs the handler (tasks a handler starts copy it).
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("headrace_caller", default=ANYONE)


def current_caller() -> Caller:
    return _CALLER.get()


def set_caller(caller: Caller) -> contextvars.Token[Caller]:
    return _CALLER.set(caller)


@contextlib.contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    token = _CALLER.set(caller)
    try:
        yield
    finally:
        _CALLER.reset(token)


def forbidden_message(model: str) -> str:
    return f"this API key may not use model {model!r}"


def authorize_model(model: str) -> None:
    """Raise ModelForbidden unless the current caller may use `model` (the resolved name)."""
    caller = _CALLER.get()
    if not caller.may_use(model):
        log.warning("auth_denied", reason="model_not_in_scope", key_id=caller.key_id, model=model)
        raise ModelForbidden(forbidden_message(model))


def allowed_models(names: Iterable[str]) -> list[str]:
    """The names the current caller may see (ListModels, /v1/models, RepositoryIndex)."""
    caller = _CALLER.get()
    return [name for name in names if caller.may_use(name)]


@dataclass(frozen=True, slots=True)
class _Key:
    digest: bytes  # SHA-256 of the key
    caller: Caller


def parse_key_file(text: str, source: str = "the key file") -> tuple[_Key, ...]:
    """Keys of a key file's text; KeyFileError names the line (never the key) when it is bad."""
    keys: list[_Key] = []
    seen: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split(None, 1)
        scope = rest[0] if rest else ""
        if not key.isascii() or not key.isprintable():
            raise KeyFileError(f"{source} line {number}: a key must be printable ASCII")
        models: frozenset[str] | None = None
        if scope.strip():
            names = [name.strip() for name in scope.split(",")]
            if not all(names):
                raise KeyFileError(
                    f"{source} line {number}: models are comma separated names ('key m1,m2')"
                )
            models = frozenset(names)
        raw = key.encode()
        digest = hashlib.sha256(raw).digest()
        if digest in seen:
            raise KeyFileError(f"{source} line {number}: key {key_id(raw)} is listed twice")
        seen.add(digest)
        keys.append(_Key(digest, Caller(key_id=digest.hex()[:8], models=models)))
    if not keys:
        raise KeyFileError(f"{source} holds no key (one key per line, '#' for comments)")
    return tuple(keys)


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or its symlink swapped (Kubernetes secrets)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `authorization: Bearer <key>` value; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


class Authenticator:
    """The API keys of a key file and which call groups skip them."""

    def __init__(
        self, path: Path, exempt: Iterable[str] = DEFAULT_EXEMPT, check_every_s: float = 1.0
    ) -> None:
        self.path = Path(path)
        self.exempt = frozenset(exempt)
        unknown = self.exempt - set(EXEMPT_GROUPS)
        if unknown:
            raise ValueError(f"auth_exempt: unknown group(s) {', '.join(sorted(unknown))}")
        self.check_every_s = check_every_s
        self._lock = threading.Lock()  # the metrics endpoint checks keys from its own thread
        self._signature = _signature(self.path)
        self._keys = self._read()  # KeyFileError at start: the server does not start
        self._checked = time.monotonic()
        self._failed_signature: tuple[int, int, int, int] | None = None

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def is_exempt(self, group: str) -> bool:
        return group in self.exempt

    def _read(self) -> tuple[_Key, ...]:
        source = f"--api-key-file {self.path}"
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"{source}: cannot read it: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KeyFileError(f"{source}: not a UTF-8 text file") from None
        return parse_key_file(text, source)

    def reload_if_changed(self) -> None:
        """Re-read the file when it changed; a bad file keeps the keys in use (logged once)."""
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return
        with self._lock:
            self._checked = now
            signature = _signature(self.path)
            if signature == self._signature or signature == self._failed_signature:
                return
            try:
                keys = self._read()
            except KeyFileError as exc:
                self._failed_signature = signature
                log.warning("api_keys_reload_failed", reason=str(exc), keys_in_use=len(self._keys))
                return
            self._keys, self._signature, self._failed_signature = keys, signature, None
        log.info("api_keys_reloaded", keys=len(keys), key_ids=[k.caller.key_id for k in keys])

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of an `authorization` header value; raises Unauthenticated."""
        self.reload_if_changed()
        key = bearer_key(authorization)
        if key is None:
            raise Unauthenticated("no bearer key" if not authorization else "not a bearer key")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for entry in self._keys:  # every entry, no early exit: the time says nothing
            if hmac.compare_digest(entry.digest, digest):
                found = entry.caller
        if found is None:
            raise Unauthenticated("unknown key", key_id=digest.hex()[:8])
        return found
