"""The real server: `llm-local serve` (ENV=test) in a child process, driven over gRPC.

The client is the official grpcio one in its asyncio flavour: one channel (one HTTP/2
connection, as a gateway holds), N closed-loop streams multiplexed on it. The server
cannot be told to ignore the end-of-sequence token, so each request reports the
tokens it really generated (`FinishDetails.completion_tokens`) and rates use those.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from bench import served
from bench.config import BenchConfig
from bench.loops import measure_server_levels
from bench.models import server_model_available
from bench.processes import ServerProcess, environment_with, free_port, wait_until
from bench.records import SERVER_VARIANTS, RequestRecord, ServerVariant
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped

METHOD = "/sentiric.llm.v1.LlamaService/GenerateStream"
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
SERVICE_NAME = "sentiric.llm.v1.LlamaService"
TENANT = (("x-tenant-id", "bench"),)
# A first start with compute_type auto measures every candidate on this machine (cached).
START_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 300.0


def server_environment(config: BenchConfig, grpc_port: int) -> dict[str, str]:
    """ENV=test settings with free ports, room for the benchmark's lengths and streams."""
    most_streams = max(config.streams)
    return environment_with(
        {
            "ENV": "test",
            "LLM_LOCAL_SERVICE_SERVER__GRPC_PORT": str(grpc_port),
            "LLM_LOCAL_SERVICE_SERVER__HTTP_PORT": "0",
            "LLM_LOCAL_SERVICE_SERVER__METRICS_PORT": "0",
            "LLM_LOCAL_SERVICE_GENERATION__MAX_NEW_TOKENS_LIMIT": str(
                max(2048, config.max_new_tokens)
            ),
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT": str(max(64, most_streams)),
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED": str(max(128, most_streams)),
            # The benchmark measures serving; converting belongs to `make bench`'s first step.
            "LLM_LOCAL_SERVICE_MODEL__CONVERT_ON_START": "false",
            # What a user runs (bench/served.py): auto compute type and threads, checked
            # at load (the test environment's float32 is for answer-text tests). A
            # setting given in the environment (make gpu-check's compute type) wins.
            **{
                name: os.environ.get(name, value) for name, value in served.DEFAULT_SETTINGS.items()
            },
        }
    )


def run(
    config: BenchConfig,
    context: ScenarioContext,
    collect: Collect,
    variant: ServerVariant = SERVER_VARIANTS[0],
) -> None:
    with serving(config, context, variant, variant.scenario) as (server, port):
        asyncio.run(_measure(config, context, server, port, collect, variant.scenario))
        context.details[variant.scenario]["exit_status"] = server.stop()


@contextlib.contextmanager
def serving(
    config: BenchConfig, context: ScenarioContext, variant: ServerVariant, name: str
) -> Iterator[tuple[ServerProcess, int]]:
    """`llm-local serve` with the variant's settings, ready: (process, gRPC port). Its
    settings go into the report as context.details[name]."""
    if not server_model_available():
        raise ScenarioSkipped(
            "the ENV=test model is not in the cache: run `ENV=test llm-local convert` first"
        )
    import grpc

    overrides = dict(variant.environment)
    port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "llm_local", "serve"]
    environment = {
        **server_environment(config, port),
        "LLM_LOCAL_SERVICE_SERVER__HTTP_PORT": str(http_port),
        **overrides,
    }
    context.details[name] = {
        "grpcio": grpc.__version__,
        **server_settings(environment),
        **({"overrides": overrides} if overrides else {}),
    }
    with ServerProcess(command, environment, context.run_dir / f"{name}-server.log") as server:
        wait_until(lambda: _serving(port), server, START_TIMEOUT_S, "llm-local serve")
        what = served.served(_get_json(http_port, "/health"), _get_json(http_port, "/config"))
        context.details[name]["served"] = what
        context.log(
            f"  llm-local serve is ready on port {port} (pid {server.pid}): "
            f"{what['backend']} {what['compute_type']}, threads {what['threads']}, numerics "
            + ("verified" if what["numerics_verified"] else "NOT verified")
        )
        yield server, port


def server_settings(environment: Mapping[str, str]) -> dict[str, object]:
    """The settings a child started with `environment` runs with (ENV=test, the
    benchmark's overrides, a variant's)."""
    from llm_local.settings.loader import load_settings

    with _environment(environment):
        settings = load_settings(env="test")
    runtime = settings.runtime
    return {
        "compute_type": runtime.compute_type,
        "quantization": settings.model.quantization,
        "inter_threads": runtime.inter_threads,
        "intra_threads": runtime.intra_threads,
        "max_batch_size": runtime.max_batch_size,
        "batch_wait_ms": runtime.batch_wait_ms,
        "busy_batch_wait_ms": runtime.busy_batch_wait_ms,
        "ttft_target_ms": runtime.ttft_target_ms,
        "prefix_cache_mb": runtime.prefix_cache_mb,
        "log_level": settings.logging.level,
    }


@contextlib.contextmanager
def _environment(overrides: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `overrides` for the time of the block (the settings loader reads it)."""
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _get_json(port: int, path: str) -> dict[str, Any]:
    """A JSON document from the server's HTTP port ({} when it cannot be had)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            data = json.loads(answer.read())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _serving(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            HEALTH_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            answer = check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def _measure(
    config: BenchConfig,
    context: ScenarioContext,
    server: ServerProcess,
    port: int,
    collect: Collect,
    scenario: str,
) -> None:
    import grpc

    from llm_local.proto.sentiric.llm.v1 import llama_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        generate = generate_method(channel)

        async def send(client: int, sequence: int, max_new_tokens: int) -> RequestRecord:
            request = llama_pb2.GenerateStreamRequest(
                user_prompt=config.prompts[config.prompt_for(client, sequence)],
                params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0),
            )
            return await one_request(generate, request, client)

        await measure_server_levels(config, scenario, server, send, collect)


def generate_method(channel: Any) -> Any:
    """LlamaService/GenerateStream on a grpc.aio channel."""
    from llm_local.proto.sentiric.llm.v1 import llama_pb2

    return channel.unary_stream(
        METHOD,
        request_serializer=llama_pb2.GenerateStreamRequest.SerializeToString,
        response_deserializer=llama_pb2.GenerateStreamResponse.FromString,
    )


async def one_request(generate: Any, request: Any, client: int) -> RequestRecord:
    import grpc

    arrivals: list[float] = []
    tokens: int | None = None
    reason: str | None = None
    error: str | None = None
    start = time.perf_counter()
    try:
        call = generate(request, metadata=TENANT, timeout=REQUEST_TIMEOUT_S)
        async for response in call:
            kind = response.WhichOneof("type")
            if kind == "token":
                arrivals.append(time.perf_counter())
            elif kind == "finish_details":
                tokens = response.finish_details.completion_tokens
                reason = response.finish_details.finish_reason
    except grpc.aio.AioRpcError as exc:
        error = f"{exc.code().name}: {exc.details()}"
    end = time.perf_counter()
    if error is None and tokens is None:
        error = "the stream ended without finish_details"
    return RequestRecord.streamed(
        client, start, end, arrivals, tokens=tokens, finish_reason=reason, error=error
    )
