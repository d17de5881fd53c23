"""The Kubernetes deployment's wiring, checked on kustomize's own rendering.

Each test guards a way the deployment breaks in a cluster while every manifest still
validates: a converter and a service that disagree on the model, probes on routes that
do not exist, a pod killed before its streams drained, ports that are not the contract's,
a secret in a ConfigMap. (Fixtures: tests/deploy/conftest.py.)
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_local.app import build_service
from llm_local.settings.redact import is_secret, redact
from llm_local.transport.grpc.server import CLOSE_TIMEOUT_S
from llm_local.transport.grpc.services import LLAMA_SERVICE
from llm_local.transport.http.app import create_app

from .conftest import K8S_DIR, OVERLAYS, VARIANTS, Manifests, PodContainer, pod_container, under

CONVERTER = "llm-model-converter"
SERVICE = "llm-local"
# CONTRACT.md: the original's ports.
CONTRACT_PORTS = {"http": 16060, "grpc": 16061, "metrics": 16062}
MODEL_KEYS = ("name", "revision", "quantization", "cache_dir")

Render = Callable[[str], Manifests]
ImageOf = Callable[[str], Any]
Settings = Callable[[Manifests, PodContainer], dict[str, Any]]


def containers(manifests: Manifests, image_of: ImageOf) -> tuple[PodContainer, PodContainer]:
    return (
        pod_container(manifests, CONVERTER, image_of),
        pod_container(manifests, SERVICE, image_of),
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_converter_writes_the_model_where_the_service_looks_for_it(
    manifests: Render, image_of: ImageOf, effective_settings: Settings, overlay: str
) -> None:
    rendered = manifests(overlay)
    converter, service = containers(rendered, image_of)
    converter_model = effective_settings(rendered, converter)["model"]
    service_model = effective_settings(rendered, service)["model"]
    for key in MODEL_KEYS:
        assert converter_model[key] == service_model[key], key
    # "auto" resolves by device: int8 in the CPU converter, float16 in a GPU service.
    assert service_model["quantization"] != "auto"
    cache_dir = service_model["cache_dir"]
    assert converter.mounts[cache_dir][:2] == service.mounts[cache_dir][:2]
    assert converter.mounts[cache_dir][0] == "persistentVolumeClaim"
    assert under(converter_model["download_dir"], cache_dir), "downloads lost with the pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_serves_on_every_interface_from_the_prepared_cache_only(
    manifests: Render, image_of: ImageOf, effective_settings: Settings, overlay: str
) -> None:
    rendered = manifests(overlay)
    converter, service = containers(rendered, image_of)
    settings = effective_settings(rendered, service)
    assert settings["env"] == "production"
    assert settings["server"]["host"] == "0.0.0.0"
    assert settings["model"]["convert_on_start"] is False
    assert settings["model"]["offline"] is True
    assert service.mounts[settings["model"]["cache_dir"]][2], "service mounts the cache rw"
    # ... but keeps auto's numerics verdicts on a writable part of the same volume.
    verdicts = settings["numerics"]["verdict_dir"]
    assert verdicts is not None
    kind, source, read_only = service.mounts[verdicts]
    assert (kind, read_only) == ("persistentVolumeClaim", False)
    assert source == service.mounts[settings["model"]["cache_dir"]][1]
    assert converter.command == ["llm-local", "convert"]
    assert service.command == ["llm-local", "serve"]


def test_gpu_overlay_gives_each_replica_one_gpu_and_float16(
    manifests: Render, image_of: ImageOf, effective_settings: Settings
) -> None:
    rendered = manifests("gpu")
    converter, service = containers(rendered, image_of)
    settings = effective_settings(rendered, service)
    assert service.spec["image"] == "llm-local:gpu"
    assert (settings["runtime"]["device"], settings["runtime"]["compute_type"]) == (
        "cuda",
        "float16",
    )
    assert settings["model"]["quantization"] == "float16"
    resources = service.spec["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    # Converting needs no GPU: the converter stays the CPU image and asks for none.
    assert converter.spec["image"] == "llm-local:converter"
    assert "nvidia.com/gpu" not in converter.spec.get("resources", {}).get("limits", {})
    # No surge: a rollout must not wait for a spare GPU.
    assert rendered.one("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_are_the_contract_ports_and_the_ones_the_service_listens_on(
    manifests: Render, image_of: ImageOf, effective_settings: Settings, variant: str
) -> None:
    rendered = manifests(variant)
    service = pod_container(rendered, SERVICE, image_of)
    declared = {port["name"]: port["containerPort"] for port in service.spec["ports"]}
    assert declared == CONTRACT_PORTS
    server = effective_settings(rendered, service)["server"]
    assert {name: server[f"{name}_port"] for name in CONTRACT_PORTS} == CONTRACT_PORTS
    # Gateways reconnect (and resolve the headless Service again) within minutes, so
    # pods added by a scale-out get calls; a stream running then may finish.
    assert 0 < server["grpc_max_connection_age_s"] <= 600
    assert server["grpc_max_connection_age_grace_s"] >= server["grace_period_s"]

    grpc = rendered.one("Service", "llm-local-grpc")["spec"]
    assert grpc["clusterIP"] == "None", "gRPC needs a headless Service for client-side balancing"
    assert [(p["port"], p["targetPort"]) for p in grpc["ports"]] == [(16061, "grpc")]
    http = rendered.one("Service", "llm-local-http")["spec"]
    assert http.get("clusterIP") != "None"
    assert {(p["port"], p["targetPort"]) for p in http["ports"]} == {
        (16060, "http"),
        (16062, "metrics"),
    }


async def _status_of(path: str, fake_settings: Callable[..., Any]) -> int:
    app = create_app(build_service(fake_settings()))
    response = await app.test_client().get(path)
    return int(response.status_code)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_probes_ask_the_routes_that_answer_them(
    manifests: Render, fake_settings: Callable[..., Any], variant: str
) -> None:
    rendered = manifests(variant)
    container = rendered.container(SERVICE)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probes = {kind: container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    expected = {"startup": "/health", "readiness": "/health/ready", "liveness": "/health/live"}
    for kind, probe in probes.items():
        if "grpc" in probe:  # components/grpc-probes
            assert kind == "readiness"
            assert probe["grpc"]["port"] == ports["grpc"]
            assert probe["grpc"]["service"] == LLAMA_SERVICE
            continue
        assert probe["httpGet"]["path"] == expected[kind], kind
        assert probe["httpGet"]["port"] in ports, kind
        # A loading server answers 503 here, never 404: the route exists.
        assert await _status_of(probe["httpGet"]["path"], fake_settings) in (200, 503), kind
    # Generous start: the first load of a large model takes minutes.
    startup = probes["startup"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # A full or stopping replica leaves the endpoints at its first 503.
    assert probes["readiness"]["failureThreshold"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_outlives_prestop_and_grace_period_so_no_stream_is_cut(
    manifests: Render, image_of: ImageOf, effective_settings: Settings, overlay: str
) -> None:
    rendered = manifests(overlay)
    service = pod_container(rendered, SERVICE, image_of)
    grace_period_s = effective_settings(rendered, service)["server"]["grace_period_s"]
    pre_stop = service.spec["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    # Long enough for kube-proxy and the gateway's resolver to drop the endpoint.
    assert pre_stop_s >= 5
    # Kubernetes counts the preStop hook inside terminationGracePeriodSeconds.
    termination_s = rendered.pod["terminationGracePeriodSeconds"]
    assert termination_s > pre_stop_s + grace_period_s + CLOSE_TIMEOUT_S
    strategy = rendered.one("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_is_in_a_configmap(manifests: Render, variant: str) -> None:
    for config_map in manifests(variant).all("ConfigMap"):
        for name, content in config_map.get("data", {}).items():
            assert not is_secret(name, content), name
            if name.endswith(".toml"):
                tree = tomllib.loads(content)
                assert redact(tree) == tree, f"{name} holds a secret value"


@pytest.mark.parametrize("variant", VARIANTS)
def test_secrets_come_from_secrets(manifests: Render, variant: str) -> None:
    rendered = manifests(variant)
    for container in rendered.pod.get("initContainers", []) + rendered.pod["containers"]:
        for variable in container.get("env", []):
            if is_secret(variable["name"], variable.get("value")):
                assert "secretKeyRef" in variable.get("valueFrom", {}), variable["name"]
    assert not rendered.all("Secret"), "Secret values do not belong in the repository"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_images_unprivileged_user_on_a_read_only_root(
    manifests: Render, image_of: ImageOf, overlay: str
) -> None:
    rendered = manifests(overlay)
    pod = rendered.pod
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    for container in containers(rendered, image_of):
        assert container.image.user == f"{context['runAsUser']}:{context['runAsGroup']}"
        security = container.spec["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "/tmp" in container.mounts, "no writable /tmp on a read-only root"
    # Service links would put LLM_LOCAL_SERVICE_*-like variables in the environment.
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_everything_selects_the_deployments_pods(manifests: Render, variant: str) -> None:
    rendered = manifests(variant)
    pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= pod_labels.items()

    for service in rendered.all("Service"):
        assert selects(service["spec"]["selector"]), service["metadata"]["name"]
    assert selects(rendered.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    policy = rendered.one("NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"])
    port_names = {p["name"] for p in rendered.container(SERVICE)["ports"]}
    for rule in policy["ingress"]:
        assert {port["port"] for port in rule["ports"]} <= port_names
        assert all("namespaceSelector" in peer for peer in rule["from"])


def test_servicemonitor_scrapes_the_metrics_port_of_the_http_service(manifests: Render) -> None:
    # No schema for the Prometheus operator's CRD offline: check what it points at.
    rendered = manifests("cpu+components")
    monitor = rendered.one("ServiceMonitor")["spec"]
    selected = [
        s
        for s in rendered.all("Service")
        if monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    assert "metrics" in ports
    assert {e["path"] for e in monitor["endpoints"]} == {"/metrics"}


def test_autoscaler_reads_the_adapters_metric_built_from_series_we_export(
    manifests: Render, fake_settings: Callable[..., Any]
) -> None:
    rendered = manifests("cpu+components")
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == rendered.one("Deployment")["metadata"]["name"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    rules_file = K8S_DIR / "components" / "autoscaling" / "prometheus-adapter-rules.yaml"
    (rule,) = yaml.safe_load(Path(rules_file).read_text())
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    exported = build_service(fake_settings()).metrics.render()[0].decode()
    for series in ("llm_local_requests_running", "llm_local_requests_queued"):
        assert series in rule["metricsQuery"]
        assert f"\n{series} " in exported, f"{series} is not exported"
    assert hpa["minReplicas"] >= 2, "one replica cannot roll without downtime"


def test_tls_component_points_the_service_at_the_mounted_secret(
    manifests: Render, image_of: ImageOf
) -> None:
    rendered = manifests("cpu+components")
    service = pod_container(rendered, SERVICE, image_of)
    for key in ("CERT_PATH", "KEY_PATH", "CA_PATH"):
        path = service.environment[f"LLM_LOCAL_SERVICE_TLS__{key}"]
        (mount,) = [m for m in service.mounts if under(path, m)]
        kind, _name, read_only = service.mounts[mount]
        assert (kind, read_only) == ("secret", True), key
