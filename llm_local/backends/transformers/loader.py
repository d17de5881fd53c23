"""Settings to a loaded transformers model: blocking code, run on a thread.

The model is read from its source as configured (hub id, local directory, `.gguf` file,
package file) without any conversion, through the same code that records the numerics
reference at conversion (convert/unquantized.py), then moved to the configured device in
the configured dtype. A `.gguf` source is dequantized at the first start and, with
`keep_dequantized`, read back from the model cache at the next ones (convert/dequantized.py).
The tokenizer is the same `HFTokenizer` the ct2 backend serves with, read from the
tokenizer files the converter would have copied.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_local.backends.base import BackendLoadError, ModelInfo
from llm_local.backends.hf_tokenizer import HFTokenizer, TokenizerLoadError
from llm_local.backends.shared import grammar
from llm_local.backends.shared.context import CONTEXT_LIMIT_KEYS, DEFAULT_CONTEXT_LIMIT
from llm_local.backends.shared.cpu import NATIVE_BF16_CPU_FLAGS, cpu_flags
from llm_local.backends.shared.source import resolve_model_source
from llm_local.backends.transformers.adapters import (
    TokenAdapters,
    attach_adapters,
    peft_adapter_dirs,
)
from llm_local.core.types import SamplingSupport

if TYPE_CHECKING:
    from llm_local.convert.sources import ModelSource
    from llm_local.settings.schema import AppSettings, ModelSettings, TransformersSettings

BACKEND_NAME = "transformers"
# What transformers' continuous batching cannot do per request: its repetition penalty
# is not a continuous-batching logits processor (dropped with a warning), and sampling
# draws from one torch generator seeded once for the whole batch.
TRANSFORMERS_SAMPLING = SamplingSupport(repetition_penalty=False, seed=False)

log = logging.getLogger("llm_local.backends.transformers")


@dataclass(frozen=True, slots=True)
class LoadPlan:
    source: ModelSource
    model: ModelSettings
    device: str  # "cpu" or "cuda"
    device_index: int
    dtype: str  # float32 | bfloat16 | float16 (auto resolved)
    options: TransformersSettings
    adapters: tuple[tuple[str, Path], ...] = ()  # adapter id -> its PEFT directory


@dataclass(slots=True)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode, on its device
    tokenizer: HFTokenizer
    info: ModelInfo
    # Structured output's engine over the tokenizer; None: llguidance is not installed, or
    # the manager's batching cannot mask a step (the backend drops it then).
    grammar: grammar.GrammarCompiler | None = None
    adapters: TokenAdapters | None = None  # the LoRA adapters injected, None without any


def plan_from_settings(settings: AppSettings) -> LoadPlan:
    """Where the model comes from and how it runs; BackendLoadError if it cannot."""
    source = resolve_model_source(settings.model)
    runtime = settings.runtime
    device = resolve_torch_device(runtime.device, runtime.device_index)
    options = settings.transformers
    dtype = auto_dtype(device, cpu_flags()) if options.dtype == "auto" else options.dtype
    adapters = peft_adapter_dirs(settings)
    return LoadPlan(source, settings.model, device, runtime.device_index, dtype, options, adapters)


def auto_dtype(device: str, flags: frozenset[str]) -> str:
    """`dtype = "auto"`: bfloat16 where the device computes it natively (a GPU; a CPU with
    the flags above), float32 elsewhere. vLLM's CPU backend defaults to bfloat16 too. On the
    2-core AMD EPYC (Zen4, AVX512-BF16) a call's turn (19-35 new prompt tokens) took 67-119
    ms in bfloat16 against 128-201 ms in float32: the weights are half the bytes, and
    decoding one token reads all of them (docs/FINDINGS.md)."""
    if device != "cpu" or flags & NATIVE_BF16_CPU_FLAGS:
        return "bfloat16"
    return "float32"


def cpu_threads(options: TransformersSettings) -> int:
    """PyTorch's intra-op threads on a CPU: as set, or the CPUs this process may use."""
    from llm_local.backends.shared.threads import usable_cpus

    return usable_cpus() if options.threads == "auto" else int(options.threads)


class TorchMissing(BackendLoadError):
    retryable = False  # installing a package is not something a retry does


