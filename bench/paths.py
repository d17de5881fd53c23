"""How files are named in docs/BENCHMARKS.md: never by an absolute path of the machine.

A report is read on other machines: a file inside the repository is named relative to
it, a file inside an installed distribution by that distribution (name, version, path
inside it), anything else by its last two components.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# An absolute POSIX path: a slash that does not follow a word character, a dot, a colon
# or another slash (so URLs and API paths inside words stay), then at least two parts.
_ABSOLUTE = re.compile(r"(?<![\w.:/<])/(?:[\w.+@-]+/)+[\w.+@-]+")


def shown_path(path: Path | str) -> str:
    """`path` as the report names it (see the module docstring)."""
    candidate = Path(path)
    if not candidate.is_absolute():
        return candidate.as_posix()
    owner = _distribution_holding(candidate)  # first: the virtualenv may be in the repo
    if owner is not None:
        return owner
    for root in (REPO_ROOT, REPO_ROOT.resolve()):
        if candidate.is_relative_to(root):
            return candidate.relative_to(root).as_posix()
    return "…/" + "/".join(candidate.parts[-2:])


def _distribution_holding(path: Path) -> str | None:
    for part_index, part in enumerate(path.parts):
        if part in ("site-packages", "dist-packages"):
            inside = Path(*path.parts[part_index + 1 :])
            if not inside.parts:
                return None
            package = inside.parts[0]
            for distribution in metadata.distributions():
                top = (distribution.read_text("top_level.txt") or "").split()
                names = {*top, (distribution.metadata["Name"] or "").replace("-", "_")}
                if package in names:
                    name = distribution.metadata["Name"]
                    return f"{inside.as_posix()} (from {name} {distribution.version})"
            return inside.as_posix()
    return None


def without_absolute_paths(text: str) -> str:
    """Every absolute path in `text` that starts in a top-level folder of this machine
    (/tmp, /home, ...), shown as `shown_path` names it; API paths such as
    /v1/chat/completions start nowhere here and stay."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        if (Path("/") / Path(found).parts[1]).exists():
            return shown_path(found)
        return found

    return _ABSOLUTE.sub(replace, text)
