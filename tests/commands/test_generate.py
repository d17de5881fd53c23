"""`llm-local generate` without a server to talk to."""

from __future__ import annotations

import argparse
import socket

import pytest

from llm_local.cli import main
from llm_local.commands.generate import _metadata, add_arguments


def test_no_server_listening_is_one_line_saying_what_to_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    assert main(["generate", "--port", str(port), "--timeout", "5", "Hi"]) == 1

    error = capsys.readouterr().err.strip()
    assert error.startswith(f"llm-local generate: cannot reach 127.0.0.1:{port}:")
    assert "llm-local serve" in error
    assert "\n" not in error


def test_the_ids_given_are_sent_as_the_gateways_metadata() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ids = ["--tenant-id", "acme", "--trace-id", "t-1", "--call-id", "call-9", "Hi"]

    assert _metadata(parser.parse_args(ids)) == {
        "x-tenant-id": "acme",
        "x-trace-id": "t-1",
        "x-call-id": "call-9",
    }
    assert _metadata(parser.parse_args(["Hi"])) == {}
