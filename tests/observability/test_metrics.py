"""The Prometheus metrics: names, labels and what observe_* records."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from llm_local.observability.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_a_finished_request_counts_tokens_and_latencies() -> None:
    metrics = Metrics()
    metrics.observe_request(
        service="LlamaService",
        code="OK",
        prompt_tokens=20,
        completion_tokens=8,
        ttft_s=0.12,
        duration_s=0.9,
        cached_tokens=15,
    )
    metrics.observe_inter_token(0.02)
    found = samples(metrics)
    svc = (("service", "LlamaService"),)
    assert found[("llm_local_prompt_tokens_cached_total", svc)] == 15
    assert found[("llm_local_requests_total", (("code", "OK"), *svc))] == 1
    assert found[("llm_local_prompt_tokens_total", svc)] == 20
    assert found[("llm_local_completion_tokens_total", svc)] == 8
    assert found[("llm_local_time_to_first_token_seconds_sum", svc)] == 0.12
    assert found[("llm_local_request_duration_seconds_sum", svc)] == 0.9
    assert found[("llm_local_inter_token_latency_seconds_count", ())] == 1
    # 0.12 s falls in the 0.15 s bucket but not the 0.1 s one.
    assert found[("llm_local_time_to_first_token_seconds_bucket", (("le", "0.1"), *svc))] == 0
    assert found[("llm_local_time_to_first_token_seconds_bucket", (("le", "0.15"), *svc))] == 1


def test_a_request_without_text_has_no_time_to_first_token() -> None:
    metrics = Metrics()
    metrics.observe_request(
        service="LLMLocalService",
        code="INVALID_ARGUMENT",
        prompt_tokens=0,
        completion_tokens=0,
        ttft_s=None,
        duration_s=0.001,
    )
    found = samples(metrics)
    svc = (("service", "LLMLocalService"),)
    assert found[("llm_local_requests_total", (("code", "INVALID_ARGUMENT"), *svc))] == 1
    assert ("llm_local_time_to_first_token_seconds_count", svc) not in found
    assert found[("llm_local_request_duration_seconds_count", svc)] == 1


def test_rejections_are_counted_per_service() -> None:
    metrics = Metrics()
    metrics.rejected("LlamaService")
    metrics.rejected("LlamaService")
    found = samples(metrics)
    assert found[("llm_local_requests_rejected_total", (("service", "LlamaService"),))] == 2


def test_model_state_and_load_time_without_a_bound_service() -> None:
    metrics = Metrics()
    found = samples(metrics)
    assert found[("llm_local_model_state", (("state", "loading"),))] == 1
    assert found[("llm_local_model_ready", ())] == 0

    metrics.set_model_state("failed", None)
    metrics.set_model_state("loading", None)
    metrics.set_model_state("ready", 12.5)
    found = samples(metrics)
    assert found[("llm_local_model_state", (("state", "ready"),))] == 1
    assert found[("llm_local_model_state", (("state", "loading"),))] == 0
    assert found[("llm_local_model_ready", ())] == 1
    assert found[("llm_local_model_load_seconds", ())] == 12.5
    assert found[("llm_local_model_load_failures_total", ())] == 1


def test_two_instances_do_not_share_series() -> None:
    first, second = Metrics(), Metrics()
    first.rejected("LlamaService")
    assert ("llm_local_requests_rejected_total", (("service", "LlamaService"),)) not in samples(
        second
    )


def test_counters_and_histograms_have_no_created_series() -> None:
    metrics = Metrics()
    metrics.observe_request(
        service="LlamaService",
        code="OK",
        prompt_tokens=3,
        completion_tokens=2,
        ttft_s=0.05,
        duration_s=0.2,
    )
    metrics.observe_inter_token(0.01)
    metrics.rejected("LlamaService")
    metrics.set_model_state("failed", None)
    body, _ = metrics.render()
    names = {name for name, _ in samples(metrics)}
    assert [name for name in names if name.endswith("_created")] == []
    assert b"_created" not in body
    # Only the timestamps went: the values they sat beside are all still there.
    assert {
        "llm_local_requests_total",
        "llm_local_requests_rejected_total",
        "llm_local_model_load_failures_total",
        "llm_local_inter_token_latency_seconds_count",
        "llm_local_time_to_first_token_seconds_bucket",
    } <= names


def test_tenant_series_have_a_bounded_label_set() -> None:
    metrics = Metrics(tenant_labels=2)
    for tenant in ("acme", "globex", "initech", "umbrella", None, "acme"):
        metrics.observe_request(
            service="LlamaService",
            code="OK",
            prompt_tokens=5,
            completion_tokens=3,
            ttft_s=0.1,
            duration_s=0.2,
            tenant=tenant,
        )
    found = samples(metrics)
    requests = {
        dict(labels)["tenant"]: value
        for (name, labels), value in found.items()
        if name == "llm_local_tenant_requests_total"
    }
    assert requests == {"acme": 2, "globex": 1, "other": 2, "none": 1}
    tokens = found[("llm_local_tenant_completion_tokens_total", (("tenant", "other"),))]
    assert tokens == 6
