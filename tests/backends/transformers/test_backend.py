"""The transformers backend's pure parts: sampling values per request, the context limit.

Its generation end to end (real model, real server) is in tests/e2e/test_backends.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_local.backends.transformers.backend import processor_values
from llm_local.backends.transformers.loader import LoadPlan, context_limit
from llm_local.convert.sources import ModelSource
from llm_local.core.types import SamplingOptions
from llm_local.settings.loader import load_settings


def test_greedy_requests_keep_only_the_most_likely_token() -> None:
    for greedy in (SamplingOptions(temperature=0.0), SamplingOptions(temperature=0.9, top_k=1)):
        assert processor_values(greedy, 49152) == {"temperature": 1.0, "top_k": 1, "top_p": 1.0}


def test_sampled_requests_pass_their_own_values_and_top_k_zero_is_no_cut() -> None:
    values = processor_values(SamplingOptions(temperature=0.7, top_k=0, top_p=0.9), 49152)

    assert values == {"temperature": 0.7, "top_k": 49152, "top_p": pytest.approx(0.9)}
    assert processor_values(SamplingOptions(temperature=0.7, top_k=40), 49152)["top_k"] == 40


def plan(model_limit: int, cache_tokens: int) -> LoadPlan:
    settings = load_settings(env="test")
    source = ModelSource("x", "gguf", "x", "x", Path("x.gguf"), None, "f")
    return LoadPlan(
        source=source,
        model=dataclasses.replace(settings.model, context_limit=model_limit),
        device="cpu",
        device_index=0,
        dtype="float32",
        options=dataclasses.replace(settings.transformers, kv_cache_tokens=cache_tokens),
    )


@pytest.mark.parametrize(
    ("model_limit", "cache_tokens", "expected"),
    [
        (0, 16384, 8192),  # the model's own, within the cache
        (0, 4096, 4096),  # clipped: one request must fit the KV cache
        (2048, 4096, 2048),  # the configured limit
        (0, 0, 8192),  # a cache transformers sizes itself: the model's
    ],
)
def test_context_limit_never_exceeds_what_the_kv_cache_holds(
    model_limit: int, cache_tokens: int, expected: int
) -> None:
    config = SimpleNamespace(max_position_embeddings=8192)

    assert context_limit(plan(model_limit, cache_tokens), config) == expected


def test_pytorch_threads_follow_the_cpus_this_process_may_use_unless_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llm_local.backends.shared import threads
    from llm_local.backends.transformers.loader import cpu_threads

    options = load_settings(env="test").transformers
    monkeypatch.setattr(threads, "usable_cpus", lambda: 3)
    assert cpu_threads(dataclasses.replace(options, threads="auto")) == 3
    assert cpu_threads(dataclasses.replace(options, threads=2)) == 2
    assert options.threads == 1  # the test settings: two test workers share the CPUs
