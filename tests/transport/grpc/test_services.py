"""LlamaService and LLMLocalService over a real socket: grpcio client, fake backend."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from llm_local.backends.fake import IM_END
from llm_local.proto.sentiric.llm.v1 import llama_pb2

StartServer = Callable[..., Awaitable[Any]]  # the start_server fixture (conftest.py)

# Long enough to still be running when a test acts on it: 256 tokens x 10 ms.
SLOW = {"token_delay_s": 0.01, "reply": "x" * 2000}


def request(prompt: str = "Hi", **params: Any) -> llama_pb2.GenerateStreamRequest:
    message = llama_pb2.GenerateStreamRequest(user_prompt=prompt)
    if params:
        message.params.CopyFrom(llama_pb2.GenerationParams(**params))
    return message


async def test_llama_streams_utf8_bytes_then_exactly_one_finish(start_server: StartServer) -> None:
    server = await start_server()
    prompt = "Grüße, 東京 🌍"  # several tokens per character with the byte-level fake

    responses = await server.call(lambda: list(server.llama(request(prompt))))

    *tokens, last = responses
    assert all(response.WhichOneof("type") == "token" for response in tokens)
    assert last.WhichOneof("type") == "finish_details"
    for response in tokens:  # each chunk is whole characters
        response.token.decode("utf-8")
    text = b"".join(response.token for response in tokens).decode("utf-8")
    assert text == f"Echo: {prompt}"
    details = last.finish_details
    assert details.finish_reason == "stop"
    assert details.completion_tokens == len(text.encode("utf-8")) + 1  # + <|im_end|>
    assert details.prompt_tokens == len(server.backend.calls[0].prompt_ids)


async def test_local_streams_readable_text(start_server: StartServer) -> None:
    server = await start_server()

    responses = await server.call(lambda: list(server.local("Grüße 🌍")))

    assert "".join(response.token for response in responses) == "Echo: Grüße 🌍"
    assert all(response.token and "\ufffd" not in response.token for response in responses)
    assert "<|im_end|>" not in responses[-1].token


async def test_a_history_and_a_system_prompt_reach_the_model(start_server: StartServer) -> None:
    server = await start_server()
    message = llama_pb2.GenerateStreamRequest(
        system_prompt="Be brief.",
        user_prompt="And now?",
        rag_context="Paris is in France.",
        history=[
            llama_pb2.ConversationTurn(role="user", content="Hello"),
            llama_pb2.ConversationTurn(role="assistant", content="Hi there"),
        ],
    )

    await server.call(lambda: list(server.llama(message)))

    prompt = server.backend.tokenizer.decode_with_specials(server.backend.calls[0].prompt_ids)
    assert prompt == (
        "<|im_start|>system\nBe brief.\n\nContext:\nParis is in France.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


async def test_unset_parameters_take_defaults_and_zero_stays_zero(
    start_server: StartServer,
) -> None:
    server = await start_server()
    defaults = server.service.settings.generation

    await server.call(lambda: list(server.llama(request(top_k=0, temperature=0.7))))

    sampling = server.backend.calls[0].sampling
    assert sampling.top_k == 0  # set to zero: "no top-k cut", not the default
    assert sampling.temperature == 0.7  # the float32 wire value, read back as written
    assert sampling.top_p == defaults.top_p  # unset
    assert server.backend.calls[0].max_new_tokens == defaults.max_new_tokens


async def test_max_new_tokens_ends_with_length(start_server: StartServer) -> None:
    server = await start_server()

    responses = await server.call(lambda: list(server.llama(request(max_new_tokens=3))))

    text = b"".join(response.token for response in responses[:-1])
    assert text == b"Ech"
    assert responses[-1].finish_details.finish_reason == "length"
    assert responses[-1].finish_details.completion_tokens == 3


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (request(""), "user_prompt"),
        (request("   "), "user_prompt"),
        (request(max_new_tokens=0), "params.max_new_tokens"),
        (request(top_p=1.5), "params.top_p"),
        (request(temperature=-1.0), "params.temperature"),
        (request(top_k=-2), "params.top_k"),
        (request(seed=-1), "params.seed"),
        (request(stop_sequences=[""]), "params.stop_sequences[0]"),
        (
            llama_pb2.GenerateStreamRequest(
                user_prompt="Hi", history=[llama_pb2.ConversationTurn(role="robot", content="x")]
            ),
            "history[0].role",
        ),
        (
            llama_pb2.GenerateStreamRequest(user_prompt="Hi", lora_adapter_id="a1"),
            "lora_adapter_id",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    start_server: StartServer, message: llama_pb2.GenerateStreamRequest, field: str
) -> None:
    server = await start_server()

    error = await server.call(server.error, lambda: list(server.llama(message)))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")
    assert server.backend.calls == []


async def test_empty_local_prompt_names_the_prompt_field(start_server: StartServer) -> None:
    server = await start_server()

    error = await server.call(server.error, lambda: list(server.local("")))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("prompt: ")


async def test_a_prompt_longer_than_the_context_names_the_prompt_field(
    start_server: StartServer,
) -> None:
    server = await start_server({"context_limit": 64})

    llama_error = await server.call(server.error, lambda: list(server.llama(request("x" * 100))))
    local_error = await server.call(server.error, lambda: list(server.local("x" * 100)))

    assert llama_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert llama_error.details().startswith("user_prompt: ")
    assert "context" in llama_error.details()
    assert local_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert local_error.details().startswith("prompt: ")


async def test_loading_model_is_unavailable(start_server: StartServer) -> None:
    server = await start_server(ready=False)

    error = await server.call(server.error, lambda: list(server.llama(request())))

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "loading" in error.details()


async def test_over_capacity_is_rejected_while_admitted_streams_complete(
    start_server: StartServer,
) -> None:
    server = await start_server(SLOW, capacity__max_concurrent=1, capacity__max_queued=0)
    first = await server.call(server.llama, request(max_new_tokens=40))
    first_chunk = await server.call(next, first)  # admitted and generating

    error = await server.call(server.error, lambda: list(server.llama(request())))
    local_error = await server.call(server.error, lambda: list(server.local("Hi")))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert local_error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "capacity" in error.details()
    rest = await server.call(list, first)
    assert first.code() == grpc.StatusCode.OK
    assert rest[-1].finish_details.completion_tokens == 40
    assert first_chunk.token.startswith(b"x")


async def test_deadline_stops_generation(start_server: StartServer) -> None:
    server = await start_server(SLOW)

    error = await server.call(server.error, lambda: list(server.llama(request(), timeout=0.2)))

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await server.wait_until_idle()
    assert server.service.admission.running == 0


async def test_client_cancel_stops_generation(start_server: StartServer) -> None:
    server = await start_server(SLOW)
    calls = [await server.call(server.llama, request()) for _ in range(5)]
    for call in calls:
        await server.call(next, call)

    for call in calls:
        call.cancel()

    await server.wait_until_idle()
    assert server.service.admission.running == 0
    follow_up = await server.call(lambda: list(server.llama(request(max_new_tokens=2))))
    assert follow_up[-1].finish_details.finish_reason == "length"


async def test_tenant_id_can_be_required(start_server: StartServer) -> None:
    server = await start_server(server__require_tenant_id=True)

    error = await server.call(server.error, lambda: list(server.llama(request())))
    blank = await server.call(
        server.error, lambda: list(server.llama(request(), metadata=[("x-tenant-id", " ")]))
    )
    answered = await server.call(
        lambda: list(server.llama(request(), metadata=[("x-tenant-id", "acme")]))
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "x-tenant-id metadata is required"
    assert blank.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert answered[-1].finish_details.finish_reason == "stop"


async def test_request_metadata_is_logged_with_the_outcome(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server()
    metadata = [
        ("x-tenant-id", "acme"),
        ("x-trace-id", "trace-1"),
        ("x-span-id", "span-9"),
        ("x-call-id", "call-3"),  # the same on every turn of a call (docs/SCALING.md)
    ]

    with caplog.at_level(logging.INFO, logger="llm_local.request"):
        await server.call(lambda: list(server.llama(request(), metadata=metadata)))

    (line,) = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert (line.tenant_id, line.trace_id, line.span_id) == ("acme", "trace-1", "span-9")  # type: ignore[attr-defined]
    assert line.call_id == "call-3"  # type: ignore[attr-defined]
    assert line.status == "OK"  # type: ignore[attr-defined]
    assert line.completion_tokens == len(b"Echo: Hi") + 1  # type: ignore[attr-defined]
    assert line.ttft_ms is not None  # type: ignore[attr-defined]


async def test_metrics_count_requests_by_status(start_server: StartServer) -> None:
    server = await start_server()

    await server.call(lambda: list(server.llama(request())))
    await server.call(server.error, lambda: list(server.llama(request(""))))

    metrics = server.service.metrics
    ok = metrics.requests.labels(service="LlamaService", code="OK")._value.get()
    invalid = metrics.requests.labels(service="LlamaService", code="INVALID_ARGUMENT")
    assert ok == 1
    assert invalid._value.get() == 1
    assert metrics.completion_tokens.labels(service="LlamaService")._value.get() == 9


async def test_a_bug_is_internal_and_the_server_stays_up(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server()
    real_generate = server.backend.generate
    monkeypatch.setattr(
        server.backend, "generate", lambda *args: (_ for _ in ()).throw(ZeroDivisionError("boom"))
    )

    with caplog.at_level(logging.INFO, logger="llm_local.request"):
        error = await server.call(
            server.error,
            lambda: list(server.llama(request(), metadata=[("x-trace-id", "trace-bug")])),
        )

    assert error.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in error.details()
    assert "request id" in error.details()
    (logged,) = [r for r in caplog.records if r.exc_info is not None]
    assert logged.trace_id == "trace-bug"  # type: ignore[attr-defined]
    assert "ZeroDivisionError" in caplog.text
    monkeypatch.setattr(server.backend, "generate", real_generate)
    answered = await server.call(lambda: list(server.llama(request())))
    assert answered[-1].finish_details.finish_reason == "stop"


async def test_a_backend_failure_midway(start_server: StartServer) -> None:
    server = await start_server({"fail_after_tokens": 4})

    llama = await server.call(lambda: list(server.llama(request())))
    local_error = await server.call(server.error, lambda: list(server.local("Hi")))

    assert b"".join(r.token for r in llama[:-1]) == b"Echo"
    assert llama[-1].finish_details.finish_reason == "error"
    assert local_error.code() == grpc.StatusCode.INTERNAL


async def test_stop_lets_short_streams_finish_and_cancels_long_ones(
    start_server: StartServer,
) -> None:
    server = await start_server(SLOW, server__grace_period_s=0.5)
    short = await server.call(server.llama, request(max_new_tokens=12))  # ~0.12 s
    long = await server.call(server.llama, request())  # ~2.6 s
    await server.call(next, short)
    await server.call(next, long)

    server.service.state.mark_stopping()
    server.shutdown.set()
    refused = await server.call(server.error, lambda: list(server.llama(request())))
    short_rest = await server.call(list, short)
    long_error = await server.call(server.error, lambda: list(long))

    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert short_rest[-1].finish_details.finish_reason == "length"
    assert long_error.code() == grpc.StatusCode.UNAVAILABLE
    assert long_error.details() == "server is shutting down"
    await server.wait_until_idle()


async def test_end_token_is_not_sent_as_text(start_server: StartServer) -> None:
    server = await start_server({"reply": "ok"})

    responses = await server.call(lambda: list(server.llama(request())))

    assert [r.token for r in responses[:-1]] == [b"ok"]
    assert server.backend.answer_ids(server.backend.calls[0].prompt_ids)[-1] == IM_END


async def test_each_refusal_before_the_flow_is_counted_once_with_its_code(
    start_server: StartServer,
) -> None:
    server = await start_server(
        limits__grpc_max_message_bytes=1024, limits__grpc_max_metadata_bytes=1024
    )
    metrics = server.service.metrics

    def count(service: str, code: str) -> float:
        value: float = metrics.requests.labels(service=service, code=code)._value.get()
        return value

    def raw_call(path: str, wire: bytes) -> grpc.RpcError:
        method = server.channel.unary_stream(
            path, request_serializer=lambda data: data, response_deserializer=lambda data: data
        )
        return server.error(lambda: list(method(wire, timeout=10)))

    llama_path = "/sentiric.llm.v1.LlamaService/GenerateStream"
    local_path = "/sentiric.llm.v1.LLMLocalService/LocalGenerateStream"
    padding = (("x-padding", "p" * 2048),)
    refusals: list[tuple[Callable[[], grpc.RpcError], str, grpc.StatusCode]] = [
        # (the call, its service label, its code)
        (
            lambda: server.error(lambda: list(server.llama(request("a" * 2048)))),
            "LlamaService",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            lambda: server.error(lambda: list(server.local("b" * 2048))),
            "LLMLocalService",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            lambda: server.error(lambda: list(server.llama(request(), metadata=padding))),
            "LlamaService",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            lambda: server.error(lambda: list(server.local("Hi", metadata=padding))),
            "LLMLocalService",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        # user_prompt (field 2) whose bytes are not UTF-8
        (
            lambda: raw_call(llama_path, b"\x12\x01\xff"),
            "LlamaService",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: raw_call(local_path, b"\x0a\x01\xff"),
            "LLMLocalService",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: raw_call("/sentiric.llm.v1.LlamaService/Nothing", b""),
            "unknown",
            grpc.StatusCode.UNIMPLEMENTED,
        ),
    ]
    for call, service, code in refusals:
        before = count(service, code.name)
        error = await server.call(call)
        assert error.code() == code, (service, code, error.details())
        assert count(service, code.name) == before + 1, (service, code)

    total = sum(
        sample.value
        for metric in metrics.requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    assert total == len(refusals)
    # The connection and the flow serve on.
    assert (await server.call(lambda: list(server.llama(request()))))[-1].HasField("finish_details")
    assert count("LlamaService", "OK") == 1