def resolve_torch_device(device: str, device_index: int) -> str:
    """ "cpu" or "cuda" as PyTorch sees this machine (auto: CUDA when torch has a GPU)."""
    try:
        import torch
    except ImportError as exc:
        raise TorchMissing(
            "the transformers backend needs PyTorch, gguf and accelerate: "
            "pip install 'llm-local[convert]' (make run installs them)"
        ) from exc

    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cuda":
        if not has_cuda:
            raise BackendLoadError(
                "runtime.device = cuda but PyTorch sees no CUDA device (a CPU-only torch build?)"
            )
        if device_index >= torch.cuda.device_count():
            raise BackendLoadError(
                f"runtime.device_index = {device_index} but PyTorch sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def load_model(plan: LoadPlan) -> LoadedModel:
    """Load the plan's model and tokenizer (seconds to minutes: call it on a thread)."""
    import torch

    from llm_local.convert.api import quiet_libraries
    from llm_local.convert.errors import ConversionError
    from llm_local.convert.unquantized import load_unquantized

    if plan.device == "cpu":
        torch.set_num_threads(cpu_threads(plan.options))
    work_dir = Path(tempfile.mkdtemp(prefix="llm-local-transformers-"))
    try:
        with quiet_libraries(progress=False):
            model, hf_dir = load_unquantized(
                plan.source,
                plan.model,
                work_dir,
                lambda message: log.info("%s", message),
                dtype=getattr(torch, plan.dtype),
                attn_implementation=plan.options.attn_implementation,
                keep_dequantized=plan.options.keep_dequantized,
            )
            tokenizer = _read_tokenizer(hf_dir, work_dir / "tokenizer")
    except ConversionError as exc:
        raise BackendLoadError(str(exc)) from exc
    except (OSError, ValueError, ImportError) as exc:
        raise BackendLoadError(
            f"transformers cannot load {plan.source.spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    device = "cpu" if plan.device == "cpu" else f"cuda:{plan.device_index}"
    model = model.to(torch.device(device))
    compiler = _grammar_compiler(tokenizer)
    adapters = attach_adapters(model, plan.adapters)
    info = ModelInfo(
        backend=BACKEND_NAME,
        model_name=plan.model.name,
        device=device,
        compute_type=plan.dtype,
        context_limit=context_limit(plan, model.config),
        sampling=replace(TRANSFORMERS_SAMPLING, constraints=compiler),
        adapters=tuple(adapter_id for adapter_id, _ in plan.adapters),
    )
    return LoadedModel(
        model=model, tokenizer=tokenizer, info=info, grammar=compiler, adapters=adapters
    )


def _grammar_compiler(tokenizer: HFTokenizer) -> grammar.GrammarCompiler | None:
    """Structured output's engine over the model's own tokenizer, when llguidance is
    installed (the `structured` extra); without it a request for structure is refused."""
    if not grammar.available():
        log.info("llguidance is not installed: structured output is off")
        return None
    started = time.perf_counter()
    compiler = grammar.GrammarCompiler(
        grammar.tokenizer_for_hf(tokenizer.to_json(), tokenizer.vocab_size, tokenizer.end_token_ids)
    )
    log.info(
        "structured output: llguidance over the vocabulary in %.2f s", time.perf_counter() - started
    )
    return compiler


def context_limit(plan: LoadPlan, config: Any) -> int:
    """The configured limit, else the model's; never more than the KV cache holds, so
    that one request always fits."""
    limit = plan.model.context_limit or _config_context_limit(config)
    cache_tokens = plan.options.kv_cache_tokens
    return min(limit, cache_tokens) if cache_tokens else limit


def _config_context_limit(config: Any) -> int:
    for key in CONTEXT_LIMIT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_CONTEXT_LIMIT


def _read_tokenizer(hf_dir: Path, target: Path) -> HFTokenizer:
    """The tokenizer files a conversion would copy (completed by transformers when the
    source lacks tokenizer.json or a chat template file), read as an HFTokenizer."""
    from transformers import AutoTokenizer

    from llm_local.convert.converter import write_tokenizer_files

    write_tokenizer_files(AutoTokenizer.from_pretrained(hf_dir), hf_dir, target)
    try:
        return HFTokenizer.from_directory(target)
    except TokenizerLoadError as exc:
        raise BackendLoadError(f"tokenizer: {exc}") from exc
