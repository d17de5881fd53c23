"""Settings to a loaded llama.cpp model and context: blocking code, run on a thread.

The GGUF is served as stored, or re-laid once into model.cache_dir in a type with faster
batched kernels when `llama_cpp.weights` says so or measures it faster (weights.py).
Sources (convert/sources.py):
- a `.gguf` file, or a `package:DIST/PATH` naming one: read in place;
- a Hugging Face Hub repository that holds one `.gguf` file (more than one: the error
  lists them, give the file instead): downloaded through huggingface_hub's cache, found
  there without the network when `model.offline` says so;
- a Hugging Face model directory (safetensors) is refused at start-up: the ct2 and
  transformers backends serve those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_local.backends.base import BackendLoadError, ModelInfo, NumericsRejected
from llm_local.backends.llama_cpp.canary import Probe, numerics_status
from llm_local.backends.llama_cpp.library import (
    MAX_SEQUENCES,
    AdapterSwitch,
    ContextOptions,
    LoadedLibraryModel,
    ModelOptions,
    file_type,
    library,
)
from llm_local.backends.llama_cpp.threads import measure_threads
from llm_local.backends.llama_cpp.tokenizer import LlamaVocabTokenizer
from llm_local.backends.llama_cpp.weights import AUTO, WeightsPlan, serving_weights
from llm_local.backends.shared import grammar
from llm_local.backends.shared.source import resolve_model_source
from llm_local.backends.shared.threads import usable_cpus
from llm_local.core.types import SamplingSupport

if TYPE_CHECKING:
    from llm_local.convert.sources import ModelSource
    from llm_local.core.numerics import Measurement, NumericsStatus, Reference
    from llm_local.settings.schema import (
        AppSettings,
        LlamaCppSettings,
        ModelSettings,
        NumericsSettings,
    )

BACKEND_NAME = "llama_cpp"
# The library's own default batch: room for every sequence's token plus a prompt chunk,
# and at least this much for reading a prompt while nothing else decodes.
MIN_BATCH_TOKENS = 512

log = logging.getLogger("llm_local.backends.llama_cpp")


class SourceNotServed(BackendLoadError):
    retryable = False  # the settings must change


@dataclass(frozen=True, slots=True)
class LoadPlan:
    gguf: Path  # the file as given; `weights` may serve a copy of it (weights.py)
    model: ModelSettings
    options: LlamaCppSettings
    threads: int  # the CPUs we may use when auto (then measured at load), else as set
    measure_threads: bool
    batch_tokens: int
    numerics: NumericsSettings | None = None  # None: no numerics check (benches, tests)
    reference: Reference | None = None  # what the check compares with (canary.py)
    # Each adapter's reference (base + adapter, unquantized); an adapter without one is absent.
    adapter_references: Mapping[str, Reference] = field(default_factory=dict)
    adapters: tuple[tuple[str, Path], ...] = ()  # adapter id -> its GGUF LoRA
    source: ModelSource | None = None  # what names the copies of `gguf` in the cache


@dataclass(slots=True)
class LoadedModel:
    handle: LoadedLibraryModel
    tokenizer: LlamaVocabTokenizer
    info: ModelInfo
    prefill_chunk_tokens: int
    kv_bytes_per_token: int = 0
    prefix_cache_mb: float = 0.0
    prefix_isolation: str = "none"
    grammar: grammar.GrammarCompiler | None = None  # None: llguidance is not installed
    adapters: dict[str, Any] = field(default_factory=dict)  # id -> llama_adapter_lora


def batch_tokens(options: LlamaCppSettings) -> int:
    """Tokens one llama_decode may take: every sequence's token plus a prompt chunk."""
    return max(MIN_BATCH_TOKENS, options.sequences + options.prefill_chunk_tokens)


def cache_sequences(options: LlamaCppSettings) -> int:
    """Sequence ids kept for finished requests' state: as many as run at once (a call's
    turn finished per running call), within the library's limit; none without reuse."""
    if options.prefix_cache_mb <= 0 or options.kv_layout == "per_sequence":
        # Per sequence, every id is a stream of its own share of the cache: extra ids
        # would cut each request's share. A finished request's sequence stays until its
        # id is needed, then goes to host memory.
        return 0
    return max(0, min(options.sequences, MAX_SEQUENCES - options.sequences))


