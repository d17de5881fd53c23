"""The two PNG plots of docs/BENCHMARKS.md: throughput and TTFT against concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.records import CT2_BATCH, CT2_STREAM, GRPC, LLAMA_CPP, SCENARIO_LABELS, TRANSFORMERS
from bench.report import TTFT_TARGET_MS, TTFT_TARGET_STREAMS, Summaries

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
    target = f"target: p95 ≤ {TTFT_TARGET_MS:.0f} ms at {TTFT_TARGET_STREAMS} streams"
    axes.axhline(TTFT_TARGET_MS, color="red", linewidth=1, linestyle=":", label=target)
    _save(plt, figure, axes, streams, "time to first token, ms", "Time to first token", path)
    return True


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
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
