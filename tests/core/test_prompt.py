from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from llm_local.core.errors import InvalidRequest
from llm_local.core.prompt import PreparedPrompt, build_prompt, prepare_prompt, with_bos
from llm_local.core.types import ChatTurn, GenerationRequest, Role

# SmolLM2-135M-Instruct's template (chat_template.jinja of the converted test model).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3 style: uses a special-token variable and loop controls.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] == 'skip' %}{% continue %}{% endif %}"
    "[{{ message['role'] }}]{{ message['content'] | tojson }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)

# Gemma style: refuses a system turn outright.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n"
    "{% endfor %}<assistant>"
)

# Mistral style: user and assistant must alternate.
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
)


class CharTokenizer:
    """One token per character: token counts are easy to reason about."""

    def __init__(
        self, chat_template: str | None = SMOLLM2_TEMPLATE, bos_id: int | None = None
    ) -> None:
        self._chat_template = chat_template
        self._bos_id = bos_id

    @property
    def plain_prompt_bos_id(self) -> int | None:
        return self._bos_id

    @property
    def end_token_ids(self) -> frozenset[int]:
        return frozenset()

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": "<s>", "eos_token": "</s>"}

    def encode(self, text: str) -> list[int]:
        return [ord(char) for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(token_id) for token_id in ids)


def request(**changes: Any) -> GenerationRequest:
    return GenerationRequest(user_prompt=changes.pop("user_prompt", "What is 2+2?"), **changes)


HISTORY = (ChatTurn(Role.USER, "Hi"), ChatTurn(Role.ASSISTANT, "Hello!"))


