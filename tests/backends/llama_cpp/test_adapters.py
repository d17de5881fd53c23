"""LoRA adapters in the llama_cpp backend, in process: one adapter per step, each sequence
always under its own adapter, answers as when decoded alone (the suite's test adapters,
tests/lora_adapters.py, converted to GGUF LoRAs by the load path)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import AsyncIterator

import pytest
import trio

from llm_local.backends.llama_cpp.backend import LlamaCppBackend
from llm_local.backends.llama_cpp.loader import plan_from_settings
from llm_local.backends.llama_cpp.scheduler import StepShape
from llm_local.backends.shared.source import resolve_model_source
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import GenerationHints, GenerationRequest, SamplingOptions
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AdapterSettings
from tests.lora_adapters import QUESTION, ensure_test_adapters

# Long enough to make the test adapters when `make test` has not made them yet.
pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

NAMES = ("", "pirate", "robot")


class Steps:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[StepShape] = []

    def __call__(self, step: StepShape) -> None:
        with self.lock:
            self.seen.append(step)


@pytest.fixture
async def loaded() -> AsyncIterator[tuple[LlamaCppBackend, Steps]]:
    settings = load_settings(env="test")
    source = resolve_model_source(settings.model)
    made = ensure_test_adapters(settings.model.cache_dir, source)
    adapters = tuple(AdapterSettings(n, str(made[n].path)) for n in ("pirate", "robot"))
    settings = dataclasses.replace(settings, adapters=adapters)
    steps = Steps()
    backend = LlamaCppBackend(lambda: plan_from_settings(settings), on_step=steps)
    await backend.load()
    try:
        yield backend, steps
    finally:
        await backend.aclose()


async def answer(backend: LlamaCppBackend, adapter: str) -> list[int]:
    ids = prepare_prompt(
        GenerationRequest(user_prompt=QUESTION), backend.tokenizer, backend.info.context_limit
    ).ids
    out: list[int] = []
    hints = GenerationHints(adapter=adapter or None)
    async with backend.generate(ids, 8, SamplingOptions(), hints) as stream:
        async for group in stream:
            out += group
    return out


async def test_each_sequence_decodes_under_its_own_adapter_one_adapter_per_step(
    loaded: tuple[LlamaCppBackend, Steps],
) -> None:
    backend, steps = loaded
    alone = {name: await answer(backend, name) for name in NAMES}
    steps.seen.clear()
    together: dict[str, list[int]] = {}

    async def run(name: str) -> None:
        together[name] = await answer(backend, name)

    async with trio.open_nursery() as nursery:
        for name in NAMES:
            nursery.start_soon(run, name)

    assert backend.info.adapters == ("pirate", "robot")
    assert together == alone
    assert len({tuple(ids) for ids in alone.values()}) == 3  # three different answers
    adapter_of: dict[int, str] = {}
    for step in steps.seen:
        for seq_id in step.seq_ids:
            assert adapter_of.setdefault(seq_id, step.adapter) == step.adapter
    assert sorted(adapter_of.values()) == sorted(NAMES)


async def test_an_adapter_the_backend_did_not_load_fails_the_request(
    loaded: tuple[LlamaCppBackend, Steps],
) -> None:
    from llm_local.backends.base import BackendError

    backend, _ = loaded
    with pytest.raises(BackendError, match="unknown LoRA adapter 'parrot'"):
        await answer(backend, "parrot")
