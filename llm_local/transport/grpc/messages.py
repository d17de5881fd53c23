"""Wire messages <-> core types, for both generation services. No I/O.

`optional` proto fields become None when unset, so validation applies the configured
default; a field set to zero stays zero (and validation may reject it).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from llm_local.core.errors import InvalidRequest
from llm_local.core.types import Finished
from llm_local.core.validation import RawParams, RawRequest
from llm_local.proto.sentiric.llm.v1 import llama_pb2, local_pb2
from llm_local.transport.grpc.structured import engine_constraint


def _float32(value: float) -> float:
    # proto `float` is 32-bit: 0.7 arrives as 0.699999988. Seven significant digits
    # give back what the client wrote, for logs and for batching equal settings.
    return float(f"{value:.7g}")


def llama_raw_request(message: llama_pb2.GenerateStreamRequest) -> RawRequest:
    """GenerateStreamRequest -> RawRequest (the adapter id is checked in core against
    what the backend applies: core/adapters.py)."""
    adapter = message.lora_adapter_id if message.HasField("lora_adapter_id") else None
    rag_context = message.rag_context if message.HasField("rag_context") else None
    # Tools reach the model through the prompt (core/prompt.py).
    constraint = engine_constraint(message.params) if message.HasField("params") else None
    return RawRequest(
        user_prompt=message.user_prompt,
        system_prompt=message.system_prompt,
        rag_context=rag_context,
        history=tuple((turn.role, turn.content) for turn in message.history),
        params=llama_raw_params(message),
        constraint=constraint,
        adapter=adapter or None,
    )


def llama_raw_params(message: llama_pb2.GenerateStreamRequest) -> RawParams:
    # engine_specific_params: structured output (structured.py), read by llama_raw_request.
    if not message.HasField("params"):
        return RawParams()
    params = message.params

    def optional_float(name: str) -> float | None:
        return _float32(getattr(params, name)) if params.HasField(name) else None

    def optional_int(name: str) -> int | None:
        return int(getattr(params, name)) if params.HasField(name) else None

    return RawParams(
        max_new_tokens=optional_int("max_new_tokens"),
        temperature=optional_float("temperature"),
        top_k=optional_int("top_k"),
        top_p=optional_float("top_p"),
        repetition_penalty=optional_float("repetition_penalty"),
        stop_sequences=tuple(params.stop_sequences),
        seed=optional_int("seed"),
    )


def local_raw_request(message: local_pb2.LocalGenerateStreamRequest) -> RawRequest:
    """The seed-era request: the prompt is a single user turn, defaults for the rest."""
    return RawRequest(user_prompt=message.prompt, prompt_field="prompt")


def llama_token(text: str) -> llama_pb2.GenerateStreamResponse:
    return llama_pb2.GenerateStreamResponse(token=text.encode("utf-8"))


def llama_finish(finished: Finished) -> llama_pb2.GenerateStreamResponse:
    return llama_pb2.GenerateStreamResponse(
        finish_details=llama_pb2.FinishDetails(
            finish_reason=finished.reason.value,
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
        )
    )


def local_token(text: str) -> local_pb2.LocalGenerateStreamResponse:
    return local_pb2.LocalGenerateStreamResponse(token=text)


def undecodable_request(descriptor: Descriptor, wire: bytes, reason: str) -> InvalidRequest:
    """Why request bytes that protobuf refused are wrong, naming the field when it can:
    protobuf says only "String field had bad UTF-8", not which one."""
    field = first_non_utf8_string(descriptor, wire)
    if field is not None:
        return InvalidRequest(field, "is not valid UTF-8 (a proto string must be)")
    return InvalidRequest("request", f"is not a valid {descriptor.name}: {reason}")


def first_non_utf8_string(descriptor: Descriptor, wire: bytes, prefix: str = "") -> str | None:
    """The path ("history[1].content") of the first string field in `wire` whose bytes
    are not UTF-8, reading the wire format without decoding strings; None if none."""
    from google.protobuf import empty_pb2
    from google.protobuf.unknown_fields import UnknownFieldSet

    holder = empty_pb2.Empty()  # no fields of its own: every field stays raw bytes
    try:
        holder.ParseFromString(wire)
    except DecodeError:
        return None
    seen: dict[str, int] = {}
    fields = UnknownFieldSet(holder)
    for raw in (fields[position] for position in range(len(fields))):
        field = descriptor.fields_by_number.get(raw.field_number)
        if field is None or raw.wire_type != _LENGTH_DELIMITED:
            continue
        index = seen[field.name] = seen.get(field.name, -1) + 1
        path = f"{prefix}{field.name}" + (f"[{index}]" if field.is_repeated else "")
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                raw.data.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            inner = first_non_utf8_string(field.message_type, raw.data, f"{path}.")
            if inner is not None:
                return inner
    return None


_LENGTH_DELIMITED = 2  # the wire type of strings, bytes and embedded messages
