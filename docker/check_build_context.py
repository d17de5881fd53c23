"""Checks that every COPY in the Dockerfiles finds its sources in the build context.

A missing source (a file the .dockerignore leaves out, or one not in the repository)
fails only at `docker build` time, on the operator's machine. With no Docker engine here,
this computes the build context the way the Docker client does (docker-py's
.dockerignore matcher, from Debian's python3-docker, which docker-compose depends on)
and looks up each COPY source in it.

Usage: python3 docker/check_build_context.py DOCKERFILE...   (from the repository root)
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from docker.utils.build import exclude_paths


def instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


def copy_sources(instruction: str) -> list[str]:
    """Sources of a COPY/ADD taken from the build context (not from another stage)."""
    keyword, _, rest = instruction.partition(" ")
    if keyword.upper() not in ("COPY", "ADD"):
        return []
    rest = rest.strip()
    words: list[str] = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    if any(flag.startswith("--from=") for flag in flags):
        return []
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


def main(dockerfiles: list[str]) -> int:
    root = Path.cwd()
    ignore = root / ".dockerignore"
    patterns = [
        line.strip()
        for line in (ignore.read_text().splitlines() if ignore.exists() else [])
        if line.strip() and not line.strip().startswith("#")
    ]
    context = set(exclude_paths(str(root), patterns))
    problems = []
    for name in dockerfiles:
        for instruction in instructions(root / name):
            for source in copy_sources(instruction):
                wanted = source.strip("/").removeprefix("./")
                prefix = wanted + "/"
                if wanted not in context and not any(p.startswith(prefix) for p in context):
                    problems.append(
                        f"{name}: `{instruction}`: {source} is not in the build context"
                    )
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
