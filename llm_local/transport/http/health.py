"""What /health, /health/live and /health/ready answer: pure functions of the service state.

No I/O here: the routes in app.py only turn these (status code, body) pairs into
responses, so every state → answer rule is unit-testable without a server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llm_local.core.state import Phase

if TYPE_CHECKING:
    from llm_local.service import Service

HealthAnswer = tuple[int, dict[str, Any]]

OK = 200
UNAVAILABLE = 503


def health(service: Service) -> HealthAnswer:
    """The contract's /health: 200 "healthy" when the model serves, else 503 with why."""
    state = service.state
    info = state.model_info
    if state.is_ready and info is not None:
        healthy: dict[str, Any] = {
            "status": "healthy",
            "model_ready": True,
            "model_name": info.model_name,
            "device": info.device,
            "compute_type": info.compute_type,
            "backend": info.backend,
            "numerics": None if info.numerics is None else info.numerics.to_json(),
        }
        if info.adapter_numerics:  # each LoRA adapter's verdict, checked like the model
            healthy["adapter_numerics"] = {
                adapter: status.to_json() for adapter, status in info.adapter_numerics
            }
        return OK, healthy
    # READY without model info cannot happen (mark_ready takes it); say "loading" if it did.
    status = Phase.LOADING if state.phase is Phase.READY else state.phase
    body: dict[str, Any] = {
        "status": status.value,
        "model_ready": False,
        "model_name": service.settings.model.name,
    }
    if state.reason:
        body["reason"] = state.reason
    return UNAVAILABLE, body


def liveness(service: Service) -> HealthAnswer:
    """200 while the process answers; 503 once the model failed to load for good.

    Loading (including waiting to retry a failed load) is alive: a restart would only
    start over. FAILED means the retries are spent and the backend is dead, which a
    restart may cure, so an orchestrator should see it.
    """
    state = service.state
    if state.phase is Phase.FAILED and not state.will_retry:
        return UNAVAILABLE, {"status": "dead", "reason": state.describe()}
    return OK, {"status": "alive"}


def readiness(service: Service) -> HealthAnswer:
    """200 only when a new request would be served right now."""
    state = service.state
    if not state.is_ready:
        return UNAVAILABLE, {
            "ready": False,
            "status": state.phase.value,
            "reason": state.describe(),
        }
    admission = service.admission
    if admission.full:
        return UNAVAILABLE, {
            "ready": False,
            "status": "full",
            "reason": f"at capacity: {admission.running} running, {admission.queued} queued",
        }
    return OK, {"ready": True, "status": "ready"}
