"""The PNG plots of docs/BENCHMARKS.md: throughput and TTFT against concurrency (closed
loop), TTFT p95 and goodput against offered rate (open loop)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.records import (
    CT2_BATCH,
    CT2_STREAM,
    GRPC,
    LLAMA_CPP,
    SCENARIO_LABELS,
    SCENARIO_ORDER,
    TRANSFORMERS,
)
from bench.report import TTFT_TARGET_FACTOR, TTFT_TARGET_STREAMS, Summaries
from bench.slo import RateSummary, Slo
from bench.studies import TURN_GROWTH_GOAL, TurnSeries, turn_plot_series

LINE_SCENARIOS = (GRPC, LLAMA_CPP, CT2_BATCH)
FLAT_SCENARIOS = (CT2_STREAM, TRANSFORMERS)  # one-stream baselines, drawn as levels
TTFT_SCENARIOS = (GRPC, LLAMA_CPP)
COLORS = {
    GRPC: "tab:blue",
    LLAMA_CPP: "tab:orange",
    CT2_BATCH: "tab:green",
    CT2_STREAM: "tab:gray",
    TRANSFORMERS: "tab:purple",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(table: Summaries, streams: tuple[int, ...], path: Path) -> bool:
    """Aggregate tokens/s per concurrency; False when there is nothing to draw."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    drew = False
    for scenario in LINE_SCENARIOS:
        points = [(n, table.rate(scenario, n)) for n in streams]
        present = [(n, rate) for n, rate in points if rate is not None]
        if present:
            xs, ys = zip(*present, strict=True)
            axes.plot(xs, ys, marker="o", color=COLORS[scenario], label=SCENARIO_LABELS[scenario])
            drew = True
    for scenario in FLAT_SCENARIOS:
        rate = table.rate(scenario, 1)
        if rate is not None:
            axes.axhline(
                rate,
                linestyle="--",
                linewidth=1,
                color=COLORS[scenario],
                label=f"{SCENARIO_LABELS[scenario]}, 1 stream",
            )
            drew = True
    if not drew:
        plt.close(figure)
        return False
    _save(plt, figure, axes, streams, "aggregate tokens/s", "Throughput", path)
    return True


def plot_ttft(table: Summaries, streams: tuple[int, ...], path: Path) -> bool:
    """TTFT p50 (solid) and p95 (dashed) per concurrency, with the target line."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    drew = False
    for scenario in TTFT_SCENARIOS:
        for attribute, style, suffix in (("ttft_p50_ms", "-", "p50"), ("ttft_p95_ms", "--", "p95")):
            present = []
            for n in streams:
                summary = table.get(scenario, n)
                value = getattr(summary, attribute) if summary is not None else None
                if value is not None:
                    present.append((n, value))
            if present:
                xs, ys = zip(*present, strict=True)
                label = f"{SCENARIO_LABELS[scenario]} {suffix}"
                axes.plot(xs, ys, marker="o", linestyle=style, color=COLORS[scenario], label=label)
                drew = True
    if not drew:
        plt.close(figure)
        return False
    single = table.get(GRPC, 1)
    if single is not None and single.ttft_p95_ms is not None:
        target = (
            f"target: gRPC p95 ≤ {TTFT_TARGET_FACTOR:g}× its 1-stream p95 "
            f"at {TTFT_TARGET_STREAMS} streams"
        )
        limit = TTFT_TARGET_FACTOR * single.ttft_p95_ms
        axes.axhline(limit, color="red", linewidth=1, linestyle=":", label=target)
    _save(plt, figure, axes, streams, "time to first token, ms", "Time to first token", path)
    return True


def plot_slo_ttft(summaries: Sequence[RateSummary], slo: Slo, path: Path) -> bool:
    """Open loop: TTFT p95 per offered rate and target, with the SLO's limit. A p95 that
    fell on requests that never answered (∞) is drawn at the top edge, hollow."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.set_xscale("log", base=2)
    drew = marked_lost = False
    limit_ms = slo.ttft_s * 1000
    finite = [s.ttft_p95_ms for s in summaries if not math.isinf(s.ttft_p95_ms)]
    ceiling = max([limit_ms * 2, *finite]) * 1.1
    for index, target in enumerate(_targets(summaries)):
        levels = sorted((s for s in summaries if s.target == target), key=_by_rate)
        xs = [s.offered_rps for s in levels]
        ys = [min(s.ttft_p95_ms, ceiling) for s in levels]
        color = _color(target, index)
        axes.plot(xs, ys, marker="o", color=color, label=SCENARIO_LABELS.get(target, target))
        lost = [(s.offered_rps, ceiling) for s in levels if math.isinf(s.ttft_p95_ms)]
        if lost:
            label = None if marked_lost else "p95 = ∞ (requests never answered), at the top"
            axes.scatter(
                *zip(*lost, strict=True), facecolors="none", edgecolors=color, s=80, label=label
            )
            marked_lost = True
        drew = True
    if not drew:
        plt.close(figure)
        return False
    axes.axhline(limit_ms, color="red", linewidth=1, linestyle=":", label=f"SLO: {slo.describe()}")
    axes.set_ylim(0, ceiling * 1.02)
    labels = ("time to first token p95, ms", "TTFT p95 (open loop)")
    _save_rates(plt, figure, axes, summaries, labels, path)
    return True


