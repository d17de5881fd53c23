"""The numerics reference a converted model carries (reference.json beside model.bin).

Recorded once, when the model is converted, from the *unquantized* weights still in
memory: the greedy answers of the float32 transformers model to a small probe set of
plain questions, and the mean negative log-likelihood per token of those answers. Then
the same probe is run in float32 on the converted (possibly quantized) weights: the
anchor, what any compute type can at best reproduce from them. At every load the
serving compute type is judged against both (`llm_local.core.numerics`).

An entry converted before references existed gets one on the next `llm-local convert`
without being converted again (`ensure_converted` loads the source once for it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_local.convert.cache import write_json_atomically
from llm_local.core.numerics import Anchor, ProbeItem, Reference

REFERENCE_FILE = "reference.json"
# Bump when the prompts or the way answers are produced change: entries then get a new
# reference on the next `llm-local convert`.
PROBE_VERSION = 2
# 12 prompts x 16 tokens costs half of 16 x 24 (version 1) at every load and separates
# the same kernels as clearly (docs/FINDINGS.md, "Numerics").
PROBE_MAX_NEW_TOKENS = 16
# Plain questions, the kind users ask first; the README's examples come first. Short
# factual answers make greedy agreement meaningful even for a 135M model.
PROBE_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Name a colour",
    "What is the capital of Germany?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What is 12 plus 7?",
    "What planet is closest to the Sun?",
    "What does a bee make?",
    "Translate 'good morning' into Spanish.",
    "What is the largest ocean on Earth?",
    "Name three primary colours.",
    "What is water made of?",
)


def reference_path(model_dir: Path) -> Path:
    return model_dir / REFERENCE_FILE


def read_reference(model_dir: Path) -> Reference | None:
    """The model's reference, or None when it has none (or one of an older probe)."""
    try:
        data = json.loads(reference_path(model_dir).read_text(encoding="utf-8"))
        reference = Reference.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return reference if reference.probe_version == PROBE_VERSION else None


def write_reference(model_dir: Path, reference: Reference) -> None:
    write_json_atomically(reference_path(model_dir), reference.to_json())


def probe_prompt_ids(model_dir: Path) -> list[tuple[int, ...]]:
    """The probe prompts as the server would send them to this model (its template,
    its default system prompt when the template adds one)."""
    from llm_local.backends.hf_tokenizer import HFTokenizer
    from llm_local.core.prompt import build_prompt
    from llm_local.core.types import GenerationRequest

    tokenizer = HFTokenizer.from_directory(model_dir)
    return [
        tuple(tokenizer.encode(build_prompt(GenerationRequest(user_prompt=prompt), tokenizer)))
        for prompt in PROBE_PROMPTS
    ]


def answer_probe(model: Any, tokenizer_dir: Path) -> tuple[tuple[ProbeItem, ...], float]:
    """The unquantized model's greedy answers to the probe, and their mean NLL per
    token; the prompts rendered with the tokenizer files in `tokenizer_dir`."""
    from llm_local.backends.hf_tokenizer import HFTokenizer

    end_ids = sorted(HFTokenizer.from_directory(tokenizer_dir).end_token_ids)
    prompts = probe_prompt_ids(tokenizer_dir)
    answers = _greedy_answers(model, prompts, end_ids, PROBE_MAX_NEW_TOKENS)
    items = tuple(ProbeItem(p, a) for p, a in zip(prompts, answers, strict=True))
    return items, _mean_nll(model, items)


def complete_reference(items: tuple[ProbeItem, ...], nll: float, model_dir: Path) -> Reference:
    """Add the anchor, run on the converted model in `model_dir`."""
    from llm_local.backends.ct2.canary import measure_anchor

    if [item.prompt_ids for item in items] != probe_prompt_ids(model_dir):
        raise ValueError(f"the probe renders differently with the tokenizer in {model_dir}")
    anchor: Anchor = measure_anchor(model_dir, items, PROBE_MAX_NEW_TOKENS)
    return Reference(PROBE_VERSION, PROBE_MAX_NEW_TOKENS, items, nll, anchor)


def record_reference(model: Any, model_dir: Path) -> Reference:
    """Both steps for a model already converted into `model_dir` (`model` holding the
    unquantized weights, loaded again from the source)."""
    items, nll = answer_probe(model, model_dir)
    return complete_reference(items, nll, model_dir)


def _float32(model: Any) -> Any:
    import torch

    if next(model.parameters()).dtype != torch.float32:
        model = model.float()
    return model.eval()


def _greedy_answers(
    model: Any, prompts: list[tuple[int, ...]], end_ids: list[int], max_new_tokens: int
) -> list[tuple[int, ...]]:
    """Greedy continuations of every prompt, decoded as one left-padded batch (one
    prompt at a time costs ~16x the time: transformers' per-step overhead dominates a
    small model). The padding is masked; it moves logits by float32 rounding only.
    A fresh generation config: the model's own may sample or penalise repetition."""
    import torch
    from transformers import GenerationConfig

    model = _float32(model)
    pad = end_ids[0] if end_ids else 0
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=end_ids, pad_token_id=pad
    )
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
    answers = []
    for row in output[:, width:].tolist():
        answer: list[int] = []
        for token in row:
            if token in end_ids:
                break
            answer.append(int(token))
        answers.append(tuple(answer))
    return answers


def _mean_nll(model: Any, items: tuple[ProbeItem, ...]) -> float:
    """Mean negative log-likelihood per answer token, teacher-forced."""
    import torch

    model = _float32(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for item in items:
            if not item.answer_ids:
                continue
            ids = torch.tensor([list(item.prompt_ids) + list(item.answer_ids)])
            logits = model(input_ids=ids).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            start = len(item.prompt_ids) - 1
            for offset, token in enumerate(item.answer_ids):
                total -= float(log_probs[start + offset, token])
                count += 1
    return total / count if count else 0.0