def plan_from_settings(settings: AppSettings) -> LoadPlan:
    """Where the GGUF is and how it runs; BackendLoadError if this backend cannot serve it."""
    from llm_local.convert.gguf_reference import find_gguf_reference

    source = resolve_model_source(settings.model)
    options = settings.llama_cpp
    threads = usable_cpus() if options.threads == "auto" else int(options.threads)
    reference = None
    adapter_references: dict[str, Reference] = {}
    if settings.numerics.check_at_load:
        from llm_local.convert.adapter_reference import find_adapter_references

        reference = find_gguf_reference(settings)
        adapter_references = find_adapter_references(settings)
    gguf = gguf_path(source, settings.model)
    return LoadPlan(
        gguf=gguf,
        model=settings.model,
        options=options,
        threads=threads,
        measure_threads=options.threads == "auto",
        batch_tokens=batch_tokens(options),
        numerics=settings.numerics,
        reference=reference,
        adapters=prepared_adapters(settings, source, gguf),
        adapter_references=adapter_references,
        source=source,
    )


def prepared_adapters(
    settings: AppSettings, source: ModelSource, gguf: Path
) -> tuple[tuple[str, Path], ...]:
    """Each configured adapter's GGUF LoRA, converted into the cache first where it lacks
    one (what `llm-local convert` does; a PEFT adapter takes seconds)."""
    from llm_local.convert.adapters import ensure_gguf_adapter, resolve_adapter
    from llm_local.convert.errors import ConversionError

    prepared: list[tuple[str, Path]] = []
    for adapter in settings.adapters:
        try:
            found = ensure_gguf_adapter(resolve_adapter(adapter), source, gguf, settings.model)
        except ConversionError as exc:
            raise SourceNotServed(str(exc)) from exc
        prepared.append((adapter.id, found))
    return tuple(prepared)


def gguf_path(source: ModelSource, model: ModelSettings) -> Path:
    """The local GGUF file of `source`, downloading a hub repository's one GGUF."""
    if source.kind == "gguf" and source.path is not None:
        return source.path
    if source.kind == "hf_dir":
        raise SourceNotServed(
            f"model {source.spec!r} is a Hugging Face model directory: the llama_cpp backend "
            'serves GGUF files; serve it with backend = "ct2" (converted) or '
            '"transformers", or give a .gguf file'
        )
    return _hub_gguf(source.spec, model)


def _hub_gguf(repo_id: str, model: ModelSettings) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    try:
        if model.offline:
            from huggingface_hub import snapshot_download

            snapshot = Path(
                snapshot_download(
                    repo_id,
                    revision=model.revision,
                    cache_dir=model.download_dir,
                    local_files_only=True,
                    allow_patterns=["*.gguf"],
                )
            )
            names = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf"))
        else:
            snapshot = None
            names = sorted(
                name
                for name in list_repo_files(repo_id, revision=model.revision)
                if name.endswith(".gguf")
            )
    except Exception as exc:  # huggingface_hub's errors are many; each is a load error here
        raise BackendLoadError(
            f"cannot find a GGUF in hub repository {repo_id!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        raise SourceNotServed(
            f"the llama_cpp backend serves a hub repository holding one .gguf file; "
            f"{repo_id!r} holds {found}: give the file's path instead, or serve the "
            'repository with backend = "ct2" or "transformers"'
        )
    if snapshot is not None:
        return snapshot / names[0]
    return Path(
        hf_hub_download(repo_id, names[0], revision=model.revision, cache_dir=model.download_dir)
    )


def load_model(plan: LoadPlan) -> LoadedModel:
    """Load the plan's GGUF, or the copy `llama_cpp.weights` chose, into one context
    (seconds: call it on a thread)."""
    lib = library()
    served = served_file(lib, plan)
    try:
        return _load(lib, plan, served)
    except NumericsRejected as exc:
        # `auto` chose the copy for speed; faithfulness decides: the file serves instead.
        if served == plan.gguf or plan.options.weights != AUTO:
            raise
        log.warning(
            "llama.cpp weights: the re-laid copy failed the numerics check (%s); serving "
            "the file as stored",
            exc,
        )
        return _load(lib, plan, plan.gguf)


