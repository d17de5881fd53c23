"""Download a model from the Hugging Face Hub (or find it in the download cache offline).

huggingface_hub reads HF_TOKEN itself and draws its own tqdm progress bars.
"""

from __future__ import annotations

from pathlib import Path

from llm_local.convert.errors import ConversionError, first_line

# Weights in formats the converter does not read, and whole alternative checkpoints.
_IGNORED = [
    "*.gguf",
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
    "*.msgpack",
    "*.h5",
    "*.tflite",
    "*.ot",
    "*.pth",
    "*.pt",
    "original/*",
    "coreml/*",
    "openvino/*",
]


def download(
    repo_id: str,
    revision: str | None,
    download_dir: Path | None,
    *,
    offline: bool,
) -> tuple[Path, str]:
    """The local snapshot directory and the commit it holds."""
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = str(download_dir) if download_dir else "the Hugging Face cache"
    try:
        ignored = list(_IGNORED)
        if not offline:
            files = list_repo_files(repo_id, revision=revision)
            # Most repos carry the same weights twice; the converter needs one copy.
            if any(name.endswith(".safetensors") for name in files):
                ignored.append("*.bin")
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=download_dir,
            local_files_only=offline,
            ignore_patterns=ignored,
        )
    except GatedRepoError as exc:
        raise ConversionError(
            f"model {repo_id!r} is gated: accept its licence on huggingface.co and set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ConversionError(
            f"model {repo_id!r} not found on the Hugging Face Hub (a private repo needs HF_TOKEN)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ConversionError(f"model {repo_id!r} has no revision {revision!r}") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if offline:
            raise ConversionError(
                f"offline mode and model {repo_id!r} is not in {where}; "
                "download it once online or unset model.offline / HF_HUB_OFFLINE"
            ) from exc
        raise ConversionError(
            f"cannot reach the Hugging Face Hub for {repo_id!r} and it is not in {where} "
            f"({first_line(exc.__cause__ or exc)})"
        ) from exc
    except OSError as exc:
        raise ConversionError(f"downloading {repo_id!r} failed: {first_line(exc)}") from exc
    path = Path(snapshot)
    # In the hub's cache layout the snapshot directory is named after the commit.
    return path, path.name
