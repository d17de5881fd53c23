"""Finding and loading a converted CTranslate2 model: blocking code, run on a thread.

`plan_from_settings` turns settings into a `LoadPlan` (where the converted model is, which
device and compute type, how many threads); `load_model` loads the plan's model and
tokenizer. Neither touches the network: the model must already be converted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm_local.backends.base import BackendLoadError, ModelInfo
from llm_local.backends.hf_tokenizer import HFTokenizer, TokenizerLoadError
from llm_local.backends.shared.context import CONTEXT_LIMIT_KEYS, DEFAULT_CONTEXT_LIMIT

if TYPE_CHECKING:
    import ctranslate2

    from llm_local.settings.schema import AppSettings, NumericsSettings, Threads

BACKEND_NAME = "ct2"
MODEL_FILE = "model.bin"
MANIFEST_FILE = "manifest.json"  # written by `llm-local convert` (llm_local.convert.cache)


@dataclass(frozen=True, slots=True)
class LoadPlan:
    model_dir: Path
    model_name: str
    device: str  # "cpu" or "cuda"
    device_index: int
    compute_type: str  # "auto" (see autotune.py) or what to ask CTranslate2 for
    inter_threads: Threads  # batches decoded in parallel (model replicas)
    intra_threads: Threads  # threads inside one batch; 0 = CTranslate2's default
    context_limit: int  # 0 = what the model's config.json says
    numerics: NumericsSettings | None = None  # None: no numerics check (tests, benches)
    # Replicas opened beyond inter_threads, kept for extra lanes (scheduler.py).
    extra_lanes: int = 0


@dataclass(slots=True)
class LoadedModel:
    generator: ctranslate2.Generator
    tokenizer: HFTokenizer
    info: ModelInfo
    lanes: int = 0  # of the generator's replicas, those kept for extra lanes
    # What one token of a cached static prompt takes (prefix_cache.py); 0: unknown.
    kv_bytes_per_token: int = 0


def plan_from_settings(settings: AppSettings) -> LoadPlan:
    """Where and how to load the configured model; BackendLoadError if it cannot be."""
    from llm_local.convert.api import find_converted
    from llm_local.settings.device import resolve_compute_type, resolve_device
    from llm_local.settings.errors import SettingsError

    model_dir = find_converted(settings)
    if model_dir is None:
        # Where it looked: a cache removed or emptied under a running server says so.
        raise BackendLoadError(
            f"model {settings.model.name!r} not converted in {settings.model.cache_dir}; "
            "run `llm-local convert`"
        )
    runtime = settings.runtime
    try:
        device = resolve_device(runtime)
        compute_type = (
            "auto" if runtime.compute_type == "auto" else resolve_compute_type(runtime, device)
        )
    except SettingsError as exc:
        reasons = "; ".join(str(problem) for problem in exc.problems)
        raise BackendLoadError(f"runtime settings cannot be used: {reasons}") from exc
    return LoadPlan(
        model_dir=Path(model_dir),
        model_name=settings.model.name,
        device=device,
        device_index=runtime.device_index,
        compute_type=compute_type,
        inter_threads=runtime.inter_threads,
        intra_threads=runtime.intra_threads,
        context_limit=settings.model.context_limit,
        numerics=settings.numerics,
    )


def load_model(plan: LoadPlan) -> LoadedModel:
    """Load the plan's model and tokenizer (seconds to minutes: call it on a thread),
    choosing and checking the compute type as `plan.numerics` says."""
    if not (plan.model_dir / MODEL_FILE).is_file():
        raise BackendLoadError(f"{plan.model_dir} holds no converted model ({MODEL_FILE})")
    try:
        tokenizer = HFTokenizer.from_directory(plan.model_dir)
    except TokenizerLoadError as exc:
        raise BackendLoadError(f"tokenizer: {exc}") from exc
    from llm_local.backends.ct2.selection import load_checked

    generator, status, layout = load_checked(plan, tokenizer)
    device = "cpu" if plan.device == "cpu" else f"{plan.device}:{plan.device_index}"
    info = ModelInfo(
        backend=BACKEND_NAME,
        model_name=plan.model_name,
        device=device,
        compute_type=str(generator.compute_type),
        context_limit=plan.context_limit or read_context_limit(plan.model_dir),
        numerics=status,
        threads=layout,
    )
    from llm_local.backends.ct2.prefix_cache import activation_bytes, kv_bytes_per_token

    return LoadedModel(
        generator=generator,
        tokenizer=tokenizer,
        info=info,
        lanes=plan.extra_lanes,
        kv_bytes_per_token=kv_bytes_per_token(
            plan.model_dir / MODEL_FILE, activation_bytes(str(generator.compute_type))
        ),
    )


def open_generator(
    plan: LoadPlan, compute_type: str, layout: tuple[int, int]
) -> ctranslate2.Generator:
    import ctranslate2

    inter, intra = layout
    try:
        return ctranslate2.Generator(
            str(plan.model_dir),
            device=plan.device,
            device_index=plan.device_index,
            compute_type=compute_type,
            inter_threads=inter + plan.extra_lanes,
            intra_threads=intra,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        raise BackendLoadError(
            f"CTranslate2 cannot load {plan.model_dir} on {plan.device} as {compute_type}: {exc}"
        ) from exc


def read_context_limit(model_dir: Path) -> int:
    """The model's context length, or DEFAULT_CONTEXT_LIMIT when nothing states it.

    Looked for in the conversion manifest (`model.context_length`, recorded from the
    Hugging Face config by `llm-local convert`), then in config.json: CTranslate2's
    converter writes its own config.json, which usually lacks it.
    """
    manifest = _read_json_object(model_dir / MANIFEST_FILE)
    model_facts = manifest.get("model")
    if isinstance(model_facts, dict):
        length = _positive_int(model_facts.get("context_length"))
        if length is not None:
            return length
    config = _read_json_object(model_dir / "config.json")
    for key in CONTEXT_LIMIT_KEYS:
        length = _positive_int(config.get(key))
        if length is not None:
            return length
    return DEFAULT_CONTEXT_LIMIT


def _read_json_object(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
