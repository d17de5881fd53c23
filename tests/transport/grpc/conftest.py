"""An in-process gRPC server on the fake backend, and a blocking grpcio client for it.

The server runs in the test's trio loop; grpcio calls block, so tests make them on a
worker thread (`await harness.call(fn)`). grpcio is the client on purpose: an
implementation of gRPC independent of the grpclib server under test.

grpcio's own health and reflection modules register the same protobuf names as
grpclib's (which the server imports), and one process cannot hold both: the client
side uses grpclib's message classes with grpcio's generic call API instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import trio

from llm_local.backends.fake import FakeBackend, create_backend
from llm_local.core.admission import Admission
from llm_local.core.state import ServiceState
from llm_local.observability.metrics import Metrics
from llm_local.proto.sentiric.llm.v1 import llama_pb2, local_pb2
from llm_local.service import Service
from llm_local.serving import GenerationFlow
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings
from llm_local.transport.grpc.server import serve_grpc

T = TypeVar("T")

LLAMA_METHOD = "/sentiric.llm.v1.LlamaService/GenerateStream"
LOCAL_METHOD = "/sentiric.llm.v1.LLMLocalService/LocalGenerateStream"
Metadata = Sequence[tuple[str, str]]


def make_settings(fake: dict[str, object] | None = None, **overrides: object) -> AppSettings:
    """Test settings on the fake backend; `overrides` are dotted keys with "__" for ".":
    ``capacity__max_concurrent=1``."""
    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    settings = load_settings(
        env="test",
        overrides={
            "backend": "fake",
            "server.host": "127.0.0.1",
            "server.grpc_port": 0,
            "server.http_port": 0,
            "server.metrics_port": 0,
            "server.grace_period_s": 1.0,
            **dotted,
        },
    )
    return dataclasses.replace(settings, raw={**settings.raw, "fake": dict(fake or {})})


@dataclass
class GrpcHarness:
    service: Service
    flow: GenerationFlow
    port: int
    shutdown: trio.Event
    channel: grpc.Channel

    @property
    def backend(self) -> FakeBackend:
        backend = self.service.backend
        assert isinstance(backend, FakeBackend)
        return backend

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking grpcio call on a worker thread."""
        return await trio.to_thread.run_sync(partial(function, *args, **kwargs))

    def llama(
        self,
        request: llama_pb2.GenerateStreamRequest,
        metadata: Metadata = (),
        timeout: float | None = 10.0,
    ) -> Any:
        """The response iterator (also a grpc.Call: cancel(), code(), ...)."""
        method = self.channel.unary_stream(
            LLAMA_METHOD,
            request_serializer=llama_pb2.GenerateStreamRequest.SerializeToString,
            response_deserializer=llama_pb2.GenerateStreamResponse.FromString,
        )
        return method(request, metadata=metadata, timeout=timeout)

    def local(
        self,
        prompt: str,
        metadata: Metadata = (),
        timeout: float | None = 10.0,
    ) -> Any:
        method = self.channel.unary_stream(
            LOCAL_METHOD,
            request_serializer=local_pb2.LocalGenerateStreamRequest.SerializeToString,
            response_deserializer=local_pb2.LocalGenerateStreamResponse.FromString,
        )
        return method(
            local_pb2.LocalGenerateStreamRequest(prompt=prompt), metadata=metadata, timeout=timeout
        )

    @staticmethod
    def error(call: Callable[[], object]) -> grpc.RpcError:
        """Run `call` (which consumes a stream) and return the RpcError it must raise."""
        try:
            call()
        except grpc.RpcError as error:
            return error
        raise AssertionError("the call succeeded; an error status was expected")

    async def wait_until_idle(self, limit_s: float = 5.0) -> None:
        """Until no generation runs in the backend nor in the flow (fails after `limit_s`)."""
        with trio.fail_after(limit_s):
            # Polled: the backend's counters have no event to wait on.
            while self.backend.stats().running or self.flow.in_flight:  # noqa: ASYNC110
                await trio.sleep(0.01)


StartServer = Callable[..., Awaitable[GrpcHarness]]


@pytest.fixture
async def start_server(nursery: trio.Nursery) -> AsyncIterator[StartServer]:
    """`await start_server(fake={...}, ready=True, capacity__max_concurrent=1, ...)`."""
    channels: list[grpc.Channel] = []

    async def start(
        fake: dict[str, object] | None = None, *, ready: bool = True, **overrides: object
    ) -> GrpcHarness:
        settings = make_settings(fake, **overrides)
        capacity = settings.capacity
        service = Service(
            settings=settings,
            state=ServiceState(),
            backend=create_backend(settings),
            admission=Admission(
                capacity.max_concurrent, capacity.max_queued, capacity.queue_timeout_s
            ),
            metrics=Metrics(),
        )
        service.metrics.bind(service)
        if ready:
            await service.backend.load()
            service.state.mark_ready(service.backend.info)
        flow = GenerationFlow(service)
        shutdown = trio.Event()
        port = await nursery.start(partial(serve_grpc, service, flow, shutdown_event=shutdown))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return GrpcHarness(service, flow, port, shutdown, channel)

    yield start
    for channel in channels:
        channel.close()


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


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return _write_certificates(tmp_path_factory.mktemp("certificates"))
