"""Secrets: config validation, host-side sources, substitution rules, and no leaks anywhere."""

from __future__ import annotations

import base64
import builtins
import logging
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stockade._errors import ConfigError
from stockade.egress.secrets import PLACEHOLDER_RE, SecretSet, SecretValue, placeholder
from stockade.policy.secret_config import SecretConfig, host_matches, secret_host_problem

OPENAI = "sk-real-openai-value-0123456789"
GITHUB = "ghp_realGithubToken987654321"
ENV = {"OPENAI_KEY": OPENAI, "GH_TOKEN": GITHUB}


def configs(**extra: SecretConfig) -> dict[str, SecretConfig]:
    base = {
        "OPENAI_API_KEY": SecretConfig(env="OPENAI_KEY", hosts=("api.openai.com",)),
        "GITHUB_TOKEN": SecretConfig(env="GH_TOKEN", hosts=("*.github.com", "github.com")),
    }
    base.update(extra)
    return base


@pytest.fixture
def secret_set(tmp_path: Path) -> SecretSet:
    return SecretSet.load(configs(), ENV, tmp_path, sandbox_id="sb1")


def ph(secret_set: SecretSet, name: str) -> bytes:
    return secret_set.sandbox_env()[name].encode()


# --- config -----------------------------------------------------------------------------


def test_config_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        SecretConfig(hosts=("a.example.com",))
    with pytest.raises(ValidationError, match="got env, file"):
        SecretConfig(env="X", file="~/x", hosts=("a.example.com",))
    with pytest.raises(ValidationError, match="extra"):
        SecretConfig.model_validate({"env": "X", "hosts": ["a.example.com"], "value": "oops"})


def test_config_needs_hosts() -> None:
    with pytest.raises(ValidationError):
        SecretConfig.model_validate({"env": "X"})
    with pytest.raises(ValidationError):
        SecretConfig(env="X", hosts=())


@pytest.mark.parametrize(
    "pattern", ["*", "*.com", "*.", "a*.example.com", "*.*.example.com", "api.example.com:443"]
)
def test_too_broad_or_malformed_hosts_are_refused(pattern: str) -> None:
    assert secret_host_problem(pattern)
    with pytest.raises(ValidationError):
        SecretConfig(env="X", hosts=(pattern,))


@pytest.mark.parametrize("pattern", ["api.example.com", "*.example.com", "127.0.0.1", "::1"])
def test_good_hosts(pattern: str) -> None:
    assert secret_host_problem(pattern) is None


def test_config_field_checks() -> None:
    with pytest.raises(ValidationError, match="absolute"):
        SecretConfig(file="relative/path", hosts=("a.example.com",))
    with pytest.raises(ValidationError, match="service:username"):
        SecretConfig(keyring="nocolon", hosts=("a.example.com",))
    with pytest.raises(ValidationError, match="environment variable"):
        SecretConfig(env="NOT-A-VAR", hosts=("a.example.com",))


def test_every_field_has_a_description() -> None:
    for name, info in SecretConfig.model_fields.items():
        assert info.description, name


def test_secret_names(tmp_path: Path) -> None:
    for bad in ["lower", "1ABC", "A-B", "A" * 64, "PATH", "SSL_CERT_FILE"]:
        with pytest.raises(ConfigError, match=f"secrets.{bad}"):
            SecretSet.load({bad: SecretConfig(env="OPENAI_KEY", hosts=("a.b.c",))}, ENV, tmp_path)


def test_host_matches() -> None:
    assert host_matches("API.github.com.", ["*.github.com"])
    assert host_matches("a.b.github.com", ["*.github.com"])
    assert not host_matches("github.com", ["*.github.com"])
    assert not host_matches("evilgithub.com", ["*.github.com"])
    assert not host_matches("github.com.evil.com", ["github.com"])
    assert host_matches("[::1]", ["::1"])


# --- placeholders -----------------------------------------------------------------------


def test_placeholders_are_unguessable_and_per_sandbox(tmp_path: Path) -> None:
    one = SecretSet.load(configs(), ENV, tmp_path, sandbox_id="sb1").sandbox_env()
    two = SecretSet.load(configs(), ENV, tmp_path, sandbox_id="sb2").sandbox_env()
    assert set(one) == {"OPENAI_API_KEY", "GITHUB_TOKEN"}
    for name, value in one.items():
        match = PLACEHOLDER_RE.match(value)
        assert match and match.group(1) == name
        assert value != two[name]
        assert OPENAI not in value and GITHUB not in value


