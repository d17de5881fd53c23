"""The soak's judgement of what it saw: outcome categories, the RSS trend, token counts."""

from __future__ import annotations

from soak.clients import Outcome
from soak.rawsocket import _count_messages, grpc_frame
from soak.report import (
    COMPLETED,
    REFUSED_AT_ONCE,
    REFUSED_QUEUE_TIMEOUT,
    REFUSED_TENANT,
    category,
    check_tokens,
    fewest_tokens,
    refusal_durations_ms,
    rss_trend,
)
from soak.sampler import Sample, parse_metrics, total


def outcome(
    status: str = "OK", kind: str = "grpc-llama", detail: str = "", **extra: object
) -> Outcome:
    made = Outcome(kind, "t", 0.0, 1.0, status=status, detail=detail)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_refusals_are_told_apart_by_their_message() -> None:
    assert category(outcome()) == COMPLETED
    assert category(outcome("RESOURCE_EXHAUSTED", detail="server at capacity: 64 ...")) == (
        REFUSED_AT_ONCE
    )
    tenant = "tenant 'a' at its limit: 48 generations running or queued"
    assert category(outcome("RESOURCE_EXHAUSTED", detail=tenant)) == REFUSED_TENANT
    waited = "no generation slot became free within 30 s (64 running, limit 64)"
    assert category(outcome("RESOURCE_EXHAUSTED", detail=waited)) == REFUSED_QUEUE_TIMEOUT


def test_malformed_requests_must_be_refused_as_invalid() -> None:
    assert "UNEXPECTED" not in category(
        outcome("INVALID_ARGUMENT", "bad-request", expected_error=True)
    )
    assert "UNEXPECTED" in category(outcome("OK", "bad-request", expected_error=True))
    assert "UNEXPECTED" in category(outcome("INVALID_ARGUMENT"))
    assert category(outcome("INTERNAL")) == "INTERNAL error"


def sample(at_s: float, requests: float, rss_mib: float) -> Sample:
    return Sample(at_s, int(rss_mib * 2**20), 0, 0, 0, 0, 0, 0, requests, 0)


def test_rss_trend_is_flat_within_noise_and_catches_a_leak() -> None:
    wobble = [0.0, 3.0, -2.0, 1.0, -3.0, 2.0, 0.0, -1.0]
    flat = [sample(60 + i, 100 * i, 500 + w) for i, w in enumerate(wobble)]
    trend = rss_trend(flat, warmup_s=60)
    assert trend is not None and trend.flat
    leaking = [sample(60 + i, 100 * i, 500 + 20 * i + w) for i, w in enumerate(wobble)]
    leak = rss_trend(leaking, warmup_s=60)
    assert leak is not None and not leak.flat
    assert 1900 < leak.slope_mib_per_10k < 2100  # 20 MiB per 100 requests, wobbling
    assert rss_trend(flat[:2], warmup_s=60) is None


def test_token_counts_allow_the_ambiguity_of_re_encoding_but_not_extra_text() -> None:
    def count(text: str) -> int:
        return len(text.split())

    def spell(text: str, cut_tail: bool) -> int:
        return count(text) + cut_tail

    seen = [
        outcome(text="a b c", completion_tokens=3, finish_reason="length", checkable=True),
        outcome(text="a b", completion_tokens=3, finish_reason="stop", checkable=True),
        outcome(text="a b", completion_tokens=4, finish_reason="length", checkable=True),
        outcome(text="a", completion_tokens=9, finish_reason="length", checkable=False),
    ]
    tokens = check_tokens(seen[:2], count, spell)
    assert (tokens.checked, tokens.equal, tokens.spellable, tokens.consistent) == (2, 2, 2, True)
    # "a b" told as 4 tokens: re-encoding is 2 off, still within the ambiguity.
    tokens = check_tokens(seen, count, spell)
    assert (tokens.checked, tokens.equal, tokens.within_two, tokens.consistent) == (3, 2, 3, True)
    # Text that needs more tokens than reported was repeated or made up on the way.
    extra = outcome(text="a b c d", completion_tokens=3, finish_reason="length", checkable=True)
    tokens = check_tokens([extra], lambda text: 3, spell)
    assert (tokens.equal, tokens.spellable, tokens.consistent) == (1, 0, False)


def test_fewest_tokens_is_the_shortest_spelling() -> None:
    vocabulary = frozenset({b"a", b"b", b"c", b"ab", b"bc", b"abc"})
    assert fewest_tokens(b"abcabc", vocabulary, 3) == 2
    assert fewest_tokens(b"abab", vocabulary, 3) == 2
    assert fewest_tokens(b"", vocabulary, 3) == 0
    # "abc" + a token cut short that may have held the second "abc" too: 2 at the least.
    assert fewest_tokens(b"abcabc", vocabulary, 3, cut_tail=True) == 2
    assert fewest_tokens(b"abcabcab", vocabulary, 3, cut_tail=True) == 3


def test_metrics_text_is_summed_by_name_and_label() -> None:
    values = parse_metrics(
        '# HELP x\nllm_local_requests_total{code="OK",service="a"} 3.0\n'
        'llm_local_requests_total{code="INTERNAL",service="b"} 1.0\n'
        "llm_local_requests_running 2.0\n"
    )
    assert total(values, "llm_local_requests_total") == 4.0
    assert total(values, "llm_local_requests_total", 'code="INTERNAL"') == 1.0
    assert total(values, "llm_local_requests_running") == 2.0


def test_grpc_messages_are_counted_whole() -> None:
    data = grpc_frame(b"abc") + grpc_frame(b"") + grpc_frame(b"defg")[:6]
    assert _count_messages(data) == 2


def test_refusal_durations_come_from_the_servers_json_log() -> None:
    log = "\n".join(
        [
            '{"message": "request finished", "status": "RESOURCE_EXHAUSTED", '
            '"detail": "tenant \'a\' at its limit", "duration_ms": 0.7}',
            '{"message": "request finished", "status": "RESOURCE_EXHAUSTED", '
            '"detail": "no generation slot became free within 30 s", "duration_ms": 30001.0}',
            '{"message": "request finished", "status": "OK", "duration_ms": 900.0}',
            "not json at all",
        ]
    )
    assert refusal_durations_ms(log) == [0.7]
