"""What one step costs with LoRA adapters mixed per token on the transformers backend.

`python -m bench.transformers_lora_steps [ROUNDS]` (default 8): one forward of the test
model (SmolLM2-135M, float32, one thread) on a packed row of tokens, as transformers'
continuous batching runs it: a decode step (16 requests x 1 token) and a prefill step
(4 requests x 64 tokens). Four random rank-16 adapters on all seven projections of every
layer (made here, like a real fine-tune's shape). Variants, interleaved round by round, the
best time of each kept (the machine is shared):

- base: no adapter;
- same: one adapter on every token (the LoRA's own cost);
- mixed: the base and the 4 adapters in turn, per token, as the backend applies them
  (backends/transformers/adapters.py: gather, two products, scatter per adapter and layer);
- peft: the same mix through PEFT's own mixed batch (``adapter_names`` per token row);
- stacked: the same mix as two products per layer whatever the number of adapters (every
  adapter's A stacked, a per-token mask on the rank columns, every B scaled and stacked).

Printed: ms per step and each variant's speed as a fraction of the base's.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ADAPTERS = ("a0", "a1", "a2", "a3")
MIX: tuple[str | None, ...] = (None, *ADAPTERS)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("base", "same", "mixed", "peft", "stacked")


def main(argv: list[str]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from bench import served
    from llm_local.backends.transformers import adapters as token_adapters
    from llm_local.backends.transformers.loader import load_model, plan_from_settings
    from llm_local.settings.loader import load_settings

    rounds = int(argv[0]) if argv else 8
    torch.set_num_threads(1)
    plan = plan_from_settings(load_settings(env="test", overrides=served.backend_defaults()))
    scratch = Path(tempfile.mkdtemp(prefix="lora-steps-"))
    base = load_model(plan).model
    dirs = []
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        wrapped = get_peft_model(base, config)
        wrapped.save_pretrained(scratch / name)
        base = wrapped.unload()
        dirs.append((name, scratch / name))
    loaded = load_model(dataclasses.replace(plan, adapters=tuple(dirs)))
    model, hooked = loaded.model, loaded.adapters
    assert hooked is not None
    layers = hooked._layers
    stacked = {id(layer): _stack(layer, torch) for layer in layers}
    applied = token_adapters.add_deltas

    def stacked_deltas(layer: Any, x: Any, output: Any, groups: Any) -> None:
        a, b, columns = stacked[id(layer)]
        mask = torch.zeros(x.shape[0] * x.shape[1], a.shape[0])
        for group in groups:
            start, rank = columns[group.adapter]
            rows = slice(None) if group.rows is None else group.rows
            mask[rows, start : start + rank] = 1
        flat = x.reshape(-1, x.shape[-1])
        output.view(-1, output.shape[-1]).add_(((flat @ a.T) * mask) @ b.T)

    def peft_hooks(names: list[str]) -> list[Any]:
        def before(_layer: Any, args: Any, kwargs: Any) -> Any:
            x = args[0]
            return (x.reshape(-1, x.shape[-1]), *args[1:]), {**kwargs, "adapter_names": names}

        def after(_layer: Any, _args: Any, _kwargs: Any, out: Any) -> Any:
            return out.view(1, -1, out.shape[-1])

        handles = []
        for layer in layers:
            layer.enable_adapters(True)
            handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(layer.register_forward_hook(after, with_kwargs=True))
        return handles

    for requests, tokens in ((16, 1), (4, 64)):
        ids = torch.randint(0, 1000, (1, requests * tokens))
        batch = [
            SimpleNamespace(state=SimpleNamespace(request_id=f"r{k}"), query_length=tokens)
            for k in range(requests)
        ]
        io = SimpleNamespace(requests_in_batch=batch, total_seqlen_q=requests * tokens)
        hooked.bind(SimpleNamespace(batch_processor=SimpleNamespace(inputs_and_outputs=io)))
        best: dict[str, float] = {}
        for _ in range(rounds):
            for variant in VARIANTS:
                for k in range(requests):
                    hooked.release(f"r{k}")
                    if variant == "same":
                        hooked.assign(f"r{k}", ADAPTERS[0])
                    elif variant in ("mixed", "stacked"):
                        hooked.assign(f"r{k}", MIX[k % len(MIX)])
                handles = []
                if variant == "peft":
                    names = [MIX[k % len(MIX)] or "__base__" for k in range(requests)]
                    handles = peft_hooks([n for n in names for _ in range(tokens)])
                token_adapters.add_deltas = stacked_deltas if variant == "stacked" else applied
                try:
                    best[variant] = min(best.get(variant, float("inf")), _timed(model, ids, torch))
                finally:
                    token_adapters.add_deltas = applied
                    for handle in handles:
                        handle.remove()
                    for layer in layers:
                        layer.enable_adapters(False)
        speeds = ", ".join(f"{v} {best['base'] / best[v]:.2f}x" for v in VARIANTS[1:])
        times = ", ".join(f"{v} {best[v] * 1000:.1f} ms" for v in VARIANTS)
        print(f"{requests} requests x {tokens} tokens: {times} | of the base's speed: {speeds}")


def _stack(layer: Any, torch: Any) -> tuple[Any, Any, dict[str, tuple[int, int]]]:
    names = list(layer.lora_A.keys())
    a = torch.cat([layer.lora_A[n].weight for n in names])
    b = torch.cat([layer.lora_B[n].weight * layer.scaling[n] for n in names], dim=1)
    columns, start = {}, 0
    for name in names:
        rank = layer.lora_A[name].weight.shape[0]
        columns[name] = (start, rank)
        start += rank
    return a, b, columns


def _timed(model: Any, ids: Any, torch: Any, repeats: int = 2) -> float:
    with torch.inference_mode():
        model(input_ids=ids)
        started = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids)
    return (time.perf_counter() - started) / repeats


if __name__ == "__main__":
    main(sys.argv[1:])
