"""A rolling update, with processes for pods: what Kubernetes does to a replica, done by hand.

Two real `llm-local serve` replicas (the SmolLM2 test model) behind one client that
balances over both, as the gateway does over the headless Service: a grpcio channel
with round_robin over the replicas' addresses (what the Service's DNS name resolves to)
and client-side health checking (grpc.health.v1 Watch). One replica then gets what a pod
gets once its preStop hook ends: SIGTERM, in the middle of streams. The other keeps
serving. Nothing may be lost: every stream, on either replica, ends normally; the
stopping replica's readiness turns 503 at once (Kubernetes takes it out of the
endpoints), and the client's next calls go to the other replica only.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2
from llm_local.transport.grpc.services import LLAMA_SERVICE

from ..e2e.conftest import ServerProcess, start_server_process

pytestmark = [pytest.mark.e2e, pytest.mark.model]

# Long enough for the streams below on a busy 2-core machine; they end well before.
GRACE_PERIOD_S = 60.0
COUNTING = "Write the numbers from 1 to 1000, separated by commas."
STREAM_TOKENS = 96
STREAMS = 4  # round robin: two on each replica
NEXT_CALLS = 4
RPC = "LlamaService"
# What the gateway's channel should say (docs/SCALING.md): balance per call, and skip a
# replica whose health says NOT_SERVING (loading, stopping) without waiting for DNS.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": LLAMA_SERVICE},
}


@dataclass
class Stream:
    """One stream read in a thread: when each message arrived, and how it ended."""

    call: Any
    arrivals: list[float] = field(default_factory=list)
    responses: list[llama_pb2.GenerateStreamResponse] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    thread: threading.Thread | None = None

    def read(self) -> None:
        try:
            for response in self.call:
                self.arrivals.append(time.monotonic())
                self.responses.append(response)
        except grpc.RpcError:
            pass
        self.code = self.call.code()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    log_dir = tmp_path_factory.mktemp("replica-logs")
    env = {
        "LLM_LOCAL_SERVICE_SERVER__GRACE_PERIOD_S": str(GRACE_PERIOD_S),
        # One JSON line per finished request: read back after the replica exited.
        "LLM_LOCAL_SERVICE_LOGGING__FORMAT": "json",
    }
    started: list[ServerProcess] = []
    try:
        for _ in range(2):
            started.append(start_server_process(log_dir, env, wait="none"))
        for server in started:
            server.wait("ready")
        yield started
    finally:
        for server in started:
            server.stop()


def requests_seen(server: ServerProcess) -> dict[str, float]:
    """status code -> generation calls the replica finished, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    _, body = server.http_get("/metrics")
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "llm_local_requests_total" and sample.labels.get("service") == RPC
    }


def statuses_logged(server: ServerProcess) -> list[str]:
    """The status of every generation call the replica finished, from its log."""
    found = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "request finished" and record.get("rpc") == RPC:
                found.append(str(record["status"]))
    return found


def counting(max_new_tokens: int) -> llama_pb2.GenerateStreamRequest:
    return llama_pb2.GenerateStreamRequest(
        user_prompt=COUNTING, params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    )


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigterm_mid_stream_loses_nothing_and_moves_new_calls_to_the_other_replica(
    replicas: list[ServerProcess], rpc: Any
) -> None:
    stopping, staying = replicas
    targets = ",".join(f"127.0.0.1:{server.grpc_port}" for server in replicas)
    channel = grpc.insecure_channel(
        f"ipv4:{targets}", options=[("grpc.service_config", json.dumps(SERVICE_CONFIG))]
    )
    try:
        # The balancer uses a replica once its health Watch says SERVING: warm up until
        # both took a call (each costs one token).
        def both_used() -> bool:
            list(rpc.llama(channel, counting(1)))
            return all(requests_seen(server).get("OK", 0) > 0 for server in replicas)

        wait_for(both_used, 30, "the balancer to use both replicas")
        before = [requests_seen(server) for server in replicas]

        streams = [Stream(rpc.llama(channel, counting(STREAM_TOKENS))) for _ in range(STREAMS)]
        for stream in streams:
            stream.thread = threading.Thread(target=stream.read, daemon=True)
            stream.thread.start()
        wait_for(lambda: all(stream.arrivals for stream in streams), 60, "every first token")
        assert stopping.metric("llm_local_requests_running") == STREAMS / 2
        assert staying.metric("llm_local_requests_running") == STREAMS / 2

        signalled = time.monotonic()
        stopping.process.send_signal(signal.SIGTERM)
        # What counts is the order, not the milliseconds: out of readiness while its
        # streams still run. The bound is one against hanging, on a possibly loaded machine.
        wait_for(lambda: stopping.http_get("/health/ready")[0] == 503, 15, "readiness 503")
        not_ready_after = time.monotonic() - signalled
        # Still draining its streams, yet already out of the endpoints.
        assert stopping.process.poll() is None
        assert stopping.metric("llm_local_requests_running") == STREAMS / 2

        next_calls = [list(rpc.llama(channel, counting(4))) for _ in range(NEXT_CALLS)]

        for stream in streams:
            assert stream.thread is not None
            stream.thread.join(GRACE_PERIOD_S + 30)
        status = stopping.process.wait(timeout=30)
    finally:
        channel.close()

    # The stopping replica: out of readiness at once, drained, exited cleanly.
    assert not_ready_after < GRACE_PERIOD_S / 4
    assert status == 0
    log = stopping.log_text()
    assert "received SIGTERM" in log
    assert "cancelled" not in log  # no stream was cut at the end of the grace period
    # No stream lost, on either replica: each ended OK with its finish message, and each
    # was still streaming when the signal came.
    for stream in streams:
        assert stream.code == grpc.StatusCode.OK
        assert [r.WhichOneof("type") for r in stream.responses][-1] == "finish_details"
        assert stream.responses[-1].finish_details.finish_reason in ("length", "stop")
        assert stream.arrivals[-1] > signalled, "stream had ended before the signal"
    # The next calls all went to the other replica: it finished them, and the stopping
    # replica saw none of them, not even to refuse.
    assert all(responses[-1].HasField("finish_details") for responses in next_calls)
    staying_after = requests_seen(staying)
    assert staying_after.get("OK", 0) - before[1].get("OK", 0) == STREAMS / 2 + NEXT_CALLS
    # The stopping replica's log: its warm-up calls and its two streams, all OK; no
    # refused call, no cut stream.
    assert statuses_logged(stopping) == ["OK"] * int(before[0]["OK"] + STREAMS / 2)
