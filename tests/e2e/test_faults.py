"""Faults provoked for real on real `llm-local serve` processes: a port already taken, a
certificate the process may not read, the model directory missing and then corrupt
while the server loads, SIGTERM while the model loads, SIGTERM twice.

(A batch failing midway and a decoding thread dying cannot be provoked from outside a
process: tests/backends/ct2/test_batching.py and test_scheduler.py show them on the real
model with only the failing step stood in for.)
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

from .conftest import until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

WAIT_S = 60.0  # generous: the machine is shared
ENDLESS = "Write the numbers from 1 to 1000, separated by commas."
MODEL_FILE = "model.bin"


def health(server: Any) -> tuple[int, dict[str, Any]]:
    try:
        code, body = server.http_json("/health")
    except OSError:
        return 0, {}
    return int(code), body


def can_bind(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def count(rpc: Any, server: Any, max_new_tokens: int) -> Any:
    request = llama_pb2.GenerateStreamRequest(
        user_prompt=ENDLESS, params=llama_pb2.GenerationParams(max_new_tokens=max_new_tokens)
    )
    return rpc.llama(server.channel(), request, timeout=120)


# -- start-up errors ---------------------------------------------------------------------


def test_a_taken_grpc_port_stops_start_up_naming_it_with_nothing_left_listening(
    serve: Callable[..., Any],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve(env={"LLM_LOCAL_SERVICE_SERVER__GRPC_PORT": str(port)}, wait="none")
        status = server.process.wait(WAIT_S)

    log = server.log_text()
    assert status == 1
    assert f"gRPC on 127.0.0.1:{port} (LLM_LOCAL_SERVICE_GRPC_PORT) could not start" in log
    assert "address already in use" in log.lower()
    assert "Traceback" not in log
    assert "loading model" not in log  # the model is loaded only once every port listens
    # The HTTP listener, started before gRPC's failed, is gone with the process.
    assert can_bind(server.http_port) and can_bind(server.metrics_port)


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def without_file_read_override() -> None:
    """In a child: give up root's power to read files whatever their mode (a container's
    non-root user has none). Where it cannot be given up, the caller skips."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)


def test_an_unreadable_certificate_stops_start_up_naming_the_setting(
    serve: Callable[..., Any], certificates: Any, tmp_path: Path
) -> None:
    cert = tmp_path / "server.pem"
    shutil.copy(certificates.server_cert, cert)
    cert.chmod(0)
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(cert)!r}).read()"],
        preexec_fn=without_file_read_override,
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        pytest.skip("this process can read a file of mode 000 whatever it does")

    server = serve(
        env={
            "LLM_LOCAL_SERVICE_TLS__CERT_PATH": str(cert),
            "LLM_LOCAL_SERVICE_TLS__KEY_PATH": str(certificates.server_key),
        },
        wait="none",
        preexec_fn=without_file_read_override,
    )
    status = server.process.wait(WAIT_S)

    log = server.log_text()
    assert status == 2
    assert "tls.cert_path" in log
    assert "Permission denied" in log
    assert "Traceback" not in log
    assert "listening" not in log  # it stopped before any listener started


# -- the model directory -----------------------------------------------------------------


def test_a_missing_then_corrupt_model_fails_naming_its_path_is_retried_then_serves(
    serve: Callable[..., Any],
    link_test_model: Callable[[Path], Path],
    test_model_dir: Path,
    tmp_path: Path,
    rpc: Any,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    # Prepared beside the cache, moved in while the server retries.
    staged = link_test_model(tmp_path / "staging")
    entry = cache / staged.parent.name / staged.name
    (staged / MODEL_FILE).unlink()
    with (test_model_dir / MODEL_FILE).open("rb") as whole:
        (staged / MODEL_FILE).write_bytes(whole.read(1 << 20))  # cut short
    server = serve(
        env={
            "LLM_LOCAL_SERVICE_MODEL__CACHE_DIR": str(cache),
            "LLM_LOCAL_SERVICE_MODEL__CONVERT_ON_START": "false",
            "LLM_LOCAL_SERVICE_MODEL__LOAD_RETRIES": "8",
            "LLM_LOCAL_SERVICE_MODEL__LOAD_RETRY_BACKOFF_S": "0.25",
        },
        wait="listening",
    )

    def failed_with(*words: str) -> bool:
        code, body = health(server)
        reason = str(body.get("reason"))
        return code == 503 and body.get("status") == "failed" and all(w in reason for w in words)

    until(lambda: failed_with(str(cache), "not converted", "retrying"), "failed: not converted")
    staged.parent.rename(entry.parent)
    until(lambda: failed_with(str(entry), "cannot load", "retrying"), "failed: corrupt model")
    repaired = entry / f"{MODEL_FILE}.new"
    repaired.symlink_to(test_model_dir / MODEL_FILE)
    repaired.replace(entry / MODEL_FILE)
    until(lambda: health(server)[0] == 200, "ready once the model is whole")

    responses = list(count(rpc, server, 3))
    assert responses[-1].finish_details.completion_tokens == 3
    time.sleep(1.0)  # steady: no further attempt, no flapping
    assert health(server)[0] == 200
    log = server.log_text()
    assert log.count("model ready") == 1
    assert server.metric("llm_local_model_load_failures_total") >= 2


# -- signals -------------------------------------------------------------------------------


def test_sigterm_while_the_model_loads_exits_0_without_announcing_it_ready(
    serve: Callable[..., Any],
) -> None:
    server = serve(wait="none")
    until(lambda: "loading model" in server.log_text(), "the model starts loading")
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(WAIT_S)

    log = server.log_text()
    assert status == 0
    assert "received SIGTERM" in log
    assert log.rstrip().endswith("stopped")
    assert "model ready" not in log  # a load that ends after the signal is not announced
    assert "Traceback" not in log


def test_a_second_sigterm_cuts_the_grace_period_short(serve: Callable[..., Any], rpc: Any) -> None:
    grace_period_s = 60.0
    server = serve(env={"LLM_LOCAL_SERVICE_SERVER__GRACE_PERIOD_S": str(grace_period_s)})
    stream = count(rpc, server, 1500)
    next(stream)
    server.process.send_signal(signal.SIGTERM)
    until(lambda: "running streams to finish" in server.log_text(), "the drain starts")

    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(WAIT_S)
    stopped_after = time.monotonic() - signalled
    error = rpc.error(lambda: list(stream))

    log = server.log_text()
    assert status == 0
    assert stopped_after < grace_period_s / 2
    assert "received SIGTERM again: stopping now" in log
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in log
    assert "terminate called" not in log
    assert log.rstrip().endswith("stopped")
