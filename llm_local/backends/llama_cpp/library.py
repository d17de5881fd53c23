"""llama.cpp's C API through llama-cpp-python's ctypes bindings: the only module that
calls the library for loading and freeing, so that what reaches it can be read in one place.

Why the model parameters are what they are:

- ``use_extra_bufts`` (llama.cpp's ``--no-repack`` is this switch turned off): with it on,
  the CPU backend offers "extra" buffer types that re-lay the weights for special kernels
  at load: the AMX tile layout on Intel CPUs with AMX, the interleaved ``CPU_REPACK``
  layouts for AArch64/AVX2 Q4_0, IQ4_NL, Q4_K and Q8_0 kernels. On the Intel AMX machine the
  process died at the first decode with it on, in llama.cpp's server and in this binding
  alike (docs/FINDINGS.md); the SmolLM2 GGUF is Q4_1, a type the AMX buffer type takes.
  Off, every CPU the project has met (AMD Zen4 AVX-512, AMD AVX2, Intel AMX) runs the
  weights as stored through the ordinary ggml kernels. The `repack` setting turns it on for
  whoever measured it safe and faster on their CPU.
- ctypes lifetimes: the library keeps pointers to what it is given (the log callback,
  batch arrays). Everything passed lives on an object that outlives the library's use.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_local.backends.base import BackendLoadError

_backend_lock = threading.Lock()
_backend_ready = False


class LibraryMissing(BackendLoadError):
    retryable = False  # installing a package is not something a retry does


def library() -> Any:
    """The `llama_cpp` ctypes module, the library initialised once per process."""
    global _backend_ready
    try:
        import llama_cpp
    except ImportError as exc:  # not installed, or its shared library failed to load
        raise LibraryMissing(
            "the llama_cpp backend needs llama-cpp-python: pip install 'llm-local[llama-cpp]' "
            f"(make test installs it) ({type(exc).__name__}: {exc})"
        ) from exc
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


class AdapterNotLoaded(BackendLoadError):
    retryable = False  # the same file fails the same way (another architecture, shapes)


@dataclass(frozen=True, slots=True)
class ModelOptions:
    gpu_layers: int
    repack: bool  # llama_model_params.use_extra_bufts


@dataclass(frozen=True, slots=True)
class ContextOptions:
    kv_cache_tokens: int  # for all sequences together
    sequences: int
    batch_tokens: int  # the most tokens one llama_decode call takes
    threads: int
    # Sequence ids beyond `sequences` for finished requests' kept state (prefix reuse).
    cache_sequences: int = 0
    # One pool every sequence draws from (True), or a stream of n_ctx / n_seq_max cells
    # per sequence (False: llama-server's default layout).
    shared_pool: bool = True


def model_params(lib: Any, options: ModelOptions) -> Any:
    """llama_model_params from the library's defaults and our options."""
    params = lib.llama_model_default_params()
    params.n_gpu_layers = options.gpu_layers
    params.use_extra_bufts = options.repack
    return params


def context_params(lib: Any, options: ContextOptions) -> Any:
    """llama_context_params: by default one KV cache pool that every sequence draws from.

    Unified: a sequence may grow to the whole pool, and memory follows what requests use,
    not sequences x the longest context. The scheduler admits a request only when its
    prompt + max_new_tokens fit what the running ones may still take (policy.admit), so
    the pool never runs out under a decode. The price: a token's attention scans the
    pool's whole used range, other sequences' cells masked (bench/llama_cpp_kv_layout.py:
    a step of 32 short sequences costs 1.2x a stream per sequence's). Not unified, each
    sequence has a stream of its own share, and a request must fit its share.
    """
    params = lib.llama_context_default_params()
    params.n_ctx = options.kv_cache_tokens
    params.n_batch = options.batch_tokens
    params.n_ubatch = options.batch_tokens
    params.n_seq_max = options.sequences + options.cache_sequences
    params.n_threads = options.threads
    params.n_threads_batch = options.threads
    params.kv_unified = options.shared_pool
    params.no_perf = True
    return params


