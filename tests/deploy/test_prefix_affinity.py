"""A call's turns past one replica: what a turn costs on the replica that holds the call's
prefix, and on one that does not (docs/SCALING.md, "Keeping a call on its replica").

Two real `llm-local serve` replicas on the llama_cpp backend (the test settings with only
`backend` changed: prefix reuse is on by default), the official `openai` client. A call's
first turns go to replica A, which keeps their sequences; its next turn, resent with the
whole history as a gateway does, goes to A and, the same turn, to B. A reuses the call's
history; B has never seen the call and reads the whole prompt, and still answers the same
greedy text: a turn that lands on the wrong replica is slower, never wrong.

Each turn's time to first token, as the replica's request log line measured it, is printed
(`pytest -s`): the figures docs/SCALING.md quotes. Nothing here bets on timing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from ..e2e.conftest import ServerProcess, start_server_process

pytestmark = [pytest.mark.e2e, pytest.mark.model]

API_KEY = "sk-deploy-affinity"
MODEL = "SmolLM2-135M-Instruct.Q4_1"
CALL_ID = "call-7f3a"  # what the gateway would send as x-call-id (docs/SCALING.md)
PERSONA = (
    "You are the phone assistant of a bakery in Lyon. It opens at seven and closes at "
    "seven, every day but Monday. Answer in one short sentence."
)
EARLIER = ["Hello, are you open today?", "When do you close?", "Do you sell croissants?"]
NEXT = "Can I order a cake for Sunday?"
MAX_TOKENS = 16
READ = "llm_local_backend_prefix_read_tokens_total"
REUSED = "llm_local_backend_prefix_reused_tokens_total"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ...]]:
    log_dir = tmp_path_factory.mktemp("affinity-logs")
    env = {
        "LLM_LOCAL_SERVICE_BACKEND": "llama_cpp",
        "LLM_LOCAL_SERVICE_OPENAI__API_KEYS": API_KEY,
        "LLM_LOCAL_SERVICE_LOGGING__FORMAT": "json",  # ttft_ms read back from the log
    }
    started: list[ServerProcess] = []
    try:
        for _ in range(2):
            started.append(start_server_process(log_dir, env, wait="none"))
        for server in started:
            server.wait("ready")
            warm_up(server)
        yield tuple(started)
    finally:
        for server in started:
            server.stop()


def warm_up(server: ServerProcess) -> None:
    """A replica's first decode also sets the engine up: one unrelated plain completion
    first, so that the turns timed below are served warm on both replicas. It shares no
    leading token with the chat turns (they open with the template's <|im_start|>)."""
    with openai.OpenAI(
        base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        client.completions.create(model=MODEL, prompt="Warm up.", max_tokens=2, temperature=0)


def turn(server: ServerProcess, messages: list[dict[str, str]]) -> Any:
    with openai.OpenAI(
        base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        return client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_headers={"x-call-id": CALL_ID},
        )


def counter(server: ServerProcess, name: str) -> float:
    """A prefix counter once the replica's last request is released: the worker counts a
    request's reads when it frees its sequence, which may come a moment after the client
    has the whole answer (a read before that is one request behind)."""
    server.wait_for_metric("llm_local_backend_running", 0)
    value = server.metric(name)
    assert value is not None, f"{name} missing from /metrics"
    return value


def finished_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """The replica's "request finished" log records, in order."""
    found = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "request finished":
                found.append(record)
    return found


def test_a_turn_on_the_replica_without_the_prefix_is_correct_and_reads_it_all(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    messages: list[dict[str, str]] = [{"role": "system", "content": PERSONA}]
    earlier = []
    for line in EARLIER:
        messages.append({"role": "user", "content": line})
        completion = turn(a, messages)
        earlier.append(completion)
        messages.append({"role": "assistant", "content": completion.choices[0].message.content})
    messages.append({"role": "user", "content": NEXT})

    cached = [c.usage.prompt_tokens_details.cached_tokens for c in earlier]
    assert cached[0] == 0  # A had seen nothing of the call
    assert all(cached[i] >= earlier[i - 1].usage.prompt_tokens for i in range(1, len(EARLIER)))

    a_read, b_read, b_reused = counter(a, READ), counter(b, READ), counter(b, REUSED)
    on_a = turn(a, messages)
    on_b = turn(b, messages)

    # Same turn, same prompt on both replicas.
    assert on_a.usage.prompt_tokens == on_b.usage.prompt_tokens
    prompt = on_b.usage.prompt_tokens
    # A reused the call's history (everything up to its last answer at least) ...
    assert on_a.usage.prompt_tokens_details.cached_tokens >= earlier[-1].usage.prompt_tokens
    assert counter(a, READ) - a_read == prompt - on_a.usage.prompt_tokens_details.cached_tokens
    # ... B reused nothing and read the whole prompt ...
    assert on_b.usage.prompt_tokens_details.cached_tokens == 0
    assert counter(b, READ) - b_read == prompt
    assert counter(b, REUSED) == b_reused
    # ... and both answered the same greedy text: slower, never wrong.
    assert on_b.choices[0].message.content == on_a.choices[0].message.content

    a_lines, b_lines = finished_lines(a)[1:], finished_lines(b)[1:]  # past the warm-up
    assert len(a_lines) == len(EARLIER) + 1 and len(b_lines) == 1
    # An operator follows the call's turns across replicas by its id.
    assert {line["call_id"] for line in a_lines + b_lines} == {CALL_ID}
    assert [line["cached_prompt_tokens"] for line in b_lines] == [0]
    ttft = [line["ttft_ms"] for line in a_lines]
    print(
        f"\nprompt tokens per turn on A: {[c.usage.prompt_tokens for c in earlier]} + {prompt}"
        f"\nTTFT ms on A, turns 1..{len(ttft)}: {ttft} (last turn reused "
        f"{on_a.usage.prompt_tokens_details.cached_tokens} of {prompt})"
        f"\nTTFT ms of turn {len(ttft)} on B (no prefix, read {prompt}): {b_lines[0]['ttft_ms']}"
    )
