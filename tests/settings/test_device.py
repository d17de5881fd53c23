"""Device, compute type and quantization resolution against this machine's CTranslate2."""

from __future__ import annotations

import ctranslate2
import pytest

from llm_local.settings import device as device_module
from llm_local.settings.device import (
    resolve_compute_type,
    resolve_device,
    resolve_quantization,
    target_device,
)
from llm_local.settings.errors import SettingsError
from llm_local.settings.loader import load_settings
from llm_local.settings.schema import AppSettings

HAS_GPU = ctranslate2.get_cuda_device_count() > 0


def settings_with(**overrides: object) -> AppSettings:
    return load_settings(overrides=overrides)


def test_auto_device_follows_the_hardware() -> None:
    expected = "cuda" if HAS_GPU else "cpu"
    assert resolve_device(settings_with().runtime) == expected


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a CUDA device")
def test_cuda_requested_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(SettingsError) as caught:
        resolve_device(settings_with(**{"runtime.device": "cuda"}).runtime)
    assert caught.value.keys == ["runtime.device"]
    assert "no CUDA device" in str(caught.value)


def test_auto_device_picks_cuda_when_ctranslate2_sees_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 1)
    runtime = settings_with().runtime
    assert resolve_device(runtime) == "cuda"
    assert resolve_compute_type(runtime, "cuda") == "float16"


def test_device_index_beyond_the_gpus_found_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 1)
    runtime = settings_with(**{"runtime.device": "cuda", "runtime.device_index": 3}).runtime
    with pytest.raises(SettingsError) as caught:
        resolve_device(runtime)
    assert caught.value.keys == ["runtime.device_index"]


def test_auto_compute_type_is_int8_on_cpu() -> None:
    assert resolve_compute_type(settings_with().runtime, "cpu") == "int8"


def test_supported_explicit_compute_type_is_kept() -> None:
    runtime = settings_with(**{"runtime.compute_type": "float32"}).runtime
    assert resolve_compute_type(runtime, "cpu") == "float32"


def test_compute_type_the_device_cannot_run_names_key_value_and_choices() -> None:
    runtime = settings_with(**{"runtime.compute_type": "float16"}).runtime
    supported = ctranslate2.get_supported_compute_types("cpu")
    if "float16" in supported:
        pytest.skip("this CPU runs float16")
    with pytest.raises(SettingsError) as caught:
        resolve_compute_type(runtime, "cpu")
    message = str(caught.value)
    assert caught.value.keys == ["runtime.compute_type"]
    assert "'float16'" in message
    assert all(name in message for name in supported)


def test_quantization_auto_follows_compute_type_then_device() -> None:
    plain = settings_with()
    assert resolve_quantization(plain.model, plain.runtime, "cpu") == "int8"
    assert resolve_quantization(plain.model, plain.runtime, "cuda") == "float16"
    explicit_compute = settings_with(**{"runtime.compute_type": "int8_float16"})
    assert resolve_quantization(explicit_compute.model, explicit_compute.runtime, "cuda") == (
        "int8_float16"
    )
    pinned = settings_with(**{"model.quantization": "bfloat16", "runtime.compute_type": "int8"})
    assert resolve_quantization(pinned.model, pinned.runtime, "cpu") == "bfloat16"


def test_target_device_does_not_require_the_gpu_to_be_present() -> None:
    # Preparing a model for a GPU server on a machine without one is allowed.
    assert target_device(settings_with(**{"runtime.device": "cuda"}).runtime) == "cuda"
