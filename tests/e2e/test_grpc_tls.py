"""mTLS end to end: a real server with certificates generated here, grpcio clients.

The server certificate carries the SAN the gateway verifies (sentiric.cloud) besides
localhost; clients connect to 127.0.0.1 and check the name sentiric.cloud, as the
gateway does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

QUESTION = "What is the capital of France? Answer in one sentence."
GATEWAY_NAME = "sentiric.cloud"


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any], certificates: Any) -> Any:
    return serve(
        env={
            "LLM_LOCAL_SERVICE_TLS__CERT_PATH": str(certificates.server_cert),
            "LLM_LOCAL_SERVICE_TLS__KEY_PATH": str(certificates.server_key),
            "LLM_LOCAL_SERVICE_TLS__CA_PATH": str(certificates.ca),
        }
    )


def tls_channel(server: Any, certificates: Any, client: str | None) -> grpc.Channel:
    chain = key = None
    if client is not None:
        chain = getattr(certificates, f"{client}_cert").read_bytes()
        key = getattr(certificates, f"{client}_key").read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certificates.ca.read_bytes(), private_key=key, certificate_chain=chain
    )
    return server.channel(credentials, **{"grpc.ssl_target_name_override": GATEWAY_NAME})


def ask(rpc: Any, channel: grpc.Channel) -> str:
    request = llama_pb2.GenerateStreamRequest(
        user_prompt=QUESTION, params=llama_pb2.GenerationParams(max_new_tokens=24)
    )
    responses = list(rpc.llama(channel, request, timeout=30))
    assert responses[-1].WhichOneof("type") == "finish_details"
    return b"".join(response.token for response in responses[:-1]).decode()


def test_a_client_with_a_certificate_from_the_ca_is_served(
    server: Any, certificates: Any, rpc: Any
) -> None:
    assert "Paris" in ask(rpc, tls_channel(server, certificates, "client"))


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no certificate", "untrusted CA"])
def test_a_client_without_a_trusted_certificate_is_rejected(
    server: Any, certificates: Any, rpc: Any, client: str | None
) -> None:
    error = rpc.error(lambda: ask(rpc, tls_channel(server, certificates, client)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_is_rejected(server: Any, rpc: Any) -> None:
    error = rpc.error(lambda: ask(rpc, server.channel()))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_generate_command_speaks_mtls(server: Any, certificates: Any) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "llm_local", "generate", QUESTION,
            "--port", str(server.grpc_port),
            "--max-new-tokens", "24",
            "--tls-ca", str(certificates.ca),
            "--tls-cert", str(certificates.client_cert),
            "--tls-key", str(certificates.client_key),
            "--tls-server-name", GATEWAY_NAME,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "finish_reason=stop" in result.stderr
