"""Teacher-forced scoring with a plain PyTorch forward pass of the test model, for tests
that compare a greedy answer decoded among other requests with the same answer decoded
alone (tests/backends/llama_cpp/scoring.py is the llama.cpp twin).

A batch's shape changes the order of floating-point sums in the continuous batching
manager's kernels, so two greedy runs of one prompt may part at a near tie. Where they
part, the model scored alone must find both tokens about equally likely; a token decoded
from the wrong state (a mask meant for another row) is one the prompt does not predict."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm_local.backends.hf_tokenizer import HFTokenizer
from llm_local.backends.transformers.loader import load_model, plan_from_settings
from llm_local.settings.schema import AppSettings
from tests.backends.llama_cpp.scoring import NEAR_TIE_NATS

__all__ = ["NEAR_TIE_NATS", "Scorer"]


class Scorer:
    """The test model loaded on its own (no continuous batching): one forward per score."""

    def __init__(self, settings: AppSettings) -> None:
        loaded = load_model(plan_from_settings(settings))
        self._model = loaded.model
        self._tokenizer: HFTokenizer = loaded.tokenizer

    def divergence_gap(self, prompt: Sequence[int], mine: str, reference: str) -> float:
        """At the first token where `mine` leaves `reference` (both after `prompt`), how
        much less likely the model finds my token than the reference's, in nats."""
        ids_mine = self._tokenizer.encode(mine)
        ids_ref = self._tokenizer.encode(reference)
        common = 0
        while common < min(len(ids_mine), len(ids_ref)) and ids_mine[common] == ids_ref[common]:
            common += 1
        if common == len(ids_mine) or common == len(ids_ref):
            return 0.0  # one ends where the other goes on: the end token decided, not text
        with torch.inference_mode():
            ids = torch.tensor([[*prompt, *ids_ref[:common]]])
            row = self._model(input_ids=ids).logits[0, -1].double().log_softmax(-1)
        return float(row[ids_ref[common]] - row[ids_mine[common]])