def test_chat_template_renders_system_history_and_prompt() -> None:
    text = build_prompt(request(system_prompt="Be brief.", history=HISTORY), CharTokenizer())
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_without_system_prompt_the_template_decides() -> None:
    text = build_prompt(request(), CharTokenizer())
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_rag_context_is_folded_into_the_system_turn() -> None:
    text = build_prompt(
        request(system_prompt="Answer from the context.", rag_context="2+2 is 4."),
        CharTokenizer(),
    )
    assert text.startswith(
        "<|im_start|>system\nAnswer from the context.\n\nContext:\n2+2 is 4.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_rag_context_without_system_prompt_is_a_system_turn_of_its_own() -> None:
    text = build_prompt(request(rag_context="2+2 is 4."), CharTokenizer())
    assert text.startswith("<|im_start|>system\nContext:\n2+2 is 4.<|im_end|>\n")
    assert "SmolLM" not in text


def test_special_tokens_filters_and_loop_controls_are_available() -> None:
    text = build_prompt(
        request(user_prompt="çay ☕", history=(ChatTurn(Role.USER, "skip"),)),
        CharTokenizer(BOS_TEMPLATE),
    )
    assert text == '<s>[user]"çay ☕"[assistant]'


def test_plain_format_without_a_chat_template() -> None:
    text = build_prompt(
        request(system_prompt="Be brief.", rag_context="Facts.", history=HISTORY),
        CharTokenizer(chat_template=None),
    )
    assert text == (
        "System: Be brief.\n\nContext:\nFacts.\n\n"
        "User: Hi\nAssistant: Hello!\n"
        "User: What is 2+2?\nAssistant:"
    )
    assert build_prompt(request(), CharTokenizer(chat_template="")) == (
        "User: What is 2+2?\nAssistant:"
    )


def test_template_without_system_role_gets_it_in_the_first_user_turn() -> None:
    text = build_prompt(
        request(system_prompt="Be brief.", history=HISTORY), CharTokenizer(NO_SYSTEM_TEMPLATE)
    )
    assert text == ("<user>Be brief.\n\nHi\n<assistant>Hello!\n<user>What is 2+2?\n<assistant>")


def test_conversation_the_template_refuses_is_an_invalid_history() -> None:
    bad_history = (ChatTurn(Role.ASSISTANT, "Hello!"),)
    with pytest.raises(InvalidRequest) as caught:
        build_prompt(request(history=bad_history), CharTokenizer(ALTERNATING_TEMPLATE))
    assert caught.value.field == "history"
    assert "roles must alternate" in caught.value.message


def test_prepare_prompt_encodes_and_keeps_max_new_tokens_when_there_is_room() -> None:
    tokenizer = CharTokenizer(chat_template=None)
    prepared = prepare_prompt(request(max_new_tokens=10), tokenizer, context_limit=1000)
    text = "User: What is 2+2?\nAssistant:"
    assert prepared == PreparedPrompt(
        text=text,
        ids=tuple(map(ord, text)),
        max_new_tokens=10,
        context_bound=False,
        shared_prefix_length=len("User: "),  # what every plain-format prompt starts with
    )


def shared_text(tokenizer: CharTokenizer, **changes: Any) -> str:
    prepared = prepare_prompt(request(**changes), tokenizer, context_limit=10_000)
    assert (
        prepared.ids[: prepared.shared_prefix_length]
        == tuple(map(ord, prepared.text))[: prepared.shared_prefix_length]
    )
    return prepared.text[: prepared.shared_prefix_length]


def test_the_shared_prefix_is_the_system_block_whatever_follows() -> None:
    system_block = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    for changes in [
        {"user_prompt": "What is 2+2?"},
        {"user_prompt": "Tell me a joke.", "history": HISTORY},
    ]:
        assert shared_text(CharTokenizer(), system_prompt="Be brief.", **changes) == system_block


def test_rag_context_is_not_shared_but_the_system_prompt_before_it_is() -> None:
    for context in ("doc one", "another document"):
        shared = shared_text(CharTokenizer(), system_prompt="Be brief.", rag_context=context)
        assert shared == "<|im_start|>system\nBe brief."


def test_without_a_system_prompt_the_template_default_one_is_shared() -> None:
    shared = shared_text(CharTokenizer())
    assert shared.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert shared.endswith("<|im_start|>user\n")


def test_a_template_refusing_a_system_turn_shares_the_folded_system_text() -> None:
    shared = shared_text(CharTokenizer(NO_SYSTEM_TEMPLATE), system_prompt="Be brief.")
    assert shared == "<user>Be brief.\n\n"


def test_a_plain_completion_shares_nothing_and_a_prefix_never_covers_the_whole_prompt() -> None:
    plain = request(user_prompt="Once upon a time", chat_template=False)
    assert prepare_prompt(plain, CharTokenizer(), 1000).shared_prefix_length == 0
    # The user turn empty too: everything but the last id could be "shared".
    whole = prepare_prompt(request(user_prompt=""), CharTokenizer(), 1000)
    assert whole.shared_prefix_length < len(whole.ids)


def test_prepare_prompt_clips_to_the_room_left_in_the_context() -> None:
    tokenizer = CharTokenizer(chat_template=None)
    prompt_length = len("User: What is 2+2?\nAssistant:")
    prepared = prepare_prompt(
        request(max_new_tokens=10), tokenizer, context_limit=prompt_length + 4
    )
    assert (prepared.max_new_tokens, prepared.context_bound) == (4, True)
    exact = prepare_prompt(request(max_new_tokens=4), tokenizer, prompt_length + 4)
    assert (exact.max_new_tokens, exact.context_bound) == (4, False)


@pytest.mark.parametrize("field", ["user_prompt", "prompt"])
def test_prompt_filling_the_context_names_the_prompt_field(field: str) -> None:
    tokenizer = CharTokenizer(chat_template=None)
    prompt_length = len("User: What is 2+2?\nAssistant:")
    with pytest.raises(InvalidRequest) as caught:
        prepare_prompt(request(prompt_field=field), tokenizer, context_limit=prompt_length)
    assert caught.value.field == field
    assert f"{prompt_length} tokens" in caught.value.message
    assert f"holds {prompt_length} tokens" in caught.value.message


@pytest.mark.model
def test_real_tokenizer_encodes_template_markers_as_special_tokens(smollm2_tokenizer: Any) -> None:
    prepared = prepare_prompt(
        request(user_prompt="What is the capital of France? Answer in one sentence."),
        smollm2_tokenizer,
        context_limit=2048,
    )
    assert prepared.ids.count(1) == 3  # <|im_start|>: system, user, assistant
    assert prepared.ids.count(2) == 2  # <|im_end|>: system, user
    assert smollm2_tokenizer.decode(prepared.ids).endswith("assistant\n")


# -- the BOS of a plain completion ---------------------------------------------------------

BOS = 2  # "\x02" to the character tokenizer: a prompt can spell it


def test_with_bos_adds_it_once_and_only_when_asked() -> None:
    assert with_bos((65, 66), None) == (65, 66)
    assert with_bos((65, 66), BOS) == (BOS, 65, 66)
    assert with_bos((BOS, 65), BOS) == (BOS, 65)
    assert with_bos((), BOS) == (BOS,)


def test_a_plain_completion_gets_the_bos_its_tokenizer_asks_for_exactly_once() -> None:
    asks = CharTokenizer(bos_id=BOS)
    plain = prepare_prompt(request(user_prompt="Once", chat_template=False), asks, 1000)
    spelled = prepare_prompt(request(user_prompt="\x02Once", chat_template=False), asks, 1000)
    none = prepare_prompt(
        request(user_prompt="Once", chat_template=False), CharTokenizer(bos_id=None), 1000
    )

    assert plain.ids == (BOS, *map(ord, "Once"))
    assert plain.text == "Once"  # the text is the request's; the BOS is an id
    assert spelled.ids == (BOS, *map(ord, "Once"))  # already there: not a second one
    assert none.ids == tuple(map(ord, "Once"))


def test_the_bos_counts_against_the_context() -> None:
    asks = CharTokenizer(bos_id=BOS)
    plain = request(user_prompt="abc", chat_template=False, max_new_tokens=10)
    assert prepare_prompt(plain, asks, context_limit=6).max_new_tokens == 2
    with pytest.raises(InvalidRequest):
        prepare_prompt(plain, asks, context_limit=4)


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, None])
def test_a_chat_prompt_is_left_as_its_template_made_it(template: str | None) -> None:
    asks = CharTokenizer(template, bos_id=BOS)
    prepared = prepare_prompt(request(system_prompt="Be brief."), asks, 10_000)
    assert prepared.ids == tuple(map(ord, prepared.text))
    assert BOS not in prepared.ids


@pytest.mark.model
def test_smollm2_asks_for_no_bos_on_a_plain_completion(smollm2_tokenizer: Any) -> None:
    # Its GGUF says tokenizer.ggml.add_bos_token = false, and its post-processor adds
    # nothing: a completion prompt reaches the model as its text encodes.
    text = "The capital of France is"
    prepared = prepare_prompt(
        request(user_prompt=text, chat_template=False), smollm2_tokenizer, context_limit=2048
    )
    assert smollm2_tokenizer.plain_prompt_bos_id is None
    assert prepared.ids == tuple(smollm2_tokenizer.encode(text))
