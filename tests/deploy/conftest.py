"""The Kubernetes manifests as the cluster would receive them, computed without a cluster.

`kubectl kustomize` (installed into .venv by `make k8s-check`) renders each overlay, alone
and with every component; the tests read the rendered objects. What a container would
run is computed from those objects plus its image's Dockerfile (ENV, USER, ENTRYPOINT:
tests/docker/conftest.py reads them), and its effective settings come from the project's
own settings loader, run as the container would run it: its environment only, the
ConfigMaps it mounts written to files where it mounts them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from ..docker.conftest import Image, read_image, resolve_compose

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("tls", "grpc-probes", "monitoring", "autoscaling")
# Each overlay alone, and with every component added.
VARIANTS = (*OVERLAYS, *(f"{overlay}+components" for overlay in OVERLAYS))
VENV_BIN = Path(sys.executable).parent


def kubectl() -> str:
    bundled = VENV_BIN / "kubectl"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: run `make k8s-check` (installs it into .venv)")
    return found


def render(variant: str, scratch: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay ("cpu") or an overlay with every component
    ("cpu+components"), as a list of objects."""
    overlay, _, extra = variant.partition("+")
    directory = K8S_DIR / "overlays" / overlay
    if extra:
        # kustomize takes only relative paths to other kustomizations.
        directory = scratch / variant
        directory.mkdir(parents=True, exist_ok=True)
        up = Path(os.path.relpath(K8S_DIR, directory))
        (directory / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [str(up / "overlays" / overlay)],
                    "components": [str(up / "components" / name) for name in COMPONENTS],
                }
            )
        )
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass(frozen=True)
class Manifests:
    """The rendered objects of one variant."""

    objects: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    def container(self, name: str) -> dict[str, Any]:
        pod = self.pod
        found = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name]
        assert len(found) == 1, f"no container {name}"
        return found[0]

    def config_map(self, name: str) -> dict[str, str]:
        """The data of the ConfigMap kustomize generated as `name` (hash suffix added)."""
        found = [
            cm
            for cm in self.all("ConfigMap")
            if cm["metadata"]["name"] == name or cm["metadata"]["name"].startswith(name + "-")
        ]
        assert len(found) == 1, f"ConfigMap {name}: {len(found)} found"
        data: dict[str, str] = found[0].get("data", {})
        return data


@pytest.fixture(scope="session")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Manifests]:
    """variant ("cpu", "gpu", "cpu+components", "gpu+components") -> rendered objects."""
    cache: dict[str, Manifests] = {}
    scratch = tmp_path_factory.mktemp("kustomize")

    def get(variant: str) -> Manifests:
        if variant not in cache:
            cache[variant] = Manifests(render(variant, scratch))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def image_of() -> Callable[[str], Image]:
    """image reference -> what its Dockerfile builds, by the images compose builds."""
    images: dict[str, Image] = {}
    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.gpu.yml")):
        for service in resolve_compose(files)["services"].values():
            build = service["build"]
            context = Path(build["context"])
            images[service["image"]] = read_image(context / build["dockerfile"], context)

    def get(reference: str) -> Image:
        assert reference in images, f"{reference}: no image of that name is built by compose"
        return images[reference]

    return get


@dataclass(frozen=True)
class PodContainer:
    """One container of the rendered pod as it would start."""

    spec: dict[str, Any]
    image: Image
    # The image's ENV, then envFrom ConfigMaps, then env (Secrets left out: optional).
    environment: dict[str, str]
    # mount path -> (volume source kind, source name, read only)
    mounts: dict[str, tuple[str, str, bool]]

    @property
    def command(self) -> list[str]:
        return list(self.spec.get("command", self.image.entrypoint)) + list(
            self.spec.get("args", [] if "command" in self.spec else self.image.cmd)
        )


def _volume_source(volume: Mapping[str, Any]) -> tuple[str, str]:
    for kind, key in (
        ("persistentVolumeClaim", "claimName"),
        ("configMap", "name"),
        ("secret", "secretName"),
    ):
        if kind in volume:
            return kind, str(volume[kind][key])
    return "emptyDir", volume["name"]


def pod_container(
    manifests: Manifests, name: str, image_of: Callable[[str], Image]
) -> PodContainer:
    spec = manifests.container(name)
    image = image_of(spec["image"])
    environment = dict(image.env)
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(manifests.config_map(source["configMapRef"]["name"]))
    for variable in spec.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = str(variable["value"])
    volumes = {v["name"]: _volume_source(v) for v in manifests.pod["volumes"]}
    mounts = {
        m["mountPath"]: (*volumes[m["name"]], bool(m.get("readOnly", False)))
        for m in spec.get("volumeMounts", [])
    }
    return PodContainer(spec, image, environment, mounts)


@pytest.fixture
def effective_settings(
    tmp_path: Path, certificates: Any
) -> Iterator[Callable[[Manifests, PodContainer], dict[str, Any]]]:
    """(manifests, container) -> the settings `llm-local settings` prints inside it.

    Only the container's environment counts (nothing of this process's leaks in); each
    mounted ConfigMap's files are written to a directory standing for its mount path,
    and the environment's paths under that mount are rewritten to it. The TLS Secret,
    which the operator creates, holds the files its documented command puts there.
    """
    secrets = {
        "llm-local-tls": {
            "tls.crt": certificates.server_cert,
            "tls.key": certificates.server_key,
            "ca.crt": certificates.ca,
        }
    }

    def load(manifests: Manifests, container: PodContainer) -> dict[str, Any]:
        environ = {"PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path)}
        mapped: dict[str, str] = {}
        for mount_path, (kind, source, _) in container.mounts.items():
            if kind == "configMap":
                directory = tmp_path / source
                directory.mkdir(exist_ok=True)
                for file_name, content in manifests.config_map(source).items():
                    (directory / file_name).write_text(content)
                mapped[mount_path] = str(directory)
            elif kind == "secret":
                directory = tmp_path / source
                directory.mkdir(exist_ok=True)
                for file_name, origin in secrets[source].items():
                    shutil.copyfile(origin, directory / file_name)
                mapped[mount_path] = str(directory)
        for key, value in container.environment.items():
            for mount_path, directory in mapped.items():
                value = value.replace(mount_path.rstrip("/") + "/", directory + "/")
            environ[key] = value
        environ["PATH"] = f"{VENV_BIN}{os.pathsep}/usr/bin:/bin"
        workdir = tmp_path / "workdir"  # the image's WORKDIR: no settings.toml there
        workdir.mkdir(exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "llm_local", "settings", "--no-device-check"],
            cwd=workdir,
            env=environ,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"settings rejected in {container.spec['name']}:\n" + (
            result.stderr
        )
        loaded: dict[str, Any] = json.loads(result.stdout)
        return loaded

    yield load


def under(path: str, directory: str) -> bool:
    return PurePosixPath(path).is_relative_to(directory)
