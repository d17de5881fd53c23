"""The trio main program: one nursery owns everything that runs.

Start-up, in order: listen on HTTP (health answers from the first second), on the
metrics port when it has its own, on gRPC; then load the model in the background
(converting it first in a child process when the cache lacks it), retrying with
doubling back-off, and staying up in "failed" when every attempt failed.

Stop, on SIGTERM or SIGINT: the state turns "stopping" at once (readiness 503, new
calls UNAVAILABLE, gRPC health NOT_SERVING); running gRPC streams get
``server.grace_period_s`` to finish, the rest are cancelled with UNAVAILABLE; then the
HTTP side stops, the backend is closed and `run_service` returns (exit status 0).
A second signal skips what is left of the grace period.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from llm_local.backends.base import BackendLoadError, ModelInfo, create_backend
from llm_local.core.admission import Admission
from llm_local.core.state import ServiceState
from llm_local.observability.metrics import Metrics
from llm_local.service import Service
from llm_local.serving import GenerationFlow
from llm_local.settings.schema import AppSettings
from llm_local.transport.grpc.server import serve_grpc
from llm_local.transport.http.server import serve_http, serve_metrics
from llm_local.transport.tls import server_ssl_context

log = logging.getLogger("llm_local.app")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupError(Exception):
    """A listener could not start (port taken, bad certificate...); the message says which."""


@dataclass(frozen=True, slots=True)
class RunningService:
    """What `run_service` reports once every listener is up (for tests and tools)."""

    service: Service
    flow: GenerationFlow
    grpc_port: int
    stop: trio.Event  # set it to stop the service as a signal would


def build_service(settings: AppSettings) -> Service:
    capacity = settings.capacity
    service = Service(
        settings=settings,
        state=ServiceState(),
        backend=create_backend(settings),
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


async def run_service(
    settings: AppSettings,
    *,
    service: Service | None = None,
    task_status: trio.TaskStatus[RunningService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT (or `RunningService.stop`), then stop gracefully."""
    # Fails here, before anything listens, when a certificate or key is unusable.
    server_ssl_context(settings.tls)
    service = service if service is not None else build_service(settings)
    flow = GenerationFlow(service)
    stop = trio.Event()
    try:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                watcher = trio.CancelScope()
                nursery.start_soon(
                    _in_scope,
                    watcher,
                    partial(_receive_signals, signals, stop, flow, nursery.cancel_scope),
                )
                listeners = await _start_listeners(nursery, service, flow)
                loader = trio.CancelScope()
                nursery.start_soon(_in_scope, loader, partial(load_model, service))
                task_status.started(RunningService(service, flow, listeners.grpc_port, stop))
                await stop.wait()
                log.info("stopping: readiness is now 503, new calls are refused")
                service.state.mark_stopping()
                service.metrics.set_model_state("stopping", None)
                loader.cancel()
                await listeners.stop()
                watcher.cancel()  # the HTTP servers finish their own graceful stop
    finally:
        with trio.CancelScope(shield=True):
            await _close_backend(service)
    log.info("stopped")


@dataclass(frozen=True, slots=True)
class _Listeners:
    grpc_port: int
    grpc_stop: trio.Event
    grpc_done: trio.Event
    http_stop: trio.Event

    async def stop(self) -> None:
        # gRPC first (it drains for the grace period) while HTTP still answers probes
        # with "stopping"; then HTTP.
        self.grpc_stop.set()
        await self.grpc_done.wait()
        self.http_stop.set()


async def _start_listeners(
    nursery: trio.Nursery, service: Service, flow: GenerationFlow
) -> _Listeners:
    server = service.settings.server
    http_stop, grpc_stop, grpc_done = trio.Event(), trio.Event(), trio.Event()

    async def grpc_task(task_status: trio.TaskStatus[int]) -> None:
        try:
            await serve_grpc(service, flow, shutdown_event=grpc_stop, task_status=task_status)
        finally:
            grpc_done.set()

    # Each name says where, and which variable moves it: a taken port is the usual cause.
    # HTTP starts last: whoever sees /health answer (a probe, a gateway, a test) can
    # connect to every other port at once, rather than race the gRPC bind.
    grpc_port: int = await _start(
        nursery,
        f"gRPC on {server.host}:{server.grpc_port} (LLM_LOCAL_SERVICE_GRPC_PORT)",
        grpc_task,
    )
    if server.metrics_port not in (0, server.http_port):
        await _start(
            nursery,
            f"metrics on {server.host}:{server.metrics_port} (LLM_LOCAL_SERVICE_METRICS_PORT)",
            partial(serve_metrics, service, shutdown_event=http_stop),
        )
    await _start(
        nursery,
        f"HTTP on {server.host}:{server.http_port} (LLM_LOCAL_SERVICE_HTTP_PORT)",
        partial(serve_http, service, flow, shutdown_event=http_stop),
    )
    if loopback_only(server.host):
        log.info(
            "only this machine can connect (%s); to listen on every interface, set "
            "LLM_LOCAL_SERVICE_SERVER__HOST=0.0.0.0",
            server.host,
        )
    return _Listeners(grpc_port, grpc_stop, grpc_done, http_stop)


