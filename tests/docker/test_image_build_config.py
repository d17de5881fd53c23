"""The image builds' package index configuration (docker/pip_build_config.py, the
Dockerfiles' pip steps): static checks `make test` runs; `make image-check` builds."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from tests.docker.conftest import _instructions

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"
SECRET_MOUNTS = (
    "--mount=type=secret,id=pip.conf",
    "--mount=type=secret,id=pip-ca",
    "--mount=type=secret,id=pip-constraints",
)


def _load_helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pip_build_config", DOCKER_DIR / "pip_build_config.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.converter", "Dockerfile.gpu"])
def test_every_pip_install_reads_the_index_configuration_from_build_secrets(
    dockerfile: str,
) -> None:
    # Without the secrets the build ignores the operator's mirror and CA (and fails where
    # the public index is unreachable); with an ARG or a COPY they would stay in a layer.
    steps = [
        arguments
        for keyword, arguments in _instructions(DOCKER_DIR / dockerfile)
        if keyword == "RUN" and "pip install" in arguments
    ]
    assert steps, f"{dockerfile}: no pip install step"
    for step in steps:
        for mount in SECRET_MOUNTS:
            assert mount in step, (dockerfile, mount, step)
        assert "PIP_CONFIG_FILE=/run/secrets/pip.conf" in step, step
    text = (DOCKER_DIR / dockerfile).read_text()
    assert "pip.conf" not in text.replace("/run/secrets/pip.conf", "").replace("id=pip.conf", "")


def test_build_configuration_points_pip_at_the_mounted_secrets(tmp_path: Path) -> None:
    helper = _load_helper()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (tmp_path / "pypi" / "simple").mkdir(parents=True)
    settings = {
        "index-url": "https://mirror.example/simple",
        "extra-index-url": f"file://{tmp_path}/pypi/simple https://other.example/simple",
        "cert": str(ca),
        "constraint": str(tmp_path / "missing.txt"),
        "find-links": str(wheels),
    }
    out = tmp_path / "out"
    helper.write(out, settings)
    conf = (out / "pip.conf").read_text().splitlines()
    assert conf[0] == "[global]"
    assert "index-url = https://mirror.example/simple" in conf
    assert "cert = /run/secrets/pip-ca" in conf
    assert not any(line.startswith("constraint") for line in conf)  # no such file
    assert (out / "pip-ca").read_text() == ca.read_text()
    assert (out / "pip-constraints").read_text() == ""
    # A local index's files lie beside it: its parent folder is mounted.
    assert helper.local_directories(settings) == [str(tmp_path / "pypi"), str(wheels)]


def test_image_check_script_parses_and_is_not_part_of_make_test() -> None:
    script = DOCKER_DIR / "image_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    makefile = (DOCKER_DIR.parent / "Makefile").read_text()
    test_target = re.search(r"^test:.*?(?=^\S)", makefile, re.M | re.S)
    assert test_target is not None and "image-check" not in test_target.group(0)
    assert re.search(r"^image-check:", makefile, re.M)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.converter", "Dockerfile.gpu"])
def test_every_extra_an_image_asks_for_is_one_the_project_provides_by_its_pep_685_name(
    dockerfile: str,
) -> None:
    # Debian bookworm's pip (23.0) compares extras by their literal name: ".[llama_cpp]"
    # against the metadata's normalized "llama-cpp" installed nothing, with only a warning,
    # and the image served without the llama_cpp backend's library.
    provided = tomllib.loads((DOCKER_DIR.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert all(name == _normalized(name) for name in provided), sorted(provided)
    text = (DOCKER_DIR / dockerfile).read_text()
    for extras in re.findall(r"\.\[([^\]]+)\]", text):
        for extra in extras.split(","):
            assert extra.strip() in provided, (dockerfile, extra, sorted(provided))
