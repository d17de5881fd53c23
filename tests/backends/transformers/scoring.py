"""Teacher-forced scoring with the transformers backend's own model, for tests that compare
answers decoded among other requests (or after a reused prefix) with answers decoded alone.

PyTorch's CPU kernels may round a row differently with the batch's shape (how many query
tokens, how many requests share the step), so two greedy runs of one prompt may part at a
near tie. Where they part, the model scored alone must find both tokens about equally
likely; an answer computed from the wrong state (another request's pages) picks a token
the prompt does not predict."""

from __future__ import annotations

from collections.abc import Sequence

from llm_local.backends.transformers.loader import LoadedModel, load_model, plan_from_settings
from llm_local.settings.schema import AppSettings
from tests.backends.llama_cpp.scoring import NEAR_TIE_NATS

__all__ = ["NEAR_TIE_NATS", "Scorer", "divergence_gap", "greedy_gap"]


class Scorer:
    """The test model loaded on its own (no continuous batching), for tests whose backend
    is gone by the time they score."""

    def __init__(self, settings: AppSettings) -> None:
        self._loaded = load_model(plan_from_settings(settings))

    def divergence_gap(self, prompt: Sequence[int], mine: str, reference: str) -> float:
        return divergence_gap(self._loaded, prompt, mine, reference)


def divergence_gap(loaded: LoadedModel, prompt: Sequence[int], mine: str, reference: str) -> float:
    """At the first token where `mine` leaves `reference` (both after `prompt`), how much
    less likely the model (one forward pass, no cache) finds my token than the
    reference's, in nats: about 0 for a near tie; large for another conversation's."""
    import torch

    tokenizer = loaded.tokenizer
    ids_mine, ids_ref = tokenizer.encode(mine), tokenizer.encode(reference)
    common = 0
    while common < min(len(ids_mine), len(ids_ref)) and ids_mine[common] == ids_ref[common]:
        common += 1
    if common == len(ids_mine) or common == len(ids_ref):
        return 0.0  # one ends where the other goes on: the end token decided, not text
    model = loaded.model  # the backend's own weights, idle between its runs
    with torch.inference_mode():
        ids = torch.tensor([[*prompt, *ids_ref[:common]]], device=model.device)
        logits = model(ids).logits[0, -1].double()
    row = torch.log_softmax(logits, dim=-1)
    return float(row[ids_ref[common]] - row[ids_mine[common]])


def greedy_gap(loaded: LoadedModel, prompt: Sequence[int], answer: Sequence[int]) -> float:
    """How far an answer (the token ids generated) strays from greedy decoding by the model
    scored alone (one forward pass over prompt + answer, no cache): at each answer token,
    how much less likely the model finds it than its most likely token, in nats; the
    largest. 0 for an answer decoded greedily from its own prompt, a near tie where
    rounding flipped one, many nats for a token chosen from another conversation's state.
    Ids, not text: a text re-encodes to other ids now and then ("leursoin")."""
    import torch

    if not answer:
        return 0.0
    model = loaded.model
    with torch.inference_mode():
        tokens = torch.tensor([[*prompt, *answer]], device=model.device)
        logits = model(tokens).logits[0, len(prompt) - 1 : -1].double()
    rows = torch.log_softmax(logits, dim=-1)
    taken = rows.gather(1, torch.tensor(list(answer), device=rows.device).unsqueeze(1))
    return float((rows.max(dim=1).values - taken.squeeze(1)).max())
