"""Structured output in transformers' continuous batching: each step's token masks, applied
inside the manager's own logits processing, computed beside the forward pass.

The manager (5.x) runs, on its generation thread, for every step: prepare the batch
(`prepare_next_batch`, which asks each continuous-batching logits processor for its
per-row arguments, handing it the requests that sample a token this step, in row
order), then the forward pass, the logits processors and the sampler, then
`update_batch`, which appends each sampled token to its request's `generated_tokens`.
With synchronous batching (the manager's choice wherever it captures no accelerator
graph: always on CPU) that update comes before the next preparation, so at preparation
the token a request feeds this step is its last generated token, already known:
`GrammarMasks.prepare` advances each constrained request's grammar by the tokens it
generated since its last row and starts computing the masks on a helper thread
(llguidance releases the GIL, so does the forward pass); `GrammarMasks.apply`, called as
the first logits processor, waits for them and forbids, row by row, what each grammar
does not allow. A step without a constrained request costs one attribute check.

With asynchronous batching the token fed at a step is only carried over on the device
when the forward runs, and with accelerator graphs no Python processor runs on replay:
`supports_masks` says so and the backend then refuses structure (the manager's choice
is read after it resolved its configuration).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from llm_local.backends.shared.grammar import TokenMask

# (request id, why): a grammar rejected a token or allows none; the request must fail.
ErrorSink = Callable[[str, str], None]


@dataclass(slots=True)
class _Constrained:
    request_id: str
    mask: TokenMask
    consumed: int = 0  # generated tokens the grammar has accepted
    failed: bool = False


class GrammarMasks:
    """Request id -> grammar state; `prepare` and `apply` run on the generation thread."""

    def __init__(self, on_error: ErrorSink) -> None:
        self._on_error = on_error
        self._lock = threading.Lock()
        self._by_request: dict[str, _Constrained] = {}
        self._rows: list[tuple[int, _Constrained]] = []
        self._computing: Future[None] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def track(self, request_id: str, mask: TokenMask) -> None:
        """Before the request is added to the manager."""
        with self._lock:
            self._by_request[request_id] = _Constrained(request_id, mask)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._by_request.pop(request_id, None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def prepare(self, requests: Sequence[Any]) -> None:
        """The rows of the next forward pass (`FutureRequestState`s that sample a token,
        in row order): advance each constrained request's grammar, start its mask."""
        if not self._by_request:  # no constrained request at all: nothing to do
            self._rows = []
            return
        rows: list[tuple[int, _Constrained]] = []
        with self._lock:
            tracked = self._by_request
            entries = [(row, tracked.get(f.state.request_id)) for row, f in enumerate(requests)]
        for row, entry in entries:
            if entry is None or entry.failed:
                continue
            generated = requests[row].state.generated_tokens
            for token in generated[entry.consumed :]:
                if not entry.mask.accept(int(token)):
                    why = entry.mask.error or f"token {int(token)} does not fit the grammar"
                    self._fail(entry, why)
                    break
            entry.consumed = len(generated)
            if not entry.failed:
                rows.append((row, entry))
        self._rows = rows
        self._computing = self._start([entry.mask for _, entry in rows]) if rows else None

    def apply(self, scores: Any) -> Any:
        """The first logits processor: forbid, in each constrained row of `scores`
        ([rows, vocabulary], float), every token its grammar does not allow next."""
        rows, self._rows = self._rows, []
        if not rows:
            return scores
        import torch

        computing, self._computing = self._computing, None
        if computing is not None:
            computing.result()
        width = scores.shape[-1]
        for row, entry in rows:
            allowed_flags = entry.mask.allowed()
            if not allowed_flags.any():  # an error state: sampling would see no token
                self._fail(entry, entry.mask.error or "the grammar allows no next token")
                continue
            allowed = torch.from_numpy(allowed_flags[:width]).to(scores.device, non_blocking=True)
            line = scores[row]
            line[: allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
            line[allowed.shape[0] :] = float("-inf")
        return scores

    def _start(self, masks: list[TokenMask]) -> Future[None]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="transformers-masks")
        return self._pool.submit(_compute, masks)

    def _fail(self, entry: _Constrained, why: str) -> None:
        entry.failed = True
        self._on_error(entry.request_id, why)


def _compute(masks: list[TokenMask]) -> None:
    for mask in masks:
        mask.compute()


def install(manager: Any, masks: GrammarMasks) -> None:
    """Put `masks` first among the manager's continuous-batching logits processors (before
    temperature and top-k: a greedy request's top-k 1 must pick among allowed tokens).
    Before `manager.start()`: the batch processor sizes its argument storage then."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
    )

    no_arguments = torch.zeros(0, dtype=torch.int32)

    class GrammarProcessor(ContinuousBatchingLogitsProcessor):  # type: ignore[misc]
        supported_kwargs: ClassVar[dict[str, type]] = {}
        ignored_kwargs: tuple[str, ...] = ()

        def fill_defaults(self, int32_tensor: Any) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> Any:
            masks.prepare(requests_with_new_token)
            return no_arguments  # the rows' grammars stay on this side, not in a tensor

        def __call__(self, scores: Any, tensor_arg: Any) -> Any:
            return masks.apply(scores)

    processors = manager.logit_processor
    processors.logits_processor.insert(0, GrammarProcessor())
    processors.tensors_required += 1
    processors.do_processing = True


def supports_masks(manager: Any) -> bool:
    """Whether the manager, as it resolved its configuration, runs the Python logits
    processors at every step with each request's last token known at preparation:
    synchronous batching, no accelerator graphs, no compiled forward pass."""
    config = manager.continuous_batching_config
    graphs = config.use_cuda_graph
    uses_graphs = any(graphs) if isinstance(graphs, tuple) else bool(graphs)
    compiled = config.varlen_compile_config is not None or config.decode_compile_config is not None
    return not config.use_async_batching and not uses_graphs and not compiled
