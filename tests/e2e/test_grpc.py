"""The gateway's view: a real `llm-local serve` on the real model, called with grpcio.

One server for the whole module per backend (ct2 and llama_cpp, only `backend` differs;
default capacity, ENV=test: greedy SmolLM2-135M).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2
from tests.e2e.conftest import SUITE_BACKENDS, backend_env

pytestmark = [pytest.mark.e2e, pytest.mark.model]

QUESTION = "What is the capital of France? Answer in one sentence."
# Greedy SmolLM2 counts on and on (in float32 and int8; "Count from 1 to 1000" stops
# after ~120 tokens in float32): a generation that outlives any test's patience.
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
RAW_PIECES = ("Ġ", "▁", "Ċ", "<0x", "<|im_end|>", "<|im_start|>")


@pytest.fixture(scope="module", params=SUITE_BACKENDS)
def server(serve: Callable[..., Any], request: pytest.FixtureRequest) -> Any:
    return serve(env=backend_env(request.param))


@pytest.fixture(scope="module")
def channel(server: Any) -> grpc.Channel:
    return server.channel()


def request(prompt: str = QUESTION, **params: Any) -> llama_pb2.GenerateStreamRequest:
    message = llama_pb2.GenerateStreamRequest(user_prompt=prompt)
    if params:
        message.params.CopyFrom(llama_pb2.GenerationParams(**params))
    return message


def test_llama_answers_paris_in_utf8_bytes_then_one_finish(channel: grpc.Channel, rpc: Any) -> None:
    responses = list(rpc.llama(channel, request(max_new_tokens=24)))

    kinds = [response.WhichOneof("type") for response in responses]
    assert kinds == ["token"] * (len(kinds) - 1) + ["finish_details"]
    text = b"".join(response.token for response in responses[:-1]).decode("utf-8")
    assert "Paris" in text
    details = responses[-1].finish_details
    assert details.finish_reason == "stop"
    assert details.prompt_tokens > 10
    assert 0 < details.completion_tokens <= 24


def test_local_answers_paris_in_readable_text(channel: grpc.Channel, rpc: Any) -> None:
    tokens = [response.token for response in rpc.local(channel, QUESTION)]

    assert "Paris" in "".join(tokens)
    for token in tokens:
        assert token
        assert not any(piece in token for piece in RAW_PIECES), token


def test_non_ascii_text_arrives_as_valid_utf8(channel: grpc.Channel, rpc: Any) -> None:
    # SmolLM2 answers with emoji (several byte-level tokens per character) and katakana.
    prompt = "Reply with an emoji of a smiling face."

    responses = list(rpc.llama(channel, request(prompt, max_new_tokens=16)))

    chunks = [response.token for response in responses[:-1]]
    text = b"".join(chunks).decode("utf-8")  # raises if any character was split badly
    assert text
    assert any(ord(character) > 127 for character in text)
    assert responses[-1].finish_details.completion_tokens > 0


def test_parameters_are_applied(channel: grpc.Channel, rpc: Any) -> None:
    responses = list(rpc.llama(channel, request(ENDLESS, max_new_tokens=5)))
    stopped = list(rpc.llama(channel, request(QUESTION, stop_sequences=[" is"])))

    assert responses[-1].finish_details.finish_reason == "length"
    assert responses[-1].finish_details.completion_tokens == 5
    stopped_text = b"".join(r.token for r in stopped[:-1]).decode()
    assert stopped_text == "The capital of France"
    assert stopped[-1].finish_details.finish_reason == "stop"


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (request(""), "user_prompt"),
        (request(max_new_tokens=0), "params.max_new_tokens"),
        (request(max_new_tokens=1_000_000), "params.max_new_tokens"),
        (request(top_p=1.5), "params.top_p"),
        (request(temperature=-0.5), "params.temperature"),
        (request(top_k=-1), "params.top_k"),
        (request(repetition_penalty=0.0), "params.repetition_penalty"),
        (request(stop_sequences=[""]), "params.stop_sequences[0]"),
        (
            llama_pb2.GenerateStreamRequest(
                user_prompt="Hi", history=[llama_pb2.ConversationTurn(role="wizard", content="x")]
            ),
            "history[0].role",
        ),
        (request("Paris " * 20_000), "user_prompt"),  # longer than the model's context
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_input_is_invalid_argument_naming_the_field(
    channel: grpc.Channel, rpc: Any, message: llama_pb2.GenerateStreamRequest, field: str
) -> None:
    error = rpc.error(lambda: list(rpc.llama(channel, message)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: "), error.details()


def test_local_bad_input_names_the_prompt(channel: grpc.Channel, rpc: Any) -> None:
    empty = rpc.error(lambda: list(rpc.local(channel, "")))
    too_long = rpc.error(lambda: list(rpc.local(channel, "Paris " * 20_000)))

    for error in (empty, too_long):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("prompt: "), error.details()


def test_deadline_stops_generation_and_the_cpu_falls_idle(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    error = rpc.error(
        lambda: list(rpc.llama(channel, request(ENDLESS, max_new_tokens=2000), timeout=0.2))
    )

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.5)  # let the cancellation reach the decoding thread
    before = server.cpu_seconds()
    time.sleep(1.5)
    used = server.cpu_seconds() - before
    # Decoding would use about one core (1.5 s of CPU); idle, nearly nothing.
    assert used < 0.4, f"the server used {used:.2f} s of CPU in 1.5 s after the deadline"


def test_twenty_cancelled_streams_leave_no_generation_running(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    calls = [rpc.llama(channel, request(ENDLESS, max_new_tokens=1000)) for _ in range(20)]
    server.wait_for_metric("llm_local_requests_running", 20)  # all admitted
    next(calls[0])  # and decoding

    for call in calls:
        call.cancel()

    server.wait_for_metric("llm_local_requests_running", 0)
    server.wait_for_metric("llm_local_backend_running", 0)
    server.wait_for_metric("llm_local_backend_queued", 0)
    follow_up = list(rpc.llama(channel, request(max_new_tokens=24), timeout=30))
    assert "Paris" in b"".join(r.token for r in follow_up[:-1]).decode()
    for call in calls:
        assert call.code() == grpc.StatusCode.CANCELLED


def test_health_says_serving_for_every_service(channel: grpc.Channel, rpc: Any) -> None:
    for name in ("", "sentiric.llm.v1.LlamaService", "sentiric.llm.v1.LLMLocalService"):
        assert rpc.health(channel, name) == "SERVING"


REFLECTION_CLIENT = """
import sys
import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf.descriptor_pool import DescriptorPool