def file_type(description: str) -> str:
    """The weights' type from llama_model_desc ("llama 135M Q4_1" -> "q4_1")."""
    words = description.split()
    return words[-1].lower() if words else "unknown"


# llama.cpp refuses a context of more sequences (LLAMA_MAX_SEQ).
MAX_SEQUENCES = 256


class LoadedLibraryModel:
    """A model and one context over it; `free` releases both (once, on any thread that
    no longer decodes)."""

    def __init__(self, lib: Any, path: Path, model: ModelOptions, context: ContextOptions):
        self.lib = lib
        self.model_options = model
        self.model_params = model_params(lib, model)
        self.model = lib.llama_model_load_from_file(str(path).encode(), self.model_params)
        if not self.model:
            raise BackendLoadError(f"llama.cpp cannot load {path} (see its log above)")
        self.train_context = int(lib.llama_model_n_ctx_train(self.model))
        tokens = context.kv_cache_tokens or self.train_context
        self.context_options = ContextOptions(
            kv_cache_tokens=tokens,
            sequences=context.sequences,
            batch_tokens=context.batch_tokens,
            threads=context.threads,
            cache_sequences=context.cache_sequences,
            shared_pool=context.shared_pool,
        )
        self.context_params = context_params(lib, self.context_options)
        self.ctx = lib.llama_init_from_model(self.model, self.context_params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            self.model = None
            raise BackendLoadError(
                f"llama.cpp cannot make a context of {tokens} tokens for "
                f"{context.sequences} sequences (memory?)"
            )
        self._adapters: list[Any] = []
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.memory = lib.llama_get_memory(self.ctx)
        # What one sequence may hold: the pool, within the model's training context.
        self.context_per_sequence = min(int(lib.llama_n_ctx_seq(self.ctx)), self.train_context)

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token takes: keys and values of every layer's key/value
        heads, in the library's default 16-bit cache type (SmolLM2-135M: 23,040)."""
        lib, model = self.lib, self.model
        layers = int(lib.llama_model_n_layer(model))
        heads = max(1, int(lib.llama_model_n_head(model)))
        head_dim = int(lib.llama_model_n_embd(model)) // heads
        return layers * 2 * int(lib.llama_model_n_head_kv(model)) * head_dim * 2

    def load_adapter(self, path: Path) -> Any:
        """A GGUF LoRA for this model (freed with the model, or by `free`)."""
        adapter = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise AdapterNotLoaded(
                f"llama.cpp cannot load the LoRA adapter {path} for this model (see its log)"
            )
        self._adapters.append(adapter)
        return adapter

    def description(self) -> str:
        """e.g. "llama ?B Q4_1" (architecture, size, file type)."""
        buffer = ctypes.create_string_buffer(256)
        length = self.lib.llama_model_desc(self.model, buffer, len(buffer))
        return bytes(buffer.raw[: max(0, length)]).decode("utf-8", errors="replace")

    def free(self) -> None:
        ctx, self.ctx = self.ctx, None
        model, self.model = self.model, None
        adapters, self._adapters = self._adapters, []
        if ctx:
            self.lib.llama_free(ctx)
        for adapter in adapters:
            self.lib.llama_adapter_lora_free(adapter)
        if model:
            self.lib.llama_model_free(model)


class AdapterSwitch:
    """Which LoRA adapter the context applies: ``llama_set_adapters_lora`` sets it for the
    whole context, so every sequence of a step decodes with it. Remembers the current one
    to call the library only on a change (the library also skips an unchanged set)."""

    def __init__(self, lib: Any, ctx: Any) -> None:
        self._lib = lib
        self._ctx = ctx
        self._current: Any = None
        # Kept referenced while the library may read them.
        self._array = (lib.llama_adapter_lora_p_ctypes * 1)()
        self._scales = (ctypes.c_float * 1)(1.0)

    def apply(self, adapter: Any) -> None:
        """Decode with `adapter` (None: the base model) from the next step on."""
        if adapter is self._current:
            return
        if adapter is None:
            status = self._lib.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            self._array[0] = adapter
            status = self._lib.llama_set_adapters_lora(self._ctx, self._array, 1, self._scales)
        if int(status) != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed (status {status})")
        self._current = adapter
