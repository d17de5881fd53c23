"""LoRA adapters per token on the transformers backend (backends/transformers/adapters.py).

On a tiny random Llama with two random PEFT adapters (milliseconds per step), so the
arithmetic and the manager's batches are checked without the real model; the real model
with the suite's own adapters is in tests/e2e/test_lora_adapters.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_local.backends.transformers.adapters import (
    AdapterNotServed,
    TokenAdapters,
    TokenGroup,
    add_deltas,
    attach_adapters,
    cb_overrides,
    token_groups,
)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

PROMPTS = ([1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
NEW_TOKENS = 6


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def save_adapter(path: Path, seed: int, **options: Any) -> Path:
    model = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            **options,
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(root / name, seed) for name, seed in (("a", 1), ("b", 2))}


def test_token_groups_follow_the_packed_order_and_skip_the_base_model() -> None:
    requests = [("r1", 3), ("r2", 1), ("r3", 2), ("r4", 1)]
    groups = token_groups(requests, {"r1": "a", "r3": "b", "r4": "a"}, list)

    assert groups == [TokenGroup("a", [0, 1, 2, 6]), TokenGroup("b", [4, 5])]
    assert token_groups(requests, {}, list) == []


def test_one_adapter_on_every_token_needs_no_rows() -> None:
    groups = token_groups([("r1", 3), ("r2", 1)], {"r1": "a", "r2": "a"}, list)

    assert groups == [TokenGroup("a", None)]


def test_with_adapters_prefix_sharing_and_cuda_graphs_are_off() -> None:
    assert cb_overrides(()) == {}
    assert cb_overrides(("a",)) == {"allow_block_sharing": False, "use_cuda_graph": False}


def test_each_token_gets_its_own_adapters_delta(adapter_dirs: dict[str, Path]) -> None:
    model = tiny_llama()
    attach_adapters(model, list(adapter_dirs.items()))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 5, 64)
    base = layer.base_layer(x)
    out = base.clone()
    rows = torch.tensor([0, 3])

    add_deltas(layer, x, out, [TokenGroup("a", rows), TokenGroup("b", torch.tensor([1]))])

    def with_peft(adapter: str) -> Any:  # PEFT's own forward, that adapter on every token
        layer.enable_adapters(True)
        layer.set_adapter(adapter)
        try:
            return layer(x)
        finally:
            layer.enable_adapters(False)

    torch.testing.assert_close(out[0, rows], with_peft("a")[0, rows])
    torch.testing.assert_close(out[0, 1], with_peft("b")[0, 1])
    torch.testing.assert_close(out[0, [2, 4]], base[0, [2, 4]])  # the base model's rows


class Manager:
    """transformers' continuous batching manager, greedy, on the tiny model."""

    def __init__(self, model: Any, adapters: TokenAdapters) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.adapters = adapters
        batching = ContinuousBatchingConfig(
            max_batch_tokens=64, num_blocks=16, **cb_overrides(adapters.adapters)
        )
        generation = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
        self.manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        adapters.bind(self.manager)
        self.manager.start()
        self.ids = itertools.count()

    def run(self, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
        """All jobs at once; each one's generated tokens."""
        request_ids = []
        for prompt, adapter in jobs:
            request_id = f"r{next(self.ids)}"
            self.adapters.assign(request_id, adapter)
            self.manager.add_request(
                prompt, request_id=request_id, max_new_tokens=NEW_TOKENS, streaming=False
            )
            request_ids.append(request_id)
        done: dict[str, list[int]] = {}
        while len(done) < len(jobs):
            result = self.manager.get_result(timeout=60)
            assert result is not None, "the manager gave no result within a minute"
            if result.is_finished():
                done[result.request_id] = list(result.generated_tokens)
        return [done[request_id] for request_id in request_ids]

    def close(self) -> None:
        self.manager.stop(block=True, timeout=30)


@pytest.fixture(scope="module")
def manager(adapter_dirs: dict[str, Path]) -> Iterator[Manager]:
    model = tiny_llama()
    adapters = attach_adapters(model, list(adapter_dirs.items()))
    assert adapters is not None
    running = Manager(model, adapters)
    try:
        yield running
    finally:
        running.close()


def merged_answer(adapter_dir: Path | None, prompt: list[int]) -> list[int]:
    model = tiny_llama()
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return [int(token) for token in out[0, len(prompt) :]]


def test_an_adapters_answer_is_the_merged_models(
    manager: Manager, adapter_dirs: dict[str, Path]
) -> None:
    for name in (None, "a", "b"):
        answers = manager.run([(prompt, name) for prompt in PROMPTS])
        merged = [merged_answer(None if name is None else adapter_dirs[name], p) for p in PROMPTS]
        assert answers == merged, name
    assert len({tuple(a) for a in manager.run([(PROMPTS[0], n) for n in (None, "a", "b")])}) == 3


def test_mixed_adapters_in_one_step_each_answer_as_alone(manager: Manager) -> None:
    names: list[str | None] = [None, "a", "b"]
    alone = {
        (index, name): manager.run([(prompt, name)])[0]
        for index, prompt in enumerate(PROMPTS)
        for name in names
    }
    jobs = [(index % 3, names[(index // 3 + index) % 3]) for index in range(9)]

    mixed = manager.run([(PROMPTS[index], name) for index, name in jobs])

    assert mixed == [alone[job] for job in jobs]


def test_a_dora_adapter_is_refused_by_name(tmp_path: Path) -> None:
    path = save_adapter(tmp_path / "d", 3, use_dora=True)

    with pytest.raises(AdapterNotServed, match=r"'d' is a LoRA variant .*plain LoRA only"):
        attach_adapters(tiny_llama(), [("d", path)])


def test_without_adapters_nothing_is_injected() -> None:
    model = tiny_llama()

    assert attach_adapters(model, []) is None
    assert not any("lora" in name for name, _ in model.named_modules())
