"""No secret in the logs: a real server at DEBUG, given an HF token, an API key and
distinctive prompts, served over gRPC (both services), the OpenAI API (chat and plain
completions, streamed and not) and their error paths; then its whole log output is
searched for each secret.

Prompt logging (logging.log_prompts) is off, as by default; tests/test_serving.py shows
that switching it on does put prompts in DEBUG lines (so the search here can fail).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

HF_TOKEN = "hf_e2eLogScanToken5c2b81"
API_KEY = "sk-e2e-log-scan-key-93fa"
# Each prompt field gets its own text, so a leak says which field leaked.
PROMPTS = {
    "user_prompt": "zebra-user-prompt-1f7c",
    "system_prompt": "zebra-system-prompt-8a2d",
    "history": "zebra-history-turn-4e90",
    "rag_context": "zebra-rag-context-b713",
    "local_prompt": "zebra-local-prompt-62c5",
    "chat_message": "zebra-chat-message-0d4f",
    "completion_prompt": "zebra-completion-prompt-a5e8",
}


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any]) -> Any:
    return serve(
        env={
            "LLM_LOCAL_SERVICE_LOGGING__LEVEL": "DEBUG",
            "HF_TOKEN": HF_TOKEN,
            "LLM_LOCAL_SERVICE_OPENAI__API_KEYS": API_KEY,
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_CONCURRENT": "1",
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_QUEUED": "0",
            # LLMLocalService takes no parameters: keep its answers short.
            "LLM_LOCAL_SERVICE_GENERATION__MAX_NEW_TOKENS": "4",
        }
    )


def llama_request(max_new_tokens: int = 2, **params: Any) -> llama_pb2.GenerateStreamRequest:
    return llama_pb2.GenerateStreamRequest(
        user_prompt=PROMPTS["user_prompt"],
        system_prompt=PROMPTS["system_prompt"],
        rag_context=PROMPTS["rag_context"],
        history=[
            llama_pb2.ConversationTurn(role="user", content=PROMPTS["history"]),
            llama_pb2.ConversationTurn(role="assistant", content="ok"),
        ],
        params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens, **params),
    )


def post(server: Any, path: str, body: Any, key: str | None = API_KEY) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url(path), data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def exercise_grpc(server: Any, rpc: Any) -> None:
    channel = server.channel()
    metadata = (("x-tenant-id", "scan"), ("x-trace-id", "trace-scan"))
    served = list(rpc.llama(channel, llama_request(), metadata=metadata))
    assert served[-1].finish_details.completion_tokens == 2
    assert list(rpc.local(channel, PROMPTS["local_prompt"], timeout=60))

    bad = rpc.error(lambda: list(rpc.llama(channel, llama_request(top_p=7.0))))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_long = llama_pb2.GenerateStreamRequest(
        user_prompt=f"{PROMPTS['user_prompt']} " * 3000,  # beyond the 8192-token context
        params=llama_pb2.GenerationParams(max_new_tokens=2),
    )
    assert rpc.error(lambda: list(rpc.llama(channel, too_long))).code() == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # One slot, no queue: a second call while the first decodes is refused.
    running = rpc.llama(channel, llama_request(max_new_tokens=200))
    next(running)
    full = rpc.error(lambda: list(rpc.llama(channel, llama_request())))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.cancel()  # and a cancellation mid-stream


def exercise_openai(server: Any) -> None:
    chat = {"messages": [{"role": "user", "content": PROMPTS["chat_message"]}], "max_tokens": 2}
    assert post(server, "/v1/chat/completions", chat)[0] == 200
    assert post(server, "/v1/chat/completions", {**chat, "stream": True})[0] == 200
    completion = {"prompt": PROMPTS["completion_prompt"], "max_tokens": 2}
    assert post(server, "/v1/completions", completion)[0] == 200

    assert post(server, "/v1/chat/completions", {**chat, "max_tokens": -1})[0] == 400
    assert post(server, "/v1/completions", {**completion, "temperature": -3})[0] == 400
    assert post(server, "/v1/chat/completions", chat, key="sk-wrong")[0] == 401
    assert post(server, "/v1/chat/completions", chat, key=None)[0] == 401
    broken = json.dumps(chat).encode()[:-5]  # not JSON any more, prompt inside
    assert post(server, "/v1/chat/completions", broken)[0] == 400
    assert post(server, "/v1/models", {})[0] == 405


def test_no_log_line_holds_a_token_an_api_key_or_a_prompt(server: Any, rpc: Any) -> None:
    exercise_grpc(server, rpc)
    exercise_openai(server)
    status = server.stop()  # everything it logs, up to the last line
    log = server.log_text()

    assert status == 0
    assert "DEBUG" in log and "request finished" in log  # really at DEBUG, really served
    assert log.count("request finished") == 11  # 401, broken JSON and 405 end before the flow
    leaks = {
        name: secret
        for name, secret in {"HF token": HF_TOKEN, "API key": API_KEY, **PROMPTS}.items()
        if secret in log
    }
    assert not leaks, f"secrets in the log: {leaks}"
