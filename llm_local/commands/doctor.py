"""`llm-local doctor`: the numerics verdict table for this machine.

Every candidate compute type of the configured device, measured on the reference's
probe set (from the cached verdict, or measured now): NLL ratio, greedy agreement,
tokens/s, and whether it passes the bounds; then what `auto` serves and the thread
layout. Exits 1 when no candidate is faithful.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from llm_local.core.numerics import Bounds, Reference, choose

if TYPE_CHECKING:
    from llm_local.backends.ct2.autotune import Verdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", help="the environment (default: $ENV, else development)")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure again even when a verdict for this machine is cached",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args: argparse.Namespace) -> int:
    from llm_local.backends.ct2 import autotune
    from llm_local.convert.api import find_converted
    from llm_local.convert.reference import read_reference
    from llm_local.core.numerics import Bounds
    from llm_local.settings.device import resolve_device
    from llm_local.settings.errors import SettingsError
    from llm_local.settings.loader import load_settings

    try:
        settings = load_settings(args.env)
        device = resolve_device(settings.runtime)
    except SettingsError as exc:
        print(f"llm-local doctor: {exc}", file=sys.stderr)
        return 2
    model_dir = find_converted(settings)
    reference = None if model_dir is None else read_reference(model_dir)
    if model_dir is None or reference is None:
        print(
            f"llm-local doctor: {settings.model.name!r} is not converted with a numerics "
            "reference yet; run `llm-local convert` first",
            file=sys.stderr,
        )
        return 2
    bounds = Bounds(settings.numerics.max_nll_ratio, settings.numerics.min_agreement_ratio)
    index = settings.runtime.device_index
    key = autotune.verdict_key(autotune.machine_identity(device, index))
    verdict_dir = settings.numerics.verdict_dir
    verdict = None if args.remeasure else autotune.read_verdict(model_dir, key, verdict_dir)
    cached = verdict is not None
    if verdict is None:
        print(
            "measuring every candidate compute type (once; cached beside the model)...",
            file=sys.stderr,
        )
        verdict = autotune.measure_verdict(model_dir, device, index, reference, bounds, verdict_dir)
    summary = verdict_summary(verdict, reference, bounds, cached=cached)
    summary["model_dir"] = str(model_dir)
    print(json.dumps(summary, indent=2) if args.json else render_table(summary))
    return 0 if summary["auto_chooses"] is not None else 1


def verdict_summary(
    verdict: Verdict, reference: Reference, bounds: Bounds, *, cached: bool
) -> dict[str, Any]:
    """The verdict table as plain data (doctor's --json, and `make bench`)."""
    choice = choose(verdict.measurements, reference, bounds)
    rows = [
        {
            "candidate": measurement.label,
            "runs_as": measurement.effective_type,
            "nll_ratio": round(judgement.nll_ratio, 3),
            "agreement": round(measurement.agreement, 3),
            "agreement_ratio": round(judgement.agreement_ratio, 3),
            "equal_answers": f"{measurement.equal_answers}/{len(reference.items)}",
            "batch_tok_s": round(measurement.batch_tokens_per_s, 1),
            "single_tok_s": round(measurement.single_tokens_per_s, 1),
            "load_s": round(measurement.load_seconds, 2),
            "faithful": judgement.passed,
            "why_not": judgement.reason,
        }
        for measurement, judgement in choice.ranked
    ]
    chosen, fastest = choice.chosen, choice.fastest
    inter, intra = verdict.layout() if verdict.identity.get("device") == "cpu" else (1, 1)
    return {
        "machine": verdict.identity,
        "bounds": {
            "max_nll_ratio": bounds.max_nll_ratio,
            "min_agreement_ratio": bounds.min_agreement_ratio,
        },
        "reference": {
            "nll": round(reference.nll, 4),
            "anchor_nll": round(reference.anchor.nll, 4),
            "anchor_agreement": round(reference.anchor.agreement, 3),
        },
        "candidates": rows,
        "auto_chooses": None if chosen is None else chosen.label,
        "speed_vs_fastest": (
            None
            if chosen is None or fastest is None
            else round(chosen.batch_tokens_per_s / fastest.batch_tokens_per_s, 3)
        ),
        "threads": {
            "usable_cpus": verdict.cpus,
            "single_tok_s_by_intra_threads": {
                k: round(v, 1) for k, v in verdict.single_speed_by_threads.items()
            },
            "inter_threads": inter,
            "intra_threads": intra,
        },
        "verdict_cached": cached,
        "measuring_seconds": verdict.seconds,
    }


def render_table(summary: dict[str, Any]) -> str:
    headers = (
        "candidate",
        "runs_as",
        "nll_ratio",
        "agreement",
        "agreement_ratio",
        "equal_answers",
        "batch_tok_s",
        "single_tok_s",
        "faithful",
    )
    rows = [[str(row[h]) for h in headers] for row in summary["candidates"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        f"machine: {summary['machine'].get('cpu_model')} ({summary['machine'].get('device')}), "
        f"CTranslate2 {summary['machine'].get('ctranslate2')}",
        f"reference NLL/token {summary['reference']['nll']}; float32 on the stored weights: "
        f"NLL {summary['reference']['anchor_nll']}, agreement "
        f"{summary['reference']['anchor_agreement']}",
        f"bounds: NLL ratio <= {summary['bounds']['max_nll_ratio']}, agreement ratio >= "
        f"{summary['bounds']['min_agreement_ratio']}",
        "",
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines += [""] + [f"  {row['why_not']}" for row in summary["candidates"] if row["why_not"]]
    threads = summary["threads"]
    lines += [
        "",
        f"auto serves: {summary['auto_chooses'] or 'nothing (no candidate is faithful)'}"
        + (
            f" ({summary['speed_vs_fastest']:.2f}x the fastest candidate's speed)"
            if summary["speed_vs_fastest"] is not None
            else ""
        ),
        f"threads: {threads['usable_cpus']} usable CPUs; one-stream tok/s by threads per batch "
        f"{threads['single_tok_s_by_intra_threads']}: inter_threads={threads['inter_threads']}, "
        f"intra_threads={threads['intra_threads']}",
        f"verdict {'from the cache' if summary['verdict_cached'] else 'measured now'} "
        f"(measuring took {summary['measuring_seconds']} s)",
    ]
    return "\n".join(lines)
