"""One generation: backend token ids -> text chunks -> a Finished event.

The caller gets text through an awaited callback, one call per group of ids the
backend delivers (not per token), rather than from an async generator: trio forbids
yielding out of the backend's open context (a cancel scope) to the caller.

How it ends:
- an end token (tokenizer.end_token_ids) -> STOP; it produces no text but counts as a
  completion token (as vLLM counts it);
- a stop sequence -> STOP; the backend context is left at once, which stops decoding;
  completion tokens count up to the token that completed the stop;
- prepared.max_new_tokens reached -> LENGTH, or CONTEXT_FULL when that number was
  clipped to the context (prepared.context_bound);
- BackendError -> ERROR, after the text generated so far is sent;
- trio.Cancelled propagates: the caller decides what the client sees.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from llm_local.backends.base import Backend, BackendError, ReportsCachedTokens
from llm_local.core.detokenizer import IncrementalDetokenizer
from llm_local.core.prompt import PreparedPrompt
from llm_local.core.stops import StopMatcher
from llm_local.core.types import (
    Finished,
    FinishReason,
    GenerationHints,
    GenerationRequest,
    TextChunk,
)

OnText = Callable[[TextChunk], Awaitable[None]]


class _Progress:
    """Detokenizer, stop matcher and counts of one generation (no I/O)."""

    def __init__(self, backend: Backend, request: GenerationRequest, limit: int) -> None:
        tokenizer = backend.tokenizer
        self.end_ids = tokenizer.end_token_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(request.stop_sequences)
        self.limit = limit
        self.completion_tokens = 0
        self.unreported_tokens = 0  # tokens since the last chunk sent
        self.reason: FinishReason | None = None

    def consume(self, ids: Sequence[int]) -> str:
        """Take one group of ids; return the text to send now; set `reason` when done."""
        pieces: list[str] = []
        for token_id in ids:
            if self.completion_tokens >= self.limit:
                break
            self.completion_tokens += 1
            self.unreported_tokens += 1
            if token_id in self.end_ids:
                self.reason = FinishReason.STOP
                pieces.append(self.finish_text())
                break
            result = self.stops.feed(self.detokenizer.push((token_id,)))
            pieces.append(result.emit)
            if result.stopped:
                self.reason = FinishReason.STOP
                break
        return "".join(pieces)

    def finish_text(self) -> str:
        """Everything still held back by the detokenizer and the stop matcher; a stop
        sequence found in it sets `reason`."""
        result = self.stops.feed(self.detokenizer.finish())
        if result.stopped:
            self.reason = FinishReason.STOP
            return result.emit
        held = self.stops.flush()
        if held.stopped:
            self.reason = FinishReason.STOP
        return result.emit + held.emit

    def chunk(self, text: str) -> TextChunk:
        chunk = TextChunk(text=text, token_count=self.unreported_tokens)
        self.unreported_tokens = 0
        return chunk


async def run_generation(
    backend: Backend,
    request: GenerationRequest,
    prepared: PreparedPrompt,
    on_text: OnText,
) -> Finished:
    """Generate for `prepared`, sending text to `on_text`; return how it finished."""
    progress = _Progress(backend, request, prepared.max_new_tokens)
    error: str | None = None
    cached_tokens = 0
    try:
        hints = GenerationHints(
            tenant_id=request.context.tenant_id,
            shared_prefix_length=prepared.shared_prefix_length,
            adapter=request.adapter,
        )
        async with backend.generate(
            prepared.ids, prepared.max_new_tokens, request.sampling, hints
        ) as stream:
            try:
                async for group in stream:
                    text = progress.consume(group)
                    if text:
                        await on_text(progress.chunk(text))
                    if progress.reason is not None or progress.completion_tokens >= progress.limit:
                        break
            finally:
                if isinstance(stream, ReportsCachedTokens):
                    cached_tokens = stream.cached_tokens
    except BackendError as exc:
        error = str(exc) or type(exc).__name__
    except BaseExceptionGroup as group:
        # A backend that runs a nursery inside generate() may wrap its error.
        matched, rest = group.split(BackendError)
        if matched is None or rest is not None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        error = str(first) or type(first).__name__

    if progress.reason is None:
        text = progress.finish_text()
        if text:
            await on_text(progress.chunk(text))
        if error is not None:
            progress.reason = FinishReason.ERROR
        elif progress.reason is not None:
            pass  # the text held back to the end completed a stop sequence
        elif progress.completion_tokens >= progress.limit:
            progress.reason = (
                FinishReason.CONTEXT_FULL if prepared.context_bound else FinishReason.LENGTH
            )
        else:
            # The backend ended the stream early without an end token we know of
            # (e.g. its own end-of-sequence id): the model stopped by itself.
            progress.reason = FinishReason.STOP
    return Finished(
        reason=progress.reason,
        prompt_tokens=len(prepared.ids),
        completion_tokens=progress.completion_tokens,
        error=error if progress.reason is FinishReason.ERROR else None,
        cached_tokens=cached_tokens,
    )