def plot_goodput(summaries: Sequence[RateSummary], path: Path) -> bool:
    """Open loop: requests per second that met the SLO, against the offered rate."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.set_xscale("log", base=2)
    drew = False
    for index, target in enumerate(_targets(summaries)):
        levels = sorted((s for s in summaries if s.target == target), key=_by_rate)
        xs = [s.offered_rps for s in levels]
        ys = [s.goodput_rps for s in levels]
        label = SCENARIO_LABELS.get(target, target)
        axes.plot(xs, ys, marker="o", color=_color(target, index), label=label)
        drew = True
    if not drew:
        plt.close(figure)
        return False
    rates = sorted({s.offered_rps for s in summaries})
    axes.plot(rates, rates, color="gray", linewidth=1, linestyle=":", label="offered rate")
    axes.set_ylim(bottom=0)
    labels = ("goodput, req/s meeting the SLO", "Goodput (open loop)")
    _save_rates(plt, figure, axes, summaries, labels, path)
    return True


def plot_call_turns(series: Sequence[TurnSeries], path: Path) -> bool:
    """Calls: TTFT p50 against the turn number, one line per variant and call count."""
    lines = turn_plot_series(series)
    if not lines:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, (label, turns, ttft_ms) in enumerate(lines):
        axes.plot(turns, ttft_ms, marker="o", color=f"C{index}", label=label)
    longest = max(max(turns) for _, turns, _ in lines)
    axes.set_xticks(range(1, longest + 1))
    axes.set_xlabel("turn of the call (the whole history resent every turn)")
    axes.set_ylabel("time to first token p50, ms")
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"TTFT by turn, SmolLM2-135M (goal: last 3 turns ≤ {TURN_GROWTH_GOAL:g}× turns 1-3)"
    )
    _finish(plt, figure, axes, path)
    return True


def _targets(summaries: Sequence[RateSummary]) -> list[str]:
    rank = {name: index for index, name in enumerate(SCENARIO_ORDER)}
    return sorted({s.target for s in summaries}, key=lambda name: rank.get(name, 99))


def _by_rate(summary: RateSummary) -> float:
    return summary.offered_rps


def _color(target: str, index: int) -> str:
    return COLORS.get(target, f"C{index + 4}")


def _save_rates(
    plt: Any,
    figure: Any,
    axes: Any,
    summaries: Sequence[RateSummary],
    labels: tuple[str, str],
    path: Path,
) -> None:
    """The layout both open-loop plots share: log-2 rate axis labelled at the rates
    measured, legend; saved. `labels`: the y axis's and the title's."""
    ylabel, title = labels
    rates = sorted({s.offered_rps for s in summaries})
    axes.set_xticks(rates, [f"{rate:.3g}" for rate in rates])
    axes.set_xlabel("offered rate, requests/s (Poisson arrivals)")
    axes.set_ylabel(ylabel)
    axes.set_title(f"{title}, SmolLM2-135M, gateway-shaped requests")
    _finish(plt, figure, axes, path)


def _save(
    plt: Any,
    figure: Any,
    axes: Any,
    streams: tuple[int, ...],
    ylabel: str,
    title: str,
    path: Path,
) -> None:
    """The layout both plots share: log-2 concurrency axis, zero-based y, legend; saved."""
    axes.set_xscale("log", base=2)
    axes.set_xticks(list(streams), [str(n) for n in streams])
    axes.set_xlabel("concurrent streams (closed loop)")
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.set_title(f"{title}, SmolLM2-135M, greedy")
    _finish(plt, figure, axes, path)


def _finish(plt: Any, figure: Any, axes: Any, path: Path) -> None:
    """Grid, legend, tight layout; saved and closed."""
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
