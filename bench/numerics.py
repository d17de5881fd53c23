"""`python -m bench.numerics`: what the numerics check costs, and what `auto` picks.

Measured side by side in one run, on the test model (SmolLM2-135M, int8 weights):

- the load-time cost of the check at load: the same compute type loaded without and
  with the check (median of `--repeats` loads each), as seconds and as a ratio;
- auto's first measurement on this machine (every candidate in every kernel
  environment, plus the thread scaling), in a scratch directory so nothing cached
  counts, and its second start, which only reads the verdict;
- the speed of the type auto chose as a ratio of the fastest candidate's, and of the
  fastest *faithful* one's (goal >= 0.9x);
- the whole verdict table (what `llm-local doctor` prints).

Writes docs/NUMERICS.md (or, with --out, elsewhere). Run by `make bench`.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_local.convert.reference import PROBE_MAX_NEW_TOKENS, PROBE_PROMPTS

REPO_ROOT = Path(__file__).resolve().parent.parent


def _linked_copy(model_dir: Path, into: Path) -> Path:
    """The model's files linked into a scratch directory: verdicts written there go away."""
    target = into / "model"
    target.mkdir()
    for path in model_dir.iterdir():
        if path.is_file():
            (target / path.name).symlink_to(path)
    return target


def _timed_loads(plan: Any, repeats: int) -> list[float]:
    from llm_local.backends.ct2.loader import load_model

    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        model = load_model(plan)
        seconds.append(time.perf_counter() - started)
        model.generator.unload_model()
        del model
    return seconds


def measure(repeats: int) -> dict[str, Any]:
    from llm_local.backends.ct2 import autotune
    from llm_local.backends.ct2.loader import plan_from_settings
    from llm_local.commands.doctor import verdict_summary
    from llm_local.convert.reference import read_reference
    from llm_local.core.numerics import Bounds, choose
    from llm_local.settings.loader import load_settings

    settings = load_settings("test")
    base = plan_from_settings(settings)
    reference = read_reference(base.model_dir)
    if reference is None:
        raise SystemExit("bench.numerics: the test model has no reference; run make bench")
    bounds = Bounds(settings.numerics.max_nll_ratio, settings.numerics.min_agreement_ratio)
    checked = dataclasses.replace(settings.numerics, check_at_load=True)
    unchecked = dataclasses.replace(settings.numerics, check_at_load=False)
    with tempfile.TemporaryDirectory(prefix="bench-numerics-") as scratch:
        model_dir = _linked_copy(base.model_dir, Path(scratch))
        plan = dataclasses.replace(base, model_dir=model_dir, compute_type="float32")
        plain = _timed_loads(dataclasses.replace(plan, numerics=unchecked), repeats)
        with_check = _timed_loads(dataclasses.replace(plan, numerics=checked), repeats)

        started = time.perf_counter()
        verdict = autotune.measure_verdict(model_dir, "cpu", 0, reference, bounds)
        first_auto = time.perf_counter() - started
        # What a later start does instead of measuring: find and read the verdict.
        started = time.perf_counter()
        key = autotune.verdict_key(autotune.machine_identity("cpu", 0))
        cached = autotune.read_verdict(model_dir, key)
        reuse = time.perf_counter() - started
        assert cached is not None
    choice = choose(verdict.measurements, reference, bounds)
    faithful = [m for m, judgement in choice.ranked if judgement.passed]
    summary = verdict_summary(verdict, reference, bounds, cached=False)
    chosen = choice.chosen
    return {
        "load_plain_s": statistics.median(plain),
        "load_checked_s": statistics.median(with_check),
        "first_auto_measurement_s": first_auto,
        "verdict_reuse_s": reuse,
        "speed_vs_fastest_faithful": (
            None if chosen is None else chosen.batch_tokens_per_s / faithful[0].batch_tokens_per_s
        ),
        "summary": summary,
        "repeats": repeats,
    }


def render(result: dict[str, Any], command: str) -> str:
    summary = result["summary"]
    machine = summary["machine"]
    check_cost = result["load_checked_s"] - result["load_plain_s"]
    lines = [
        "# Numerics: what the check costs and what `auto` picks",
        "",
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{machine.get('cpu_model')} ({platform.machine()}, {summary['threads']['usable_cpus']} "
        f"usable CPUs), CTranslate2 {machine.get('ctranslate2')}; model: SmolLM2-135M-Instruct, "
        f"int8 weights, probe of {len(PROBE_PROMPTS)} prompts x up to {PROBE_MAX_NEW_TOKENS} "
        "greedy tokens. Figures hold for the "
        "machine they were measured on; compare the ratios.",
        "",
        "| what | seconds | ratio |",
        "|---|---|---|",
        f"| load float32, no check (median of {result['repeats']}) | "
        f"{result['load_plain_s']:.2f} | 1.00x |",
        f"| load float32 with the check at load | {result['load_checked_s']:.2f} | "
        f"{result['load_checked_s'] / result['load_plain_s']:.2f}x (check: {check_cost:.2f} s) |",
        f"| auto's first measurement on this machine | {result['first_auto_measurement_s']:.1f} | "
        f"{result['first_auto_measurement_s'] / result['load_plain_s']:.0f}x a plain load |",
        f"| a later start reading the cached verdict | {result['verdict_reuse_s']:.3f} | |",
        "",
        (
            f"auto serves **{summary['auto_chooses']}**: "
            f"{summary['speed_vs_fastest']:.2f}x the batched speed of the fastest candidate, "
            f"{result['speed_vs_fastest_faithful']:.2f}x the fastest faithful one (goal >= 0.9x)."
            if summary["auto_chooses"] is not None
            else "auto serves **nothing**: no candidate is faithful here."
        ),
        "",
        "## The verdict table (`llm-local doctor`)",
        "",
        f"Bounds: NLL ratio <= {summary['bounds']['max_nll_ratio']}, greedy agreement >= "
        f"{summary['bounds']['min_agreement_ratio']} of float32's on the same weights. "
        f"Reference NLL/token {summary['reference']['nll']}; float32 on the stored weights "
        f"{summary['reference']['anchor_nll']}, "
        f"agreement {summary['reference']['anchor_agreement']}.",
        "",
        "| candidate | runs as | NLL ratio | agreement | of float32's | equal answers "
        "| batched tok/s | one-stream tok/s | faithful |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['candidate']} | {row['runs_as']} | {row['nll_ratio']} | {row['agreement']} "
        f"| {row['agreement_ratio']} | {row['equal_answers']} | {row['batch_tok_s']} "
        f"| {row['single_tok_s']} | {'yes' if row['faithful'] else 'no'} |"
        for row in summary["candidates"]
    ]
    threads = summary["threads"]
    lines += [
        "",
        f"Threads: one-stream tok/s by threads per batch {threads['single_tok_s_by_intra_threads']}"
        f" gives inter_threads={threads['inter_threads']}, "
        f"intra_threads={threads['intra_threads']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.numerics", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="loads timed per variant")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs" / "NUMERICS.md", help="where to write"
    )
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    command = "make bench" if args.out == REPO_ROOT / "docs" / "NUMERICS.md" else "bench.numerics"
    text = render(result, command)
    args.out.write_text(text)
    print(text)
    print(f"bench.numerics: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
