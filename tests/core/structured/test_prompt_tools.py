"""Tools reach the model through the prompt: the chat template's own tools section when it
has one, else the default rendering (structured/tools.py) in the system turn."""

from __future__ import annotations

import json
from collections.abc import Sequence

from llm_local.core.prompt import build_prompt
from llm_local.core.structured import tools as fmt
from llm_local.core.structured.constraint import OutputConstraint, ToolSpec, canonical_json
from llm_local.core.types import GenerationRequest, SamplingOptions

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = OutputConstraint(
    field="tools", tools=(ToolSpec("get_weather", "Weather", canonical_json(PARAMETERS)),)
)
# A Qwen-like template: its own tools section, in the system turn.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "{% endif %}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% endfor %}<|assistant|>"
)


PLAIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% endfor %}<|assistant|>"
)


class CharTokenizer:
    """One token per character, the given chat template."""

    def __init__(self, chat_template: str) -> None:
        self.chat_template = chat_template
        self.plain_prompt_bos_id = None
        self.end_token_ids: frozenset[int] = frozenset()
        self.special_tokens: dict[str, str] = {}

    def encode(self, text: str) -> list[int]:
        return [ord(char) for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(map(chr, ids))


def request(constraint: OutputConstraint | None) -> GenerationRequest:
    return GenerationRequest(
        user_prompt="Weather in Paris?",
        system_prompt="Be brief.",
        sampling=SamplingOptions(constraint=constraint),
    )


def test_without_a_tools_section_the_system_turn_gets_the_default_rendering() -> None:
    text = build_prompt(request(TOOLS), CharTokenizer(PLAIN_TEMPLATE))

    system = "Be brief.\n\n" + fmt.tools_prompt(TOOLS)
    assert text.startswith(f"<|system|>{system}<|user|>")
    assert '"name": "get_weather"' in text


def test_a_template_with_a_tools_section_renders_them_itself() -> None:
    text = build_prompt(request(TOOLS), CharTokenizer(TOOLS_TEMPLATE))

    function = {"name": "get_weather", "description": "Weather", "parameters": PARAMETERS}
    assert text.startswith("<|system|>" + json.dumps({"type": "function", "function": function}))
    assert "<tools>" not in text  # not rendered twice
    assert "<|system|>Be brief.<|user|>" in text


def test_no_tools_no_tools_section() -> None:
    assert "<|system|>{" not in build_prompt(request(None), CharTokenizer(TOOLS_TEMPLATE))
