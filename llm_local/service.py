"""The running service's shared parts, handed to every transport."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_local.backends.base import Backend
    from llm_local.core.admission import Admission
    from llm_local.core.state import ServiceState
    from llm_local.observability.metrics import Metrics
    from llm_local.settings.schema import AppSettings


@dataclass(slots=True)
class Service:
    settings: AppSettings
    state: ServiceState
    backend: Backend
    admission: Admission
    metrics: Metrics
