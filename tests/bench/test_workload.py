"""bench/workload.py: the gateway's requests and their Poisson arrivals."""

from __future__ import annotations

import itertools
import statistics

import pytest

from bench.workload import (
    MAX_HISTORY_TURNS,
    MAX_NEW_TOKENS,
    MIN_NEW_TOKENS,
    TENANTS,
    poisson_arrivals,
    request_at,
    schedule,
)


def test_arrivals_are_reproducible_and_depend_on_seed_and_rate() -> None:
    first = poisson_arrivals(seed=11, rate=2.0, duration_s=30.0)
    assert first == poisson_arrivals(seed=11, rate=2.0, duration_s=30.0)
    assert first != poisson_arrivals(seed=12, rate=2.0, duration_s=30.0)
    assert first != poisson_arrivals(seed=11, rate=2.5, duration_s=30.0)
    assert list(first) == sorted(first)
    assert all(0 <= offset < 30.0 for offset in first)


def test_arrivals_are_a_poisson_process_of_the_rate() -> None:
    offsets = poisson_arrivals(seed=3, rate=4.0, duration_s=500.0)
    # About rate × duration arrivals (2000; sd ≈ 45), exponential gaps of mean 1/rate
    # (their standard deviation equals their mean).
    assert 1800 < len(offsets) < 2200
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.08)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.12)


def test_a_rate_sends_the_same_requests_to_every_server_and_no_other_rate_s() -> None:
    slow = schedule(seed=5, rate=0.5, duration_s=40.0)
    fast = schedule(seed=5, rate=4.0, duration_s=40.0)
    assert len(fast) > len(slow) > 3
    assert schedule(seed=5, rate=0.5, duration_s=40.0) == slow
    # No level resends the requests another level sent (a prompt cache would answer those
    # whole); what repeats is what the mix repeats, as between a gateway's calls.
    sent = {rate: {a.request.index for a in schedule(5, rate, 60.0)} for rate in RATES}
    for rate, other in itertools.combinations(RATES, 2):
        assert not sent[rate] & sent[other], (rate, other)
    indices = [a.request.index for a in fast]
    assert indices == list(range(indices[0], indices[0] + len(fast)))


# Lattice rates (powers of √2) and bisection midpoints, as the sweep offers them.
RATES = (0.354, 0.5, 0.595, 0.707, 0.841, 1.0, 1.41, 2.0)


def test_the_mix_is_shaped_like_the_gateway() -> None:
    requests = [request_at(seed=11, index=index) for index in range(400)]
    tenants = {tenant.name: tenant for tenant in TENANTS}
    assert {r.tenant for r in requests} == set(tenants)  # every tenant sends
    for request in requests:
        tenant = tenants[request.tenant]
        assert request.system_prompt == tenant.system_prompt
        assert request.rag_context is None or request.rag_context in tenant.documents
        assert request.user_prompt in tenant.questions
        assert MIN_NEW_TOKENS <= request.max_new_tokens <= MAX_NEW_TOKENS
        assert len(request.history) <= MAX_HISTORY_TURNS
        if request.history:  # the assistant spoke last; turns alternate
            roles = [role for role, _ in request.history]
            assert roles[-1] == "assistant"
            assert all(a != b for a, b in itertools.pairwise(roles))
    assert {len(r.history) for r in requests} == set(range(MAX_HISTORY_TURNS + 1))
    with_context = sum(r.rag_context is not None for r in requests)
    assert 120 < with_context < 280
    assert {r.max_new_tokens for r in requests} >= {MIN_NEW_TOKENS, MAX_NEW_TOKENS}


def test_personas_are_a_few_hundred_tokens_and_distinct() -> None:
    words = [len(tenant.system_prompt.split()) for tenant in TENANTS]
    assert all(150 <= count <= 320 for count in words), words
    assert len({tenant.system_prompt for tenant in TENANTS}) == len(TENANTS)


@pytest.mark.parametrize(("rate", "duration"), [(0.0, 10.0), (1.0, 0.0), (-1.0, 5.0)])
def test_a_rate_or_duration_that_is_not_positive_is_refused(rate: float, duration: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        poisson_arrivals(seed=1, rate=rate, duration_s=duration)


def test_a_level_gets_its_least_arrivals_however_low_the_rate() -> None:
    offsets = poisson_arrivals(seed=11, rate=0.01, duration_s=10.0, min_count=4)
    assert len(offsets) == 4
    # The same process, only observed for longer: its first arrivals do not change.
    assert poisson_arrivals(seed=11, rate=0.01, duration_s=100_000.0)[:4] == offsets
