"""API keys without a server: the key file, bearer values, scopes, reloads, the settings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from headrace.server import auth
from headrace.server.auth import (
    Authenticator,
    Caller,
    KeyFileError,
    Unauthenticated,
    acting_as,
    allowed_models,
    authorize_model,
    bearer_key,
    key_id,
    parse_key_file,
)
from headrace.server.config import ConfigError, load_config
from headrace.server.errors import ModelForbidden, status_for

KEY_A = "hr_alpha_0123456789abcdef"
KEY_B = "hr_beta_fedcba9876543210"


def test_key_file_lines_comments_and_scopes() -> None:
    keys = parse_key_file(
        f"# every model\n{KEY_A}\n\n   \n\t# the shop\n{KEY_B}\tsentiment, tweetgpt\n"
    )
    assert [k.caller.models for k in keys] == [None, frozenset({"sentiment", "tweetgpt"})]
    assert [k.caller.key_id for k in keys] == [key_id(KEY_A), key_id(KEY_B)]
    assert keys[0].digest == hashlib.sha256(KEY_A.encode()).digest()
    assert key_id(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:8]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "holds no key"),
        ("# only a comment\n\n", "holds no key"),
        (f"{KEY_A}\n{KEY_A} sentiment\n", "line 2: key .* is listed twice"),
        (f"{KEY_A}\n{KEY_B} sentiment,,tweetgpt\n", "line 2: models are comma separated"),
        (f"{KEY_A}\nclé-secrète\n", "line 2: a key must be printable ASCII"),
    ],
)
def test_a_bad_key_file_names_the_line_never_the_key(text: str, needle: str) -> None:
    with pytest.raises(KeyFileError, match=needle) as info:
        parse_key_file(text, "keys.txt")
    for key in (KEY_A, KEY_B, "clé-secrète"):
        assert key not in str(info.value)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (f"Bearer {KEY_A}", KEY_A),
        (f"bearer   {KEY_A} ", KEY_A),
        (KEY_A, None),  # no scheme
        (f"Basic {KEY_A}", None),
        ("Bearer ", None),
        (None, None),
        ("", None),
    ],
)
def test_bearer_values(value: str | None, key: str | None) -> None:
    assert bearer_key(value) == key


def test_authenticate_finds_the_caller_or_refuses(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A}\n{KEY_B} sentiment\n")
    keys = Authenticator(path)
    assert keys.authenticate(f"Bearer {KEY_A}") == Caller(key_id(KEY_A), None)
    assert keys.authenticate(f"Bearer {KEY_B}").models == frozenset({"sentiment"})
    for value, reason in [(None, "no bearer key"), (KEY_A, "not a bearer key")]:
        with pytest.raises(Unauthenticated) as info:
            keys.authenticate(value)
        assert info.value.reason == reason
    with pytest.raises(Unauthenticated) as info:
        keys.authenticate(f"Bearer {KEY_A}x")  # a prefix of a key is no key
    assert info.value.key_id == key_id(KEY_A + "x")
    with pytest.raises(Unauthenticated):
        keys.authenticate(f"Bearer {KEY_A[:-1]}")
    assert keys.is_exempt("health") and not keys.is_exempt("metrics")


def test_the_key_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A}\n")
    keys = Authenticator(path, check_every_s=0.0)
    keys.authenticate(f"Bearer {KEY_A}")
    path.write_text(f"{KEY_B}\n")
    with pytest.raises(Unauthenticated):
        keys.authenticate(f"Bearer {KEY_A}")
    assert keys.authenticate(f"Bearer {KEY_B}")
    path.write_text(f"{KEY_B}\n{KEY_B}\n")  # bad: the keys in use stay
    assert keys.authenticate(f"Bearer {KEY_B}")
    path.unlink()  # gone: the keys in use stay too
    assert keys.authenticate(f"Bearer {KEY_B}")


def test_reloads_wait_for_the_check_period(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A}\n")
    keys = Authenticator(path, check_every_s=3600.0)
    path.write_text(f"{KEY_B}\n")
    assert keys.authenticate(f"Bearer {KEY_A}")  # not looked at yet


def test_a_missing_key_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"--api-key-file .*cannot read"):
        Authenticator(tmp_path / "nope")
    assert issubclass(KeyFileError, ConfigError)


def test_scopes_apply_to_the_caller_in_context() -> None:
    authorize_model("anything")  # nobody authenticated: authentication is off
    assert allowed_models(["a", "b"]) == ["a", "b"]
    with acting_as(Caller("12345678", frozenset({"a"}))):
        authorize_model("a")
        with pytest.raises(ModelForbidden) as info:
            authorize_model("b")
        assert allowed_models(["a", "b"]) == ["a"]
    assert auth.current_caller() is auth.ANYONE
    mapped = status_for(info.value)
    assert mapped.code.name == "PERMISSION_DENIED" and "'b'" in mapped.message


def test_security_settings_from_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'tls_cert = "tls/tls.crt"\ntls_key = "tls/tls.key"\ntls_client_ca = "tls/ca.crt"\n'
        'api_key_file = "keys"\nauth_exempt = ["health", "metrics"]\nmetrics_tls = true\n'
    )
    config = load_config(path)
    assert config.tls_cert == tmp_path / "tls/tls.crt" and config.api_key_file == tmp_path / "keys"
    assert config.auth_exempt == ("health", "metrics") and config.metrics_tls is True
    assert load_config(path, {"auth_exempt": "reflection,health"}).auth_exempt == (
        "reflection",
        "health",
    )
    assert load_config(path, {"auth_exempt": "none"}).auth_exempt == ()
    assert load_config().auth_exempt == ("health",)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"tls_cert": "c.pem"}, "go together"),
        ({"tls_key": "k.pem"}, "go together"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca .*needs tls_cert"),
        ({"metrics_tls": True}, "metrics_tls .*needs tls_cert"),
        ({"auth_exempt": "health,models"}, "auth_exempt takes .* not models"),
        ({"metrics_tls": "yes"}, "metrics_tls must be true or false"),
    ],
)
def test_bad_security_settings_name_the_setting(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)
