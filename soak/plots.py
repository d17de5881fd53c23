"""The soak's plot over time: RSS, in-flight generations, queues, tokens/s."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from bench.plots import _pyplot
from soak.report import MIB
from soak.sampler import Sample


def plot_over_time(samples: Sequence[Sample], warmup_s: float, path: Path) -> bool:
    """Four panels sharing the time axis; False when there is nothing to draw."""
    if len(samples) < 2:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    minutes = [s.at_s / 60 for s in samples]
    axes[0].plot(minutes, [s.rss_bytes / MIB for s in samples], color="tab:purple")
    axes[0].set_ylabel("RSS, MiB")
    axes[1].plot(minutes, [s.requests_running for s in samples], label="holding a slot")
    axes[1].plot(minutes, [s.backend_running for s in samples], label="decoding in the backend")
    axes[1].set_ylabel("in flight")
    axes[2].plot(minutes, [s.requests_queued for s in samples], label="waiting for a slot")
    axes[2].plot(minutes, [s.backend_queued for s in samples], label="waiting for a batch")
    axes[2].set_ylabel("queued")
    rates = [
        (later.tokens_sent - earlier.tokens_sent) / (later.at_s - earlier.at_s)
        for earlier, later in itertools.pairwise(samples)
    ]
    axes[3].plot(minutes[1:], rates, color="tab:green")
    axes[3].set_ylabel("tokens/s sent")
    axes[3].set_xlabel("minutes since the load started")
    for panel in axes:
        panel.axvline(warmup_s / 60, color="gray", linestyle=":", linewidth=1)
        panel.set_ylim(bottom=0)
        panel.grid(True, alpha=0.3)
    axes[1].legend(fontsize="small")
    axes[2].legend(fontsize="small")
    axes[0].set_title("llm-local under the soak (dotted: end of warm-up)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
