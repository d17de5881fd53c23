"""A hand-built Service for the HTTP app's unit tests: the fake backend, real state,
admission and metrics; the tests move the state themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from llm_local.backends.fake import FakeBackend, FakeConfig
from llm_local.core.admission import Admission
from llm_local.core.state import ServiceState
from llm_local.observability.metrics import Metrics
from llm_local.service import Service
from llm_local.settings.schema import AppSettings


@pytest.fixture
def make_service(fake_settings: Callable[..., AppSettings]) -> Callable[..., Service]:
    """A Service on the fake backend; `raw` replaces the settings as /config sees them,
    `fake` configures the backend, other keywords are settings overrides."""

    def make(
        raw: dict[str, object] | None = None,
        max_concurrent: int = 2,
        fake: FakeConfig | None = None,
        **overrides: object,
    ) -> Service:
        settings = fake_settings(
            runtime__device="cpu",
            runtime__compute_type="int8",
            capacity__max_concurrent=max_concurrent,
            capacity__max_queued=0,
            **overrides,
        )
        if raw is not None:
            settings = dataclasses.replace(settings, raw=raw)
        capacity = settings.capacity
        service = Service(
            settings=settings,
            state=ServiceState(),
            backend=FakeBackend(fake or FakeConfig()),
            admission=Admission(
                capacity.max_concurrent,
                capacity.max_queued,
                capacity.queue_timeout_s,
                capacity.max_per_tenant,
            ),
            metrics=Metrics(settings.server.metrics_tenant_labels),
        )
        service.metrics.bind(service)
        return service

    return make
