"""Server reflection (what `grpcurl list` / `describe` use), v1 and v1alpha."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpclib.reflection.v1 import reflection_pb2 as v1
from grpclib.reflection.v1alpha import reflection_pb2 as v1alpha

StartServer = Callable[..., Awaitable[Any]]  # the start_server fixture (conftest.py)

VERSIONS = {
    "v1": (v1, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
    "v1alpha": (v1alpha, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
}


def ask(channel: Any, version: str, **request: str) -> Any:
    module, path = VERSIONS[version]
    method = channel.stream_stream(
        path,
        request_serializer=module.ServerReflectionRequest.SerializeToString,
        response_deserializer=module.ServerReflectionResponse.FromString,
    )
    (response,) = list(method(iter([module.ServerReflectionRequest(**request)]), timeout=5))
    return response


@pytest.mark.parametrize("version", VERSIONS)
async def test_lists_every_service(start_server: StartServer, version: str) -> None:
    server = await start_server()

    response = await server.call(ask, server.channel, version, list_services="")

    names = {service.name for service in response.list_services_response.service}
    assert {
        "sentiric.llm.v1.LlamaService",
        "sentiric.llm.v1.LLMLocalService",
        "grpc.health.v1.Health",
    } <= names


async def test_describes_the_llama_service(start_server: StartServer) -> None:
    server = await start_server()

    response = await server.call(
        ask, server.channel, "v1", file_containing_symbol="sentiric.llm.v1.LlamaService"
    )

    protos = [
        FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    llama = next(proto for proto in protos if proto.name == "sentiric/llm/v1/llama.proto")
    (service,) = llama.service
    (method,) = service.method
    assert (method.name, method.server_streaming) == ("GenerateStream", True)
    params = next(message for message in llama.message_type if message.name == "GenerationParams")
    engine = next(field for field in params.field if field.name == "engine_specific_params")
    assert (engine.number, engine.type_name) == (20, ".google.protobuf.Struct")
