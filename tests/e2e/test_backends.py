"""The same requests against every real backend: ct2 (the converted model), transformers
(the same model unconverted, decoded by continuous batching) and llama_cpp (the GGUF as
is, decoded by our continuous-batching scheduler over llama.cpp's library).

The servers start from one settings file; the only difference between them is the
`backend` setting (LLM_LOCAL_SERVICE_BACKEND). Each is a real `llm-local serve` on the real
SmolLM2-135M in float32 (ENV=test: greedy), with room for three generations and no
queue. Every test below runs once per backend.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

BACKENDS = ("ct2", "transformers", "llama_cpp")
# What each computes: ct2 and transformers float32 (ENV=test), llama.cpp the GGUF's weights.
COMPUTE_TYPES = {"ct2": "float32", "transformers": "float32", "llama_cpp": "q4_1"}
# Backends that honour a repetition penalty and a seed per request.
FULL_SAMPLING = ("ct2", "llama_cpp")
QUESTION = "What is the capital of France? Answer in one sentence."
# Greedy SmolLM2 counts on and on: a generation that outlives any test's patience.
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
CAPACITY = 3
LOAD_TIMEOUT_S = 240.0  # transformers dequantizes the GGUF at every start
SETTINGS = f"""
[test.capacity]
max_concurrent = {CAPACITY}
max_queued = 0

