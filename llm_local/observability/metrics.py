"""Prometheus metrics of the service, all named ``llm_local_*``.

One `Metrics` object per running service, with its own registry: tests build as many
services as they like without "duplicated timeseries" errors, and /metrics shows only
this service's series (no process-global default registry).

Counters and histograms are fed by the request path (`observe_request`,
`observe_refusal`, `observe_inter_token`, `rejected`, `stalled`) and the model loader
(`set_model_state`).

``llm_local_requests_total`` counts every generation call that ended, refusals included:
the flow's outcomes (`observe_request`), and the calls a transport refused before the
flow saw them (`observe_refusal`: a message over the size limit, oversized metadata, an
undecodable message, an HTTP body that is not JSON, ...), under the service label the
call would have had, or ``unknown`` when the transport cannot tell.

Per-tenant series (``llm_local_tenant_*``) carry a `tenant` label from a bounded set
(core/fairness.TenantLabels): the first ``server.metrics_tenant_labels`` tenant ids seen
get their own value, later ones share ``other``, calls without one are ``none``; a client
inventing tenant ids cannot grow /metrics without bound. The gauges
that describe "now" (running, queued, batches, model state) are read at scrape time from
the bound `Service`, so they can never drift from the truth.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llm_local.core.fairness import TenantLabels

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from llm_local.backends.base import BackendStats, ModelInfo
    from llm_local.service import Service

PREFIX = "llm_local"
# The service label of a refused call whose service the transport cannot tell.
UNKNOWN_SERVICE = "unknown"
DEFAULT_TENANT_LABELS = 32

MODEL_PHASES = ("loading", "ready", "failed", "stopping")

# Time to first token: prompt processing plus queueing. Tens of milliseconds for a small
# model on an idle server, seconds for a long prompt or a busy queue.
TTFT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0,
    60.0,
)  # fmt: skip
# Between two tokens of one stream: ~5 ms (small model, GPU) to ~100 ms (large model, CPU,
# big batch); the long tail shows stalls.
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip
# Whole requests: from a one-token answer to several minutes of generation.
DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0,
    300.0, 600.0,
)  # fmt: skip


BASE_ADAPTER_LABEL = "base"  # requests that name no LoRA adapter


def phase_name(phase: object) -> str:
    """``ServicePhase.READY`` / ``"READY"`` / ``"ready"`` -> ``"ready"``."""
    if isinstance(phase, enum.Enum):
        value = phase.value if isinstance(phase.value, str) else phase.name
        return value.lower()
    return str(phase).lower()


class _LiveServiceCollector(Collector):
    """Gauges read from the service at scrape time: admission, backend, model state."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        # Returning an empty description keeps the registry from calling collect() at
        # registration time, when no service may be bound yet.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics._live_metrics()


