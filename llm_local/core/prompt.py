"""From a validated request to the exact prompt text and token ids the model sees.

The conversation, in order:

1. a system turn, when there is a system prompt or RAG context. RAG context is folded
   into the system turn: ``system_prompt + "\\n\\nContext:\\n" + rag_context``, or
   ``"Context:\\n" + rag_context`` alone when there is no system prompt;
2. the history turns as given;
3. the user prompt as the last user turn.

It is rendered with the model's own Jinja chat template, the way transformers'
``apply_chat_template`` does (sandboxed environment, ``trim_blocks``/``lstrip_blocks``,
``raise_exception``, ``strftime_now``, a ``tojson`` filter, the tokenizer's special
tokens as variables, ``add_generation_prompt=True``). A template that refuses a system
turn (Gemma: "System role not supported") gets the system text prepended to the first
user turn instead, separated by a blank line.

The shared prefix. Requests of one tenant usually repeat the same system prompt, and a
backend may keep the model's state after it (CTranslate2's ``static_prompt``).
`shared_prefix_length` says how many leading ids of the prompt other requests with the
same system prompt start with too: the ids of the same conversation rendered with the
system prompt alone (no RAG context: it is folded into the system turn but differs per
request) and an empty user turn, compared id by id with the prompt's own ids. Only the
common run counts, so the result is always a true token prefix of the prompt, and it
stays the same for every request that carries this system prompt (RAG context or not:
with it the run ends a few ids earlier, where the context begins). A template that
injects a default system prompt (SmolLM2's) shares that block across requests without
one. A plain text completion shares nothing.

A plain text completion (no chat template) is encoded as is, then given the BOS its
model's tokenizer configuration asks for (`ModelTokenizer.plain_prompt_bos_id`), exactly
once: a prompt whose text already starts with it keeps the one it has. That is what vLLM
and llama.cpp's server do on a completion; models trained with a BOS (Llama 3's
``<|begin_of_text|>``, Phi-3's ``<s>``) answer worse without it. A chat prompt is left
as its template made it: the template places the BOS itself when the model wants one.

A model without a chat template gets this plain format::

    System: <system turn>

    User: <history user turn>
    Assistant: <history assistant turn>
    User: <user prompt>
    Assistant:
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

from llm_local.backends.base import ModelTokenizer
from llm_local.core.errors import InvalidRequest
from llm_local.core.structured.tools import tools_prompt
from llm_local.core.types import GenerationRequest, Role

Message = dict[str, str]


@dataclass(frozen=True)
class PreparedPrompt:
    text: str
    ids: tuple[int, ...]
    max_new_tokens: int  # the request's, clipped to the room left in the context
    context_bound: bool  # True when the clipping happened: reaching it is "context_full"
    # Leading ids other requests with this system prompt share (module docstring); always
    # less than len(ids), so a backend that caches them still has a token to feed.
    shared_prefix_length: int = 0


class TemplateRefused(Exception):
    """The chat template called raise_exception(): it rejects this conversation."""


def build_messages(request: GenerationRequest, tools_in_template: bool = False) -> list[Message]:
    """The conversation as chat-template messages (see the module docstring). Tools the
    request offers join the system text (structured/tools.py's default rendering) unless
    the template shows them itself (`tools_in_template`)."""
    messages: list[Message] = []
    system = _system_text(request)
    constraint = request.sampling.constraint
    if constraint is not None and constraint.is_tool_call and not tools_in_template:
        system = "\n\n".join(text for text in (system, tools_prompt(constraint)) if text)
    if system is not None:
        messages.append({"role": Role.SYSTEM.value, "content": system})
    messages.extend({"role": turn.role.value, "content": turn.content} for turn in request.history)
    messages.append({"role": Role.USER.value, "content": request.user_prompt})
    return messages


def build_prompt(request: GenerationRequest, tokenizer: ModelTokenizer) -> str:
    """The prompt text, rendered with the model's chat template or the plain format
    (or the prompt as is, for a plain text completion)."""
    if not request.chat_template:
        return request.user_prompt
    tools = template_tools(request, tokenizer.chat_template)
    return _render(build_messages(request, tools is not None), request, tokenizer, tools)


def template_tools(request: GenerationRequest, template: str | None) -> list[object] | None:
    """The request's tools as a chat template's `tools` variable (OpenAI's shape), when
    the template defines a tools section (it names `tools`); else None."""
    constraint = request.sampling.constraint
    if constraint is None or not constraint.is_tool_call or not template:
        return None
    if "tools" not in template:
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters_schema(),
            },
        }
        for tool in constraint.tools
    ]


def shared_prefix_length(
    request: GenerationRequest, tokenizer: ModelTokenizer, ids: Sequence[int]
) -> int:
    """How many leading `ids` (the request's prompt) are its shared system block."""
    if not request.chat_template:
        return 0
    probe: list[Message] = []
    if request.system_prompt:
        probe.append({"role": Role.SYSTEM.value, "content": request.system_prompt})
    probe.append({"role": Role.USER.value, "content": ""})
    try:
        probe_ids = tokenizer.encode(_render(probe, request, tokenizer))
    except InvalidRequest:
        return 0  # a template that refuses an empty user turn: nothing known to be shared
    shared = 0
    for mine, probed in zip(ids, probe_ids, strict=False):
        if mine != probed:
            break
        shared += 1
    return min(shared, len(ids) - 1)


def _render(
    messages: list[Message],
    request: GenerationRequest,
    tokenizer: ModelTokenizer,
    tools: list[object] | None = None,
) -> str:
    template = tokenizer.chat_template
    if not template:
        return render_plain(messages)
    try:
        try:
            return render_chat_template(template, messages, tokenizer.special_tokens, tools)
        except TemplateRefused:
            if messages[0]["role"] != Role.SYSTEM.value:
                raise
            return render_chat_template(
                template, _fold_system_into_user(messages), tokenizer.special_tokens, tools
            )
    except TemplateRefused as exc:
        field = "history" if request.history else request.prompt_field
        raise InvalidRequest(
            field, f"the model's chat template rejects this conversation: {exc}"
        ) from None


def prepare_prompt(
    request: GenerationRequest, tokenizer: ModelTokenizer, context_limit: int
) -> PreparedPrompt:
    """Render and encode the prompt; clip max_new_tokens to the context's room.

    Raises InvalidRequest (on the prompt field) when the prompt alone leaves no room
    for even one new token.
    """
    if context_limit < 1:
        raise ValueError(f"context_limit must be positive, got {context_limit}")
    text = build_prompt(request, tokenizer)
    ids = tuple(tokenizer.encode(text))
    if not request.chat_template:
        ids = with_bos(ids, tokenizer.plain_prompt_bos_id)
    room = context_limit - len(ids)
    if room < 1:
        raise InvalidRequest(
            request.prompt_field,
            f"the prompt is {len(ids)} tokens after applying the chat template; the "
            f"model's context holds {context_limit} tokens (prompt and completion), "
            "so there is no room to generate",
        )
    max_new_tokens = min(request.max_new_tokens, room)
    return PreparedPrompt(
        text=text,
        ids=ids,
        max_new_tokens=max_new_tokens,
        context_bound=max_new_tokens < request.max_new_tokens,
        shared_prefix_length=shared_prefix_length(request, tokenizer, ids),
    )


def with_bos(ids: Sequence[int], bos_id: int | None) -> tuple[int, ...]:
    """`ids` starting with `bos_id` exactly once (None: as they are)."""
    if bos_id is None or (ids and ids[0] == bos_id):
        return tuple(ids)
    return (bos_id, *ids)


def render_plain(messages: list[Message]) -> str:
    parts: list[str] = []
    rest = messages
    if messages and messages[0]["role"] == Role.SYSTEM.value:
        parts.append(f"System: {messages[0]['content']}\n\n")
        rest = messages[1:]
    parts.extend(f"{message['role'].capitalize()}: {message['content']}\n" for message in rest)
    parts.append("Assistant:")
    return "".join(parts)


def render_chat_template(
    template: str,
    messages: list[Message],
    special_tokens: dict[str, str],
    tools: list[object] | None = None,
) -> str:
    """Render like transformers' apply_chat_template(add_generation_prompt=True)."""
    variables: dict[str, object] = dict(special_tokens)
    variables.update(messages=messages, tools=tools, documents=None, add_generation_prompt=True)
    return compile_chat_template(template).render(**variables)


@functools.lru_cache(maxsize=8)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per template text; a backend may call this at load to fail early
    (jinja2.TemplateSyntaxError) on a broken template."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def _system_text(request: GenerationRequest) -> str | None:
    if request.rag_context is None:
        return request.system_prompt or None
    if request.system_prompt:
        return f"{request.system_prompt}\n\nContext:\n{request.rag_context}"
    return f"Context:\n{request.rag_context}"


def _fold_system_into_user(messages: list[Message]) -> list[Message]:
    system, rest = messages[0]["content"], [dict(message) for message in messages[1:]]
    for message in rest:
        if message["role"] == Role.USER.value:
            message["content"] = f"{system}\n\n{message['content']}"
            break
    return rest


def _raise_exception(message: str) -> None:
    raise TemplateRefused(message)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' own tojson: keeps non-ASCII text as is, unlike jinja2's built-in.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )
