"""bench/stats.py: the definitions behind every number of the table."""

from __future__ import annotations

import pytest

from bench.records import GRPC, LevelRun, ProcessUsage, RequestRecord
from bench.stats import percentile, steady_window, summarize, tokens_in_window


def test_percentile_interpolates_like_numpy() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 50) == pytest.approx(25.0)
    assert percentile(values, 95) == pytest.approx(38.5)
    assert percentile([7.0], 95) == 7.0


def test_percentile_ignores_input_order() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_tokens_in_window_counts_messages_inside() -> None:
    record = RequestRecord(
        client=0, start=0.0, end=5.0, tokens=4, message_times=(1.0, 2.0, 3.0, 4.0)
    )
    assert tokens_in_window(record, 0.0, 10.0) == 4
    assert tokens_in_window(record, 1.5, 3.5) == 2
    assert tokens_in_window(record, 4.5, 9.0) == 0


def test_tokens_in_window_spreads_server_count_over_messages() -> None:
    # 6 tokens reported, only 3 messages seen (e.g. bytes held back for UTF-8): 2 each.
    record = RequestRecord(client=0, start=0.0, end=4.0, tokens=6, message_times=(1.0, 2.0, 3.0))
    assert tokens_in_window(record, 0.0, 2.5) == pytest.approx(4.0)


def test_tokens_in_window_interpolates_when_only_the_end_is_seen() -> None:
    record = RequestRecord(client=0, start=0.0, end=10.0, tokens=100)
    assert tokens_in_window(record, 0.0, 10.0) == pytest.approx(100)
    assert tokens_in_window(record, 0.0, 2.5) == pytest.approx(25)
    assert tokens_in_window(record, 20.0, 30.0) == 0


def test_steady_window_ends_when_the_first_client_is_done() -> None:
    records = [
        RequestRecord(client=0, start=0.0, end=4.0, tokens=1),
        RequestRecord(client=0, start=4.0, end=9.0, tokens=1),
        RequestRecord(client=1, start=0.0, end=7.0, tokens=1),
    ]
    assert steady_window(records, started=0.0) == (0.0, 7.0)


def _record(client: int, start: float, ttft: float, end: float, tokens: int) -> RequestRecord:
    first = start + ttft
    step = (end - first) / max(1, tokens - 1)
    times = tuple(first + i * step for i in range(tokens))
    return RequestRecord(
        client=client,
        start=start,
        end=end,
        tokens=tokens,
        first_token=first,
        message_times=times,
        finish_reason="length",
    )


def test_summarize_reports_rates_latencies_and_costs() -> None:
    records = (
        _record(0, 0.0, 0.1, 1.1, 11),  # 10 tokens/s once flowing
        _record(1, 0.0, 0.3, 2.3, 11),  # 5 tokens/s
        RequestRecord(client=1, start=2.3, end=2.4, tokens=0, error="UNAVAILABLE: gone"),
    )
    run = LevelRun(
        GRPC,
        2,
        records,
        window=(0.0, 2.5),
        server=ProcessUsage(cpu_seconds=0.44, peak_rss_bytes=300 * 2**20),
        client=ProcessUsage(cpu_seconds=0.11, peak_rss_bytes=None),
    )
    summary = summarize(run)
    assert summary.requests == 2
    assert summary.errors == 1
    assert summary.first_error == "UNAVAILABLE: gone"
    assert summary.tokens == 22
    assert summary.aggregate_tps == pytest.approx(22 / 2.5)
    assert summary.ttft_p50_ms == pytest.approx(200.0)
    assert summary.ttft_p95_ms == pytest.approx(290.0)
    assert summary.stream_tps_p50 == pytest.approx(7.5)
    assert summary.tokens_per_request == pytest.approx(11)
    assert summary.cpu_s_per_1k_tokens == pytest.approx(20.0)
    assert summary.client_cpu_s_per_1k_tokens == pytest.approx(5.0)
    assert summary.peak_rss_mib == pytest.approx(300)
    assert summary.finish_reasons == {"length": 2}


def test_summarize_in_process_charges_the_benchmark_process() -> None:
    run = LevelRun(
        "ct2-stream",
        1,
        (_record(0, 0.0, 0.1, 1.1, 11),),
        window=(0.0, 1.1),
        client=ProcessUsage(cpu_seconds=0.22, peak_rss_bytes=None),
    )
    summary = summarize(run, in_process=True)
    assert summary.cpu_s_per_1k_tokens == pytest.approx(20.0)
    assert summary.client_cpu_s_per_1k_tokens is None


def test_summarize_a_level_where_everything_failed() -> None:
    run = LevelRun(
        GRPC,
        1,
        (RequestRecord(client=0, start=0.0, end=0.1, tokens=0, error="boom"),),
        window=(0.0, 0.1),
    )
    summary = summarize(run)
    assert summary.requests == 0
    assert summary.aggregate_tps is None
    assert summary.ttft_p50_ms is None
    assert summary.tokens_per_request is None
