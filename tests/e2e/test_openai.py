"""The OpenAI API of a real `llm-local serve` on the real model, called with the
official `openai` client.

One server for the whole module per backend (ct2 and llama_cpp, only `backend` differs):
ENV=test (greedy SmolLM2-135M), an API key, and room for exactly two generations (no
queue), so that "full" is easy to reach.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.proto.sentiric.llm.v1 import llama_pb2
from tests.e2e.conftest import SUITE_BACKENDS, backend_env

pytestmark = [pytest.mark.e2e, pytest.mark.model]

QUESTION = "What is the capital of France? Answer in one sentence."
# Greedy SmolLM2 counts on and on (in float32 and int8): a generation that outlives any
# test's patience.
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
API_KEY = "sk-e2e-7c1d93f0"
MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module", params=SUITE_BACKENDS)
def server(serve: Callable[..., Any], request: pytest.FixtureRequest) -> Any:
    return serve(
        env={
            **backend_env(request.param),
            "LLM_LOCAL_SERVICE_OPENAI__API_KEYS": f"other-key,{API_KEY}",
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT": "2",
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED": "0",
        }
    )


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[openai.OpenAI]:
    # No retries: a 429 must reach the test, not be retried away.
    with openai.OpenAI(
        base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        yield client  # closed before the server stops: its stop waits for open connections


def ask(client: openai.OpenAI, content: str = QUESTION, **params: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **params
    )


def test_models_lists_the_loaded_model(client: openai.OpenAI) -> None:
    models = client.models.list()

    assert [model.id for model in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "llm-local"


def test_chat_answers_with_the_usage_grpc_reports_for_the_same_request(
    server: Any, client: openai.OpenAI, rpc: Any
) -> None:
    completion = ask(client, max_tokens=32)
    grpc_reply = list(
        rpc.llama(
            server.channel(),
            llama_pb2.GenerateStreamRequest(
                user_prompt=QUESTION, params=llama_pb2.GenerationParams(max_new_tokens=32)
            ),
        )
    )

    choice = completion.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    # The gRPC service, unchanged in the same process, generates the same text with the
    # same counts: usage is what was generated.
    details = grpc_reply[-1].finish_details
    assert b"".join(r.token for r in grpc_reply[:-1]).decode() == choice.message.content
    assert completion.usage.completion_tokens == details.completion_tokens > 0
    assert completion.usage.prompt_tokens == details.prompt_tokens
    assert completion.usage.total_tokens == details.prompt_tokens + details.completion_tokens
    assert server.metric("llm_local_requests_total", {"service": "openai.chat.completions"})


def test_streamed_deltas_equal_the_whole_answer_and_end_with_usage(
    client: openai.OpenAI,
) -> None:
    whole = ask(client, max_tokens=32)
    chunks = list(ask(client, max_tokens=32, stream=True, stream_options={"include_usage": True}))

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_sequences_and_max_tokens(client: openai.OpenAI) -> None:
    whole = ask(client, max_tokens=32).choices[0].message.content
    stopped = ask(client, max_tokens=32, stop=["Paris"]).choices[0]
    short = ask(client, max_tokens=3)

    assert stopped.message.content == whole[: whole.index("Paris")]
    assert stopped.finish_reason == "stop"
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3


def test_plain_completion_continues_the_prompt(client: openai.OpenAI, test_model_dir: Path) -> None:
    completion = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=6)
    streamed = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=6, stream=True
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 6
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text
    # SmolLM2's configuration asks for no BOS on a plain prompt: exactly its own tokens.
    tokenizer = HFTokenizer.from_directory(test_model_dir)
    assert tokenizer.plain_prompt_bos_id is None
    assert completion.usage.prompt_tokens == len(tokenizer.encode("One, two, three,"))


@pytest.mark.parametrize(
    ("param", "arguments"),
    [
        ("temperature", {"temperature": -1}),
        ("top_p", {"top_p": 2}),
        ("max_tokens", {"max_tokens": 0}),
        ("n", {"n": 2}),
        ("stop", {"stop": ""}),
        ("presence_penalty", {"presence_penalty": 0.5}),
        ("frequency_penalty", {"frequency_penalty": 0.5}),
        ("logit_bias", {"logit_bias": {"42": 10}}),
        ("logprobs", {"logprobs": True}),
        # Malformed on every backend (whether a backend supports structure at all is
        # tests/e2e/test_structured.py's: ct2 refuses it, llama_cpp serves it).
        ("response_format.type", {"response_format": {"type": "xml"}}),
        ("tools[0].type", {"tools": [{"type": "retrieval"}]}),
        ("made_up", {"extra_body": {"made_up": 1}}),
    ],
)
def test_each_bad_parameter_is_a_bad_request_naming_it(
    client: openai.OpenAI, param: str, arguments: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        ask(client, **arguments)

    assert raised.value.param == param
    assert param in raised.value.message


def test_a_message_list_that_is_not_a_conversation_names_the_message(
    client: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        )

    assert raised.value.param == "messages[1].role"


def test_over_capacity_is_a_rate_limit_and_closed_streams_stop_decoding(
    server: Any, client: openai.OpenAI
) -> None:
    streams = [ask(client, ENDLESS, max_tokens=1000, stream=True) for _ in range(2)]
    for stream in streams:
        next(iter(stream))  # admitted and decoding
    server.wait_for_metric("llm_local_requests_running", 2)

    with pytest.raises(openai.RateLimitError) as raised:
        ask(client, max_tokens=4)
    assert raised.value.response.headers["retry-after"] == "1"

    for stream in streams:
        stream.close()  # the client goes away midway
    server.wait_for_metric("llm_local_requests_running", 0)
    # Cut short by the disconnect, not ended on their own before it.
    cancelled = [
        line
        for line in server.log_text().splitlines()
        if "rpc=openai.chat.completions status=CANCELLED" in line
    ]
    assert len(cancelled) == 2, server.log_tail()
    server.wait_for_metric("llm_local_backend_running", 0)
    time.sleep(0.5)  # let the cancellation reach the decoding thread
    before = server.cpu_seconds()
    time.sleep(1.5)
    used = server.cpu_seconds() - before
    # Decoding would use about one core (1.5 s of CPU); idle, nearly nothing.
    assert used < 0.4, f"the server used {used:.2f} s of CPU in 1.5 s after the streams closed"
    assert "Paris" in ask(client, max_tokens=24).choices[0].message.content


def test_the_api_key_is_required_but_health_stays_open(server: Any) -> None:
    with openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0) as keyless:
        with pytest.raises(openai.AuthenticationError):
            keyless.models.list()
        with pytest.raises(openai.AuthenticationError):
            ask(keyless)
    assert server.http_get("/health")[0] == 200
    status, config = server.http_json("/config")
    assert status == 200
    assert config["settings"]["openai"]["api_keys"] == "***"
    assert API_KEY not in server.log_text()


def test_tenant_from_header_and_trace_id_are_logged(server: Any, client: openai.OpenAI) -> None:
    ask(
        client,
        max_tokens=4,
        extra_headers={"x-tenant-id": "tenant-openai", "x-trace-id": "trace-openai-1"},
    )
    trace = {"x-trace-id": "trace-openai-2"}
    ask(client, max_tokens=4, user="tenant-from-user", extra_headers=trace)

    deadline = time.monotonic() + 5
    while "trace=trace-openai-2" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = server.log_text().splitlines()
    (first,) = [line for line in lines if "trace=trace-openai-1" in line]
    (second,) = [line for line in lines if "trace=trace-openai-2" in line]
    assert "tenant=tenant-openai" in first and "status=OK" in first
    assert "tenant=tenant-from-user" in second
    assert "rpc=openai.chat.completions" in first
