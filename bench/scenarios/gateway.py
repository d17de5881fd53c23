"""The open loop shaped like the gateway: capacity at SLO of llm-local and of llama.cpp.

Requests from bench/workload.py (four tenants' personas, optional RAG context, 0-4
history turns, a short user turn, 32-128 new tokens) arrive as a Poisson process at an
offered rate; each is sent at its arrival time (bench/openloop.py). Per target:

1. the server starts (llm-local: `llm-local serve` with each variant's settings, over
   gRPC with the LlamaService fields the gateway fills; llama.cpp: its server with the
   prompt cache on, `cache_prompt: true`, as its users run it, the prompt rendered by
   our own template code and sent as token ids);
2. a few requests one at a time measure how long one request takes alone; the sweep
   starts at the lattice rate (powers of √2) where a server that served one request at
   a time would be half busy, so the grid follows the machine, never a constant;
3. levels at doubling rates until one misses the SLO (or halving while they all miss),
   then bisection between the last rate met and the first missed (bench/slo.py).

Between levels the server is given time to finish cancelled work (its CPU falls idle).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench import machine
from bench.config import LLAMA_CPP_SLOTS, BenchConfig
from bench.models import gateway_prompt_encoder
from bench.openloop import run_open_loop
from bench.processes import ServerProcess, cpu_seconds
from bench.records import (
    GATEWAY,
    LLAMA_CPP,
    SERVER_VARIANTS,
    RateRun,
    RequestRecord,
    ServerVariant,
)
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped
from bench.slo import (
    Slo,
    SweepPlan,
    level_window_s,
    next_rate,
    starting_rate,
    summarize_rate,
)
from bench.stats import steady_window, tokens_in_window
from bench.workload import MAX_NEW_TOKENS, TENANTS, GatewayRequest, request_at, schedule

Send = Callable[[GatewayRequest], Awaitable[RequestRecord]]

# The requests that measure one request alone: indices the levels never send, so a
# prompt cache holds none of a level's requests beforehand.
PROBE_FIRST_INDEX = 1_000_000
PROBE_REQUESTS = 4  # the first one warms up and is not counted
# Probe indices searched, beyond those, for a request of each tenant not seen yet.
WARM_UP_REQUESTS = 64
PROBE_BUDGET_S = 30.0
# The saturating clients' requests: indices neither the probe nor any level sends.
SATURATION_FIRST_INDEX = 2_000_000
# Every level sends at least this many requests, however low its rate (its window then
# runs to the last one's arrival).
LEAST_REQUESTS = 4
# How long the drain may last beyond what a request can take and still meet the SLO.
DRAIN_MARGIN_S = 1.0
# The server counts as idle again below this share of one core.
IDLE_CPU_SHARE = 0.15
SETTLE_TIMEOUT_S = 20.0
# llama.cpp: the context each slot needs for the longest request of the mix.
CONTEXT_SAMPLE = 400
CONTEXT_ROUNDING = 256


class TargetsFailed(Exception):
    """Some targets of the open loop did not run; the others' levels are kept."""


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    del collect  # the open loop's levels go to context.rate_runs
    slo = Slo(config.slo_ttft_s, config.slo_tpot_s)
    context.details[GATEWAY] = {
        "SLO": slo.describe(),
        "seed": config.gateway_seed,
        "arrival window per level": f"{config.gateway_level_s:g} s, up to "
        f"{config.gateway_max_level_s:g} s for {config.gateway_min_requests} requests",
        "drain": f"{_drain_s(slo):.1f} s",
    }
    variants = {variant.scenario: variant for variant in SERVER_VARIANTS}
    failures: list[str] = []
    for target in config.gateway_targets:
        context.log(f"  target {target}")
        try:
            if target == LLAMA_CPP:
                _run_llama_cpp(config, context, slo)
            else:
                _run_llm_local(config, context, slo, target, variants[target])
        except ScenarioSkipped as exc:
            context.log(f"  {target} skipped: {exc}")
            failures.append(f"{target} skipped: {exc}")
        except Exception as exc:
            context.log(f"  {target} FAILED: {type(exc).__name__}: {exc}")
            failures.append(f"{target} failed: {type(exc).__name__}: {exc}")
    if failures:
        raise TargetsFailed("; ".join(failures))


