"""The server seen from outside over time: RSS from /proc, gauges and counters from /metrics."""

from __future__ import annotations

import urllib.request
from dataclasses import asdict, dataclass

import psutil

SCRAPE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Sample:
    at_s: float  # seconds since the load started
    rss_bytes: int
    requests_running: float  # admitted, holding a slot
    requests_queued: float  # waiting for a slot
    backend_running: float  # decoding in the backend now
    backend_queued: float  # waiting inside the backend for a batch
    completion_tokens: float  # counter, all services; grows when a request ends
    # Tokens sent as they are sent (each but a stream's first adds one inter-token
    # latency observation): the live rate.
    tokens_sent: float
    requests_finished: float  # counter, all services and codes
    internal_errors: float  # counter of code INTERNAL

    def as_json(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}; comments skipped."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def total(values: dict[str, float], name: str, label: str = "") -> float:
    """The sum of every series of `name` (whose labels contain `label`, when given)."""
    return sum(
        value
        for key, value in values.items()
        if (key == name or key.startswith(name + "{")) and label in key
    )


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    url = f"http://{host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as answer:
        return parse_metrics(answer.read().decode())


def take_sample(pid: int, port: int, at_s: float) -> Sample:
    values = scrape(port)
    return Sample(
        at_s=at_s,
        rss_bytes=int(psutil.Process(pid).memory_info().rss),
        requests_running=total(values, "llm_local_requests_running"),
        requests_queued=total(values, "llm_local_requests_queued"),
        backend_running=total(values, "llm_local_backend_running"),
        backend_queued=total(values, "llm_local_backend_queued"),
        completion_tokens=total(values, "llm_local_completion_tokens_total"),
        tokens_sent=total(values, "llm_local_inter_token_latency_seconds_count"),
        requests_finished=total(values, "llm_local_requests_total"),
        internal_errors=total(values, "llm_local_requests_total", 'code="INTERNAL"'),
    )
