"""bench/document.py: the markdown report and the results JSON of one run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench.config import BenchConfig
from bench.document import RunOutcome, render_markdown, results_json
from bench.paths import REPO_ROOT
from bench.records import CT2_STREAM, GRPC, LLAMA_CPP, LevelRun, RateRun, RequestRecord, Skipped
from bench.report import Summaries, evaluate_targets
from bench.slo import Slo, summarize_rate
from bench.stats import summarize


def outcome(config: BenchConfig) -> RunOutcome:
    request = RequestRecord(
        client=0,
        start=10.0,
        end=11.0,
        tokens=3,
        first_token=10.1,
        message_times=(10.1, 10.5, 11.0),
        finish_reason="length",
    )
    records = (request,)
    runs = [
        LevelRun(CT2_STREAM, 1, records, (10.0, 11.0)),
        LevelRun(GRPC, 1, records, (10.0, 11.0)),
    ]
    summaries = [summarize(run, in_process=run.scenario == CT2_STREAM) for run in runs]
    return RunOutcome(
        started="2026-01-01T00:00:00+00:00",
        finished="2026-01-01T00:05:00+00:00",
        command="python -m bench",
        config=config,
        machine={"cpu": "Test CPU", "logical_cpus": 2, "packages": {"ctranslate2": "4.8.5"}},
        details={GRPC: {"inter_threads": 2}},
        runs=runs,
        summaries=summaries,
        skipped=[Skipped(LLAMA_CPP, "llama-server is not built")],
        targets=evaluate_targets(Summaries(summaries)),
        load_average_at_end=(1.0, 2.0, 3.0),
    )


def test_markdown_has_targets_results_plots_and_setup() -> None:
    text = render_markdown(
        outcome(BenchConfig()), throughput_png="bench_throughput.png", ttft_png=None
    )
    assert text.startswith("# Benchmarks\n")
    assert (
        "| one stream through gRPC: tokens/s vs in-process | ≥ 0.95× "
        "| 1.000× (3.0 vs 3.0 tokens/s) | PASS |" in text
    )
    assert "| llama.cpp | – |" in text and "skipped: llama-server is not built" in text
    assert "![Throughput](bench_throughput.png)" in text
    assert "Time to first token](" not in text  # no plot, no broken image
    assert "Test CPU, 2 logical CPUs" in text
    assert "ctranslate2 4.8.5" in text
    assert "`grpc`: inter_threads: 2." in text
    assert "Smoke run" not in text


def test_markdown_of_a_quick_run_says_so() -> None:
    text = render_markdown(outcome(BenchConfig.quick_preset()), throughput_png=None, ttft_png=None)
    assert "Smoke run (`--quick`)" in text


def test_results_json_is_serializable_and_keeps_each_request() -> None:
    data = results_json(outcome(BenchConfig()))
    decoded = json.loads(json.dumps(data))
    grpc_level = next(level for level in decoded["levels"] if level["scenario"] == GRPC)
    assert grpc_level["requests_detail"] == [
        {
            "client": 0,
            "start_s": 0.0,
            "ttft_ms": 100.0,
            "duration_s": 1.0,
            "tokens": 3,
            "messages": 3,
            "finish_reason": "length",
            "error": None,
        }
    ]
    assert grpc_level["ratios"][0] == "1.00× in-process 1 stream"
    assert decoded["skipped"] == [{"scenario": LLAMA_CPP, "reason": "llama-server is not built"}]


def with_open_loop(config: BenchConfig) -> RunOutcome:
    slo = Slo(config.slo_ttft_s, config.slo_tpot_s)

    def level(target: str, rate: float, ttft: float) -> RateRun:
        records = tuple(
            RequestRecord.streamed(i, i, i + ttft + 1.0, [i + ttft, i + ttft + 1.0], tokens=21)
            for i in range(10)
        )
        return RateRun(target, rate, records, (0.0, 10.0))

    runs = [level(GRPC, 1.0, 0.2), level(GRPC, 2.0, 0.5), level(GRPC, 4.0, 3.0)]
    runs += [level(LLAMA_CPP, 1.0, 0.4), level(LLAMA_CPP, 2.0, 1.5)]
    runs.append(
        RateRun(LLAMA_CPP, 4.0, (RequestRecord(0, 0.0, 30.0, 0, error="cancelled"),), (0.0, 10.0))
    )
    return dataclasses.replace(
        outcome(config),
        rate_runs=runs,
        rate_summaries=[summarize_rate(run, slo) for run in runs],
    )


def test_markdown_has_the_open_loop_section_with_capacities_and_plots() -> None:
    text = render_markdown(
        with_open_loop(BenchConfig()),
        throughput_png=None,
        ttft_png=None,
        slo_pngs=("bench_slo_ttft.png", "bench_slo_goodput.png"),
    )
    assert "## Open loop shaped like the gateway: capacity at SLO" in text
    assert "SLO: TTFT ≤ 1,000 ms and TPOT ≤ 100 ms" in text
    assert "llm-local gRPC server (`grpc`): **2 req/s**" in text
    assert "llama.cpp server (peer) (`llama.cpp`): **1 req/s**" in text
    assert "`grpc` over `llama.cpp`: **2.00× (2 req/s vs 1 req/s)**" in text
    assert "| llama.cpp | 4 | 1 | 1 | ∞ | ∞ | ∞ |" in text  # the lost request
    assert "![Open loop](bench_slo_ttft.png)" in text
    assert "![Open loop](bench_slo_goodput.png)" in text
    assert "**Capacity at SLO**: the highest offered rate R" in text


def test_markdown_without_an_open_loop_says_so() -> None:
    text = render_markdown(outcome(BenchConfig()), throughput_png=None, ttft_png=None)
    assert "Not measured in this run (scenario `gateway`)." in text


def test_the_report_names_no_absolute_path_of_the_machine(tmp_path: Path) -> None:
    model = tmp_path / "cache" / "models" / "int8-1234"
    model.mkdir(parents=True)
    details = {
        "models": {"ct2": str(model), "gguf": str(REPO_ROOT / "bench" / "x.gguf")},
        "transformers": {"weights": f"{tmp_path}/smolhf"},
    }
    text = render_markdown(
        dataclasses.replace(
            outcome(BenchConfig()), details=details, command=f"python -m bench --hf-dir {model}"
        ),
        throughput_png=None,
        ttft_png=None,
    )
    assert str(tmp_path) not in text
    assert str(REPO_ROOT) not in text
    assert "ct2: …/models/int8-1234" in text
    assert "gguf: bench/x.gguf" in text
    assert "/v1/chat/completions" in text  # API paths are no paths of the machine


def test_results_json_keeps_the_open_loop_and_writes_infinity_as_null() -> None:
    decoded = json.loads(json.dumps(results_json(with_open_loop(BenchConfig()))))
    lost = decoded["open_loop"][-1]
    assert (lost["target"], lost["offered_rps"], lost["ttft_p95_ms"]) == (LLAMA_CPP, 4.0, None)
    assert lost["requests_detail"][0]["error"] == "cancelled"
    assert len(decoded["open_loop"]) == 6


def test_studies_get_their_tables_plot_and_json() -> None:
    from bench.studies import LoraRun, Studies, TurnSeries

    turns = tuple((0.1, 0.2) for _ in range(6))
    studies = Studies(
        call_turns=[TurnSeries("llama_cpp, prefix reuse", 2, turns, 10, 20, 2**20)],
        lora=[LoraRun(16, 64, 100.0, 90.0)],
    )
    done = dataclasses.replace(outcome(BenchConfig()), studies=studies)
    text = render_markdown(
        done, throughput_png=None, ttft_png=None, call_turns_png="bench_call_turns.png"
    )
    assert "### Calls: TTFT by turn (ms, p50 / p95 over calls)" in text
    assert "| 6 | 150 / 195 |" in text
    assert "![TTFT by turn](bench_call_turns.png)" in text
    assert "| 16 | 64 | 100.0 | 90.0 | 0.90× | met |" in text
    assert "Structured output" not in text  # not measured, no empty table
    saved = results_json(done)["studies"]
    assert isinstance(saved, dict)
    assert saved["lora"] == [{"streams": 16, "new_tokens": 64, "base_tps": 100.0, "mix_tps": 90.0}]
    assert saved["call_turns"][0]["reused_tokens"] == 10


def test_a_run_without_studies_says_they_were_not_measured() -> None:
    text = render_markdown(outcome(BenchConfig()), throughput_png=None, ttft_png=None)
    assert "Not measured in this run (scenarios `call-turns`, `structured`, `lora`)" in text