def test_keyed_placeholders_are_stable_per_sandbox() -> None:
    key = b"k" * 32
    assert placeholder("A", "sb1", key=key) == placeholder("A", "sb1", key=key)
    assert placeholder("A", "sb1", key=key) != placeholder("A", "sb2", key=key)
    assert placeholder("A", "sb1", key=key) != placeholder("A", "sb1", key=b"x" * 32)
    with pytest.raises(ValueError):
        placeholder("bad name", "sb1")


# --- sources ----------------------------------------------------------------------------


def test_file_source(tmp_path: Path) -> None:
    (tmp_path / ".secrets").mkdir()
    (tmp_path / ".secrets" / "token").write_text("file-value-123\n")
    config = {"TOKEN": SecretConfig(file="~/.secrets/token", hosts=("api.example.com",))}
    secret_set = SecretSet.load(config, {}, tmp_path)
    block, names = secret_set.substitute_headers(
        "api.example.com", b"GET / HTTP/1.1\r\nX-Key: " + ph(secret_set, "TOKEN") + b"\r\n\r\n"
    )
    assert names == ["TOKEN"]
    assert b"X-Key: file-value-123\r\n" in block


def test_missing_env_names_secret_and_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SecretSet.load(configs(), {"GH_TOKEN": GITHUB}, tmp_path)
    message = str(info.value)
    assert "secrets.OPENAI_API_KEY" in message and "OPENAI_KEY is not set" in message
    assert GITHUB not in message


def test_missing_file(tmp_path: Path) -> None:
    config = {"TOKEN": SecretConfig(file="~/nope/token", hosts=("api.example.com",))}
    with pytest.raises(ConfigError, match=r"secrets.TOKEN \(file:~/nope/token\).*does not exist"):
        SecretSet.load(config, {}, tmp_path)


def test_empty_and_multiline_values_refused(tmp_path: Path) -> None:
    config = {"TOKEN": SecretConfig(env="V", hosts=("api.example.com",))}
    with pytest.raises(ConfigError, match="empty"):
        SecretSet.load(config, {"V": ""}, tmp_path)
    with pytest.raises(ConfigError) as info:
        SecretSet.load(config, {"V": "abc\r\nX-Injected: 1"}, tmp_path)
    assert "control characters" in str(info.value)
    assert "Injected" not in str(info.value)


