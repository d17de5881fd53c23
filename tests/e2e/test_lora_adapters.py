"""LoRA adapters per request on a real server (`lora_adapter_id`, OpenAI `model`), on each
backend that applies them: llama_cpp and transformers, one server per backend.

The adapters are the suite's own (tests/lora_adapters.py: a few seeded PEFT steps on
SmolLM2 that make it answer as a pirate or as a robot). The server gets them as PEFT
directories in its [adapters] settings. llama_cpp prepares each the way `llm-local convert`
would (a GGUF LoRA in the model cache) and applies them per request to the one base GGUF;
transformers injects them with PEFT into the float32 model it dequantized from the same
GGUF and applies each request's own per token (requests with different adapters share a
step).

What "right" means here: greedy, the answer with an adapter equals the answer PEFT's
`merge_and_unload` model gives (the base model's dequantized float32 weights with the
adapter merged in, decoded by transformers when the adapter was made). On llama_cpp that
compares its Q4_1 base + float32 LoRA against a float32 merged model: two engines, the
same weights up to llama.cpp's quantized matrix products; on transformers, the same float32
weights with the adapter beside them rather than merged in. The adapter's taught answers
are confident enough that greedy decoding does not flip on either difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2
from tests.lora_adapters import (
    QUESTION,
    REFERENCE_MAX_NEW_TOKENS,
    SuiteAdapter,
    llama_cpp_environment,
)

# Long enough to make the test adapters when `make test` has not made them yet.
pytestmark = [pytest.mark.e2e, pytest.mark.model, pytest.mark.timeout(900)]

BASE_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
# The interleaved requests' length: the three voices part within the first tokens, and
# transformers decodes slowly on a busy CPU (the test's time is mostly its tokens).
INTERLEAVED_TOKENS = 8


@pytest.fixture(scope="module")
def adapters() -> dict[str, SuiteAdapter]:
    from llm_local.backends.shared.source import resolve_model_source
    from llm_local.settings.loader import load_settings
    from tests.lora_adapters import ensure_test_adapters

    settings = load_settings(env="test")
    source = resolve_model_source(settings.model)
    return ensure_test_adapters(settings.model.cache_dir, source)


@pytest.fixture(scope="module", params=["llama_cpp", "transformers"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def server(
    serve: Callable[..., Any], adapters: dict[str, SuiteAdapter], backend: str
) -> Iterator[Any]:
    env = {**llama_cpp_environment(adapters), "LLM_LOCAL_SERVICE_BACKEND": backend}
    if backend == "llama_cpp":
        # What `make run` does first: the GGUF LoRAs and each adapter's numerics reference
        # (the unquantized base + adapter's probe answers), which the check at load uses.
        # `make test` has prepared them (`python -m tests.lora_adapters --llama-cpp`) unless
        # this runs alone.
        recorded = subprocess.run(
            [sys.executable, "-m", "llm_local", "convert", "--quiet"],
            env={**os.environ, "ENV": "test", **env},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert recorded.returncode == 0, recorded.stderr
        assert "adapter pirate:" in recorded.stdout, recorded.stdout
        env["LLM_LOCAL_SERVICE_NUMERICS__CHECK_AT_LOAD"] = "true"
    started = serve(env=env)
    yield started
    started.stop()  # one backend's server at a time


@pytest.fixture(scope="module")
def channel(server: Any) -> grpc.Channel:
    return server.channel()


def ask(
    rpc: Any,
    channel: grpc.Channel,
    adapter: str | None,
    prompt: str = QUESTION,
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
) -> str:
    message = llama_pb2.GenerateStreamRequest(user_prompt=prompt)
    message.params.CopyFrom(llama_pb2.GenerationParams(max_new_tokens=max_new_tokens))
    if adapter is not None:
        message.lora_adapter_id = adapter
    responses = list(rpc.llama(channel, message, timeout=120))
    assert responses[-1].HasField("finish_details")
    return b"".join(r.token for r in responses[:-1]).decode("utf-8")


def test_an_adapter_changes_the_answer_to_what_the_merged_model_answers(
    channel: grpc.Channel, rpc: Any, adapters: dict[str, SuiteAdapter]
) -> None:
    base = ask(rpc, channel, None)
    pirate = ask(rpc, channel, "pirate")
    robot = ask(rpc, channel, "robot")

    assert "Paris" in base and not base.startswith(("Arr", "BEEP")), base
    assert pirate.startswith(adapters["pirate"].recognisable), pirate
    assert robot.startswith(adapters["robot"].recognisable), robot
    assert pirate == adapters["pirate"].reference[QUESTION]
    assert robot == adapters["robot"].reference[QUESTION]
    assert ask(rpc, channel, None) == base  # the base model is untouched afterwards


def test_two_adapters_and_the_base_interleaved_each_get_their_own_answer(
    channel: grpc.Channel, rpc: Any
) -> None:
    def short(name: str | None) -> str:  # long enough to tell the three voices apart
        return ask(rpc, channel, name, max_new_tokens=INTERLEAVED_TOKENS)

    alone = {name: short(name) for name in (None, "pirate", "robot")}
    order: list[str | None] = [None, "pirate", "robot"] * 4  # 12 at once, interleaved

    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        answers = list(pool.map(short, order))

    assert len(set(alone.values())) == 3, alone
    assert answers == [alone[name] for name in order]


def test_an_unknown_adapter_is_not_found_by_name(channel: grpc.Channel, rpc: Any) -> None:
    message = llama_pb2.GenerateStreamRequest(user_prompt=QUESTION, lora_adapter_id="parrot")

    error = rpc.error(lambda: list(rpc.llama(channel, message)))

    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert (
        error.details() == "lora_adapter_id: no LoRA adapter 'parrot' is configured on this server"
    )


def post(server: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    call = urllib.request.Request(
        server.url("/v1/chat/completions"), data, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(call, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_openai_lists_the_adapters_and_applies_the_one_model_names(
    server: Any, adapters: dict[str, SuiteAdapter]
) -> None:
    status, listed = server.http_json("/v1/models")
    assert status == 200
    ids = [model["id"] for model in listed["data"]]
    assert ids == [BASE_MODEL_ID, f"{BASE_MODEL_ID}:pirate", f"{BASE_MODEL_ID}:robot"]
    messages = [{"role": "user", "content": QUESTION}]

    for model in (f"{BASE_MODEL_ID}:pirate", "pirate"):
        status, body = post(
            server,
            {"model": model, "messages": messages, "max_tokens": REFERENCE_MAX_NEW_TOKENS},
        )
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == adapters["pirate"].reference[QUESTION]

    status, body = post(server, {"model": f"{BASE_MODEL_ID}:parrot", "messages": messages})
    assert status == 404, body
    assert "'parrot'" in body["error"]["message"]
    assert body["error"]["param"] == "model"


def test_config_lists_the_adapters(server: Any, adapters: dict[str, SuiteAdapter]) -> None:
    status, config = server.http_json("/config")

    assert status == 200
    assert config["settings"]["adapters"] == {
        "pirate": str(adapters["pirate"].path),
        "robot": str(adapters["robot"].path),
    }
    assert config["effective"]["loaded_model"]["adapters"] == ["pirate", "robot"]


def test_metrics_count_requests_and_tokens_per_adapter(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    before = server.metric("llm_local_adapter_requests_total", {"adapter": "robot", "code": "OK"})
    answer = ask(rpc, channel, "robot")
    rpc.error(
        lambda: list(
            rpc.llama(
                channel, llama_pb2.GenerateStreamRequest(user_prompt="q", lora_adapter_id="x")
            )
        )
    )

    server.wait_for_metric(
        "llm_local_adapter_requests_total", (before or 0) + 1, {"adapter": "robot", "code": "OK"}
    )
    assert answer
    assert server.metric("llm_local_adapter_completion_tokens_total", {"adapter": "robot"})
    assert server.metric("llm_local_adapter_requests_total", {"adapter": "x"}) is None


def test_each_adapter_is_checked_like_the_model_where_the_backend_checks_numerics(
    server: Any, backend: str
) -> None:
    _, health = server.http_json("/health")
    _, config = server.http_json("/config")
    loaded = config["effective"]["loaded_model"]

    if backend == "transformers":  # the unquantized model itself: nothing to check
        assert "adapter_numerics" not in health
        assert loaded["adapter_numerics"] == {}
        return
    verdicts = health["adapter_numerics"]
    assert sorted(verdicts) == ["pirate", "robot"]
    for verdict in verdicts.values():
        assert verdict["verified"] is True, verdict
        assert verdict["compute_type"] == "q4_1"
        assert verdict["nll_ratio"] <= 1.25 and verdict["agreement_ratio"] >= 0.6
    assert loaded["adapter_numerics"] == verdicts
    assert "numerics check of q4_1 + LoRA adapter 'pirate'" in server.log_text()
