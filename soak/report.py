"""The soak's figures and verdicts from what the clients saw and the samples, and the
markdown of docs/RELIABILITY.md. Pure: no I/O, no clock."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.stats import percentile
from soak.clients import Outcome
from soak.sampler import Sample

MIB = 2**20
REFUSAL_P99_GOAL_MS = 50.0
REPLACEMENT = "\ufffd"
QUEUE_TIMEOUT_MARK = "no generation slot became free within"
TENANT_LIMIT_MARK = "at its limit"
# A trend in RSS counts as growth only beyond this many residual standard deviations.
RSS_NOISE_FACTOR = 2.0

COMPLETED = "completed"
REFUSED_AT_ONCE = "refused at once: server full"
REFUSED_TENANT = "refused at once: tenant limit"
REFUSED_QUEUE_TIMEOUT = "refused after waiting queue_timeout_s"


def category(outcome: Outcome) -> str:
    """What happened to one client, in the words of the outcome table."""
    status = outcome.status
    if outcome.kind == "stop-reading":
        return "stopped reading (the server cancels it)"
    if outcome.expected_error:
        if status == "INVALID_ARGUMENT":
            return "malformed: refused as invalid"
        return f"malformed: UNEXPECTED {status}"
    if status == "OK":
        return COMPLETED
    if status == "RESOURCE_EXHAUSTED":
        if QUEUE_TIMEOUT_MARK in outcome.detail:
            return REFUSED_QUEUE_TIMEOUT
        if TENANT_LIMIT_MARK in outcome.detail:
            return REFUSED_TENANT
        return REFUSED_AT_ONCE
    if status == "CANCELLED" and outcome.kind == "cancel-at-token":
        return "cancelled by the client"
    if status == "DEADLINE_EXCEEDED":
        return "deadline exceeded"
    if status == "DISCONNECTED":
        return "disconnected without a cancel"
    if status in ("INTERNAL", "UNKNOWN"):
        return "INTERNAL error"
    return f"UNEXPECTED {status}"


def is_unexpected(name: str) -> bool:
    return "UNEXPECTED" in name or "INTERNAL" in name


@dataclass(frozen=True)
class RssTrend:
    warmup_s: float
    samples: int
    start_mib: float
    end_mib: float
    peak_mib: float
    requests_span: float  # server-counted requests between the first and last sample used
    slope_mib_per_10k: float  # fitted RSS growth per 10,000 requests
    fitted_growth_mib: float  # the fitted growth over requests_span
    noise_mib: float  # residual standard deviation around the fit

    @property
    def flat(self) -> bool:
        return abs(self.fitted_growth_mib) <= RSS_NOISE_FACTOR * max(self.noise_mib, 0.5)


def rss_trend(samples: Sequence[Sample], warmup_s: float) -> RssTrend | None:
    """RSS against requests served, after the warm-up: a least-squares line."""
    used = [s for s in samples if s.at_s >= warmup_s]
    if len(used) < 3:
        return None
    xs = [s.requests_finished for s in used]
    ys = [s.rss_bytes / MIB for s in used]
    if max(xs) == min(xs):
        return None
    slope, intercept = statistics.linear_regression(xs, ys)
    residuals = [y - (slope * x + intercept) for x, y in zip(xs, ys, strict=True)]
    span = max(xs) - min(xs)
    return RssTrend(
        warmup_s=warmup_s,
        samples=len(used),
        start_mib=ys[0],
        end_mib=ys[-1],
        peak_mib=max(s.rss_bytes for s in samples) / MIB,
        requests_span=span,
        slope_mib_per_10k=slope * 10_000,
        fitted_growth_mib=slope * span,
        noise_mib=statistics.pstdev(residuals),
    )


@dataclass(frozen=True)
class TokenCheck:
    checked: int
    equal: int  # re-encoded to exactly the reported count
    within_two: int  # ... or at most two tokens off
    spellable: int  # the text needs no more tokens than reported (exact)
    invalid_utf8: int  # gRPC token bytes that do not concatenate to valid UTF-8
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # the first few

    @property
    def consistent(self) -> bool:
        return (
            self.checked > 0
            and self.spellable == self.checked
            and self.within_two == self.checked
            and not self.invalid_utf8
        )


def fewest_tokens(
    text: bytes, vocabulary: frozenset[bytes], longest: int, cut_tail: bool = False
) -> int:
    """The fewest vocabulary tokens whose bytes concatenate to `text` (a shortest path;
    byte-level vocabularies spell every byte, so there always is one).

    `cut_tail`: `text` was followed by a token whose last bytes were cut (shown as
    U+FFFD), which may also hold up to `longest` of the bytes before: the fewest tokens
    for some prefix within that reach, plus that one."""
    unreachable = len(text) + 1
    best = [0] + [unreachable] * len(text)
    for end in range(1, len(text) + 1):
        for start in range(max(0, end - longest), end):
            if best[start] + 1 < best[end] and text[start:end] in vocabulary:
                best[end] = best[start] + 1
    if cut_tail:
        return min(best[max(0, len(text) - longest) :]) + 1
    return best[len(text)]


def check_tokens(
    outcomes: Sequence[Outcome],
    count_tokens: Callable[[str], int],
    fewest: Callable[[str, bool], int],
) -> TokenCheck:
    """Streams read to the end: the text received against the reported count.

    The end-of-turn token counts as a completion token and has no text, so a stream that
    stopped by itself reports one more than its text holds. Two checks:
    - exact: the text can be spelled with no more tokens than reported (`fewest`): text
      repeated or made up by the server would need more;
    - by re-encoding (`count_tokens`), within two tokens: re-encoding cannot be exact,
      since the model may pick a tokenization the tokenizer would not ("Pr" + "actice"
      where encoding gives "Practice") and BPE is not the shortest spelling either; text
      lost on the way (a chunk, several tokens under batching) shows as more."""
    checked = equal = within_two = spellable = 0
    mismatches: list[dict[str, Any]] = []
    invalid = sum(1 for o in outcomes if o.extra.get("invalid_utf8"))
    for outcome in outcomes:
        if not outcome.checkable or outcome.completion_tokens is None:
            continue
        checked += 1
        end_token = 1 if outcome.finish_reason == "stop" else 0
        # A character cut by max_new_tokens (or bytes that are no UTF-8) arrives as U+FFFD:
        # at least one token each, whose bytes the text no longer holds.
        cut_tail = outcome.text.endswith(REPLACEMENT)
        replaced = outcome.text.count(REPLACEMENT) - cut_tail
        text = outcome.text.replace(REPLACEMENT, "")
        expected = count_tokens(text) + replaced + cut_tail + end_token
        difference = abs(expected - outcome.completion_tokens)
        equal += difference == 0
        # Only fewer tokens than reported hints at lost text; more is what the exact
        # check below judges.
        within_two += expected >= outcome.completion_tokens - 2
        spellable += fewest(text, cut_tail) + replaced + end_token <= outcome.completion_tokens
        if difference > 0 and len(mismatches) < 5:
            mismatches.append(
                {
                    "kind": outcome.kind,
                    "reported": outcome.completion_tokens,
                    "received_tokens": expected,
                    "finish_reason": outcome.finish_reason,
                    "text": outcome.text[:120],
                }
            )
    return TokenCheck(checked, equal, within_two, spellable, invalid, mismatches)


@dataclass(frozen=True)
class Goal:
    name: str
    goal: str
    measured: str
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class EndState:
    """The server once every client had gone."""

    seconds_after_last_client: float
    decoding: float  # backend_running
    running: float  # requests holding a slot
    queued: float  # requests_queued + backend_queued
    same_pid: bool
    alive: bool
    server_internal_errors: float  # /metrics code="INTERNAL"
    stalled_streams: float  # /metrics llm_local_streams_stalled_total


def refusal_durations_ms(server_log: str) -> list[float]:
    """From the server's JSON log: how long each at-once RESOURCE_EXHAUSTED took, from
    the request reaching the flow to its refusal."""
    durations: list[float] = []
    for line in server_log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("status") != "RESOURCE_EXHAUSTED":
            continue
        if QUEUE_TIMEOUT_MARK in str(record.get("detail", "")):
            continue
        duration = record.get("duration_ms")
        if isinstance(duration, int | float):
            durations.append(float(duration))
    return durations


def evaluate(
    outcomes: Sequence[Outcome],
    trend: RssTrend | None,
    tokens: TokenCheck,
    end: EndState,
    server_refusals_ms: Sequence[float] = (),
) -> list[Goal]:
    goals: list[Goal] = []
    left = end.decoding + end.running + end.queued
    goals.append(
        Goal(
            "generations left after the clients are gone",
            "0",
            f"{end.decoding:g} decoding, {end.running:g} holding a slot, {end.queued:g} queued "
            f"({end.seconds_after_last_client:.0f} s after the last client)",
            left == 0,
        )
    )
    if trend is None:
        goals.append(
            Goal("RSS growth after warm-up", "flat within noise", "too few samples", False)
        )
    else:
        goals.append(
            Goal(
                "RSS growth after warm-up",
                "flat within noise",
                f"{trend.slope_mib_per_10k:+.1f} MiB per 10,000 requests "
                f"({trend.fitted_growth_mib:+.1f} MiB fitted over {trend.requests_span:.0f} "
                f"requests; noise ±{trend.noise_mib:.1f} MiB; {trend.start_mib:.0f} → "
                f"{trend.end_mib:.0f} MiB, peak {trend.peak_mib:.0f} MiB)",
                trend.flat,
                f"flat: the fitted growth is within {RSS_NOISE_FACTOR:g}× the residual noise",
            )
        )
    client_refusals = [
        o.latency_s * 1000 for o in outcomes if category(o) in (REFUSED_AT_ONCE, REFUSED_TENANT)
    ]
    goals.append(
        _refusal_goal(
            "RESOURCE_EXHAUSTED at once, p99, in the server",
            server_refusals_ms,
            "from the request reaching the flow to its refusal, from the server's log",
        )
    )
    goals.append(
        _refusal_goal(
            "RESOURCE_EXHAUSTED at once, p99, at the client",
            client_refusals,
            "call start to status: adds both HTTP/2 stacks and the load generator's own "
            "scheduling, which shares the CPUs",
        )
    )
    client_internal = sum(1 for o in outcomes if category(o) == "INTERNAL error")
    goals.append(
        Goal(
            "INTERNAL errors",
            "0",
            f"{client_internal} seen by clients, {end.server_internal_errors:g} counted by "
            "the server",
            client_internal == 0 and end.server_internal_errors == 0,
        )
    )
    goals.append(
        Goal(
            "the server never restarted",
            "same pid, alive",
            f"same pid: {'yes' if end.same_pid else 'NO'}, alive: {'yes' if end.alive else 'NO'}",
            end.same_pid and end.alive,
        )
    )
    goals.append(
        Goal(
            "tokens received = completion_tokens",
            "every stream read to the end",
            f"{tokens.spellable} of {tokens.checked} spellable in the reported count; "
            f"re-encoded: {tokens.equal} equal, {tokens.within_two} not short by more than two; "
            f"{tokens.invalid_utf8} gRPC streams with invalid UTF-8",
            tokens.consistent,
            "exact: the text received needs no more of the model's tokens than reported "
            "(+1 for the end token when it stopped by itself); re-encoding it with the "
            "tokenizer is ambiguous by a token or two (the model's spelling need not be "
            "BPE's), so that check allows two",
        )
    )
    unexpected = sum(1 for o in outcomes if is_unexpected(category(o)))
    goals.append(
        Goal(
            "outcomes no client should see",
            "0",
            f"{unexpected}",
            unexpected == 0,
            "a malformed request accepted, a good one refused as invalid, a stream "
            "without its end, a connection error",
        )
    )
    return goals


def _refusal_goal(name: str, durations_ms: Sequence[float], note: str) -> Goal:
    goal = f"< {REFUSAL_P99_GOAL_MS:.0f} ms"
    if not durations_ms:
        return Goal(name, goal, "no refusal happened", False)
    p99 = percentile(durations_ms, 99)
    return Goal(
        name,
        goal,
        f"{p99:.1f} ms (p50 {percentile(durations_ms, 50):.1f} ms, max "
        f"{max(durations_ms):.1f} ms, {len(durations_ms)} refusals)",
        p99 < REFUSAL_P99_GOAL_MS,
        note + "; refusals after waiting queue_timeout_s excluded",
    )


def outcome_table(outcomes: Sequence[Outcome]) -> list[tuple[str, int, str]]:
    """(category, count, kinds that produced it) by count."""
    counts = Counter(category(o) for o in outcomes)
    kinds: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        kinds.setdefault(category(outcome), Counter())[outcome.kind] += 1
    return [
        (name, count, ", ".join(f"{k} {n}" for k, n in kinds[name].most_common()))
        for name, count in counts.most_common()
    ]


def tenant_table(outcomes: Sequence[Outcome]) -> list[tuple[str, int, int, int, str]]:
    """(tenant, requests, completed, refused, p50 latency of completed) per tenant."""
    rows = []
    tenants = sorted({o.tenant or "(none)" for o in outcomes})
    for tenant in tenants:
        mine = [o for o in outcomes if (o.tenant or "(none)") == tenant]
        done = [o.latency_s for o in mine if category(o) == COMPLETED]
        refused = sum(1 for o in mine if o.status == "RESOURCE_EXHAUSTED")
        p50 = f"{percentile(done, 50):.1f} s" if done else "–"
        rows.append((tenant, len(mine), len(done), refused, p50))
    return rows


def render(
    *,
    command: str,
    started: str,
    duration_s: float,
    machine: dict[str, Any],
    load_average_at_end: tuple[float, float, float] | None,
    settings: dict[str, Any],
    capacity: dict[str, Any],
    outcomes: Sequence[Outcome],
    goals: Sequence[Goal],
    tokens: TokenCheck,
    end: EndState,
    plot_name: str | None,
    throughput_tps: float,
) -> str:
    passed = sum(1 for goal in goals if goal.passed)
    lines = [
        "# Reliability: the soak run",
        "",
        f"`{command}` drove a real `llm-local serve` (production settings, bound to "
        f"127.0.0.1) for {duration_s / 60:.0f} minutes at about twice its measured capacity "
        "with a mix of well-behaved and abusive clients. Reproduce with `make soak` (10 "
        'minutes) or `make soak SOAK_ARGS="--duration 300"`.',
        "",
        f"**{passed} of {len(goals)} goals met.**",
        "",
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu')}, {machine.get('logical_cpus')} logical CPUs, "
        f"{machine.get('memory_gib')} GiB",
        f"- {machine.get('os')}, Python {machine.get('python')}, commit {machine.get('commit')}",
        f"- load average at start {_load(machine.get('load_average_at_start'))}, at end "
        f"{_load(load_average_at_end)}. The machine is shared with other developers' work: "
        "figures of time are upper bounds of what a quiet machine shows.",
        f"- started {started} UTC",
        "",
        "## Load",
        "",
        f"- capacity measured first: {capacity['probe_streams']} closed-loop streams for "
        f"{capacity['probe_s']:.0f} s completed {capacity['requests_per_s']:.2f} requests/s "
        f"({capacity['tokens_per_s']:.0f} tokens/s); the soak offered "
        f"{capacity['offered_per_s']:.2f} requests/s (×{capacity['load_factor']:g}), "
        "Poisson arrivals",
        f"- {len(outcomes)} requests in all; the server generated {throughput_tps:.0f} "
        "tokens/s on average",
        f"- max_new_tokens drawn from {settings['max_new_tokens_range']}; tenants and their "
        f"share of requests: {settings['tenants']}",
        f"- client mix: {settings['mix']}",
        f"- server settings: {settings['server']}",
        "",
        "## Goals",
        "",
        "| what | goal | measured | verdict |",
        "|---|---|---|---|",
    ]
    for goal in goals:
        note = f" ({goal.note})" if goal.note else ""
        verdict = "pass" if goal.passed else "**FAIL**"
        lines.append(f"| {goal.name} | {goal.goal} | {goal.measured}{note} | {verdict} |")
    lines += [
        "",
        "## Requests by outcome",
        "",
        "| outcome | requests | from |",
        "|---|---|---|",
    ]
    for name, count, kinds in outcome_table(outcomes):
        lines.append(f"| {name} | {count} | {kinds} |")
    lines += [
        "",
        f"The server cancelled {end.stalled_streams:g} streams whose client had stopped "
        "reading (`llm_local_streams_stalled_total`).",
        "",
        "## Per tenant",
        "",
        "| tenant | requests | completed | RESOURCE_EXHAUSTED | completed, p50 latency |",
        "|---|---|---|---|---|",
    ]
    for tenant, count, done, refused, p50 in tenant_table(outcomes):
        lines.append(f"| {tenant} | {count} | {done} | {refused} | {p50} |")
    if tokens.mismatches:
        lines += ["", "First token-count mismatches:", ""]
        for item in tokens.mismatches:
            lines.append(f"- `{item}`")
    if plot_name:
        lines += ["", "## Over time", "", f"![the server over time]({plot_name})"]
    lines += ["", "## How to read it", "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = (
    "- The load generator runs on the same machine as the server and shares its CPUs; "
    "every latency seen by a client includes the client's own waits for a CPU. The "
    "server's log times each refusal from the request reaching the flow (after the "
    "HTTP/2 and gRPC framing) to the refusal: that figure is the server's own.",
    "- Capacity is measured with well-behaved streams only; the soak's mix then offers "
    "twice that many requests per second, but cancelled, refused and malformed requests "
    "cost less than a full answer, so the real overload is lower than ×2 in tokens.",
    "- A client that stops reading holds its connection for stall_timeout_s + 150 s: "
    "time to wait for a slot, receive its first tokens (an SSE stream blocks only once "
    "about 150 chunks fill the socket and the stream's buffer), and be cancelled by the "
    "server. One that is still queued or generating slowly when it gives up is counted "
    "as disconnected by the server, not as stalled.",
    "- Generations left after the clients are gone are read from /metrics "
    "(llm_local_backend_running, llm_local_requests_running, the queues) a few seconds "
    "after the last client finished or closed its connection.",
    "- Not covered by the soak: HTTP/2 cleartext clients of the HTTP port that stop "
    "reading. hypercorn 0.18 keeps buffering their response (README, 'Sharing the "
    "server'), so they run to max_tokens instead of being cancelled.",
)


def _load(value: object) -> str:
    if not isinstance(value, list | tuple):
        return "unknown"
    return " / ".join(f"{v:.2f}" for v in value)