def _run_llm_local(
    config: BenchConfig,
    context: ScenarioContext,
    slo: Slo,
    target: str,
    variant: ServerVariant,
) -> None:
    from bench.scenarios import grpc_server

    name = f"{GATEWAY}-{target}"
    with grpc_server.serving(config, context, variant, name) as (server, port):
        asyncio.run(_grpc_sweep(config, context, slo, target, server, port))
        context.details[name]["exit_status"] = server.stop()


async def _grpc_sweep(
    config: BenchConfig,
    context: ScenarioContext,
    slo: Slo,
    target: str,
    server: ServerProcess,
    port: int,
) -> None:
    import grpc

    from bench.scenarios.grpc_server import generate_method, one_request
    from llm_local.proto.sentiric.llm.v1 import llama_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        generate = generate_method(channel)

        async def send(request: GatewayRequest) -> RequestRecord:
            message = llama_pb2.GenerateStreamRequest(
                system_prompt=request.system_prompt,
                user_prompt=request.user_prompt,
                history=[
                    llama_pb2.ConversationTurn(role=role, content=content)
                    for role, content in request.history
                ],
                params=llama_pb2.GenerationParams(
                    max_new_tokens=request.max_new_tokens, temperature=0.0
                ),
            )
            if request.rag_context is not None:
                message.rag_context = request.rag_context
            return await one_request(generate, message, request.index)

        await _sweep(config, context, slo, target, server, send)


