"""What a docker compose deployment would run, computed without a Docker engine.

The compose files are resolved by the compose tool itself (`docker-compose config`, which
`make docker-check` installs; `docker compose config` works too) with the values of
docker/.env.example, so interpolation and override merging are compose's own. The
Dockerfiles are read for what the image adds: the final stage's ENV, WORKDIR, USER,
ENTRYPOINT/CMD and the files COPY puts in from the build context.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"

CPU = ("docker-compose.yml",)
GPU = ("docker-compose.yml", "docker-compose.gpu.yml")
TLS = ("docker-compose.yml", "docker-compose.tls.yml")
VARIANTS = {"cpu": CPU, "gpu": GPU, "tls": TLS}


@dataclass(frozen=True)
class Image:
    """The parts of a Dockerfile's final stage that decide what a container runs."""

    dockerfile: Path
    env: dict[str, str]
    user: str | None
    workdir: str | None
    entrypoint: list[str]
    cmd: list[str]
    # image path -> build-context path, for files COPY brings in from the context
    files: dict[str, Path]
    healthcheck: list[str] | None


@dataclass(frozen=True)
class Container:
    """One compose service as the container would start it."""

    service: str
    image: Image
    command: list[str]
    environment: dict[str, str]
    # container path -> named volume
    volumes: dict[str, str]
    healthcheck: list[str] | None
    stop_grace_period_s: float
    config: dict[str, Any] = field(repr=False)


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    pytest.fail("no compose tool: run `make docker-check` (installs docker-compose)")


def resolve_compose(files: tuple[str, ...]) -> dict[str, Any]:
    """`docker-compose -f ... --env-file .env.example config`, parsed."""
    args = [*compose_command()]
    for name in files:
        args += ["-f", name]
    args += ["--env-file", ".env.example", "config"]
    # A clean environment: .env.example's values, not this shell's, decide.
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    result = subprocess.run(
        args, cwd=DOCKER_DIR, env=environ, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stderr}"
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            key, _, value = stripped.partition("=")
            values[key.strip()] = value.strip()
    return values


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined."""
    found = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    return found


def _exec_form(arguments: str) -> list[str]:
    if arguments.startswith("["):
        parsed: list[str] = json.loads(arguments)
        return parsed
    return ["/bin/sh", "-c", arguments]


def read_image(dockerfile: Path, context: Path) -> Image:
    instructions = _instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env: dict[str, str] = {}
    user = workdir = None
    entrypoint: list[str] = []
    cmd: list[str] = []
    files: dict[str, Path] = {}
    healthcheck = None
    for keyword, arguments in instructions[last_from + 1 :]:
        if keyword == "ENV":
            for word in shlex.split(arguments):
                key, _, value = word.partition("=")
                env[key] = value
        elif keyword == "USER":
            user = arguments
        elif keyword == "WORKDIR":
            workdir = arguments
        elif keyword == "ENTRYPOINT":
            entrypoint = _exec_form(arguments)
        elif keyword == "CMD":
            cmd = _exec_form(arguments)
        elif keyword == "HEALTHCHECK":
            healthcheck = _exec_form(arguments.split(" CMD ", 1)[1].strip())
        elif keyword == "COPY" and "--from=" not in arguments:
            *sources, target = shlex.split(arguments)
            for source in sources:
                files[str(PurePosixPath(target))] = context / source
    return Image(dockerfile, env, user, workdir, entrypoint, cmd, files, healthcheck)


def _duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    number = ""
    index = 0
    while index < len(text):
        char = text[index]
        if char.isdigit() or char == ".":
            number += char
            index += 1
            continue
        unit = "ms" if text.startswith("ms", index) else char
        total += float(number) * units[unit]
        number = ""
        index += len(unit)
    return total


def _named_volumes(service: Mapping[str, Any]) -> dict[str, str]:
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):  # docker-compose v1: "name:/path:rw"
            source, target, *_ = volume.split(":")
            if not source.startswith((".", "/")):
                mounts[target] = source
        elif volume.get("type") == "volume":  # compose v2: long syntax
            mounts[volume["target"]] = volume["source"]
    return mounts


def container(config: Mapping[str, Any], service_name: str) -> Container:
    service = config["services"][service_name]
    build = service["build"]
    context = Path(build["context"])
    image = read_image(context / build.get("dockerfile", "Dockerfile"), context)
    entrypoint = service.get("entrypoint", image.entrypoint)
    command = service.get("command", image.cmd if "entrypoint" not in service else [])
    environment = {**image.env, **{k: str(v) for k, v in service["environment"].items()}}
    health = service.get("healthcheck", {}).get("test", image.healthcheck)
    grace = service.get("stop_grace_period", "10s")
    grace_s = grace / 1e9 if isinstance(grace, int) else _duration_s(str(grace))
    return Container(
        service=service_name,
        image=image,
        command=[*entrypoint, *command],
        environment=environment,
        volumes=_named_volumes(service),
        healthcheck=health,
        stop_grace_period_s=grace_s,
        config=dict(service),
    )


@pytest.fixture(scope="session")
def compose_config() -> Callable[[str], dict[str, Any]]:
    """variant name ("cpu", "gpu", "tls") -> the resolved compose configuration."""
    cache: dict[str, dict[str, Any]] = {}

    def resolve(variant: str) -> dict[str, Any]:
        if variant not in cache:
            cache[variant] = resolve_compose(VARIANTS[variant])
        return cache[variant]

    return resolve


@pytest.fixture(scope="session")
def compose_container(
    compose_config: Callable[[str], dict[str, Any]],
) -> Callable[[str, str], Container]:
    """(variant, service name) -> what that service's container would run."""

    def build(variant: str, service_name: str) -> Container:
        return container(compose_config(variant), service_name)

    return build


@pytest.fixture(scope="session")
def env_example() -> dict[str, str]:
    """docker/.env.example as the mapping compose reads from a copied .env."""
    return read_env_file(ENV_EXAMPLE)
