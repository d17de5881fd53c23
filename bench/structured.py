"""Structured output on the backends that support it, in process (not part of `make test`):

    python -m bench.structured speed [--streams 1 16] [--tokens 64] [--backends B ...]
    python -m bench.structured coverage --corpus DIR [--harness DIR] [--count 300] [--tokens N]
        [--streams 16] [--backend B] [--sets S,...]

`speed` (also `make bench`'s scenario `structured`): constrained vs unconstrained decoding
side by side in one run on each backend (`--backends`, default llama_cpp then
transformers), the same prompt
(a count that never ends by itself), N concurrent streams, greedy: tokens/s over the
whole run and the median time to first token. The constrained requests follow a JSON
schema (an array of at least 200 integers) that keeps them generating as long as the
free ones, so both decode the same number of tokens.

`coverage` (`--backend`, default llama_cpp): JSON schemas from JSONSchemaBench
(github.com/guidance-ai/jsonschemabench: its Glaiveai2K function-call set and its GitHub
sets, in a fixed order), each asked for once ("Answer with a JSON value matching this
schema: …", the schema cut at 1,500 characters, greedy: the grammar alone makes the
answer fit). Reported: the
share accepted, the share of accepted answers that parse and validate (`jsonschema`), the
share cut at `--tokens` before the value was complete, and the share refused naming a
feature, with the most common reasons. Pass the corpus checkout with `--corpus`.

With `--harness` (a checkout of github.com/epfl-dlab/jsonschemabench, the paper's own
harness) each schema is asked for and judged as the paper did (bench/jsonschemabench.py):
its system prompt and two worked examples per set, the whole schema, at most 2,048 new
tokens, Draft 2020-12 with formats asserted. Its `covered` column is then the paper's
empirical coverage, measured the paper's way, on another model.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench import served
from bench.report import render_text_table
from bench.studies import STRUCTURED_COLUMNS, StructuredLevel, structured_rows
from llm_local.backends.base import Backend
from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.core.errors import InvalidRequest
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.structured.constraint import OutputConstraint, canonical_json
from llm_local.core.types import (
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingOptions,
    TextChunk,
)
from llm_local.settings.loader import load_settings

ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
LONG_ARRAY = {"type": "array", "items": {"type": "integer"}, "minItems": 200}
CORPUS_SETS = ("Glaiveai2K", "Github_easy", "Github_medium", "Github_hard")
# The backends with a grammar engine (core/structured/constraint.py).
SPEED_BACKENDS = ("llama_cpp", "transformers")


async def load(streams: int, context_tokens: int = 1024) -> LlamaCppBackend:
    loaded = load_settings(env="test", overrides=served.backend_defaults())
    options = dataclasses.replace(
        loaded.llama_cpp,
        sequences=max(streams, 1),
        kv_cache_tokens=max(streams, 1) * context_tokens,
        # Long prompts (thousands of tokens each): in one pool every token's attention would
        # scan all sequences' cells, many times the cost of a stream per sequence.
        kv_layout="pool" if context_tokens <= 1024 else "per_sequence",
    )
    settings = dataclasses.replace(loaded, llama_cpp=options)
    backend = LlamaCppBackend(lambda: plan_from_settings(settings))
    await backend.load()
    return backend


async def load_backend(name: str, streams: int, context_tokens: int = 1024) -> Backend:
    """`name` loaded on the test settings, sized for `streams` requests of `context_tokens`
    (prompt and answer) at once."""
    if name == "llama_cpp":
        return await load(streams, context_tokens)
    if name != "transformers":
        raise ValueError(f"no structured output on {name!r}: one of {', '.join(SPEED_BACKENDS)}")
    from llm_local.backends.transformers.backend import TransformersBackend
    from llm_local.backends.transformers.loader import plan_from_settings as transformers_plan

    loaded = load_settings(env="test", overrides=served.backend_defaults())
    options = dataclasses.replace(
        loaded.transformers,
        max_requests_per_batch=max(streams, loaded.transformers.max_requests_per_batch),
        kv_cache_tokens=max(streams, 1) * context_tokens,
    )
    settings = dataclasses.replace(loaded, transformers=options)
    backend = TransformersBackend(lambda: transformers_plan(settings), options)
    await backend.load()
    return backend


@dataclasses.dataclass
class Outcome:
    text: str
    finished: Finished
    ttft_s: float


def question_request(
    question: str, constraint: OutputConstraint | None, tokens: int
) -> GenerationRequest:
    """One user turn, greedy, at most `tokens` new tokens, held to `constraint` if any."""
    return GenerationRequest(
        user_prompt=question,
        max_new_tokens=tokens,
        sampling=SamplingOptions(constraint=constraint),
    )


async def generate(
    backend: Backend, question: str, constraint: OutputConstraint | None, tokens: int
) -> Outcome:
    return await answer(backend, question_request(question, constraint, tokens))


async def answer(backend: Backend, request: GenerationRequest) -> Outcome:
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    started = time.perf_counter()
    first: list[float] = []
    parts: list[str] = []

    async def on_text(chunk: TextChunk) -> None:
        if not first:
            first.append(time.perf_counter() - started)
        parts.append(chunk.text)

    finished = await run_generation(backend, request, prepared, on_text)
    return Outcome("".join(parts), finished, first[0] if first else float("nan"))


async def run_level(
    backend: Backend, streams: int, constraint: OutputConstraint | None, tokens: int
) -> tuple[float, float]:
    outcomes: list[Outcome] = []

    async def one() -> None:
        outcomes.append(await generate(backend, ENDLESS, constraint, tokens))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
    wall = time.perf_counter() - started
    generated = sum(outcome.finished.completion_tokens for outcome in outcomes)
    return generated / wall, statistics.median(outcome.ttft_s for outcome in outcomes)


async def measure_speed(
    levels: list[int],
    tokens: int,
    rounds: int,
    backends: tuple[str, ...] = SPEED_BACKENDS,
) -> list[StructuredLevel]:
    """On each backend, one after the other: free and constrained at every level,
    `rounds` interleaved rounds each: medians."""
    found: list[StructuredLevel] = []
    for name in backends:
        found.extend(await _measure_backend(name, levels, tokens, rounds))
    return found


async def _measure_backend(
    name: str, levels: list[int], tokens: int, rounds: int
) -> list[StructuredLevel]:
    backend = await load_backend(name, max(levels))
    constraint = OutputConstraint(field="bench", schema=canonical_json(LONG_ARRAY))
    found: list[StructuredLevel] = []
    try:
        await run_level(backend, 1, None, 8)  # warm up
        for streams in levels:
            results: dict[str, list[tuple[float, float]]] = {"free": [], "constrained": []}
            for _ in range(rounds):  # interleaved: load drift hits both alike
                results["free"].append(await run_level(backend, streams, None, tokens))
                results["constrained"].append(await run_level(backend, streams, constraint, tokens))
            free, constrained = results["free"], results["constrained"]
            found.append(
                StructuredLevel(
                    backend=name,
                    streams=streams,
                    free_tps=statistics.median(r for r, _ in free),
                    constrained_tps=statistics.median(r for r, _ in constrained),
                    free_ttft_s=statistics.median(t for _, t in free),
                    constrained_ttft_s=statistics.median(t for _, t in constrained),
                )
            )
    finally:
        await backend.aclose()
    return found


async def speed(levels: list[int], tokens: int, rounds: int, backends: list[str]) -> None:
    found = await measure_speed(levels, tokens, rounds, tuple(backends))
    print(render_text_table(structured_rows(found), STRUCTURED_COLUMNS))


def corpus_schemas(
    corpus: Path, count: int, sets: Sequence[str] = CORPUS_SETS
) -> list[tuple[str, str]]:
    """The first `count` schemas, as many of each set, by file name."""
    per_set = -(-count // len(sets))
    schemas: list[tuple[str, str]] = []
    for name in sets:
        files = sorted((corpus / "data" / name).glob("*.json"))[:per_set]
        schemas.extend((f"{name}/{path.name}", path.read_text()) for path in files)
    return schemas[:count]


async def coverage(
    corpus: Path,
    count: int,
    tokens: int | None,
    streams: int,
    backend_name: str = "llama_cpp",
    sets: Sequence[str] = CORPUS_SETS,
    harness: Path | None = None,
) -> None:
    import jsonschema

    from bench import jsonschemabench

    formatter = None if harness is None else jsonschemabench.load_formatter(harness)
    if tokens is None:
        tokens = OUR_MAX_TOKENS if formatter is None else jsonschemabench.PAPER_MAX_TOKENS
    # The harness's prompts carry whole schemas and two worked examples: thousands of
    # tokens; each request may use the model's whole context, as the harness's did.
    context_tokens = 1024 if formatter is None else 8192
    backend = await load_backend(backend_name, streams, context_tokens)
    checker = backend.info.sampling.constraints
    assert checker is not None, "llguidance is not installed"
    schemas = corpus_schemas(corpus, count, sets)
    refused: collections.Counter[str] = collections.Counter()
    results: dict[str, str] = {}
    limiter = trio.Semaphore(streams)

    def our_request(schema: Any, constraint: OutputConstraint) -> GenerationRequest:
        # The grammar alone makes the answer fit; the schema in the prompt (its first
        # 1,500 characters: reading long ones would dominate the run) lets the model finish
        # its value instead of rambling inside a string until the token limit.
        question = f"Answer with a JSON value matching this schema: {json.dumps(schema)[:1500]}"
        return question_request(question, constraint, tokens)

    def our_rule(text: str, schema: Any) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError) as exc:
            print(f"invalid: {str(exc)[:120]}", file=sys.stderr)
            return False
        return True

    async def one(name: str, text: str) -> None:
        try:
            schema = json.loads(text)
        except ValueError:
            results[name] = "unreadable"
            return
        constraint = OutputConstraint(field="bench", schema=canonical_json(schema))
        why = checker.refusal(constraint)
        if why is not None:
            results[name] = "refused"
            refused[why.split(";")[0][:70]] += 1
            return
        if formatter is None:
            request = our_request(schema, constraint)
        else:
            messages = formatter(name.split("/")[0], schema)
            request = jsonschemabench.request_from_messages(messages, constraint, tokens)
        async with limiter:
            try:
                outcome = await answer(backend, request)
            except InvalidRequest:
                results[name] = "too long"  # the prompt alone fills the model's context
                return
        if outcome.finished.reason in CUT_SHORT:
            results[name] = "cut"
            return
        rule = our_rule if formatter is None else jsonschemabench.validates
        if not rule(outcome.text, schema):
            results[name] = "invalid"
            print(f"invalid: {name}: {outcome.text[:200]!r}", file=sys.stderr)
            return
        results[name] = "valid"

    def report(name: str) -> None:
        print(f"{len(results):4d}/{len(schemas)} {results[name]:10s} {name}", flush=True)

    async def reported(name: str, text: str) -> None:
        await one(name, text)
        report(name)

    started = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            for name, text in schemas:
                nursery.start_soon(reported, name, text)
    finally:
        await backend.aclose()
    counts = collections.Counter(results.values())
    total = len(schemas)
    accepted = sum(counts[outcome] for outcome in ACCEPTED_OUTCOMES)
    finished = counts["valid"] + counts["invalid"]
    protocol = "ours" if harness is None else f"JSONSchemaBench's harness ({harness})"
    print(f"{total} schemas ({', '.join(sets)}), {time.perf_counter() - started:.0f} s")
    print(f"protocol: {protocol}, {backend_name}, greedy, at most {tokens} new tokens")
    print(f"accepted: {accepted} ({accepted / total:.1%})")
    print(f"refused naming a feature: {counts['refused']} ({counts['refused'] / total:.1%})")
    print(f"unreadable JSON: {counts['unreadable']}")
    print(f"answers cut short ({tokens} tokens, or the context full): {counts['cut']}")
    print(f"prompts too long for the model's context: {counts['too long']}")
    if finished:
        print(
            f"finished answers that validate: {counts['valid']} / {finished} "
            f"({counts['valid'] / finished:.1%})"
        )
    for reason, times in refused.most_common(12):
        print(f"  {times:4d}  {reason}")
    print(render_text_table(coverage_rows(results), COVERAGE_COLUMNS))


COVERAGE_COLUMNS = (
    "set",
    "schemas",
    "accepted",
    "refused",
    "valid",
    "invalid",
    "cut",
    "too long",
    "covered",
)
# Ends that leave the value unfinished: the token limit, or the model's context full.
CUT_SHORT = (FinishReason.LENGTH, FinishReason.CONTEXT_FULL)
# A schema the grammar engine compiled, whatever became of its answer.
ACCEPTED_OUTCOMES = ("valid", "invalid", "cut", "too long")
OUR_MAX_TOKENS = 256


def coverage_rows(results: dict[str, str]) -> list[list[str]]:
    """Per corpus set: what became of its schemas. `covered` is the paper's empirical
    coverage (arXiv 2501.10868): the share of the set's schemas answered with a value that
    validates; an answer cut at the token limit is not covered, whatever it was becoming."""
    rows: list[list[str]] = []
    for name in CORPUS_SETS:
        outcomes = collections.Counter(
            outcome for schema, outcome in results.items() if schema.split("/")[0] == name
        )
        total = sum(outcomes.values())
        if not total:
            continue
        accepted = sum(outcomes[outcome] for outcome in ACCEPTED_OUTCOMES)
        counted = [outcomes[key] for key in ("refused", "valid", "invalid", "cut", "too long")]
        covered = f"{outcomes['valid'] / total:.0%}"
        rows.append([name, str(total), str(accepted), *map(str, counted), covered])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.structured")
    sub = parser.add_subparsers(dest="command", required=True)
    speed_parser = sub.add_parser("speed")
    speed_parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    speed_parser.add_argument("--tokens", type=int, default=64)
    speed_parser.add_argument("--rounds", type=int, default=3)
    speed_parser.add_argument(
        "--backends", nargs="+", choices=SPEED_BACKENDS, default=list(SPEED_BACKENDS)
    )
    coverage_parser = sub.add_parser("coverage")
    coverage_parser.add_argument("--corpus", type=Path, required=True)
    coverage_parser.add_argument("--count", type=int, default=300)
    coverage_parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help=f"new tokens at most (default {OUR_MAX_TOKENS}; with --harness, the harness's 2048)",
    )
    coverage_parser.add_argument(
        "--harness",
        type=Path,
        default=None,
        help="a checkout of github.com/epfl-dlab/jsonschemabench: ask and judge as the paper did",
    )
    coverage_parser.add_argument("--streams", type=int, default=16)
    coverage_parser.add_argument("--backend", choices=SPEED_BACKENDS, default="llama_cpp")
    coverage_parser.add_argument(
        "--sets",
        type=lambda text: text.split(","),
        default=list(CORPUS_SETS),
        help=f"comma-separated corpus sets (default: {','.join(CORPUS_SETS)})",
    )
    args: Any = parser.parse_args(argv)
    if args.command == "speed":
        trio.run(speed, args.streams, args.tokens, args.rounds, args.backends)
    else:
        trio.run(
            coverage,
            args.corpus,
            args.count,
            args.tokens,
            args.streams,
            args.backend,
            args.sets,
            args.harness,
        )


if __name__ == "__main__":
    main()