class _WithoutCreated(Collector):
    """A registry's metrics less the ``*_created`` sample prometheus_client adds to each
    counter and histogram series: it doubles the series count and no dashboard reads it.
    (``disable_created_metrics()`` would do the same for the whole process.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = f"{metric.name}_created"
            kept = [sample for sample in metric.samples if sample.name != created]
            if len(kept) < len(metric.samples):
                metric = copy.copy(metric)
                metric.samples = kept
            yield metric


class Metrics:
    def __init__(self, tenant_labels: int = DEFAULT_TENANT_LABELS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenant_labels = TenantLabels(tenant_labels)
        self._service: Service | None = None
        self._phase = "loading"
        registry = self.registry

        self.requests = Counter(
            f"{PREFIX}_requests",
            "Ended generation requests by RPC service and status code, refusals included.",
            ["service", "code"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From receiving a request to sending its first generated text.",
            ["service"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one stream.",
            buckets=INTER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "From receiving a request to its end (finish, error or rejection).",
            ["service"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens",
            "Prompt tokens processed (after the chat template).",
            ["service"],
            registry=registry,
        )
        self.cached_prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens_cached",
            "Prompt tokens whose state the backend had kept (prefix reuse): not read again.",
            ["service"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens",
            "Tokens generated.",
            ["service"],
            registry=registry,
        )
        self.rejections = Counter(
            f"{PREFIX}_requests_rejected",
            "Requests refused because the server was at capacity (RESOURCE_EXHAUSTED).",
            ["service"],
            registry=registry,
        )
        self.stalled_streams = Counter(
            f"{PREFIX}_streams_stalled",
            "Streams cancelled because their client stopped reading (server.stall_timeout_s).",
            ["service"],
            registry=registry,
        )
        self.tenant_requests = Counter(
            f"{PREFIX}_tenant_requests",
            "Finished generation requests by tenant (bounded label set) and status code.",
            ["tenant", "code"],
            registry=registry,
        )
        self.tenant_completion_tokens = Counter(
            f"{PREFIX}_tenant_completion_tokens",
            "Tokens generated, by tenant (bounded label set).",
            ["tenant"],
            registry=registry,
        )
        # LoRA adapters: the label is a configured adapter id (a bounded set: [adapters]),
        # or "base"; a request naming an unknown id is refused before it gets one.
        self.adapter_requests = Counter(
            f"{PREFIX}_adapter_requests",
            "Generation requests that passed validation, by LoRA adapter and status code.",
            ["adapter", "code"],
            registry=registry,
        )
        self.adapter_completion_tokens = Counter(
            f"{PREFIX}_adapter_completion_tokens",
            "Tokens generated, by LoRA adapter.",
            ["adapter"],
            registry=registry,
        )
        self.model_load_seconds = Gauge(
            f"{PREFIX}_model_load_seconds",
            "How long the last successful model load took.",
            registry=registry,
        )
        self.model_load_failures = Counter(
            f"{PREFIX}_model_load_failures",
            "Model load attempts that failed.",
            registry=registry,
        )
        registry.register(_LiveServiceCollector(self))

    # -- fed by the request path ------------------------------------------------------

    def observe_request(
        self,
        *,
        service: str,
        code: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        duration_s: float,
        tenant: str | None = None,
        cached_tokens: int = 0,
        adapter: str | None = None,
    ) -> None:
        """One finished request. `ttft_s` is None when no text was sent; `adapter` is
        the validated LoRA adapter ("" for the base model), None before validation."""
        self.requests.labels(service=service, code=code).inc()
        tenant_label = self.tenant_labels.label(tenant)
        self.tenant_requests.labels(tenant=tenant_label, code=code).inc()
        self.request_duration.labels(service=service).observe(duration_s)
        if ttft_s is not None:
            self.time_to_first_token.labels(service=service).observe(ttft_s)
        if prompt_tokens > 0:
            self.prompt_tokens.labels(service=service).inc(prompt_tokens)
        if cached_tokens > 0:
            self.cached_prompt_tokens.labels(service=service).inc(cached_tokens)
        if completion_tokens > 0:
            self.completion_tokens.labels(service=service).inc(completion_tokens)
            self.tenant_completion_tokens.labels(tenant=tenant_label).inc(completion_tokens)
        if adapter is not None:
            adapter_label = adapter or BASE_ADAPTER_LABEL
            self.adapter_requests.labels(adapter=adapter_label, code=code).inc()
            if completion_tokens > 0:
                self.adapter_completion_tokens.labels(adapter=adapter_label).inc(completion_tokens)

    def observe_refusal(self, *, service: str | None, code: str, tenant: str | None = None) -> None:
        """A call the transport refused before it reached the request flow: it counts
        among the requests (by `code`, under `service` or ``unknown``), and has no
        duration, tokens or time to first token to observe."""
        label = service or UNKNOWN_SERVICE
        self.requests.labels(service=label, code=code).inc()
        self.tenant_requests.labels(tenant=self.tenant_labels.label(tenant), code=code).inc()

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def rejected(self, service: str) -> None:
        self.rejections.labels(service=service).inc()

    def stalled(self, service: str) -> None:
        self.stalled_streams.labels(service=service).inc()

    # -- fed by the model loader ------------------------------------------------------

    def set_model_state(self, phase: str, load_seconds: float | None) -> None:
        """Record a state change; `load_seconds` is given when a load has just succeeded."""
        name = phase_name(phase)
        if name == "failed" and self._phase != "failed":
            self.model_load_failures.inc()
        self._phase = name
        if load_seconds is not None:
            self.model_load_seconds.set(load_seconds)

    # -- read live at scrape time -----------------------------------------------------

    def bind(self, service: Service) -> None:
        """Read running/queued/model-state gauges from `service` from now on."""
        self._service = service

    def _current_phase(self) -> str:
        if self._service is not None:
            return phase_name(self._service.state.phase)
        return self._phase

    def _live_metrics(self) -> Iterator[Metric]:
        phase = self._current_phase()
        state = GaugeMetricFamily(
            f"{PREFIX}_model_state",
            "1 for the model's current state (loading, ready, failed, stopping), 0 otherwise.",
            labels=["state"],
        )
        for name in MODEL_PHASES:
            state.add_metric([name], 1.0 if name == phase else 0.0)
        yield state
        yield GaugeMetricFamily(
            f"{PREFIX}_model_ready",
            "1 when the model is loaded and requests are served.",
            value=1.0 if phase == "ready" else 0.0,
        )

        service = self._service
        if service is None:
            return
        admission = service.admission
        yield GaugeMetricFamily(
            f"{PREFIX}_requests_running",
            "Admitted generation requests (holding a slot).",
            value=float(admission.running),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_requests_queued",
            "Requests waiting for a slot.",
            value=float(admission.queued),
        )
        info = service.state.model_info
        if info is not None:
            model = GaugeMetricFamily(
                f"{PREFIX}_model_info",
                "The loaded model (always 1; the labels carry the facts).",
                labels=["backend", "model_name", "device", "compute_type"],
            )
            model.add_metric([info.backend, info.model_name, info.device, info.compute_type], 1.0)
            yield model
            yield from _numerics_metrics(info)
            try:
                stats = service.backend.stats()
            except Exception:  # a scrape must never fail because the backend is unwell
                return
            yield from _backend_metrics(stats)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition: (body, content type)."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST


def _backend_metrics(stats: BackendStats) -> Iterator[Metric]:
    """What the backend does now, the batching decisions it took so far, and the costs it
    measured (backends/shared/costs.py); a figure the backend does not measure is left out."""
    counters = (
        ("merges", "Running batches restarted to take waiting requests in.", stats.merges),
        (
            "extra_lanes",
            "Batches started on an extra lane: every worker busy past the TTFT target.",
            stats.lanes_opened,
        ),
        (
            "prefix_reused_tokens",
            "Prompt tokens not read because a kept sequence held their state (prefix reuse).",
            stats.prefix_reused_tokens,
        ),
        (
            "prefix_read_tokens",
            "Prompt tokens the backend read (computed), where it reports them.",
            stats.prefix_read_tokens,
        ),
        (
            "prefix_evictions",
            "Kept sequences evicted (least recently used) for room or the memory budget.",
            stats.prefix_evictions,
        ),
    )
    for name, documentation, count in counters:
        yield CounterMetricFamily(f"{PREFIX}_backend_{name}", documentation, value=float(count))
    gauges: tuple[tuple[str, str, float | None], ...] = (
        ("running", "Generations the backend is decoding now.", stats.running),
        ("queued", "Generations waiting inside the backend for a batch slot.", stats.queued),
        ("batches", "Batches the backend is decoding now.", stats.batches),
        (
            "expected_wait_seconds",
            "The wait for a free worker the scheduler expected at its last decision (0: none).",
            stats.expected_wait_seconds,
        ),
        (
            "step_seconds",
            "Measured time of one decoding step of a batch of one.",
            stats.step_seconds,
        ),
        (
            "step_item_seconds",
            "Measured time each further item of a batch adds to a decoding step.",
            stats.step_seconds_per_item,
        ),
        (
            "prefill_token_seconds",
            "Measured time to read one prompt token.",
            stats.prefill_token_seconds,
        ),
        (
            "prefix_cache_bytes",
            "Estimated memory of the shared prompt prefixes the backend keeps cached.",
            stats.prefix_cache_bytes,
        ),
        (
            "prefix_cache_entries",
            "Shared prompt prefixes the backend keeps cached.",
            stats.prefix_cache_entries,
        ),
    )
    for name, documentation, value in gauges:
        if value is not None:
            yield GaugeMetricFamily(f"{PREFIX}_backend_{name}", documentation, value=float(value))


def _numerics_metrics(info: ModelInfo) -> Iterator[Metric]:
    """The numerics verdict of the serving compute type (core/numerics.py)."""
    numerics = info.numerics
    if numerics is None:
        return
    verified = GaugeMetricFamily(
        f"{PREFIX}_numerics_verified",
        "1 when the serving compute type passed the numerics check against the unquantized "
        "model, 0 when it serves unverified.",
        labels=["compute_type", "chosen_by"],
    )
    verified.add_metric(
        [numerics.compute_type, numerics.chosen_by], 1.0 if numerics.verified else 0.0
    )
    yield verified
    if numerics.nll_ratio is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}_numerics_nll_ratio",
            "NLL of the unquantized model's probe answers under the serving compute type, "
            "over their NLL under the unquantized weights (1 = identical).",
            value=numerics.nll_ratio,
        )
    if numerics.agreement_ratio is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}_numerics_agreement_ratio",
            "Greedy agreement with the unquantized model's probe answers, over float32's on "
            "the same weights (1 = as good as float32).",
            value=numerics.agreement_ratio,
        )
