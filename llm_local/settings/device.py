"""Turn "auto" device, compute type and quantization into what this machine runs.

Asks CTranslate2 (imported here, not at module import: it costs ~0.3 s) what the
hardware offers; a request the hardware cannot honour is a SettingsError naming the key.
"""

from __future__ import annotations

from pathlib import Path

from llm_local.settings.errors import Problem, SettingsError
from llm_local.settings.schema import ModelSettings, RuntimeSettings

AUTO_TYPE_BY_DEVICE = {"cpu": "int8", "cuda": "float16"}


# Where the NVIDIA kernel driver shows itself (on the host, and in a container given a GPU
# by the NVIDIA container runtime). Without it CUDA cannot run.
NVIDIA_DRIVER_DIR = Path("/proc/driver/nvidia")


def cuda_device_count() -> int:
    """GPUs CTranslate2 can use. Without an NVIDIA driver the answer is 0 without
    importing CTranslate2: some of its CPU kernel choices (CT2_USE_MKL) are fixed when
    it is imported, and the ct2 backend may still have to set them (autotune.py)."""
    if not NVIDIA_DRIVER_DIR.exists():
        return 0
    import ctranslate2

    count: int = ctranslate2.get_cuda_device_count()
    return count


def target_device(runtime: RuntimeSettings) -> str:
    """The device the settings aim at: explicit, or CUDA when this machine has a GPU.

    Unlike resolve_device it does not insist the device is present, so a machine
    without a GPU can still prepare (convert) a model for one.
    """
    if runtime.device != "auto":
        return runtime.device
    return "cuda" if cuda_device_count() > 0 else "cpu"


def resolve_device(runtime: RuntimeSettings) -> str:
    """ "cpu" or "cuda"; a CUDA device that is not there is a SettingsError."""
    device = target_device(runtime)
    if device == "cuda":
        count = cuda_device_count()
        if count == 0:
            raise SettingsError(
                [Problem("runtime.device", runtime.device, "no CUDA device found; use auto or cpu")]
            )
        if runtime.device_index >= count:
            raise SettingsError(
                [
                    Problem(
                        "runtime.device_index",
                        runtime.device_index,
                        f"an index below the {count} CUDA device(s) found",
                    )
                ]
            )
    return device


def supported_compute_types(device: str, device_index: int = 0) -> set[str]:
    import ctranslate2

    supported: set[str] = set(ctranslate2.get_supported_compute_types(device, device_index))
    return supported


def resolve_compute_type(runtime: RuntimeSettings, device: str) -> str:
    """What the model computes in: auto = int8 on CPU, float16 on CUDA."""
    if runtime.compute_type == "auto":
        return AUTO_TYPE_BY_DEVICE[device]
    supported = supported_compute_types(device, runtime.device_index)
    if runtime.compute_type not in supported:
        raise SettingsError(
            [
                Problem(
                    "runtime.compute_type",
                    runtime.compute_type,
                    f"one of the types {device} supports here: {', '.join(sorted(supported))}",
                )
            ]
        )
    return runtime.compute_type


def resolve_quantization(model: ModelSettings, runtime: RuntimeSettings, device: str) -> str:
    """The weight type to convert to: explicit, else the explicit compute type, else by device.

    Not checked against the hardware: a model may be converted on one machine and
    served on another (CTranslate2 converts weights again at load when needed).
    """
    if model.quantization != "auto":
        return model.quantization
    if runtime.compute_type != "auto":
        return runtime.compute_type
    return AUTO_TYPE_BY_DEVICE[device]
