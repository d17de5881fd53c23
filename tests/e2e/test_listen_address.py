"""Where a development server listens when nobody says where: this machine only.

One `llm-local serve` with the development settings as a newcomer's `make run` gets them
(no host configured; only the ports and the model's quantization are pinned, so that it
finds the model `make test` converted). It must answer on 127.0.0.1 and refuse every
other address of this machine; its log must say where each listener is.

Connections go only to this machine's own addresses. A listener of the test's own on the
wildcard address shows that each non-loopback address is reachable from here at all, so
a refusal means the server is not there, not that the address is dead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.model]

CONNECT_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def dev_server(serve: Any) -> Any:
    return serve(
        env={
            "ENV": "development",
            "LLM_LOCAL_SERVICE_SERVER__HOST": None,  # the default is what is under test
            "LLM_LOCAL_SERVICE_MODEL__QUANTIZATION": "int8",
            # Addresses are under test, not numerics: development's compute_type auto
            # would measure every candidate at this first start (tests/e2e/test_numerics).
            "LLM_LOCAL_SERVICE_RUNTIME__COMPUTE_TYPE": "float32",
            "LLM_LOCAL_SERVICE_NUMERICS__CHECK_AT_LOAD": "false",
        },
        wait="ready",
    )


def ports(server: Any) -> dict[str, int]:
    return {"HTTP": server.http_port, "gRPC": server.grpc_port, "metrics": server.metrics_port}


def non_loopback_addresses() -> list[tuple[socket.AddressFamily, str]]:
    """This machine's own IPv4 and IPv6 addresses other than loopback (and link-local,
    which needs a scope to connect to)."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(address.address.split("%")[0])
            if not (ip.is_loopback or ip.is_link_local):
                found.append((address.family, str(ip)))
    return found


@contextlib.contextmanager
def wildcard_listener(family: socket.AddressFamily) -> Iterator[int]:
    """A listening socket on every interface of `family`; yields its port."""
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind(("0.0.0.0" if family == socket.AF_INET else "::", 0))
        listener.listen()
        yield listener.getsockname()[1]


def connects(family: socket.AddressFamily, address: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(CONNECT_TIMEOUT_S)
        try:
            client.connect((address, port))
        except ConnectionRefusedError:
            return False
    return True


def test_a_development_server_answers_on_the_loopback_address(dev_server: Any) -> None:
    status, body = dev_server.http_json("/health")
    assert (status, body["status"]) == (200, "healthy")
    listening = {
        connection.laddr
        for connection in psutil.Process(dev_server.pid).net_connections(kind="inet")
        if connection.status == psutil.CONN_LISTEN
    }
    assert sorted(listening) == sorted(("127.0.0.1", port) for port in ports(dev_server).values())


def test_a_development_server_refuses_this_machines_other_addresses(dev_server: Any) -> None:
    reachable = []
    for family, address in non_loopback_addresses():
        with wildcard_listener(family) as control_port:
            try:
                reachable_here = connects(family, address, control_port)
            except OSError:  # e.g. an address that cannot be used for connections
                reachable_here = False
        if reachable_here:
            reachable.append((family, address))
    if not reachable:
        pytest.skip("this machine has no non-loopback address to try")
    for family, address in reachable:
        for listener, port in ports(dev_server).items():
            assert not connects(family, address, port), f"{listener} answers on {address}:{port}"


def test_the_start_up_log_says_where_each_listener_is(dev_server: Any) -> None:
    log = dev_server.log_text()
    assert f"HTTP listening on http://127.0.0.1:{dev_server.http_port}" in log
    assert f"metrics listening on http://127.0.0.1:{dev_server.metrics_port}" in log
    assert f"gRPC listening on 127.0.0.1:{dev_server.grpc_port}" in log
    assert "LLM_LOCAL_SERVICE_SERVER__HOST=0.0.0.0" in log  # how to open it up
