"""bench/cli.py: options and presets (no scenario runs here)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from bench import cli
from bench.cli import Scenario, build_parser, config_from_args
from bench.config import ALL_SCENARIOS, QUICK_STREAMS, BenchConfig
from bench.records import (
    GATEWAY,
    GRPC,
    GRPC_LLAMA_CPP,
    GRPC_LLAMA_CPP_STREAMS,
    GRPC_TRANSFORMERS,
    LLAMA_CPP,
    SERVER_VARIANTS,
    TRANSFORMERS,
    LevelRun,
    RequestRecord,
)
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped


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


def test_skip_leaves_scenarios_and_open_loop_targets_out() -> None:
    config = parse("--skip", "llama.cpp,transformers")
    assert LLAMA_CPP not in config.scenarios and TRANSFORMERS not in config.scenarios
    assert GATEWAY in config.scenarios
    assert config.gateway_targets == (
        GRPC,
        GRPC_TRANSFORMERS,
        GRPC_LLAMA_CPP,
        GRPC_LLAMA_CPP_STREAMS,
    )


def test_open_loop_options() -> None:
    config = parse(
        "--gateway-rates", "2,0.5,2", "--slo-ttft-ms", "800", "--slo-tpot-ms", "50",
        "--gateway-targets", "llama.cpp", "--gateway-level-s", "5",
    )  # fmt: skip
    assert config.gateway_rates == (0.5, 2.0)
    assert (config.slo_ttft_s, config.slo_tpot_s) == (0.8, 0.05)
    assert config.gateway_targets == (LLAMA_CPP,)
    assert config.gateway_level_s == 5.0
    assert parse().gateway_targets == (
        GRPC,
        GRPC_TRANSFORMERS,
        GRPC_LLAMA_CPP,
        GRPC_LLAMA_CPP_STREAMS,
        LLAMA_CPP,
    )


def run_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path, scenario: Scenario
) -> int:
    monkeypatch.setattr(cli, "_scenario", lambda name: scenario)
    # Drawing is not under test here, and importing matplotlib alone takes seconds.
    plots = ("plot_throughput", "plot_ttft", "plot_slo_ttft", "plot_goodput", "plot_call_turns")
    for plot in plots:
        monkeypatch.setattr(cli, plot, lambda *args: False)
    return cli.main(
        [
            "--scenarios", LLAMA_CPP,
            "--model-dir", str(model_dir),
            "--results-dir", str(tmp_path / "results"),
            "--docs-dir", str(tmp_path / "docs"),
        ]
    )  # fmt: skip


def test_a_skipped_scenario_fails_the_run_loudly_after_writing_the_report(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    test_model_dir: Path,
) -> None:
    def not_built(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
        raise ScenarioSkipped("llama-server is not built")

    assert run_main(tmp_path, monkeypatch, test_model_dir, not_built) == 1
    err = capsys.readouterr().err
    assert "bench: INCOMPLETE: not every scenario asked for ran" in err
    assert "- llama.cpp: llama-server is not built" in err
    assert "--skip NAME" in err
    report = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "skipped: llama-server is not built" in report


def test_a_complete_run_succeeds_and_its_report_names_no_absolute_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    test_model_dir: Path,
) -> None:
    binary = tmp_path / "llama.cpp" / "build" / "bin" / "llama-server"

    def measured(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
        context.details[LLAMA_CPP] = {"binary": str(binary), "log": f"see {tmp_path}/x.log"}
        record = RequestRecord.streamed(0, 1.0, 2.0, [1.5, 2.0], tokens=2)
        collect(LevelRun(LLAMA_CPP, 1, (record,), (1.0, 2.0)))

    assert run_main(tmp_path, monkeypatch, test_model_dir, measured) == 0
    assert "INCOMPLETE" not in capsys.readouterr().err
    report = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "llama-server" in report
    assert str(tmp_path) not in report
    assert str(Path.cwd()) not in report
    assert str(test_model_dir) not in report


def test_every_server_variant_is_a_closed_loop_scenario_and_an_open_loop_target() -> None:
    for variant in SERVER_VARIANTS:
        assert variant.scenario in ALL_SCENARIOS
        assert variant.scenario in parse().gateway_targets
        runner = cli._scenario(variant.scenario)
        assert isinstance(runner, functools.partial)
        assert runner.keywords["variant"] == variant


def test_the_studies_are_scenarios_with_modest_quick_sizes_and_call_options() -> None:
    from bench.studies import STUDY_SCENARIOS

    assert set(STUDY_SCENARIOS) <= set(ALL_SCENARIOS)
    quick = parse("--quick")
    assert quick.call_levels == (1,) and quick.call_turns == 7 and quick.call_think_s == 0
    assert quick.structured_streams == (1, 4) and quick.lora_streams == 4
    full = parse("--call-levels", "8,1", "--call-turns", "12", "--call-think-s", "0.5")
    assert (full.call_levels, full.call_turns, full.call_think_s) == ((1, 8), 12, 0.5)
    assert parse().structured_streams == (1, 16) and parse().lora_streams == 16
    assert parse().call_backends == ("llama_cpp", "transformers")
    assert parse("--call-backends", "transformers").call_backends == ("transformers",)
    with pytest.raises(SystemExit):
        parse("--call-backends", "ct2")  # no prefix reuse to measure there


def test_a_run_of_a_study_alone_succeeds_and_reports_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    test_model_dir: Path,
) -> None:
    from bench.studies import LoraRun

    def studied(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
        context.studies.lora.append(LoraRun(16, 64, 100.0, 90.0))

    assert run_main(tmp_path, monkeypatch, test_model_dir, studied) == 0
    captured = capsys.readouterr()
    assert "INCOMPLETE" not in captured.err
    assert "LoRA (llama_cpp): 4 adapters in the mix vs the base" in captured.out
    report = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "| 16 | 64 | 100.0 | 90.0 | 0.90× | met |" in report
