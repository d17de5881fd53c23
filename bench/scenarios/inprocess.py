"""In-process CTranslate2 on the converted model: no server, no transport.

Both run the kernels the ct2 server chose under default settings (`context.kernels`,
bench/served.py): its compute type, kernel environment and thread layout.

- ``ct2-stream``: one stream, `generate_tokens` on one worker of the server's threads per
  worker. The gRPC server's one-stream numbers are judged against this.
- ``ct2-batch``: the ceiling for N concurrent streams: N prompts as one asynchronous
  `generate_batch` call per server worker, no callback, repeated for the level's duration.
  Tokens are only seen when a batch ends, so no TTFT.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from bench.config import BenchConfig
from bench.loops import run_sequential
from bench.processes import CpuMeter
from bench.records import CT2_BATCH, CT2_STREAM, LevelRun, RequestRecord
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped
from bench.served import Kernels
from bench.stats import steady_window

if TYPE_CHECKING:
    import ctranslate2


def _kernels(context: ScenarioContext) -> Kernels:
    if context.kernels is None:
        raise ScenarioSkipped("the ct2 server's choice of kernels is unknown (bench/served.py)")
    return context.kernels


def _generator(context: ScenarioContext, inter_threads: int) -> ctranslate2.Generator:
    import ctranslate2

    kernels = _kernels(context)
    return ctranslate2.Generator(
        str(context.model_dir),
        device="cpu",
        compute_type=kernels.compute_type,
        inter_threads=inter_threads,
        intra_threads=kernels.intra_threads,
    )


def _greedy(context: ScenarioContext, max_new_tokens: int) -> dict[str, Any]:
    return {
        "max_length": max_new_tokens,  # new tokens only (the prompt is not counted)
        "sampling_topk": 1,
        "end_token": list(context.prompts.end_token_ids),
    }


def run_stream(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    import ctranslate2

    kernels = _kernels(context)
    context.details[CT2_STREAM] = {
        "ctranslate2": ctranslate2.__version__,
        **kernels.to_json(),
        "inter_threads": 1,
    }
    generator = _generator(context, inter_threads=1)
    end_ids = frozenset(context.prompts.end_token_ids)

    def send(client: int, sequence: int, max_new_tokens: int) -> RequestRecord:
        prompt = context.prompts.prompts[config.prompt_for(client, sequence)]
        arrivals: list[float] = []
        finish = "length"
        start = time.perf_counter()
        steps = generator.generate_tokens(list(prompt.tokens), **_greedy(context, max_new_tokens))
        # Breaking out of the loop alone would let decoding run on (FINDINGS.md).
        with contextlib.closing(steps):
            for step in steps:
                if step.token_id in end_ids:
                    finish = "stop"
                    break
                arrivals.append(time.perf_counter())
        end = time.perf_counter()
        return RequestRecord.streamed(client, start, end, arrivals, finish_reason=finish)

    try:
        send(0, 0, 4)  # warm-up: first-call allocations are not what we measure
        meter = CpuMeter(os.getpid())
        records, window = run_sequential(
            config.duration_s,
            config.max_sequential_requests,
            lambda client, sequence: send(client, sequence, config.max_new_tokens),
        )
        collect(LevelRun(CT2_STREAM, 1, records, window, client=meter.finish(with_memory=False)))
    finally:
        # Explicitly, not at interpreter exit (FINDINGS.md: an abort was seen there).
        generator.unload_model()


def run_batch(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    import ctranslate2

    kernels = _kernels(context)
    context.details[CT2_BATCH] = {"ctranslate2": ctranslate2.__version__, **kernels.to_json()}
    generator = _generator(context, inter_threads=kernels.inter_threads)
    try:
        _one_round(
            config, context, generator, streams=kernels.inter_threads, round_index=0, tokens=4
        )
        for streams in config.streams:
            if streams < 2:
                continue  # one stream in-process is ct2-stream
            meter = CpuMeter(os.getpid())
            records: list[RequestRecord] = []
            started = time.perf_counter()
            rounds = 0
            while rounds == 0 or time.perf_counter() < started + config.duration_s:
                records.extend(
                    _one_round(
                        config,
                        context,
                        generator,
                        streams=streams,
                        round_index=rounds,
                        tokens=config.max_new_tokens,
                    )
                )
                rounds += 1
            collect(
                LevelRun(
                    CT2_BATCH,
                    streams,
                    tuple(records),
                    steady_window(records, started),
                    client=meter.finish(with_memory=False),
                    notes=(f"{rounds} rounds of {streams} prompts",),
                )
            )
    finally:
        generator.unload_model()


def _one_round(
    config: BenchConfig,
    context: ScenarioContext,
    generator: ctranslate2.Generator,
    *,
    streams: int,
    round_index: int,
    tokens: int,
) -> list[RequestRecord]:
    """`streams` prompts split over the workers, decoded to the end; one record each."""
    prompts = [
        context.prompts.prompts[config.prompt_for(client, round_index)] for client in range(streams)
    ]
    share = -(-streams // _kernels(context).inter_threads)  # ceiling division
    batches = [prompts[i : i + share] for i in range(0, streams, share)]
    start = time.perf_counter()
    pending = [
        generator.generate_batch(
            [list(prompt.tokens) for prompt in batch],
            beam_size=1,
            include_prompt_in_result=False,
            asynchronous=True,
            **_greedy(context, tokens),
        )
        for batch in batches
    ]
    results = [item.result() for batch_results in pending for item in batch_results]
    end = time.perf_counter()
    records = []
    for client, result in enumerate(results):
        generated = len(result.sequences_ids[0])
        records.append(
            RequestRecord(
                client=client,
                start=start,
                end=end,
                tokens=generated,
                finish_reason="length" if generated >= tokens else "stop",
            )
        )
    return records
