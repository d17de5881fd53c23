"""Whether the service can generate now: loading, ready, failed or stopping.

Health endpoints read it; request handlers call check_ready() first; gRPC health Watch
waits on wait_for_change(). Every change bumps `version`, so a watcher that saw version
N and asks again never misses a change made in between.

STOPPING is final: once the server is stopping, a load that finishes late does not
make it ready again.
"""

from __future__ import annotations

import enum

import trio

from llm_local.backends.base import ModelInfo
from llm_local.core.errors import NotReady


class Phase(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class ServiceState:
    def __init__(self) -> None:
        self._phase = Phase.LOADING
        self._reason: str | None = None
        self._model_info: ModelInfo | None = None
        self._will_retry = False
        self._version = 0
        self._changed = trio.Event()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def reason(self) -> str | None:
        """Why the service is loading or failed (e.g. "retry 2 of 3: file not found")."""
        return self._reason

    @property
    def model_info(self) -> ModelInfo | None:
        """Set once the model is ready; kept while stopping."""
        return self._model_info

    @property
    def version(self) -> int:
        return self._version

    @property
    def is_ready(self) -> bool:
        return self._phase is Phase.READY

    def mark_loading(self, reason: str | None = None) -> None:
        self._change(Phase.LOADING, reason, None)

    def mark_ready(self, info: ModelInfo) -> None:
        self._change(Phase.READY, None, info)

    def mark_failed(self, reason: str, *, will_retry: bool = False) -> None:
        """`will_retry`: another load attempt is scheduled, so the failure is not final."""
        self._will_retry = will_retry
        self._change(Phase.FAILED, reason, None)

    @property
    def will_retry(self) -> bool:
        """FAILED but another attempt is coming: alive, just not ready."""
        return self._phase is Phase.FAILED and self._will_retry

    def mark_stopping(self) -> None:
        self._change(Phase.STOPPING, None, self._model_info)

    def check_ready(self) -> ModelInfo:
        """The model's info when ready; otherwise NotReady saying why."""
        if self._phase is Phase.READY and self._model_info is not None:
            return self._model_info
        raise NotReady(self.describe())

    def describe(self) -> str:
        """One line for humans: what the service is doing now."""
        if self._phase is Phase.READY:
            return "model is ready"
        if self._phase is Phase.LOADING:
            return f"model is loading ({self._reason})" if self._reason else "model is loading"
        if self._phase is Phase.FAILED:
            return f"model failed to load: {self._reason}"
        return "server is stopping"

    async def wait_for_change(self, seen_version: int) -> int:
        """Wait until `version` differs from `seen_version`; return the new version."""
        if self._version != seen_version:
            await trio.lowlevel.checkpoint()  # trio's rule: every await may yield
        while self._version == seen_version:
            await self._changed.wait()
        return self._version

    def _change(self, phase: Phase, reason: str | None, info: ModelInfo | None) -> None:
        if self._phase is Phase.STOPPING:
            return
        if (phase, reason, info) == (self._phase, self._reason, self._model_info):
            return
        self._phase, self._reason, self._model_info = phase, reason, info
        self._version += 1
        # Wake every waiter, then start a fresh event for the next change.
        changed, self._changed = self._changed, trio.Event()
        changed.set()
