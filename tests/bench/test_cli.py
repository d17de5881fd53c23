"""bench/cli.py: options and presets (no scenario runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import build_parser, config_from_args
from bench.config import ALL_SCENARIOS, QUICK_STREAMS, BenchConfig


def parse(*argv: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_default_is_the_full_run() -> None:
    config = parse()
    assert config.scenarios == ALL_SCENARIOS
    assert config.streams == (1, 4, 16, 32)
    assert config.max_new_tokens == 128
    assert not config.quick


def test_quick_is_tiny_and_options_override_it() -> None:
    config = parse("--quick", "--duration", "1.5", "--scenarios", "grpc,ct2-stream")
    assert config.quick
    assert config.streams == QUICK_STREAMS
    assert config.max_new_tokens == 16
    assert config.duration_s == 1.5
    assert config.scenarios == ("grpc", "ct2-stream")


def test_streams_are_sorted_and_deduplicated() -> None:
    assert parse("--streams", "16,1,16,4").streams == (1, 4, 16)


def test_paths_and_peer_build() -> None:
    config = parse("--build-peer", "--llama-server", "/opt/llama-server")
    assert config.build_peer
    assert config.llama_server == Path("/opt/llama-server")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenarios", "grpc,vllm"], "unknown scenario(s) vllm"),
        (["--streams", "0,4"], "positive integers"),
        (["--streams", "a"], "not a list of integers"),
    ],
)
def test_bad_options_are_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err
