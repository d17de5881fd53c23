"""Shared fixtures: where the converted SmolLM2 test model lives, settings on the fake
backend, grpcio calls with this project's messages, and TLS certificates.

`make test` converts the model once (ENV=test) into .cache/models; tests find it through
the same settings the server uses. LLM_LOCAL_TEST_MODEL_DIR overrides the lookup.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

if TYPE_CHECKING:
    import grpc

    from llm_local.proto.sentiric.llm.v1 import llama_pb2
    from llm_local.settings.schema import AppSettings

REPO_ROOT = Path(__file__).resolve().parent.parent

# Property tests draw the same examples on every run, with no time limit per example: a
# red run is then a change's doing, not a lucky draw's or a busy machine's. To hunt for
# new counterexamples, run with HYPOTHESIS_PROFILE=explore (fresh draws, many more).
hypothesis_settings.register_profile(
    "deterministic",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
hypothesis_settings.register_profile("explore", max_examples=2000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def test_model_dir() -> Path:
    override = os.environ.get("LLM_LOCAL_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from llm_local.convert.api import find_converted
    from llm_local.settings.loader import load_settings

    found = find_converted(load_settings(env="test"))
    if found is None:
        pytest.fail(
            "the test model is not converted: run `ENV=test llm-local convert` (make test does)"
        )
    return found


LinkTestModel = Callable[[Path], Path]


@pytest.fixture(scope="session")
def link_test_model(test_model_dir: Path) -> LinkTestModel:
    """`link_test_model(cache_dir)`: the test model's files linked into a cache of the
    caller's own, at the same entry path; returns the entry. What a test writes there
    (verdicts, a reference) stays out of the shared cache."""

    def link(cache_dir: Path) -> Path:
        entry = cache_dir / test_model_dir.parent.name / test_model_dir.name
        entry.mkdir(parents=True)
        for path in test_model_dir.iterdir():
            if path.is_file():
                (entry / path.name).symlink_to(path)
        return entry

    return link


FakeSettings = Callable[..., "AppSettings"]


@pytest.fixture(scope="session")
def fake_settings() -> FakeSettings:
    """`fake_settings(fake={...}, capacity__max_concurrent=1)`: ENV=test settings on the
    fake backend, every port 0 (the OS picks a free one), `fake` as the fake backend's own
    section; other overrides are dotted keys spelled with "__" for "."."""
    from llm_local.settings.loader import load_settings

    def make(fake: dict[str, object] | None = None, **overrides: object) -> AppSettings:
        dotted = {key.replace("__", "."): value for key, value in overrides.items()}
        settings = load_settings(
            env="test",
            overrides={
                "backend": "fake",
                "server.host": "127.0.0.1",
                "server.grpc_port": 0,
                "server.http_port": 0,
                "server.metrics_port": 0,
                **dotted,
            },
        )
        return dataclasses.replace(settings, raw={**settings.raw, "fake": dict(fake or {})})

    return make


LLAMA_METHOD = "/sentiric.llm.v1.LlamaService/GenerateStream"
LOCAL_METHOD = "/sentiric.llm.v1.LLMLocalService/LocalGenerateStream"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


class Rpc:
    """Calls through grpcio's generic API with this project's message classes, on any
    channel: to an in-process server (tests/transport/grpc) or a real one (tests/e2e).

    grpcio's own health and reflection modules register the same protobuf names as
    grpclib's (which the server imports), and one process cannot hold both: health uses
    grpclib's message classes here. Imports are deferred so that tests without gRPC do
    not pay for them.
    """

    @staticmethod
    def llama(
        channel: grpc.Channel,
        request: llama_pb2.GenerateStreamRequest,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 60.0,
    ) -> Any:
        """The response iterator; also a grpc.Call (cancel(), code(), details())."""
        from llm_local.proto.sentiric.llm.v1 import llama_pb2

        method = channel.unary_stream(
            LLAMA_METHOD,
            request_serializer=llama_pb2.GenerateStreamRequest.SerializeToString,
            response_deserializer=llama_pb2.GenerateStreamResponse.FromString,
        )
        return method(request, metadata=metadata, timeout=timeout)

    @staticmethod
    def local(
        channel: grpc.Channel,
        prompt: str,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = 60.0,
    ) -> Any:
        from llm_local.proto.sentiric.llm.v1 import local_pb2

        method = channel.unary_stream(
            LOCAL_METHOD,
            request_serializer=local_pb2.LocalGenerateStreamRequest.SerializeToString,
            response_deserializer=local_pb2.LocalGenerateStreamResponse.FromString,
        )
        return method(
            local_pb2.LocalGenerateStreamRequest(prompt=prompt), metadata=metadata, timeout=timeout
        )

    @staticmethod
    def health(channel: grpc.Channel, service: str = "") -> str:
        """The status name Health/Check returns for `service`: SERVING, NOT_SERVING, ..."""
        from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

        method = channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        response = method(HealthCheckRequest(service=service), timeout=5)
        return str(HealthCheckResponse.ServingStatus.Name(response.status))

    @staticmethod
    def error(call: Callable[[], object]) -> grpc.RpcError:
        """Run `call` (which consumes a stream) and return the RpcError it must raise."""
        import grpc

        try:
            call()
        except grpc.RpcError as error:
            return error
        raise AssertionError("the call succeeded; an error status was expected")


@pytest.fixture(scope="session")
def rpc() -> type[Rpc]:
    return Rpc


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
        # Key identifiers as a real CA writes them: Python 3.13's default TLS contexts
        # verify strictly (VERIFY_X509_STRICT) and refuse certificates without them.
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
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
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
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


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """Generated once per session; the in-process and the end-to-end TLS tests share them."""
    return _write_certificates(tmp_path_factory.mktemp("certificates"))
