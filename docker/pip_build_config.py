"""The host pip's package index configuration, made fit to pass into an image build.

    python docker/pip_build_config.py OUT_DIR

reads what `pip config list` reports (configuration files and PIP_* variables, for the
pip that runs this) and writes into OUT_DIR:

- pip.conf: the same index settings (index-url, extra-index-url, find-links,
  trusted-host, no-index, timeouts, a proxy from https_proxy), with the CA certificate
  and the constraints file pointing where the build mounts them (/run/secrets/pip-ca,
  /run/secrets/pip-constraints);
- pip-ca: a copy of the CA bundle pip uses (empty when none is configured);
- pip-constraints: a copy of the constraints file (empty when none);

and prints the local directories the settings name (a find-links directory, the
folder that holds a file:// index), one per line: the build mounts them read-only at the same path.

The three files are passed with `--secret id=pip.conf,src=...` (and pip-ca,
pip-constraints): a secret is mounted only while one RUN step runs and is never
written into a layer, so a mirror's credentials or a private CA cannot leak through
the image (docs/DEPLOYMENT.md, "Package index and CA certificate").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

SECRETS = Path("/run/secrets")
# Options copied as they are; cert and constraint are rewritten to the mounted copies.
PASSED = (
    "index-url",
    "extra-index-url",
    "find-links",
    "trusted-host",
    "no-index",
    "timeout",
    "default-timeout",
    "retries",
    "proxy",
)


def host_settings() -> dict[str, str]:
    """pip's effective settings: PIP_* variables override the configuration files."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files: dict[str, str] = {}
    environment: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        value = raw.strip().strip("'\"")
        (environment if section == ":env:" else files)[name] = value
    settings = {**files, **environment}
    proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if proxy and "proxy" not in settings:
        settings["proxy"] = proxy
    return settings


def local_directories(settings: dict[str, str]) -> list[str]:
    """The host directories the index settings read from."""
    found: list[str] = []
    for name in ("index-url", "extra-index-url", "find-links"):
        for item in settings.get(name, "").split():
            parsed = urlparse(item)
            path = parsed.path if parsed.scheme == "file" else item if not parsed.scheme else ""
            if not path or not Path(path).exists():
                continue
            directory = Path(path) if Path(path).is_dir() else Path(path).parent
            if name != "find-links":
                # A local index's pages link their files relatively, next to the index
                # (.../simple/NAME/ -> ../../files/...): mount the folder that holds both.
                directory = directory.parent
            if str(directory) not in found:
                found.append(str(directory))
    return found


def write(out_dir: Path, settings: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[global]"]
    lines += [f"{name} = {settings[name]}" for name in PASSED if settings.get(name)]
    for name, secret in (("cert", "pip-ca"), ("constraint", "pip-constraints")):
        source = settings.get(name)
        target = out_dir / secret
        if source and Path(source).is_file():
            shutil.copyfile(source, target)
            lines.append(f"{name} = {SECRETS / secret}")
        else:
            target.write_text("")
    (out_dir / "pip.conf").write_text("\n".join(lines) + "\n")
    for path in out_dir.iterdir():
        path.chmod(0o600)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    settings = host_settings()
    write(Path(argv[0]), settings)
    for directory in local_directories(settings):
        print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
