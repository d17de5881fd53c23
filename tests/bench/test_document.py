"""bench/document.py: the markdown report and the results JSON of one run."""

from __future__ import annotations

import json

from bench.config import BenchConfig
from bench.document import RunOutcome, render_markdown, results_json
from bench.records import CT2_STREAM, GRPC, LLAMA_CPP, LevelRun, RequestRecord, Skipped
from bench.report import Summaries, evaluate_targets
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
