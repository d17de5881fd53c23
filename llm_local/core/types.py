"""The vocabulary every layer shares: requests, sampling options, events, finish reasons."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llm_local.core.structured.constraint import ConstraintChecker, OutputConstraint


class FinishReason(enum.StrEnum):
    """Why a generation ended; the strings are the wire values of FinishDetails.finish_reason."""

    STOP = "stop"  # end-of-turn token or a stop sequence
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the client went away or the server is stopping
    CONTEXT_FULL = "context_full"  # prompt + completion reached the model's context limit
    ERROR = "error"  # the backend failed mid-generation


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """What CTranslate2 applies to a whole batch: only requests with equal keys share one."""

    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut (all tokens)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Structured output: the grammar every sampled token must fit (core/structured).
    constraint: OutputConstraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def batch_key(self) -> tuple[object, ...]:
        """Requests whose keys are equal may be decoded in one batch.

        Greedy decoding ignores temperature, top-k, top-p and the seed, so every greedy
        request with the same repetition penalty shares a key.
        """
        if self.greedy:
            return ("greedy", self.repetition_penalty)
        return (
            "sample",
            self.temperature,
            self.top_k,
            self.top_p,
            self.repetition_penalty,
            self.seed,
        )


@dataclass(frozen=True, slots=True)
class SamplingSupport:
    """Which sampling options a backend honours; validation refuses the rest by name.

    A backend states it once (on its ModelInfo) and core checks every request against it
    before admission, so an option the backend would silently drop becomes
    INVALID_ARGUMENT naming the field instead.
    """

    repetition_penalty: bool = True  # False: only 1.0 (no penalty) can be honoured
    seed: bool = True  # False: a sampled request cannot be made reproducible by a seed
    # The backend's grammar engine (structured output); None: it cannot constrain a step.
    constraints: ConstraintChecker | None = field(default=None, compare=False)

    def refusals(self, sampling: SamplingOptions) -> list[tuple[str, str]]:
        """(option, why) for each option of `sampling` this backend cannot honour."""
        refused: list[tuple[str, str]] = []
        if not self.repetition_penalty and sampling.repetition_penalty != 1.0:
            refused.append(
                (
                    "repetition_penalty",
                    f"this backend cannot apply a repetition penalty (only 1.0), "
                    f"got {sampling.repetition_penalty:g}",
                )
            )
        # Greedy decoding ignores the seed, so a seed there costs nothing to honour.
        if not self.seed and sampling.seed is not None and not sampling.greedy:
            refused.append(
                (
                    "seed",
                    "this backend cannot seed one sampled request; leave it unset "
                    "or decode greedily (temperature 0)",
                )
            )
        return refused


FULL_SAMPLING_SUPPORT = SamplingSupport()


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asked: carried into every log line about the request."""

    request_id: str
    tenant_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    # The gateway's id of the conversation (x-call-id): the same on every turn of a call,
    # so its turns can be followed across log lines and replicas (docs/SCALING.md).
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationHints:
    """What a backend may use to schedule a generation better; ignoring all of it is correct.

    The backend sees only token ids: who asked, and which leading tokens other requests
    probably share, are known above it (the request context, the prompt builder).
    """

    tenant_id: str | None = None  # the x-tenant-id of the request, when it has one
    # Leading prompt tokens that other requests are likely to start with too (the rendered
    # system block); 0 when nothing is known to be shared.
    shared_prefix_length: int = 0
    # The LoRA adapter to decode with (an id of ModelInfo.adapters); None: the base model.
    # Unlike the rest, not a hint: the tokens depend on it.
    adapter: str | None = None


NO_HINTS = GenerationHints()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request: every default is filled in, every field is in range."""

    user_prompt: str
    system_prompt: str = ""
    rag_context: str | None = None
    history: tuple[ChatTurn, ...] = ()
    max_new_tokens: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop_sequences: tuple[str, ...] = ()
    # A raw prompt (seed-era LocalGenerateStream) is sent as a single user turn.
    context: RequestContext = field(default_factory=lambda: RequestContext(request_id="-"))
    # The wire name of the prompt field ("user_prompt", or "prompt" for the seed-era
    # service), so that a prompt too long for the context is reported under that name.
    prompt_field: str = "user_prompt"
    # False: `user_prompt` is the model's input text as is, with no chat template (a
    # plain text completion); system prompt, RAG context and history must be empty.
    chat_template: bool = True
    adapter: str | None = None  # the LoRA adapter to apply (validated); None: the base model


@dataclass(frozen=True, slots=True)
class TextChunk:
    """Generated text made of whole characters; `token_count` tokens produced it."""

    text: str
    token_count: int


@dataclass(frozen=True, slots=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    # Prompt tokens the backend did not read again: their state was cached (prefix reuse).
    cached_tokens: int = 0


GenerationEvent = TextChunk | Finished
