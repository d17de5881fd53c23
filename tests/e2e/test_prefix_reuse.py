"""A call's turns through the real server on the llama_cpp backend, with the official
`openai` client: later turns report the prompt tokens they reused (usage, /metrics, the
request log line) and answer exactly what a server without reuse answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.model]

API_KEY = "sk-e2e-prefix"
MODEL = "SmolLM2-135M-Instruct.Q4_1"
PERSONA = (
    "You are the phone assistant of a bakery in Lyon. It opens at seven and closes at "
    "seven, every day but Monday. Answer in one short sentence."
)
CALLER = ["Hello, are you open today?", "When do you close?", "Do you sell croissants?"]


def start(serve: Callable[..., Any], prefix_cache_mb: str) -> Any:
    return serve(
        env={
            "LLM_LOCAL_SERVICE_BACKEND": "llama_cpp",
            "LLM_LOCAL_SERVICE_OPENAI__API_KEYS": API_KEY,
            "LLM_LOCAL_SERVICE_LLAMA_CPP__PREFIX_CACHE_MB": prefix_cache_mb,
        }
    )


def run_call(server: Any) -> list[Any]:
    """The call's turns, each resending the persona and the history (as a gateway does)."""
    messages: list[dict[str, str]] = [{"role": "system", "content": PERSONA}]
    completions = []
    with openai.OpenAI(
        base_url=server.url("/v1"), api_key=API_KEY, max_retries=0, timeout=120
    ) as client:
        for line in CALLER:
            messages.append({"role": "user", "content": line})
            completion = client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=24,
                temperature=0,  # type: ignore[arg-type]
            )
            completions.append(completion)
            messages.append(
                {"role": "assistant", "content": completion.choices[0].message.content or ""}
            )
    return completions


def test_later_turns_reuse_the_call_and_answer_as_without_reuse(
    serve: Callable[..., Any],
) -> None:
    reusing, plain = start(serve, "64"), start(serve, "0")
    with_reuse, without = run_call(reusing), run_call(plain)

    texts = [c.choices[0].message.content for c in with_reuse]
    assert texts == [c.choices[0].message.content for c in without]
    cached = [c.usage.prompt_tokens_details.cached_tokens for c in with_reuse]
    prompts = [c.usage.prompt_tokens for c in with_reuse]
    assert cached[0] == 0
    assert all(cached[i] >= prompts[i - 1] for i in range(1, len(CALLER)))
    assert [c.usage.prompt_tokens_details.cached_tokens for c in without] == [0, 0, 0]

    service = {"service": "openai.chat.completions"}
    # The worker counts a request's reads when it frees its sequence, a moment after the
    # client has the answer: read the counters once nothing runs.
    reusing.wait_for_metric("llm_local_backend_running", 0)
    assert reusing.metric("llm_local_prompt_tokens_cached_total", service) == sum(cached)
    assert reusing.metric("llm_local_backend_prefix_reused_tokens_total") == sum(cached)
    assert reusing.metric("llm_local_backend_prefix_read_tokens_total") == sum(prompts) - sum(
        cached
    )
    assert (reusing.metric("llm_local_backend_prefix_cache_bytes") or 0) > 0
    assert plain.metric("llm_local_backend_prefix_reused_tokens_total") == 0
    assert f"cached_prompt_tokens={cached[-1]}" in reusing.log_text()