with grpc.insecure_channel(sys.argv[1]) as channel:
    database = ProtoReflectionDescriptorDatabase(channel)
    for name in database.get_services():
        print(name)
    pool = DescriptorPool(database)
    service = pool.FindServiceByName("sentiric.llm.v1.LlamaService")
    method = service.methods_by_name["GenerateStream"]
    print("method", method.output_type.full_name, method.server_streaming)
"""


def test_reflection_works_with_grpcio_reflection_client(
    server: Any, client_script: Callable[..., str]
) -> None:
    output = client_script(REFLECTION_CLIENT, server.grpc_target).splitlines()

    assert "sentiric.llm.v1.LlamaService" in output
    assert "sentiric.llm.v1.LLMLocalService" in output
    assert "grpc.health.v1.Health" in output
    assert "method sentiric.llm.v1.GenerateStreamResponse True" in output


def test_tenant_and_trace_ids_are_logged(server: Any, channel: grpc.Channel, rpc: Any) -> None:
    metadata = [("x-tenant-id", "tenant-e2e"), ("x-trace-id", "trace-e2e-1")]

    list(rpc.llama(channel, request(max_new_tokens=4), metadata=metadata))

    deadline = time.monotonic() + 5
    while "trace=trace-e2e-1" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = [line for line in server.log_text().splitlines() if "trace=trace-e2e-1" in line]
    assert "tenant=tenant-e2e" in line
    assert "status=OK" in line
    assert "completion_tokens=4" in line


def generate_command(server: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_local", "generate", *args, "--port", str(server.grpc_port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_generate_command_streams_the_answer(server: Any) -> None:
    llama = generate_command(server, QUESTION, "--max-new-tokens", "24", "--tenant-id", "cli")
    local = generate_command(server, QUESTION, "--service", "local")

    assert llama.returncode == 0, llama.stderr
    assert "Paris" in llama.stdout
    assert "finish_reason=stop" in llama.stderr
    assert "completion_tokens=" in llama.stderr
    assert local.returncode == 0, local.stderr
    assert "Paris" in local.stdout


def test_generate_command_reports_the_status_and_exits_non_zero(server: Any) -> None:
    result = generate_command(server, "", "--max-new-tokens", "4")

    assert result.returncode == 1
    assert "INVALID_ARGUMENT: user_prompt: must not be empty" in result.stderr


def test_metrics_show_the_measured_costs_and_the_scheduling_decisions(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    list(rpc.llama(channel, request(max_new_tokens=8), timeout=30))
    # Measured while decoding (a prior before): a positive time per step and per token.
    for name in ("llm_local_backend_step_seconds", "llm_local_backend_prefill_token_seconds"):
        value = server.metric(name)
        assert value is not None and value > 0, name
    for name in (
        "llm_local_backend_merges_total",
        "llm_local_backend_extra_lanes_total",
        "llm_local_backend_expected_wait_seconds",
        "llm_local_backend_prefix_cache_bytes",
        "llm_local_backend_prefix_cache_entries",
    ):
        assert server.metric(name) is not None, name
