"""Real `llm-local serve` processes for end-to-end tests, and grpcio helpers to call them.

`serve` (module scope) starts servers: ``server = serve(env={...}, wait="ready")``. Each
gets free ports (passed by environment variables, like any deployment), ENV=test (the
converted SmolLM2 test model, greedy decoding), a log file, and is stopped (SIGTERM,
then SIGKILL) when the module ends. A failing test gets the last lines of every live
server's log in its report. The `rpc` fixture (tests/conftest.py) makes the calls.

The client is the official grpcio, an implementation of gRPC independent of the
grpclib server. Its health and reflection modules clash with grpclib's in one process
(same protobuf names, see tests/transport/grpc/conftest.py), so health calls use
grpclib's message classes through grpcio's generic API, and grpcio's own reflection
client runs in a child process (`run_client_script`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # import + model load; a cold conversion is `make test`'s job
LOG_TAIL_LINES = 80
Wait = Literal["ready", "listening", "none"]
# The suites that are backend-neutral (the gateway's gRPC view, the OpenAI API) run on
# these, one module-scoped server per backend, from the same settings with only `backend`
# changed. transformers is left to test_backends.py: it dequantizes the GGUF at every start.
SUITE_BACKENDS = ("ct2", "llama_cpp")


def backend_env(backend: str) -> dict[str, str]:
    """The one setting that differs between a suite's servers."""
    return {"LLM_LOCAL_SERVICE_BACKEND": backend}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A running `llm-local serve`: its ports, process, log file and environment."""

    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """(status, body) of a GET on the HTTP port; error statuses are returned too."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def http_json(self, path: str) -> tuple[int, Any]:
        status, body = self.http_get(path)
        return status, json.loads(body)

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """A sample's value from /metrics, or None when absent."""
        from prometheus_client.parser import text_string_to_metric_families

        _, body = self.http_get("/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(key) == value for key, value in (labels or {}).items()
                ):
                    return float(sample.value)
        return None

    def wait_for_metric(
        self,
        name: str,
        wanted: float,
        labels: Mapping[str, str] | None = None,
        limit_s: float = 15.0,
    ) -> None:
        """Poll /metrics until the sample equals `wanted`; fail after `limit_s`."""
        deadline = time.monotonic() + limit_s
        while self.metric(name, labels) != wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        value = self.metric(name, labels)
        assert value == wanted, f"{name} is {value}, not {wanted}"

    def channel(
        self, credentials: grpc.ChannelCredentials | None = None, **options: Any
    ) -> grpc.Channel:
        """A grpcio channel to the gRPC port, closed when the server stops."""
        pairs = list(options.items())
        channel = (
            grpc.insecure_channel(self.grpc_target, options=pairs)
            if credentials is None
            else grpc.secure_channel(self.grpc_target, credentials, options=pairs)
        )
        self._channels.append(channel)
        return channel

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def wait(self, mode: Wait, timeout: float = START_TIMEOUT_S) -> None:
        """ "listening": the HTTP port answers; "ready": /health says 200 (model loaded)."""
        if mode == "none":
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llm-local serve exited with status {self.process.returncode} while "
                    f"starting; its log ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                status, _ = self.http_get("/health", timeout=1.0)
            except OSError:
                status = None
            if status is not None and (mode == "listening" or status == 200):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"llm-local serve not {mode} after {timeout:.0f} s; its log ({self.log_path}):\n"
            f"{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the exit status (SIGKILL after `timeout`)."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


_LIVE: list[ServerProcess] = []


def start_server_process(
    log_dir: Path,
    env: Mapping[str, str | None] | None = None,
    wait: Wait = "ready",
    preexec_fn: Callable[[], None] | None = None,
) -> ServerProcess:
    """Start `python -m llm_local serve` with ENV=test, free ports and `env` on top
    (a variable given as None is left unset); `preexec_fn` runs in the child before
    it starts (e.g. to drop privileges)."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    environment = {
        **os.environ,
        "ENV": "test",
        "PYTHONUNBUFFERED": "1",
        "LLM_LOCAL_SERVICE_SERVER__HOST": "127.0.0.1",
        "LLM_LOCAL_SERVICE_SERVER__HTTP_PORT": str(http_port),
        "LLM_LOCAL_SERVICE_SERVER__GRPC_PORT": str(grpc_port),
        "LLM_LOCAL_SERVICE_SERVER__METRICS_PORT": str(metrics_port),
    }
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    log_path = log_dir / f"serve-{grpc_port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_local", "serve"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    server = ServerProcess(
        host="127.0.0.1",
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        process=process,
        log_path=log_path,
        env=environment,
    )
    _LIVE.append(server)
    try:
        server.wait(wait)
    except BaseException:
        server.stop(signal.SIGKILL)
        _LIVE.remove(server)
        raise
    return server


def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` (generous:
    the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


ServeFactory = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeFactory]:
    """`serve(env={"LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT": "2"}, wait="ready")`."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("serve-logs")

    def start(
        env: Mapping[str, str | None] | None = None,
        wait: Wait = "ready",
        preexec_fn: Callable[[], None] | None = None,
    ) -> ServerProcess:
        server = start_server_process(log_dir, env, wait, preexec_fn)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        if server in _LIVE:
            _LIVE.remove(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _LIVE:
            report.sections.append(
                (f"llm-local serve log (pid {server.pid}, {server.log_path})", server.log_tail())
            )


def run_client_script(script: str, *args: str, timeout: float = 30.0) -> str:
    """Run a Python client in a child process (for grpcio modules that cannot share a
    process with grpclib's); returns its stdout, fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"client script failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="session")
def client_script() -> Callable[..., str]:
    return run_client_script