def _run_llama_cpp(config: BenchConfig, context: ScenarioContext, slo: Slo) -> None:
    from bench.scenarios import llama_cpp

    encode = gateway_prompt_encoder(context.model_dir)
    longest = max(
        len(encode(request_at(config.gateway_seed, index))) for index in range(CONTEXT_SAMPLE)
    )
    per_slot = -(-(longest + MAX_NEW_TOKENS + 16) // CONTEXT_ROUNDING) * CONTEXT_ROUNDING
    name = f"{GATEWAY}-{LLAMA_CPP}"
    with llama_cpp.serving(
        config, context, name, slots=LLAMA_CPP_SLOTS, context_tokens=LLAMA_CPP_SLOTS * per_slot
    ) as (server, port):
        context.details[name]["prompt cache"] = "cache_prompt: true"

        async def send(request: GatewayRequest) -> RequestRecord:
            body = {
                "prompt": list(encode(request)),
                "n_predict": request.max_new_tokens,
                "temperature": 0,
                "stream": True,
                "cache_prompt": True,
            }
            return await llama_cpp.one_request(port, body, request.index)

        asyncio.run(_sweep(config, context, slo, LLAMA_CPP, server, send))


async def _sweep(
    config: BenchConfig,
    context: ScenarioContext,
    slo: Slo,
    target: str,
    server: ServerProcess,
    send: Send,
) -> None:
    alone_s = await _one_request_alone(config, send)
    # The lowest rate whose least requests still arrive within the longest window: a
    # server that misses the SLO even there has a capacity of about nothing.
    floor = LEAST_REQUESTS / config.gateway_max_level_s
    start = max(starting_rate(alone_s), floor)
    plan = SweepPlan(
        start_rps=start,
        max_levels=config.gateway_max_levels,
        refinements=config.gateway_refinements,
        min_rps=max(start / 4, floor),
    )
    context.details[f"{GATEWAY}-{target}"]["one request alone"] = f"{alone_s:.2f} s"
    context.log(f"  one request alone: {alone_s:.2f} s; first rate {plan.start_rps:.3g} req/s")
    explicit = list(config.gateway_rates or ())
    outcomes: list[tuple[float, bool]] = []

    def following() -> float | None:
        if config.gateway_rates is not None:
            return explicit.pop(0) if explicit else None
        return next_rate(plan, outcomes)

    rate = following()
    while rate is not None:
        window_s = level_window_s(
            rate,
            config.gateway_level_s,
            config.gateway_min_requests,
            config.gateway_max_level_s,
        )
        arrivals = schedule(config.gateway_seed, rate, window_s, LEAST_REQUESTS)
        window_s = max(window_s, arrivals[-1].offset_s)
        records, window = await run_open_loop(
            arrivals,
            send,
            window_s=window_s,
            drain_s=_drain_s(slo),
            max_in_flight=config.gateway_max_in_flight,
        )
        load = machine.load_average()
        notes = () if load is None else (f"1-min load average at the end: {load[0]:.2f}",)
        run = RateRun(target, rate, records, window, notes)
        context.rate_runs.append(run)
        summary = summarize_rate(run, slo)
        outcomes.append((rate, summary.meets_slo))
        context.log(
            f"  @{rate:.3g} req/s: {summary.sent} sent, {summary.failed} failed; TTFT p50 "
            f"{summary.ttft_p50_ms:,.0f} p95 {summary.ttft_p95_ms:,.0f} ms; TPOT p95 "
            f"{_ms(summary.tpot_p95_ms)}; goodput {summary.goodput_rps:.2f} req/s; "
            f"{'meets' if summary.meets_slo else 'misses'} the SLO; {', '.join(notes)}"
        )
        server.check_alive()
        await settle(server.pid)
        rate = following()
    if config.gateway_saturation_s > 0:
        saturated = await saturated_throughput(config, send)
        context.details[f"{GATEWAY}-{target}"]["saturated"] = saturated.describe()
        context.log(f"  saturated: {saturated.describe()}")
        server.check_alive()
        await settle(server.pid)


@dataclass(frozen=True, slots=True)
class Saturated:
    requests_per_s: float
    tokens_per_s: float
    in_flight: int
    seconds: float

    def describe(self) -> str:
        return (
            f"{self.requests_per_s:.2f} req/s, {self.tokens_per_s:.0f} tokens/s completed "
            f"with {self.in_flight} requests always in flight ({self.seconds:.0f} s)"
        )


async def saturated_throughput(config: BenchConfig, send: Send) -> Saturated:
    """The mix as fast as the server completes it: LLAMA_CPP_SLOTS clients, each sending
    its next request (from an index range no level sends) when its last one ends, for
    `gateway_saturation_s`. Counted from the first completion (the opening burst of
    prompts has none) until the first client's last request ended (bench/stats.py
    `steady_window`): a server cannot meet any SLO at a rate above this."""
    records: list[RequestRecord] = []
    indices = itertools.count(SATURATION_FIRST_INDEX)
    started = time.perf_counter()
    stop_at = started + config.gateway_saturation_s

    async def client(number: int) -> None:
        while time.perf_counter() < stop_at:
            record = await send(request_at(config.gateway_seed, next(indices)))
            records.append(dataclasses.replace(record, client=number))

    await asyncio.gather(*(client(number) for number in range(LLAMA_CPP_SLOTS)))
    _, high = steady_window(records, started)
    low = min((record.end for record in records if record.ok), default=high)
    seconds = high - low
    if seconds <= 0:
        return Saturated(0.0, 0.0, LLAMA_CPP_SLOTS, 0.0)
    completed = sum(1 for record in records if record.ok and low < record.end <= high)
    tokens = sum(tokens_in_window(record, low, high) for record in records)
    return Saturated(completed / seconds, tokens / seconds, LLAMA_CPP_SLOTS, seconds)


async def _one_request_alone(config: BenchConfig, send: Send) -> float:
    """The median time of one request with nothing else running (after a warm-up); on
    a server so slow that the probe outlasts PROBE_BUDGET_S, fewer requests.

    The probe goes on, uncounted, until every tenant has sent a request: a gateway's
    server has read every persona long before, and a server with a prompt cache would
    otherwise meet the first level cold and the later ones warm."""
    durations: list[float] = []
    unseen = {tenant.name for tenant in TENANTS}
    deadline = time.monotonic() + PROBE_BUDGET_S
    for offset in range(PROBE_REQUESTS + WARM_UP_REQUESTS):
        request = request_at(config.gateway_seed, PROBE_FIRST_INDEX + offset)
        if offset >= PROBE_REQUESTS and request.tenant not in unseen:
            continue
        record = await send(request)
        if not record.ok:
            raise RuntimeError(f"a request sent alone failed: {record.error}")
        unseen.discard(request.tenant)
        if 0 < offset < PROBE_REQUESTS:
            durations.append(record.end - record.start)
        if not unseen and (len(durations) == PROBE_REQUESTS - 1 or time.monotonic() > deadline):
            break
    return statistics.median(durations)


async def settle(pid: int) -> None:
    """Wait until the server's CPU use falls below IDLE_CPU_SHARE of one core (work a
    cancelled request left behind is done), at most SETTLE_TIMEOUT_S."""
    interval = 0.5
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(interval)
        if (cpu_seconds(pid) - before) / interval < IDLE_CPU_SHARE:
            return


def _drain_s(slo: Slo) -> float:
    return slo.longest_compliant_s(MAX_NEW_TOKENS) + DRAIN_MARGIN_S


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"