def _load(lib: Any, plan: LoadPlan, path: Path) -> LoadedModel:
    options = plan.options
    handle = LoadedLibraryModel(
        lib,
        path,
        ModelOptions(gpu_layers=options.gpu_layers, repack=options.repack),
        ContextOptions(
            kv_cache_tokens=options.kv_cache_tokens,
            sequences=options.sequences,
            batch_tokens=plan.batch_tokens,
            threads=plan.threads,
            cache_sequences=cache_sequences(options),
            shared_pool=options.kv_layout == "pool",
        ),
    )
    try:
        adapters = {name: handle.load_adapter(path) for name, path in plan.adapters}
        tokenizer = LlamaVocabTokenizer(lib, handle.model, handle.vocab)
        threads = plan.threads
        if plan.measure_threads:
            probe = tokenizer.encode("Hello")[0]
            threads = measure_threads(
                lib,
                handle.ctx,
                handle.memory,
                probe,
                plan.threads,
                room=handle.context_per_sequence,
            )
        if tokenizer.chat_template is None:
            log.warning("%s has no chat template: chat requests will be refused", plan.gguf)
        compute_type = file_type(handle.description())
        canary = Probe(
            lib,
            handle.ctx,
            handle.memory,
            vocab_size=tokenizer.vocab_size,
            end_token_ids=tokenizer.end_token_ids,
            batch_tokens=plan.batch_tokens,
            sequences=options.sequences,
            kv_cache_tokens=handle.context_options.kv_cache_tokens,
            compute_type=compute_type,
        )
        numerics = numerics_status(compute_type, plan.numerics, plan.reference, canary.measure)
        adapter_numerics = check_adapters(
            AdapterSwitch(lib, handle.ctx), adapters, plan, compute_type, canary.measure
        )
        compiler = _grammar_compiler(lib, handle.vocab, tokenizer.end_token_ids)
        limit = handle.context_per_sequence
        if plan.model.context_limit:
            limit = min(limit, plan.model.context_limit)
        info = ModelInfo(
            backend=BACKEND_NAME,
            model_name=plan.model.name,
            device="cuda:0" if options.gpu_layers > 0 else "cpu",
            compute_type=compute_type,
            context_limit=limit,
            numerics=numerics,
            threads=(1, threads),
            sampling=SamplingSupport(constraints=compiler),
            adapters=tuple(adapters),
            adapter_numerics=adapter_numerics,
        )
    except BaseException:
        handle.free()
        raise
    log.info(
        "llama.cpp: %s, %d sequences %s %d KV cache tokens, %d threads, repack %s",
        handle.description(),
        options.sequences,
        "sharing" if options.kv_layout == "pool" else "each with an equal share of",
        handle.context_options.kv_cache_tokens,
        threads,
        "on" if options.repack else "off",
    )
    return LoadedModel(
        handle=handle,
        tokenizer=tokenizer,
        info=info,
        prefill_chunk_tokens=options.prefill_chunk_tokens,
        kv_bytes_per_token=handle.kv_bytes_per_token(),
        prefix_cache_mb=options.prefix_cache_mb,
        prefix_isolation=options.prefix_isolation,
        grammar=compiler,
        adapters=adapters,
    )


def served_file(lib: Any, plan: LoadPlan) -> Path:
    """The GGUF to load: the file, or its re-laid copy (`llama_cpp.weights`)."""
    if plan.source is None:
        return plan.gguf
    return serving_weights(
        lib,
        WeightsPlan(
            gguf=plan.gguf,
            source=plan.source,
            cache_dir=plan.model.cache_dir,
            setting=plan.options.weights,
            threads=plan.threads,
            gpu_layers=plan.options.gpu_layers,
            repack=plan.options.repack,
        ),
    )


def check_adapters(
    switch: AdapterSwitch,
    adapters: Mapping[str, Any],
    plan: LoadPlan,
    compute_type: str,
    measure: Callable[[Reference], Measurement],
) -> tuple[tuple[str, NumericsStatus], ...]:
    """Each adapter's numerics verdict: the probe with the adapter applied, judged against
    the unquantized base + adapter like the model (canary.py); raises NumericsRejected for
    a failing adapter unless numerics.accept_unverified. The context is left on the base."""
    verdicts: list[tuple[str, NumericsStatus]] = []
    try:
        for name, adapter in adapters.items():
            switch.apply(adapter)
            status = numerics_status(
                compute_type,
                plan.numerics,
                plan.adapter_references.get(name),
                measure,
                adapter=name,
            )
            if status is not None:
                verdicts.append((name, status))
    finally:
        switch.apply(None)
    return tuple(verdicts)


def _grammar_compiler(
    lib: Any, vocab: object, end_token_ids: frozenset[int]
) -> grammar.GrammarCompiler | None:
    """Structured output's engine over the model's own vocabulary, when llguidance is
    installed (the `structured` extra); without it a request for structure is refused."""
    if not grammar.available():
        log.info("llguidance is not installed: structured output is off")
        return None
    started = time.perf_counter()
    compiler = grammar.GrammarCompiler(grammar.tokenizer_for_llama_cpp(lib, vocab, end_token_ids))
    log.info(
        "structured output: llguidance over the vocabulary in %.2f s", time.perf_counter() - started
    )
    return compiler
