"""One request through core's generation on a real backend, its text collected: what the
backend tests of every engine ask of a backend the way the server would."""

from __future__ import annotations

from llm_local.backends.base import Backend
from llm_local.core.generation import run_generation
from llm_local.core.prompt import prepare_prompt
from llm_local.core.types import Finished, GenerationRequest, TextChunk


async def answer_text(backend: Backend, request: GenerationRequest) -> tuple[str, Finished]:
    """The answer's text and how it finished."""
    prepared = prepare_prompt(request, backend.tokenizer, backend.info.context_limit)
    chunks: list[TextChunk] = []

    async def on_text(chunk: TextChunk) -> None:
        chunks.append(chunk)

    finished = await run_generation(backend, request, prepared, on_text)
    return "".join(chunk.text for chunk in chunks), finished
