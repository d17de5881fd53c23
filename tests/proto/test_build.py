"""The checked-in generated modules match the .proto files, and those match the contract."""

from __future__ import annotations

import pytest

from llm_local.proto import build
from llm_local.proto.sentiric.llm.v1 import llama_grpc, llama_pb2, local_grpc, local_pb2


def test_checked_in_modules_describe_the_proto_files() -> None:
    fresh = build.fresh_descriptors()

    assert set(fresh) == {"sentiric/llm/v1/llama.proto", "sentiric/llm/v1/local.proto"}
    for module in (llama_pb2, local_pb2):
        assert module.DESCRIPTOR.serialized_pb == fresh[module.DESCRIPTOR.name], (
            f"{module.__name__} is stale: run `make proto`"
        )


def test_generated_stubs_import_inside_the_package_and_keep_the_wire_paths() -> None:
    class Llama(llama_grpc.LlamaServiceBase):  # type: ignore[misc]
        async def GenerateStream(self, stream: object) -> None:
            pass

    class Local(local_grpc.LLMLocalServiceBase):  # type: ignore[misc]
        async def LocalGenerateStream(self, stream: object) -> None:
            pass

    mapping = Llama().__mapping__()
    local_mapping = Local().__mapping__()

    assert list(mapping) == ["/sentiric.llm.v1.LlamaService/GenerateStream"]
    assert list(local_mapping) == ["/sentiric.llm.v1.LLMLocalService/LocalGenerateStream"]
    assert mapping["/sentiric.llm.v1.LlamaService/GenerateStream"].request_type is (
        llama_pb2.GenerateStreamRequest
    )


def test_import_rewriting_leaves_method_paths_alone() -> None:
    source = (
        "import sentiric.llm.v1.llama_pb2\n"
        "'/sentiric.llm.v1.LlamaService/GenerateStream'\n"
        "x = sentiric.llm.v1.llama_pb2.GenerateStreamRequest\n"
    )

    assert build._qualify_imports(source) == (
        "import llm_local.proto.sentiric.llm.v1.llama_pb2\n"
        "'/sentiric.llm.v1.LlamaService/GenerateStream'\n"
        "x = llm_local.proto.sentiric.llm.v1.llama_pb2.GenerateStreamRequest\n"
    )


# (message, field) -> (number, proto3 optional): the contract's table (CONTRACT.md).
CONTRACT = {
    ("GenerateStreamRequest", "system_prompt"): (1, False),
    ("GenerateStreamRequest", "user_prompt"): (2, False),
    ("GenerateStreamRequest", "rag_context"): (3, True),
    ("GenerateStreamRequest", "history"): (4, False),
    ("GenerateStreamRequest", "params"): (5, True),
    ("GenerateStreamRequest", "lora_adapter_id"): (6, True),
    ("ConversationTurn", "role"): (1, False),
    ("ConversationTurn", "content"): (2, False),
    ("GenerationParams", "max_new_tokens"): (1, True),
    ("GenerationParams", "temperature"): (2, True),
    ("GenerationParams", "top_k"): (3, True),
    ("GenerationParams", "top_p"): (4, True),
    ("GenerationParams", "repetition_penalty"): (5, True),
    ("GenerationParams", "stop_sequences"): (6, False),
    ("GenerationParams", "seed"): (7, True),
    ("GenerationParams", "engine_specific_params"): (20, True),
    ("GenerateStreamResponse", "token"): (1, False),
    ("GenerateStreamResponse", "finish_details"): (2, False),
    ("FinishDetails", "finish_reason"): (1, False),
    ("FinishDetails", "prompt_tokens"): (2, False),
    ("FinishDetails", "completion_tokens"): (3, False),
}


@pytest.mark.parametrize(("message", "field"), sorted(CONTRACT))
def test_llama_fields_follow_the_contract(message: str, field: str) -> None:
    descriptor = llama_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
    number, optional = CONTRACT[(message, field)]

    assert descriptor.number == number
    assert (
        descriptor.containing_oneof is not None and descriptor.containing_oneof.name.startswith("_")
    ) == optional


def test_token_is_bytes_on_llama_and_string_on_local() -> None:
    llama_token = llama_pb2.GenerateStreamResponse.DESCRIPTOR.fields_by_name["token"]
    local_token = local_pb2.LocalGenerateStreamResponse.DESCRIPTOR.fields_by_name["token"]

    assert llama_token.type == llama_token.TYPE_BYTES
    assert llama_token.containing_oneof.name == "type"
    assert local_token.type == local_token.TYPE_STRING
    assert local_pb2.LocalGenerateStreamRequest.DESCRIPTOR.fields_by_name["prompt"].number == 1