def test_keyring_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_keyring(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "keyring":
            raise ImportError("No module named 'keyring'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "keyring", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_keyring)
    config = {"TOKEN": SecretConfig(keyring="svc:me", hosts=("api.example.com",))}
    with pytest.raises(ConfigError, match="pip install keyring"):
        SecretSet.load(config, {}, tmp_path)


def test_keyring_source_with_a_fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = {("svc:with:colons", "me"): "keyring-value-42"}
    fake = types.ModuleType("keyring")
    fake.get_password = lambda service, user: store.get((service, user))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "keyring", fake)
    config = {"TOKEN": SecretConfig(keyring="svc:with:colons:me", hosts=("api.example.com",))}
    secret_set = SecretSet.load(config, {}, tmp_path)
    block, _ = secret_set.substitute_headers("api.example.com", ph(secret_set, "TOKEN"))
    assert block == b"keyring-value-42"
    missing = {"TOKEN": SecretConfig(keyring="svc:other", hosts=("api.example.com",))}
    with pytest.raises(ConfigError, match="keyring set svc other"):
        SecretSet.load(missing, {}, tmp_path)


# --- substitution -----------------------------------------------------------------------


def test_bearer_substituted_for_allowed_host(secret_set: SecretSet) -> None:
    block = (
        b"POST /v1/chat HTTP/1.1\r\nHost: api.openai.com\r\n"
        b"Authorization: Bearer " + ph(secret_set, "OPENAI_API_KEY") + b"\r\n\r\n"
    )
    out, names = secret_set.substitute_headers("api.openai.com", block)
    assert names == ["OPENAI_API_KEY"]
    assert b"Authorization: Bearer " + OPENAI.encode() + b"\r\n" in out
    assert out.endswith(b"\r\n\r\n") and out.startswith(b"POST /v1/chat HTTP/1.1\r\n")


def test_wrong_host_keeps_placeholder(secret_set: SecretSet) -> None:
    block = (
        b"GET / HTTP/1.1\r\nAuthorization: Bearer " + ph(secret_set, "OPENAI_API_KEY") + b"\r\n\r\n"
    )
    for host in ["evil.example.com", "api.openai.com.evil.com", "openai.com"]:
        out, names = secret_set.substitute_headers(host, block)
        assert out == block and names == []


def test_only_secrets_allowed_for_the_host_are_substituted(secret_set: SecretSet) -> None:
    openai, github = ph(secret_set, "OPENAI_API_KEY"), ph(secret_set, "GITHUB_TOKEN")
    block = (
        b"GET /?a=" + github + b" HTTP/1.1\r\nX-A: " + openai + b"\r\nX-B: " + github + b"\r\n\r\n"
    )
    out, names = secret_set.substitute_headers("api.github.com", block)
    assert names == ["GITHUB_TOKEN"]
    assert out.count(GITHUB.encode()) == 2  # request line and header
    assert openai in out and OPENAI.encode() not in out


def test_multiple_secrets_for_one_host(tmp_path: Path) -> None:
    config = {
        "A": SecretConfig(env="OPENAI_KEY", hosts=("api.example.com",)),
        "B": SecretConfig(env="GH_TOKEN", hosts=("*.example.com",)),
    }
    secret_set = SecretSet.load(config, ENV, tmp_path)
    block = b"GET / HTTP/1.1\r\nX-A: " + ph(secret_set, "A") + b"\r\nX-B: " + ph(secret_set, "B")
    out, names = secret_set.substitute_headers("api.example.com", block + b"\r\n\r\n")
    assert names == ["A", "B"]
    assert OPENAI.encode() in out and GITHUB.encode() in out


def test_basic_auth_credentials_are_decoded_and_re_encoded(secret_set: SecretSet) -> None:
    credentials = b"x-access-token:" + ph(secret_set, "GITHUB_TOKEN")
    block = (
        b"GET /repo.git/info/refs HTTP/1.1\r\nHost: github.com\r\n"
        b"authorization: basic " + base64.b64encode(credentials) + b"\r\n\r\n"
    )
    out, names = secret_set.substitute_headers("github.com", block)
    assert names == ["GITHUB_TOKEN"]
    line = next(line for line in out.split(b"\r\n") if line.startswith(b"authorization"))
    decoded = base64.b64decode(line.split()[-1])
    assert decoded == b"x-access-token:" + GITHUB.encode()
    # Not allowed there: the encoded placeholder is left alone.
    assert secret_set.substitute_headers("evil.example.com", block) == (block, [])


def test_block_without_placeholders_is_returned_unchanged(secret_set: SecretSet) -> None:
    # Bodies never reach substitute_headers (the interceptor streams them past it; the
    # integration test checks a body holding a placeholder arrives untouched).
    head = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
    out, names = secret_set.substitute_headers("api.openai.com", head)
    assert out == head and names == []


# --- never leak -------------------------------------------------------------------------


def test_repr_and_str_hide_values(secret_set: SecretSet) -> None:
    texts = [repr(secret_set), str(secret_set), repr(secret_set._secrets), f"{secret_set}"]
    value = SecretValue(OPENAI)
    texts += [repr(value), str(value), f"{value}", f"{value!r}", f"{value:>40}"]
    for text in texts:
        assert OPENAI not in text and GITHUB not in text
    with pytest.raises(TypeError):
        pickle.dumps(value)


def test_failures_never_quote_values(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\xff\xfe" + OPENAI.encode())
    config = {"T": SecretConfig(file=str(tmp_path / "bad"), hosts=("api.example.com",))}
    with pytest.raises(ConfigError) as info:
        SecretSet.load(config, {}, tmp_path)
    assert OPENAI not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_logging_never_contains_values(
    secret_set: SecretSet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    block = b"GET / HTTP/1.1\r\nAuthorization: Bearer " + ph(secret_set, "OPENAI_API_KEY")
    secret_set.substitute_headers("api.openai.com", block + b"\r\n\r\n")
    with pytest.raises(ConfigError):
        SecretSet.load(configs(), {"OPENAI_KEY": OPENAI}, Path("/nonexistent"))
    assert OPENAI not in caplog.text and GITHUB not in caplog.text


def test_redact(secret_set: SecretSet) -> None:
    assert secret_set.redact(f"token={OPENAI}") == "token=<secret OPENAI_API_KEY>"


def test_interception_hosts(secret_set: SecretSet) -> None:
    assert secret_set.hosts_needing_interception() == {
        "api.openai.com",
        "*.github.com",
        "github.com",
    }
    assert secret_set.needs_interception("api.github.com")
    assert not secret_set.needs_interception("pypi.org")
    assert len(secret_set) == 2 and secret_set.names == ["GITHUB_TOKEN", "OPENAI_API_KEY"]
