"""mTLS end to end: a real server with certificates generated here, grpcio clients.

The server certificate carries the SAN the gateway verifies (sentiric.cloud) besides
localhost; clients connect to 127.0.0.1 and check the name sentiric.cloud, as the
gateway does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_local.proto.sentiric.llm.v1 import llama_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

QUESTION = "What is the capital of France? Answer in one sentence."
GATEWAY_NAME = "sentiric.cloud"


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate it signed (SAN sentiric.cloud, localhost,
    127.0.0.1), a client certificate it signed, and a client certificate from a CA the
    server does not trust."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _write_certificates(directory: Path) -> Certificates:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def issue(
        subject: str,
        issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
        extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_name, issuer_key = issuer if issuer else (name(subject), key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256()), key

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path = directory / f"{stem}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=None), True)
    ]
    ca_cert, ca_key = issue("llm-local test CA", None, ca_extensions)
    server_cert, server_key = issue(
        "llm-local",
        (ca_cert.subject, ca_key),
        [
            (
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("sentiric.cloud"),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    client_usage: list[tuple[x509.ExtensionType, bool]] = [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    ]
    client_cert, client_key = issue("gateway", (ca_cert.subject, ca_key), client_usage)
    other_ca, other_key = issue("some other CA", None, ca_extensions)
    stranger_cert, stranger_key = issue("stranger", (other_ca.subject, other_key), client_usage)
    write("ca", ca_cert, ca_key)
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=write("server", server_cert, server_key),
        server_key=directory / "server.key",
        client_cert=write("client", client_cert, client_key),
        client_key=directory / "client.key",
        stranger_cert=write("stranger", stranger_cert, stranger_key),
        stranger_key=directory / "stranger.key",
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return _write_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any], certificates: Certificates) -> Any:
    return serve(
        env={
            "LLM_LOCAL_SERVICE_TLS__CERT_PATH": str(certificates.server_cert),
            "LLM_LOCAL_SERVICE_TLS__KEY_PATH": str(certificates.server_key),
            "LLM_LOCAL_SERVICE_TLS__CA_PATH": str(certificates.ca),
        }
    )


def tls_channel(server: Any, certificates: Certificates, client: str | None) -> grpc.Channel:
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
    server: Any, certificates: Certificates, rpc: Any
) -> None:
    assert "Paris" in ask(rpc, tls_channel(server, certificates, "client"))


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no certificate", "untrusted CA"])
def test_a_client_without_a_trusted_certificate_is_rejected(
    server: Any, certificates: Certificates, rpc: Any, client: str | None
) -> None:
    error = rpc.error(lambda: ask(rpc, tls_channel(server, certificates, client)))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_is_rejected(server: Any, rpc: Any) -> None:
    error = rpc.error(lambda: ask(rpc, server.channel()))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_generate_command_speaks_mtls(server: Any, certificates: Certificates) -> None:
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
