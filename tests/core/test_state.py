from __future__ import annotations

import pytest
import trio
import trio.testing

from llm_local.backends.base import ModelInfo
from llm_local.core.errors import NotReady
from llm_local.core.state import Phase, ServiceState

INFO = ModelInfo(
    backend="fake", model_name="m", device="cpu", compute_type="int8", context_limit=2048
)


def test_starts_loading_and_refuses_requests() -> None:
    state = ServiceState()
    assert state.phase is Phase.LOADING
    assert not state.is_ready
    with pytest.raises(NotReady, match="model is loading"):
        state.check_ready()


def test_ready_serves_and_reports_the_model() -> None:
    state = ServiceState()
    state.mark_ready(INFO)
    assert state.is_ready
    assert state.phase == "ready"
    assert state.model_info == INFO
    assert state.check_ready() == INFO


def test_loading_reason_and_failure_reason_reach_the_message() -> None:
    state = ServiceState()
    state.mark_loading("attempt 2 of 3")
    with pytest.raises(NotReady, match=r"model is loading \(attempt 2 of 3\)"):
        state.check_ready()
    state.mark_failed("model.bin: no such file")
    assert state.phase is Phase.FAILED
    assert state.reason == "model.bin: no such file"
    with pytest.raises(NotReady, match=r"model failed to load: model\.bin: no such file"):
        state.check_ready()


def test_stopping_is_final() -> None:
    state = ServiceState()
    state.mark_ready(INFO)
    state.mark_stopping()
    with pytest.raises(NotReady, match="server is stopping"):
        state.check_ready()
    version = state.version
    state.mark_ready(INFO)  # a late load must not reopen a stopping server
    state.mark_failed("late")
    assert state.phase is Phase.STOPPING
    assert state.version == version


def test_every_change_bumps_the_version_and_repeats_do_not() -> None:
    state = ServiceState()
    versions = [state.version]
    state.mark_loading("retry")
    versions.append(state.version)
    state.mark_loading("retry")
    versions.append(state.version)
    state.mark_ready(INFO)
    versions.append(state.version)
    assert versions == [0, 1, 1, 2]


async def test_wait_for_change_wakes_every_watcher_with_the_new_version() -> None:
    state = ServiceState()
    seen: list[tuple[int, Phase]] = []

    async def watch() -> None:
        version = await state.wait_for_change(state.version)
        seen.append((version, state.phase))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        state.mark_ready(INFO)
    assert seen == [(1, Phase.READY), (1, Phase.READY)]


async def test_wait_for_change_returns_at_once_for_a_stale_version() -> None:
    state = ServiceState()
    state.mark_ready(INFO)
    state.mark_stopping()
    assert await state.wait_for_change(0) == 2
