"""Which shared prompt prefixes CTranslate2 may keep cached, within a memory budget.

How CTranslate2 keeps them (read in its source, v4.8: `src/models/language_model.cc`,
`include/ctranslate2/layers/decoder.h`, `src/layers/decoder.cc`, `python/cpp/replica_pool.h`):

- `generate_batch(..., static_prompt=tokens)` runs the decoder over the static prompt once
  for the whole batch and copies the resulting state (every layer's keys and values) into
  each item's state. With `cache_static_prompt=True` it first looks the prompt up in a
  `DecoderStateCache` and, on a miss, saves the state there.
- That cache is a member of the *model*, not of a replica: `ModelLoader::load` gives all
  `inter_threads` replicas of one device the same model object, so every worker shares one
  cache (one per device).
- It is a `std::map` keyed by the static prompt's token ids, guarded by a mutex. Nothing
  ever removes an entry: no eviction, no size bound, no API to clear it. It goes only with
  the model: `unload_model()` (on CPU only with `to_cpu=False`) drops the model and its
  cache, `load_model()` reads the model again from disk with an empty cache.
- One entry holds, per layer, the keys and values of the prefix for every attention head
  (also for a model with fewer key/value heads): ``layers × 2 × width × length`` values in
  the activation type (float32 for int8 or float32 on a CPU, 16 bits for float16/bfloat16
  compute). SmolLM2-135M: 30 × 2 × 576 × 4 bytes = 135 KiB per prefix token (measured
  138 KB of RSS per token), 40 MiB for a 300-token system prompt.
- Measured (CTranslate2 4.8.5, CPU): 20 distinct 300-token prefixes raised RSS by 790 MB,
  20 more by as much again. `unload_model()` is silently ignored while
  `num_active_batches` is above 0 (which lasts a moment after `generate_batch` returns):
  wait for 0 first. After `unload_model()` + `load_model()` (0.7 s) the next 20 prefixes
  reused the freed memory (+127 MB); glibc keeps freed memory in the process unless
  `malloc_trim` returns it.

So a prefix must not reach CTranslate2's cache unless it is worth keeping for the life of
the model. `PrefixCachePolicy` decides, per batch: a prefix seen once recently is passed as
a static prompt *without* caching (it still saves reading it once per item of the batch);
seen again, it is admitted to the cache while the admitted prefixes fit the byte budget;
beyond the budget, prefixes stay uncached. When the budget is full and prefixes that are
not admitted keep coming back, `wants_reset` says so: the backend then drops CTranslate2's
cache at a moment no batch runs (`unload_model` + `load_model`) and admission starts over.
Pure bookkeeping: no CTranslate2, no clock; one lock because workers call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading
from collections import OrderedDict
from pathlib import Path

Prefix = tuple[int, ...]

# How many distinct prefixes seen once are remembered (a few ints each).
RECENT_PREFIXES = 256


class PrefixCachePolicy:
    """Admission of static prompts to CTranslate2's never-evicting cache."""

    def __init__(self, *, budget_bytes: int, bytes_per_token: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be 0 or more, not {budget_bytes}")
        self._budget = budget_bytes
        self._bytes_per_token = max(bytes_per_token, 1)
        self._lock = threading.Lock()
        self._seen: OrderedDict[Prefix, None] = OrderedDict()  # seen once, most recent last
        self._admitted: dict[Prefix, int] = {}  # prefix -> its estimated bytes
        self._refused = 0  # repeated prefixes left uncached since the budget filled
        self._warm: set[Prefix] = set()  # admitted and in CTranslate2's cache by now

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(self._admitted.values())

    @property
    def cached_prefixes(self) -> int:
        with self._lock:
            return len(self._admitted)

    def bytes_for(self, length: int) -> int:
        return length * self._bytes_per_token

    def should_cache(self, prefix: Prefix) -> bool:
        """Called as a batch with static prompt `prefix` starts: may CTranslate2 cache it?"""
        with self._lock:
            if prefix in self._admitted:
                return True
            if prefix not in self._seen:
                self._seen[prefix] = None
                while len(self._seen) > RECENT_PREFIXES:
                    self._seen.popitem(last=False)
                return False
            self._seen.move_to_end(prefix)
            size = self.bytes_for(len(prefix))
            if sum(self._admitted.values()) + size > self._budget:
                self._refused += 1
                return False
            del self._seen[prefix]
            self._admitted[prefix] = size
            return True

    def is_warm(self, prefix: Prefix) -> bool:
        """Has a batch with this admitted prefix finished (its state is in the cache)?"""
        with self._lock:
            return prefix in self._warm

    def mark_warm(self, prefix: Prefix) -> None:
        """A batch with static prompt `prefix` finished: if admitted, it is cached now."""
        with self._lock:
            if prefix in self._admitted:
                self._warm.add(prefix)

    def wants_reset(self) -> bool:
        """The budget is full and repeated prefixes are being left out: as many refusals
        as admitted prefixes means the admitted set is no longer the one in demand."""
        with self._lock:
            return bool(self._admitted) and self._refused >= max(len(self._admitted), 2)

    def postpone_reset(self) -> None:
        """The cache could not be dropped now: ask again after as many refusals."""
        with self._lock:
            self._refused = 0

    def reset(self) -> None:
        """CTranslate2's cache was dropped: nothing is admitted any more."""
        with self._lock:
            self._admitted.clear()
            self._warm.clear()
            self._refused = 0


def kv_bytes_per_token(model_file: Path, activation_bytes: int) -> int:
    """Bytes one token of a cached prefix takes, from the model's layer shapes: each
    decoder layer keeps a key and a value of the model's width (CTranslate2 keeps them
    for every attention head, also for a model with fewer key/value heads: measured
    138 KB per token for SmolLM2-135M, = 30 layers × 2 × 576 × 4 bytes). 0 when the
    file cannot be read that way."""
    widths = [
        shape[0]
        for name, shape in read_variable_shapes(model_file).items()
        if name.endswith("self_attention/layer_norm/gamma") and len(shape) == 1
    ]
    return sum(2 * width for width in widths) * activation_bytes


def read_variable_shapes(model_file: Path) -> dict[str, tuple[int, ...]]:
    """Variable names and shapes of a CTranslate2 `model.bin` (binary version 4 or more),
    skipping the weights themselves; {} when the file is not in that format."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with model_file.open("rb") as file:

            def take(fmt: str) -> tuple[int, ...]:
                size = struct.calcsize("<" + fmt)
                data = file.read(size)
                if len(data) != size:
                    raise ValueError("truncated")
                return struct.unpack("<" + fmt, data)

            def string() -> str:
                (length,) = take("H")
                return file.read(length).rstrip(b"\0").decode("utf-8")

            (version,) = take("I")
            if version < 4:
                return {}
            string()  # the spec's name
            take("I")  # its revision
            (count,) = take("I")
            for _ in range(count):
                name = string()
                (rank,) = take("B")
                dims = take("I" * rank) if rank else ()
                take("B")  # type id
                (num_bytes,) = take("I")
                file.seek(num_bytes, 1)
                shapes[name] = tuple(dims)
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return {}
    return shapes


def release_freed_memory() -> None:
    """Give memory freed by the process back to the system (glibc keeps it otherwise)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory is reused by the process all the same


def activation_bytes(compute_type: str) -> int:
    """Bytes per cached value for a CTranslate2 compute type (its activation type)."""
    return 2 if compute_type.endswith(("float16", "bfloat16")) else 4
