"""The main program in-process on the fake backend: loading, retries, stopping."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from llm_local import app
from llm_local.app import (
    RunningService,
    StartupError,
    describe_error,
    loopback_only,
    run_service,
)
from llm_local.core.state import Phase
from llm_local.core.types import TextChunk
from llm_local.core.validation import RawRequest
from llm_local.serving import CallError, CallMetadata, Code
from llm_local.settings.schema import AppSettings
from llm_local.transport.http.server import serve_http
from llm_local.transport.tls import TLSConfigError

SettingsFor = Callable[..., AppSettings]


@pytest.fixture
def settings_for(fake_settings: SettingsFor) -> SettingsFor:
    """Fake-backend settings whose load retries follow each other quickly."""
    return partial(fake_settings, model__load_retry_backoff_s=0.01)


async def phases_until(
    running: RunningService, last: Phase, final_reason: Callable[[str | None], bool] = bool
) -> list[tuple[Phase, str | None]]:
    """Every (phase, reason) the state goes through until `last` (with a reason that
    `final_reason` accepts, when `last` is FAILED)."""
    state = running.service.state
    seen = [(state.phase, state.reason)]
    version = state.version

    def done() -> bool:
        return state.phase is last and (last is not Phase.FAILED or final_reason(state.reason))

    with trio.fail_after(10):
        while not done():
            version = await state.wait_for_change(version)
            seen.append((state.phase, state.reason))
    return seen


async def test_load_is_retried_after_a_failure(
    nursery: trio.Nursery, settings_for: SettingsFor
) -> None:
    settings = settings_for({"fail_load": 1}, model__load_retries=2)
    running: RunningService = await nursery.start(run_service, settings)

    seen = await phases_until(running, Phase.READY)

    phases = [phase for phase, _ in seen]
    assert Phase.FAILED in phases
    failed_reason = next(reason for phase, reason in seen if phase is Phase.FAILED)
    assert failed_reason is not None
    assert "fake backend told to fail loading" in failed_reason
    assert "retrying" in failed_reason
    running.stop.set()


async def test_a_model_that_never_loads_leaves_the_process_up_and_failed(
    nursery: trio.Nursery, settings_for: SettingsFor
) -> None:
    settings = settings_for({"fail_load": "weights are missing"}, model__load_retries=1)
    running: RunningService = await nursery.start(run_service, settings)

    seen = await phases_until(
        running, Phase.FAILED, lambda reason: "retrying" not in (reason or "")
    )

    assert [phase for phase, _ in seen].count(Phase.FAILED) == 2  # one retry, then for good
    assert running.service.state.reason == "weights are missing"
    with pytest.raises(CallError) as caught:
        await running.flow.generate("test", RawRequest("Hi"), CallMetadata(), _ignore)
    assert caught.value.code is Code.UNAVAILABLE
    assert "weights are missing" in caught.value.message
    running.stop.set()


async def test_slow_start_keeps_the_model_loading_first(
    nursery: trio.Nursery, settings_for: SettingsFor
) -> None:
    settings = settings_for(server__slow_start_s=0.3)
    running: RunningService = await nursery.start(run_service, settings)

    seen = await phases_until(running, Phase.READY)

    assert seen.index((Phase.LOADING, "slow start")) < seen.index((Phase.READY, None))
    running.stop.set()


async def test_stop_lets_a_running_stream_finish_then_closes_the_backend(
    settings_for: SettingsFor,
) -> None:
    settings = settings_for({"token_delay_s": 0.01, "reply": "z" * 30}, server__grace_period_s=5)
    chunks: list[str] = []
    generating = trio.Event()

    async def record(chunk: TextChunk) -> None:
        chunks.append(chunk.text)
        generating.set()

    async with trio.open_nursery() as nursery:
        running: RunningService = await nursery.start(run_service, settings)
        await phases_until(running, Phase.READY)
        answered = trio.Event()

        async def ask() -> None:
            finished = await running.flow.generate("test", RawRequest("Hi"), CallMetadata(), record)
            assert finished.reason.value == "stop"
            answered.set()

        nursery.start_soon(ask)
        with trio.fail_after(5):
            await generating.wait()
        running.stop.set()
        with trio.fail_after(5):
            await phases_until(running, Phase.STOPPING)
        with pytest.raises(CallError) as refused:
            await running.flow.generate("test", RawRequest("Hi"), CallMetadata(), record)
        assert refused.value.code is Code.UNAVAILABLE

    assert answered.is_set()
    assert "".join(chunks) == "z" * 30
    assert running.service.backend.closed  # type: ignore[attr-defined]


async def test_sigterm_stops_the_service(settings_for: SettingsFor) -> None:
    settings = settings_for()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            running: RunningService = await nursery.start(run_service, settings)
            await phases_until(running, Phase.READY)
            os.kill(os.getpid(), signal.SIGTERM)
    assert running.service.state.phase is Phase.STOPPING


async def test_a_taken_port_is_a_startup_error_naming_it(settings_for: SettingsFor) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = settings_for(server__grpc_port=port)

        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(run_service, settings))

    startup, _ = caught.value.split(StartupError)
    assert startup is not None
    message = describe_error(startup)
    assert f"gRPC on 127.0.0.1:{port} (LLM_LOCAL_SERVICE_GRPC_PORT) could not start" in message
    assert "address already in use" in message.lower()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


async def test_http_starts_only_once_grpc_and_metrics_listen(
    settings_for: SettingsFor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whoever sees /health answer (a startup probe, the gateway) connects to gRPC next:
    # it must not find the port still closed.
    grpc_port, metrics_port = _free_port(), _free_port()
    settings = settings_for(server__grpc_port=grpc_port, server__metrics_port=metrics_port)
    listening_when_http_started: dict[str, bool] = {}

    async def recording_serve_http(*args: Any, **kwargs: Any) -> None:
        listening_when_http_started["grpc"] = _accepts(grpc_port)
        listening_when_http_started["metrics"] = _accepts(metrics_port)
        await serve_http(*args, **kwargs)

    monkeypatch.setattr(app, "serve_http", recording_serve_http)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            running: RunningService = await nursery.start(run_service, settings)
            running.stop.set()

    assert listening_when_http_started == {"grpc": True, "metrics": True}


async def _ignore(chunk: Any) -> None:
    pass


async def test_an_unusable_certificate_stops_start_up_naming_the_setting(
    tmp_path: Path, settings_for: SettingsFor
) -> None:
    not_pem = tmp_path / "server.pem"
    not_pem.write_text("not a certificate\n")
    settings = settings_for(tls__cert_path=str(not_pem), tls__key_path=str(not_pem))

    with pytest.raises(TLSConfigError) as caught:
        await run_service(settings)

    assert "tls.cert_path" in str(caught.value)


@pytest.mark.parametrize(
    ("host", "only_here"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.7", False),
        ("llm.internal", False),
    ],
)
def test_loopback_only_tells_addresses_other_machines_cannot_reach(
    host: str, only_here: bool
) -> None:
    assert loopback_only(host) is only_here


async def test_a_gguf_reference_that_cannot_be_recorded_leaves_the_model_served_unverified(
    fake_settings: SettingsFor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """llama_cpp's start-up recording of the numerics reference failing (no torch, no
    room...) is logged with its cause and the load goes on: the check then serves the
    model unverified and says so, as before the server tried."""
    from types import SimpleNamespace

    from llm_local.core.state import ServiceState

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    settings = fake_settings(
        backend="llama_cpp",
        model__name=str(gguf),
        model__cache_dir=str(tmp_path / "cache"),
        numerics__check_at_load=True,
    )
    commands: list[tuple[list[str], dict[str, str] | None]] = []

    async def failing_child(
        command: list[str], env_overrides: dict[str, str] | None = None
    ) -> tuple[int, str]:
        commands.append((command, env_overrides))
        return 1, "error: torch is not installed"

    monkeypatch.setattr(app, "_run_showing_stderr", failing_child)
    service = SimpleNamespace(settings=settings, state=ServiceState())

    await app._record_gguf_reference_if_missing(service, "")  # type: ignore[arg-type]

    [(command, env)] = commands
    assert command[3:5] == ["convert", "--env"] and str(gguf) in command
    assert env == {"LLM_LOCAL_SERVICE_BACKEND": "llama_cpp"}
    assert "torch is not installed" in caplog.text
    assert "served unverified" in caplog.text
    assert service.state.phase is Phase.LOADING
