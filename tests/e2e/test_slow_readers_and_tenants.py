"""Clients that stop reading, and tenants that flood: a real server, the real model.

One server for the module: a short stall timeout (2 s), one worker decoding batches of
at most 4 (so that "one batch" is something a test can count), a limit of 12 running +
queued generations per tenant. int8 without the numerics check: faster than the test
environment's float32, and no test here reads the answers' words.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2
from soak.rawsocket import stalled_grpc_call, stalled_sse_request

pytestmark = [pytest.mark.e2e, pytest.mark.model]

LLAMA_METHOD = "/sentiric.llm.v1.LlamaService/GenerateStream"
# Greedy SmolLM2 counts on and on: a generation that outlives any test's patience.
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
STALL_TIMEOUT_S = 2.0
BATCH = 4
TENANT_LIMIT = 12
FLOOD_TOKENS = 96


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any]) -> Any:
    return serve(
        env={
            "LLM_LOCAL_SERVICE_SERVER__STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
            "LLM_LOCAL_SERVICE_RUNTIME__MAX_BATCH_SIZE": str(BATCH),
            "LLM_LOCAL_SERVICE_RUNTIME__INTER_THREADS": "1",
            # No extra lane: the fairness test counts the batches of the one worker, and a
            # lane opened on a busy machine would start a second flood batch beside it.
            "LLM_LOCAL_SERVICE_RUNTIME__TTFT_TARGET_MS": "0",
            "LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE": "int8",
            "LLM_LOCAL_SERVICE_NUMERICS__ACCEPT_UNVERIFIED": "true",
            "LLM_LOCAL_SERVICE_CAPACITY__MAX_PER_TENANT": str(TENANT_LIMIT),
        }
    )


@pytest.fixture(scope="module")
def channel(server: Any) -> grpc.Channel:
    return server.channel()


def endless(max_new_tokens: int) -> llama_pb2.GenerateStreamRequest:
    return llama_pb2.GenerateStreamRequest(
        user_prompt=ENDLESS, params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    )


def test_readers_that_stop_are_cancelled_while_other_streams_flow(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    # gRPC: an HTTP/2 window of 0. HTTP: a tiny socket buffer never read, and an answer
    # long enough to fill the kernel's buffers and the stream's channel behind them.
    stalled_grpc = stalled_grpc_call(
        server.grpc_port,
        LLAMA_METHOD,
        endless(1000).SerializeToString(),
        {"x-tenant-id": "stalled"},
    )
    stalled_http = stalled_sse_request(
        server.http_port,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": ENDLESS}], "max_tokens": 1500, "stream": True},
        {"x-tenant-id": "stalled"},
    )
    try:
        server.wait_for_metric("llm_local_requests_running", 2.0)
        # Meanwhile another client's stream is served to its end.
        responses = list(rpc.llama(channel, endless(8), metadata=(("x-tenant-id", "reader"),)))
        assert responses[-1].finish_details.completion_tokens == 8

        for service in ("LlamaService", "openai.chat.completions"):
            server.wait_for_metric(
                "llm_local_streams_stalled_total", 1.0, {"service": service}, limit_s=60
            )
        server.wait_for_metric("llm_local_requests_running", 0.0)
        server.wait_for_metric("llm_local_backend_running", 0.0)
    finally:
        stalled_grpc.close()
        stalled_http.close()
    log = server.log_text()
    assert log.count("client stopped reading") >= 2
    assert "stream cancelled, slot freed" in log


def test_one_tenant_flooding_delays_another_by_at_most_one_batch(
    server: Any, channel: grpc.Channel, rpc: Any
) -> None:
    first_token_at: dict[str, float] = {}
    finished: dict[str, int] = {}
    lock = threading.Lock()

    def stream(name: str, tenant: str) -> None:
        # Long enough that the flood's first batch still decodes when the lone request
        # arrives (two refusals later), on a busy machine too: 24 tokens was not (a second
        # batch of the flood had started, and the lone one came a batch later than meant).
        call = rpc.llama(
            channel, endless(FLOOD_TOKENS), metadata=(("x-tenant-id", tenant),), timeout=120
        )
        for response in call:
            if response.WhichOneof("type") == "token":
                with lock:
                    first_token_at.setdefault(name, time.monotonic())
            else:
                finished[name] = response.finish_details.completion_tokens

    flood = [
        threading.Thread(target=stream, args=(f"flood-{n}", "flood")) for n in range(TENANT_LIMIT)
    ]
    for thread in flood:
        thread.start()
    # One batch of the flood decodes, the rest of it waits in the backend.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = server.metric("llm_local_backend_running") or 0
        queued = server.metric("llm_local_backend_queued") or 0
        if running >= 1 and queued >= BATCH and running + queued == TENANT_LIMIT:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the flood never waited in the backend: {running} running, {queued} queued")

    # The flooding tenant is at its limit: refused at once, by name, on both APIs.
    refused = rpc.error(lambda: list(rpc.llama(channel, endless(4), (("x-tenant-id", "flood"),))))
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'flood' at its limit" in refused.details()
    status, body = _post_chat(server, "flood")
    assert status == 429
    assert "tenant 'flood' at its limit" in body

    lone = threading.Thread(target=stream, args=("lone", "lone"))
    lone.start()
    for thread in [*flood, lone]:
        thread.join(timeout=120)
    assert set(finished) == {*(f"flood-{n}" for n in range(TENANT_LIMIT)), "lone"}

    # In arrival order the lone request would wait for all three batches of the flood;
    # in turns it joins the next batch: at most two batches of the flood start before it.
    started_before = sum(
        1 for name, at in first_token_at.items() if name != "lone" and at < first_token_at["lone"]
    )
    assert started_before <= 2 * BATCH, first_token_at

    assert server.metric(
        "llm_local_tenant_requests_total", {"tenant": "flood", "code": "OK"}
    ) == float(TENANT_LIMIT)
    assert (
        server.metric(
            "llm_local_tenant_requests_total", {"tenant": "flood", "code": "RESOURCE_EXHAUSTED"}
        )
        == 2.0
    )
    assert server.metric("llm_local_tenant_requests_total", {"tenant": "lone", "code": "OK"}) == 1.0


def _post_chat(server: Any, tenant: str) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request = urllib.request.Request(
        server.url("/v1/chat/completions"),
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "x-tenant-id": tenant},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