[test.server]
slow_start_s = 2.0  # so that even the fast ct2 load is seen "loading"
"""


@dataclass
class Started:
    server: Any
    http_while_loading: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    grpc_while_loading: list[str] = field(default_factory=list)


def watch_until_ready(server: Any, rpc: Any) -> Started:
    started = Started(server)
    channel = server.channel()
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        # gRPC first, HTTP second: a server goes from loading to ready once, so a gRPC
        # answer followed by a "not ready" HTTP answer was given while loading. (The other
        # order counted a gRPC "SERVING" given just after the model became ready.)
        grpc_status = rpc.health(channel)
        status, body = server.http_json("/health")
        if status == 200:
            return started
        started.http_while_loading.append((status, body))
        started.grpc_while_loading.append(grpc_status)
        time.sleep(0.1)
    raise AssertionError(f"not ready in {LOAD_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def servers(
    serve: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory, rpc: Any
) -> dict[str, Started]:
    settings_file = tmp_path_factory.mktemp("backends") / "settings.toml"
    settings_file.write_text(SETTINGS)
    started: dict[str, Started] = {}
    # One at a time, each watched from the moment it listens: a server started while
    # another one is being watched could finish loading unseen on a busy machine.
    for backend in BACKENDS:
        server = serve(
            env={
                "LLM_LOCAL_SETTINGS_FILES": str(settings_file),
                "LLM_LOCAL_SERVICE_BACKEND": backend,
            },
            wait="listening",
        )
        started[backend] = watch_until_ready(server, rpc)
    return started


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(servers: dict[str, Started], backend: str) -> Any:
    return servers[backend].server


@pytest.fixture(scope="module")
def channel(server: Any) -> grpc.Channel:
    return server.channel()


def request(prompt: str = QUESTION, **params: Any) -> llama_pb2.GenerateStreamRequest:
    message = llama_pb2.GenerateStreamRequest(user_prompt=prompt)
    if params:
        message.params.CopyFrom(llama_pb2.GenerationParams(**params))
    return message


def answer(responses: list[Any]) -> str:
    return b"".join(response.token for response in responses[:-1]).decode("utf-8")


def post_json(server: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(server.url(path), data=data, headers=headers), timeout=120
        ) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_switching_backends_is_one_setting(servers: dict[str, Started]) -> None:
    configs = {name: started.server.http_json("/config")[1] for name, started in servers.items()}

    def without_backend_and_ports(config: dict[str, Any]) -> dict[str, Any]:
        settings = dict(config["settings"])
        settings.pop("backend")
        settings["server"] = {
            key: value for key, value in settings["server"].items() if not key.endswith("_port")
        }
        return settings

    ct2 = configs["ct2"]
    for name, config in configs.items():
        assert without_backend_and_ports(config) == without_backend_and_ports(ct2)
        loaded = config["effective"]["loaded_model"]
        assert loaded["backend"] == name
        assert loaded["model_name"] == ct2["effective"]["loaded_model"]["model_name"]
        assert loaded["compute_type"] == COMPUTE_TYPES[name]
        full = name in FULL_SAMPLING
        assert loaded["sampling_support"] == {"repetition_penalty": full, "seed": full}


def test_health_says_loading_until_the_model_is_ready(
    servers: dict[str, Started], backend: str, channel: grpc.Channel, rpc: Any
) -> None:
    started = servers[backend]

    assert started.http_while_loading, "never saw the server loading"
    for status, body in started.http_while_loading:
        assert status == 503
        assert body["model_ready"] is False
    assert set(started.grpc_while_loading) == {"NOT_SERVING"}
    status, body = started.server.http_json("/health")
    assert (status, body["backend"]) == (200, backend)
    assert rpc.health(channel) == "SERVING"


def test_answers_paris_and_stops_at_the_end_of_turn(channel: grpc.Channel, rpc: Any) -> None:
    responses = list(rpc.llama(channel, request(max_new_tokens=24)))

    assert "Paris" in answer(responses)
    details = responses[-1].finish_details
    assert details.finish_reason == "stop"
    assert 0 < details.completion_tokens <= 24


def test_stop_sequences_and_max_new_tokens_end_the_answer(channel: grpc.Channel, rpc: Any) -> None:
    stopped = list(rpc.llama(channel, request(stop_sequences=[" is"], max_new_tokens=24)))
    cut = list(rpc.llama(channel, request(ENDLESS, max_new_tokens=5)))

    assert answer(stopped) == "The capital of France"
    assert stopped[-1].finish_details.finish_reason == "stop"
    assert cut[-1].finish_details.finish_reason == "length"
    assert cut[-1].finish_details.completion_tokens == 5


def test_openai_chat_answers_paris(server: Any) -> None:
    status, body = post_json(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24},
    )

    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_sampling_options_the_backend_cannot_honour_are_refused_by_name(
    backend: str, server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    penalised = request(max_new_tokens=4, repetition_penalty=1.3)
    seeded = request(max_new_tokens=4, temperature=0.8, seed=7)
    openai_body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 4,
        "repetition_penalty": 1.3,
    }

    if backend in FULL_SAMPLING:  # CTranslate2 and llama.cpp's samplers apply both
        assert list(rpc.llama(channel, penalised))[-1].finish_details.completion_tokens > 0
        assert list(rpc.llama(channel, seeded))[-1].finish_details.completion_tokens > 0
        assert post_json(server, "/v1/chat/completions", openai_body)[0] == 200
        return
    for message, field_name in ((penalised, "params.repetition_penalty"), (seeded, "params.seed")):
        error = rpc.error(lambda message=message: list(rpc.llama(channel, message)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(f"{field_name}: this backend cannot"), error.details()
    status, body = post_json(server, "/v1/chat/completions", openai_body)
    assert status == 400
    assert body["error"]["param"] == "repetition_penalty"
    assert server.metric("llm_local_backend_running") == 0  # refused before admission


def test_a_lora_adapter_is_refused_by_name_where_the_backend_cannot_apply_one(
    backend: str, server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    message = llama_pb2.GenerateStreamRequest(user_prompt=QUESTION, lora_adapter_id="support-v2")

    error = rpc.error(lambda: list(rpc.llama(channel, message)))

    if backend in ("llama_cpp", "transformers"):  # they can; none is configured here
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "'support-v2'" in error.details()
        return
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"lora_adapter_id: the {backend} backend cannot apply LoRA adapters; backends that "
        "can: llama_cpp, transformers (leave lora_adapter_id unset here)"
    )
    status, body = post_json(
        server,
        "/v1/chat/completions",
        {
            "model": "SmolLM2-135M-Instruct.Q4_1:support-v2",
            "messages": [{"role": "user", "content": "Hi"}],
        },
    )
    assert (status, body["error"]["param"]) == (400, "model")


def test_deadline_stops_the_generation(server: Any, channel: grpc.Channel, rpc: Any) -> None:
    error = rpc.error(
        lambda: list(rpc.llama(channel, request(ENDLESS, max_new_tokens=2000), timeout=1.0))
    )

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_for_metric("llm_local_backend_running", 0)
    before = server.cpu_seconds()
    time.sleep(1.0)
    used = server.cpu_seconds() - before
    # Decoding would use about a core (1 s of CPU); idle, nearly nothing.
    assert used < 0.3, f"the server used {used:.2f} s of CPU in 1 s after the deadline"


def test_over_capacity_is_refused_and_cancelled_streams_free_the_backend(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    running = [rpc.llama(channel, request(ENDLESS, max_new_tokens=1500)) for _ in range(CAPACITY)]
    server.wait_for_metric("llm_local_requests_running", CAPACITY, limit_s=60)
    for call in running:
        next(call)  # every one decoding

    refused_at = time.monotonic()
    refused = rpc.error(lambda: list(rpc.llama(channel, request(max_new_tokens=4))))
    refused_after = time.monotonic() - refused_at
    for call in running:
        call.cancel()

    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing queued: at once, not after the 30 s queue timeout (a loose bound: a loaded
    # 2-core machine may take a second or two for any call).
    assert refused_after < 15.0
    server.wait_for_metric("llm_local_backend_running", 0)
    server.wait_for_metric("llm_local_backend_queued", 0)
    server.wait_for_metric("llm_local_requests_running", 0)
    for call in running:
        assert call.code() == grpc.StatusCode.CANCELLED
    follow_up = list(rpc.llama(channel, request(max_new_tokens=3)))  # the backend serves on
    assert follow_up[-1].finish_details.completion_tokens == 3
