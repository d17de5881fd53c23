"""Property-based fuzzing of both generation services through a real server.

Any combination of field values (strings huge, unicode, with NUL or not UTF-8 at all;
numbers negative, NaN, infinite, huge; repeated fields long or empty; fields missing)
ends with OK, INVALID_ARGUMENT naming a field, or RESOURCE_EXHAUSTED (a limit): never
INTERNAL or UNKNOWN; and the server is healthy afterwards.

Deterministic in CI: derandomized, no example database, a fixed number of examples.
Generations stay tiny: the server's default is 3 new tokens and the strategy asks for at
most 4 unless it asks for a value that is refused anyway.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm_local.proto.sentiric.llm.v1 import llama_pb2, local_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

LLAMA_METHOD = "/sentiric.llm.v1.LlamaService/GenerateStream"
LOCAL_METHOD = "/sentiric.llm.v1.LLMLocalService/LocalGenerateStream"
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ACCEPTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
# "user_prompt: ...", "params.top_p: ...", "history[3].role: ...": a field path, then why.
FIELD_PATH = re.compile(r"^([a-z_]+)(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: \S")
LLAMA_FIELDS = {f.name for f in llama_pb2.GenerateStreamRequest.DESCRIPTOR.fields}
LOCAL_FIELDS = {f.name for f in local_pb2.LocalGenerateStreamRequest.DESCRIPTOR.fields}


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any]) -> Any:
    return serve(env={"LLM_LOCAL_SERVICE_GENERATION__MAX_NEW_TOKENS": "3"})


@pytest.fixture(scope="module")
def channel(server: Any) -> grpc.Channel:
    # Room for the 5 MB messages the limit must refuse (grpcio refuses to send beyond
    # its own default otherwise, and the server would never see them).
    return server.channel(**{"grpc.max_send_message_length": 8 << 20})


# -- strategies ------------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=200),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\u202e\u0301", "😀" * 10, "<|im_end|>"]),
)
HUGE = ("語" * 20_000, "x" * ((4 << 20) + 1))  # beyond the context; beyond 4 MiB


def mostly(usual: st.SearchStrategy[Any], *rare: st.SearchStrategy[Any]) -> Any:
    """Mostly `usual`, else one of `rare`: with every field drawn from anything of its
    type, nearly every request would be refused before generating. (Hypothesis favours
    simple choices, so the rare ones sit at the far end of the draw, not at 0.)"""
    return st.integers(0, 9).flatmap(lambda k: usual if k < 7 else st.one_of(*rare))


prompts = mostly(st.text(min_size=1, max_size=60), texts, st.sampled_from(HUGE))


@dataclass(frozen=True)
class Wire:
    """Request bytes, shown short when hypothesis reports a failing example."""

    data: bytes

    def __repr__(self) -> str:
        if len(self.data) <= 300:
            return f"Wire({self.data!r})"
        return f"Wire({self.data[:300]!r} ... {len(self.data)} bytes)"


int32s = st.integers(-(2**31), 2**31 - 1)
float32s = st.floats(width=32, allow_nan=True, allow_infinity=True)
# Tiny generations, or values refused whatever they are.
max_new_tokens = st.one_of(
    st.integers(1, 4), st.integers(-(2**31), 0), st.integers(2049, 2**31 - 1)
)
roles = st.one_of(
    st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["", "USER"]), texts
)


def sometimes_valid(valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> Any:
    """A value the server accepts, or anything of the type (see `mostly`)."""
    return st.one_of(valid, anything)


@st.composite
def generation_params(draw: st.DrawFn) -> llama_pb2.GenerationParams:
    params = llama_pb2.GenerationParams()
    for name, values in (
        ("max_new_tokens", max_new_tokens),
        ("temperature", sometimes_valid(st.floats(0, 2, width=32), float32s)),
        ("top_k", sometimes_valid(st.integers(0, 100), int32s)),
        ("top_p", sometimes_valid(st.floats(0.125, 1, width=32), float32s)),
        ("repetition_penalty", sometimes_valid(st.floats(0.5, 2, width=32), float32s)),
        ("seed", sometimes_valid(st.integers(0, 2**32), st.integers(-(2**63), 2**63 - 1))),
    ):
        if draw(st.booleans()):
            setattr(params, name, draw(values))
    stops = sometimes_valid(
        st.lists(st.text(min_size=1, max_size=8), max_size=3), st.lists(texts, max_size=10)
    )
    params.stop_sequences.extend(draw(stops))
    if draw(st.booleans()):
        params.engine_specific_params.update({draw(st.text(max_size=8)): draw(texts)})
    return params


@st.composite
def llama_requests(draw: st.DrawFn) -> Wire:
    message = llama_pb2.GenerateStreamRequest(
        user_prompt=draw(prompts), system_prompt=draw(st.one_of(st.just(""), texts))
    )
    if draw(st.booleans()):
        message.rag_context = draw(texts)
    if draw(st.integers(0, 3)) == 3:
        message.lora_adapter_id = draw(st.one_of(st.just(""), texts))
    for role, content in draw(st.lists(st.tuples(roles, texts), max_size=4)):
        message.history.add(role=role, content=content)
    if draw(st.booleans()):
        message.params.CopyFrom(draw(generation_params()))
    wire = message.SerializeToString()
    if draw(st.integers(0, 9)) == 9:
        # A string field that is not UTF-8 (protobuf's own classes cannot write one):
        # user_prompt (field 2) again, whose last occurrence wins.
        wire += b"\x12\x03\xff\xfe\x00"
    return Wire(wire)


@st.composite
def local_requests(draw: st.DrawFn) -> Wire:
    wire = local_pb2.LocalGenerateStreamRequest(prompt=draw(prompts)).SerializeToString()
    if draw(st.integers(0, 9)) == 9:
        wire += b"\x0a\x02\xc3\x28"  # prompt (field 1): an invalid 2-byte sequence
    return Wire(wire)


# -- calls -------------------------------------------------------------------------------


def call(channel: grpc.Channel, method: str, wire: bytes, response_type: Any) -> Any:
    """Send raw request bytes; return (status code, details, responses)."""
    stub = channel.unary_stream(
        method,
        request_serializer=lambda raw: raw,
        response_deserializer=response_type.FromString,
    )
    responses = stub(wire, timeout=60)
    try:
        received = list(responses)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", []
    return responses.code(), "", received


def check_outcome(code: grpc.StatusCode, details: str, fields: set[str]) -> None:
    event(f"{code.name} {details.split(':')[0][:40]}")  # pytest --hypothesis-show-statistics
    assert code in ACCEPTED | {grpc.StatusCode.RESOURCE_EXHAUSTED}, (code, details[:300])
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        named = FIELD_PATH.match(details)
        assert named is not None, details[:300]
        assert named.group(1) in fields, details[:300]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "limits." in details or "capacity" in details, details[:300]


def requested_tokens(wire: Wire) -> int | None:
    message = llama_pb2.GenerateStreamRequest.FromString(wire.data)  # served: valid
    if message.HasField("params") and message.params.HasField("max_new_tokens"):
        return message.params.max_new_tokens
    return None


@FUZZ
@given(wire=llama_requests())
def test_llama_requests_are_served_or_refused_naming_a_field(
    channel: grpc.Channel, wire: Wire
) -> None:
    code, details, responses = call(
        channel, LLAMA_METHOD, wire.data, llama_pb2.GenerateStreamResponse
    )

    check_outcome(code, details, LLAMA_FIELDS)
    if code == grpc.StatusCode.OK:
        finish = responses[-1].finish_details
        assert [r.WhichOneof("type") for r in responses].count("finish_details") == 1
        assert finish.finish_reason in ("stop", "length", "context_full")
        assert finish.completion_tokens <= (requested_tokens(wire) or 3)


@settings(FUZZ, max_examples=12)
@given(wire=local_requests())
def test_local_requests_are_served_or_refused_naming_a_field(
    channel: grpc.Channel, wire: Wire
) -> None:
    code, details, _ = call(channel, LOCAL_METHOD, wire.data, local_pb2.LocalGenerateStreamResponse)

    check_outcome(code, details, LOCAL_FIELDS)


def test_the_server_is_healthy_after_the_fuzzing(server: Any, channel: grpc.Channel) -> None:
    request = llama_pb2.GenerateStreamRequest(
        user_prompt="What is the capital of France? Answer in one sentence.",
        params=llama_pb2.GenerationParams(max_new_tokens=3),
    )
    code, _, responses = call(
        channel, LLAMA_METHOD, request.SerializeToString(), llama_pb2.GenerateStreamResponse
    )

    assert code == grpc.StatusCode.OK
    assert responses[-1].finish_details.completion_tokens == 3
    assert server.http_json("/health")[0] == 200
    assert server.process.poll() is None
    assert server.metric("llm_local_requests_running") == 0
    assert not math.isnan(server.metric("llm_local_requests_total", {"code": "OK"}) or 0.0)
