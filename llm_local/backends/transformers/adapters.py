"""LoRA adapters per request on the transformers backend: PEFT's layers, mixed per token.

transformers' continuous batching packs every request of a step into one row of tokens
(``input_ids`` of shape ``[1, tokens]``: each request's prompt chunk or its one decoding
token, one after the other) and runs the model once on it. So adapters are applied per
token, and requests with different adapters, or none, share every step:

- PEFT injects each configured adapter into the model once (``PeftModel.from_pretrained``,
  ``load_adapter``): its LoRA layers wrap the base projections and hold every adapter's
  ``lora_A``, ``lora_B`` and scaling. PEFT's own forward is switched off (the adapter
  layers disabled), so a LoRA layer computes the base projection alone;
- before each forward, a hook on the model reads which requests the step carries, in
  order, and how many tokens each (the manager's batch, `step_requests`), and turns the
  requests' adapters into token rows per adapter (`token_groups`);
- after each LoRA layer, a hook adds ``scaling * B(A(x))`` to the rows of each adapter
  that layer holds (`add_deltas`): PEFT's arithmetic, on a sub-batch of tokens.

PEFT's own mixed batch (``adapter_names=``) splits dimension 0, the one packed row here,
and builds its index lists in Python in every layer at every step; the groups here are
built once a step. What a mixed step costs is measured in docs/FINDINGS.md
(`python -m bench.transformers_lora_steps`).

Plain LoRA only: a variant (DoRA and the like) or an adapted module that is no linear
projection (an embedding, a convolution) is refused at load by name. With adapters, the
manager's prefix sharing is off (a shared KV block would carry one adapter's keys into
another's request) and so are CUDA graphs (a captured step would replay one step's token
groups), see `cb_overrides`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_local.backends.base import BackendLoadError

if TYPE_CHECKING:
    from llm_local.settings.schema import AppSettings


class AdapterNotServed(BackendLoadError):
    retryable = False  # the settings must change


@dataclass(frozen=True, slots=True)
class TokenGroup:
    adapter: str
    rows: Any  # a LongTensor of token rows; None: every token of the step


def peft_adapter_dirs(settings: AppSettings) -> tuple[tuple[str, Path], ...]:
    """Each configured adapter's PEFT directory (a hub repository's is downloaded); a GGUF
    LoRA or a missing source is refused by name (AdapterNotServed)."""
    from llm_local.convert.adapters import peft_adapter_dir, resolve_adapter
    from llm_local.convert.errors import ConversionError

    found: list[tuple[str, Path]] = []
    for adapter in settings.adapters:
        try:
            found.append((adapter.id, peft_adapter_dir(resolve_adapter(adapter), settings.model)))
        except ConversionError as exc:
            raise AdapterNotServed(str(exc)) from exc
    return tuple(found)


def cb_overrides(adapters: Sequence[str]) -> dict[str, Any]:
    """ContinuousBatchingConfig fields the adapters need (none without adapters)."""
    if not adapters:
        return {}
    return {"allow_block_sharing": False, "use_cuda_graph": False}


def token_groups(
    requests: Iterable[tuple[str, int]],
    adapter_of: dict[str, str],
    to_rows: Any,
) -> list[TokenGroup]:
    """The step's token rows per adapter, from its requests in batch order as (request id,
    tokens in this step). Requests without an adapter (the base model) get no group; when
    one adapter has every token, its rows are None (no gather, no scatter). `to_rows`
    turns a list of row numbers into the tensor the layers index with."""
    rows: dict[str, list[int]] = {}
    start = 0
    for request_id, count in requests:
        adapter = adapter_of.get(request_id)
        if adapter is not None:
            rows.setdefault(adapter, []).extend(range(start, start + count))
        start += count
    if len(rows) == 1:
        ((adapter, only),) = rows.items()
        if len(only) == start:
            return [TokenGroup(adapter, None)]
    return [TokenGroup(adapter, to_rows(found)) for adapter, found in rows.items()]


def step_requests(batch_processor: Any) -> list[tuple[str, int]]:
    """(request id, tokens) of the step about to run, in the order its tokens are packed."""
    io = batch_processor.inputs_and_outputs
    pairs = getattr(io, "io_pairs", None)  # asynchronous batching: the pair being run
    if pairs is not None:
        io = pairs[io.current_pair].host_io
    requests = [
        (future.state.request_id, int(future.query_length)) for future in io.requests_in_batch
    ]
    packed = int(io.total_seqlen_q)
    if sum(count for _, count in requests) != packed:
        # Never apply an adapter to another request's tokens: a transformers whose batch
        # layout changed must fail loudly here.
        raise RuntimeError(
            f"the step packs {packed} tokens but its requests count "
            f"{sum(count for _, count in requests)}: transformers' batch layout changed"
        )
    return requests


def add_deltas(layer: Any, x: Any, output: Any, groups: Sequence[TokenGroup]) -> None:
    """``output += scaling * B(A(x))`` on each group's rows, for the adapters `layer` holds
    (in place: the output is the layer's own fresh tensor)."""
    flat_x = x.reshape(-1, x.shape[-1])
    flat_out = output.view(-1, output.shape[-1])
    for group in groups:
        if group.adapter not in layer.lora_A:
            continue  # this adapter leaves this projection alone
        lora_a = layer.lora_A[group.adapter]
        lora_b = layer.lora_B[group.adapter]
        scaling = layer.scaling[group.adapter]
        rows = flat_x if group.rows is None else flat_x.index_select(0, group.rows)
        delta = lora_b(lora_a(rows.to(lora_a.weight.dtype))) * scaling
        if group.rows is None:
            flat_out.add_(delta.to(flat_out.dtype))
        else:
            flat_out.index_add_(0, group.rows, delta.to(flat_out.dtype))


class TokenAdapters:
    """The adapters injected into one model, and which request decodes with which.

    `assign`/`release` run on the trio thread, the hooks on the manager's generation
    thread; the map between them is guarded by a lock."""

    def __init__(self, model: Any, adapters: tuple[str, ...], layers: list[Any]) -> None:
        self.adapters = adapters
        self._layers = layers
        self._lock = threading.Lock()
        self._adapter_of: dict[str, str] = {}
        self._manager: Any = None
        self._groups: list[TokenGroup] = []
        self._device = next(model.parameters()).device
        self._handles = [
            model.register_forward_pre_hook(self._begin_step),
            model.register_forward_hook(self._end_step),
        ]
        self._handles += [layer.register_forward_hook(self._after_layer) for layer in layers]

    def bind(self, manager: Any) -> None:
        """The manager whose batches the hooks read (its processor is built lazily)."""
        self._manager = manager

    def assign(self, request_id: str, adapter: str | None) -> None:
        if adapter is not None:
            with self._lock:
                self._adapter_of[request_id] = adapter

    def release(self, request_id: str) -> None:
        with self._lock:
            self._adapter_of.pop(request_id, None)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    # -- hooks (generation thread) ----------------------------------------------------------

    def _begin_step(self, _model: Any, _args: Any) -> None:
        with self._lock:
            adapter_of = dict(self._adapter_of)
        if not adapter_of:
            self._groups = []
            return
        import torch

        processor = self._manager.batch_processor
        self._groups = token_groups(
            step_requests(processor),
            adapter_of,
            lambda rows: torch.tensor(rows, dtype=torch.long, device=self._device),
        )

    def _end_step(self, _model: Any, _args: Any, _output: Any) -> None:
        self._groups = []

    def _after_layer(self, layer: Any, args: Any, output: Any) -> None:
        if self._groups:
            add_deltas(layer, args[0], output, self._groups)


def attach_adapters(model: Any, adapters: Sequence[tuple[str, Path]]) -> TokenAdapters | None:
    """Inject each adapter into `model` (in place) and hook it for per-token application;
    None without adapters. Raises AdapterNotServed for what PEFT cannot load or this
    backend cannot apply."""
    if not adapters:
        return None
    try:
        from peft import PeftModel
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError as exc:
        raise AdapterNotServed(
            "LoRA adapters on the transformers backend need PEFT: pip install peft"
        ) from exc

    wrapper: Any = None
    for adapter_id, path in adapters:
        try:
            if wrapper is None:
                wrapper = PeftModel.from_pretrained(
                    model, str(path), adapter_name=adapter_id, is_trainable=False
                )
            else:
                wrapper.load_adapter(str(path), adapter_name=adapter_id, is_trainable=False)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise AdapterNotServed(
                f"adapter {adapter_id!r}: PEFT cannot load {str(path)!r} onto this model: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    for adapter_id, _ in adapters:
        saved = wrapper.peft_config[adapter_id].modules_to_save
        if saved:
            raise AdapterNotServed(
                f"adapter {adapter_id!r} replaces whole modules (modules_to_save: "
                f"{sorted(saved)}): per request, the transformers backend applies plain LoRA only"
            )
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
            raise AdapterNotServed(
                f"adapter {_first_adapter(module)!r} adapts {name} ({type(module).__name__}): "
                "the transformers backend applies LoRA to linear projections only"
            )
        if isinstance(module, LoraLayer) and module.lora_variant:
            variant = next(iter(module.lora_variant))
            raise AdapterNotServed(
                f"adapter {variant!r} is a LoRA variant "
                f"({type(module.lora_variant[variant]).__name__}, e.g. DoRA): the transformers "
                "backend applies plain LoRA only"
            )
    # PEFT's own forward adds every active adapter to every token: off. The layers keep the
    # adapters' weights; the hooks add each request's own.
    wrapper.base_model.disable_adapter_layers()
    return TokenAdapters(model, tuple(adapter_id for adapter_id, _ in adapters), layers)


def _first_adapter(module: Any) -> str:
    names = list(getattr(module, "lora_A", {}) or getattr(module, "lora_embedding_A", {}))
    return names[0] if names else "?"
