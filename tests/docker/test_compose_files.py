"""The compose deployment's wiring, checked on compose's own resolution of the files.

Each test guards a way the deployment breaks on an operator's machine while every file
still parses: a variable .env.example does not define, a converter and a service that
disagree on where the model is, containers of different users sharing one volume,
ports published on one side only. (Fixtures: tests/docker/conftest.py.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.tls.yml")
CONVERTER = "llm-model-converter"
SERVICE = "llm-local-service"
VARIANTS = ("cpu", "gpu", "tls")

# Settings the converter writes the model under and the service looks it up by.
MODEL_KEYS = (
    "ENV",
    "LLM_LOCAL_SERVICE_MODEL_NAME",
    "LLM_LOCAL_SERVICE_MODEL__REVISION",
    "LLM_LOCAL_SERVICE_MODEL__QUANTIZATION",
    "LLM_LOCAL_SERVICE_MODEL__CACHE_DIR",
)
PORT_KEYS = (
    "LLM_LOCAL_SERVICE_HTTP_PORT",
    "LLM_LOCAL_SERVICE_GRPC_PORT",
    "LLM_LOCAL_SERVICE_METRICS_PORT",
)
HOST_KEY = "LLM_LOCAL_SERVICE_SERVER__HOST"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")

ContainerOf = Callable[[str, str], Any]


def test_env_example_documents_exactly_the_variables_the_compose_files_use(
    env_example: dict[str, str],
) -> None:
    used = {
        name
        for compose_file in COMPOSE_FILES
        for name in VARIABLE.findall((DOCKER_DIR / compose_file).read_text())
    }
    assert sorted(used - env_example.keys()) == [], "used by compose, missing from .env.example"
    assert sorted(env_example.keys() - used) == [], "in .env.example, used by no compose file"


@pytest.mark.parametrize("variant", VARIANTS)
def test_converter_writes_the_model_where_the_service_looks_for_it(
    compose_container: ContainerOf, variant: str
) -> None:
    converter = compose_container(variant, CONVERTER)
    service = compose_container(variant, SERVICE)
    for key in MODEL_KEYS:
        assert converter.environment.get(key) == service.environment.get(key), key
    cache_dir = service.environment["LLM_LOCAL_SERVICE_MODEL__CACHE_DIR"]
    assert converter.volumes.get(cache_dir) is not None, "converter: cache dir not on a volume"
    assert converter.volumes.get(cache_dir) == service.volumes.get(cache_dir)
    download_dir = PurePosixPath(converter.environment["LLM_LOCAL_SERVICE_MODEL__DOWNLOAD_DIR"])
    assert download_dir.is_relative_to(cache_dir), "downloads would be lost with the container"


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_starts_only_after_a_successful_conversion_and_never_converts(
    compose_container: ContainerOf, variant: str
) -> None:
    service = compose_container(variant, SERVICE)
    depends_on = service.config["depends_on"]
    assert depends_on[CONVERTER]["condition"] == "service_completed_successfully"
    assert service.environment["LLM_LOCAL_SERVICE_MODEL__CONVERT_ON_START"] == "false"
    assert service.command == ["llm-local", "serve"]
    assert compose_container(variant, CONVERTER).command == ["llm-local", "convert"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_converter_and_service_run_as_the_same_unprivileged_user(
    compose_container: ContainerOf, variant: str
) -> None:
    # The original deployment converted as root and served as 1001: the service could
    # not read what the converter wrote.
    users = {compose_container(variant, name).image.user for name in (CONVERTER, SERVICE)}
    assert users == {"1001:1001"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_publishes_the_ports_it_listens_on(
    compose_container: ContainerOf, variant: str
) -> None:
    service = compose_container(variant, SERVICE)
    listening = {int(service.environment[key]) for key in PORT_KEYS}
    published = set()
    for port in service.config["ports"]:
        if isinstance(port, str):  # docker-compose v1: "0.0.0.0:16060:16060/tcp"
            published.add(int(port.split("/")[0].rsplit(":", 1)[1]))
        else:  # compose v2 long syntax
            published.add(int(port["target"]))
    assert published == listening


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_listens_on_every_interface_of_its_container_by_explicit_setting(
    compose_container: ContainerOf, variant: str
) -> None:
    # Outside a container llm-local listens on 127.0.0.1 unless told otherwise; inside,
    # only 0.0.0.0 lets the published ports reach it. Compose and each service image say
    # so themselves rather than lean on a settings default.
    service = compose_container(variant, SERVICE)
    assert service.config["environment"].get(HOST_KEY) == "0.0.0.0"
    assert service.image.env.get(HOST_KEY) == "0.0.0.0", service.image.dockerfile.name


def test_gpu_variant_runs_the_cuda_image_on_a_reserved_nvidia_gpu(
    compose_container: ContainerOf,
) -> None:
    service = compose_container("gpu", SERVICE)
    assert service.image.dockerfile.name == "Dockerfile.gpu"
    assert service.environment["LLM_LOCAL_SERVICE_DEVICE"] == "cuda"
    devices = service.config["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]
    # Converting needs no GPU: the converter stays the CPU image, writing float16.
    converter = compose_container("gpu", CONVERTER)
    assert converter.image.dockerfile.name == "Dockerfile.converter"
    assert converter.environment["LLM_LOCAL_SERVICE_MODEL__QUANTIZATION"] == "float16"


def test_tls_variant_points_the_service_at_mounted_certificate_files(
    compose_container: ContainerOf,
) -> None:
    service = compose_container("tls", SERVICE)
    mounts = []
    for volume in service.config["volumes"]:
        if isinstance(volume, str):
            _source, target, *options = volume.split(":")
            mounts.append((target, "ro" in options))
        elif volume.get("type") == "bind":
            mounts.append((volume["target"], bool(volume.get("read_only"))))
    for key in ("CERT_PATH", "KEY_PATH", "CA_PATH"):
        path = PurePosixPath(service.environment[f"LLM_LOCAL_SERVICE_TLS__{key}"])
        assert any(path.is_relative_to(target) and read_only for target, read_only in mounts), key


@pytest.mark.parametrize("variant", VARIANTS)
def test_containers_write_only_to_the_volume_and_a_memory_tmp(
    compose_container: ContainerOf, variant: str
) -> None:
    # A read-only root: nothing a process writes outside the model volume outlives the
    # container or escapes the operator's sight. `make image-check` runs both this way.
    for name in (CONVERTER, SERVICE):
        config = compose_container(variant, name).config
        assert config.get("read_only") is True, name
        assert "/tmp" in config.get("tmpfs", []), name


def test_every_service_setting_the_deployment_guide_names_reaches_a_container(
    compose_container: ContainerOf,
) -> None:
    # Compose passes a container only the variables its `environment:` lists: a setting
    # the guide tells operators to put in .env that no container receives does nothing.
    # (The real run found LLM_LOCAL_SERVICE_OPENAI__API_KEYS and
    # LLM_LOCAL_SERVICE_NUMERICS__ACCEPT_UNVERIFIED documented but never passed.)
    guide = (DOCKER_DIR.parent / "docs" / "DEPLOYMENT.md").read_text()
    named = set(re.findall(r"LLM_LOCAL_SERVICE_[A-Z0-9_]*[A-Z0-9]", guide))
    received = {
        key
        for variant in VARIANTS
        for name in (CONVERTER, SERVICE)
        for key in compose_container(variant, name).environment
    }
    # The gateway's name for TLS__CERT_PATH, which the guide mentions as an alias.
    aliases = {"LLM_LOCAL_SERVICE_GRPC_TLS_CERT_PATH"}
    assert sorted(named - received - aliases) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_drains_streams_for_most_of_the_compose_stop_grace_period(
    compose_container: ContainerOf, variant: str
) -> None:
    # The service's own grace period defaulted to 10 s under a 30 s stop_grace_period:
    # `make image-check` saw a stream cut after 10 s that compose would have let finish.
    # It must use most of compose's time, and end before compose kills it.
    service = compose_container(variant, SERVICE)
    grace_s = float(service.environment["LLM_LOCAL_SERVICE_SERVER__GRACE_PERIOD_S"])
    assert service.stop_grace_period_s / 2 <= grace_s <= service.stop_grace_period_s - 3
