"""The HTTP routes, through Quart's test client, against a hand-built Service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from llm_local.backends.base import ModelInfo
from llm_local.service import Service
from llm_local.transport.http.app import create_app

ServiceFactory = Callable[..., Service]  # the make_service fixture (conftest.py)

MODEL_INFO = ModelInfo(
    backend="fake",
    model_name="SmolLM2-135M-Instruct",
    device="cpu",
    compute_type="int8",
    context_limit=8192,
)


async def get(service: Service, path: str, method: str = "GET") -> tuple[int, Any]:
    client = create_app(service).test_client()
    response = await client.open(path, method=method)
    if response.content_type == "application/json":
        return response.status_code, await response.get_json()
    return response.status_code, await response.get_data(as_text=True)


async def test_health_follows_the_state_from_loading_to_ready(make_service: ServiceFactory) -> None:
    service = make_service()

    assert await get(service, "/health") == (
        503,
        {
            "status": "loading",
            "model_ready": False,
            "model_name": service.settings.model.name,
        },
    )

    await service.backend.load()
    service.state.mark_ready(service.backend.info)
    code, body = await get(service, "/health")
    assert code == 200
    info = service.backend.info
    assert body == {
        "status": "healthy",
        "model_ready": True,
        "model_name": info.model_name,
        "device": info.device,
        "compute_type": info.compute_type,
        "backend": info.backend,
        "numerics": None,  # the fake backend does not check numerics
    }


async def test_health_reports_a_retried_load_and_a_failure_with_the_reason(
    make_service: ServiceFactory,
) -> None:
    service = make_service()
    service.state.mark_loading("retry 1 of 3: model.bin not found")
    code, body = await get(service, "/health")
    assert (code, body["status"], body["reason"]) == (
        503,
        "loading",
        "retry 1 of 3: model.bin not found",
    )

    service.state.mark_failed("model.bin not found")
    code, body = await get(service, "/health")
    assert code == 503
    assert body["status"] == "failed"
    assert body["model_ready"] is False
    assert body["reason"] == "model.bin not found"


async def test_stopping_turns_health_and_readiness_503(make_service: ServiceFactory) -> None:
    service = make_service()
    service.state.mark_ready(MODEL_INFO)
    service.state.mark_stopping()

    code, body = await get(service, "/health")
    assert (code, body["status"], body["model_ready"]) == (503, "stopping", False)
    code, body = await get(service, "/health/ready")
    assert (code, body["status"]) == (503, "stopping")


async def test_readiness_is_503_while_loading_and_200_once_ready(
    make_service: ServiceFactory,
) -> None:
    service = make_service()
    code, body = await get(service, "/health/ready")
    assert (code, body["ready"], body["status"]) == (503, False, "loading")
    assert "loading" in body["reason"]

    service.state.mark_ready(MODEL_INFO)
    assert await get(service, "/health/ready") == (200, {"ready": True, "status": "ready"})


async def test_readiness_turns_503_while_admission_is_full(make_service: ServiceFactory) -> None:
    service = make_service(max_concurrent=1)
    service.state.mark_ready(MODEL_INFO)
    holding = trio.Event()
    release = trio.Event()

    async def hold_the_only_slot() -> None:
        async with service.admission.slot():
            holding.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_the_only_slot)
        await holding.wait()
        code, body = await get(service, "/health/ready")
        assert (code, body["status"]) == (503, "full")
        assert "1 running" in body["reason"]
        _, metrics_text = await get(service, "/metrics")
        assert "llm_local_requests_running 1.0" in metrics_text
        # Liveness and the contract's /health do not depend on load.
        assert (await get(service, "/health"))[0] == 200
        assert (await get(service, "/health/live"))[0] == 200
        release.set()

    assert (await get(service, "/health/ready"))[0] == 200


async def test_liveness_stays_200_while_loading_and_is_503_once_the_load_failed(
    make_service: ServiceFactory,
) -> None:
    service = make_service()
    assert await get(service, "/health/live") == (200, {"status": "alive"})
    service.state.mark_loading("retry 2 of 3: out of memory")
    assert (await get(service, "/health/live"))[0] == 200
    service.state.mark_failed("out of memory (attempt 1 of 3)", will_retry=True)
    assert (await get(service, "/health/live"))[0] == 200
    assert (await get(service, "/health"))[1]["status"] == "failed"

    service.state.mark_failed("out of memory")
    code, body = await get(service, "/health/live")
    assert (code, body["status"]) == (503, "dead")
    assert "out of memory" in body["reason"]


async def test_config_shows_effective_settings_and_versions(make_service: ServiceFactory) -> None:
    service = make_service()
    service.state.mark_ready(MODEL_INFO)
    code, body = await get(service, "/config")
    assert code == 200
    effective = body["effective"]
    assert effective["env"] == "test"
    assert effective["backend"] == "fake"
    assert effective["device"] == "cpu"
    assert effective["compute_type"] == "int8"
    assert effective["capacity"]["max_concurrent"] == 2
    assert set(effective["ports"]) == {"http", "grpc", "metrics"}
    assert effective["loaded_model"]["model_name"] == "SmolLM2-135M-Instruct"
    assert body["versions"]["ctranslate2"]
    assert body["versions"]["transformers"]
    assert body["versions"]["llm-local"]


async def test_config_redacts_secrets(make_service: ServiceFactory) -> None:
    secret = "hf_sekrit_0123456789"
    raw: dict[str, object] = {
        "env": "test",
        "model": {"name": "some/model", "hf_token": secret},
        "tls": {"key_password": secret},
        "api_key": secret,
    }
    service = make_service(raw=raw)
    code, body = await get(service, "/config")
    text = await (await create_app(service).test_client().get("/config")).get_data(as_text=True)
    assert code == 200
    assert secret not in text
    assert body["settings"]["model"]["name"] == "some/model"
    assert "hf_token" in body["settings"]["model"]


async def test_metrics_renders_observed_requests(make_service: ServiceFactory) -> None:
    service = make_service()
    service.state.mark_ready(MODEL_INFO)
    service.metrics.observe_request(
        service="LlamaService",
        code="OK",
        prompt_tokens=12,
        completion_tokens=7,
        ttft_s=0.08,
        duration_s=0.4,
    )
    code, text = await get(service, "/metrics")
    assert code == 200
    assert 'llm_local_requests_total{code="OK",service="LlamaService"} 1.0' in text
    assert 'llm_local_prompt_tokens_total{service="LlamaService"} 12.0' in text
    assert 'llm_local_completion_tokens_total{service="LlamaService"} 7.0' in text
    assert 'llm_local_time_to_first_token_seconds_count{service="LlamaService"} 1.0' in text
    assert 'llm_local_model_state{state="ready"} 1.0' in text
    assert "llm_local_requests_running 0.0" in text
    assert "llm_local_backend_batches 0.0" in text
    assert 'model_name="SmolLM2-135M-Instruct"' in text  # llm_local_model_info


async def test_metrics_content_type_is_prometheus_text(make_service: ServiceFactory) -> None:
    response = await create_app(make_service()).test_client().get("/metrics")
    assert response.content_type.startswith("text/plain")
    assert "version=" in response.content_type


async def test_unknown_route_is_404_json(make_service: ServiceFactory) -> None:
    code, body = await get(make_service(), "/nope")
    assert code == 404
    assert body["status"] == 404
    assert body["error"] == "Not Found"


async def test_wrong_method_is_405_json_with_allow(make_service: ServiceFactory) -> None:
    app = create_app(make_service())
    response = await app.test_client().post("/health")
    assert response.status_code == 405
    assert (await response.get_json())["status"] == 405
    assert "GET" in response.headers["Allow"]


async def test_a_failing_route_is_500_json_without_traceback(make_service: ServiceFactory) -> None:
    service = make_service()
    app = create_app(service)

    def explode() -> tuple[bytes, str]:
        raise RuntimeError("secret internals /home/x/file.py line 3")

    service.metrics.render = explode  # type: ignore[method-assign]
    response = await app.test_client().get("/metrics")
    text = await response.get_data(as_text=True)
    assert response.status_code == 500
    assert (await response.get_json())["status"] == 500
    assert "Traceback" not in text
    assert "secret internals" not in text