def loopback_only(host: str) -> bool:
    """Whether a server listening on `host` accepts connections from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: whatever it resolves to
        return False


async def _start(nursery: trio.Nursery, what: str, task: Callable[..., Awaitable[None]]) -> Any:
    """nursery.start(task), turning any failure into a StartupError naming `what`."""
    try:
        return await nursery.start(task)
    except Exception as exc:
        raise StartupError(f"{what} could not start: {describe_error(exc)}") from exc


def describe_error(exc: BaseException) -> str:
    """One line naming every leaf error of `exc` (which may be an exception group)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(inner) for inner in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _receive_signals(
    signals: Any, stop: trio.Event, flow: GenerationFlow, everything: trio.CancelScope
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not stop.is_set():
            log.info("received %s: stopping gracefully", name)
            stop.set()
        else:
            log.warning("received %s again: stopping now", name)
            # The gRPC drain runs shielded (it must finish even while everything is
            # cancelled): cancelling the nursery alone would not cut its grace period.
            flow.end_grace_period()
            everything.cancel()


async def _in_scope(scope: trio.CancelScope, task: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await task()


async def _close_backend(service: Service) -> None:
    try:
        await service.backend.aclose()
    except Exception:
        log.exception("closing the backend failed")


# -- the model loader ------------------------------------------------------------------


class ConversionFailed(Exception):
    pass


async def load_model(service: Service) -> None:
    """Convert when needed, load, retry with doubling back-off; never raises."""
    settings = service.settings
    state, metrics = service.state, service.metrics
    if settings.server.slow_start_s > 0:
        log.info("slow start: waiting %.1f s before loading", settings.server.slow_start_s)
        state.mark_loading("slow start")
        await trio.sleep(settings.server.slow_start_s)
    attempts = 1 + settings.model.load_retries
    delay = settings.model.load_retry_backoff_s
    for attempt in range(1, attempts + 1):
        started = time.perf_counter()
        reason = await _load_once(service, attempt, attempts)
        # Loading runs on a thread that a stop signal cannot interrupt; a load that ends
        # after one is not announced as ready.
        await trio.lowlevel.checkpoint_if_cancelled()
        if reason is None:
            seconds = time.perf_counter() - started
            info = service.backend.info
            state.mark_ready(info)
            metrics.set_model_state("ready", seconds)
            log.info(
                "model ready in %.1f s: %s on %s (%s%s), context %d tokens",
                seconds,
                info.model_name,
                info.device,
                info.compute_type,
                describe_numerics(info),
                info.context_limit,
                extra={"load_seconds": round(seconds, 2), "backend": info.backend},
            )
            return
        if attempt < attempts and reason.retryable:
            state.mark_failed(
                f"{reason} (attempt {attempt} of {attempts}, retrying in {delay:g} s)",
                will_retry=True,
            )
            metrics.set_model_state("failed", None)
            log.warning(
                "model load failed (attempt %d of %d): %s; retrying in %g s",
                attempt,
                attempts,
                reason,
                delay,
            )
            await trio.sleep(delay)
            delay *= 2
        else:
            state.mark_failed(str(reason))
            metrics.set_model_state("failed", None)
            log.error(
                "model failed to load after %d attempt%s: %s; serving health only",
                attempt,
                "" if attempt == 1 else "s",
                reason,
            )
            return


@dataclass(frozen=True, slots=True)
class LoadFailure:
    reason: str
    retryable: bool = True  # False: loading again cannot help (numerics rejected)

    def __str__(self) -> str:
        return self.reason


def describe_numerics(info: ModelInfo) -> str:
    """ ", numerics verified (NLL ratio 1.03, ...)" for the ready log line."""
    numerics = info.numerics
    if numerics is None:
        return ""
    if numerics.nll_ratio is None or numerics.agreement_ratio is None:
        return f", numerics unverified: {numerics.warning}"
    verdict = "verified" if numerics.verified else f"UNVERIFIED ({numerics.warning})"
    kernels = "".join(f", {key}={value}" for key, value in sorted(numerics.env.items()))
    return (
        f"{kernels}, chosen by {numerics.chosen_by}, numerics {verdict}: NLL ratio "
        f"{numerics.nll_ratio:.3f}, greedy agreement {numerics.agreement_ratio:.2f} of float32's"
    )


async def _load_once(service: Service, attempt: int, attempts: int) -> LoadFailure | None:
    """One attempt; returns None on success, else why it failed."""
    settings = service.settings
    state = service.state
    retry = f" (attempt {attempt} of {attempts})" if attempt > 1 else ""
    try:
        if settings.model.convert_on_start and settings.backend == "ct2":
            await _convert_if_missing(service, retry)
        elif settings.model.convert_on_start and settings.backend == "llama_cpp":
            await _record_gguf_reference_if_missing(service, retry)
        state.mark_loading(f"loading the model{retry}")
        service.metrics.set_model_state("loading", None)
        log.info("loading model %s%s", settings.model.name, retry)
        await service.backend.load()
    except BackendLoadError as exc:
        return LoadFailure(str(exc) or type(exc).__name__, exc.retryable)
    except ConversionFailed as exc:
        return LoadFailure(str(exc) or type(exc).__name__)
    except Exception as exc:
        log.exception("unexpected error while loading the model")
        return LoadFailure(describe_error(exc))
    return None


async def _convert_if_missing(service: Service, retry: str) -> None:
    from llm_local.convert.api import find_converted, has_reference

    settings = service.settings
    model = settings.model
    model_dir = find_converted(settings)
    if model_dir is not None and has_reference(model_dir):
        return
    if model_dir is None:
        service.state.mark_loading(f"converting the model{retry}")
        log.info("model %s is not converted yet: converting (llm-local convert)", model.name)
    else:
        service.state.mark_loading(f"recording the model's numerics reference{retry}")
        log.info("model %s has no numerics reference yet: recording it", model.name)
    returncode, last_line = await _run_showing_stderr(_convert_command(settings))
    if returncode != 0:
        why = last_line or f"exit status {returncode}; see the converter's output in the log"
        raise ConversionFailed(f"converting {settings.model.name!r} failed: {why}")
    if find_converted(settings) is None:
        raise ConversionFailed(
            f"`llm-local convert` finished but {settings.model.name!r} is still not in "
            f"{settings.model.cache_dir}"
        )


async def _record_gguf_reference_if_missing(service: Service, retry: str) -> None:
    """The llama_cpp backend serves the GGUF as is; what `llm-local convert` prepares for
    it is the numerics reference its check at load compares with. Without one the model
    would be served unverified: record it first, as `convert` would. A failure to record
    is no reason to refuse the model: it is then served unverified, saying why."""
    from llm_local.convert.gguf_reference import find_gguf_reference

    settings = service.settings
    if not settings.numerics.check_at_load or find_gguf_reference(settings) is not None:
        return
    service.state.mark_loading(f"recording the GGUF's numerics reference{retry}")
    log.info(
        "model %s has no numerics reference yet: recording it (llm-local convert)",
        settings.model.name,
    )
    returncode, last_line = await _run_showing_stderr(
        _convert_command(settings), env_overrides={"LLM_LOCAL_SERVICE_BACKEND": "llama_cpp"}
    )
    if returncode != 0:
        log.warning(
            "recording the numerics reference of %s failed (%s): the model will be served "
            "unverified; run `llm-local convert` to retry",
            settings.model.name,
            last_line or f"exit status {returncode}",
        )


def _convert_command(settings: AppSettings) -> list[str]:
    """`llm-local convert` in a child process: the converter's torch and the float weights
    it reads would otherwise stay in the server's memory for good. The child gets the
    exact model, revision, quantization and cache this server looks in, whatever layer of
    settings they came from."""
    model = settings.model
    command = [
        sys.executable, "-m", "llm_local", "convert",
        "--env", settings.env,
        "--model", model.name,
        "--quantization", model.quantization,
        "--cache-dir", str(model.cache_dir),
    ]  # fmt: skip
    if model.revision:
        command += ["--revision", model.revision]
    return command


async def _run_showing_stderr(
    command: list[str], env_overrides: dict[str, str] | None = None
) -> tuple[int, str | None]:
    """Run `command` (our environment, plus `env_overrides`), passing its stderr
    (progress, errors) through to ours as it comes; return its exit status and the last
    line it wrote there (the error, on failure)."""
    tail = b""
    env = {**os.environ, **env_overrides} if env_overrides else None
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, stderr=subprocess.PIPE, check=False, env=env)
        )
        assert process.stderr is not None
        async for data in process.stderr:
            sys.stderr.buffer.write(data)
            sys.stderr.flush()
            tail = (tail + data)[-4096:]
    lines = [line.strip() for line in tail.decode(errors="replace").replace("\r", "\n").split("\n")]
    last_line = next((line for line in reversed(lines) if line), None)
    # run_process has waited for the exit: the status is known.
    return int(process.returncode or 0), last_line
