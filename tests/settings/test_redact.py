"""Secrets never leave the process in /config or `llm-local settings`."""

from __future__ import annotations

from llm_local.settings.redact import REDACTED, redact

PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"


def test_secret_looking_keys_are_hidden_at_any_depth() -> None:
    raw = {
        "hf_token": "hf_abc",
        "model": {"name": "org/model", "api_key": "k-123", "nested": {"db_password": "pw"}},
        "service": {"client_secret": "s", "passwd": "p", "credentials": {"user": "u"}},
        "private_key": "x",
    }
    shown = redact(raw)
    assert shown == {
        "hf_token": REDACTED,
        "model": {"name": "org/model", "api_key": REDACTED, "nested": {"db_password": REDACTED}},
        "service": {"client_secret": REDACTED, "passwd": REDACTED, "credentials": REDACTED},
        "private_key": REDACTED,
    }


def test_pem_key_material_is_hidden_whatever_its_key() -> None:
    shown = redact({"tls": {"inline": PEM, "cert_path": "/etc/tls/server.pem"}})
    assert shown == {"tls": {"inline": REDACTED, "cert_path": "/etc/tls/server.pem"}}


def test_paths_to_key_files_stay_visible() -> None:
    raw = {"tls": {"key_path": "/etc/tls/server.key", "ca_path": None}}
    assert redact(raw) == raw


def test_unset_secrets_show_as_unset_and_the_input_is_not_changed() -> None:
    raw: dict[str, object] = {"token": None, "password": "", "auth": {"token": "t"}}
    assert redact(raw) == {"token": None, "password": "", "auth": {"token": REDACTED}}
    assert raw["auth"] == {"token": "t"}


def test_keys_that_merely_contain_a_secret_word_stay_visible() -> None:
    raw = {"generation": {"max_new_tokens": 256, "max_new_tokens_limit": 2048}, "hf_token": "t"}
    shown = redact(raw)
    assert shown["generation"] == {"max_new_tokens": 256, "max_new_tokens_limit": 2048}
    assert shown["hf_token"] == "***"


def test_api_key_lists_are_hidden_whole_and_an_empty_one_shows_as_empty() -> None:
    shown = redact({"openai": {"api_keys": ("k1", "k2"), "max_messages": 4}, "x": {"api_keys": ()}})
    assert shown == {"openai": {"api_keys": REDACTED, "max_messages": 4}, "x": {"api_keys": []}}
