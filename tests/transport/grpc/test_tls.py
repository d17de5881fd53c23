"""TLS and mTLS from settings (llm_local/transport/tls.py), through the gRPC server."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2
from llm_local.settings.schema import TLSSettings
from llm_local.transport.tls import TLSConfigError, client_ssl_context, server_ssl_context

StartServer = Callable[..., Awaitable[Any]]  # the start_server fixture (conftest.py)


def answer(port: int, credentials: grpc.ChannelCredentials) -> bytes:
    """Ask over TLS, verifying the server as the gateway does: by the name sentiric.cloud."""
    with grpc.secure_channel(
        f"127.0.0.1:{port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "sentiric.cloud")],
    ) as channel:
        method = channel.unary_stream(
            "/sentiric.llm.v1.LlamaService/GenerateStream",
            request_serializer=llama_pb2.GenerateStreamRequest.SerializeToString,
            response_deserializer=llama_pb2.GenerateStreamResponse.FromString,
        )
        responses = list(method(llama_pb2.GenerateStreamRequest(user_prompt="Hi"), timeout=10))
    return b"".join(response.token for response in responses)


def credentials(certificates: Any, client: str | None) -> grpc.ChannelCredentials:
    chain = key = None
    if client is not None:
        chain = getattr(certificates, f"{client}_cert").read_bytes()
        key = getattr(certificates, f"{client}_key").read_bytes()
    return grpc.ssl_channel_credentials(
        root_certificates=certificates.ca.read_bytes(), private_key=key, certificate_chain=chain
    )


def test_no_certificate_means_plain_h2c() -> None:
    assert server_ssl_context(TLSSettings(cert_path=None, key_path=None, ca_path=None)) is None


def test_certificate_and_key_give_tls_without_client_certificates(certificates: Any) -> None:
    context = server_ssl_context(
        TLSSettings(
            cert_path=certificates.server_cert, key_path=certificates.server_key, ca_path=None
        )
    )

    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE


def test_a_ca_requires_client_certificates(certificates: Any) -> None:
    context = server_ssl_context(
        TLSSettings(
            cert_path=certificates.server_cert,
            key_path=certificates.server_key,
            ca_path=certificates.ca,
        )
    )

    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            TLSSettings(Path("/nonexistent/server.pem"), Path("/nonexistent/k"), None),
            "tls.cert_path",
        ),
        (TLSSettings(Path("SERVER"), None, None), "tls.key_path"),
        (TLSSettings(Path("SERVER"), Path("/nonexistent/k"), None), "tls.key_path"),
        (TLSSettings(Path("SERVER"), Path("KEY"), Path("/nonexistent/ca.pem")), "tls.ca_path"),
        (TLSSettings(Path("KEY"), Path("KEY"), None), "tls.cert_path"),  # not a certificate
    ],
)
def test_unusable_files_are_named(certificates: Any, settings: TLSSettings, named: str) -> None:
    real = {"SERVER": certificates.server_cert, "KEY": certificates.server_key}

    def resolve(path: Path | None) -> Path | None:
        return None if path is None else real.get(str(path), path)

    with pytest.raises(TLSConfigError) as caught:
        server_ssl_context(
            TLSSettings(
                resolve(settings.cert_path), resolve(settings.key_path), resolve(settings.ca_path)
            )
        )

    assert named in str(caught.value)


def test_client_context_wants_cert_and_key_together(certificates: Any) -> None:
    with pytest.raises(TLSConfigError):
        client_ssl_context(certificates.ca, certificates.client_cert, None)


async def test_tls_server_answers_a_client_that_trusts_its_ca(
    start_server: StartServer, certificates: Any
) -> None:
    server = await start_server(
        tls__cert_path=str(certificates.server_cert), tls__key_path=str(certificates.server_key)
    )

    text = await server.call(answer, server.port, credentials(certificates, None))

    assert text == b"Echo: Hi"


async def test_mtls_rejects_clients_without_a_trusted_certificate(
    start_server: StartServer, certificates: Any
) -> None:
    server = await start_server(
        tls__cert_path=str(certificates.server_cert),
        tls__key_path=str(certificates.server_key),
        tls__ca_path=str(certificates.ca),
    )

    for client in (None, "stranger"):
        error = await server.call(
            server.error, lambda c=client: answer(server.port, credentials(certificates, c))
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    text = await server.call(answer, server.port, credentials(certificates, "client"))

    assert text == b"Echo: Hi"
