"""A Hugging Face hub cache laid out as huggingface_hub leaves one after a download, for
tests of hub sources with no network (`model.offline`)."""

from __future__ import annotations

from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """`root` holding `repo_id` at one commit (`refs/main` naming it), its files linked
    to local ones; returns `root` (a `model.download_dir`)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, target in files.items():
        (snapshot / name).symlink_to(target)
    return root
