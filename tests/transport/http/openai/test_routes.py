"""The /v1/* routes through Quart's test app (lifespan included: streams run in the
app's nursery), on the fake backend, which echoes the user's prompt."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as Client

from llm_local.backends.fake import FakeConfig
from llm_local.service import Service
from llm_local.serving import GenerationFlow
from llm_local.transport.http.app import create_app

ServiceFactory = Callable[..., Service]
CHAT = "/v1/chat/completions"


async def ready(service: Service) -> Service:
    await service.backend.load()
    service.state.mark_ready(service.backend.info)
    return service


@asynccontextmanager
async def client_for(service: Service) -> AsyncIterator[Client]:
    app = create_app(service, GenerationFlow(service))
    async with app.test_app() as test_app:
        yield test_app.test_client()


def chat_body(prompt: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], **extra}


async def post_stream(client: Client, path: str, body: dict[str, Any]) -> tuple[int, str, str]:
    """(status, content type, body text), read as it arrives: the test client's plain
    post() waits for the whole response and holds only ten chunks meanwhile."""
    async with client.request(path, method="POST") as connection:
        await connection.send(json.dumps(body).encode())
        await connection.send_complete()
        data = bytearray()
        with contextlib.suppress(trio.EndOfChannel):
            while True:
                data += await connection.receive()
    headers = connection.headers
    assert connection.status_code is not None and headers is not None
    return connection.status_code, headers["Content-Type"], data.decode()


def sse_events(text: str) -> list[Any]:
    """The data of each event; "[DONE]" stays a string."""
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


async def test_chat_completion_answers_with_usage(make_service: ServiceFactory) -> None:
    service = await ready(make_service())
    async with client_for(service) as client:
        response = await client.post(CHAT, json=chat_body("Hello there"))
        body = await response.get_json()

    assert response.status_code == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Echo: Hello there"}
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streamed_chat_is_role_deltas_finish_usage_done(
    make_service: ServiceFactory,
) -> None:
    service = await ready(make_service(fake=FakeConfig(group_size=2)))
    body = chat_body("Hello there", stream=True, stream_options={"include_usage": True})
    async with client_for(service) as client:
        status, content_type, text = await post_stream(client, CHAT, body)

    assert status == 200
    assert content_type.startswith("text/event-stream")
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert len(deltas) > 1
    assert "".join(deltas) == "Echo: Hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


async def test_completion_sends_the_prompt_without_the_chat_template(
    make_service: ServiceFactory,
) -> None:
    service = await ready(make_service())
    async with client_for(service) as client:
        response = await client.post("/v1/completions", json={"prompt": "User: Hi\nAssistant:"})
        body = await response.get_json()

    # The fake backend echoes what follows "User: " in a plain prompt: here the text
    # reached it as is; through a chat template it would have been wrapped.
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Echo: Hi"


async def test_bad_parameters_are_400_naming_the_field(make_service: ServiceFactory) -> None:
    service = await ready(make_service())
    cases = {
        "temperature": chat_body(temperature=-1),
        "top_p": chat_body(top_p=2),
        "max_tokens": chat_body(max_tokens=0),
        "n": chat_body(n=2),
        "presence_penalty": chat_body(presence_penalty=0.5),
        "tools": chat_body(tools=[{"type": "function", "function": {"name": "f"}}]),
        "stop": chat_body(stop=""),
        "messages[1].role": {"messages": [{"role": "user", "content": "a"}, {"role": "x"}]},
        "messages[0].content": chat_body(" "),
        "whatever": chat_body(whatever=1),
    }
    async with client_for(service) as client:
        for param, body in cases.items():
            response = await client.post(CHAT, json=body)
            error = (await response.get_json())["error"]
            assert (response.status_code, error["param"]) == (400, param), error
            assert error["message"].startswith(f"{param}: "), error
            assert error["type"] == "invalid_request_error"
    assert service.metrics is not None


async def test_a_full_server_answers_429_with_retry_after(make_service: ServiceFactory) -> None:
    service = await ready(make_service(max_concurrent=1, fake=FakeConfig(token_delay_s=0.05)))
    async with client_for(service) as client, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(client.post, CHAT, json=chat_body("long " * 20)))
        while service.admission.running < 1:  # noqa: ASYNC110 (no event to wait on)
            await trio.sleep(0.01)
        response = await client.post(CHAT, json=chat_body())

        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        assert (await response.get_json())["error"]["type"] == "rate_limit_error"


async def test_loading_model_answers_503(make_service: ServiceFactory) -> None:
    service = make_service()
    async with client_for(service) as client:
        response = await client.post(CHAT, json=chat_body())

    assert response.status_code == 503
    assert "loading" in (await response.get_json())["error"]["message"]


async def test_api_keys_guard_v1_but_not_health(make_service: ServiceFactory) -> None:
    service = await ready(make_service(openai__api_keys="key-one,key-two"))
    async with client_for(service) as client:
        missing = await client.get("/v1/models")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer key-three"})
        right = await client.get("/v1/models", headers={"Authorization": "Bearer key-two"})
        health = await client.get("/health")

    assert missing.status_code == 401
    assert (await missing.get_json())["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert health.status_code == 200


async def test_models_lists_the_configured_model(make_service: ServiceFactory) -> None:
    service = await ready(make_service(openai__model_id="my-model"))
    async with client_for(service) as client:
        listing = await (await client.get("/v1/models")).get_json()
        one = await client.get("/v1/models/my-model")
        other = await client.get("/v1/models/gpt-4")
        wrong_model = await client.post(CHAT, json=chat_body(model="gpt-4"))

    assert [model["id"] for model in listing["data"]] == ["my-model"]
    assert (await one.get_json())["owned_by"] == "llm-local"
    assert other.status_code == 404
    assert wrong_model.status_code == 404
    assert (await wrong_model.get_json())["error"]["param"] == "model"


async def test_oversized_body_is_413_and_bad_json_400(make_service: ServiceFactory) -> None:
    service = await ready(make_service(openai__max_body_bytes=2048))
    async with client_for(service) as client:
        large = await client.post(CHAT, json=chat_body("x" * 4096))
        broken = await client.post(CHAT, data=b"{not json")
        unknown = await client.get("/v1/nothing")

    assert large.status_code == 413
    assert (await large.get_json())["error"]["type"] == "invalid_request_error"
    assert "openai.max_body_bytes" in (await large.get_json())["error"]["message"]
    assert broken.status_code == 400
    assert "not valid JSON" in (await broken.get_json())["error"]["message"]
    assert unknown.status_code == 404
    assert "error" in await unknown.get_json()


async def test_closing_a_stream_stops_the_generation(make_service: ServiceFactory) -> None:
    service = await ready(make_service(fake=FakeConfig(token_delay_s=0.02, group_size=1)))
    app = create_app(service, GenerationFlow(service))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with client.request(CHAT, method="POST") as connection:
            await connection.send(json.dumps(chat_body("long " * 200, stream=True)).encode())
            await connection.send_complete()
            await connection.receive()  # the stream has started
            assert service.admission.running == 1
            await connection.disconnect()
            with trio.fail_after(5):
                while service.admission.running:  # noqa: ASYNC110 (no event to wait on)
                    await trio.sleep(0.01)
            # Quart's test connection waits for a body end that a disconnected request
            # never sends (hypercorn does not wait): end it here.
            connection._client_send.close()  # type: ignore[attr-defined]


def requests_total(service: Service, rpc: str, code: str) -> float:
    value: float = service.metrics.requests.labels(service=rpc, code=code)._value.get()
    return value


async def test_each_refusal_before_the_flow_is_counted_once_with_its_code(
    make_service: ServiceFactory,
) -> None:
    service = await ready(
        make_service(
            openai__api_keys="key",
            openai__max_body_bytes=2048,
            limits__http_max_header_bytes=4096,
        )
    )
    auth = {"Authorization": "Bearer key"}
    refusals: list[tuple[str, dict[str, Any], str, int]] = [
        # (path, post() arguments, the counted code, the HTTP status)
        ("/v1/completions", {"json": {"prompt": "Hi"}}, "UNAUTHENTICATED", 401),
        (CHAT, {"data": b"{not json", "headers": auth}, "INVALID_ARGUMENT", 400),
        (CHAT, {"json": [1, 2], "headers": auth}, "INVALID_ARGUMENT", 400),
        (CHAT, {"json": chat_body(model="gpt-4"), "headers": auth}, "NOT_FOUND", 404),
        (CHAT, {"json": chat_body("x" * 4096), "headers": auth}, "RESOURCE_EXHAUSTED", 413),
        (
            "/v1/completions",
            {"json": {"prompt": "Hi"}, "headers": {**auth, "x-padding": "p" * 8192}},
            "RESOURCE_EXHAUSTED",
            431,
        ),
    ]
    rpcs = {CHAT: "openai.chat.completions", "/v1/completions": "openai.completions"}
    async with client_for(service) as client:
        for path, arguments, code, status in refusals:
            before = requests_total(service, rpcs[path], code)
            response = await client.post(path, **arguments)
            assert response.status_code == status, (path, code)
            assert requests_total(service, rpcs[path], code) == before + 1, (path, code, status)
        # A request the flow refuses is counted there, once too.
        invalid = await client.post(CHAT, json=chat_body(temperature=-1), headers=auth)
        assert invalid.status_code == 400

    assert requests_total(service, "openai.chat.completions", "INVALID_ARGUMENT") == 3
    total = sum(
        sample.value
        for metric in service.metrics.requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
    assert total == len(refusals) + 1


async def test_a_plain_completion_gets_the_bos_its_tokenizer_asks_for_exactly_once(
    make_service: ServiceFactory,
) -> None:
    from llm_local.backends.fake import FakeBackend
    from llm_local.backends.fake.tokenizer import IM_START

    prompt = "User: Hi\nAssistant:"
    received: dict[tuple[bool, str], tuple[tuple[int, ...], int]] = {}
    for asks in (True, False):
        service = await ready(make_service(fake=FakeConfig(plain_prompt_bos=asks)))
        backend = service.backend
        assert isinstance(backend, FakeBackend)
        async with client_for(service) as client:
            for text in (prompt, "<|im_start|>" + prompt):
                response = await client.post("/v1/completions", json={"prompt": text})
                usage = (await response.get_json())["usage"]
                received[asks, text] = (backend.calls[-1].prompt_ids, usage["prompt_tokens"])

    plain_ids = tuple(prompt.encode())
    # Asked for: one BOS, whether the prompt spelled it or not, and counted in the usage.
    assert received[True, prompt] == ((IM_START, *plain_ids), len(plain_ids) + 1)
    assert received[True, "<|im_start|>" + prompt] == ((IM_START, *plain_ids), len(plain_ids) + 1)
    # Not asked for: the prompt's own ids, a spelled BOS kept as written.
    assert received[False, prompt] == (plain_ids, len(plain_ids))
    assert received[False, "<|im_start|>" + prompt] == ((IM_START, *plain_ids), len(plain_ids) + 1)


async def test_a_chat_prompt_is_the_same_whether_or_not_plain_prompts_get_a_bos(
    make_service: ServiceFactory,
) -> None:
    from llm_local.backends.fake import FakeBackend

    seen = []
    for asks in (True, False):
        service = await ready(make_service(fake=FakeConfig(plain_prompt_bos=asks)))
        backend = service.backend
        assert isinstance(backend, FakeBackend)
        async with client_for(service) as client:
            response = await client.post(CHAT, json=chat_body("Hi"))
            usage = (await response.get_json())["usage"]
        seen.append((backend.calls[-1].prompt_ids, usage["prompt_tokens"]))

    assert seen[0] == seen[1]
    assert seen[0][1] == len(seen[0][0])


async def test_adapters_a_backend_cannot_apply_are_not_listed_and_refused_by_name(
    make_service: ServiceFactory,
) -> None:
    # The fake backend, like ct2, applies no LoRA adapter.
    service = await ready(make_service(adapters={"pirate": "/adapters/pirate"}))
    async with client_for(service) as client:
        listed = await client.get("/v1/models")
        model = (await listed.get_json())["data"][0]["id"]
        one = await client.get(f"/v1/models/{model}:pirate")
        refused = await client.post(CHAT, json=chat_body(model=f"{model}:pirate"))

    assert [m["id"] for m in (await listed.get_json())["data"]] == [model]
    assert one.status_code == 404
    assert refused.status_code == 400
    error = (await refused.get_json())["error"]
    assert error["param"] == "model"
    assert "cannot apply LoRA adapters" in error["message"]


async def test_the_request_log_line_names_the_call_its_turn_belongs_to(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    service = await ready(make_service())
    with caplog.at_level(logging.INFO, logger="llm_local.request"):
        async with client_for(service) as client:
            for turn in ("Hello", "And then?"):
                response = await client.post(
                    CHAT, json=chat_body(turn), headers={"x-call-id": "call-42"}
                )
                assert response.status_code == 200
            anonymous = await client.post(CHAT, json=chat_body("Who?"))
            assert anonymous.status_code == 200

    finished = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert [getattr(r, "call_id", "unset") for r in finished] == ["call-42", "call-42", None]
